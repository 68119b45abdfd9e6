"""The pack's ComfyUI-free helpers (nodes/unet_files.py, nodes/loss_plot.py): no ComfyUI needed, run everywhere.

The pack is imported as a package under a test name without running its top-level __init__ (which imports
ComfyUI), the way ComfyUI would import it, so the helpers' relative imports of esd_core work.
"""

import importlib
import os
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pack(name: str):
    if "esd_pack_under_test" not in sys.modules:
        package = types.ModuleType("esd_pack_under_test")
        package.__path__ = [REPO]
        sys.modules["esd_pack_under_test"] = package
    return importlib.import_module(f"esd_pack_under_test.{name}")


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=16, attention_head_dim=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys = pack("esd_core.keys")
    to_ldm = keys.diffusers_to_ldm_names(state.keys(), dict(model.config))
    ldm = {to_ldm[k]: v for k, v in state.items()}
    config = {"layers_per_block": 1, "class_embed_type": None, "addition_embed_type": None}
    return state, to_ldm, ldm, config


def load(path, unet):
    """As the node calls it: with the model's full diffusers names, so partial files map with the whole layout."""
    state, _, ldm, config = unet
    return pack("nodes.unet_files").load_unet_weights(path, ldm, config, reference_names=list(state))


def test_full_diffusers_pt(tmp_path, unet):
    state, to_ldm, ldm, _ = unet
    changed = {k: v + 1 for k, v in state.items()}
    torch.save(changed, tmp_path / "diffusers-x-ESDu1-UNET.pt")
    tensors, naming = load(str(tmp_path / "diffusers-x-ESDu1-UNET.pt"), unet)
    assert naming == "diffusers" and set(tensors) == set(ldm)
    assert all(torch.equal(tensors[to_ldm[k]], changed[k]) for k in state)


def test_compvis_checkpoint_keeps_only_the_unet(tmp_path, unet):
    state, to_ldm, ldm, _ = unet
    tensors = {f"model.diffusion_model.{k}": v * 2 for k, v in ldm.items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    tensors["cond_stage_model.transformer.text_model.final_layer_norm.bias"] = torch.zeros(2)
    tensors["model_ema.decay"] = torch.tensor(0.999)
    torch.save({"state_dict": tensors, "global_step": 10, "epoch": 1}, tmp_path / "sd-erased.ckpt")
    loaded, naming = load(str(tmp_path / "sd-erased.ckpt"), unet)
    assert naming == "ldm" and set(loaded) == set(ldm)
    assert all(torch.equal(loaded[k], ldm[k] * 2) for k in ldm)


def test_partial_bf16_diffusers_safetensors(tmp_path, unet):
    state, to_ldm, _, _ = unet
    chosen = [k for k in state if "attn2.to_k" in k or "attn2.to_v" in k]
    save_file({k: state[k].to(torch.bfloat16) for k in chosen}, str(tmp_path / "esd-x-from-x-esdx.safetensors"))
    loaded, naming = load(str(tmp_path / "esd-x-from-x-esdx.safetensors"), unet)
    assert naming == "diffusers" and set(loaded) == {to_ldm[k] for k in chosen} and len(chosen) == 8
    # cast to the model's dtype (fp32 here), bf16 values kept exactly
    assert all(torch.equal(loaded[to_ldm[k]], state[k].to(torch.bfloat16).float()) for k in chosen)


def test_nested_module_dict(tmp_path, unet):
    state, to_ldm, _, _ = unet
    nested = {}
    for k in (k for k in state if "attn2" in k):
        module, kind = k.rsplit(".", 1)
        nested.setdefault(f"unet.{module}", {})[kind] = state[k] - 1
    torch.save(nested, tmp_path / "nested.pt")
    loaded, naming = load(str(tmp_path / "nested.pt"), unet)
    assert naming == "diffusers"
    assert {k: v for k, v in loaded.items()}.keys() == {to_ldm[k] for k in state if "attn2" in k}


def test_ldm_names_with_and_without_prefix(tmp_path, unet):
    _, _, ldm, _ = unet
    some = sorted(ldm)[:5]
    save_file({f"diffusion_model.{k}": ldm[k] for k in some}, str(tmp_path / "a.safetensors"))
    save_file({k: ldm[k] for k in some}, str(tmp_path / "b.safetensors"))
    for name in ("a.safetensors", "b.safetensors"):
        loaded, naming = load(str(tmp_path / name), unet)
        assert naming == "ldm" and sorted(loaded) == some


def test_linear_and_1x1_conv_shapes_convert(tmp_path, unet):
    _, _, ldm, _ = unet
    name = next(k for k in ldm if k.endswith("proj_in.weight"))  # a 1x1 conv in this (SD1-style) UNet
    assert ldm[name].dim() == 4
    save_file({name: ldm[name].flatten(1)}, str(tmp_path / "linear.safetensors"))
    loaded, _ = load(str(tmp_path / "linear.safetensors"), unet)
    assert loaded[name].shape == ldm[name].shape


@pytest.mark.parametrize("content, message", [
    ({"input_blocks.1.1.proj_in.weight": torch.zeros(5, 5)}, "Shape mismatch at 'input_blocks.1.1.proj_in.weight'"),
    ({"input_blocks.99.0.in_layers.2.weight": torch.zeros(1)}, "tensors this model does not have"),
    ({"diffusion_model.input_blocks.1.1.proj_in.diff": torch.zeros(1)}, "Apply Erasure"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(1)}, "a LoRA"),
    ({"text_model.final_layer_norm.weight": torch.zeros(1)}, "No UNet tensors found"),
    ({"input_blocks.1.1.proj_in.weight": torch.zeros(1), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, "mixes"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, unet, content, message):
    errors = pack("nodes.unet_files")
    save_file(content, str(tmp_path / "bad.safetensors"))
    with pytest.raises(errors.UnetFileError, match=message.replace(".", r"\.")):
        load(str(tmp_path / "bad.safetensors"), unet)


def test_unreadable_and_unsafe_files(tmp_path, unet):
    errors = pack("nodes.unet_files")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(errors.UnetFileError, match="not a readable safetensors"):
        load(str(tmp_path / "junk.safetensors"), unet)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callback": types.SimpleNamespace(a=1)}, tmp_path / "unsafe.ckpt")
    with pytest.raises(errors.UnetFileError, match="weights_only=True"):
        load(str(tmp_path / "unsafe.ckpt"), unet)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(errors.UnetFileError, match="unknown extension"):
        load(str(tmp_path / "model.onnx"), unet)
    with pytest.raises(errors.UnetFileError, match="No file"):
        load(str(tmp_path / "missing.safetensors"), unet)


def test_loss_curve_image():
    plot = pack("nodes.loss_plot")
    image = plot.loss_curve_image([1.0, 0.5, float("nan"), 0.25], "erase 'cat'")
    assert image.shape == (1, 256, 512, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    red = (image[0, :, :, 0] > 0.6) & (image[0, :, :, 1] < 0.3)
    assert red.sum() > 100  # the curve is drawn
    assert plot.loss_curve_image([], "").shape == (1, 256, 512, 3)
