"""Time the tiny world's demo erasure with each of its CPU speed-ups turned off in turn.

One run is one 50-update cycle of the demo's circle erasure: one batch of trajectories, their frozen
targets, 50 updates. The variants run in turn, ``--rounds`` times, in this one process, and each time is
printed as it comes (the machine's speed drifts, so compare within a round):

- shipped: as ``esd-erase demo`` trains;
- outputs: the delta added to each layer's output, not to the weights (a zero weight budget);
- row-wise: every feed-forward one row at a time, as for a large UNet (a zero whole-feed-forward budget);
- predicted-targets: the frozen predictions of the erased stream predicted again rather than taken from the
  frozen model's own sampling pass.

    python docs/benchmarks/demo_cycle.py --rounds 2 --variants shipped row-wise predicted-targets
"""

import argparse
import contextlib
import time
from unittest import mock

import torch

import esd_core.diffusers_host as diffusers_host
import esd_core.esd as esd
import esd_core.sampling as sampling
from esd_core import cli


def trajectory_without_predictions(*args, keep_predictions: bool = False, **kwargs):
    """``guided_trajectory`` that never keeps its predictions, so the targets predict them again."""
    return sampling.guided_trajectory(*args, **kwargs)


# What each variant changes: (module, name, value) to patch while it runs, or None.
VARIANTS = {
    "shipped": None,
    "outputs": (diffusers_host, "WEIGHT_DELTA_MAX_BYTES", 0),
    "row-wise": (diffusers_host, "WHOLE_FEED_FORWARD_MAX_BYTES", 0),
    "predicted-targets": (esd, "guided_trajectory", trajectory_without_predictions),
}


def one_cycle(variant: str, iterations: int) -> float:
    args = cli.build_parser().parse_args(["demo", "--iterations", str(iterations)])
    with mock.patch.object(*VARIANTS[variant]) if VARIANTS[variant] else contextlib.nullcontext():
        start = time.perf_counter()
        chosen = cli.settings(args, "circle", "esd-u")
        cli.train_with_progress(args, cli.EraseConfig.from_settings(chosen), chosen)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.iterations} updates per run")
    for _ in range(args.rounds):
        for variant in args.variants:
            print(f"{variant}: {one_cycle(variant, args.iterations):.1f} s", flush=True)


if __name__ == "__main__":
    main()
