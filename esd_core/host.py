"""The small interface between the ESD loop and whatever runs the UNet (diffusers, ComfyUI)."""

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

import torch

from .keys import UnetLayout
from .sampling import ddim_scheduler
from .trainable import TrainableDelta


class ErasureHost(ABC):
    """Runs one denoiser (a UNet, or a flow-matching transformer) for the ESD loop. Predictions are in the space the
    ESD target is built in: epsilon for Stable Diffusion UNets, whatever they predict natively; velocity for
    flow-matching transformers, which predict it natively."""

    device: torch.device
    latent_shape: tuple[int, int, int]  # (channels, height, width) of one latent
    family: str  # "sd1", "sd2", "sdxl", "flux-dev", "sd3", ... or "custom(...)": what a delta may be applied to
    prediction: str  # what the model predicts natively: "epsilon", "v" or "flow" (velocity)
    architecture: str = "unet"  # "unet" or "mmdit": which layers a train method selects (``methods``)

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
        """Encode one prompt into the conditioning ``predict`` takes, a tuple whose first item is the
        cross-attention context, (1, tokens, width) (warn if the text was cut)."""

    @abstractmethod
    def predict(self, x_t: torch.Tensor, timestep: int | float | torch.Tensor, conds: list) -> torch.Tensor:
        """The prediction (epsilon or velocity, see the class), fp32, shape (len(conds), C, H, W): one row per cond.

        ``x_t`` is (1, C, H, W), shared by every row, or (len(conds), C, H, W); ``timestep`` (the sampling
        scheduler's: on the 1000-step schedule, or sigma * 1000 for flow matching) is one number for every row,
        or a tensor with one per row.
        """

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The model's training noise schedule: cumulative alpha products for the 1000 timesteps (DDPM-family models)."""
        raise ValueError(f"{type(self).__name__} runs a flow-matching model, which has no DDPM noise schedule; "
                         "this command works on Stable Diffusion 1.x, 2.x and SDXL models.")

    def sampling_scheduler(self, steps: int):
        """The diffusers scheduler that samples the ESD trajectories in ``steps`` steps: DDIM on the model's schedule."""
        return ddim_scheduler(self.alphas_cumprod, steps)

    def sampler_prediction(self, unconditional: torch.Tensor, conditional: torch.Tensor, guidance: float) -> torch.Tensor:
        """The prediction a sampler steps with, from the unconditional and conditional ones: classifier-free guidance."""
        return unconditional + guidance * (conditional - unconditional)

    def token_tables(self) -> list[torch.Tensor]:
        """The token-embedding table of each text encoder, (vocabulary, width): where a learned token's vectors live."""
        raise ValueError(f"{type(self).__name__} cannot learn a new token; run the attack with esd-erase attack.")

    def encode_with_token(self, text: str, token: str, vectors: list[torch.Tensor]):
        """Like ``encode``, with ``token`` in ``text`` read as the given vectors (one per text encoder), differentiably."""
        raise ValueError(f"{type(self).__name__} cannot learn a new token; run the attack with esd-erase attack.")
