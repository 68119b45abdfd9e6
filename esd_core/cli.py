"""Command line: ``esd-erase erase | apply | info | export | eval | attack | demo | bench`` (also ``python -m esd_core``)."""

import argparse
import math
import os
import shutil
import sys
import textwrap
import time
import uuid

import torch
from tqdm.auto import tqdm

from .attack import InversionSettings
from .config import BENCH_CASES, BENCH_RANKS, EraseConfig
from .erasure_file import ErasureDelta, check_usable, family_from_metadata, read_safetensors, summary, write_atomically, write_json_atomically
from .keys import BUILT_IN_FAMILIES, UnetLayout
from .lora_format import save_erasure
from .methods import TRAIN_METHODS, resolve_method
from .options import BY_NAME, COMMAND_LINE, DTYPES, OPTIONS, SAVE_NODE, Option, shown_on
from .output_paths import check_new_folder, check_output_file, check_output_folder
from .presets import TINY_WORLD, TINY_WORLD_BY_METHOD, TINY_WORLD_NOTES, default_method, defaults_for, is_tiny_world, tiny_world_method
from .tinyworld.world import DEFAULT_MODEL_DIR, TINY_WORLDS


def tiny_world_default(name: str) -> str:
    """The tiny world's default for a setting where it differs from the spec's, for help texts ('' where it does not)."""
    if name in TINY_WORLD_NOTES:
        return TINY_WORLD_NOTES[name]
    usual, esd_u = TINY_WORLD[name], TINY_WORLD_BY_METHOD["esd-u"].get(name, TINY_WORLD[name])
    if usual == esd_u == BY_NAME[name].default:
        return ""
    return f"{usual}" if usual == esd_u else f"esd-u {esd_u}, else {usual}"


def finite_float(text: str) -> float:
    """An argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def step_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated whole numbers of at least 1."""
    return tuple(positive_int(part.strip()) for part in text.split(",") if part.strip())


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


def add_option(parser: argparse.ArgumentParser, option: Option, **overrides) -> None:
    """The flag of one option of the spec. It defaults to None, so that what a user leaves out can be filled in
    from the model's defaults (``settings``), except where ``overrides`` say otherwise."""
    kwargs = dict(default=None)
    if option.kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif option.choices:
        kwargs["choices"] = option.choices + option.aliases
        kwargs["metavar"] = "{" + ",".join(option.choices) + "}"
    elif option.kind is not str:
        kwargs["type"] = finite_float if option.kind is float else int
    tiny = tiny_world_default(option.name) if option.shown_on != COMMAND_LINE else ""
    notes = [] if overrides.get("required") else [f"default {option.default!r}" if option.kind is str else f"default {option.default}"]
    notes += [f"tiny world: {tiny}"] if tiny else []
    kwargs["help"] = (option.help + (f" ({'; '.join(notes)})" if notes else "")).replace("%", "%%")
    parser.add_argument(option.flag, **{**kwargs, **overrides})


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="diffusers model folder, or a single-file .safetensors/.ckpt checkpoint (default: the shipped tiny world)")
    _add_world_argument(parser)


def _add_world_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", choices=tuple(TINY_WORLDS), help="instead of --model, a shipped tiny world: sd (a Stable Diffusion "
                        "UNet; the default) or flow (an SD3-architecture transformer trained with flow matching)")
    parser.add_argument("--config", help="for a single-file checkpoint: a diffusers folder of the same family (needed offline)")
    for option in OPTIONS:
        if option.shown_on == COMMAND_LINE:
            add_option(parser, option, default=option.default)


def _add_erase_arguments(parser: argparse.ArgumentParser, **concept) -> None:
    """Every erase option of the spec, shared by ``erase`` and ``demo`` (``concept``: overrides of that flag)."""
    for option in OPTIONS:
        if option.name == "concept":
            add_option(parser, option, **({"required": True} | concept))
        elif option.shown_on != COMMAND_LINE:
            add_option(parser, option)


METHODS_EPILOG = "methods:\n" + "\n".join(f"  {name:14s} {description}" for name, (description, *_) in TRAIN_METHODS.items())

