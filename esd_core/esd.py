"""The ESD loop (Gandikota et al., ICCV 2023), on any ErasureHost.

Per update: draw a (concept c, erase_from f) pair and a step count k; take x_t after k guided DDIM steps
from noise, conditioned on f; ask the frozen model for e0 (prompt ""), ec and ef; train the delta so
that the erased model, conditioned on f, predicts ``e0 - eta * (ec - e0)`` (the paper's formula) when
f == c, and ``ef - eta * (ec - e0)`` when erasing c from another text f.

Two modes feed the same update with the same distribution of (x_t, t):
- reference: a fresh partial trajectory for every update, as the paper does;
- fast: one trajectory serves ``reuse`` updates, at step counts drawn uniformly (chained random
  permutations), so no state is more than ``reuse`` updates stale; the frozen predictions for its
  states are computed once each, in batches.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import EraseConfig
from .erasure_file import ErasureDelta, erasure_metadata, fingerprint
from .host import ErasureHost
from .methods import select_parameters
from .sampling import ddim_scheduler, ddim_trajectory
from .trainable import TrainableDelta

# Called after every update with (iteration index, loss); a host may raise from it to cancel.
ProgressCallback = Callable[[int, float], None]

# Frozen predictions are batched this many states at a time in fast mode.
FROZEN_STATES_PER_PASS = 8


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing is saved."""


@dataclass
class TrainingExample:
    """One update's input: the latent, its timestep, the text the prediction is conditioned on, and the target."""

    x_t: torch.Tensor
    timestep: int
    source: str
    target: torch.Tensor


def esd_target(e0: torch.Tensor, ec: torch.Tensor, ef: torch.Tensor | None, eta: float) -> torch.Tensor:
    """Negative guidance away from c: the paper's ``e0 - eta * (ec - e0)``; when erasing c from another text f
    (``ef`` given), the anchor is f's own prediction: ``ef - eta * (ec - e0)``."""
    anchor = e0 if ef is None else ef
    return anchor - eta * (ec - e0)


class TrainingRun:
    """What both modes share: the host, the delta, the encoded prompts, the schedule and the random stream."""

    def __init__(self, host: ErasureHost, delta: TrainableDelta, config: EraseConfig, generator: torch.Generator):
        self.host, self.delta, self.config, self.generator = host, delta, config, generator
        self.conds = {text: host.encode(text) for text in ["", *(t for pair in config.pairs for t in pair)]}
        self.scheduler = ddim_scheduler(host.alphas_cumprod, config.sample_steps)

    def draw(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def draw_pair(self) -> tuple[str, str]:
        pairs = self.config.pairs
        return pairs[self.draw(len(pairs))]

    def trajectory(self, source: str, steps: int) -> list[tuple[torch.Tensor, int]]:
        """States 0..steps of a guided trajectory under f, sampled by the trained or the frozen model."""
        with self.delta.switched(self.config.sample_with == "trained"):
            c = self.conds
            return ddim_trajectory(self.host, self.scheduler, steps, c[source], c[""], self.config.sample_guidance, self.generator)

    @torch.no_grad()
    def targets(self, states: list[tuple[torch.Tensor, int]], concept: str, source: str) -> list[torch.Tensor]:
        """The frozen model's targets for several states of one pair, in one batched pass."""
        texts = ["", concept] if concept == source else ["", concept, source]
        rows = len(texts)
        x = torch.cat([x_t for x_t, _ in states]).repeat_interleave(rows, dim=0)
        timesteps = torch.tensor([t for _, t in states]).repeat_interleave(rows)
        with self.delta.switched(False):
            eps = self.host.predict_eps(x, timesteps, [self.conds[t] for t in texts] * len(states))
        eps = eps.view(len(states), rows, *eps.shape[1:])
        ef = eps[:, 2] if rows == 3 else None
        return list(esd_target(eps[:, 0], eps[:, 1], ef, self.config.eta))


def reference_examples(run: TrainingRun) -> Iterator[TrainingExample]:
    """The paper's loop: a fresh partial trajectory, from fresh noise, for every update."""
    while True:
        concept, source = run.draw_pair()
        x_t, timestep = run.trajectory(source, run.draw(run.config.sample_steps))[-1]
        yield TrainingExample(x_t, timestep, source, run.targets([(x_t, timestep)], concept, source)[0])


def reused_trajectory_examples(run: TrainingRun) -> Iterator[TrainingExample]:
    """Fast mode: one trajectory serves ``reuse`` updates. The step counts are random permutations of all
    counts, chained, so each is drawn uniformly; a ``reuse`` above ``sample_steps`` visits states again."""
    steps = run.config.sample_steps
    reuse = run.config.reuse or steps
    while True:
        concept, source = run.draw_pair()
        rounds = -(-reuse // steps)
        chosen = torch.cat([torch.randperm(steps, generator=run.generator) for _ in range(rounds)])[:reuse].tolist()
        states = run.trajectory(source, max(chosen))
        distinct = sorted(set(chosen))
        targets = {}
        for start in range(0, len(distinct), FROZEN_STATES_PER_PASS):
            batch = distinct[start : start + FROZEN_STATES_PER_PASS]
            targets.update(zip(batch, run.targets([states[k] for k in batch], concept, source)))
        for k in chosen:
            x_t, timestep = states[k]
            yield TrainingExample(x_t, timestep, source, targets[k])


EXAMPLE_SOURCES = {"reference": reference_examples, "fast": reused_trajectory_examples}


def update(run: TrainingRun, optimizer: torch.optim.Optimizer, example: TrainingExample, iteration: int) -> float:
    """One optimizer step on the MSE between the trained prediction and the example's target; returns the loss."""
    with run.delta.switched(True):  # also through backward, which may recompute checkpointed activations
        prediction = run.host.predict_eps(example.x_t, example.timestep, [run.conds[example.source]])[0]
        loss = F.mse_loss(prediction, example.target.float())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"The loss became {loss.item()} at iteration {iteration + 1}; nothing was saved. "
                "Lower the learning rate (--lr) or use --dtype fp32."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    optimizer.step()
    return loss.item()


def train_erasure(host: ErasureHost, config: EraseConfig, progress: ProgressCallback | None = None) -> TrainableDelta:
    """Train the delta that erases ``config.concept`` from the host's UNet; the UNet itself is left untouched."""
    generator = torch.Generator().manual_seed(config.seed)
    delta = TrainableDelta(select_parameters(host.layer_tensors(), config.method), config.rank, generator)
    optimizer = torch.optim.Adam(delta.parameters(), lr=config.lr, foreach=False)  # no per-step copies of the state
    run = TrainingRun(host, delta, config, generator)

    with host.attach(delta):
        examples = EXAMPLE_SOURCES[config.mode](run)
        for iteration in range(config.iterations):
            loss = update(run, optimizer, next(examples), iteration)
            if progress is not None:
                progress(iteration, loss)
    return delta


def erase(host: ErasureHost, config: EraseConfig, progress: ProgressCallback | None = None) -> ErasureDelta:
    """Train an erasure and package it as an ErasureDelta in ldm names, with the metadata that says how it was made."""
    trained = train_erasure(host, config, progress)
    base = host.layer_tensors()
    deltas = {host.ldm_name(name): tensor for name, tensor in trained.detached().items()}
    metadata = erasure_metadata(
        config.as_metadata(),
        host.family,
        fingerprint({host.ldm_name(name): base[name] for name in trained.names}),
        trained.parameter_count(),
    )
    return ErasureDelta(deltas, metadata)
