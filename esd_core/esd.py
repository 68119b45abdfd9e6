"""The ESD loop (Gandikota et al., ICCV 2023), on any ErasureHost.

Per update: draw a (concept c, erase_from f) pair and a step count k; take x_t after k guided DDIM steps
from noise, conditioned on f; ask the frozen model for e0 (prompt ""), ec and ef; train the delta so
that the erased model, conditioned on f, predicts ``e0 - eta * (ec - e0)`` (the paper's formula) when
f == c, and ``ef - eta * (ec - e0)`` when erasing c from another text f.

With texts to preserve, a second stream of examples is sampled the same way under those texts (and the
empty prompt), with the frozen model's own prediction as the target; each update adds its MSE, weighted
by ``preserve_weight``, so that the erasure spares what it should not touch. With ``preserve_guidance``
g > 1 a preserved text is compared on its guided prediction (with the empty prompt's, as a sampler at
guidance g combines them), so drift that guidance would magnify counts as much. With ``hold_unconditional``
w > 0 each erased example also trains the empty prompt's prediction at its x_t to stay the frozen one (weight
w): otherwise it drifts with the concept's and classifier-free guidance, which takes their difference, undoes
much of the erasure. ``sample_with`` says which model (trained or frozen) samples each stream's x_t.

Two modes feed the same update with the same distribution of (x_t, t):
- reference: a fresh partial trajectory for every example, as the paper does (one update's are sampled together);
- fast: ``trajectories`` trajectories are sampled together in one batched pass and each gives ``reuse``
  examples, at step counts drawn uniformly (chained random permutations), served in shuffled order; so
  no state is older than one batch of trajectories, and the frozen predictions for each state are
  computed once, in batches.
Where the frozen model samples a stream, the e('') and e(source) each state was stepped on with are frozen
predictions; when they are all a target needs (not so with another erase_from text, nor at a trajectory's last
state), they are taken from there rather than predicted again.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adversary import Adversary
from .config import EraseConfig
from .erasure_file import ErasureDelta, erasure_metadata, fingerprint
from .host import ErasureHost
from .methods import select_parameters
from .sampling import TrajectoryState, guided_trajectory
from .trainable import TrainableDelta

# (concept, source): erase concept from source; (None, text): keep the prediction for text as it was.
Pair = tuple[str | None, str]

# Called after every update with (iteration index, loss); a host may raise from it to cancel.
ProgressCallback = Callable[[int, float], None]

# Frozen predictions are batched this many states at a time.
FROZEN_STATES_PER_PASS = 8


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing is saved."""


@dataclass
class SampledState:
    """One trajectory's latent x_t (one row) and its timestep, with the frozen model's predictions there by text:
    e('') and e(source) when the frozen model sampled the trajectory and stepped on from x_t, else none."""

    x_t: torch.Tensor
    timestep: int
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of_row(cls, state: TrajectoryState, row: int, source: str) -> "SampledState":
        """Row ``row`` of a trajectory state sampled for ``source`` (with the frozen model if it kept predictions:
        e('') and e(source), in ``guided_trajectory``'s order; for the empty source both are e(''))."""
        if state.predictions is None:
            return cls(state.latents[row : row + 1], state.timestep)
        unconditional, conditional = state.predictions[:, row : row + 1]
        return cls(state.latents[row : row + 1], state.timestep, {"": unconditional, source: conditional})

    def frozen_predictions(self, texts: list[str]) -> torch.Tensor | None:
        """The frozen predictions it holds for ``texts``, one row each; None unless it holds them all."""
        if not all(text in self.frozen for text in texts):
            return None
        return torch.cat([self.frozen[text] for text in texts])


@dataclass
class TrainingExample:
    """One training example: the latent, its timestep, the text the prediction is conditioned on, and the target.
    With ``guidance`` g > 1 the prediction compared with the target is the guided one, ``guided(e(source), e(""), g)``.
    With ``unconditional`` (the frozen empty-prompt prediction at x_t) the trained one is held to it too."""

    x_t: torch.Tensor
    timestep: int
    source: str
    target: torch.Tensor
    guidance: float = 1.0
    unconditional: torch.Tensor | None = None


