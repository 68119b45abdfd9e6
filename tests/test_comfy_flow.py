"""The ComfyUI host on Flux.1- and SD3-shaped MODELs: random weights, small sizes of the real architectures.

The MODELs are ComfyUI's own Flux and SD3 model classes holding a tiny diffusers transformer's weights, converted by
ComfyUI's own diffusers converter, so the diffusers host runs the very same weights. The text encoder is a stand-in
with ComfyUI's CLIP interface: Flux's real ones (T5-XXL and CLIP-L, 4.9 B parameters) are too large for these tests.
Needs ComfyUI (COMFYUI_PATH); skips otherwise.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_env  # noqa: E402

comfy_env.require_comfyui()

TEXT_WIDTH, TOKENS = 32, 8
POOLED_WIDTH = {"flux-dev": 32, "flux-schnell": 32, "sd3": 64}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from comfy_env.one_torch_thread()


@pytest.fixture(scope="module")
def env():
    return comfy_env.with_erasures_as_loras(comfy_env.in_process_comfy())


def tiny_transformer(kind: str):
    """A diffusers transformer of ``kind`` that ComfyUI's model classes can hold: Flux with 16 latent channels in 2x2
    patches and heads as wide as its rotary axes; SD3 with 64-wide heads, one per block (ComfyUI derives both)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if kind.startswith("flux"):
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=POOLED_WIDTH[kind], guidance_embeds=kind == "flux-dev",
            axes_dims_rope=(8, 12, 12),
        )
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH, caption_projection_dim=128, pooled_projection_dim=POOLED_WIDTH[kind], pos_embed_max_size=16,
    )


def comfy_model(kind: str, transformer, weight_dtype=torch.float32):
    """The transformer's weights in a ComfyUI MODEL of its kind, loaded as ComfyUI's loaders load one (inference mode);
    stored in ``weight_dtype`` and computed in fp32, as Load Diffusion Model's fp8 weight_dtype does."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models

    # copies: the converter writes swapped halves back into the tensors it is given
    state = comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in transformer.state_dict().items()}, "")
    if kind.startswith("flux"):
        unet_config = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=POOLED_WIDTH[kind],
                           context_in_dim=TEXT_WIDTH, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
                           axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=kind == "flux-dev")
        config = (comfy.supported_models.Flux if kind == "flux-dev" else comfy.supported_models.FluxSchnell)(unet_config)
    else:
        config = comfy.model_detection.model_config_from_unet(state, "")
    config.set_inference_dtype(weight_dtype, None if weight_dtype == torch.float32 else torch.float32)
    with torch.inference_mode():
        model = config.get_model(state, "")
        model.load_model_weights(state, "")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class StandInClip:
    """ComfyUI's CLIP interface (tokenize, encode_from_tokens) over a random table: characters as tokens, padded to
    a fixed length; the pooled output is a projection of their mean."""

    def __init__(self, pooled_width: int, seed: int = 3):
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(128, TEXT_WIDTH, generator=generator)
        self.projection = torch.randn(TEXT_WIDTH, pooled_width, generator=generator) / TEXT_WIDTH**0.5

    def tokenize(self, text: str):
        return ([ord(c) % 128 for c in text] + [0] * TOKENS)[:TOKENS]

    def encode_from_tokens(self, tokens, return_pooled=False):
        cond = self.table[torch.tensor(tokens)][None]
        return (cond, cond.mean(1) @ self.projection) if return_pooled else cond


def diffusers_host(kind: str, transformer, folder: str):
    """The diffusers host over ``transformer``, in a tiny pipeline of its kind (whose text encoders are not used)."""
    from tiny_models import tiny_flow_pipeline

    diffusers_host_module = comfy_env.pack_module("esd_core.diffusers_host")
    pipeline = tiny_flow_pipeline(kind, folder)
    pipeline.register_modules(transformer=transformer)
    return diffusers_host_module.host_for(pipeline, guidance=3.5)


def comfy_weights(patcher) -> dict:
    """The denoiser's weights as ComfyUI runs them once the MODEL (with its patches) is loaded."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


@pytest.mark.parametrize("kind", ["flux-dev", "flux-schnell", "sd3"])
def test_velocity_matches_the_diffusers_host_on_the_same_weights(env, kind, tmp_path):
    import comfy.samplers

    host_module = comfy_env.pack_module("nodes.comfy_host")
    transformer = tiny_transformer(kind)
    reference = diffusers_host(kind, transformer, str(tmp_path))
    model = comfy_model(kind, transformer)
    generator = torch.Generator().manual_seed(5)
    x_t = torch.randn(1, 16, 8, 8, generator=generator)
    conds = [(torch.randn(1, TOKENS, TEXT_WIDTH, generator=generator), torch.randn(1, POOLED_WIDTH[kind], generator=generator))
             for _ in range(2)]
    with torch.inference_mode(False):
        host = host_module.erasure_host(model, StandInClip(POOLED_WIDTH[kind]), resolution=64, guidance=3.5)
        try:
            assert type(host).__name__ == "ComfyFlowHost" and host.prediction == "flow" and host.architecture == "mmdit"
            assert host.family == reference.family == f"custom-{kind}(width={64 if kind.startswith('flux') else 128})"
            assert set(host.layer_tensors()) == {n for n in reference.layer_tensors() if n.endswith(".weight")}
            for timestep in (900.0, 250.0):
                expected = reference.predict(x_t, timestep, conds)
                assert torch.allclose(host.predict(x_t, timestep, conds), expected, atol=1e-4, rtol=1e-4)
            simple = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 10)
            assert torch.allclose(host.sampling_scheduler(10).sigmas, simple.float(), atol=1e-5)  # ComfyUI's own schedule
        finally:
            host.release()


