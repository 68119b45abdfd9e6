"""Train methods: which tensors of a denoiser (UNet or MMDiT transformer) an erasure may change.

Selection goes by module name, in either spelling of a model's names:
- UNets (SD1.x, SD2.x, SDXL): diffusers (``down_blocks.1.attentions.0...``) and ldm/ComfyUI (``input_blocks.4.1...``)
  names both call cross-attention ``attn2`` and self-attention ``attn1``.
- MMDiT transformers (Flux.1, SD3.x) have no cross-attention: text and image tokens attend jointly, each stream
  with its own projections. The layers through which the prompt reaches the image are the text stream's attention
  projections: diffusers ``attn.add_q_proj``/``add_k_proj``/``add_v_proj``/``to_add_out``, ComfyUI Flux
  ``txt_attn.qkv``/``txt_attn.proj``, ComfyUI SD3 ``context_block.attn.qkv``/``.proj``. That is ESD-x there.
  Flux's single-stream blocks run text and image tokens through the same weights, so they belong to ESD-u.
Only the weights and biases of Linear and Conv layers are trained; norms never. On MMDiT transformers only the
weights: ComfyUI fuses q, k and v into one layer and its LoRA loader cannot add a bias delta to one slice of it, and
a LoRA carries no biases; so a transformer erasure holds the same tensors in every form and in both hosts.
"""

import re

from torch import nn

TEXT_STREAM_ATTENTION = re.compile(
    r"(\.attn\.(add_[qkv]_proj|to_add_out)"  # diffusers Flux and SD3
    r"|\.txt_attn\.(qkv|proj)"  # ComfyUI Flux
    r"|\.context_block\.attn\.(qkv|proj))$"  # ComfyUI SD3
)


def text_stream_attention(name: str) -> bool:
    return TEXT_STREAM_ATTENTION.search(name) is not None


# name -> (description, predicate on a UNet module name, predicate on an MMDiT module name or None if undefined there)
TRAIN_METHODS = {
    "esd-x": (
        "cross-attention (attn2; on Flux/SD3 the text stream's attention projections); for styles and artists",
        lambda name: "attn2" in name,
        text_stream_attention,
    ),
    "esd-x-strict": (
        "cross-attention keys and values only (attn2.to_k, attn2.to_v; UNets only)",
        lambda name: "attn2.to_k" in name or "attn2.to_v" in name,
        None,
    ),
    "esd-u": (
        "everything outside cross-attention (on Flux/SD3: outside the text stream's attention); for global concepts (nudity, objects)",
        lambda name: "attn2" not in name,
        lambda name: not text_stream_attention(name),
    ),
    "esd-self": ("self-attention (attn1; UNets only)", lambda name: "attn1" in name, None),
    "esd-all": ("every Linear and Conv layer", lambda name: True, lambda name: True),
}

METHOD_ALIASES = {
    "xattn": "esd-x",
    "xattn-strict": "esd-x-strict",
    "noxattn": "esd-u",
    "selfattn": "esd-self",
    "full": "esd-all",
}

TRAINABLE_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def resolve_method(name: str) -> str:
    """Map a method name or alias to its canonical name, or raise a ValueError listing the valid ones."""
    key = name.strip().lower()
    key = METHOD_ALIASES.get(key, key)
    if key not in TRAIN_METHODS:
        valid = "; ".join(f"{m}: {description}" for m, (description, *_) in TRAIN_METHODS.items())
        aliases = ", ".join(f"{a}={c}" for a, c in METHOD_ALIASES.items())
        raise ValueError(f"Unknown train method {name!r}. Use one of: {valid}. Aliases: {aliases}.")
    return key


def layer_tensors(model: nn.Module) -> dict:
    """The weights and biases of every Linear/Conv layer of ``model``, keyed by state-dict name."""
    tensors = {}
    for module_name, module in model.named_modules():
        if isinstance(module, TRAINABLE_LAYER_TYPES):
            for tensor_name, tensor in module.named_parameters(recurse=False):
                tensors[f"{module_name}.{tensor_name}"] = tensor
    return tensors


def select_parameters(tensors: dict, method: str, architecture: str = "unet") -> dict:
    """The subset of ``tensors`` (state-dict name -> tensor) that ``method`` trains on a denoiser of ``architecture``
    ("unet" or "mmdit")."""
    method = resolve_method(method)
    _, on_unet, on_mmdit = TRAIN_METHODS[method]
    wanted = on_unet if architecture == "unet" else on_mmdit
    if wanted is None:
        usable = ", ".join(m for m, (*_, mmdit) in TRAIN_METHODS.items() if mmdit is not None)
        raise ValueError(f"The method {method!r} is defined for UNets only; on Flux and SD3 models use one of: {usable}.")
    return {name: t for name, t in tensors.items()
            if wanted(name.rsplit(".", 1)[0]) and (architecture == "unet" or name.endswith(".weight"))}
