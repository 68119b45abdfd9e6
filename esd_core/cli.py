"""Command line: ``esd-erase erase | apply | info`` (also ``python -m esd_core``)."""

import argparse
import os
import shutil
import sys

import torch
from tqdm.auto import tqdm

from .config import MODES, SAMPLE_WITH_CHOICES, EraseConfig
from .erasure_file import SAVE_DTYPES, ErasureDelta, summary, write_atomically
from .methods import TRAIN_METHODS, method_choices

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it (fp16 otherwise), fp32 on the CPU. Deltas stay fp32 either way."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers model folder, or a single-file .safetensors/.ckpt checkpoint")
    parser.add_argument("--config", help="for a single-file checkpoint: a diffusers folder of the same family (needed offline)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="UNet and text-encoder precision (auto: bf16 on GPU, fp32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esd-erase", description="Erase concepts from Stable Diffusion models (ESD, Gandikota et al. 2023).")
    commands = parser.add_subparsers(dest="command", required=True)

    erase = commands.add_parser(
        "erase",
        help="train an erasure and write it as a delta file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an erasure delta. The paper's settings are the defaults: 1000 iterations, lr 1e-5, eta 1.0, "
        "50 DDIM sampling steps at guidance 3.0, sampling with the model being trained.\n"
        "To reproduce the 2025 reference script (esd_sd.py): --iterations 200 --lr 5e-5 --eta 1.0 --sample-with frozen "
        "--dtype bf16; its 'negative guidance 2' is our eta 1, because its eta is the paper's eta + 1.\n\n"
        "methods:\n" + "\n".join(f"  {name:14s} {description}" for name, (description, _) in TRAIN_METHODS.items()),
    )
    _add_model_arguments(erase)
    erase.add_argument("--concept", required=True, help="text to erase; comma-separate several")
    erase.add_argument("--erase-from", default="", help="erase the concept from this text instead of from itself (one, or one per concept)")
    erase.add_argument("--method", default="esd-x", choices=method_choices(), metavar="METHOD", help="which weights to train (see below); default esd-x")
    erase.add_argument("--iterations", type=int, default=1000, help="updates (paper: 1000)")
    erase.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate (paper: 1e-5)")
    erase.add_argument("--eta", type=float, default=1.0, help="negative guidance, the paper's eta (paper: 1.0; esd_sd.py's 2.0 equals 1.0 here)")
    erase.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the x_t sampling schedule (paper: 50)")
    erase.add_argument("--sample-guidance", type=float, default=3.0, help="classifier-free guidance while sampling x_t (paper: 3.0)")
    erase.add_argument("--sample-with", default="trained", choices=SAMPLE_WITH_CHOICES, help="sample x_t with the model being trained (paper) or the frozen one")
    erase.add_argument("--mode", default="fast", choices=MODES, help="fast: one sampled trajectory serves several updates (default); reference: a fresh trajectory per update, as the paper")
    erase.add_argument("--reuse", type=int, default=0, help="fast mode: updates per sampled trajectory, i.e. the staleness bound (default 0: one per sampling step)")
    erase.add_argument("--rank", type=int, default=0, help="0: full-rank deltas; r > 0: LoRA-style rank-r factors (for esd-u/esd-all memory)")
    erase.add_argument("--resolution", type=int, help="training image size in pixels (default: the UNet's native size)")
    erase.add_argument("--seed", type=int, default=0)
    erase.add_argument("--save-dtype", default="fp16", choices=tuple(SAVE_DTYPES), help="precision of the written deltas")
    erase.add_argument("--out", required=True, help="where to write the .safetensors delta")

    apply = commands.add_parser("apply", help="write a model with an erasure applied")
    _add_model_arguments(apply)
    apply.add_argument("--delta", required=True, help="an erasure .safetensors file")
    apply.add_argument("--strength", type=float, default=1.0, help="multiplier of the delta (1 = as trained, 0 = original)")
    apply.add_argument("--out", required=True, help="a new folder (whole pipeline) or a .safetensors file (UNet state dict, diffusers names)")

    info = commands.add_parser("info", help="print an erasure file's metadata and tensors")
    info.add_argument("file")
    return parser


def run_erase(args) -> None:
    from .diffusers_host import DiffusersHost, load_pipeline
    from .esd import erase

    config = EraseConfig(
        concept=args.concept, erase_from=args.erase_from, method=args.method, iterations=args.iterations,
        lr=args.lr, eta=args.eta, sample_steps=args.sample_steps, sample_guidance=args.sample_guidance,
        sample_with=args.sample_with, mode=args.mode, reuse=args.reuse, rank=args.rank, seed=args.seed,
    )
    _check_output_path(args.out, ".safetensors")
    device = pick_device(args.device)
    pipeline = load_pipeline(args.model, args.config, pick_dtype(args.dtype, device), with_vae=False)
    host = DiffusersHost(pipeline, device, args.resolution)
    with tqdm(total=config.iterations, desc=f"erasing {config.concept!r}", unit="it") as bar:
        def progress(iteration: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4g}")
            bar.update(1)

        erasure = erase(host, config, progress)
    erasure.save(args.out, SAVE_DTYPES[args.save_dtype])
    print(f"wrote {args.out}: {erasure.describe()}, {erasure.metadata['trained_parameters']} parameters")


def run_apply(args) -> None:
    from .apply import apply_delta
    from .diffusers_host import load_pipeline

    delta = ErasureDelta.load(args.delta)
    if os.path.exists(args.out):
        raise ValueError(f"{args.out!r} already exists; choose a new --out or remove it first.")
    device = pick_device(args.device)
    pipeline = load_pipeline(args.model, args.config, pick_dtype(args.dtype, device))
    apply_delta(pipeline.unet, delta, args.strength)
    if args.out.endswith(".safetensors"):
        from safetensors.torch import save_file

        state = {name: tensor.contiguous() for name, tensor in pipeline.unet.state_dict().items()}
        write_atomically(args.out, lambda temp: save_file(state, temp, metadata={"erasure": delta.describe(), "strength": str(args.strength)}))
    else:
        partial = os.path.join(os.path.dirname(os.path.abspath(args.out)), f".partial-{os.path.basename(args.out)}")
        try:
            pipeline.save_pretrained(partial)
            os.replace(partial, args.out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {args.out}: {delta.describe()} at strength {args.strength}")


def _check_output_path(path: str, suffix: str) -> None:
    if not path.endswith(suffix):
        raise ValueError(f"--out {path!r} should end with {suffix}.")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.access(folder, os.W_OK):
        raise ValueError(f"Cannot write to the folder {folder!r}; choose another --out.")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"erase": run_erase, "apply": run_apply, "info": lambda a: print(summary(ErasureDelta.load(a.file)))}
    try:
        handlers[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"esd-erase: error: {error}", file=sys.stderr)
        return 2
    return 0
