"""The settings of one erasure, checked once, up front: EraseConfig, a dataclass made from the option spec."""

from dataclasses import asdict, field, make_dataclass

from .methods import resolve_method
from .options import AUTO_RANK, CONFIG_OPTIONS, auto_rank

# Whether the model being trained (True) or the frozen one samples x_t, for the erased texts' examples and
# for the preserved texts' examples. The paper samples with the model being trained, the 2025 diffusers
# script with the frozen one; "mixed" takes the erased texts' x_t where the concept lives in the original
# model and the preserved texts' x_t where the erased model now goes, so that drift of a preserved concept
# is trained away where it happens.
SAMPLE_WITH_TRAINED = {"trained": (True, True), "frozen": (False, False), "mixed": (False, True)}

# What ``esd-erase bench`` measures on full-size UNets: the kinds of case, and the rank each method runs at
# there (esd-u's full-rank delta would cost as much as a second UNet).
BENCH_CASES = ("fast", "reference", "checkpointing", "two-unet")
BENCH_RANKS = {"esd-x": 0, "esd-u": 8}


class _Settings:
    """What EraseConfig adds to its fields (one per option of ``CONFIG_OPTIONS``, with the option's default)."""

    def __post_init__(self):
        object.__setattr__(self, "method", resolve_method(self.method))
        for option in CONFIG_OPTIONS:
            option.check(getattr(self, option.name))
        if self.rank == AUTO_RANK:
            object.__setattr__(self, "rank", auto_rank(self.method))
        if not parse_concepts(self.concept):
            raise ValueError("The concept is empty. Give the text to erase, e.g. --concept 'Van Gogh' (comma-separate several).")
        trained_texts = {prompt_key(source) for _, source in concept_pairs(self.concept, self.erase_from)}  # raises on a length mismatch
        erased_and_kept = [text for text in parse_concepts(self.preserve) if prompt_key(text) in trained_texts]
        if erased_and_kept:
            raise ValueError(f"{erased_and_kept} is both erased and preserved (the erasure changes the model's prediction for the "
                             "text it erases from: the concept, or erase_from). Remove it from --preserve.")

    @classmethod
    def from_settings(cls, settings: dict):
        """The config of a dict of settings that may hold others too (the host's, the file's)."""
        return cls(**{option.name: settings[option.name] for option in CONFIG_OPTIONS if option.name in settings})

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

    def as_metadata(self) -> dict[str, str]:
        """Every setting as strings, for the safetensors header."""
        return {key: str(value) for key, value in asdict(self).items()}


EraseConfig = make_dataclass(
    "EraseConfig",
    [(option.name, option.kind, field(default=option.default)) for option in CONFIG_OPTIONS],
    bases=(_Settings,),
    frozen=True,
    kw_only=True,
)
EraseConfig.__module__ = __name__
EraseConfig.__doc__ = "What to erase and how: one field per option of ``options.CONFIG_OPTIONS``, with its default."


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
