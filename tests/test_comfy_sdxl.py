"""The ComfyUI host on an SDXL-type model (ADM input y from encode_adm) against the diffusers host.

A small SDXL-shaped UNet (2 levels, 32/64 channels, text_time embedding) is built as a diffusers model, renamed
to ldm names with esd_core.keys and loaded into ComfyUI's own SDXL model class; both hosts then run the same
weights. Needs ComfyUI (COMFYUI_PATH); skips otherwise.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_env  # noqa: E402

comfy_env.require_comfyui()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from comfy_env.one_torch_thread()

POOLED, CONTEXT, RESOLUTION = 32, 64, 64


def diffusers_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(5)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=32, attention_head_dim=8, cross_attention_dim=CONTEXT, use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=6 * 256 + POOLED,
    ).eval()


class FakeClip:
    """Stands in for ComfyUI's CLIP: fixed random (cond, pooled) per text."""

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        generator = torch.Generator().manual_seed(sum(map(ord, tokens)) + 1)
        return torch.randn((1, 77, CONTEXT), generator=generator), torch.randn((1, POOLED), generator=generator)


@pytest.fixture(scope="module")
def hosts():
    comfy_env.in_process_comfy()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    keys = comfy_env.pack_module("esd_core.keys")
    host_module = comfy_env.pack_module("nodes.comfy_host")
    diffusers_host = comfy_env.pack_module("esd_core.diffusers_host")

    unet = diffusers_sdxl_unet()
    names = keys.diffusers_to_ldm_names(unet.state_dict().keys(), dict(unet.config))
    ldm_state = {names[k]: v for k, v in unet.state_dict().items()}
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": 6 * 256 + POOLED, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
        "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": CONTEXT,
        "use_temporal_resblock": False, "use_temporal_attention": False, "dtype": torch.float32,
    }
    config = comfy.supported_models.SDXL(unet_config)
    config.unet_config.update(num_heads=8, num_head_channels=-1)
    with torch.inference_mode():  # as ComfyUI loads models
        base = config.get_model({})
        missing, unexpected = base.diffusion_model.load_state_dict(ldm_state, strict=False)
        assert not missing and not unexpected, (missing[:3], unexpected[:3])
        device = comfy.model_management.get_torch_device()
        patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(comfy_env.require_comfyui(), "comfy", "sd1_tokenizer"), model_max_length=77)
    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, projection_dim=POOLED)
    pipeline = StableDiffusionXLPipeline(
        vae=AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8),
        unet=unet, scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        tokenizer=tokenizer, tokenizer_2=tokenizer, text_encoder=CLIPTextModel(text),
        text_encoder_2=CLIPTextModelWithProjection(text),
    )
    theirs = diffusers_host.DiffusersHost(pipeline, device="cpu", resolution=RESOLUTION)
    with torch.inference_mode(False):
        ours = host_module.ComfyErasureHost(patcher, FakeClip(), RESOLUTION)
        yield ours, theirs
        ours.release()




def test_sdxl_host_describes_the_model_like_diffusers(hosts):
    ours, theirs = hosts
    assert ours.sdxl and ours.family == theirs.family == "custom-xl(context_dim=64)"
    assert ours.latent_shape == theirs.latent_shape == (4, 8, 8)
    assert {theirs.ldm_name(n) for n in theirs.layer_tensors()} == set(ours.layer_tensors())


def test_sdxl_eps_and_gradients_match_diffusers(hosts):
    ours, theirs = hosts
    methods = comfy_env.pack_module("esd_core.methods")
    trainable = comfy_env.pack_module("esd_core.trainable")
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn((2, 4, 8, 8), generator=generator)
    timesteps = torch.tensor([101, 761])
    with torch.inference_mode(False):
        comfy_conds = [ours.encode("a red car"), ours.encode("")]
        assert comfy_conds[0][1].shape == (1, 6 * 256 + POOLED)  # y = [pooled, 6 size/crop embeddings]
        fake = FakeClip()
        diffusers_conds = [fake.encode_from_tokens(t) for t in ("a red car", "")]
        assert comfy_env.relative_error(ours.predict(x_t, timesteps, comfy_conds),
                              theirs.predict(x_t, timesteps, diffusers_conds)) < 1e-4

        grads = []
        for host, conds in ((ours, comfy_conds), (theirs, diffusers_conds)):
            delta = trainable.TrainableDelta(methods.select_parameters(host.layer_tensors(), "esd-x"))
            with host.attach(delta), delta.switched(True):
                prediction = host.predict(x_t[:1], 101, conds[:1])
                prediction.square().mean().backward()
            grads.append({host.ldm_name(n): t.grad for n, t in delta.full.items()})
    assert set(grads[0]) == set(grads[1]) and grads[0]
    assert max(comfy_env.relative_error(grads[0][n], grads[1][n]) for n in grads[1]) < 1e-4
