"""Time the tiny world's evaluation sampling split between two threads against one thread of two intra-op threads.

Samples the same prompts and seeds both ways, alternating, ``--rounds`` times in this one process, prints
each time, and whether the two ways gave the same images bit for bit.

    python docs/benchmarks/eval_threads.py --images 128 --rounds 2
"""

import argparse
import time
from unittest import mock

import torch

from esd_core import threads
from esd_core.tinyworld import evaluate, world


def timed_images(pipe, prompts, seeds, workers: int) -> tuple[float, torch.Tensor]:
    with mock.patch.object(threads, "WORKERS", workers):
        start = time.perf_counter()
        images = evaluate.generate(pipe, prompts, seeds)
        return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    pipe = evaluate.load_pipeline()
    names = [f"a {colour} {shape}" for shape in world.SHAPES for colour in world.COLOURS]
    prompts = [names[i % len(names)] for i in range(args.images)]
    seeds = list(range(args.images))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images, batches of {evaluate.BATCH_SIZE}")
    for _ in range(args.rounds):
        split_time, split = timed_images(pipe, prompts, seeds, 2)
        whole_time, whole = timed_images(pipe, prompts, seeds, 1)
        print(f"two threads: {split_time:.1f} s, one thread: {whole_time:.1f} s, same images: {torch.equal(split, whole)}", flush=True)


if __name__ == "__main__":
    main()
