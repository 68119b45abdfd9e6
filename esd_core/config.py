"""The settings of one erasure, checked once, up front."""

import math
from dataclasses import asdict, dataclass

from .methods import resolve_method

SAMPLE_WITH_CHOICES = ("trained", "frozen")
MODES = ("fast", "reference")


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
    reuse: int = 0  # fast mode: updates per sampled trajectory (0: one per sampling step)
    rank: int = 0  # 0: full-rank deltas; r > 0: LoRA-style factors of rank r
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "method", resolve_method(self.method))
        if not parse_concepts(self.concept):
            raise ValueError("The concept is empty. Give the text to erase, e.g. --concept 'Van Gogh' (comma-separate several).")
        concept_pairs(self.concept, self.erase_from)  # raises on a length mismatch
        if self.iterations <= 0:
            raise ValueError(f"iterations must be a positive whole number, got {self.iterations}. Try 1000 (the paper's).")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"The learning rate must be a positive number, got {self.lr}. Try 1e-5 (the paper's).")
        if not math.isfinite(self.eta):
            raise ValueError(f"eta (negative guidance) must be a finite number, got {self.eta}. Try 1.0 (the paper's).")
        if self.sample_steps <= 0:
            raise ValueError(f"sample_steps must be a positive whole number, got {self.sample_steps}. Try 50.")
        if not math.isfinite(self.sample_guidance):
            raise ValueError(f"sample_guidance must be a finite number, got {self.sample_guidance}. Try 3.0.")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.reuse < 0 or self.rank < 0:
            raise ValueError(f"reuse and rank must be 0 or more, got reuse={self.reuse}, rank={self.rank}.")
        if self.sample_with not in SAMPLE_WITH_CHOICES:
            raise ValueError(f"sample_with must be one of {SAMPLE_WITH_CHOICES}, got {self.sample_with!r}.")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The (concept, erase_from) pairs the loop draws from."""
        return concept_pairs(self.concept, self.erase_from)

    def as_metadata(self) -> dict[str, str]:
        """Every setting as strings, for the safetensors header."""
        return {key: str(value) for key, value in asdict(self).items()}


def parse_concepts(text: str) -> list[str]:
    """Split a comma-separated list, dropping blanks."""
    return [part.strip() for part in text.split(",") if part.strip()]


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
