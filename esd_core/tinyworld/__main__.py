"""Command line of the tiny world.

  python -m esd_core.tinyworld train            retrain everything into the shipped assets (~1 h)
  python -m esd_core.tinyworld train --smoke    a few-minute run of every stage, into /tmp
  python -m esd_core.tinyworld train-flow       retrain the flow world's SD3-architecture pipeline (~1 h)
  python -m esd_core.tinyworld quality          print the base model's per-concept table
"""
import os

# Sleep rather than spin while waiting for the other OpenMP thread: on a shared 2-core machine
# spinning threads preempt each other and training runs 2-3x slower. Must precede importing torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace
from pathlib import Path

from . import world

SMOKE = dict(n_images=2000, judge_steps=100, vae_steps=60, unet_steps=60)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m esd_core.tinyworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="retrain judge, VAE, text encoder and UNet (fixed seeds)")
    train.add_argument("--out", type=Path, default=None, help="pipeline directory (default: shipped)")
    train.add_argument("--judge", type=Path, default=None, help="judge file (default: shipped)")
    train.add_argument("--smoke", action="store_true",
                       help="tiny step counts into /tmp/tinyworld-smoke, to check the command works")
    train.add_argument("--unet-steps", type=int, help="UNet + text encoder steps (default 4000)")
    train.add_argument("--vae-steps", type=int, help="VAE steps (default 1500)")
    train.add_argument("--judge-steps", type=int, help="judge steps (default 1500)")
    train.add_argument("--quality-n", type=int, default=32,
                       help="images per concept and naming for the final quality table (0: skip)")
    train_flow = commands.add_parser("train-flow", help="retrain the flow world (SD3 architecture) on the SD world's VAE")
    train_flow.add_argument("--out", type=Path, default=world.DEFAULT_FLOW_MODEL_DIR, help="pipeline directory (default: shipped)")
    train_flow.add_argument("--steps", type=int, help="transformer + text encoder steps (default 8000)")
    train_flow.add_argument("--quality-n", type=int, default=32,
                            help="images per concept and naming for the final quality table (0: skip)")
    quality = commands.add_parser("quality", help="per-concept accuracy of a pipeline, by the judge")
    quality.add_argument("--model", type=Path, default=None, help="pipeline directory (default: shipped)")
    quality.add_argument("-n", type=int, default=64, help="images per concept and naming")
    args = parser.parse_args(argv)
    if args.command == "train":
        run_train(args)
    elif args.command == "train-flow":
        run_train_flow(args)
    else:
        from .evaluate import base_quality, format_quality
        print(format_quality(base_quality(args.model, n=args.n)))


def run_train(args):
    """Train every stage, then measure the base model and write a JSON report next to the judge."""
    from .evaluate import base_quality, format_quality
    from .train import TrainConfig, train_all
    smoke_dir = Path("/tmp/tinyworld-smoke")
    out = args.out or (smoke_dir / "pipeline" if args.smoke else world.DEFAULT_MODEL_DIR)
    judge_path = args.judge or (smoke_dir / "judge.safetensors" if args.smoke else world.DEFAULT_JUDGE_PATH)
    cfg = replace(TrainConfig(), **SMOKE) if args.smoke else TrainConfig()
    overrides = {"unet_steps": args.unet_steps, "vae_steps": args.vae_steps, "judge_steps": args.judge_steps}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    start = time.time()
    report = train_all(out, judge_path, cfg)
    if args.quality_n:
        quality_start = time.time()
        table = base_quality(out, n=args.quality_n, judge_path=judge_path)
        report["seconds"]["quality_table"] = round(time.time() - quality_start, 1)
        report["base_quality"] = table
        print(format_quality(table))
    report["seconds"]["total"] = round(time.time() - start, 1)
    report["shipped_bytes"] = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) \
        + Path(judge_path).stat().st_size
    report_path = Path(judge_path).with_name("train_report.json")
    report_path.write_text(json.dumps(report, indent=1))
    print(f"judge accuracy on fresh images: {report['judge_accuracy_fresh']}")
    print(f"stage seconds: {report['seconds']}; pipeline + judge: {report['shipped_bytes'] / 1e6:.1f} MB")
    print(f"report written to {report_path}")


def run_train_flow(args):
    """Train the flow world, measure it, and write its report into the pipeline folder."""
    from .evaluate import base_quality, format_quality
    from .train_flow import FlowTrainConfig, train_flow_world
    cfg = FlowTrainConfig() if args.steps is None else FlowTrainConfig(steps=args.steps)
    start = time.time()
    report = {"config": asdict(cfg), "seconds": train_flow_world(args.out, cfg=cfg)}
    if args.quality_n:
        quality_start = time.time()
        report["base_quality"] = base_quality(args.out, n=args.quality_n)
        report["seconds"]["quality_table"] = round(time.time() - quality_start, 1)
        print(format_quality(report["base_quality"]))
    report["seconds"]["total"] = round(time.time() - start, 1)
    report["shipped_bytes"] = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    report_path = Path(args.out) / "train_report.json"
    report_path.write_text(json.dumps(report, indent=1))
    print(f"stage seconds: {report['seconds']}; pipeline: {report['shipped_bytes'] / 1e6:.1f} MB; report: {report_path}")


if __name__ == "__main__":
    main()
