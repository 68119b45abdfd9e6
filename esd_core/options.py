"""Every erase option, declared once: name, default, range, one-line help, and where it shows.

The defaults are the paper's, but for two that make a real model fit a consumer GPU: esd-u and esd-all train
rank-8 deltas (rank -1, auto), and gradient checkpointing is on.

The command line's flags (``cli.py``), EraseConfig's fields and checks (``config.py``) and the ComfyUI nodes'
inputs (``nodes/erasure_nodes.py``) are all generated from ``OPTIONS``, so a default cannot differ between them.
"""

from dataclasses import dataclass

import torch

from .methods import METHOD_ALIASES, TRAIN_METHODS

# Where an option shows besides the command line, which has every option.
ERASE_NODE = "erase node"  # the training node's own face: what a user decides
OPTIONS_NODE = "options node"  # the optional "Erasure Options" node: settings most users leave alone
SAVE_NODE = "save node"  # the node that writes an erasure
COMMAND_LINE = "command line"  # nowhere else (ComfyUI picks the device and precision itself)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLE_WITH_CHOICES = ("trained", "frozen", "mixed")
AWAY_FROM_CHOICES = ("all", "own")
MODES = ("fast", "reference")
SAVE_FORMATS = ("lora", "delta")
MAX_SEED = 2**64 - 1  # the largest seed torch's generators take (and ComfyUI's seed widgets give)
AUTO_RANK = -1  # rank: low rank for the methods that train the whole UNet, full rank for the others (``auto_rank``)


@dataclass(frozen=True)
class Option:
    """One setting. Its type is its default's; ``minimum``/``maximum`` bound numbers, ``choices`` a text."""

    name: str
    default: bool | int | float | str
    help: str
    shown_on: str = OPTIONS_NODE
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # other accepted spellings of the choices (the command line takes them)
    in_config: bool = True  # an EraseConfig field; False: a setting of the host or of the saved file
    node_name: str = ""  # the node input's name where ComfyUI's wording differs; empty: ``name``
    step: float = 0.0  # the node widget's step; 0: ComfyUI's own
    multiline: bool = False

    @property
    def kind(self) -> type:
        return type(self.default)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def input_name(self) -> str:
        return self.node_name or self.name

    def check(self, value) -> None:
        """Raise a ValueError naming the option, the value and a valid one, unless ``value`` fits."""
        if self.choices:
            if value not in self.choices + self.aliases:
                raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}; got {value!r}.")
            return
        if self.kind is bool or self.kind is str:
            if not isinstance(value, self.kind):
                raise ValueError(f"{self.name} must be {'true or false' if self.kind is bool else 'a text'}, got {value!r}.")
            return
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")
        whole = self.kind is not int or isinstance(value, int)
        low = self.minimum is None or (number and value >= self.minimum)
        high = self.maximum is None or (number and value <= self.maximum)
        if not (number and whole and low and high):
            raise ValueError(f"{self.name} must be {self.range_text()}, got {value!r}. The default is {self.default}.")

    def range_text(self) -> str:
        kind, shown = ("a whole number", int) if self.kind is int else ("a finite number", float)
        if self.minimum is not None and self.maximum is not None:
            return f"{kind} from {shown(self.minimum)} to {shown(self.maximum)}"
        if self.minimum is not None:
            return f"{kind} of at least {shown(self.minimum)}"
        return kind


