"""Benchmarks that print figures: time and peak memory of an erasure, fast vs reference vs a two-UNet baseline.

Each measured case runs in its own process (``python -m esd_core.bench CASE_JSON``), so that peak memory
(CUDA max allocated on a GPU, peak RSS on the CPU) belongs to that case alone.
"""

import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from types import SimpleNamespace

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from .config import BENCH_CASES, BENCH_RANKS, EraseConfig
from .diffusers_host import DiffusersHost, load_pipeline
from .esd import TrainingRun, erase, run_updates, train_erasure
from .methods import layer_tensors, select_parameters
from .model_configs import FULL_SIZE_UNET_CONFIGS, SD_SCHEDULE, TEXT_SHAPES
from .options import DTYPES
from .trainable import TrainableDelta


class RandomWeightHost(DiffusersHost):
    """A full-size UNet built from its family's config with random weights; prompts map to fixed random embeddings."""

    def __init__(self, family: str, resolution: int, device: str, dtype: torch.dtype, gradient_checkpointing: bool = False):
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it runs: a GPU case need not wait for CPU initialisation
            unet = UNet2DConditionModel(**FULL_SIZE_UNET_CONFIGS[family]).to(dtype)
        pipeline = SimpleNamespace(unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULE), vae_scale_factor=8)
        super().__init__(pipeline, device, resolution, gradient_checkpointing)
        self.tokens, self.pooled_size = TEXT_SHAPES[family]

    def encode(self, text: str):
        generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        embeds = torch.randn(1, self.tokens, self.unet.config.cross_attention_dim, generator=generator)
        pooled = torch.randn(1, self.pooled_size, generator=generator) if self.pooled_size else None
        return embeds.to(self.device, self.dtype), None if pooled is None else pooled.to(self.device, self.dtype)


class TwoUNetHost(RandomWeightHost):
    """The reference scripts' layout: the UNet's own weights are trained and a frozen deep copy answers e0/ec/ef."""

    def __init__(self, *args):
        super().__init__(*args)
        self.frozen_unet = copy.deepcopy(self.unet)
        self.switch = TrainableDelta({})  # only its on/off flag: on = the trained UNet, off = the frozen copy

    def predict(self, x_t, timestep, conds):
        if self.switch.enabled:
            return super().predict(x_t, timestep, conds)
        trained, self.unet = self.unet, self.frozen_unet
        try:
            return super().predict(x_t, timestep, conds)
        finally:
            self.unet = trained


def train_two_unet_baseline(host: TwoUNetHost, config: EraseConfig) -> None:
    """The baseline to beat on memory: the selected UNet weights themselves get gradients and Adam state."""
    parameters = list(select_parameters(layer_tensors(host.unet), config.method).values())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=config.lr, foreach=False)
    run_updates(TrainingRun(host, host.switch, config, torch.Generator().manual_seed(config.seed)), optimizer)


