"""An erasure as data: a weight delta per changed tensor, full or as low-rank factors, plus the metadata that
says what it is; and its exact file format.

The delta format's keys are ``diffusion_model.<ldm module path>.diff`` (a weight's delta) and ``...diff_b`` (a
bias's delta): the layout ComfyUI's stock LoRA loader applies. Flux and SD3 erasures use ``transformer.<diffusers
module path>`` instead, which that loader maps onto its fused attention layers. ``ErasureDelta.load`` also reads LoRA files
(``lora_format`` writes them): kohya's ``lora_unet_*`` keys, PEFT's ``lora_A``/``lora_B``, ComfyUI's own.
"""

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .keys import TRANSFORMER_KEY_PREFIX, UnetLayout

FORMAT_NAME = "esd-erasure-delta"
FORMAT_VERSION = "1"
KEY_PREFIX = "diffusion_model."
_SUFFIXES = {"weight": ".diff", "bias": ".diff_b"}

# What each key ending of a LoRA-style file holds (kohya's lora_up/lora_down and PEFT's lora_B/lora_A are the two
# factors of a weight's delta, scaled by alpha / rank; .diff and .diff_b are full deltas of a weight and a bias).
ENTRY_SUFFIXES = {
    ".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_B.weight": "up", ".lora_A.weight": "down",
    ".alpha": "alpha", ".diff": "weight", ".diff_b": "bias",
}
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder", "te_", "clip_")


