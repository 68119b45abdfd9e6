"""Does an erased concept stay erased everywhere? Each case is erased with the CLI's defaults (erase seed 0, plus a
variant's flags), then judged on 64 images per prompt group at two evaluation seeds: on every group the share of
images showing any erased concept (the erased concepts' own and synonym prompts, the other concepts' prompts, and
prompts that name no concept of the erased kind), the other concepts' accuracy, and the share drawn striped.

    python docs/benchmarks/erased_everywhere.py --out docs/benchmarks/erased-everywhere --work /tmp/everywhere \
        [--cases "circle, star" blue] [--variant NAME --flags "--eta 2"]
    python docs/benchmarks/erased_everywhere.py --out docs/benchmarks/erased-everywhere --table

Erasures and the base model's rates are kept in --work and reused; one JSON per case and variant goes to --out.
"""

import argparse
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from esd_core.apply import applied_delta, load_for  # noqa: E402
from esd_core.cli import main as cli  # noqa: E402
from esd_core.erasure_file import write_json_atomically  # noqa: E402
from esd_core.tinyworld import judge as judge_lib  # noqa: E402
from esd_core.tinyworld import world  # noqa: E402
from esd_core.tinyworld.evaluate import compared, erased_concepts, load_pipeline, prompt_groups, run_groups  # noqa: E402

CASES = ["circle, star", "triangle, square", "red, blue", *world.SHAPES, *world.COLOURS]
SEEDS = (0, 500)
N = 64
# The targets: on an erased concept's own prompts at most 10% show any erased concept, on its synonym's at most 20%;
# a single-concept erasure raises the erased share of no group by more than 2 points and costs no other concept more
# than 5 points of accuracy.
ERASED_AT_MOST, SYNONYM_AT_MOST, RISE_AT_MOST, OTHER_DROP_AT_MOST = 0.10, 0.20, 0.02, 0.05


def slug(case: str) -> str:
    return "-".join(erased_concepts(case))


def erased_file(case: str, variant: str, flags: list[str], work: str) -> tuple[str, float | None]:
    """The erasure of ``case`` under ``variant`` in ``work``, made with the CLI's defaults and ``flags`` unless it is
    there already; with the seconds erasing took (None when reused)."""
    path = os.path.join(work, f"{slug(case)}-{variant}.safetensors")
    if os.path.exists(path):
        return path, None
    start = time.perf_counter()
    if cli(["erase", "--concept", case, "--seed", "0", *flags, "--out", path]) != 0:
        raise RuntimeError(f"erasing {case!r} with {flags} failed")
    return path, time.perf_counter() - start


def base_rates(pipe, judge, groups, erased, seed: int, work: str) -> list[dict]:
    """The base model's judged rates on ``groups`` at ``seed``, kept in ``work`` (they do not depend on the erasure)."""
    path = os.path.join(work, f"base-{'-'.join(erased)}-seed{seed}.json")
    if not os.path.exists(path):
        write_json_atomically(path, run_groups(pipe, judge, groups, N, seed, erased)[0])
    with open(path) as handle:
        return json.load(handle)


def compact(group: dict) -> dict:
    """A group's rates and changes without the per-image verdicts."""
    out = {"name": group["name"], "role": group["role"], "prompts": group["prompts"]}
    for key, pick in (("", lambda r: r), ("erased_", lambda r: r["erased"]), ("striped_", lambda r: r["striped"])):
        out[f"{key}before"], out[f"{key}after"] = pick(group["before"])["rate"], pick(group["after"])["rate"]
        out[f"{key}change"] = group[f"{key}change"]["change"]
    return out


def measure(case: str, variant: str, flags: list[str], work: str, seeds: list[int]) -> dict:
    erased = erased_concepts(case)
    path, seconds = erased_file(case, variant, flags, work)
    pipe, judge = load_pipeline(), judge_lib.load_judge()
    groups = prompt_groups(erased)
    result = {"case": ", ".join(erased), "variant": variant, "flags": flags, "erase_time_s": seconds, "n": N, "seeds": {}}
    for seed in seeds:
        before = base_rates(pipe, judge, groups, erased, seed, work)
        with applied_delta(pipe.unet, load_for(pipe.unet, path)):
            after = run_groups(pipe, judge, groups, N, seed, erased)[0]
        result["seeds"][seed] = [compact(g) for g in compared(groups, before, after)["groups"]]
    return result


def verdict(result: dict) -> dict:
    """The figures the targets are about, worst over the seeds."""
    rows = [g for groups in result["seeds"].values() for g in groups]
    erased = max(g["after"] for g in rows if g["role"] == "erased")
    synonym = max(g["after"] for g in rows if g["role"] == "synonym")
    rise = max(rows, key=lambda g: g["erased_change"])
    other = min((g for g in rows if g["role"] == "other"), key=lambda g: g["change"])
    striped = [g["striped_change"] for g in rows if g["role"] == "other"]
    single = len(erased_concepts(result["case"])) == 1
    met = erased <= ERASED_AT_MOST and synonym <= SYNONYM_AT_MOST and (
        not single or (rise["erased_change"] <= RISE_AT_MOST and other["change"] >= -OTHER_DROP_AT_MOST))
    return {"erased": erased, "synonym": synonym, "rise": (rise["erased_change"], rise["name"]),
            "other": (other["change"], other["name"]), "striped": (min(striped), max(striped)), "met": met}


def table(folder: str) -> str:
    """A Markdown table of every case and variant measured in ``folder``."""
    lines = ["| erased | variant | own prompts | synonym | largest rise of the erased share | worst other | striped shift "
             "(others) | targets |", "|---" * 8 + "|"]
    results = []
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".json")):
        with open(os.path.join(folder, name)) as handle:
            results.append(json.load(handle))
    for case in CASES:
        for result in (r for r in results if r["case"] == ", ".join(erased_concepts(case))):
            v = verdict(result)
            lines.append(f"| {result['case']} | {result['variant']} | {100 * v['erased']:.1f}% | {100 * v['synonym']:.1f}% "
                         f"| {100 * v['rise'][0]:+.1f} ({v['rise'][1]}) | {100 * v['other'][0]:+.1f} ({v['other'][1]}) "
                         f"| {100 * v['striped'][0]:+.1f} to {100 * v['striped'][1]:+.1f} | {'met' if v['met'] else 'missed'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the JSON results")
    parser.add_argument("--work", help="folder for the erasures and the base model's rates")
    parser.add_argument("--cases", nargs="+", default=CASES, help="what to erase, one text per case")
    parser.add_argument("--variant", default="defaults", help="a name for the erase flags below")
    parser.add_argument("--flags", default="", help="erase flags added to the CLI's defaults")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="evaluation seeds (default %(default)s)")
    parser.add_argument("--table", action="store_true", help="print the measured cases as a Markdown table")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    if not args.work:
        parser.error("--work is needed to measure")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    for case in args.cases:
        json_path = os.path.join(args.out, f"{slug(case)}-{args.variant}.json")
        if os.path.exists(json_path):
            continue
        result = measure(case, args.variant, shlex.split(args.flags), args.work, args.seeds)
        write_json_atomically(json_path, result)
        v = verdict(result)
        print(f"{result['case']} [{args.variant}]: erased {100 * v['erased']:.1f}%, synonym {100 * v['synonym']:.1f}%, "
              f"rise {100 * v['rise'][0]:+.1f} ({v['rise'][1]}), other {100 * v['other'][0]:+.1f} ({v['other'][1]}), "
              f"{'met' if v['met'] else 'missed'}", flush=True)


if __name__ == "__main__":
    main()
