"""LoRA files of full-size UNets: their size next to the full-size fp16 delta, and the error of factoring a full-rank
(esd-x) erasure at each rank.

For each family (random weights from the real configs, prompts as fixed random embeddings: esd_core.bench's
RandomWeightHost), esd-u at rank 8 and esd-x at full rank are trained for a few updates at a small resolution; then
- the full-size fp16 delta's size is computed from the tensors' shapes (2 bytes a value; the header is extra);
- the esd-u erasure is written as a LoRA (fp16, its trained rank-8 factors) and measured on disk;
- the esd-x erasure is written as a LoRA at each --ranks (fp16, truncated SVD): bytes on disk and the relative error
  of the written products (median and largest per tensor, and over all tensors together).

    python docs/benchmarks/lora_size.py --families sd1 sdxl --json out.json
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from esd_core.bench import RandomWeightHost  # noqa: E402
from esd_core.config import EraseConfig  # noqa: E402
from esd_core.erasure_file import ErasureDelta  # noqa: E402
from esd_core.esd import erase  # noqa: E402
from esd_core.lora_format import save_lora  # noqa: E402
from esd_core.options import defaults  # noqa: E402


def trained(host: RandomWeightHost, method: str, rank: int, iterations: int) -> ErasureDelta:
    config = EraseConfig.from_settings(defaults() | dict(concept="an erased concept", method=method, rank=rank,
                                                         iterations=iterations, sample_steps=10, lr=1e-5, seed=0))
    return erase(host, config)


def full_fp16_bytes(delta: ErasureDelta) -> int:
    return 2 * sum(math.prod(d.shape) for d in delta.deltas.values())


def measure(family: str, ranks: list[int], iterations: int, resolution: int, dtype: torch.dtype, folder: str) -> dict:
    """esd-u's file sizes, and esd-x's error curve at ``ranks`` (none: skipped)."""
    host = RandomWeightHost(family, resolution, "cpu", dtype, gradient_checkpointing=True)
    result = {"family": family, "iterations": iterations, "resolution": resolution, "dtype": str(dtype)}
    start = time.perf_counter()
    esd_u = trained(host, "esd-u", 8, iterations)
    path = os.path.join(folder, f"{family}-esd-u.safetensors")
    report = save_lora(esd_u, path, 8)
    result["esd-u rank 8"] = {"lora_bytes": os.path.getsize(path), "full_fp16_delta_bytes": full_fp16_bytes(esd_u),
                              "summary": report.line(), "seconds": round(time.perf_counter() - start)}
    result["esd-u rank 8"]["ratio"] = result["esd-u rank 8"]["full_fp16_delta_bytes"] / result["esd-u rank 8"]["lora_bytes"]
    print(family, "esd-u rank 8", json.dumps(result["esd-u rank 8"]), flush=True)
    if not ranks:
        return result
    esd_x = trained(host, "esd-x", 0, iterations)
    curve = []
    for rank in ranks:
        path = os.path.join(folder, f"{family}-esd-x-{rank}.safetensors")
        report = save_lora(esd_x, path, rank)
        errors = sorted(report.errors.values())
        curve.append({"rank": rank, "lora_bytes": os.path.getsize(path), "median_error": errors[len(errors) // 2],
                      "max_error": errors[-1], "total_error": report.overall})
        print(family, "esd-x", json.dumps(curve[-1]), flush=True)
        os.remove(path)
    result["esd-x"] = {"full_fp16_delta_bytes": full_fp16_bytes(esd_x), "curve": curve}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["sd1"], choices=("sd1", "sd2", "sdxl"))
    parser.add_argument("--ranks", type=int, nargs="*", default=[4, 8, 16, 32, 64, 128],
                        help="esd-x's ranks; none (--ranks alone) measures esd-u's file sizes only")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families:
            dtype = torch.bfloat16 if family == "sdxl" else torch.float32  # fp32 SDXL with training does not fit 24 GB
            results.append(measure(family, args.ranks, args.iterations, args.resolution, dtype, folder))
    for result in results:
        esd_u = result["esd-u rank 8"]
        print(f"\n{result['family']}: esd-u rank 8: LoRA {esd_u['lora_bytes'] / 2**20:.1f} MiB, full fp16 delta "
              f"{esd_u['full_fp16_delta_bytes'] / 2**20:.0f} MiB (1/{esd_u['ratio']:.0f})")
        if "esd-x" not in result:
            continue
        print(f"  esd-x, full fp16 delta {result['esd-x']['full_fp16_delta_bytes'] / 2**20:.0f} MiB")
        print("  rank   LoRA MiB   median err   max err   total err")
        for point in result["esd-x"]["curve"]:
            print(f"  {point['rank']:4d} {point['lora_bytes'] / 2**20:10.1f} {point['median_error']:12.3f} "
                  f"{point['max_error']:9.3f} {point['total_error']:11.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
