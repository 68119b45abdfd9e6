"""The trainable part of an erasure: an fp32 delta per selected tensor, and a switch.

The UNet itself is never changed. While the switch is on, a host makes each selected layer answer as if
its weight were ``weight + delta``: either by adding the delta to the weight on its way into the layer
(``added_to``) or by adding the delta's own contribution to the layer's output (``output_change``,
which keeps no full-size copy of the weight and loses no small delta to bf16 rounding). While the switch
is off the layer is untouched; so the frozen predictions and the trained ones come from one UNet.

With ``rank`` > 0 each matrix-shaped delta is a LoRA-style product ``up @ down`` (up starts at zero,
so the delta does too), which keeps esd-u and esd-all from costing a second UNet of optimizer state.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .erasure_file import LowRank


class TrainableDelta:
    """fp32 master deltas (zero at the start) for the tensors an erasure trains."""

    def __init__(self, base_tensors: dict[str, torch.Tensor], rank: int = 0, generator: torch.Generator | None = None):
        self.shapes = {name: tuple(t.shape) for name, t in base_tensors.items()}
        self.full: dict[str, torch.Tensor] = {}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, tensor in base_tensors.items():
            rows, columns = tensor.shape[0], tensor[0].numel()
            if rank and tensor.dim() >= 2 and rank < min(rows, columns):
                down = torch.randn(rank, columns, generator=generator) / math.sqrt(columns)
                self.factors[name] = (
                    torch.zeros(rows, rank, device=tensor.device, requires_grad=True),
                    down.to(tensor.device).requires_grad_(True),
                )
            else:
                self.full[name] = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device, requires_grad=True)
        self.enabled = False

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.full.values()) + [factor for pair in self.factors.values() for factor in pair]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def delta(self, name: str) -> torch.Tensor:
        """The fp32 delta of one tensor, at the tensor's shape."""
        if name in self.full:
            return self.full[name]
        up, down = self.factors[name]
        return (up @ down).reshape(self.shapes[name])

    def added_to(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as the model should see it now: plus the delta (cast to the weight's dtype) when on."""
        if not self.enabled:
            return weight
        return weight + self.delta(name).to(device=weight.device, dtype=weight.dtype)

    def output_change(self, module: torch.nn.Module, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """What the deltas of ``module`` (state-dict prefix ``prefix``) add to its output for input ``x``.

        Linear or Conv layers only; a low-rank weight delta runs as two thin layers (down, then up).
        """
        change = torch.zeros((), dtype=x.dtype, device=x.device)
        weight_name, bias_name = f"{prefix}.weight", f"{prefix}.bias"
        if weight_name in self.factors:
            up, down = (factor.to(x.dtype) for factor in self.factors[weight_name])
            shape = self.shapes[weight_name]
            thin = _layer(module, x, down.reshape(down.shape[0], *shape[1:]))
            change = change + _pointwise(thin, up.reshape(*up.shape, *(1,) * (len(shape) - 2)))
        elif weight_name in self.full:
            change = change + _layer(module, x, self.full[weight_name].to(x.dtype))
        if bias_name in self.full:
            bias = self.full[bias_name].to(x.dtype)
            change = change + (bias if isinstance(module, torch.nn.Linear) else bias.view(-1, *(1,) * (x.dim() - 2)))
        return change

    @contextmanager
    def switched(self, enabled: bool):
        """Turn the delta on or off for the duration of a block."""
        previous, self.enabled = self.enabled, enabled
        try:
            yield
        finally:
            self.enabled = previous

    def detached(self) -> dict[str, "torch.Tensor | LowRank"]:
        """The learned deltas as plain CPU fp32 tensors: full ones at their shape, low-rank ones as their factors
        (never multiplied out here: an esd-u erasure of SD1.5 would take 3 GB at full size)."""
        def plain(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().to("cpu", torch.float32).clone()

        stored = {name: plain(tensor) for name, tensor in self.full.items()}
        stored |= {name: LowRank(plain(up), plain(down), self.shapes[name]) for name, (up, down) in self.factors.items()}
        return {name: stored[name] for name in self.shapes}


def _layer(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``module``'s own operation (stride, padding, ...) with another weight and no bias."""
    if isinstance(module, torch.nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x, weight, None)


def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 (pointwise) convolution, or a plain matrix product for Linear-shaped inputs."""
    if weight.dim() == 2:
        return F.linear(x, weight)
    return {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()](x, weight)