ERASE_DESCRIPTION = (
    "Train an erasure delta. For any model the paper's settings are the defaults: 1000 iterations, lr 1e-5, "
    "eta 1.0, 50 DDIM sampling steps at guidance 3.0, sampling with the model being trained; esd-u and esd-all "
    "train rank-8 deltas (--rank 0: the paper's full rank). For the shipped tiny world (no --model) the defaults "
    "are tuned for it (each flag's help says where).\n"
    "To reproduce the 2025 reference script (esd_sd.py): --iterations 200 --lr 5e-5 --eta 1.0 --sample-with frozen "
    "--mode reference --dtype bf16. Its 'negative guidance 2' is our eta 1 when a concept is erased from itself "
    "(its target there is ec - eta (ec - e0), the paper's with eta + 1); with --erase-from its eta is ours."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esd-erase", description="Erase concepts from Stable Diffusion models (ESD, Gandikota et al. 2023).")
    commands = parser.add_subparsers(dest="command", required=True)
    formatter = argparse.RawDescriptionHelpFormatter

    erase = commands.add_parser("erase", help="train an erasure and write it as a LoRA (or an exact delta) file", formatter_class=formatter,
                                description=ERASE_DESCRIPTION, epilog=METHODS_EPILOG)
    _add_model_arguments(erase)
    _add_erase_arguments(erase)
    erase.add_argument("--out", required=True, help="where to write the .safetensors file")
    erase.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never a file of the input model)")

    apply = commands.add_parser("apply", help="write a model with an erasure applied")
    _add_model_arguments(apply)
    apply.add_argument("--delta", required=True, help="an erasure file: a delta, or a LoRA made here or elsewhere")
    apply.add_argument("--strength", type=finite_float, default=1.0, help="multiplier of the delta (1 = as trained, 0 = original)")
    apply.add_argument("--out", required=True, help="a new folder (whole pipeline) or a .safetensors file (UNet state dict, diffusers names)")

    info = commands.add_parser("info", help="print an erasure file's metadata and tensors")
    info.add_argument("file")

    export = commands.add_parser("export", help="rewrite an erasure file as a LoRA (or a LoRA as an exact delta)")
    export.add_argument("--delta", required=True, help="an erasure file: a delta, or a LoRA made here or elsewhere")
    export.add_argument("--out", required=True, help="where to write the new .safetensors file")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--model", help="the model the erasure is for, to name its layers (default: the family its "
                        "header names, else the shipped tiny world)")
    export.add_argument("--config", help="for a single-file --model: a diffusers folder of the same family")
    for option in shown_on(SAVE_NODE):
        add_option(export, option, default=option.default)

    evaluate = commands.add_parser("eval", help="tiny world: measure an erasure (rates before/after, intervals, grid)")
    evaluate.add_argument("--model", help="a tiny-world pipeline folder (default: the shipped one)")
    _add_world_argument(evaluate)
    evaluate.add_argument("--delta", help="the erasure to measure, a delta or a LoRA (without it: the base model only)")
    evaluate.add_argument("--concept", required=True, help="the erased shapes or colours, e.g. circle, or 'circle, star' for "
                          "an erasure of several (each group then counts the images showing any of them)")
    evaluate.add_argument("--n", type=positive_int, default=64, help="images per prompt group")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--strength", type=finite_float, default=1.0)
    evaluate.add_argument("--json", help="write the numbers here too")
    evaluate.add_argument("--grid", help="before/after PNG grid (default: next to --json, or none)")

    attack = commands.add_parser("attack", help="attack an erasure: learn a new word for the erased concept (Concept Inversion) "
                                 "and measure how often it brings the concept back")
    _add_model_arguments(attack)
    add_option(attack, BY_NAME["resolution"], default=0)
    attack.add_argument("--delta", required=True, help="the erasure to attack, a delta or a LoRA")
    attack.add_argument("--concept", required=True, help="the erased concept (tiny world: a shape or colour, e.g. circle or red)")
    attack.add_argument("--steps", type=positive_int, default=InversionSettings.steps, help="textual-inversion steps (default %(default)s)")
    attack.add_argument("--lr", type=finite_float, default=InversionSettings.lr, help="Adam learning rate of the token (default %(default)s)")
    attack.add_argument("--images", type=positive_int, default=InversionSettings.images,
                        help="images of the concept drawn by the base model, to learn the token from (default %(default)s)")
    attack.add_argument("--n", type=positive_int, help="images per group in the judging, default 64 (another model: "
                        "images per row of the grid, default 8)")
    attack.add_argument("--curve", type=step_list, default=(), help="tiny world: also judge the token as it was after these steps, "
                        "comma-separated (e.g. 50,100,200), to see how success grows with the attack's steps")
    attack.add_argument("--seed", type=int, default=0, help="seed of the images, the token's steps and the judged images")
    attack.add_argument("--no-controls", dest="controls", action="store_false",
                        help="skip the control attack on the base model (halves the time)")
    attack.add_argument("--out-dir", default="esd-attack", help="where the token (embedding file), JSON and grid go")

    demo = commands.add_parser("demo", help="erase a concept from the shipped tiny world, then measure it (the README's first set-up command)",
                               formatter_class=formatter, epilog=METHODS_EPILOG)
    _add_model_arguments(demo)
    _add_erase_arguments(demo, required=False, default="circle", help="a shape or colour of the tiny world (default circle)")
    demo.add_argument("--n", type=positive_int, default=32, help="images per prompt group in the evaluation (esd-erase eval defaults to 64)")
    demo.add_argument("--out-dir", default="esd-demo", help="where the delta, JSON and grid go")

    bench = commands.add_parser("bench", help="time and memory: fast vs reference (vs a two-UNet baseline); prints JSON")
    bench.add_argument("--random-weights", nargs="*", choices=("sd1", "sd2", "sdxl"), help="full-size UNets of these families with random weights")
    bench.add_argument("--methods", nargs="+", default=list(BENCH_RANKS), choices=tuple(BENCH_RANKS), help="random weights: methods to measure (esd-u at rank 8)")
    bench.add_argument("--cases", nargs="+", default=list(BENCH_CASES), choices=BENCH_CASES, help="random weights: which cases per method (checkpointing = fast with gradient checkpointing; two-unet = the reference scripts' frozen-copy layout)")
    bench.add_argument("--tiny-world", action="store_true", help="the shipped tiny world, with its evaluation")
    bench.add_argument("--concept", default="circle", help="tiny world: the concept to erase")
    bench.add_argument("--iterations", type=positive_int, help="updates per case (random weights default 4; tiny world: its preset)")
    bench.add_argument("--resolution", type=int, default=256, help="random weights: image size in pixels")
    bench.add_argument("--sample-steps", type=int, default=50)
    for option in (BY_NAME["device"], BY_NAME["dtype"]):
        add_option(bench, option, default=option.default)
    bench.add_argument("--n", type=positive_int, default=64, help="tiny world: images per prompt group")
    bench.add_argument("--json", help="write all figures here")
    return parser


