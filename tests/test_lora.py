"""LoRA files: what we write (kohya keys, factors, metadata), that diffusers' own loader gives the UNet our apply gives,
exports between formats, foreign LoRAs (LECO-style), and a clear error for every bad file."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from esd_core.apply import apply_delta, denoiser_layout, load_for, unet_family
from esd_core.cli import main
from esd_core.diffusers_host import load_pipeline
from esd_core.erasure_file import DamagedErasureError, ErasureDelta, LowRank
from esd_core.lora_format import balanced, save_lora, sharing_metadata, truncated
from esd_core.methods import layer_tensors, select_parameters

QUICK = ["--iterations", "2", "--lr", "1e-3", "--sample-steps", "4", "--device", "cpu"]


def erase(folder, out, *extra):
    return main(["erase", "--model", folder, "--concept", "red", "--out", str(out), *QUICK, *extra])


def random_erasure(unet, rank: int = 4, seed: int = 0) -> ErasureDelta:
    """Every Linear/Conv layer changed: low-rank outside cross-attention, full-rank (weights and biases) inside."""
    generator = torch.Generator().manual_seed(seed)
    layout = denoiser_layout(unet)
    deltas = {}
    for name, tensor in select_parameters(layer_tensors(unet), "esd-all").items():
        if tensor.dim() >= 2 and "attn2" not in name:
            up = torch.randn(tensor.shape[0], rank, generator=generator) * 1e-2
            deltas[layout.ldm_of[name]] = LowRank(up, torch.randn(rank, tensor[0].numel(), generator=generator), tuple(tensor.shape))
        else:
            deltas[layout.ldm_of[name]] = torch.randn(tensor.shape, generator=generator) * 1e-2
    return ErasureDelta(deltas, {"concept": "red", "method": "esd-all", "base_family": unet_family(unet)}, layout)


def keys_and_metadata(path):
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys()), handle.metadata()


def test_sharing_metadata_names_the_family_as_kohya_and_a1111_do():
    fields = sharing_metadata({"concept": "Van Gogh", "method": "esd-x"}, "sdxl", rank=8, alpha=8)
    assert fields["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert fields["ss_base_model_version"] == "sdxl_base_v1-0" and fields["ss_v2"] == "False"
    assert fields["ss_network_dim"] == fields["ss_network_alpha"] == "8" and "Van Gogh" in fields["modelspec.title"]
    v2 = sharing_metadata({"base_prediction": "v"}, "sd2", rank=4, alpha=4)
    assert v2["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and v2["ss_v2"] == "True"
    assert sharing_metadata({}, "sd1", 4, 4)["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_factors_keep_the_product():
    torch.manual_seed(0)
    up, down = torch.randn(40, 4) * 1e-4, torch.randn(4, 27)
    low = LowRank(up, down, (40, 3, 3, 3))
    even = balanced(low)
    assert torch.allclose(even.product(), low.product(), atol=1e-9)
    assert even.up.norm() / even.down.norm() == pytest.approx(1.0, rel=1e-4)  # the scale is shared: no tiny fp16 factor
    full = torch.randn(40, 27) @ torch.diag(torch.logspace(0, -6, 27)) @ torch.randn(27, 27)
    assert torch.allclose(truncated(full, 27).product(), full, atol=1e-5)
    errors = [(truncated(full, r).product() - full).norm() / full.norm() for r in (2, 4, 8, 16)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_load_lora_weights_gives_our_weights(tiny_folders, tmp_path, family):
    pipeline = load_pipeline(tiny_folders[family])
    base = copy.deepcopy(pipeline.unet.state_dict())
    erasure = random_erasure(pipeline.unet)
    path = tmp_path / "erasure.safetensors"
    report = save_lora(erasure, str(path), rank=8, dtype=torch.float16)
    keys, metadata = keys_and_metadata(path)
    assert all(key.startswith("lora_unet_") and key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in keys)
    spelling = "lora_unet_input_blocks_" if family == "sdxl" else "lora_unet_down_blocks_"  # kohya's spelling per family
    assert any(key.startswith(spelling) for key in keys)
    assert len(report.left_out) == sum(name.endswith(".bias") for name in erasure.deltas) > 0
    assert set(json.loads(metadata["lora_relative_errors"])) == {n for n in erasure.deltas if n.endswith(".weight")}
    assert "modelspec.architecture" not in metadata  # a tiny UNet is of no family the sharing tools know

    ours = copy.deepcopy(pipeline.unet)
    apply_delta(ours, load_for(ours, str(path)))
    pipeline.load_lora_weights(str(path))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    theirs, mine = pipeline.unet.state_dict(), ours.state_dict()
    changed = [name for name in base if not torch.equal(theirs[name], base[name])]
    assert len(changed) == sum(name.endswith(".weight") for name in erasure.deltas)  # every factored layer, no bias
    for name in base:
        assert torch.allclose(theirs[name], mine[name], atol=1e-6), name


def test_the_cli_writes_a_lora_by_default_and_apply_eval_info_read_it(tiny_folders, tmp_path, capsys):
    lora = tmp_path / "red.safetensors"
    assert erase(tiny_folders["sd1"], lora, "--method", "esd-u", "--rank", "4") == 0
    keys, metadata = keys_and_metadata(lora)
    assert metadata["format"] == "esd-erasure-lora" and metadata["ss_network_dim"] == "4" and metadata["concept"] == "red"
    assert not any(key.endswith((".diff", ".diff_b")) for key in keys)
    assert "rank 4" in capsys.readouterr().out

    assert main(["info", str(lora)]) == 0
    assert "rank 4" in capsys.readouterr().out

    unet_file = tmp_path / "unet.safetensors"
    assert main(["apply", "--model", tiny_folders["sd1"], "--delta", str(lora), "--out", str(unet_file), "--device", "cpu"]) == 0
    base = load_pipeline(tiny_folders["sd1"]).unet
    expected = copy.deepcopy(base)
    apply_delta(expected, load_for(base, str(lora)))
    written = load_file(str(unet_file))
    assert all(torch.equal(written[name], tensor) for name, tensor in expected.state_dict().items())
    assert sum(not torch.equal(written[name], tensor) for name, tensor in base.state_dict().items()) > 10


def test_export_between_formats(tiny_folders, tmp_path, capsys):
    delta_file, lora, back = tmp_path / "delta.safetensors", tmp_path / "lora.safetensors", tmp_path / "back.safetensors"
    assert erase(tiny_folders["sd1"], delta_file, "--save-format", "delta", "--save-dtype", "fp32") == 0
    assert main(["export", "--delta", str(delta_file), "--out", str(lora), "--model", tiny_folders["sd1"],
                 "--lora-rank", "64", "--save-dtype", "fp32"]) == 0
    assert "relative error of the written products" in capsys.readouterr().out
    assert main(["export", "--delta", str(lora), "--out", str(back), "--model", tiny_folders["sd1"], "--save-format", "delta",
                 "--save-dtype", "fp32"]) == 0
    exact, round_trip = ErasureDelta.load(str(delta_file)), ErasureDelta.load(str(back))
    weights = [name for name in exact.deltas if name.endswith(".weight")]
    assert set(round_trip.deltas) == set(weights)  # the biases were left out of the LoRA
    for name in weights:  # rank 64 is full rank for the tiny UNet's layers
        assert torch.allclose(round_trip.full(name), exact.full(name), atol=1e-6), name
    assert main(["export", "--delta", str(delta_file), "--out", str(lora), "--model", tiny_folders["sd1"]]) == 2  # exists


def test_a_foreign_lora_with_its_own_alpha_applies_as_diffusers_applies_it(tiny_folders, tmp_path):
    """A LECO-style file: kohya keys, alpha 1 at rank 4 (scale 1/4), no metadata."""
    pipeline = load_pipeline(tiny_folders["sd1"])
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    layers = dict(pipeline.unet.named_modules())
    for module in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "down_blocks.0.attentions.0.proj_in"):
        shape, key = tuple(layers[module].weight.shape), "lora_unet_" + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, *shape[1:], generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(shape[0], 4, *(1,) * (len(shape) - 2), generator=generator)
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "leco.safetensors"
    save_file(tensors, str(path))
    ours = copy.deepcopy(pipeline.unet)
    apply_delta(ours, load_for(ours, str(path)))
    base = copy.deepcopy(pipeline.unet.state_dict())
    pipeline.load_lora_weights(str(path))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    theirs = pipeline.unet.state_dict()
    assert sum(not torch.equal(theirs[name], base[name]) for name in base) == 2
    for name, tensor in ours.state_dict().items():
        assert torch.allclose(theirs[name], tensor, atol=1e-5), name


def bad_file(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def test_every_bad_file_gets_one_clear_line(tiny_folders, tmp_path):
    unet = load_pipeline(tiny_folders["sd1"]).unet
    lora = tmp_path / "good.safetensors"
    save_lora(random_erasure(unet), str(lora), rank=4)
    good = load_file(str(lora))

    truncated_file = tmp_path / "truncated.safetensors"
    truncated_file.write_bytes(lora.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_for(unet, str(truncated_file))

    up = next(key for key in good if key.endswith("lora_up.weight"))
    with pytest.raises(DamagedErasureError, match="not finite"):
        load_for(unet, bad_file(tmp_path, "nan.safetensors", {**good, up: torch.full_like(good[up], float("nan"))}))

    with pytest.raises(ValueError, match="match no layer of this model \\(first: 'lora_unet_no_such_layer'\\)"):
        load_for(unet, bad_file(tmp_path, "unmatched.safetensors", {**good, "lora_unet_no_such_layer.lora_up.weight": good[up].clone(),
                                                                     "lora_unet_no_such_layer.lora_down.weight": good[up].flatten(1).T.contiguous()}))

    with pytest.raises(ValueError, match="format this tool does not read \\(key 'lora_unet_x.hada_w1_a'\\)"):
        load_for(unet, bad_file(tmp_path, "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.ones(2, 2)}))

    with pytest.raises(ValueError, match="text-encoder"):
        load_for(unet, bad_file(tmp_path, "te.safetensors", {**good, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": good[up].clone()}))

    other = load_pipeline(tiny_folders["sd2"]).unet  # the same names; proj_in is a Linear there, a 1x1 Conv here
    with pytest.raises(ValueError, match="Shape mismatch at .*proj_in"):
        load_for(other, str(lora))

    sdxl = load_pipeline(tiny_folders["sdxl"]).unet
    with pytest.raises(ValueError, match="trained on a custom\\(context_dim=32\\) model and cannot be applied to a custom-xl"):
        load_for(sdxl, str(lora))