@dataclass
class LowRank:
    """A weight's delta as two factors, ``up @ down`` reshaped to ``shape``; never multiplied out until applied."""

    up: torch.Tensor  # (rows, rank)
    down: torch.Tensor  # (rank, columns): a Conv weight's input channels and kernel, flattened
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def numel(self) -> int:
        return self.up.numel() + self.down.numel()

    def product(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()).reshape(self.shape)

    def as_layers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) as the weights of two layers: for a Conv, down a k x k conv to ``rank`` channels and up a
        1x1 conv (the LoCon layout LoRA readers expect); for a Linear, the matrices themselves."""
        kernel = self.shape[2:]
        return self.up.reshape(*self.up.shape, *(1,) * len(kernel)), self.down.reshape(self.rank, *self.shape[1:])

    def map(self, function) -> "LowRank":
        """Both factors through ``function`` (a dtype or device change)."""
        return LowRank(function(self.up), function(self.down), self.shape)


Delta = torch.Tensor | LowRank


def model_family(context_dim: int, has_text_time_embedding: bool) -> str:
    """Name the base-model family from two facts every host can read off a UNet."""
    if has_text_time_embedding:
        return "sdxl" if context_dim == 2048 else f"custom-xl(context_dim={context_dim})"
    return {768: "sd1", 1024: "sd2"}.get(context_dim, f"custom(context_dim={context_dim})")


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of base tensors (by name and fp32 value), to tell whether a delta meets the weights it was trained on."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def is_transformer_family(family: str) -> bool:
    """Whether a base-model family is a flow-matching transformer (Flux.1, SD3.x), whose files use diffusers names."""
    return "flux" in family or "sd3" in family


def key_prefix(family: str) -> str:
    """What precedes a layer's name in a delta file: ``diffusion_model.`` and ldm names for UNets (ComfyUI's own
    layout), ``transformer.`` and diffusers names for Flux and SD3 (which ComfyUI's loader maps onto its layout)."""
    return TRANSFORMER_KEY_PREFIX if is_transformer_family(family) else KEY_PREFIX


def file_key(ldm_name: str, prefix: str = KEY_PREFIX) -> str:
    """``input_blocks.1.1...to_k.weight`` -> ``diffusion_model.input_blocks.1.1...to_k.diff``."""
    module, kind = ldm_name.rsplit(".", 1)
    if kind not in _SUFFIXES:
        raise ValueError(f"Only weights and biases can carry a delta, not {ldm_name!r}.")
    return f"{prefix}{module}{_SUFFIXES[kind]}"


@dataclass
class ErasureDelta:
    """Deltas by ldm state-dict name (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``), fp32, full or
    low-rank, plus metadata."""

    deltas: dict[str, Delta]
    metadata: dict[str, str] = field(default_factory=dict)
    layout: UnetLayout | None = field(default=None, repr=False, compare=False)  # the UNet's names, when known (not saved)

    @property
    def family(self) -> str:
        return family_from_metadata(self.metadata)

    def full(self, name: str) -> torch.Tensor:
        """One tensor's delta at full size, fp32."""
        delta = self.deltas[name]
        return delta.product() if isinstance(delta, LowRank) else delta.float()

    def stored_values(self) -> int:
        return sum(delta.numel() for delta in self.deltas.values())

    def describe(self) -> str:
        """Concept and method in a few words, for logs and node outputs."""
        return f"erase {self.metadata.get('concept', '?')!r} ({self.metadata.get('method', '?')}, {self.family})"

    def check_compatible(self, base_tensors: dict[str, torch.Tensor], family: str) -> None:
        """Refuse (ValueError) a base model of another family, or one missing a tensor or shaped differently."""
        check_family(self.metadata, family)
        for name, delta in self.deltas.items():
            if name not in base_tensors:
                raise ValueError(f"The model has no tensor {name!r} that this erasure changes; it was made for another model.")
            if tuple(base_tensors[name].shape) != tuple(delta.shape):
                raise ValueError(
                    f"Shape mismatch at {name!r}: the erasure has {tuple(delta.shape)}, the model "
                    f"{tuple(base_tensors[name].shape)}. The erasure was made for another model."
                )

    def save(self, path: str, dtype: torch.dtype = torch.float16) -> None:
        """Write the exact delta format, atomically (temp file in the same folder, then rename); low-rank deltas are
        written multiplied out, so a delta file is as large as the tensors it changes."""
        tensors = {file_key(name, key_prefix(self.family)): self.full(name).to(dtype).contiguous() for name in self.deltas}
        metadata = {**self.metadata, "format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        write_atomically(path, lambda temp: save_file(tensors, temp, metadata=metadata))

    @classmethod
    def load(cls, path: str, layout: UnetLayout | None = None, family: str | None = None, check: bool = True) -> "ErasureDelta":
        """Read an erasure file of either format (a delta, or a LoRA made here or elsewhere); deltas come back fp32.

        ``layout``: the UNet it is for, which names the layers of a LoRA file; without it only files in ldm names
        (delta files, ComfyUI's own LoRAs) resolve, and other names stay as the file spells them (for ``info``).
        ``family``: that UNet's family; a file whose header names another is refused before its names are read.
        ``check=False`` also returns a damaged file (``check_usable``), for inspection."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No erasure file at {path!r}. Give the path of a .safetensors erasure (a delta or a LoRA).")
        metadata, tensors = read_safetensors(path)
        if family is not None:
            check_family(metadata, family)
        try:
            deltas = read_entries(tensors, layout)
        except ValueError as error:
            raise ValueError(f"{path!r}: {error}") from error
        if check:
            check_usable(path, deltas)
        return cls(deltas, metadata, layout)


def read_entries(tensors: dict[str, torch.Tensor], layout: UnetLayout | None) -> dict[str, Delta]:
    """A file's tensors as deltas by ldm tensor name: each layer's entries (LoRA factors with their alpha, or full
    deltas) gathered under the layer's name, which ``layout`` resolves whatever spelling the file uses."""
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            raise ValueError(f"it holds text-encoder weights ({key!r}); an erasure changes the UNet only. Load such a LoRA "
                             "with ComfyUI's LoraLoader, which applies both.")
        suffix = next((s for s in ENTRY_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"it is in a format this tool does not read (key {key!r}). It reads erasure deltas (.diff), "
                             "and LoRAs with lora_up/lora_down (kohya, A1111) or lora_A/lora_B (PEFT, diffusers) keys.")
        entries.setdefault(key[: -len(suffix)], {})[ENTRY_SUFFIXES[suffix]] = tensor
    modules = layout.ldm_modules() if layout else {}
    unmatched = sorted(module for module in entries if module not in modules) if layout else []
    if unmatched:
        raise ValueError(f"{len(unmatched)} of its {len(entries)} layers match no layer of this model (first: "
                         f"{unmatched[0]!r}): it was made for another kind of model.")
    deltas = {}
    for module, entry in entries.items():
        name = modules.get(module) or module.removeprefix(KEY_PREFIX).removeprefix(TRANSFORMER_KEY_PREFIX)
        if "up" in entry or "down" in entry:
            deltas[f"{name}.weight"] = _low_rank(module, entry)
        elif "weight" in entry:
            deltas[f"{name}.weight"] = entry["weight"].float()
        if "bias" in entry:
            deltas[f"{name}.bias"] = entry["bias"].float()
        if entry.keys() == {"alpha"}:
            raise ValueError(f"layer {module!r} has an alpha but no factors; the file is incomplete.")
    return deltas


def _low_rank(module: str, entry: dict[str, torch.Tensor]) -> LowRank:
    """A layer's LoRA factors as a LowRank, with its ``alpha / rank`` scale folded into ``up``."""
    if "up" not in entry or "down" not in entry:
        raise ValueError(f"layer {module!r} has only one of its two LoRA factors; the file is incomplete.")
    up, down = entry["up"].float(), entry["down"].float()
    rank = down.shape[0]
    if rank == 0 or up.dim() < 2 or up.shape[1] != rank or up[0, 0].numel() != 1:
        raise ValueError(f"layer {module!r} has LoRA factors of shapes {tuple(up.shape)} and {tuple(down.shape)}, "
                         "which do not multiply; the file is damaged.")
    scale = entry["alpha"].float().item() / rank if "alpha" in entry else 1.0
    shape = (up.shape[0], *down.shape[1:])
    return LowRank(up.reshape(up.shape[0], rank) * scale, down.reshape(rank, -1), tuple(shape))


def read_safetensors(path: str, with_tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's header metadata and (unless ``with_tensors`` is False) its tensors; a ValueError naming
    the file if it cannot be read."""
    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}, {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
    except Exception as error:
        raise ValueError(f"{path!r} is not a readable safetensors file (truncated, or not safetensors): {error}") from error


class DamagedErasureError(ValueError):
    """An erasure file in the right format whose contents cannot be applied."""


def check_usable(path: str, deltas: dict[str, Delta]) -> None:
    """Refuse a file that holds no deltas, an empty tensor, or a NaN or infinite value: applying it would
    leave the model unchanged or broken."""
    if not deltas:
        raise DamagedErasureError(f"{path!r} holds no deltas; train the erasure again.")
    for name, delta in deltas.items():
        tensors = (delta.up, delta.down) if isinstance(delta, LowRank) else (delta,)
        if any(tensor.numel() == 0 or not torch.isfinite(tensor).all() for tensor in tensors):
            raise DamagedErasureError(f"{path!r} is damaged: its delta for {name!r} is empty or not finite (NaN or infinite); train the erasure again.")


def erasure_metadata(config_metadata: dict, family: str, prediction: str, base_fingerprint: str, parameter_count: int) -> dict[str, str]:
    """Everything the header should say about how an erasure was made."""
    return {
        **config_metadata,
        "base_family": family,
        "base_prediction": prediction,
        "base_fingerprint": base_fingerprint,
        "trained_parameters": str(parameter_count),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "package_version": __version__,
    }


def write_atomically(path: str, write) -> None:
    """Call ``write(temp_path)`` on a temp file beside ``path``, then rename it over ``path``; no partial file on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".partial-{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
    handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
    mode = os.fstat(handle).st_mode & 0o777
    os.close(handle)
    try:
        write(temp)
        _restore_mode(temp, mode)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def write_json_atomically(path: str, data) -> None:
    """Write ``data`` as indented JSON to ``path`` (``write_atomically``: no partial file on failure)."""
    def write(temp: str) -> None:
        with open(temp, "w") as handle:
            json.dump(data, handle, indent=2)

    write_atomically(path, write)


def _restore_mode(path: str, mode: int) -> None:
    """Give a written file back the permissions it was created with (safetensors rewrites its files owner-only), so
    that a ComfyUI server running as another user can read it; where the file system refuses, leave it as it is."""
    try:
        if os.stat(path).st_mode & 0o777 != mode:
            os.chmod(path, mode)
    except OSError:
        pass


def check_family(metadata: dict[str, str], family: str) -> None:
    """Refuse (ValueError) an erasure whose metadata names another base-model family than ``family``."""
    made_for = family_from_metadata(metadata)
    if made_for != "unknown" and made_for != family:
        raise ValueError(f"This erasure was trained on a {made_for} model and cannot be applied to a {family} model. "
                         f"Use an erasure trained on a {family} model, or train one for it.")


def family_from_metadata(metadata: dict[str, str]) -> str:
    """The base-model family a file says it is for: ours, else the one the sharing tools' fields name, else "unknown"."""
    if "base_family" in metadata:
        return metadata["base_family"]
    architecture = metadata.get("modelspec.architecture", "") + " " + metadata.get("ss_base_model_version", "")
    for marker, family in (("xl", "sdxl"), ("v2", "sd2"), ("v1", "sd1")):
        if marker in architecture:
            return family
    return "unknown"


def summary(delta: ErasureDelta) -> str:
    """Metadata and a tensor summary, for ``esd-erase info``."""
    lines = [json.dumps(delta.metadata, indent=2, sort_keys=True)]
    low_rank = sum(isinstance(d, LowRank) for d in delta.deltas.values())
    lines.append(f"{len(delta.deltas)} tensors ({low_rank} low-rank), {delta.stored_values():,} values stored")
    for name, stored in sorted(delta.deltas.items()):
        kind = f"rank {stored.rank}" if isinstance(stored, LowRank) else "full"
        size = f"|delta| max {delta.full(name).abs().max().item():.3e}" if stored.numel() else "empty"
        lines.append(f"  {name:80s} {str(tuple(stored.shape)):>20s}  {kind:>8s}  {size}")
    return "\n".join(lines)
