"""Peak memory of an erasure on the ComfyUI node path next to the command line's, on a full-size UNet with random weights.

Each case runs in a fresh process (this script with ``--case``), so that its peak belongs to it alone: on the CPU, the
process's peak resident memory (getrusage ru_maxrss), fp32 weights. Cases are short (2 updates, 2 sampling steps, 2
trajectories): enough for one sampling pass and the updates, whose peak is the run's.

- node: a ComfyUI MODEL built from ComfyUI's own classes (the architecture detected from the same diffusers config as the
  command line's), a stand-in CLIP with fixed random embeddings, trained through the training node's ``train``.
- cli: the command line's host, esd_core.bench.RandomWeightHost (a diffusers UNet), through ``esd.erase``.

Run it with ComfyUI importable (both paths then use the same torch):

    COMFYUI_PATH=/path/to/ComfyUI python docs/benchmarks/memory.py --json out.json
    python docs/benchmarks/memory.py --paths cli   # the command line's cases only, without ComfyUI
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # esd_core, without the package installed
SHORT = dict(iterations=2, sample_steps=2, trajectories=2, seed=0, lr=1e-5, concept="an erased concept")
RANKS = {"esd-x": 0, "esd-u": 8}  # esd-x full rank, esd-u rank 8 (the options' auto ranks)
TEXT_SIZES = {"sd1": (768, None), "sdxl": (2048, 1280)}  # context width, pooled width


def rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_passes(host_class, passes: list) -> None:
    """Record every UNet pass of ``host_class``: its rows, whether it kept a graph for backward ("grad"), and the
    process's peak RSS so far (GiB) when the pass is asked for, which is after the previous pass's backward."""
    import torch

    predict = host_class.predict

    def counted(self, x_t, timestep, conds):
        passes.append((len(conds), "grad" if torch.is_grad_enabled() else "no grad", round(peak_rss() / 2**30, 2)))
        return predict(self, x_t, timestep, conds)

    host_class.predict = counted


def note_training_peak(esd_module, figures: dict) -> None:
    """Record the peak RSS when ``esd_module.train_erasure`` returns: training's, before the erasure is packaged
    (full-size deltas, the weights' fingerprint) and, on the node path, applied."""
    train_erasure = esd_module.train_erasure

    def noted(*args, **kwargs):
        trained = train_erasure(*args, **kwargs)
        figures["peak_training"] = peak_rss()
        return trained

    esd_module.train_erasure = noted


# --- the node path ---------------------------------------------------------------------------------------------

class StandInClip:
    """What the host asks of a CLIP: tokens, and a fixed random (1, 77, width) embedding and pooled vector per text."""

    def __init__(self, family: str):
        self.width, self.pooled_width = TEXT_SIZES[family]

    def tokenize(self, text: str):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        import torch

        generator = torch.Generator().manual_seed(zlib.crc32(tokens.encode()))
        cond = torch.randn(1, 77, self.width, generator=generator)
        pooled = torch.randn(1, self.pooled_width or 768, generator=generator)
        return (cond, pooled) if return_pooled else cond


def random_comfy_model(family: str):
    """A ComfyUI MODEL (ModelPatcher) of the family's full-size UNet, fp32 on the CPU, with random weights: the
    architecture ComfyUI detects from the command line's diffusers config (built on the meta device: shapes only)."""
    import torch
    from diffusers import UNet2DConditionModel

    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    from esd_core.model_configs import FULL_SIZE_UNET_CONFIGS

    with torch.device("meta"):
        shapes = UNet2DConditionModel(**FULL_SIZE_UNET_CONFIGS[family]).state_dict()
    model_config = comfy.model_detection.model_config_from_diffusers_unet(shapes)
    model_config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():  # as ComfyUI loads a checkpoint in a node
        model = model_config.get_model({}, "")
        generator = torch.Generator().manual_seed(0)
        for name, tensor in model.diffusion_model.state_dict().items():
            if tensor.dim() > 1:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / tensor[0].numel() ** 0.5)
            else:
                tensor.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())


def run_node_case(case: dict, passes: list, figures: dict) -> dict:
    import torch

    sys.path.insert(0, os.path.join(REPO, "tests"))
    import comfy_env

    sys.path.insert(0, comfy_env.require_comfyui())
    from comfy.cli_args import args

    # ComfyUI's attention on an NVIDIA GPU. Its CPU default (sub-quadratic attention) sizes its chunks to the free
    # memory, so the peak RSS would follow the machine's free memory rather than the training's needs.
    args.use_pytorch_cross_attention = case["node_attention"] == "pytorch"
    comfy_env.in_process_comfy()
    comfy_host = comfy_env.pack_module("nodes.comfy_host")
    erasure_nodes = comfy_env.pack_module("nodes.erasure_nodes")
    options = comfy_env.pack_module("esd_core.options")
    import comfy.ldm.modules.attention

    count_passes(comfy_host.ComfyErasureHost, passes)
    note_training_peak(comfy_env.pack_module("esd_core.esd"), figures)
    start = rss_now()
    model = random_comfy_model(case["family"])
    built = peak_rss()
    settings = options.defaults() | case_settings(case)
    settings |= dict(resolution=case["resolution"], gradient_checkpointing=case["gradient_checkpointing"])
    with torch.inference_mode():  # as ComfyUI runs every node
        erasure_nodes.train(model, StandInClip(case["family"]), settings)
    return dict(rss_before_model=start, peak_with_model=built, attention=comfy.ldm.modules.attention.optimized_attention.__name__)