def model_path(args) -> str:
    """The model a command works on: ``--model``, else the shipped tiny world."""
    return args.model or str(DEFAULT_MODEL_DIR)


def settings(args, concept: str, method: str) -> dict:
    """Every erase setting: what the command line gave, and the model's defaults for what it left out."""
    given = {option.name: getattr(args, option.name) for option in OPTIONS if getattr(args, option.name, None) is not None}
    for name, value in given.items():
        BY_NAME[name].check(value)
    return {**defaults_for(args.model, resolve_method(method), concept), **given, "concept": concept, "method": method}


def erase_config(args, concept: str, method: str) -> EraseConfig:
    """An EraseConfig from parsed arguments, filling what was left out from the model's defaults."""
    return EraseConfig.from_settings(settings(args, concept, method))


def train_with_progress(args, config: EraseConfig, chosen: dict) -> ErasureDelta:
    """Load the model and run the erasure with a tqdm bar showing the running loss; ``chosen`` (from ``settings``)
    gives the host's resolution and gradient checkpointing."""
    from .diffusers_host import host_for, load_pipeline
    from .esd import erase

    device = pick_device(args.device)
    pipeline = load_pipeline(model_path(args), args.config, pick_dtype(args.dtype, device), with_vae=False)
    host = host_for(pipeline, device, chosen["resolution"] or None, chosen["gradient_checkpointing"], guidance=chosen["sample_guidance"])
    with tqdm(total=config.iterations, desc=f"erasing {textwrap.shorten(config.concept, 40, placeholder='...')!r}", unit="it") as bar:
        def progress(iteration: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4g}")
            bar.update(1)

        return erase(host, config, progress)


