"""The trainable part of an erasure: an fp32 delta per selected tensor, and a switch.

The UNet itself is never changed. A host makes each selected weight reach its layer as
``weight + delta`` while the switch is on, and as the untouched ``weight`` while it is off; so the
frozen predictions and the trained ones come from one UNet in memory.
"""

from contextlib import contextmanager

import torch


class TrainableDelta:
    """fp32 master deltas (zeros at the start) for the tensors an erasure trains."""

    def __init__(self, base_tensors: dict[str, torch.Tensor]):
        self.deltas = {
            name: torch.zeros(t.shape, dtype=torch.float32, device=t.device, requires_grad=True)
            for name, t in base_tensors.items()
        }
        self.enabled = False

    def parameters(self) -> list[torch.Tensor]:
        return list(self.deltas.values())

    def parameter_count(self) -> int:
        return sum(d.numel() for d in self.deltas.values())

    def added_to(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as the model should see it now: plus the delta (cast to the weight's dtype) when on."""
        if not self.enabled:
            return weight
        return weight + self.deltas[name].to(device=weight.device, dtype=weight.dtype)

    @contextmanager
    def switched(self, enabled: bool):
        """Turn the delta on or off for the duration of a block."""
        previous, self.enabled = self.enabled, enabled
        try:
            yield
        finally:
            self.enabled = previous

    def detached(self) -> dict[str, torch.Tensor]:
        """The learned deltas as plain CPU fp32 tensors."""
        return {name: d.detach().to("cpu", torch.float32).clone() for name, d in self.deltas.items()}
