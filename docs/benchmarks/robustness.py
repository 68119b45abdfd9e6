"""Robustness on the tiny world: per concept, the plain and the adversarial erasure (CLI defaults, erase seed 0), each
timed, measured on every prompt group (64 images each) and attacked with a learned token at the attack's default
steps and at 2x and 4x as many (one run of 4x, judged at the earlier steps too). One JSON per concept; a concept
whose JSON exists is skipped, so an interrupted run continues where it stopped.

    python docs/benchmarks/robustness.py --out docs/benchmarks/robustness --work /tmp/robustness [--concepts circle red ...]
    python docs/benchmarks/robustness.py --out docs/benchmarks/robustness --table   # the JSON files as a table
"""

import argparse
import json
import os
import platform
import time

import torch

from esd_core.apply import applied_delta, load_for
from esd_core.attack import InversionSettings
from esd_core.cli import main as cli
from esd_core.erasure_file import write_json_atomically
from esd_core.tinyworld import judge as judge_lib
from esd_core.tinyworld import world
from esd_core.tinyworld.evaluate import load_pipeline, paired_change, prompt_groups, run_groups
from esd_core.tinyworld.robustness import attack_erasure

N = 64
ATTACK_STEPS = InversionSettings.steps


def erase(concept: str, path: str, adversarial: bool) -> float:
    """Erase with the CLI's defaults (plus --adversarial); returns the seconds it took."""
    start = time.perf_counter()
    flags = ["--adversarial"] if adversarial else []
    if cli(["erase", "--concept", concept, *flags, "--out", path, "--overwrite"]) != 0:
        raise RuntimeError(f"erasing {concept} failed")
    return time.perf_counter() - start


def groups_after(pipe, judge, groups, path: str) -> list[dict]:
    with applied_delta(pipe.unet, load_for(pipe.unet, path)):
        return run_groups(pipe, judge, groups, N, 0)[0]


def measure(concept: str, folder: str) -> dict:
    paths = {kind: os.path.join(folder, f"{concept}-{kind}.safetensors") for kind in ("plain", "adversarial")}
    times = {kind: erase(concept, path, kind == "adversarial") for kind, path in paths.items()}
    pipe, judge = load_pipeline(), judge_lib.load_judge()
    groups = prompt_groups(concept)
    before = run_groups(pipe, judge, groups, N, 0)[0]
    result = {"concept": concept, "n": N, "attack_steps": [ATTACK_STEPS, 2 * ATTACK_STEPS, 4 * ATTACK_STEPS]}
    for kind, path in paths.items():
        after = groups_after(pipe, judge, groups, path)
        changes = {g["name"]: paired_change(b["hits"], a["hits"])["change"] for g, b, a in zip(groups, before, after)}
        others = {name: change for g, (name, change) in zip(groups, changes.items()) if g["role"] == "other"}
        curve = (*((50, 100) if kind == "plain" else ()), ATTACK_STEPS, 2 * ATTACK_STEPS)  # the plain one's also early
        attack, _ = attack_erasure(None, concept, path, InversionSettings(steps=4 * ATTACK_STEPS), N, 0,
                                   controls=kind == "plain", snapshot_steps=curve)
        rates = {g["name"]: {"rate": g["rate"], "ci95": g["ci95"]} for g in attack["groups"]}
        result[kind] = {
            "erase_time_s": times[kind],
            "erased": after[0]["rate"], "synonym": after[1]["rate"],
            "others_change": others, "worst_other_change": min(others.values()),
            "attack": {steps: rates[f"attack@{steps}"] for steps in curve} | {4 * ATTACK_STEPS: rates["attack"]},
            "random_token": rates["random token"],
            **({"base_attack": rates["base attack"]} if "base attack" in rates else {}),
        }
    result["time_ratio"] = times["adversarial"] / times["plain"]
    return result


def percent(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def table(folder: str) -> str:
    """A Markdown table of every concept measured in ``folder``: one row per concept and erasure."""
    steps = (ATTACK_STEPS, 2 * ATTACK_STEPS, 4 * ATTACK_STEPS)
    lines = ["| concept | erasure | erased | synonym | attack " + " / ".join(map(str, steps)) + " steps | random token "
             "| worst other | erase time |", "|---" * 8 + "|"]
    for concept in world.SHAPES + world.COLOURS:
        path = os.path.join(folder, f"{concept}.json")
        if not os.path.exists(path):
            continue
        with open(path) as handle:
            result = json.load(handle)
        for kind in ("plain", "adversarial"):
            row = result[kind]
            worst = min(row["others_change"], key=row["others_change"].get)
            attack = " / ".join(percent(row["attack"][str(s)]["rate"]) for s in steps)
            lines.append(f"| {concept} | {kind} | {percent(row['erased'])} | {percent(row['synonym'])} | {attack} | "
                         f"{percent(row['random_token']['rate'])} | {worst} {100 * row['worst_other_change']:+.1f} | "
                         f"{row['erase_time_s']:.0f} s |")
    return "\n".join(lines)


def measure_all(out: str, work: str, concepts: list[str]) -> None:
    """Measure each concept whose JSON is not yet in ``out``, writing it there and a one-line summary to stdout."""
    os.makedirs(out, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    for concept in concepts:
        path = os.path.join(out, f"{concept}.json")
        if os.path.exists(path):
            continue
        result = measure(concept, work)
        result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
        write_json_atomically(path, result)
        print(json.dumps({k: v for k, v in result.items() if k in ("concept", "time_ratio")} | {
            kind: {k: result[kind][k] for k in ("erased", "synonym", "worst_other_change", "attack")} for kind in ("plain", "adversarial")}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the JSON files")
    parser.add_argument("--work", help="folder of the erasure files (needed unless --table)")
    parser.add_argument("--table", action="store_true", help="print the JSON files in --out as a Markdown table")
    parser.add_argument("--concepts", nargs="+", default=world.SHAPES + world.COLOURS)
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
    elif not args.work:
        parser.error("--work is needed to measure: a folder for the erasure files")
    else:
        measure_all(args.out, args.work, args.concepts)
