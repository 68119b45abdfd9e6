"""Train methods: which UNet tensors an erasure may change.

Selection goes by module name and works for diffusers names (``down_blocks.1.attentions.0...``) and
ldm/ComfyUI names (``input_blocks.4.1...``) alike, because both call cross-attention ``attn2`` and
self-attention ``attn1``. Only the weights and biases of Linear and Conv layers are trained; norms never.
"""

from torch import nn

# name -> (description, predicate on the module name)
TRAIN_METHODS = {
    "esd-x": ("cross-attention (attn2); for styles and artists", lambda name: "attn2" in name),
    "esd-x-strict": (
        "cross-attention keys and values only (attn2.to_k, attn2.to_v)",
        lambda name: "attn2.to_k" in name or "attn2.to_v" in name,
    ),
    "esd-u": ("everything outside cross-attention; for global concepts (nudity, objects)", lambda name: "attn2" not in name),
    "esd-self": ("self-attention (attn1)", lambda name: "attn1" in name),
    "esd-all": ("every Linear and Conv layer", lambda name: True),
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
        valid = "; ".join(f"{m}: {description}" for m, (description, _) in TRAIN_METHODS.items())
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


def select_parameters(tensors: dict, method: str) -> dict:
    """The subset of ``tensors`` (state-dict name -> tensor) that ``method`` trains."""
    _, wanted = TRAIN_METHODS[resolve_method(method)]
    return {name: t for name, t in tensors.items() if wanted(name.rsplit(".", 1)[0])}
