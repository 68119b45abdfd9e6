"""Helpers for the tests that run against a real ComfyUI (tests/test_comfy_*.py).

ComfyUI is found through the COMFYUI_PATH environment variable, or because this pack sits in
ComfyUI/custom_nodes/<pack>. Without it the host tests skip, saying how to enable them.

The tiny checkpoint: a random-weight SD1.5-shaped checkpoint that CheckpointLoaderSimple detects as SD1.5:
a UNet with model_channels 320, channel_mult [1], one res block per level, transformer depth 1, context 768
(built as a diffusers UNet and renamed to ldm names with esd_core.keys, so a diffusers host can run the very
same weights); a full-size CLIP-L text model (random); a full-size SD VAE (random, built with ComfyUI's own
class). About 230M parameters; built once per machine and cached in the temp folder.
"""

import asyncio
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "esd_erasure"
TINY_VERSION = "1"
SKIP_MESSAGE = (
    "ComfyUI not found: these host tests need a ComfyUI checkout. Set COMFYUI_PATH=/path/to/ComfyUI (its Python "
    "packages installed in this environment) or place this pack in ComfyUI/custom_nodes/, then rerun."
)


def one_torch_thread():
    """Generator for a module fixture: torch on one thread while the module runs, then as before.

    On a 2-core machine that is busy with anything else, two torch threads wait on each other and a tiny UNet
    step takes seconds instead of milliseconds; one thread is fast and deterministic either way."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def comfyui_path() -> str | None:
    candidates = [os.environ.get("COMFYUI_PATH", "")]
    parent = os.path.dirname(REPO)
    if os.path.basename(parent) == "custom_nodes":
        candidates.append(os.path.dirname(parent))
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "main.py")) and os.path.isdir(os.path.join(candidate, "comfy")):
            return os.path.abspath(candidate)
    return None


def require_comfyui() -> str:
    path = comfyui_path()
    if path is None:
        pytest.skip(SKIP_MESSAGE, allow_module_level=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# A sandbox base directory: models/, custom_nodes/<pack> (a link to this repo), input/, output/, temp/, user/.

_BASE = None


def base_directory() -> str:
    global _BASE
    if _BASE is None:
        _BASE = tempfile.mkdtemp(prefix="esd_comfy_base_")
        atexit.register(shutil.rmtree, _BASE, True)  # the link to this repo inside is removed, not followed
        for sub in ("models/checkpoints", "models/erasures", "models/loras", "models/diffusion_models",
                    "custom_nodes", "input", "output", "temp", "user"):
            os.makedirs(os.path.join(_BASE, sub), exist_ok=True)
        os.symlink(REPO, os.path.join(_BASE, "custom_nodes", PACK_NAME))
    return _BASE


_IN_PROCESS = {}


def in_process_comfy():
    """Import ComfyUI in this process (CPU, sandbox base directory) and load the pack the way ComfyUI does.

    Returns a namespace dict: ``nodes`` (ComfyUI's nodes module), ``pack`` (the pack module), ``node`` (id -> class).
    """
    if _IN_PROCESS:
        return _IN_PROCESS
    root = require_comfyui()
    base = base_directory()
    if root not in sys.path:
        sys.path.insert(0, root)
    # ComfyUI's own top-level ``nodes`` module must win over this repo's ``nodes`` package.
    if "nodes" in sys.modules and not getattr(sys.modules["nodes"], "__file__", "").startswith(root):
        del sys.modules["nodes"]
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = base
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    import folder_paths

    if folder_paths.base_path != os.path.abspath(base):  # folder_paths was imported before: point it at the sandbox
        folder_paths.set_output_directory(os.path.join(base, "output"))
        folder_paths.set_temp_directory(os.path.join(base, "temp"))
        folder_paths.set_input_directory(os.path.join(base, "input"))
        for name in ("checkpoints", "loras", "diffusion_models"):
            folder_paths.add_model_folder_path(name, os.path.join(base, "models", name), is_default=True)
    folder_paths.models_dir = os.path.join(base, "models")
    import nodes

    pack_dir = os.path.join(base, "custom_nodes", PACK_NAME)
    ok = asyncio.run(nodes.load_custom_node(pack_dir))
    assert ok, "ComfyUI failed to load the pack (see the log above)"
    module_name = pack_dir.replace(".", "_x_")
    pack = sys.modules[module_name]
    folder_paths.add_model_folder_path("erasures", os.path.join(base, "models", "erasures"), is_default=True)
    _IN_PROCESS.update(
        nodes=nodes, pack=pack, module_name=module_name, base=base, folder_paths=folder_paths,
        node={k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("ESD")},
    )
    return _IN_PROCESS


def pack_module(name: str):
    """A submodule of the loaded pack, e.g. ``pack_module('nodes.comfy_host')``."""
    env = in_process_comfy()
    import importlib

    return importlib.import_module(f"{env['module_name']}.{name}")


# ---------------------------------------------------------------------------------------------------------------
# The tiny SD1.5-shaped checkpoint.

def _cache_dir() -> str:
    folder = os.path.join(tempfile.gettempdir(), f"esd_comfy_tiny_v{TINY_VERSION}")
    os.makedirs(folder, exist_ok=True)
    return folder


def tiny_diffusers_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=768, attention_head_dim=8,
    ).eval()


def clip_l_config():
    from transformers import CLIPTextConfig

    with open(os.path.join(require_comfyui(), "comfy", "sd1_clip_config.json")) as handle:
        values = json.load(handle)
    return CLIPTextConfig(**{k: v for k, v in values.items() if not k.startswith("_") and k != "architectures"})


def tiny_text_encoder(seed: int = 1):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(clip_l_config()).eval()
    with torch.no_grad():  # round to fp16 so the stored (fp16) weights are exactly these
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    return model


def _random_vae_state_dict(seed: int = 2) -> dict:
    """A full-size SD VAE with random weights, built with ComfyUI's own autoencoder class (ldm key names)."""
    require_comfyui()
    in_process_comfy()
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in vae.state_dict().items():
        if tensor.dim() > 1:
            fan_in = tensor[0].numel()
            value = torch.randn(tensor.shape, generator=generator) / fan_in**0.5
        elif "norm" in name and name.endswith("weight"):
            value = torch.ones(tensor.shape)
        else:
            value = torch.zeros(tensor.shape)
        state[name] = value.half()
    return state


def tiny_checkpoint() -> str:
    """Path of the cached tiny SD1.5-shaped checkpoint (built on first use)."""
    path = os.path.join(_cache_dir(), "tiny_sd15.safetensors")
    if os.path.isfile(path):
        return path
    from safetensors.torch import save_file

    esd_keys = pack_module("esd_core.keys")
    unet = tiny_diffusers_unet()
    unet_sd = unet.state_dict()
    config = dict(unet.config)
    mapping = esd_keys.diffusers_to_ldm_names(unet_sd.keys(), config)
    tensors = {f"model.diffusion_model.{mapping[k]}": v.contiguous() for k, v in unet_sd.items()}
    text = tiny_text_encoder()
    for key, value in text.state_dict().items():
        if key.endswith("position_ids"):
            continue
        tensors[f"cond_stage_model.transformer.{key}"] = value.half().contiguous()
    for key, value in _random_vae_state_dict().items():
        tensors[f"first_stage_model.{key}"] = value.contiguous()
    temp = path + f".{os.getpid()}.partial"
    save_file(tensors, temp)
    os.replace(temp, path)
    return path


def load_tiny_model():
    """The tiny checkpoint as ComfyUI's loader gives it, inside inference mode as ComfyUI runs every node: (MODEL, CLIP)."""
    import comfy.sd

    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(tiny_checkpoint(), output_vae=True, output_clip=True)
    return model, clip


def with_erasures_as_loras(env: dict) -> dict:
    """``env`` with its models/erasures folder (``env["erasures"]``) also listed as a LoRA folder, so the stock LoRA
    loader reads the erasure files written there."""
    env["erasures"] = os.path.join(env["base"], "models", "erasures")
    env["folder_paths"].add_model_folder_path("loras", env["erasures"])
    return env


def install_checkpoint(base: str) -> str:
    """Link (or copy) the tiny checkpoint into <base>/models/checkpoints; return its file name there."""
    source = tiny_checkpoint()
    name = "tiny_sd15.safetensors"
    target = os.path.join(base, "models", "checkpoints", name)
    if not os.path.exists(target):
        try:
            os.symlink(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return name


# ---------------------------------------------------------------------------------------------------------------
# A ComfyUI server on 127.0.0.1.

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu`` on 127.0.0.1 with the sandbox base directory; stopped by ``stop()``."""

    def __init__(self, base: str):
        self.root = require_comfyui()
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, "server.log")
        self.process = None

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--base-directory", self.base],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},  # see one_torch_thread
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not start within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path) as handle:
            return handle.read()[-6000:]

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, payload=None):
        data = json.dumps(payload or {}).encode()
        request = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            raise AssertionError(f"POST {route} -> {error.code}: {error.read().decode()[:3000]}") from error
        return json.loads(body) if body else None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "esd-tests"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 240.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                status = history[prompt_id]["status"]
                if status.get("status_str") in ("success", "error"):
                    return history[prompt_id]
            time.sleep(0.3)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in float64: how far the ComfyUI host's numbers are from the diffusers host's."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
