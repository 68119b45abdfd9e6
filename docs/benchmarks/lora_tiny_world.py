"""Does an erasure keep its verdicts as a LoRA file? The tiny world's benchmark images for the exact delta and for
LoRA versions of it, on the same seeds.

Variants: the exact delta; the same without its bias deltas (what a LoRA cannot carry); and the LoRA files
``save_lora`` writes at each --ranks (fp16, biases left out; a low-rank erasure is written at its trained rank, so
one rank suffices). Each is applied to the shipped tiny world and its images judged; the table gives each prompt
group's rate and every variant's difference from the exact delta, in points.

    python docs/benchmarks/lora_tiny_world.py --delta erase-red.safetensors --concept red --ranks 8 16 32 --json out.json
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from esd_core.apply import applied_delta, load_for  # noqa: E402
from esd_core.erasure_file import ErasureDelta  # noqa: E402
from esd_core.lora_format import save_lora  # noqa: E402
from esd_core.tinyworld import judge as judge_lib  # noqa: E402
from esd_core.tinyworld import world  # noqa: E402
from esd_core.tinyworld.evaluate import load_pipeline, prompt_groups, run_groups  # noqa: E402


def variants(pipe, exact: ErasureDelta, ranks: list[int], folder: str) -> dict[str, ErasureDelta]:
    weights_only = ErasureDelta({n: d for n, d in exact.deltas.items() if n.endswith(".weight")}, exact.metadata)
    found = {"exact delta": exact, "exact, no bias deltas": weights_only}
    for rank in ranks:
        path = os.path.join(folder, f"rank{rank}.safetensors")
        report = save_lora(exact, path, rank, torch.float16)
        found[f"LoRA rank {rank} (fp16)"] = load_for(pipe.unet, path)
        print(f"rank {rank}: {report.line()}, {os.path.getsize(path):,} bytes", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delta", required=True, help="the erasure, best saved in fp32 (--save-format delta --save-dtype fp32)")
    parser.add_argument("--concept", required=True)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()

    concept = world.canonical(args.concept)
    pipe, judge = load_pipeline(None), judge_lib.load_judge()
    groups = prompt_groups(concept)
    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, delta in variants(pipe, load_for(pipe.unet, args.delta), args.ranks, folder).items():
            start = time.perf_counter()
            with applied_delta(pipe.unet, delta):
                results, _ = run_groups(pipe, judge, groups, args.n, args.seed)
            rates[name] = {group["name"]: result["rate"] for group, result in zip(groups, results)}
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)

    names = list(rates)
    print(f"\n{'group':10s} {'role':8s} " + " ".join(f"{name:>24s}" for name in names))
    worst = {name: 0.0 for name in names}
    for group in groups:
        exact = rates[names[0]][group["name"]]
        cells = [f"{100 * exact:23.1f}%"]
        for name in names[1:]:
            difference = 100 * (rates[name][group["name"]] - exact)
            worst[name] = max(worst[name], abs(difference))
            cells.append(f"{100 * rates[name][group['name']]:14.1f}% ({difference:+5.1f})")
        print(f"{group['name']:10s} {group['role']:8s} " + " ".join(cells))
    print("largest difference from the exact delta, points: " + ", ".join(f"{n}: {worst[n]:.1f}" for n in names[1:]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"concept": concept, "delta": args.delta, "n": args.n, "seed": args.seed,
                       "groups": [{"name": g["name"], "role": g["role"]} for g in groups], "rates": rates}, handle, indent=2)


if __name__ == "__main__":
    main()
