"""Reading erased UNet weights from the file layouts people actually have, into ldm (ComfyUI) names.

Layouts understood (all may be full or partial):
- ldm names, bare (``input_blocks.1.1...``) or prefixed ``diffusion_model.`` / ``model.diffusion_model.``;
  a full CompVis checkpoint keeps only its ``model.diffusion_model.*`` part (VAE and text encoder dropped);
- diffusers names (``down_blocks.0.attentions.0...``), bare or prefixed ``unet.``, e.g. a full
  ``diffusers-*-UNET.pt`` or a partial bf16 ``esd-*.safetensors``; converted with ``esd_core.keys``;
- the nested ``{'unet.<module>': {'weight': tensor, 'bias': tensor}}`` dict of an older ESD script.
Files: ``.safetensors``, or ``.pt``/``.ckpt``/``.pth``/``.bin`` read with ``torch.load(weights_only=True)`` only.

Nothing here knows ComfyUI; the node passes in the model's tensors and its UNet config.
"""

import os

import torch

from ..esd_core.keys import diffusers_to_ldm_names

LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
DIFFUSERS_ROOTS = (
    "down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "conv_out.", "conv_norm_out.",
    "time_embedding.", "add_embedding.", "class_embedding.",
)
LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_PREFIXES = ("unet.",)
PICKLE_EXTENSIONS = (".pt", ".ckpt", ".pth", ".bin")


class UnetFileError(ValueError):
    """A file that cannot be used as UNet weights, with the reason and what to do instead."""


