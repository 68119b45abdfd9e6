"""The small interface between the ESD loop and whatever runs the UNet (diffusers, ComfyUI)."""

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

import torch

from .keys import UnetLayout
from .trainable import TrainableDelta


class ErasureHost(ABC):
    """Runs one UNet for the ESD loop. Predictions are always epsilon, whatever the model predicts natively."""

    device: torch.device
    latent_shape: tuple[int, int, int]  # (channels, height, width) of one latent
    family: str  # "sd1", "sd2", "sdxl" or "custom(...)": what a delta may be applied to
    prediction: str  # what the UNet predicts natively: "epsilon" or "v"

    @abstractmethod
    def layer_tensors(self) -> dict[str, torch.Tensor]:
        """Weights and biases of every Linear/Conv layer of the UNet, by the host's state-dict names."""

    @abstractmethod
    def ldm_name(self, name: str) -> str:
        """The ldm (ComfyUI) state-dict name, without ``diffusion_model.``, of a name from ``layer_tensors``."""

    @property
    @abstractmethod
    def layout(self) -> UnetLayout:
        """The UNet's tensor names in both spellings (diffusers and ldm), for writing LoRA files."""

    @abstractmethod
    def attach(self, delta: TrainableDelta) -> AbstractContextManager:
        """Make the UNet see ``delta`` (while it is switched on) for the duration of a block."""

    @abstractmethod
    def encode(self, text: str) -> Any:
        """Encode one prompt into the conditioning ``predict_eps`` takes, a tuple whose first item is the
        cross-attention context, (1, tokens, width) (warn if the text was cut)."""

    @abstractmethod
    def predict_eps(self, x_t: torch.Tensor, timestep: int | torch.Tensor, conds: list) -> torch.Tensor:
        """Epsilon, fp32, shape (len(conds), C, H, W): one row per cond.

        ``x_t`` is (1, C, H, W), shared by every row, or (len(conds), C, H, W); ``timestep`` (on the
        1000-step schedule) is one int for every row, or a tensor with one per row.
        """

    @property
    @abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """The model's training noise schedule: cumulative alpha products for the 1000 timesteps."""

    def token_tables(self) -> list[torch.Tensor]:
        """The token-embedding table of each text encoder, (vocabulary, width): where a learned token's vectors live."""
        raise ValueError(f"{type(self).__name__} cannot learn a new token; run the attack with esd-erase attack.")

    def encode_with_token(self, text: str, token: str, vectors: list[torch.Tensor]):
        """Like ``encode``, with ``token`` in ``text`` read as the given vectors (one per text encoder), differentiably."""
        raise ValueError(f"{type(self).__name__} cannot learn a new token; run the attack with esd-erase attack.")
