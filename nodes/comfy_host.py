"""The ComfyUI host of the ESD loop: runs the UNet of a ComfyUI MODEL (a ModelPatcher) for esd_core.

How the trainable delta reaches the layers: every weighted module of the UNet gets a ModelPatcher weight
wrapper (the mechanism ComfyUI's own trainer uses). ComfyUI's layers then cast a fresh copy of their
weight and pass it through the wrappers on every forward. That copy matters twice: the weights loaded by
ComfyUI are inference tensors, which autograd may not save for backward, and the copy is not one; and the
stored weights are never written to, so the input MODEL is untouched. Selected tensors come back as
``weight + delta`` while the delta is switched on; all others pass through unchanged.

Epsilon from ComfyUI's model: ``apply_model(x, sigma)`` takes k-diffusion inputs ``x = x0 + sigma*eps`` and
returns the denoised x0 for EPS and V-prediction models alike, so ``eps = (x - denoised) / sigma``, with
``x = x_t * sqrt(1 + sigma^2)`` for the DDPM latent ``x_t`` at the 1000-step timestep whose sigma it is.

Memory, with ``gradient_checkpointing`` (as ComfyUI's own trainer): the UNet's outermost blocks recompute their
activations in backward, and each transformer block's feed-forward runs one batch row at a time. Both replace
``forward`` on modules the input MODEL shares, so ``release()`` puts every one back.
"""

import logging
import uuid
from contextlib import contextmanager

import torch
import torch.utils.checkpoint

import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.utils

from ..esd_core.erasure_file import model_family
from ..esd_core.host import ErasureHost
from ..esd_core.keys import UnetLayout
from ..esd_core.methods import layer_tensors
from ..esd_core.trainable import TrainableDelta

PREFIX = "diffusion_model."
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}
# load_models_gpu's memory_required before training: more than any device has, so ComfyUI unloads every other model.
FREE_EVERY_OTHER_MODEL = 1e20
# Containers: their own forward is not what the UNet calls (it iterates over them), so their children are patched.
CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


class _Wrapper:
    """A weight wrapper that adds the host's active delta for one tensor, or returns the weight as it came."""

    def __init__(self, host: "ComfyErasureHost", name: str):
        self.host = host
        self.name = name

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.host.active_delta
        if delta is None or self.name not in delta.shapes:
            return weight
        return delta.added_to(self.name, weight)


def outermost_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The highest descendants of ``module`` that are not containers (for the ldm UNet: the res blocks, spatial
    transformers, up/downsamplers and convs inside input_blocks, middle_block, output_blocks, ...)."""
    blocks = []
    for child in module.children():
        blocks += outermost_blocks(child) if isinstance(child, CONTAINERS) else [child]
    return blocks


def row_wise(forward):
    """``forward`` applied to one row (batch element) at a time, so the feed-forward's wide hidden layer exists for
    one row only; the same outputs up to float rounding."""

    def run(x, *args, **kwargs):
        if x.shape[0] == 1:
            return forward(x, *args, **kwargs)
        return torch.cat([forward(row, *args, **kwargs) for row in x.split(1)])

    return run


_NOT_SET = object()  # a module had no forward attribute of its own (the usual case: its class's forward)


class ForwardPatches:
    """Replaced ``forward`` attributes of modules, with what each module had before, to be put back exactly."""

    def __init__(self):
        self._saved: list[tuple[torch.nn.Module, object]] = []

    def replace(self, module: torch.nn.Module, wrap) -> None:
        """Set ``module.forward = wrap(module.forward)``, unless a live ForwardPatches has already replaced it."""
        if getattr(module.__dict__.get("forward"), "esd_patch", False):
            return
        self._saved.append((module, module.__dict__.get("forward", _NOT_SET)))
        module.forward = wrap(module.forward)
        module.forward.esd_patch = True

    def undo(self) -> None:
        """Put every replaced forward back, newest first (a module without its own ``forward`` gets none again)."""
        while self._saved:
            module, previous = self._saved.pop()
            if previous is _NOT_SET:
                del module.forward
            else:
                module.forward = previous


def is_sdxl(model) -> bool:
    return isinstance(model.model, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner))


def family_of(model) -> str:
    """The base-model family of a ComfyUI MODEL, in esd_core's words ("sd1", "sd2", "sdxl", ...)."""
    unet_config = model.model.model_config.unet_config
    return model_family(int(unet_config.get("context_dim") or 0), is_sdxl(model))


def default_resolution(model) -> int:
    family = family_of(model)
    if family == "sd2" and model.model.model_type != comfy.model_base.ModelType.V_PREDICTION:
        return 512  # SD2.x base (512px, eps); 768 is for the v-prediction models
    return DEFAULT_RESOLUTION.get(family, 512)