def run_erase(args) -> None:
    chosen = settings(args, args.concept, args.method or default_method(args.model, args.concept))
    config = EraseConfig.from_settings(chosen)
    check_output_file(args.out, "--out", ".safetensors", args.overwrite, protected=(model_path(args),))
    erasure = train_with_progress(args, config, chosen)
    print(save_as_chosen(erasure, args.out, chosen))


def save_as_chosen(erasure: ErasureDelta, path: str, chosen: dict) -> str:
    """Write an erasure in the format, rank and precision ``chosen`` says; one line saying what was written."""
    return save_erasure(erasure, path, chosen["save_format"], chosen["lora_rank"], DTYPES[chosen["save_dtype"]])


def run_apply(args) -> None:
    from .apply import apply_delta, denoiser_of, load_for
    from .diffusers_host import load_pipeline

    single_file = args.out.lower().endswith(".safetensors")
    if single_file:
        check_output_file(args.out, "--out")
    else:
        check_new_folder(args.out, "--out")
    device = pick_device(args.device)
    pipeline = load_pipeline(model_path(args), args.config, pick_dtype(args.dtype, device))
    denoiser = denoiser_of(pipeline)
    delta = load_for(denoiser, args.delta)
    apply_delta(denoiser, delta, args.strength)
    if single_file:
        from safetensors.torch import save_file

        state = {name: tensor.contiguous() for name, tensor in denoiser.state_dict().items()}
        write_atomically(args.out, lambda temp: save_file(state, temp, metadata={"erasure": delta.describe(), "strength": str(args.strength)}))
    else:
        parent, name = os.path.split(os.path.abspath(args.out.rstrip(os.sep)))
        os.makedirs(parent, exist_ok=True)
        partial = os.path.join(parent, f".partial-{uuid.uuid4().hex}-{name}")  # save_pretrained makes it, under the umask
        try:
            pipeline.save_pretrained(partial)
            os.replace(partial, args.out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {args.out}: {delta.describe()} at strength {args.strength}")


def run_info(args) -> None:
    """Print an erasure file's metadata and tensors; a damaged one too, before saying what is wrong with it."""
    delta = ErasureDelta.load(args.file, check=False)
    print(summary(delta))
    check_usable(args.file, delta.deltas)


def run_export(args) -> None:
    """Rewrite an erasure file in another format (a delta as a LoRA, a LoRA as a delta), at another rank or precision."""
    check_output_file(args.out, "--out", ".safetensors", args.overwrite, protected=(args.delta,))
    delta = ErasureDelta.load(args.delta, file_layout(args))
    chosen = {option.name: getattr(args, option.name) for option in shown_on(SAVE_NODE)}
    print(save_as_chosen(delta, args.out, chosen))


def file_layout(args) -> UnetLayout:
    """The layer names of the model an erasure file is for: ``--model``'s, else those of the family its header
    names, else the shipped tiny world's."""
    from .apply import denoiser_layout, denoiser_of
    from .diffusers_host import load_pipeline

    metadata, _ = read_safetensors(args.delta, with_tensors=False)
    family = family_from_metadata(metadata)
    if args.model is None and family in BUILT_IN_FAMILIES:
        return UnetLayout.of_family(family)
    return denoiser_layout(denoiser_of(load_pipeline(model_path(args), args.config, with_vae=False)))


def run_eval(args) -> dict:
    from .tinyworld.evaluate import evaluate, format_table

    grid = args.grid or (os.path.splitext(args.json)[0] + "-grid.png" if args.json else None)
    inputs = tuple(path for path in (model_path(args), args.delta) if path)
    for path, flag, suffix in ((args.json, "--json", ""), (grid, "--grid" if args.grid else "--json (its grid)", ".png")):
        if path:
            check_output_file(path, flag, suffix, overwrite=True, protected=inputs)
    result = evaluate(args.model, args.concept, args.delta, n=args.n, seed=args.seed, grid_path=grid, strength=args.strength)
    print(format_table(result))
    if args.json:
        write_json_atomically(args.json, result)
        print(f"wrote {args.json}")
    if grid:
        print(f"wrote {grid}")
    return result


def run_attack(args) -> None:
    """Attack an erasure with a learned token and write the token (an embedding file) and a grid: on the tiny world
    also the judged table and its JSON, on another model the images for a person to look at."""
    from .attack import save_token

    if args.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {args.seed}.")
    check_output_folder(args.out_dir, "--out-dir")
    stem = os.path.join(args.out_dir, f"attack-{os.path.splitext(os.path.basename(args.delta))[0]}")
    settings = InversionSettings(steps=args.steps, lr=args.lr, images=args.images)
    if is_tiny_world(args.model):
        from .tinyworld.robustness import attack_erasure, format_attack

        result, vectors = attack_erasure(args.model, args.concept, args.delta, settings, args.n or 64, args.seed, args.controls, args.curve,
                                         grid_path=stem + "-grid.png")
        print(format_attack(result))
        write_json_atomically(stem + ".json", result)
        written = [stem + ".json"]
    else:
        vectors, written = attack_model(args, settings, stem + "-grid.png"), []
    save_token(stem + "-token.safetensors", vectors, {"format": "esd-attack-token", "concept": args.concept, "erasure": args.delta})
    print(f"wrote {', '.join([stem + '-token.safetensors', *written, stem + '-grid.png'])}")


def attack_model(args, settings: InversionSettings, grid_path: str) -> list[torch.Tensor]:
    """The attack on a model without a judge: the learned token's vectors, and its images in a grid."""
    from .apply import load_for
    from .attack import check_attackable
    from .attack_images import attack_images
    from .diffusers_host import DiffusersHost, load_pipeline

    device = pick_device(args.device)
    pipeline = load_pipeline(model_path(args), args.config, pick_dtype(args.dtype, device))
    check_attackable(pipeline)
    erasure = load_for(pipeline.unet, args.delta)
    host = DiffusersHost(pipeline, device, args.resolution or None)
    pipeline.set_progress_bar_config(disable=True)
    with tqdm(total=settings.steps * (2 if args.controls else 1), desc="learning a token", unit="step") as bar:
        return attack_images(host, erasure, args.concept, settings, args.seed, args.n or 8, grid_path,
                             args.controls, lambda loss: (bar.set_postfix(loss=f"{loss:.4g}"), bar.update(1)))


def run_demo(args) -> None:
    """Erase one tiny-world concept with the tuned defaults, write the delta, print the table, write the grid."""
    from .tinyworld import world

    start = time.perf_counter()
    concept = world.canonical(args.concept)
    chosen = settings(args, concept, args.method or tiny_world_method(concept))
    config = EraseConfig.from_settings(chosen)
    delta_path = os.path.join(args.out_dir, f"erase-{concept}-{config.method}.safetensors")
    check_output_folder(args.out_dir, "--out-dir")
    erasure = train_with_progress(args, config, chosen)
    print(f"{save_as_chosen(erasure, delta_path, chosen)} ({time.perf_counter() - start:.0f} s)")
    json_path = os.path.join(args.out_dir, f"erase-{concept}-{config.method}.json")
    eval_args = argparse.Namespace(model=args.model, delta=delta_path, concept=concept, n=args.n, seed=0, strength=1.0, json=json_path, grid=None)
    run_eval(eval_args)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


def run_bench(args) -> None:
    from .bench import full_size_cases, measure, summarize, format_rows, tiny_world_bench

    if not (args.random_weights or args.tiny_world):
        raise ValueError("Nothing to measure: give --tiny-world, --random-weights sd1 (or sd2, sdxl), or both.")
    device = str(pick_device(args.device))
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    report = {"device": device, "dtype": dtype}
    for family in args.random_weights or []:
        cases = full_size_cases(family, device, dtype, args.resolution, args.iterations or 4, args.sample_steps, args.methods, args.cases)
        results = [measure(case) for case in tqdm(cases, desc=f"{family} cases")]
        report[family] = {"cases": results, "summary": summarize(results)}
        print(format_rows(report[family]["summary"]))
    if args.tiny_world:
        report["tiny_world"] = tiny_world_bench(args.concept, device, args.iterations, args.n)
        print(format_rows(report["tiny_world"]["summary"]))
    if args.json:
        write_json_atomically(args.json, report)
        print(f"wrote {args.json}")


COMMANDS = {
    "erase": run_erase,
    "apply": run_apply,
    "info": run_info,
    "export": run_export,
    "eval": run_eval,
    "attack": run_attack,
    "demo": run_demo,
    "bench": run_bench,
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "world", None):
            if args.model:
                raise ValueError("Give --model or --world, not both.")
            args.model = str(TINY_WORLDS[args.world])
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as error:
        print(f"esd-erase: error: {error}", file=sys.stderr)
        return 2
    return 0