OPTIONS = (
    Option("concept", "", "The text to erase: an artist, a style, an object. Comma-separate several.", ERASE_NODE),
    Option("erase_from", "", "Erase the concept only from this text (e.g. 'red' from 'car'): one text for all concepts, "
           "or one per concept. Empty: from the concept itself.", ERASE_NODE),
    Option("preserve", "", "Comma-separated texts the erasure must leave as they were (e.g. other artists, related "
           "objects); each update also trains them, and the empty prompt, towards the original model.", ERASE_NODE,
           multiline=True),
    Option("method", "esd-x", "Which layers train. " + "; ".join(f"{m}: {d}" for m, (d, *_) in TRAIN_METHODS.items()) + ".",
           ERASE_NODE, choices=tuple(TRAIN_METHODS), aliases=tuple(METHOD_ALIASES)),
    Option("iterations", 1000, "Updates of the erasure (the paper: 1000).", ERASE_NODE, minimum=1, maximum=100_000),
    Option("lr", 1e-5, "Adam learning rate (the paper: 1e-5; esd-x on SDXL often needs more, e.g. 2e-4).", ERASE_NODE,
           minimum=1e-9, maximum=1.0, node_name="learning_rate", step=1e-6),
    Option("eta", 1.0, "Negative guidance, the paper's eta: the target is e(from) - eta * (e(concept) - e('')). Higher "
           "erases harder. The 2025 reference script's 2.0 is 1.0 here when erasing a concept from itself (its eta is "
           "this one plus 1 there), and the same number with erase_from.", ERASE_NODE, minimum=0.0, maximum=100.0,
           node_name="negative_guidance", step=0.1),
    Option("seed", 0, "Seed of the concept order, the step counts and the noise: the same seed gives the same erasure.",
           ERASE_NODE, minimum=0, maximum=MAX_SEED),
    Option("resolution", 0, "Image size, in pixels, of the samples trained on (a multiple of 8). 0: the model's own "
           "(SD1 512, SD2 768, SDXL 1024); smaller is faster and lighter.", ERASE_NODE, minimum=0, maximum=4096,
           in_config=False, step=8),
    Option("rank", AUTO_RANK, "-1 (auto): rank-8 deltas for esd-u and esd-all, which train the whole UNet, full rank for "
           "the others. 0: full rank, the paper's (esd-u on SD1.5 then trains 815 M values: about 13 GB more for the "
           "deltas, their gradients and Adam's state). r: LoRA-style rank-r deltas.", minimum=AUTO_RANK, maximum=1024),
    Option("sample_steps", 50, "Sampler steps of the schedule x_t is sampled on (DDIM for SD, Euler on the model's shifted "
           "sigmas for Flux and SD3); each update runs a random number of them. On SD, steps are placed as SD places them "
           "(every 1000 // steps timesteps), so a count that divides 1000 starts nearest pure noise.", minimum=1, maximum=999),
    Option("sample_guidance", 3.0, "Classifier-free guidance while sampling x_t (the paper: 3.0). On Flux.1-dev it is the "
           "distilled guidance input, used for every prediction (sampling and targets); Flux.1-schnell has none.",
           minimum=0.0, maximum=100.0, step=0.1),
    Option("sample_with", "trained", "Which model samples x_t: the one being trained (the paper), the frozen original "
           "(the 2025 script), or mixed: the original for the erased texts, the trained one for the preserved texts.",
           choices=SAMPLE_WITH_CHOICES),
    Option("batch_size", 1, "Examples per update, of the erased texts and again of the preserved ones (the paper: 1).",
           minimum=1, maximum=256),
    Option("preserve_weight", 1.0, "Weight of the preservation term against the erasure term (0: off).", minimum=0.0,
           maximum=1000.0, step=0.1),
    Option("preserve_guidance", 1.0, "Compare each preserved text on its guided prediction, as a sampler at this guidance "
           "draws it, so that drift which guidance magnifies counts as much. 1: the plain predictions.", minimum=1.0,
           maximum=30.0, step=0.5),
    Option("hold_unconditional", 0.0, "At each erased example, also train the empty prompt's prediction to stay as it "
           "was, with this weight; otherwise it drifts with the concept's and guidance undoes part of the erasure. 0: "
           "off (the paper).", minimum=0.0, maximum=100.0, step=0.5),
    Option("gradient_checkpointing", True, "Recompute activations in the backward pass and run each feed-forward one "
           "row at a time: much less memory, updates about a third slower.", in_config=False),
    Option("mode", "fast", "fast: one batch of sampled trajectories serves several updates (the same distribution of "
           "x_t and t, far less sampling); reference: a fresh trajectory for every update, as the paper.", choices=MODES),
    Option("trajectories", 8, "Fast mode: trajectories sampled together in one batched pass.", minimum=1, maximum=256),
    Option("reuse", 0, "Fast mode: examples taken from each trajectory. 0: sample_steps x batch_size / trajectories, "
           "so that one batch of trajectories serves about sample_steps updates.", minimum=0, maximum=100_000),
    Option("adversarial", False, "Robust erasure: every adversarial_every updates, attack the erasure (look for a "
           "conditioning under which the model still draws the concept, as esd-erase attack does with a new word) and "
           "erase what the attack found too, so that a new word for the concept does not bring it back. Slower."),
    Option("adversarial_every", 10, "Adversarial erasure: updates between two attacks.", minimum=1, maximum=100_000),
    Option("adversarial_steps", 10, "Adversarial erasure: Adam steps of each attack; each continues the last one's.",
           minimum=1, maximum=10_000),
    Option("away_from", "all", "Erasing several concepts: all: each concept's target also leads away from every other "
           "erased concept (without the part of that push that points back towards its own), so that one erased concept "
           "does not turn into another; own: away from its own concept only (the paper).", choices=AWAY_FROM_CHOICES),
    Option("preserve_eta", 0.0, "Negative guidance for the preserved texts: each one's target also leads away from "
           "the erased concepts (without the part that points towards the text's own), so that the erasure does not move "
           "a concept into prompts that do not ask for it. 0: kept as they were.", minimum=0.0, maximum=100.0, step=0.1),
    Option("save_dtype", "fp16", "Precision of the written file (fp16 and bf16 halve its size; fp32 keeps the trained "
           "values exactly).", SAVE_NODE, choices=tuple(DTYPES), in_config=False, node_name="dtype"),
    Option("save_format", "lora", "lora: a LoRA file (kohya keys) that ComfyUI, A1111, Forge and diffusers load; full-rank "
           "deltas are factored at lora_rank and bias deltas left out. delta: the exact weight differences at full size "
           "(ComfyUI only).", SAVE_NODE, choices=SAVE_FORMATS, in_config=False),
    Option("lora_rank", 64, "LoRA format: the rank that full-rank deltas (esd-x) are factored at, by truncated SVD; "
           "higher is more exact and larger. Low-rank deltas are written at the rank they were trained at.", SAVE_NODE,
           minimum=1, maximum=1024, in_config=False),
    Option("device", "auto", "Where to run: a CUDA GPU if one is visible (auto), or the CPU.", COMMAND_LINE,
           choices=("auto", "cpu", "cuda"), in_config=False),
    Option("dtype", "auto", "UNet and text-encoder precision (auto: bf16 on a GPU, fp32 on the CPU); the deltas train "
           "in fp32 either way.", COMMAND_LINE, choices=("auto", *DTYPES), in_config=False),
)

BY_NAME = {option.name: option for option in OPTIONS}
CONFIG_OPTIONS = tuple(option for option in OPTIONS if option.in_config)


def shown_on(place: str) -> tuple[Option, ...]:
    return tuple(option for option in OPTIONS if option.shown_on == place)


def defaults() -> dict:
    """Every option's default, for any model (the tiny world's own are in ``presets``)."""
    return {option.name: option.default for option in OPTIONS}


def auto_rank(method: str) -> int:
    """The rank that rank -1 stands for: 8 for esd-u and esd-all (a full-rank esd-u delta on SD1.5 costs about
    13 GB of training state), full rank for the methods that train a small part of the UNet."""
    return 8 if method in ("esd-u", "esd-all") else 0
