"""The settings of one erasure, checked once, up front."""

import math
from dataclasses import asdict, dataclass

from .methods import resolve_method

# Whether the model being trained (True) or the frozen one samples x_t, for the erased texts' examples and
# for the preserved texts' examples. The paper samples with the model being trained, the 2025 diffusers
# script with the frozen one; "mixed" takes the erased texts' x_t where the concept lives in the original
# model and the preserved texts' x_t where the erased model now goes, so that drift of a preserved concept
# is trained away where it happens.
SAMPLE_WITH_TRAINED = {"trained": (True, True), "frozen": (False, False), "mixed": (False, True)}
SAMPLE_WITH_CHOICES = tuple(SAMPLE_WITH_TRAINED)
MODES = ("fast", "reference")

# What ``esd-erase bench`` measures on full-size UNets: the kinds of case, and the rank each method runs at
# there (esd-u's full-rank delta would cost as much as a second UNet).
BENCH_CASES = ("fast", "reference", "checkpointing", "two-unet")
BENCH_RANKS = {"esd-x": 0, "esd-u": 8}

MAX_SEED = 2**64 - 1  # the largest seed torch's generators take (and ComfyUI's seed widgets give)


@dataclass(frozen=True)
class EraseConfig:
    """What to erase and how. Defaults are the paper's (1000 iterations, lr 1e-5, eta 1, 50 DDIM steps, CFG 3)."""

    concept: str
    erase_from: str = ""
    method: str = "esd-x"
    iterations: int = 1000
    lr: float = 1e-5
    eta: float = 1.0
    sample_steps: int = 50
    sample_guidance: float = 3.0
    sample_with: str = "trained"
    mode: str = "fast"
    batch_size: int = 1  # examples of each stream (erased, preserved) per update
    trajectories: int = 8  # fast mode: trajectories sampled together in one batched pass
    reuse: int = 0  # fast mode: examples drawn from each sampled trajectory (0: sample_steps * batch_size // trajectories)
    rank: int = 0  # 0: full-rank deltas; r > 0: LoRA-style factors of rank r
    preserve: str = ""  # comma-separated texts whose predictions the erasure must leave as they were
    preserve_weight: float = 1.0
    preserve_guidance: float = 1.0  # > 1: compare a preserved text's guided predictions, e('') + g (e(text) - e('')), scaled by 1/g
    hold_unconditional: float = 0.0  # > 0: at each erased example's x_t, hold the empty prompt's prediction (this weight)
    repair_fraction: float = 0.0  # the last updates' share that trains on the preservation term alone
    orthogonal_push: bool = False  # push away from the concept only orthogonally to the preserved texts' directions
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "method", resolve_method(self.method))
        if not parse_concepts(self.concept):
            raise ValueError("The concept is empty. Give the text to erase, e.g. --concept 'Van Gogh' (comma-separate several).")
        trained_texts = {prompt_key(source) for _, source in concept_pairs(self.concept, self.erase_from)}  # raises on a length mismatch
        erased_and_kept = [text for text in parse_concepts(self.preserve) if prompt_key(text) in trained_texts]
        if erased_and_kept:
            raise ValueError(f"{erased_and_kept} is both erased and preserved (the erasure changes the model's prediction for the "
                             "text it erases from: the concept, or erase_from). Remove it from --preserve.")
        if self.iterations <= 0:
            raise ValueError(f"iterations must be a positive whole number, got {self.iterations}. Try 1000 (the paper's).")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"The learning rate must be a positive number, got {self.lr}. Try 1e-5 (the paper's).")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta (negative guidance) must be a finite number >= 0 (a negative one would strengthen the concept), "
                             f"got {self.eta}. Try 1.0 (the paper's).")
        if self.sample_steps <= 0:
            raise ValueError(f"sample_steps must be a positive whole number, got {self.sample_steps}. Try 50.")
        if not math.isfinite(self.sample_guidance):
            raise ValueError(f"sample_guidance must be a finite number, got {self.sample_guidance}. Try 3.0.")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive whole number, got {self.batch_size}. Try 1 (the paper's).")
        if self.trajectories <= 0:
            raise ValueError(f"trajectories must be a positive whole number, got {self.trajectories}. Try 8.")
        if self.reuse < 0 or self.rank < 0:
            raise ValueError(f"reuse and rank must be 0 or more, got reuse={self.reuse}, rank={self.rank}.")
        if not (math.isfinite(self.preserve_weight) and self.preserve_weight >= 0):
            raise ValueError(f"preserve_weight must be a finite number >= 0, got {self.preserve_weight}. Try 1.0.")
        if not (math.isfinite(self.preserve_guidance) and self.preserve_guidance >= 1):
            raise ValueError(f"preserve_guidance must be a finite number >= 1, got {self.preserve_guidance}. Try 1 (plain "
                             "predictions) or the guidance you sample at, e.g. 3.")
        if not (math.isfinite(self.hold_unconditional) and self.hold_unconditional >= 0):
            raise ValueError(f"hold_unconditional must be a finite number >= 0, got {self.hold_unconditional}. Try 0 (off) or 1.")
        if not (math.isfinite(self.repair_fraction) and 0 <= self.repair_fraction < 1 and self.repair_iterations < self.iterations):
            raise ValueError(f"repair_fraction must be at least 0 and leave at least one erasing update, got {self.repair_fraction} "
                             f"of {self.iterations} iterations. Try 0 (off) or 0.33.")
        if self.repair_fraction > 0 and not self.preserved:
            raise ValueError("A repair phase trains on the texts to preserve, and there are none. Give --preserve (and a "
                             "preserve weight above 0), or set the repair fraction to 0.")
        if self.orthogonal_push and not self.pushed_clear_of:
            raise ValueError("An orthogonal push steers clear of the texts to preserve, and there are none. Give --preserve, "
                             "or turn the orthogonal push off.")
        if self.sample_with not in SAMPLE_WITH_CHOICES:
            raise ValueError(f"sample_with must be one of {SAMPLE_WITH_CHOICES}, got {self.sample_with!r}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED} (2**64 - 1), got {self.seed}.")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The (concept, erase_from) pairs the loop draws from."""
        return concept_pairs(self.concept, self.erase_from)

    @property
    def samples_with_trained(self) -> tuple[bool, bool]:
        """Whether the erased and the preserved texts' x_t are sampled with the model being trained."""
        return SAMPLE_WITH_TRAINED[self.sample_with]

    @property
    def preserved(self) -> list[str]:
        """The texts the preservation term keeps unchanged (none: plain ESD). The empty prompt is always among
        them: classifier-free guidance uses its prediction for every image, so it must not drift."""
        texts = parse_concepts(self.preserve)
        return ["", *texts] if texts and self.preserve_weight > 0 else []

    @property
    def pushed_clear_of(self) -> list[str]:
        """The texts whose directions an orthogonal push steers clear of: the texts to preserve, whatever their
        weight (none without an orthogonal push)."""
        return parse_concepts(self.preserve) if self.orthogonal_push else []

    @property
    def repair_iterations(self) -> int:
        """How many of the last updates train on the preservation term alone."""
        return round(self.repair_fraction * self.iterations)

    def as_metadata(self) -> dict[str, str]:
        """Every setting as strings, for the safetensors header."""
        return {key: str(value) for key, value in asdict(self).items()}


def parse_concepts(text: str) -> list[str]:
    """Split a comma-separated list, dropping blanks."""
    return [part.strip() for part in text.split(",") if part.strip()]


def prompt_key(text: str) -> str:
    """A text as CLIP's tokenizers read it, which lower-case each character and collapse spaces: "Van  Gogh" is "van gogh"."""
    return " ".join("".join(character.lower() for character in text).split())


def concept_pairs(concept: str, erase_from: str = "") -> list[tuple[str, str]]:
    """Pair every concept with the text it is erased from: f defaults to c, a single f broadcasts."""
    concepts = parse_concepts(concept)
    sources = parse_concepts(erase_from)
    if not sources:
        return [(c, c) for c in concepts]
    if len(sources) == 1:
        return [(c, sources[0]) for c in concepts]
    if len(sources) != len(concepts):
        raise ValueError(
            f"erase_from lists {len(sources)} texts for {len(concepts)} concepts. "
            "Give one erase_from for all concepts, or exactly one per concept, in the same order."
        )
    return list(zip(concepts, sources))
