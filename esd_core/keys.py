"""UNet state-dict names: diffusers <-> ldm (the names ComfyUI and CompVis checkpoints use).

The mapping is settled by diffusers' own converter. A short structural rule proposes an ldm name for each
diffusers name; diffusers' ``convert_ldm_unet_checkpoint`` then renames the proposals back, and only a
proposal that it maps onto exactly the diffusers name it came from is accepted.
"""

import re
from functools import lru_cache

from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY, convert_ldm_unet_checkpoint

# Inverse of the resnet renames in diffusers' ldm -> diffusers converter (update_unet_resnet_ldm_to_diffusers).
_RESNET_LAYER_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    diffusers: ldm
    for group in ("layers", "class_embed_type", "addition_embed_type")
    for diffusers, ldm in DIFFUSERS_TO_LDM_MAPPING["unet"][group].items()
}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _resnet_tail(tail: str) -> str:
    layer, rest = tail.split(".", 1)
    return f"{_RESNET_LAYER_TO_LDM.get(layer, layer)}.{rest}"


def _propose_ldm_name(name: str, layers_per_block: int, names: frozenset) -> str:
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    if match := _MID.fullmatch(name):
        kind, index, tail = match.group(1), int(match.group(2)), match.group(3)
        return f"middle_block.{2 * index}.{_resnet_tail(tail)}" if kind == "resnets" else f"middle_block.1.{tail}"
    match = _BLOCK.fullmatch(name)
    if not match:
        return name
    direction, block, kind, index, tail = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), match.group(5)
    if direction == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{block * (layers_per_block + 1) + layers_per_block + 1}.0.op.{tail.split('.', 1)[1]}"
        position = f"input_blocks.{block * (layers_per_block + 1) + index + 1}"
    else:
        if kind == "upsamplers":
            last = layers_per_block
            has_attention = any(n.startswith(f"up_blocks.{block}.attentions.{last}.") for n in names)
            return f"output_blocks.{block * (layers_per_block + 1) + last}.{2 if has_attention else 1}.{tail}"
        position = f"output_blocks.{block * (layers_per_block + 1) + index}"
    return f"{position}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"{position}.1.{tail}"


def diffusers_to_ldm_names(names, unet_config: dict) -> dict[str, str]:
    """Map diffusers UNet state-dict names to ldm names (no ``diffusion_model.`` prefix), checked by diffusers' converter."""
    return dict(_cached_mapping(frozenset(names), _config_key(unet_config)))


def _config_key(unet_config: dict) -> tuple:
    return (
        unet_config["layers_per_block"],
        unet_config.get("class_embed_type"),
        unet_config.get("addition_embed_type"),
    )


@lru_cache(maxsize=8)
def _cached_mapping(names: frozenset, config_key: tuple) -> tuple:
    layers_per_block, class_embed_type, addition_embed_type = config_key
    if not isinstance(layers_per_block, int):
        raise ValueError(f"UNets with a per-block layers_per_block {layers_per_block!r} are not supported.")
    proposals = {name: _propose_ldm_name(name, layers_per_block, names) for name in names}
    config = {
        "layers_per_block": layers_per_block,
        "class_embed_type": class_embed_type,
        "addition_embed_type": addition_embed_type,
    }
    # Values are the diffusers names themselves, so the converter's output says where each proposal landed.
    converted = convert_ldm_unet_checkpoint({LDM_UNET_KEY + ldm: name for name, ldm in proposals.items()}, config)
    wrong = sorted(name for name in names if converted.get(name) != name)
    if wrong:
        raise ValueError(
            f"Cannot map {len(wrong)} UNet tensor names to ldm names (first: {wrong[0]!r}); "
            "this UNet layout is not one diffusers' ldm converter knows."
        )
    return tuple(proposals.items())


BUILT_IN_FAMILIES = ("sd1", "sd2", "sdxl")  # families whose layout is known without the model (``UnetLayout.of_family``)


class UnetLayout:
    """One UNet's tensor names in both spellings, so that files naming its layers either way (a LoRA file's
    ``lora_unet_down_blocks_0_...``, a PEFT file's ``unet.down_blocks.0...``, ComfyUI's ``diffusion_model.input_blocks...``)
    can be read, and written in the spelling each tool expects."""

    def __init__(self, ldm_of: dict[str, str]):
        self.ldm_of = dict(ldm_of)  # diffusers tensor name -> ldm tensor name
        self.diffusers_of = {ldm: diffusers for diffusers, ldm in self.ldm_of.items()}

    @classmethod
    def of_unet(cls, names, unet_config: dict) -> "UnetLayout":
        """The layout of a diffusers UNet, from its state-dict names and config."""
        return cls(diffusers_to_ldm_names(names, unet_config))

    @classmethod
    def of_family(cls, family: str) -> "UnetLayout":
        """The layout every UNet of a Stable Diffusion family shares ("sd1", "sd2", "sdxl"), built without weights."""
        return _family_layout(family)

    def ldm_modules(self) -> dict[str, str]:
        """Every layer's name as files spell it, without ``.weight`` -> its ldm module name: diffusers and ldm names,
        dotted (with ``unet.`` / ``diffusion_model.`` prefixes too) and with underscores for dots (kohya's ``lora_unet_``)."""
        spellings = {}
        for diffusers, ldm in self.ldm_of.items():
            diffusers_module, ldm_module = diffusers.rsplit(".", 1)[0], ldm.rsplit(".", 1)[0]
            for spelled in (diffusers_module, f"unet.{diffusers_module}", ldm_module, f"diffusion_model.{ldm_module}"):
                spellings[spelled] = ldm_module
            for module in (diffusers_module, ldm_module):
                spellings["lora_unet_" + module.replace(".", "_")] = ldm_module
        return spellings


@lru_cache(maxsize=4)
def _family_layout(family: str) -> UnetLayout:
    import torch
    from diffusers import UNet2DConditionModel

    from .model_configs import FULL_SIZE_UNET_CONFIGS

    if family not in FULL_SIZE_UNET_CONFIGS:
        raise ValueError(f"No built-in layout for a {family!r} UNet; give the model it was made for.")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**FULL_SIZE_UNET_CONFIGS[family])
    return UnetLayout.of_unet(unet.state_dict().keys(), dict(unet.config))


# What precedes a transformer's layer name in erasure files (diffusers' spelling, which ComfyUI's loader maps too).
TRANSFORMER_KEY_PREFIX = "transformer."


class TransformerLayout(UnetLayout):
    """A flow-matching transformer's (Flux.1, SD3.x) names: erasure files name its layers as diffusers does, after
    ``transformer.``, the spelling diffusers' loaders read and ComfyUI's LoRA loader maps onto its own fused layout."""

    def __init__(self, names):
        super().__init__({name: name for name in names})

    def ldm_modules(self) -> dict[str, str]:
        modules = {name.rsplit(".", 1)[0] for name in self.ldm_of}
        return {spelled: module for module in modules for spelled in (module, TRANSFORMER_KEY_PREFIX + module)}