@pytest.mark.parametrize("kind", ["flux-dev", "sd3"])
def test_an_erasure_trains_in_comfyui_and_the_stock_lora_loader_applies_it(env, kind, tmp_path):
    """Train Concept Erasure on a Flux/SD3 MODEL: the input MODEL stays bit-identical; the saved delta file, applied by
    ComfyUI's stock LoraLoaderModelOnly, patches exactly the trained weights (the slices of the fused qkv layers
    included); a LoRA of it too; and the diffusers host, given the same file, predicts what the erased MODEL does."""
    from esd_core.apply import applied_delta, load_for

    host_module = comfy_env.pack_module("nodes.comfy_host")
    transformer = tiny_transformer(kind)
    model = comfy_model(kind, transformer)
    clip = StandInClip(POOLED_WIDTH[kind])
    before = comfy_weights(model)
    with torch.inference_mode():
        erased, erasure, _ = env["node"]["ESDTrainErasure"].execute(
            model=model, clip=clip, concept="red", method="esd-x", iterations=3, learning_rate=1e-2, negative_guidance=1.0,
            seed=1, resolution=64, options={"sample_steps": 4, "rank": 4},
        ).args
    assert erasure.metadata["base_family"] == host_module.family_of(model) and erasure.metadata["base_prediction"] == "flow"
    assert all(".attn.add_" in n or ".attn.to_add_out." in n for n in erasure.deltas) and all(n.endswith(".weight") for n in erasure.deltas)
    assert all(erasure.full(n).abs().max() > 0 for n in erasure.deltas if "add_q_proj" not in n)
    after = comfy_weights(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    path = env["node"]["ESDSaveErasure"].execute(erasure=erasure, filename_prefix=f"tests/{kind}", dtype="fp32", save_format="delta").args[0]
    name = os.path.relpath(path, env["erasures"]).replace(os.sep, "/")
    with torch.inference_mode():
        stock = env["nodes"].LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    stock_weights, erased_weights = comfy_weights(stock), comfy_weights(erased)
    changed = {k for k in before if not torch.equal(stock_weights[k], before[k])}
    fused = ".txt_attn." if kind.startswith("flux") else ".context_block.attn."
    assert changed and all(fused in k and k.endswith(".weight") for k in changed)
    assert all(torch.equal(stock_weights[k], erased_weights[k]) for k in before)
    for name, (comfy_name, piece) in host_module.transformer_pieces(model).items():  # each trained slice, as patched
        if name in erasure.deltas:
            patched = stock_weights[comfy_name].narrow(*piece.offset) if piece.offset else stock_weights[comfy_name]
            base = before[comfy_name].narrow(*piece.offset) if piece.offset else before[comfy_name]
            assert torch.allclose(patched, base + erasure.full(name), atol=1e-6)

    lora_path = env["node"]["ESDSaveErasure"].execute(erasure=erasure, filename_prefix=f"tests/{kind}-lora", dtype="fp32",
                                                      save_format="lora").args[0]
    with torch.inference_mode():
        from_lora = env["nodes"].LoraLoaderModelOnly().load_lora_model_only(
            model, os.path.relpath(lora_path, env["erasures"]).replace(os.sep, "/"), 1.0)[0]
    lora_weights = comfy_weights(from_lora)
    assert all(torch.allclose(lora_weights[k], stock_weights[k], atol=1e-6) for k in before)  # rank 4 = the trained rank

    reference = diffusers_host(kind, transformer, str(tmp_path))
    generator = torch.Generator().manual_seed(7)
    x_t = torch.randn(1, 16, 8, 8, generator=generator)
    conds = [clip.encode_from_tokens(clip.tokenize("red"), return_pooled=True)]
    with torch.inference_mode(False):
        host = host_module.erasure_host(erased, clip, resolution=64, guidance=3.5)
        try:
            in_comfyui = host.predict(x_t, 500.0, conds)
        finally:
            host.release()
    with applied_delta(transformer, load_for(transformer, path)):
        in_diffusers = reference.predict(x_t, 500.0, conds)
    assert torch.allclose(in_comfyui, in_diffusers, atol=1e-4, rtol=1e-4)


def test_an_erasure_trains_on_fp8_weights(env):
    """Flux with fp8 weights (the example workflow's setup for 24 GB cards): the layers compute in a wider dtype from
    casts of the fp8 weights, the delta rides on those, and the stored fp8 weights are never written."""
    model = comfy_model("flux-dev", tiny_transformer("flux-dev"), torch.float8_e4m3fn)
    before = comfy_weights(model)
    assert before["double_blocks.0.txt_attn.qkv.weight"].dtype == torch.float8_e4m3fn
    with torch.inference_mode():
        _, erasure, _ = env["node"]["ESDTrainErasure"].execute(
            model=model, clip=StandInClip(POOLED_WIDTH["flux-dev"]), concept="red", method="esd-x", iterations=2,
            learning_rate=1e-2, negative_guidance=1.0, seed=1, resolution=64, options={"sample_steps": 4},
        ).args
    assert all(erasure.full(n).abs().max() > 0 for n in erasure.deltas if "add_q_proj" not in n)
    after = comfy_weights(model)
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)  # bit for bit, fp8 too
