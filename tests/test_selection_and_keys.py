"""Train-method selection on full-size configs (meta device, no weights) and diffusers <-> ldm names."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

from esd_core.config import EraseConfig, concept_pairs
from esd_core.erasure_file import file_key, read_entries
from esd_core.keys import diffusers_to_ldm_names
from esd_core.methods import layer_tensors, resolve_method, select_parameters
from esd_core.model_configs import FULL_SIZE_TRANSFORMER_CONFIGS, FULL_SIZE_UNET_CONFIGS

def meta_unet(family):
    with torch.device("meta"):
        return UNet2DConditionModel(**FULL_SIZE_UNET_CONFIGS[family])


def selected(family, method):
    tensors = select_parameters(layer_tensors(meta_unet(family)), method)
    return sum(t.numel() for t in tensors.values()), len(tensors)


def test_sd1_counts_match_the_published_ones():
    assert selected("sd1", "esd-x") == (43_962_560, 80)
    assert selected("sd1", "xattn-strict") == (19_169_280, 32)


def test_sd2_and_sdxl_cross_attention_counts():
    assert selected("sd2", "esd-x")[0] == 50_352_320
    assert selected("sd2", "esd-x-strict")[0] == 25_559_040
    assert selected("sdxl", "esd-x")[0] == 545_670_400
    assert selected("sdxl", "esd-x-strict")[0] == 340_787_200


def test_methods_partition_the_layers_and_never_train_norms():
    unet = meta_unet("sd1")
    everything = layer_tensors(unet)
    cross, outside = select_parameters(everything, "esd-x"), select_parameters(everything, "esd-u")
    assert not any("attn2" in name for name in outside)
    assert set(cross) | set(outside) == set(select_parameters(everything, "esd-all"))
    assert not set(cross) & set(outside)
    assert all("attn1" in name for name in select_parameters(everything, "selfattn"))
    assert not any("norm" in name.split(".")[-2] for name in everything)


def meta_transformer(family):
    import diffusers

    class_name, config = FULL_SIZE_TRANSFORMER_CONFIGS[family]
    with torch.device("meta"):
        return getattr(diffusers, class_name)(**config)


def linear_size(rows, columns):
    return rows * columns  # transformers train weights only


# Text-stream attention layers of each real config, counted by hand: Flux has 19 double blocks of dimension 3072,
# each with add_q/k/v and to_add_out; SD3.5 Medium (24 blocks, 1536) and Large (38 blocks, 2432) have q, k, v in
# every block and an output projection in all but the last, whose text stream ends there.
TEXT_STREAM_BY_HAND = {
    "flux-dev": 19 * 4 * linear_size(3072, 3072),
    "flux-schnell": 19 * 4 * linear_size(3072, 3072),
    "sd3.5-medium": (24 * 3 + 23) * linear_size(1536, 1536),
    "sd3.5-large": (38 * 3 + 37) * linear_size(2432, 2432),
}


@pytest.mark.parametrize("family", sorted(FULL_SIZE_TRANSFORMER_CONFIGS))
def test_transformer_method_counts_on_real_configs(family):
    transformer = meta_transformer(family)
    everything = layer_tensors(transformer)

    def count(method):
        return sum(t.numel() for t in select_parameters(everything, method, "mmdit").values())

    assert count("esd-x") == TEXT_STREAM_BY_HAND[family]
    weights = sum(t.numel() for name, t in everything.items() if name.endswith(".weight"))
    assert count("esd-x") + count("esd-u") == count("esd-all") == weights
    with pytest.raises(ValueError, match="UNets only.*esd-x"):
        select_parameters(everything, "esd-x-strict", "mmdit")


def test_published_totals_of_the_transformers():
    totals = {family: sum(p.numel() for p in meta_transformer(family).parameters()) for family in FULL_SIZE_TRANSFORMER_CONFIGS}
    assert round(totals["flux-dev"] / 1e9, 1) == 11.9  # the model card's "12 billion parameter"
    assert round(totals["sd3.5-medium"] / 1e9, 2) == 2.24
    assert round(totals["sd3.5-large"] / 1e9, 2) == 8.06


def test_text_stream_selection_reads_comfyui_names_too():
    names = [
        "double_blocks.0.txt_attn.qkv.weight", "double_blocks.0.txt_attn.proj.bias", "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.0.txt_mlp.0.weight", "single_blocks.3.linear1.weight",
        "joint_blocks.2.context_block.attn.qkv.weight", "joint_blocks.2.context_block.attn.proj.weight",
        "joint_blocks.2.x_block.attn.qkv.weight", "joint_blocks.2.x_block.attn2.qkv.weight",
    ]
    tensors = {name: torch.empty(0) for name in names}
    assert sorted(select_parameters(tensors, "esd-x", "mmdit")) == sorted(
        n for n in names if (".txt_attn." in n or ".context_block.attn." in n) and n.endswith(".weight"))
    assert "joint_blocks.2.x_block.attn2.qkv.weight" in select_parameters(tensors, "esd-u", "mmdit")


def test_selection_works_on_ldm_names_too():
    unet = meta_unet("sd1")
    names = diffusers_to_ldm_names(unet.state_dict().keys(), dict(unet.config))
    by_ldm_name = {names[name]: t for name, t in layer_tensors(unet).items()}
    tensors = select_parameters(by_ldm_name, "esd-x")
    assert sum(t.numel() for t in tensors.values()) == 43_962_560
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in tensors


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_ldm_names_round_trip_through_diffusers_converter(family):
    unet = meta_unet(family)
    names = list(unet.state_dict().keys())
    mapping = diffusers_to_ldm_names(names, dict(unet.config))
    assert len(set(mapping.values())) == len(names)
    back = convert_ldm_unet_checkpoint({LDM_UNET_KEY + ldm: name for name, ldm in mapping.items()}, dict(unet.config))
    assert back == {name: name for name in names}


def test_well_known_ldm_names():
    unet = meta_unet("sd1")
    mapping = diffusers_to_ldm_names(unet.state_dict().keys(), dict(unet.config))
    assert mapping["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert mapping["mid_block.resnets.1.conv2.weight"] == "middle_block.2.out_layers.3.weight"
    assert mapping["up_blocks.3.attentions.2.proj_out.bias"] == "output_blocks.11.1.proj_out.bias"
    assert mapping["down_blocks.2.downsamplers.0.conv.weight"] == "input_blocks.9.0.op.weight"
    assert mapping["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"


def test_delta_file_keys_use_comfyui_lora_suffixes():
    name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert file_key(name) == "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.diff"
    assert file_key("out.2.bias") == "diffusion_model.out.2.diff_b"
    weight, bias = torch.ones(2, 2), torch.ones(2)
    assert read_entries({file_key(name): weight, file_key("out.2.bias"): bias}, layout=None) == {name: weight, "out.2.bias": bias}


def test_concept_pairs():
    assert concept_pairs("a, b") == [("a", "a"), ("b", "b")]
    assert concept_pairs("a, b", "x") == [("a", "x"), ("b", "x")]
    assert concept_pairs("a, b", "x, y") == [("a", "x"), ("b", "y")]
    with pytest.raises(ValueError, match="one per concept"):
        concept_pairs("a, b, c", "x, y")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(concept=" , "), "concept is empty"),
        (dict(concept="x", method="lora"), "Unknown train method 'lora'. Use one of: esd-x"),
        (dict(concept="x", iterations=0), "iterations must be a whole number from 1 to 100000"),
        (dict(concept="x", lr=0.0), "lr must be a finite number from 1e-09 to 1.0"),
        (dict(concept="x", lr=-1e-5), "lr must be a finite number from 1e-09 to 1.0"),
        (dict(concept="x", sample_with="both"), "sample_with"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        EraseConfig(**settings)


def test_aliases_resolve():
    assert [resolve_method(a) for a in ("xattn", "xattn-strict", "noxattn", "selfattn", "full")] == [
        "esd-x", "esd-x-strict", "esd-u", "esd-self", "esd-all"
    ]
