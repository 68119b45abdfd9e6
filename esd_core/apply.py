"""Applying an erasure (a delta or a LoRA) to a diffusers denoiser (a UNet, or a Flux/SD3 transformer): temporarily
(restored bit-exactly) or for good."""

from contextlib import contextmanager

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from .erasure_file import ErasureDelta, model_family
from .keys import TransformerLayout, UnetLayout


def unet_family(unet: UNet2DConditionModel) -> str:
    return model_family(unet.config.cross_attention_dim, unet.config.addition_embed_type == "text_time")


def transformer_family(transformer) -> str:
    """The base-model family of a diffusers Flux or SD3 transformer, from its config (``flow_family``)."""
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    if isinstance(transformer, FluxTransformer2DModel):
        return flow_family("flux-dev" if config.guidance_embeds else "flux-schnell", width, config.joint_attention_dim)
    return flow_family("sd3", width, config.joint_attention_dim, config.patch_size)


def flow_family(kind: str, width: int, text_width: int, patch_size: int = 2) -> str:
    """The family of a transformer of ``kind`` ("flux-dev", "flux-schnell" or "sd3"): the kind for the released
    shapes (Flux 3072 wide; SD3.x of any width, all read 4096-wide T5 text in 2x2 patches), "custom-<kind>(width=N)"
    for another size of the same architecture (a tiny test model)."""
    released = (width, text_width) == (3072, 4096) if kind.startswith("flux") else (text_width, patch_size) == (4096, 2)
    return kind if released else f"custom-{kind}(width={width})"


def denoiser_of(pipeline):
    """A pipeline's denoiser: its UNet (Stable Diffusion) or its transformer (Flux.1, SD3.x)."""
    return pipeline.unet if getattr(pipeline, "unet", None) is not None else pipeline.transformer


def denoiser_family(denoiser) -> str:
    return unet_family(denoiser) if isinstance(denoiser, UNet2DConditionModel) else transformer_family(denoiser)


def denoiser_layout(denoiser) -> UnetLayout:
    """The denoiser's layer names in the spellings files use, to read LoRA files for it."""
    if isinstance(denoiser, UNet2DConditionModel):
        return UnetLayout.of_unet(denoiser.state_dict().keys(), dict(denoiser.config))
    return TransformerLayout(denoiser.state_dict().keys())


def load_for(denoiser, path: str) -> ErasureDelta:
    """Read an erasure file of either format for this denoiser, refusing one made for another model."""
    delta = ErasureDelta.load(path, denoiser_layout(denoiser), denoiser_family(denoiser))
    check_fits(denoiser, delta)
    return delta


def _targets(denoiser, delta: ErasureDelta) -> dict[str, torch.Tensor]:
    """The denoiser's parameters the delta changes, by the names files use, after refusing an incompatible delta."""
    parameters = dict(denoiser.named_parameters())
    by_ldm_name = {ldm: parameters[name] for name, ldm in denoiser_layout(denoiser).ldm_of.items() if name in parameters}
    delta.check_compatible(by_ldm_name, denoiser_family(denoiser))
    return {name: by_ldm_name[name] for name in delta.deltas}


@torch.no_grad()
def _add(targets: dict[str, torch.Tensor], delta: ErasureDelta, strength: float) -> None:
    for name, parameter in targets.items():
        parameter.add_(delta.full(name).to(parameter.device, parameter.dtype), alpha=strength)


def check_fits(denoiser, delta: ErasureDelta) -> None:
    """Refuse (ValueError) a delta made for another model, without touching the denoiser."""
    _targets(denoiser, delta)


def apply_delta(denoiser, delta: ErasureDelta, strength: float = 1.0) -> None:
    """Add ``strength * delta`` to the denoiser's weights in place (for writing an erased model)."""
    _add(_targets(denoiser, delta), delta, strength)


@contextmanager
def applied_delta(denoiser, delta: ErasureDelta, strength: float = 1.0):
    """Apply the delta inside a block; afterwards the original weights are restored bit-exactly."""
    targets = _targets(denoiser, delta)
    originals = {name: parameter.detach().clone() for name, parameter in targets.items()}
    try:
        _add(targets, delta, strength)
        yield denoiser
    finally:
        with torch.no_grad():
            for name, parameter in targets.items():
                parameter.copy_(originals[name])
