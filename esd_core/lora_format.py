"""Writing an erasure as a LoRA file: the format A1111, Forge, ComfyUI, kohya's tools and diffusers all load.

For Stable Diffusion UNets, keys are kohya's: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight`` and
``.alpha``, where <module> is the layer's path with underscores for dots, in the spelling kohya itself writes for the family (diffusers names
for SD1.x and SD2.x, ldm/sgm names for SDXL, which A1111 maps without error only in that spelling). Every reader
adds ``(alpha / rank) * up @ down`` to the weight. We write one alpha for every layer, the most common rank, and
scale the up factor of a layer of another rank to match: diffusers applies a layer's own alpha only where all
layers share one (it loses those of the attention layers otherwise). A Conv layer's down factor is a k x k conv to
``rank`` channels and its up factor a 1x1 conv (LoCon). Flux and SD3 erasures are written in PEFT's layout,
``transformer.<diffusers module>.lora_A.weight`` and ``.lora_B.weight`` with no alpha, which diffusers' loaders for
those models and ComfyUI's read.

A low-rank erasure is written as its trained factors; a full-rank delta is factored by truncated SVD at the rank
asked for, and the relative error of each written product is reported. A LoRA carries no bias deltas: diffusers
refuses a file with ``.diff_b`` keys and A1111 ignores them (or, beside no factors, fails the whole file), so
they are left out, and the report says how many.
"""

import json
import math
from collections import Counter
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from .erasure_file import ErasureDelta, LowRank, is_transformer_family, write_atomically
from .keys import TRANSFORMER_KEY_PREFIX, UnetLayout

FORMAT_NAME = "esd-erasure-lora"
FORMAT_VERSION = "1"
PREFIX = "lora_unet_"

# The sharing tools' names of each family: modelspec.architecture (SAI model spec), and kohya's ss_base_model_version.
ARCHITECTURES = {
    ("sd1", "epsilon"): ("stable-diffusion-v1/lora", "sd_v1"),
    ("sd2", "epsilon"): ("stable-diffusion-v2-512/lora", "sd_v2"),
    ("sd2", "v"): ("stable-diffusion-v2-768-v/lora", "sd_v2_v"),
    ("sdxl", "epsilon"): ("stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0"),
}


@dataclass
class LoraReport:
    """What writing a LoRA did: the relative error of each written product, the rank(s), and what was left out."""

    errors: dict[str, float]  # ldm weight name -> ||written product - delta|| / ||delta||
    overall: float  # the same over all the written tensors together
    ranks: set[int]
    left_out: list[str]  # bias deltas, which a LoRA cannot carry

    def line(self) -> str:
        """One summary line."""
        worst = max(self.errors, key=self.errors.get)
        errors = sorted(self.errors.values())
        ranks = "/".join(str(r) for r in sorted(self.ranks))
        bias = f"; {len(self.left_out)} bias deltas left out (a LoRA cannot carry them)" if self.left_out else ""
        return (f"{len(errors)} layers at rank {ranks}, relative error of the written products: {self.overall:.2e} "
                f"overall, per layer median {errors[len(errors) // 2]:.2e}, max {errors[-1]:.2e} ({worst}){bias}")


def truncated(delta: torch.Tensor, rank: int) -> LowRank:
    """The best rank-``rank`` approximation of a full delta (truncated SVD), its scale shared by both factors."""
    u, s, vh = torch.linalg.svd(delta.float().reshape(delta.shape[0], -1), full_matrices=False)
    root = s[:rank].sqrt()
    return LowRank(u[:, :rank] * root, root[:, None] * vh[:rank], tuple(delta.shape))