def esd_target(e0: torch.Tensor, ec: torch.Tensor, ef: torch.Tensor | None, eta: float,
               others: list[torch.Tensor] = ()) -> torch.Tensor:
    """Negative guidance away from c: the paper's ``e0 - eta * (ec - e0)``; when erasing c from another text f
    (``ef`` given), the anchor is f's own prediction: ``ef - eta * (ec - e0)``. With ``others`` (the predictions for
    the other erased concepts) the guidance leads away from each of them too (``away_from_others``), so that an
    erased concept does not turn into another erased one."""
    anchor = e0 if ef is None else ef
    return anchor - eta * ((ec - e0) + away_from_others(e0, ec, others))


def away_from_others(e0: torch.Tensor, own: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j d_j``, where d_j is ``others[j] - e0`` less any part of it that points against ``own - e0`` (row by
    row). At one concept's x_t another concept's direction mostly says "not this one": summed whole, it would
    cancel the push away from the concept itself, or amplify a preserved one (measured on the tiny world)."""
    own_direction = own - e0
    dims = tuple(range(1, own_direction.dim()))
    squared_norm = (own_direction * own_direction).sum(dims, keepdim=True).clamp_min(1e-12)
    total = torch.zeros_like(own_direction)
    for other in others:
        direction = other - e0
        along = (direction * own_direction).sum(dims, keepdim=True) / squared_norm
        total = total + direction - along.clamp(max=0) * own_direction
    return total


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, guidance: float) -> torch.Tensor:
    """The classifier-free-guided prediction ``u + g (c - u)`` divided by g, so that comparing two of them weighs
    what a sampler at guidance g would draw, at the scale of the plain predictions (g = 1: c itself)."""
    return conditional - (1 - 1 / guidance) * unconditional


class TrainingRun:
    """What both modes share: the host, the delta, the encoded prompts, the schedule and the random stream."""

    def __init__(self, host: ErasureHost, delta: TrainableDelta, config: EraseConfig, generator: torch.Generator):
        self.host, self.delta, self.config, self.generator = host, delta, config, generator
        texts = ["", *(t for pair in config.pairs for t in pair), *config.preserved]
        self.conds = {text: host.encode(text) for text in texts}
        self.scheduler = host.sampling_scheduler(config.sample_steps)
        # The erased pairs drawn from; an adversarial erasure adds pairs whose source is a conditioning it found,
        # kept in ``conds`` under a name that ``stand_ins`` maps to the source text it stands in for.
        self.erased_pairs: list[Pair] = list(config.pairs)
        self.erased_concepts = list(dict.fromkeys(concept for concept, _ in config.pairs))
        self.stand_ins: dict[str, str] = {}

    def draw(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def draw_pair(self, pairs: list[Pair]) -> Pair:
        return pairs[self.draw(len(pairs))]

    def guidance_of(self, pair: Pair) -> float:
        """The guidance a pair's predictions are compared at: ``preserve_guidance`` for a preserved text, 1 (plain)
        for the empty prompt, which has no guidance, and for the erased pairs."""
        concept, source = pair
        return self.config.preserve_guidance if concept is None and source else 1.0

    def example(self, state: SampledState, pair: Pair, target: torch.Tensor, unconditional: torch.Tensor | None) -> TrainingExample:
        return TrainingExample(state.x_t, state.timestep, pair[1], target, self.guidance_of(pair), unconditional)

    def permuted(self, n: int, count: int) -> list[int]:
        """``count`` draws from range(n): random permutations, chained, so every value comes up equally often."""
        rounds = -(-count // n)
        return torch.cat([torch.randperm(n, generator=self.generator) for _ in range(rounds)])[:count].tolist()

    def trajectories(self, sources: list[str], steps: int, trained: bool) -> list[list[SampledState]]:
        """States 0..steps of guided trajectories, one list per source text, sampled together by the trained
        or the frozen model (which leaves its predictions at each state to the targets)."""
        with self.delta.switched(trained):
            conds = [self.conds[source] for source in sources]
            states = guided_trajectory(self.host, self.scheduler, steps, conds, self.conds[""], self.config.sample_guidance,
                                     self.generator, keep_predictions=not trained)
        return [[SampledState.of_row(state, row, source) for state in states] for row, source in enumerate(sources)]

    @torch.no_grad()
    def frozen_predictions(self, states: list[SampledState], texts: list[str]) -> torch.Tensor:
        """The frozen model's predictions for every state and text, (states, texts, ...): taken from the state when
        it holds them all, else predicted ``FROZEN_STATES_PER_PASS`` states per batched pass."""
        eps = [state.frozen_predictions(texts) for state in states]
        missing = [i for i, known in enumerate(eps) if known is None]
        for start in range(0, len(missing), FROZEN_STATES_PER_PASS):
            group = missing[start : start + FROZEN_STATES_PER_PASS]
            x = torch.cat([states[i].x_t for i in group]).repeat_interleave(len(texts), dim=0)
            timesteps = torch.tensor([states[i].timestep for i in group]).repeat_interleave(len(texts))
            with self.delta.switched(False):
                predicted = self.host.predict(x, timesteps, [self.conds[t] for t in texts] * len(group))
            for i, rows in zip(group, predicted.view(len(group), len(texts), *predicted.shape[1:])):
                eps[i] = rows
        return torch.stack(eps)

    @torch.no_grad()
    def targets(self, states: list[SampledState], pair: Pair) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The frozen model's targets for several states of one pair: the ESD target for an erased (concept, source)
        pair, the frozen prediction itself for a
        preserved (None, text) pair (guided, with the empty prompt's, at ``preserve_guidance`` > 1). Each comes with
        the frozen empty-prompt prediction to hold (an erased pair with ``hold_unconditional`` > 0) or None."""
        concept, source = pair[0], self.stand_ins.get(pair[1], pair[1])  # a stand-in's target is its source text's
        guidance = self.guidance_of(pair)
        if concept is None:
            away = self.erased_concepts if source and self.config.preserve_eta > 0 else []
            texts = list(dict.fromkeys([source, *([""] if guidance != 1.0 or away else []), *away]))
            eps = dict(zip(texts, self.frozen_predictions(states, texts).unbind(1)))
            target = guided(eps[source], eps[""], guidance) if guidance != 1.0 else eps[source]
            if away:
                target = target - self.config.preserve_eta * away_from_others(eps[""], eps[source], [eps[c] for c in away])
            return [(row, None) for row in target]
        others = [c for c in self.erased_concepts if c != concept] if self.config.away_from == "all" else []
        texts = list(dict.fromkeys(["", concept, *others, source]))
        eps = dict(zip(texts, self.frozen_predictions(states, texts).unbind(1)))
        ef = eps[source] if source != concept else None
        # a copy, so that the examples keep only e('') alive, not every row of these predictions
        held = eps[""].clone() if self.config.hold_unconditional > 0 else [None] * len(states)
        return list(zip(esd_target(eps[""], eps[concept], ef, self.config.eta, [eps[c] for c in others]), held))


def reference_examples(run: TrainingRun, pairs: list[Pair], trained: bool) -> Iterator[TrainingExample]:
    """The paper's loop: a fresh partial trajectory, from fresh noise, for every example. The ``batch_size``
    trajectories of one update are sampled together, each row stopped at its own step count."""
    while True:
        batch = [run.draw_pair(pairs) for _ in range(run.config.batch_size)]
        steps = [run.draw(run.config.sample_steps) for _ in batch]
        states = run.trajectories([source for _, source in batch], max(steps), trained)
        for row_states, pair, k in zip(states, batch, steps):
            yield run.example(row_states[k], pair, *run.targets([row_states[k]], pair)[0])


def reused_trajectory_examples(run: TrainingRun, pairs: list[Pair], trained: bool) -> Iterator[TrainingExample]:
    """Fast mode: ``trajectories`` trajectories are sampled together and each gives ``reuse`` examples, at step
    counts drawn without repeats (chained random permutations), in shuffled order. So no state is more than
    ``trajectories * reuse`` examples stale, and every pair and step count comes up equally often."""
    steps, count = run.config.sample_steps, run.config.trajectories
    reuse = run.config.reuse or max(1, steps * run.config.batch_size // count)  # a batch serves ~``steps`` updates
    while True:
        batch = [pairs[i] for i in run.permuted(len(pairs), count)]
        examples = examples_from_trajectories(run, batch, [run.permuted(steps, reuse) for _ in batch], trained)
        for i in torch.randperm(len(examples), generator=run.generator).tolist():
            yield examples[i]


def examples_from_trajectories(run: TrainingRun, batch: list[Pair], chosen: list[list[int]], trained: bool) -> list[TrainingExample]:
    """One trajectory per pair of ``batch``, sampled together, and an example of its state k for each k of the pair's
    ``chosen`` step counts; the states themselves (and any predictions they carry) are let go on return."""
    states = run.trajectories([source for _, source in batch], max(max(ks) for ks in chosen), trained)
    examples = []
    for row_states, pair, ks in zip(states, batch, chosen):
        used = sorted(set(ks))
        targets = dict(zip(used, run.targets([row_states[k] for k in used], pair)))
        examples += [run.example(row_states[k], pair, *targets[k]) for k in ks]
    return examples


EXAMPLE_SOURCES = {"reference": reference_examples, "fast": reused_trajectory_examples}


def update(run: TrainingRun, optimizer: torch.optim.Optimizer, examples: list[TrainingExample], weights: list[float], iteration: int) -> float:
    """One optimizer step on the weighted sum of the MSEs between the trained predictions and the examples'
    targets, all predicted in one batch (the empty prompt's too, at a guided or a held example's x_t); returns the loss."""
    empty_rows = [i for i, example in enumerate(examples) if example.guidance != 1.0 or example.unconditional is not None]
    rows = examples + [examples[i] for i in empty_rows]
    x = torch.cat([row.x_t for row in rows])
    timesteps = torch.tensor([row.timestep for row in rows])
    conds = [run.conds[example.source] for example in examples] + [run.conds[""]] * len(empty_rows)
    with run.delta.switched(True):  # also through backward, which may recompute checkpointed activations
        predictions = list(run.host.predict(x, timesteps, conds))
        empty = dict(zip(empty_rows, predictions[len(examples) :]))
        loss = 0.0
        for i, (example, w) in enumerate(zip(examples, weights)):
            prediction = guided(predictions[i], empty[i], example.guidance) if example.guidance != 1.0 else predictions[i]
            loss = loss + w * F.mse_loss(prediction, example.target.float())
            if example.unconditional is not None:
                loss = loss + w * run.config.hold_unconditional * F.mse_loss(empty[i], example.unconditional.float())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"The loss became {loss.item()} at iteration {iteration + 1}; nothing was saved. "
                "Lower the learning rate (--lr) or use --dtype fp32."
            )
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the gradients' memory is free again for sampling and the next forward
    return loss.item()


def run_updates(run: TrainingRun, optimizer: torch.optim.Optimizer, progress: ProgressCallback | None = None) -> None:
    """The loop: ``iterations`` updates, each on ``batch_size`` examples of the erased pairs (and as many of the
    preserved texts), drawn by the configured mode."""
    config = run.config
    examples = EXAMPLE_SOURCES[config.mode]
    erased_trained, preserved_trained = config.samples_with_trained
    streams = [(examples(run, run.erased_pairs, erased_trained), 1.0)]
    if config.preserved:
        streams.append((examples(run, [(None, text) for text in config.preserved], preserved_trained), config.preserve_weight))
    adversary = Adversary(run) if config.adversarial else None
    for iteration in range(config.iterations):
        if adversary is not None and iteration % config.adversarial_every == 0:
            adversary.attack()
        batch = [(next(stream), weight / config.batch_size) for stream, weight in streams for _ in range(config.batch_size)]
        loss = update(run, optimizer, [example for example, _ in batch], [weight for _, weight in batch], iteration)
        if progress is not None:
            progress(iteration, loss)


def train_erasure(host: ErasureHost, config: EraseConfig, progress: ProgressCallback | None = None) -> TrainableDelta:
    """Train the delta that erases ``config.concept`` from the host's UNet; the UNet itself is left untouched."""
    generator = torch.Generator().manual_seed(config.seed)
    delta = TrainableDelta(select_parameters(host.layer_tensors(), config.method, host.architecture), config.rank, generator)
    optimizer = torch.optim.Adam(delta.parameters(), lr=config.lr, foreach=False)  # no per-step copies of the state
    with host.attach(delta):
        run_updates(TrainingRun(host, delta, config, generator), optimizer, progress)
    return delta


def erase(host: ErasureHost, config: EraseConfig, progress: ProgressCallback | None = None) -> ErasureDelta:
    """Train an erasure and package it as an ErasureDelta in ldm names, with the metadata that says how it was made."""
    trained = train_erasure(host, config, progress)
    base = host.layer_tensors()
    deltas = {host.ldm_name(name): tensor for name, tensor in trained.detached().items()}
    metadata = erasure_metadata(
        config.as_metadata(),
        host.family,
        host.prediction,
        fingerprint({host.ldm_name(name): base[name] for name in trained.names}),
        trained.parameter_count(),
    )
    return ErasureDelta(deltas, metadata, host.layout)