def model_layout(model) -> UnetLayout:
    """A MODEL's UNet names in both spellings, from ComfyUI's own diffusers -> ldm map (the one its LoRA loader uses)."""
    return UnetLayout(comfy.utils.unet_to_diffusers(model.model.model_config.unet_config))


def unet_tensors(model) -> dict[str, torch.Tensor]:
    """Every UNet state-dict tensor of a MODEL by ldm name (no ``diffusion_model.`` prefix); no copies."""
    return {k[len(PREFIX):]: v for k, v in model.model.state_dict().items() if k.startswith(PREFIX)}


def check_supported(model) -> None:
    """Refuse models the ESD loop cannot drive, naming what is supported."""
    if not hasattr(model, "model") or not hasattr(model.model, "diffusion_model"):
        raise ValueError("The MODEL input is not a diffusion model. Connect the MODEL output of a checkpoint loader.")
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or len(sampling.sigmas) != 1000:
        raise ValueError(
            f"ESD needs a UNet with a 1000-step discrete noise schedule (Stable Diffusion 1.x, 2.x or SDXL); "
            f"this model ({type(model.model).__name__}) has another kind. Load an SD1.x, SD2.x or SDXL checkpoint. "
            "Flux.1 and SD3.x erasures train on the command line for now: esd-erase erase --model <diffusers folder>."
        )
    if model.model.model_type not in (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION):
        raise ValueError(f"Unsupported prediction type {model.model.model_type}; ESD supports eps and v-prediction models.")


