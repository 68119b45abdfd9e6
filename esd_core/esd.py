"""The ESD loop (Gandikota et al., ICCV 2023), on any ErasureHost.

Per iteration: draw a (concept c, erase_from f) pair and a step count k; sample x_t with k guided DDIM
steps conditioned on f; ask the frozen model for e0 (prompt ""), ec and ef; train the delta so that the
erased model, conditioned on f, predicts ``e0 - eta * (ec - e0)`` (the paper's formula) when f == c, and
``ef - eta * (ec - e0)`` when erasing c from another text f.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import EraseConfig
from .erasure_file import ErasureDelta, erasure_metadata, fingerprint
from .host import ErasureHost
from .methods import select_parameters
from .sampling import ddim_scheduler, sample_xt
from .trainable import TrainableDelta

# Called after every update with (iteration index, loss); a host may raise from it to cancel.
ProgressCallback = Callable[[int, float], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing is saved."""


def esd_target(e0: torch.Tensor, ec: torch.Tensor, ef: torch.Tensor | None, eta: float) -> torch.Tensor:
    """Negative guidance away from c: the paper's ``e0 - eta * (ec - e0)``; when erasing c from another text f
    (``ef`` given), the anchor is f's own prediction: ``ef - eta * (ec - e0)``."""
    anchor = e0 if ef is None else ef
    return anchor - eta * (ec - e0)


def train_erasure(host: ErasureHost, config: EraseConfig, progress: ProgressCallback | None = None) -> TrainableDelta:
    """Train the delta that erases ``config.concept`` from the host's UNet; the UNet itself is left untouched."""
    generator = torch.Generator().manual_seed(config.seed)
    pairs = config.pairs
    empty = host.encode("")
    conds = {text: host.encode(text) for pair in pairs for text in pair}
    scheduler = ddim_scheduler(host.alphas_cumprod, config.sample_steps)

    delta = TrainableDelta(select_parameters(host.layer_tensors(), config.method))
    optimizer = torch.optim.Adam(delta.parameters(), lr=config.lr)

    with host.attach(delta):
        for iteration in range(config.iterations):
            concept, source = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
            steps_done = int(torch.randint(config.sample_steps, (1,), generator=generator))

            with delta.switched(config.sample_with == "trained"):
                x_t, timestep = sample_xt(
                    host, scheduler, steps_done, conds[source], empty, config.sample_guidance, generator
                )

            with torch.no_grad(), delta.switched(False):
                prompts = [empty, conds[concept]] if concept == source else [empty, conds[concept], conds[source]]
                e0, ec, *ef = host.predict_eps(x_t, timestep, prompts)
                target = esd_target(e0, ec, ef[0] if ef else None, config.eta)

            with delta.switched(True):
                prediction = host.predict_eps(x_t, timestep, [conds[source]])[0]
            loss = F.mse_loss(prediction.float(), target.float())
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"The loss became {loss.item()} at iteration {iteration + 1}; nothing was saved. "
                    "Lower the learning rate (--lr) or use --dtype fp32."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(iteration, loss.item())
    return delta


def erase(host: ErasureHost, config: EraseConfig, progress: ProgressCallback | None = None) -> ErasureDelta:
    """Train an erasure and package it as an ErasureDelta in ldm names, with the metadata that says how it was made."""
    trained = train_erasure(host, config, progress)
    base = host.layer_tensors()
    deltas = {host.ldm_name(name): tensor for name, tensor in trained.detached().items()}
    metadata = erasure_metadata(
        config.as_metadata(),
        host.family,
        fingerprint({host.ldm_name(name): base[name] for name in trained.deltas}),
        trained.parameter_count(),
    )
    return ErasureDelta(deltas, metadata)
