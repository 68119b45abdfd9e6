"""Applying an erasure (a delta or a LoRA) to a diffusers UNet: temporarily (restored bit-exactly) or for good."""

from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel

from .erasure_file import ErasureDelta, model_family
from .keys import UnetLayout, diffusers_to_ldm_names


def unet_family(unet: UNet2DConditionModel) -> str:
    return model_family(unet.config.cross_attention_dim, unet.config.addition_embed_type == "text_time")


def unet_layout(unet: UNet2DConditionModel) -> UnetLayout:
    """The UNet's layer names in both spellings, to read LoRA files for it."""
    return UnetLayout.of_unet(unet.state_dict().keys(), dict(unet.config))


def load_for(unet: UNet2DConditionModel, path: str) -> ErasureDelta:
    """Read an erasure file of either format for this UNet, refusing one made for another model."""
    delta = ErasureDelta.load(path, unet_layout(unet), unet_family(unet))
    check_fits(unet, delta)
    return delta


def _targets(unet: UNet2DConditionModel, delta: ErasureDelta) -> dict[str, torch.Tensor]:
    """The UNet parameters the delta changes, by ldm name, after refusing an incompatible delta."""
    parameters = dict(unet.named_parameters())
    by_ldm_name = {ldm: parameters[name] for name, ldm in diffusers_to_ldm_names(unet.state_dict().keys(), dict(unet.config)).items() if name in parameters}
    delta.check_compatible(by_ldm_name, unet_family(unet))
    return {name: by_ldm_name[name] for name in delta.deltas}


@torch.no_grad()
def _add(targets: dict[str, torch.Tensor], delta: ErasureDelta, strength: float) -> None:
    for name, parameter in targets.items():
        parameter.add_(delta.full(name).to(parameter.device, parameter.dtype), alpha=strength)


def check_fits(unet: UNet2DConditionModel, delta: ErasureDelta) -> None:
    """Refuse (ValueError) a delta made for another model, without touching the UNet."""
    _targets(unet, delta)


def apply_delta(unet: UNet2DConditionModel, delta: ErasureDelta, strength: float = 1.0) -> None:
    """Add ``strength * delta`` to the UNet's weights in place (for writing an erased model)."""
    _add(_targets(unet, delta), delta, strength)


@contextmanager
def applied_delta(unet: UNet2DConditionModel, delta: ErasureDelta, strength: float = 1.0):
    """Apply the delta inside a block; afterwards the original weights are restored bit-exactly."""
    targets = _targets(unet, delta)
    originals = {name: parameter.detach().clone() for name, parameter in targets.items()}
    try:
        _add(targets, delta, strength)
        yield unet
    finally:
        with torch.no_grad():
            for name, parameter in targets.items():
                parameter.copy_(originals[name])