def balanced(delta: LowRank) -> LowRank:
    """The same product with the scale shared evenly by the factors (orthogonal columns and rows), so that neither
    factor's small values lose precision in fp16. A trained up factor starts at zero and stays small."""
    q_up, r_up = torch.linalg.qr(delta.up.float())
    q_down, r_down = torch.linalg.qr(delta.down.float().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    root = s.sqrt()
    return LowRank(q_up @ u * root, root[:, None] * (vh @ q_down.T), delta.shape)


def ratio(difference: float, norm: float) -> float:
    """``difference / norm``, where a zero norm gives 0 for no difference and 1 for any."""
    return difference / norm if norm else float(difference > 0)


def lora_factors(delta: ErasureDelta, rank: int, dtype: torch.dtype) -> tuple[dict[str, LowRank], LoraReport]:
    """Each weight delta as the factors to write (at ``dtype``), and the report on them."""
    factors, errors, squares = {}, {}, [0.0, 0.0]  # sums of squared differences and of squared norms
    for name, stored in delta.deltas.items():
        if not name.endswith(".weight"):
            continue
        exact = delta.full(name)
        low = balanced(stored) if isinstance(stored, LowRank) else truncated(exact, min(rank, exact.shape[0], exact[0].numel()))
        factors[name] = low.map(lambda t: t.to(dtype).contiguous())
        difference, norm = (factors[name].product() - exact).norm().item(), exact.norm().item()
        errors[name] = ratio(difference, norm)
        squares = [squares[0] + difference**2, squares[1] + norm**2]
    left_out = sorted(name for name in delta.deltas if not name.endswith(".weight"))
    overall = ratio(math.sqrt(squares[0]), math.sqrt(squares[1]))
    return factors, LoraReport(errors, overall, {low.rank for low in factors.values()}, left_out)


def module_key(ldm_weight_name: str, family: str, layout: UnetLayout | None) -> str:
    """kohya's key of a layer: ``lora_unet_`` and its path with underscores, in the spelling kohya writes for the family;
    for Flux and SD3, diffusers' own: ``transformer.`` and the diffusers path."""
    if is_transformer_family(family):
        return TRANSFORMER_KEY_PREFIX + ldm_weight_name.rsplit(".", 1)[0]
    if "xl" in family:
        name = ldm_weight_name
    elif layout is None:
        raise ValueError("The diffusers names of this erasure's layers are unknown (a UNet of no built-in family); "
                         "give the model it was trained on (--model).")
    else:
        name = layout.diffusers_of[ldm_weight_name]
    return PREFIX + name.rsplit(".", 1)[0].replace(".", "_")


def layer_tensors(key: str, low: LowRank, alpha: int) -> dict[str, torch.Tensor]:
    """One layer's factors under kohya's key endings, in the factors' dtype, so that a reader's ``(alpha / rank) *
    up @ down`` is ``low``'s product: the up factor is scaled where the layer's rank is not ``alpha``."""
    up, down = low.as_layers()
    if low.rank != alpha:
        up = (up.float() * (low.rank / alpha)).to(low.up.dtype)
    return {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down,
            f"{key}.alpha": torch.tensor(float(alpha), dtype=low.up.dtype)}


def peft_layer_tensors(key: str, low: LowRank) -> dict[str, torch.Tensor]:
    """One layer's factors under PEFT's key endings (``lora_B`` up, ``lora_A`` down), with no alpha: readers then
    scale by 1, so ``lora_B @ lora_A`` is ``low``'s product. The layout diffusers' Flux and SD3 loaders read."""
    up, down = low.as_layers()
    return {f"{key}.lora_B.weight": up, f"{key}.lora_A.weight": down}


def sharing_metadata(metadata: dict[str, str], family: str, rank: int, alpha: int) -> dict[str, str]:
    """The fields sharing sites and UIs read (SAI model spec, kohya's ss_*), so that a shared file says what it is
    and A1111/Forge list it for the right model."""
    prediction = metadata.get("base_prediction", "epsilon")
    architecture, base_version = ARCHITECTURES.get((family, prediction), (None, None))
    concept, method = metadata.get("concept", "?"), metadata.get("method", "?")
    fields = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": f"ESD erasure: {concept}",
        "modelspec.description": f"Erases {concept!r} from the model ({method}, ESD: Gandikota et al., ICCV 2023). "
        "Apply at strength 1.",
        "modelspec.date": metadata.get("created", ""),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers",
        "modelspec.prediction_type": prediction if prediction in ("v", "flow") else "epsilon",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_output_name": f"esd-{concept}",
        "ss_training_comment": f"ESD erasure of {concept!r} ({method})",
        "ss_v2": str(family == "sd2"),
    }
    if architecture:
        fields |= {"modelspec.architecture": architecture, "ss_base_model_version": base_version}
    return fields


def save_erasure(delta: ErasureDelta, path: str, save_format: str, lora_rank: int, dtype: torch.dtype) -> str:
    """Write ``delta`` in ``save_format`` ("lora" or "delta"); one line saying what was written."""
    if save_format == "delta":
        delta.save(path, dtype)
        return f"wrote {path}: {delta.describe()}, exact delta of {sum(math.prod(d.shape) for d in delta.deltas.values()):,} values"
    report = save_lora(delta, path, lora_rank, dtype)
    return f"wrote {path}: {delta.describe()}, LoRA: {report.line()}"


def save_lora(delta: ErasureDelta, path: str, rank: int, dtype: torch.dtype = torch.float16) -> LoraReport:
    """Write ``delta`` as a kohya-keyed LoRA file, atomically; full-rank deltas factored at ``rank``."""
    layout = delta.layout or (UnetLayout.of_family(delta.family) if delta.family in ("sd1", "sd2") else None)
    factors, report = lora_factors(delta, rank, dtype)
    alpha = Counter(low.rank for low in factors.values()).most_common(1)[0][0]
    tensors = {}
    for name, low in factors.items():
        key = module_key(name, delta.family, layout)
        tensors |= peft_layer_tensors(key, low) if is_transformer_family(delta.family) else layer_tensors(key, low, alpha)
    metadata = {
        **delta.metadata,
        **sharing_metadata(delta.metadata, delta.family, max(report.ranks), alpha),
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lora_relative_errors": json.dumps({name: float(f"{error:.3e}") for name, error in report.errors.items()}),
        "lora_relative_error_overall": f"{report.overall:.3e}",
        "lora_left_out": json.dumps(report.left_out),
    }
    write_atomically(path, lambda temp: save_file(tensors, temp, metadata=metadata))
    return report
