"""The trainable part of an erasure: an fp32 delta per selected tensor, and a switch.

The UNet itself is never changed. A host makes each selected weight reach its layer as
``weight + delta`` while the switch is on, and as the untouched ``weight`` while it is off; so the
frozen predictions and the trained ones come from one UNet in memory.

With ``rank`` > 0 each matrix-shaped delta is a LoRA-style product ``up @ down`` (up starts at zero,
so the delta does too), which keeps esd-u and esd-all from costing a second UNet of optimizer state.
"""

import math
from contextlib import contextmanager

import torch


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

    @contextmanager
    def switched(self, enabled: bool):
        """Turn the delta on or off for the duration of a block."""
        previous, self.enabled = self.enabled, enabled
        try:
            yield
        finally:
            self.enabled = previous

    def detached(self) -> dict[str, torch.Tensor]:
        """The learned deltas as plain CPU fp32 tensors at full shape."""
        with torch.no_grad():
            return {name: self.delta(name).detach().to("cpu", torch.float32).clone() for name in self.shapes}
