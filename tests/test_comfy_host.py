"""The ComfyUI host against the diffusers host, on the very same tiny SD1.5-shaped weights.

Needs ComfyUI (COMFYUI_PATH); skips otherwise.
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

RESOLUTION = 64  # 8x8 latents


@pytest.fixture(scope="module")
def env():
    return comfy_env.in_process_comfy()


@pytest.fixture(scope="module")
def comfy_model(env):
    return comfy_env.load_tiny_model()


@pytest.fixture(scope="module")
def diffusers_host(env):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    diffusers_host = comfy_env.pack_module("esd_core.diffusers_host")
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(comfy_env.require_comfyui(), "comfy", "sd1_tokenizer"), model_max_length=77)
    vae = AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, latent_channels=4)  # 8x scale
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae, unet=comfy_env.tiny_diffusers_unet(), scheduler=scheduler, tokenizer=tokenizer,
        text_encoder=comfy_env.tiny_text_encoder(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return diffusers_host.DiffusersHost(pipeline, device="cpu", resolution=RESOLUTION)


@pytest.fixture(scope="module")
def comfy_host(env, comfy_model):
    host_module = comfy_env.pack_module("nodes.comfy_host")
    model, clip = comfy_model
    with torch.inference_mode(False):
        host = host_module.ComfyErasureHost(model, clip, RESOLUTION)
        yield host
        host.release()




def test_hosts_agree_on_schedule_and_shapes(comfy_host, diffusers_host):
    assert comfy_host.family == diffusers_host.family == "sd1"
    assert comfy_host.latent_shape == diffusers_host.latent_shape == (4, 8, 8)
    assert comfy_env.relative_error(comfy_host.alphas_cumprod, diffusers_host.alphas_cumprod) < 1e-6
    comfy_names = set(comfy_host.layer_tensors())
    mapped = {diffusers_host.ldm_name(name) for name in diffusers_host.layer_tensors()}
    assert comfy_names == mapped and len(comfy_names) > 50


def test_text_encodings_agree(comfy_host, diffusers_host):
    with torch.inference_mode(False):
        for text in ("", "a photo of a cat"):
            ours, _ = comfy_host.encode(text)
            theirs, _ = diffusers_host.encode(text)
            assert ours.shape == theirs.shape == (1, 77, 768)
            assert comfy_env.relative_error(ours, theirs) < 1e-4, text


@pytest.mark.parametrize("timestep", [1, 501, 981])
def test_eps_predictions_match_diffusers(comfy_host, diffusers_host, timestep):
    generator = torch.Generator().manual_seed(timestep)
    x_t = torch.randn((1, 4, 8, 8), generator=generator)
    with torch.inference_mode(False):
        conds = [(torch.randn((1, 77, 768), generator=generator), None) for _ in range(3)]
        ours = comfy_host.predict(x_t, timestep, conds)
        theirs = diffusers_host.predict(x_t, timestep, conds)
    assert ours.shape == theirs.shape == (3, 4, 8, 8)
    assert ours.dtype == torch.float32
    assert comfy_env.relative_error(ours, theirs) < 1e-4


def test_eps_with_a_latent_and_timestep_per_row_matches_diffusers(comfy_host, diffusers_host):
    generator = torch.Generator().manual_seed(3)
    x_t = torch.randn((3, 4, 8, 8), generator=generator)
    timesteps = torch.tensor([981, 1, 421])
    with torch.inference_mode(False):
        conds = [(torch.randn((1, 77, 768), generator=generator), None) for _ in range(3)]
        ours = comfy_host.predict(x_t, timesteps, conds)
        theirs = diffusers_host.predict(x_t, timesteps, conds)
        one_row = comfy_host.predict(x_t[1:2], 1, conds[1:2])
    assert comfy_env.relative_error(ours, theirs) < 1e-4
    assert comfy_env.relative_error(one_row[0], ours[1]) < 1e-5


@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_one_esd_step_has_the_same_gradients(comfy_host, diffusers_host, method):
    esd = comfy_env.pack_module("esd_core.esd")
    methods = comfy_env.pack_module("esd_core.methods")
    trainable = comfy_env.pack_module("esd_core.trainable")
    generator = torch.Generator().manual_seed(7)
    x_t = torch.randn((1, 4, 8, 8), generator=generator)
    timestep = 421
    gradients = []
    with torch.inference_mode(False):
        empty = (torch.randn((1, 77, 768), generator=generator), None)
        concept = (torch.randn((1, 77, 768), generator=generator), None)
        for host in (comfy_host, diffusers_host):
            delta = trainable.TrainableDelta(methods.select_parameters(host.layer_tensors(), method))
            # a non-zero delta, the same on both hosts, so the step is taken away from the base weights too
            for name, tensor in delta.full.items():
                seed = sum(map(ord, host.ldm_name(name)))
                with torch.no_grad():
                    tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)) * 1e-3)
            with host.attach(delta):
                with torch.no_grad(), delta.switched(False):
                    e0, ec = host.predict(x_t, timestep, [empty, concept])
                    target = esd.esd_target(e0, ec, ec, 1.0)
                with delta.switched(True):
                    prediction = host.predict(x_t, timestep, [concept])[0]
                loss = torch.nn.functional.mse_loss(prediction, target)
                loss.backward()
            gradients.append({host.ldm_name(n): t.grad.detach().clone() for n, t in delta.full.items()})
    ours, theirs = gradients
    assert set(ours) == set(theirs) and ours
    worst = max(comfy_env.relative_error(ours[name], theirs[name]) for name in theirs if theirs[name].norm() > 0)
    assert worst < 1e-4, worst
    assert all(g.abs().sum() > 0 for g in theirs.values() if g.dim() > 1)


@pytest.mark.parametrize("options", [{"sample_steps": 3}, {"sample_steps": 3, "adversarial": True, "adversarial_every": 1, "adversarial_steps": 2}],
                         ids=["plain", "adversarial"])
def test_training_leaves_the_model_untouched_and_releases_the_wrappers(env, comfy_model, options):
    model, clip = comfy_model
    host_module = comfy_env.pack_module("nodes.comfy_host")
    before = {k: v.clone() for k, v in host_module.unet_tensors(model).items()}
    with torch.inference_mode():
        erased, delta, curve = env["node"]["ESDTrainErasure"].execute(
            model=model, clip=clip, concept="a cat", method="esd-x", iterations=2, learning_rate=1e-3,
            negative_guidance=1.0, seed=0, resolution=RESOLUTION, options=options,
        ).args
    import gc

    gc.collect()  # training memory is released: no trainable delta outlives the node (a host lives in a fixture here)
    assert not [o for o in gc.get_objects() if type(o).__name__ == "TrainableDelta"]
    after = host_module.unet_tensors(model)
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k].to(before[k].device)) for k in before)
    assert not model.patches and not model.weight_wrapper_patches
    for module in model.model.modules():
        for attribute in ("weight_function", "bias_function"):
            assert not any(type(f).__name__ == "_Wrapper" for f in module.__dict__.get(attribute, []))
    assert len(delta.deltas) == 20 and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") or "attn2" in k for k in delta.deltas)
    assert all("attn2" in k for k in delta.deltas)
    assert any(t.abs().max() > 0 for t in delta.deltas.values())
    assert delta.metadata["base_family"] == "sd1" and delta.metadata["method"] == "esd-x"
    assert curve.shape == (1, 256, 512, 3) and 0.0 <= curve.min() and curve.max() <= 1.0
    assert set(erased.patches) == {"diffusion_model." + k for k in delta.deltas}
