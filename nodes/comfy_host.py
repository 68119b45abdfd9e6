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
"""

import logging
import uuid
from contextlib import contextmanager

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_sampling

from ..esd_core.erasure_file import model_family
from ..esd_core.host import ErasureHost
from ..esd_core.methods import layer_tensors
from ..esd_core.trainable import TrainableDelta

PREFIX = "diffusion_model."
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}


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
            f"this model ({type(model.model).__name__}) has another kind. Load an SD1.x, SD2.x or SDXL checkpoint."
        )
    if model.model.model_type not in (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION):
        raise ValueError(f"Unsupported prediction type {model.model.model_type}; ESD supports eps and v-prediction models.")


class ComfyErasureHost(ErasureHost):
    """ErasureHost over a ComfyUI MODEL. Works on a clone; the input MODEL and its weights are never changed.

    Use it inside ``torch.inference_mode(False)``, and call ``release()`` when done (also on errors).
    """

    def __init__(self, model, clip, resolution: int = 0):
        check_supported(model)
        if clip is None:
            raise ValueError("A CLIP is needed to encode the concept. Connect the CLIP output of the checkpoint loader.")
        if resolution and resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}.")
        self.clip = clip
        self.patcher = model.clone()
        self.family = family_of(model)
        self.sdxl = is_sdxl(model)
        self.resolution = int(resolution) or default_resolution(model)
        channels = int(getattr(model.model.latent_format, "latent_channels", 4))
        self.latent_shape = (channels, self.resolution // 8, self.resolution // 8)
        self.device = self.patcher.load_device
        self.active_delta: TrainableDelta | None = None
        self._wrapped = False
        self._grad_flags: dict[str, bool] = {}
        sigmas = self.patcher.get_model_object("model_sampling").sigmas.detach().to("cpu", torch.float64)
        self._sigmas = sigmas
        self._alphas_cumprod = (1.0 / (1.0 + sigmas**2)).float()

    # --- ErasureHost --------------------------------------------------------------------------
    def layer_tensors(self) -> dict[str, torch.Tensor]:
        self._load()
        return layer_tensors(self.patcher.model.diffusion_model)

    def ldm_name(self, name: str) -> str:
        return name

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

    def predict_eps(self, x_t: torch.Tensor, timestep, conds: list) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if not self._wrapped:  # first use: wrappers in place and the weights' grad flags off before any forward
            self._load()
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

    def _load(self) -> None:
        """Register the wrappers once, then have ComfyUI load the clone (a fresh load, so they take effect)."""
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
            self._wrapped = True
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)

    def release(self) -> None:
        """Unload the training clone, take the wrappers off the shared modules, and free the memory."""
        self.active_delta = None
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