# --- the command line's path -----------------------------------------------------------------------------------

def run_cli_case(case: dict, passes: list, figures: dict) -> dict:
    import torch

    from esd_core import esd
    from esd_core.bench import RandomWeightHost
    from esd_core.config import EraseConfig
    from esd_core.diffusers_host import DiffusersHost

    count_passes(DiffusersHost, passes)
    note_training_peak(esd, figures)
    start = rss_now()
    host = RandomWeightHost(case["family"], case["resolution"], "cpu", torch.float32, case["gradient_checkpointing"])
    built = peak_rss()
    config = EraseConfig.from_settings(case_settings(case))
    esd.erase(host, config)
    return dict(rss_before_model=start, peak_with_model=built, attention=type(next(iter(host.unet.attn_processors.values()))).__name__)


def case_settings(case: dict) -> dict:
    """The erase settings of a case: the short run's, its method and rank, and its number of trajectories."""
    return SHORT | dict(method=case["method"], rank=RANKS[case["method"]], trajectories=case.get("trajectories", SHORT["trajectories"]))


def run_case(case: dict) -> dict:
    import torch

    passes, figures = [], {}
    began = time.perf_counter()
    extra = (run_node_case if case["path"] == "node" else run_cli_case)(case, passes, figures)
    return {**case, **extra, **figures, "peak_rss": peak_rss(), "passes": passes, "wall_s": round(time.perf_counter() - began, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


# --- the driver ------------------------------------------------------------------------------------------------

def measure(case: dict) -> dict:
    """One case in a fresh process of this interpreter."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def gib(count: int) -> str:
    return f"{count / 2**30:.2f}"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as handle:
        names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'} ({os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TEXT_SIZES), default="sd1")
    parser.add_argument("--resolution", type=int, default=0, help="pixels; 0: the family's own (sd1 512, sdxl 1024)")
    parser.add_argument("--paths", nargs="+", choices=("node", "cli"), default=["node", "cli"])
    parser.add_argument("--methods", nargs="+", choices=sorted(RANKS), default=["esd-x", "esd-u"])
    parser.add_argument("--checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--trajectories", type=int, default=SHORT["trajectories"],
                        help="trajectories sampled together (the option's default is 8: a 16-row sampling pass)")
    parser.add_argument("--node-attention", choices=("pytorch", "cpu-default"), default="pytorch",
                        help="ComfyUI's attention on the node path: pytorch (its default on NVIDIA GPUs, and the command "
                        "line's) or its CPU default (sub-quadratic, chunked to the free memory)")
    parser.add_argument("--json", help="also write every case's figures here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process (the driver's child)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    resolution = args.resolution or {"sd1": 512, "sdxl": 1024}[args.family]
    print(f"{args.family} UNet, random fp32 weights, {resolution}x{resolution}, {cpu_model()}; "
          f"settings: {json.dumps(SHORT | dict(trajectories=args.trajectories))}; peak RSS per case, each in a fresh process", flush=True)
    print("peak RSS GiB: of the whole run; at the end of training (before the erasure is packaged); before the model is "
          "built (imports); once it is built", flush=True)
    print("path  method  rank  checkpointing  peak   training  imports  model  attention  UNet passes (rows, grad, peak RSS GiB before it)", flush=True)
    results = []
    for method in args.methods:
        for checkpointing in args.checkpointing:
            for path in args.paths:
                case = dict(path=path, family=args.family, resolution=resolution, method=method,
                            gradient_checkpointing=checkpointing == "on", node_attention=args.node_attention,
                            trajectories=args.trajectories)
                result = measure(case)
                results.append(result)
                print(f"{path:<5} {method:<7} {RANKS[method]:<5} {checkpointing:<14} {gib(result['peak_rss']):<6} "
                      f"{gib(result['peak_training']):<9} {gib(result['rss_before_model']):<8} {gib(result['peak_with_model']):<6} "
                      f"{result['attention']:<10} {result['passes']}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": cpu_model(), "settings": SHORT | dict(trajectories=args.trajectories), "cases": results}, handle, indent=2)


if __name__ == "__main__":
    main()
