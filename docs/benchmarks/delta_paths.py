"""Time the two ways the diffusers host lets a delta reach the layers, on the tiny world's demo erasure.

One 50-update cycle of the demo's circle erasure (one batch of trajectories, their frozen targets, 50
updates) per run, alternating: the delta added to each layer's output (forced by a zero byte budget) and
added to the weights (the tiny world's default), ``--pairs`` times, in this one process. Prints each time.

    python docs/benchmarks/delta_paths.py --pairs 3
"""

import argparse
import time

import torch

import esd_core.diffusers_host as diffusers_host
from esd_core import cli

WEIGHT_BUDGET = diffusers_host.WEIGHT_DELTA_MAX_BYTES


def one_cycle(adds_to_weights: bool, iterations: int) -> float:
    diffusers_host.WEIGHT_DELTA_MAX_BYTES = WEIGHT_BUDGET if adds_to_weights else 0
    args = cli.build_parser().parse_args(["demo", "--iterations", str(iterations)])
    start = time.perf_counter()
    cli.train_with_progress(args, cli.erase_config(args, "circle", "esd-u"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.iterations} updates per run")
    for _ in range(args.pairs):
        for adds_to_weights in (False, True):
            print(f"{'weights' if adds_to_weights else 'outputs'}: {one_cycle(adds_to_weights, args.iterations):.1f} s", flush=True)


if __name__ == "__main__":
    main()
