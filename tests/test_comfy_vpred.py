"""The ComfyUI host on a v-prediction model (SD2.x 768-v style) against the diffusers host on the same weights.

ComfyUI's apply_model returns the denoised latent for v-prediction too; the host's eps = (x - denoised) / sigma
must equal the diffusers host's conversion of the v output. The host is asked for eps before anything else
(no layer_tensors() first), which must work too. Needs ComfyUI (COMFYUI_PATH); skips otherwise.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_env  # noqa: E402

comfy_env.require_comfyui()

CONTEXT, RESOLUTION = 64, 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from comfy_env.one_torch_thread()


class FakeClip:
    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        generator = torch.Generator().manual_seed(sum(map(ord, tokens)) + 7)
        return torch.randn((1, 77, CONTEXT), generator=generator), None


@pytest.fixture(scope="module")
def hosts():
    comfy_env.in_process_comfy()
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    keys = comfy_env.pack_module("esd_core.keys")
    host_module = comfy_env.pack_module("nodes.comfy_host")
    diffusers_host = comfy_env.pack_module("esd_core.diffusers_host")

    torch.manual_seed(9)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=32, attention_head_dim=8, cross_attention_dim=CONTEXT, use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
    ).eval()
    names = keys.diffusers_to_ldm_names(unet.state_dict().keys(), dict(unet.config))
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "channel_mult": [1, 2],
        "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": CONTEXT,
        "use_temporal_resblock": False, "use_temporal_attention": False, "dtype": torch.float32,
    }
    config = comfy.supported_models.SD20(unet_config)
    config.unet_config.update(num_heads=8, num_head_channels=-1)
    with torch.inference_mode():
        base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION)
        base.diffusion_model.load_state_dict({names[k]: v for k, v in unet.state_dict().items()})
        device = comfy.model_management.get_torch_device()
        patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)

    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8),
        unet=unet, scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           prediction_type="v_prediction"),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(comfy_env.require_comfyui(), "comfy", "sd1_tokenizer"),
                                                model_max_length=77),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=CONTEXT, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    theirs = diffusers_host.DiffusersHost(pipeline, device="cpu", resolution=RESOLUTION)
    with torch.inference_mode(False):
        ours = host_module.ComfyErasureHost(patcher, FakeClip(), RESOLUTION)
        yield ours, theirs
        ours.release()




def test_vpred_eps_and_gradients_match_diffusers(hosts):
    ours, theirs = hosts
    assert ours.family == theirs.family == "custom(context_dim=64)"
    methods = comfy_env.pack_module("esd_core.methods")
    trainable = comfy_env.pack_module("esd_core.trainable")
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn((3, 4, 8, 8), generator=generator)
    timesteps = torch.tensor([1, 500, 999])
    with torch.inference_mode(False):
        conds = [ours.encode("a red car"), ours.encode(""), ours.encode("a red car")]
        eps_ours = ours.predict(x_t, timesteps, conds)
        eps_theirs = theirs.predict(x_t, timesteps, conds)
        assert comfy_env.relative_error(eps_ours, eps_theirs) < 1e-4

        grads = []
        for host in (ours, theirs):
            delta = trainable.TrainableDelta(methods.select_parameters(host.layer_tensors(), "esd-u"))
            with host.attach(delta), delta.switched(True):
                host.predict(x_t[1:2], 500, conds[:1]).square().mean().backward()
            grads.append({host.ldm_name(n): t.grad for n, t in delta.full.items()})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 20
    # A conv bias right before a GroupNorm with one channel per group (32 channels, 32 groups at this tiny
    # UNet's first level) has a zero gradient in exact arithmetic; both hosts return round-off (~1e-9) there.
    largest = max(g.norm() for g in grads[1].values())
    meaningful = [n for n in grads[1] if grads[1][n].norm() > 1e-5 * largest]
    assert len(meaningful) > 100
    worst = max(comfy_env.relative_error(grads[0][n], grads[1][n]) for n in meaningful)
    assert worst < 1e-4, worst
    everything = [torch.cat([g[n].flatten() for n in sorted(g)]) for g in grads]
    assert comfy_env.relative_error(everything[0], everything[1]) < 1e-5
