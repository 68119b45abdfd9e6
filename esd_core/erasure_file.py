"""An erasure as data: a safetensors file of weight deltas plus the metadata that says what it is.

Keys are ``diffusion_model.<ldm module path>.diff`` (a weight's delta) and ``...diff_b`` (a bias's delta):
the layout ComfyUI's stock LoRA loader applies, so an erasure loads anywhere ComfyUI loads a LoRA.
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

FORMAT_NAME = "esd-erasure-delta"
FORMAT_VERSION = "1"
KEY_PREFIX = "diffusion_model."
_SUFFIXES = {"weight": ".diff", "bias": ".diff_b"}



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


def file_key(ldm_name: str) -> str:
    """``input_blocks.1.1...to_k.weight`` -> ``diffusion_model.input_blocks.1.1...to_k.diff``."""
    module, kind = ldm_name.rsplit(".", 1)
    if kind not in _SUFFIXES:
        raise ValueError(f"Only weights and biases can carry a delta, not {ldm_name!r}.")
    return f"{KEY_PREFIX}{module}{_SUFFIXES[kind]}"


def ldm_name(key: str) -> str:
    """Inverse of ``file_key``."""
    if not key.startswith(KEY_PREFIX):
        raise ValueError(f"{key!r} is not a delta key: it should start with {KEY_PREFIX!r}.")
    body = key[len(KEY_PREFIX):]
    for kind, suffix in _SUFFIXES.items():
        if body.endswith(suffix):
            return f"{body[: -len(suffix)]}.{kind}"
    raise ValueError(f"{key!r} is not a delta key: it should end with .diff or .diff_b.")


@dataclass
class ErasureDelta:
    """Deltas by ldm state-dict name (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``), fp32, plus metadata."""

    deltas: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.metadata.get("base_family", "unknown")

    def describe(self) -> str:
        """Concept and method in a few words, for logs and node outputs."""
        return f"erase {self.metadata.get('concept', '?')!r} ({self.metadata.get('method', '?')}, {self.family})"

    def check_compatible(self, base_tensors: dict[str, torch.Tensor], family: str) -> None:
        """Refuse (ValueError) a base model of another family, or one missing a tensor or shaped differently."""
        if self.family != "unknown" and self.family != family:
            raise ValueError(
                f"This erasure was trained on a {self.family} model and cannot be applied to a {family} model. "
                f"Use an erasure trained on a {family} model, or train one for it."
            )
        for name, delta in self.deltas.items():
            if name not in base_tensors:
                raise ValueError(f"The model has no tensor {name!r} that this erasure changes; it was made for another model.")
            if tuple(base_tensors[name].shape) != tuple(delta.shape):
                raise ValueError(
                    f"Shape mismatch at {name!r}: the erasure has {tuple(delta.shape)}, the model "
                    f"{tuple(base_tensors[name].shape)}. The erasure was made for another model."
                )

    def save(self, path: str, dtype: torch.dtype = torch.float16) -> None:
        """Write the file atomically (temp file in the same folder, then rename)."""
        tensors = {file_key(name): delta.to(dtype).contiguous() for name, delta in self.deltas.items()}
        metadata = {**self.metadata, "format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        write_atomically(path, lambda temp: save_file(tensors, temp, metadata=metadata))

    @classmethod
    def load(cls, path: str, check: bool = True) -> "ErasureDelta":
        """Read a delta file; the tensors come back as fp32. ``check=False`` also returns a damaged one (``check_usable``),
        for inspection."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No erasure file at {path!r}. Give the path of a .safetensors delta.")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:
            raise ValueError(f"{path!r} is not a readable safetensors erasure file: {error}") from error
        try:
            deltas = {ldm_name(key): tensor.float() for key, tensor in tensors.items()}
        except ValueError as error:
            raise ValueError(f"{path!r} is not an erasure delta file (a model's weights, or a LoRA?): {error}") from error
        if check:
            check_usable(path, deltas)
        return cls(deltas, metadata)


class DamagedErasureError(ValueError):
    """An erasure file in the right format whose contents cannot be applied."""


def check_usable(path: str, deltas: dict[str, torch.Tensor]) -> None:
    """Refuse a delta file that holds no deltas, an empty tensor, or a NaN or infinite value: applying it would
    leave the model unchanged or broken."""
    if not deltas:
        raise DamagedErasureError(f"{path!r} holds no deltas; train the erasure again.")
    for name, tensor in deltas.items():
        if tensor.numel() == 0 or not torch.isfinite(tensor).all():
            raise DamagedErasureError(f"{path!r} is damaged: its delta for {name!r} is empty or not finite (NaN or infinite); train the erasure again.")


def erasure_metadata(config_metadata: dict, family: str, base_fingerprint: str, parameter_count: int) -> dict[str, str]:
    """Everything the header should say about how an erasure was made."""
    return {
        **config_metadata,
        "base_family": family,
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


def _restore_mode(path: str, mode: int) -> None:
    """Give a written file back the permissions it was created with (safetensors rewrites its files owner-only), so
    that a ComfyUI server running as another user can read it; where the file system refuses, leave it as it is."""
    try:
        if os.stat(path).st_mode & 0o777 != mode:
            os.chmod(path, mode)
    except OSError:
        pass


def summary(delta: ErasureDelta) -> str:
    """Metadata and a tensor summary, for ``esd-erase info``."""
    lines = [json.dumps(delta.metadata, indent=2, sort_keys=True)]
    total = sum(t.numel() for t in delta.deltas.values())
    lines.append(f"{len(delta.deltas)} tensors, {total:,} values")
    for name, tensor in sorted(delta.deltas.items()):
        size = f"|delta| max {tensor.abs().max().item():.3e}" if tensor.numel() else "empty"
        lines.append(f"  {name:80s} {str(tuple(tensor.shape)):>20s}  {size}")
    return "\n".join(lines)