def run_case(case: dict) -> dict:
    """Time and peak memory of one erasure, in this process.

    ``case``: ``device``, ``dtype``, ``config`` (EraseConfig fields), ``baseline`` ("two-unet" or absent), and
    either ``model`` (a model folder) or ``family`` + ``resolution`` (a random-weight full-size UNet);
    ``out`` (optional) is where the trained delta is written.
    """
    device = torch.device(case["device"])
    rss_before_model = _rss_now()
    dtype = DTYPES[case["dtype"]]
    two_unet = case.get("baseline") == "two-unet"
    if "model" in case:
        host = DiffusersHost(load_pipeline(case["model"], dtype=dtype, with_vae=False), device)
    else:
        host_class = TwoUNetHost if two_unet else RandomWeightHost
        host = host_class(case["family"], case["resolution"], device, dtype, case.get("gradient_checkpointing", False))
    config = EraseConfig.from_settings(case["config"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if two_unet:
        train_two_unet_baseline(host, config)
    elif "out" in case:
        erase(host, config).save(case["out"], torch.float32)
    else:
        train_erasure(host, config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if device.type == "cuda":
        peak, kind, above_start = torch.cuda.max_memory_allocated(), "cuda_max_allocated", torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        kind, above_start = "peak_rss", peak - rss_before_model
    return {**case, "wall_s": round(wall, 3), "s_per_update": round(wall / config.iterations, 4),
            "peak_bytes": peak, "peak_kind": kind, "peak_above_start_bytes": above_start,
            "device_name": _device_name(device)}


def _rss_now() -> int:
    """Resident memory of this process now (the imports' share, before any model is built)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def measure(case: dict) -> dict:
    """Run one case in a fresh process and return its figures."""
    result = subprocess.run([sys.executable, "-m", "esd_core.bench", json.dumps(case)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def full_size_cases(family: str, device: str, dtype: str, resolution: int, iterations: int, sample_steps: int,
                    methods=tuple(BENCH_RANKS), kinds=BENCH_CASES) -> list[dict]:
    """For each method (esd-x full rank, esd-u rank 8), the chosen kinds of case: fast, reference, fast with
    gradient checkpointing, and the two-UNet baseline (reference loop, full-rank trained weights)."""
    cases = []
    for method in methods:
        config = dict(concept="an erased concept", method=method, iterations=iterations, lr=1e-5, sample_steps=sample_steps, seed=0)
        base = dict(family=family, device=device, dtype=dtype, resolution=resolution, label=method)
        rank = BENCH_RANKS[method]
        by_kind = {
            "fast": {**base, "config": {**config, "mode": "fast", "rank": rank}},
            "reference": {**base, "config": {**config, "mode": "reference", "rank": rank}},
            "checkpointing": {**base, "config": {**config, "mode": "fast", "rank": rank}, "gradient_checkpointing": True},
            "two-unet": {**base, "config": {**config, "mode": "reference"}, "baseline": "two-unet"},
        }
        cases += [by_kind[kind] for kind in kinds]
    return cases


def tiny_world_bench(concept: str, device: str, iterations: int | None, n: int) -> dict:
    """Reference and fast erasures of one tiny-world concept (same seeds and update budget), timed and evaluated."""
    from .presets import defaults_for, tiny_world_method
    from .tinyworld import world
    from .tinyworld.evaluate import evaluate

    concept = world.canonical(concept)
    method = tiny_world_method(concept)
    config = {**defaults_for(None, method, concept), "concept": concept, "method": method, "seed": 0}
    if iterations:
        config["iterations"] = iterations
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("reference", "fast"):
            case = dict(model=str(world.DEFAULT_MODEL_DIR), device=device, dtype="fp32", config={**config, "mode": mode},
                        out=os.path.join(folder, f"{mode}.safetensors"))
            result = measure(case)
            result["evaluation"] = evaluate(None, concept, case["out"], n=n, seed=0)["summary"]
            del result["out"]
            results.append(result)
    return {"cases": results, "summary": summarize(results)}


def case_name(case: dict) -> str:
    config = case["config"]
    rank = f" rank {config['rank']}" if config.get("rank") else ""
    checkpointing = " +checkpointing" if case.get("gradient_checkpointing") else ""
    return f"{config['method']}{rank} {case.get('baseline') or config['mode']}{checkpointing}"


def summarize(results: list[dict]) -> list[dict]:
    """Per case: time per update and memory, as ratios to the same method's reference and two-UNet runs."""
    rows = []
    for result in results:
        same = [r for r in results if r["config"]["method"] == result["config"]["method"] and r.get("family") == result.get("family")]
        reference = next((r for r in same if r["config"]["mode"] == "reference" and not r.get("baseline")), None)
        baseline = next((r for r in same if r.get("baseline") == "two-unet"), None)
        row = {"case": case_name(result), "family": result.get("family", "tiny world"), "device": result["device_name"],
               "s_per_update": result["s_per_update"], "peak_gib": round(result["peak_bytes"] / 2**30, 3),
               "peak_above_start_gib": round(result["peak_above_start_bytes"] / 2**30, 3)}
        if reference:
            row["time_vs_reference"] = round(result["wall_s"] / reference["wall_s"], 3)
        if "evaluation" in result:
            before, after = result["evaluation"]["before"], result["evaluation"]["after"]
            row.update({"erased_before": round(before["erased"], 3), "erased_after": round(after["erased"], 3),
                        "synonym_after": round(after["synonym"], 3), "others_before": round(before["others_mean"], 3),
                        "others_after": round(after["others_mean"], 3)})
        if baseline:
            row["memory_vs_two_unet"] = round(result["peak_bytes"] / baseline["peak_bytes"], 3)
            row["memory_above_start_vs_two_unet"] = round(result["peak_above_start_bytes"] / baseline["peak_above_start_bytes"], 3)
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of summarize()'s rows."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