def read_tensor_file(path: str) -> dict:
    """Load a .safetensors file, or a pickle file with ``weights_only=True``; nothing else is ever unpickled."""
    if not os.path.isfile(path):
        raise UnetFileError(f"No file at {path!r}.")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as error:
            raise UnetFileError(f"{os.path.basename(path)!r} is not a readable safetensors file: {error}") from error
    if lower.endswith(PICKLE_EXTENSIONS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UnetFileError(
                f"{os.path.basename(path)!r} could not be read safely (torch.load with weights_only=True): {error}. "
                "Files that need arbitrary pickled objects are refused; convert it to .safetensors with a tool you trust."
            ) from error
    raise UnetFileError(
        f"{os.path.basename(path)!r} has an unknown extension. Use .safetensors, .pt, .ckpt, .pth or .bin."
    )


def flatten(loaded) -> dict[str, torch.Tensor]:
    """Unwrap ``state_dict`` / nested-module dicts into one flat ``name -> tensor`` dict; non-tensors are dropped."""
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise UnetFileError(f"The file holds a {type(loaded).__name__}, not a dict of tensors.")
    flat = {}
    for key, value in loaded.items():
        if isinstance(value, torch.Tensor):
            flat[str(key)] = value
        elif isinstance(value, dict):  # {'unet.<module>': {'weight': ..., 'bias': ...}}
            for inner, tensor in value.items():
                if isinstance(tensor, torch.Tensor):
                    flat[f"{key}.{inner}"] = tensor
    return flat


def _strip(name: str, prefixes) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def unet_part(flat: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The UNet tensors of a flat dict, unprefixed, and which naming they use: ``"ldm"`` or ``"diffusers"``."""
    if any(key.endswith((".diff", ".diff_b", ".lora_up.weight", ".lora_B.weight")) for key in flat):
        raise UnetFileError(
            "This file is an erasure or a LoRA (weight deltas), not UNet weights. Load it with 'Apply Erasure' "
            "(or LoraLoaderModelOnly) instead."
        )
    if any(key.startswith("model.diffusion_model.") for key in flat):  # full CompVis checkpoint
        flat = {k[len("model.diffusion_model."):]: v for k, v in flat.items() if k.startswith("model.diffusion_model.")}
    else:
        flat = {_strip(_strip(k, LDM_PREFIXES), DIFFUSERS_PREFIXES): v for k, v in flat.items()}
    ldm = {k: v for k, v in flat.items() if k.startswith(LDM_ROOTS)}
    diffusers = {k: v for k, v in flat.items() if k.startswith(DIFFUSERS_ROOTS)}
    if ldm and diffusers:
        raise UnetFileError(
            f"The file mixes ldm names ({next(iter(ldm))!r}) and diffusers names ({next(iter(diffusers))!r}); "
            "it is not one UNet state dict."
        )
    if ldm:
        return ldm, "ldm"
    if diffusers:
        return diffusers, "diffusers"
    sample = ", ".join(repr(k) for k in list(flat)[:3]) or "none"
    raise UnetFileError(
        f"No UNet tensors found (first keys: {sample}). Expected a Stable Diffusion UNet state dict in ldm names "
        "(input_blocks..., optionally prefixed model.diffusion_model.) or diffusers names (down_blocks...)."
    )


def diffusers_config(unet_config: dict, is_sdxl: bool) -> dict:
    """The three diffusers UNet settings ``esd_core.keys`` needs, from a ComfyUI (ldm) unet_config."""
    blocks = unet_config.get("num_res_blocks", 2)
    if isinstance(blocks, (list, tuple)):
        if len(set(blocks)) != 1:
            raise UnetFileError(f"UNets with different res-block counts per level ({list(blocks)}) are not supported.")
        blocks = blocks[0]
    return {
        "layers_per_block": int(blocks),
        "class_embed_type": None,
        "addition_embed_type": "text_time" if is_sdxl else None,
    }


def to_ldm_names(tensors: dict, naming: str, config: dict, reference_names=()) -> dict[str, torch.Tensor]:
    """Rename a diffusers-named UNet dict to ldm names. ``reference_names``: the model's full diffusers names, if known,
    so that a partial file is mapped with the whole UNet's layout in view."""
    if naming == "ldm":
        return dict(tensors)
    try:
        try:
            mapping = diffusers_to_ldm_names(set(tensors) | set(reference_names), config)
        except ValueError:
            if not reference_names:
                raise
            mapping = diffusers_to_ldm_names(set(tensors), config)
    except ValueError as error:
        raise UnetFileError(f"Cannot map the file's diffusers names onto this model: {error}") from error
    return {mapping[name]: tensor for name, tensor in tensors.items()}


def match_model(tensors: dict, model_tensors: dict) -> dict[str, torch.Tensor]:
    """Check names and shapes against the model's UNet (ldm names, no prefix); cast to each model tensor's dtype.

    A Linear weight stored for a 1x1 Conv (or the reverse) is reshaped; any other shape difference is refused.
    """
    missing = sorted(name for name in tensors if name not in model_tensors)
    if missing:
        raise UnetFileError(
            f"The file has {len(missing)} tensors this model does not have (first: {missing[0]!r}). "
            "It was made for another model architecture: pick the matching checkpoint."
        )
    out = {}
    for name in sorted(tensors):
        tensor, target = tensors[name], model_tensors[name]
        if tuple(tensor.shape) != tuple(target.shape):
            if tensor.numel() == target.numel() and _squeeze(tensor.shape) == _squeeze(target.shape):
                tensor = tensor.reshape(target.shape)
            else:
                raise UnetFileError(
                    f"Shape mismatch at {name!r}: the file has {tuple(tensor.shape)}, the model {tuple(target.shape)}. "
                    "The file was made for another model (e.g. SD1.x vs SD2.x vs SDXL): pick the matching checkpoint."
                )
        out[name] = tensor.to(dtype=target.dtype)
    return out


def _squeeze(shape) -> tuple:
    shape = list(shape)
    while shape and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def load_unet_weights(path: str, model_tensors: dict, config: dict, reference_names=()) -> tuple[dict, str]:
    """Everything in one call: the file's UNet tensors in ldm names, checked against ``model_tensors``; and its layout."""
    flat = flatten(read_tensor_file(path))
    tensors, naming = unet_part(flat)
    renamed = to_ldm_names(tensors, naming, config, reference_names)
    return match_model(renamed, model_tensors), naming