class ComfyErasureHost(ErasureHost):
    """ErasureHost over a ComfyUI MODEL. Works on a clone; the input MODEL and its weights are never changed.

    Use it inside ``torch.inference_mode(False)``, and call ``release()`` when done (also on errors).
    """

    def __init__(self, model, clip, resolution: int = 0, gradient_checkpointing: bool = True):
        check_supported(model)
        if clip is None:
            raise ValueError("A CLIP is needed to encode the concept. Connect the CLIP output of the checkpoint loader.")
        if resolution and resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}.")
        self.clip = clip
        self.patcher = model.clone()
        self.family = family_of(model)
        self.prediction = "v" if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION else "epsilon"
        self.sdxl = is_sdxl(model)
        self.resolution = int(resolution) or default_resolution(model)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        channels = int(getattr(model.model.latent_format, "latent_channels", 4))
        self.latent_shape = (channels, self.resolution // 8, self.resolution // 8)
        self.device = self.patcher.load_device
        self.active_delta: TrainableDelta | None = None
        self._wrapped = False
        self._others_freed = False
        self._grad_flags: dict[str, bool] = {}
        self._forward_patches = ForwardPatches()
        sigmas = self.patcher.get_model_object("model_sampling").sigmas.detach().to("cpu", torch.float64)
        self._sigmas = sigmas
        self._alphas_cumprod = (1.0 / (1.0 + sigmas**2)).float()

    # --- ErasureHost --------------------------------------------------------------------------
    def layer_tensors(self) -> dict[str, torch.Tensor]:
        self._load()
        return layer_tensors(self.patcher.model.diffusion_model)

    def ldm_name(self, name: str) -> str:
        return name

    @property
    def layout(self) -> UnetLayout:
        return model_layout(self.patcher)

    @contextmanager
    def attach(self, delta: TrainableDelta):
        self._load()
        previous, self.active_delta = self.active_delta, delta
        try:
            yield self
        finally:
            self.active_delta = previous

    def encode(self, text: str):
        with torch.no_grad():
            tokens = self.clip.tokenize(text)
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            cond = cond.detach().clone()
            adm = None
            if self.sdxl:
                size = self.resolution
                adm = self.patcher.model.encode_adm(
                    pooled_output=pooled.detach().clone(), width=size, height=size, crop_w=0, crop_h=0,
                    target_width=size, target_height=size, device=cond.device,
                )
                adm = adm.detach().clone()
        return cond, adm

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def predict(self, x_t: torch.Tensor, timestep, conds: list) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if not self._others_freed:  # first pass, after the prompts are encoded: this model alone in memory
            self._load(free_others=True)
        rows = len(conds)
        x_t = x_t.to(self.device, torch.float32)
        if x_t.shape[0] == 1 and rows > 1:
            x_t = x_t.expand(rows, *x_t.shape[1:])
        timesteps = torch.as_tensor(timestep).reshape(-1).to("cpu", torch.long).expand(rows)
        if all(c[0].shape == conds[0][0].shape for c in conds):
            return self._eps_batch(x_t, timesteps, conds)
        # prompts of different token lengths cannot share a batch: one row at a time
        return torch.cat([self._eps_batch(x_t[i : i + 1], timesteps[i : i + 1], [c]) for i, c in enumerate(conds)])

    # --- internals -----------------------------------------------------------------------------
    def _eps_batch(self, x_t: torch.Tensor, timesteps: torch.Tensor, conds: list) -> torch.Tensor:
        """eps = (x - denoised) / sigma, with x = x_t * sqrt(1 + sigma^2) the k-diffusion input at the row's timestep."""
        sigma64 = self._sigmas[timesteps]
        sigma = sigma64.to(self.device, torch.float32)
        scale = (1.0 + sigma64**2).sqrt().to(self.device, torch.float32).view(-1, 1, 1, 1)
        x = x_t * scale
        context = torch.cat([c[0].to(self.device) for c in conds])
        kwargs = {}
        if self.sdxl:
            kwargs["y"] = torch.cat([c[1].to(self.device) for c in conds])
        denoised = self.patcher.model.apply_model(x, sigma, c_crossattn=context, **kwargs)
        return ((x - denoised.float()) / sigma.view(-1, 1, 1, 1)).float()

    def _load(self, free_others: bool = False) -> None:
        """Register the wrappers (and the memory patches) once, then have ComfyUI load the clone (a fresh load, so
        they take effect), fully; with ``free_others`` every other loaded model is unloaded first."""
        if not self._wrapped:
            for module_name, module in self.patcher.model.diffusion_model.named_modules():
                if not hasattr(module, "weight_function"):
                    continue
                for kind in ("weight", "bias"):
                    if getattr(module, kind, None) is not None:
                        name = f"{module_name}.{kind}"
                        self.patcher.add_weight_wrapper(PREFIX + name, _Wrapper(self, name))
            for name, parameter in self.patcher.model.named_parameters():
                if parameter.requires_grad:
                    self._grad_flags[name] = True
                    parameter.requires_grad_(False)
            # The clone shares the parent's patches_uuid; a new one makes load_models_gpu reload the weights
            # instead of reusing a load made without our wrappers.
            self.patcher.patches_uuid = uuid.uuid4()
            if self.gradient_checkpointing:
                self._patch_forwards()
            self._wrapped = True
        memory_required = FREE_EVERY_OTHER_MODEL if free_others else 0
        comfy.model_management.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)
        self._others_freed = self._others_freed or free_others

    def _patch_forwards(self) -> None:
        """Gradient checkpointing of the UNet's outermost blocks, and row-wise feed-forwards."""
        unet = self.patcher.model.diffusion_model
        for block in outermost_blocks(unet):
            self._forward_patches.replace(block, self._checkpointed)
        for module in unet.modules():
            if isinstance(module, comfy.ldm.modules.attention.BasicTransformerBlock):
                self._forward_patches.replace(module.ff, row_wise)

    def _checkpointed(self, forward):
        """``forward`` under non-reentrant gradient checkpointing when gradients are on: its activations are
        recomputed in backward, with the delta as it was in the forward (attached, on or off) whenever backward
        runs. Without gradients it just runs."""

        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            delta = self.active_delta
            enabled = delta is not None and delta.enabled

            def as_in_the_forward(*args):
                with self._delta_as(delta, enabled):
                    return forward(*args, **kwargs)

            return torch.utils.checkpoint.checkpoint(as_in_the_forward, *args, use_reentrant=False)

        return run

    @contextmanager
    def _delta_as(self, delta: TrainableDelta | None, enabled: bool):
        """``delta`` attached (or none) and switched on or off, for the duration of a block."""
        previous, self.active_delta = self.active_delta, delta
        try:
            if delta is None:
                yield
            else:
                with delta.switched(enabled):
                    yield
        finally:
            self.active_delta = previous

    def release(self) -> None:
        """Unload the training clone, take the wrappers and forward patches off the shared modules, free the memory."""
        self.active_delta = None
        self._forward_patches.undo()
        try:
            loaded = comfy.model_management.current_loaded_models
            for index in reversed(range(len(loaded))):
                if loaded[index].model is self.patcher:
                    loaded.pop(index).model_unload()
        except Exception as error:  # never let cleanup hide the real outcome
            logging.warning("ESD: could not unload the training model cleanly: %s", error)
        for module in self.patcher.model.modules():
            for attribute in ("weight_function", "bias_function"):
                functions = module.__dict__.get(attribute)
                if functions:
                    module.__dict__[attribute] = [f for f in functions if not isinstance(f, _Wrapper)]
        self.patcher.weight_wrapper_patches = {}
        parameters = dict(self.patcher.model.named_parameters())
        try:
            with torch.inference_mode(any(p.is_inference() for p in parameters.values())):
                for name in self._grad_flags:  # put the flags back as they were (ComfyUI's weights are inference tensors)
                    if name in parameters:
                        parameters[name].requires_grad_(True)
        except RuntimeError as error:
            logging.warning("ESD: could not restore requires_grad on the model's weights: %s", error)
        self._grad_flags = {}
        comfy.model_management.soft_empty_cache()
