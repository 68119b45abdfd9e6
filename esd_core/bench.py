"""Benchmarks that print figures: time and peak memory of an erasure, fast vs reference vs a two-UNet baseline.

Each measured case runs in its own process (``python -m esd_core.bench CASE_JSON``), so that peak memory
(CUDA max allocated on a GPU, peak RSS on the CPU) belongs to that case alone.
"""

import copy
import json
import resource
import subprocess
import sys
import time
import zlib
from types import SimpleNamespace

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from .config import EraseConfig
from .diffusers_host import DiffusersHost
from .esd import _Run, reference_examples, train_erasure, update
from .methods import layer_tensors, select_parameters
from .model_configs import FULL_SIZE_UNET_CONFIGS, SD_SCHEDULE, TEXT_SHAPES
from .trainable import TrainableDelta


class RandomWeightHost(DiffusersHost):
    """A full-size UNet built from its family's config with random weights; prompts map to fixed random embeddings."""

    def __init__(self, family: str, resolution: int, device: str, dtype: torch.dtype):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**FULL_SIZE_UNET_CONFIGS[family]).to(dtype)
        pipeline = SimpleNamespace(unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULE), vae_scale_factor=8)
        super().__init__(pipeline, device, resolution)
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

    def predict_eps(self, x_t, timestep, conds):
        if self.switch.enabled:
            return super().predict_eps(x_t, timestep, conds)
        trained, self.unet = self.unet, self.frozen_unet
        try:
            return super().predict_eps(x_t, timestep, conds)
        finally:
            self.unet = trained


def train_two_unet_baseline(host: TwoUNetHost, config: EraseConfig) -> None:
    """The baseline to beat on memory: the selected UNet weights themselves get gradients and Adam state."""
    parameters = list(select_parameters(layer_tensors(host.unet), config.method).values())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=config.lr, foreach=False)
    run = _Run(host, host.switch, config, torch.Generator().manual_seed(config.seed))
    examples = reference_examples(run)
    for iteration in range(config.iterations):
        update(run, optimizer, next(examples), iteration)


def run_case(case: dict) -> dict:
    """Time and peak memory of one erasure configuration, in this process."""
    device = torch.device(case["device"])
    rss_before_model = _rss_now()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case["dtype"]]
    mode = case["mode"]
    host_class = TwoUNetHost if mode == "two-unet" else RandomWeightHost
    host = host_class(case["family"], case["resolution"], device, dtype)
    config = EraseConfig(
        concept="an erased concept", method=case["method"], iterations=case["iterations"], lr=1e-5,
        sample_steps=case["sample_steps"], mode="reference" if mode == "two-unet" else mode,
        reuse=case.get("reuse", 0), rank=case.get("rank", 0), seed=0,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if mode == "two-unet":
        train_two_unet_baseline(host, config)
    else:
        train_erasure(host, config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"
    if device.type == "cpu":
        peak_above_start = peak - rss_before_model
    else:
        peak_above_start = peak
    return {**case, "wall_s": round(wall, 3), "s_per_update": round(wall / config.iterations, 4),
            "peak_bytes": peak, "peak_kind": kind, "peak_above_start_bytes": peak_above_start,
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


def full_size_cases(family: str, device: str, dtype: str, resolution: int, iterations: int, sample_steps: int) -> list[dict]:
    """esd-x (full rank) and esd-u (rank 8), each fast, reference and two-UNet baseline."""
    base = dict(family=family, device=device, dtype=dtype, resolution=resolution, iterations=iterations, sample_steps=sample_steps)
    cases = []
    for method, rank in (("esd-x", 0), ("esd-u", 8)):
        for mode in ("fast", "reference", "two-unet"):
            cases.append({**base, "method": method, "rank": 0 if mode == "two-unet" else rank, "mode": mode})
    return cases


def summarize_full_size(results: list[dict]) -> list[dict]:
    """Memory and time ratios against the two-UNet baseline, per method."""
    rows = []
    for method in sorted({r["method"] for r in results}):
        by_mode = {r["mode"]: r for r in results if r["method"] == method}
        baseline = by_mode["two-unet"]
        for mode in ("fast", "reference"):
            row = by_mode[mode]
            rows.append({
                "method": method, "rank": row["rank"], "mode": mode,
                "memory_vs_two_unet": round(row["peak_bytes"] / baseline["peak_bytes"], 3),
                "time_vs_reference": round(row["s_per_update"] / by_mode["reference"]["s_per_update"], 3),
            })
    return rows


if __name__ == "__main__":
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
