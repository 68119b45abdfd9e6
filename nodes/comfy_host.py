"""The ComfyUI host of the ESD loop: runs the denoiser of a ComfyUI MODEL (a ModelPatcher) for esd_core: the UNet of
an SD1.x/SD2.x/SDXL model (``ComfyErasureHost``), or the transformer of a Flux.1 or SD3.x model (``ComfyFlowHost``).

How the trainable delta reaches the layers: every weighted module of the UNet gets a ModelPatcher weight
wrapper (the mechanism ComfyUI's own trainer uses). ComfyUI's layers then cast a fresh copy of their
weight and pass it through the wrappers on every forward. That copy matters twice: the weights loaded by
ComfyUI are inference tensors, which autograd may not save for backward, and the copy is not one; and the
stored weights are never written to, so the input MODEL is untouched. Selected tensors come back as
``weight + delta`` while the delta is switched on; all others pass through unchanged.

Epsilon from ComfyUI's model: ``apply_model(x, sigma)`` takes k-diffusion inputs ``x = x0 + sigma*eps`` and
returns the denoised x0 for EPS and V-prediction models alike, so ``eps = (x - denoised) / sigma``, with
``x = x_t * sqrt(1 + sigma^2)`` for the DDPM latent ``x_t`` at the 1000-step timestep whose sigma it is.

Velocity from a flow model: ``apply_model(x, sigma)`` takes ``x = x_t`` itself and returns ``denoised = x - sigma v``.
ComfyUI fuses some of a transformer's layers (q, k, v in one ``qkv``; Flux's single blocks' q, k, v and MLP input in
one ``linear1``), so there the delta is kept per layer as diffusers names it, the names erasure files use, and each
fused tensor gets the deltas of its slices stacked (``transformer_pieces``, from ComfyUI's own name map).

Memory, with ``gradient_checkpointing`` (as ComfyUI's own trainer): the UNet's outermost blocks recompute their
activations in backward, and each transformer block's feed-forward runs one batch row at a time. Both replace
``forward`` on modules the input MODEL shares, so ``release()`` puts every one back.
"""

import logging
import uuid
from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
import torch.utils.checkpoint

import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.utils

from ..esd_core.apply import flow_family
from ..esd_core.erasure_file import model_family
from ..esd_core.flow_host import FlowMatching, euler_scheduler
from ..esd_core.host import ErasureHost
from ..esd_core.keys import TransformerLayout, UnetLayout
from ..esd_core.methods import layer_tensors
from ..esd_core.trainable import TrainableDelta

PREFIX = "diffusion_model."
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}  # and 1024 for Flux.1 and SD3.x
FLOW_MODELS = (comfy.model_base.Flux, comfy.model_base.SD3)  # exactly these classes: Chroma, a Flux subclass, has other layers
# load_models_gpu's memory_required before training: more than any device has, so ComfyUI unloads every other model.
FREE_EVERY_OTHER_MODEL = 1e20
# Containers: their own forward is not what the UNet calls (it iterates over them), so their children are patched.
CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


class Piece(NamedTuple):
    """The part of a ComfyUI tensor that one erasure tensor is: all of it, or rows ``offset`` = (dim, start, size)
    of it; ``function`` turns the erasure tensor's layout into ComfyUI's (a swap of halves), None for the same."""

    name: str
    offset: tuple[int, int, int] | None = None
    function: Callable | None = None


class _Wrapper:
    """A weight wrapper that adds the host's active delta to one ComfyUI tensor (the deltas of its pieces, stacked),
    or returns the weight as it came."""

    def __init__(self, host: "ComfyErasureHost", pieces: list[Piece]):
        self.host = host
        self.pieces = sorted(pieces, key=lambda piece: piece.offset[1] if piece.offset else 0)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.host.active_delta
        if delta is None or not delta.enabled or not any(piece.name in delta.shapes for piece in self.pieces):
            return weight
        parts = []
        for piece in self.pieces:
            part = delta.delta(piece.name) if piece.name in delta.shapes else weight.new_zeros(piece.offset[2], *weight.shape[1:])
            parts.append(piece.function(part) if piece.function else part)
        change = parts[0] if len(parts) == 1 else torch.cat(parts)
        return weight + change.to(device=weight.device, dtype=weight.dtype)


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


def is_flow(model) -> bool:
    """Whether a MODEL is a Flux.1 or SD3.x flow-matching transformer."""
    return type(model.model) in FLOW_MODELS


def is_flux(model) -> bool:
    return type(model.model) is comfy.model_base.Flux


def family_of(model) -> str:
    """The base-model family of a ComfyUI MODEL, in esd_core's words ("sd1", "sd2", "sdxl", "flux-dev", "sd3", ...)."""
    config = model.model.model_config.unet_config
    if is_flux(model):
        return flow_family("flux-dev" if config.get("guidance_embed") else "flux-schnell", config["hidden_size"], config["context_in_dim"])
    if is_flow(model):
        text_width = config.get("context_embedder_config", {}).get("params", {}).get("in_features", 0)
        return flow_family("sd3", 64 * config["depth"], text_width, config["patch_size"])
    return model_family(int(config.get("context_dim") or 0), is_sdxl(model))


def default_resolution(model) -> int:
    if is_flow(model):
        return 1024
    family = family_of(model)
    if family == "sd2" and model.model.model_type != comfy.model_base.ModelType.V_PREDICTION:
        return 512  # SD2.x base (512px, eps); 768 is for the v-prediction models
    return DEFAULT_RESOLUTION.get(family, 512)


def model_layout(model) -> UnetLayout:
    """A MODEL's names in the spellings erasure files use: for a UNet both (diffusers and ldm), from ComfyUI's own
    diffusers -> ldm map (the one its LoRA loader uses); for a transformer the diffusers names."""
    if is_flow(model):
        return TransformerLayout(transformer_pieces(model))
    return UnetLayout(comfy.utils.unet_to_diffusers(model.model.model_config.unet_config))


def transformer_pieces(model) -> dict[str, tuple[str, Piece]]:
    """A Flux or SD3 MODEL's layer weights by diffusers name -> (ComfyUI tensor name, the piece of it they are), from
    ComfyUI's own diffusers -> ComfyUI map (the one its LoRA loader applies ``transformer.*`` keys with)."""
    config = model.model.model_config.unet_config
    key_map = (comfy.utils.flux_to_diffusers if is_flux(model) else comfy.utils.mmdit_to_diffusers)(config)
    layers = layer_tensors(model.model.diffusion_model)
    pieces = {}
    for name, target in key_map.items():
        comfy_name, *where = (target,) if isinstance(target, str) else target
        if name.endswith(".weight") and comfy_name in layers:
            pieces[name] = (comfy_name, Piece(name, *where))
    return pieces


def unet_tensors(model) -> dict[str, torch.Tensor]:
    """Every state-dict tensor of a MODEL's denoiser by the name erasures use: ldm name (no ``diffusion_model.``
    prefix) for a UNet, diffusers name for a transformer's layer weights (a view of the slice a fused tensor holds,
    in diffusers' layout); no copies."""
    tensors = {k[len(PREFIX):]: v for k, v in model.model.state_dict().items() if k.startswith(PREFIX)}
    if not is_flow(model):
        return tensors
    views = {}
    for name, (comfy_name, piece) in transformer_pieces(model).items():
        tensor = tensors[comfy_name] if piece.offset is None else tensors[comfy_name].narrow(*piece.offset)
        views[name] = piece.function(tensor) if piece.function else tensor  # the only function, a swap of halves, undoes itself
    return views


def check_supported(model) -> None:
    """Refuse models the ESD loop cannot drive, naming what is supported."""
    if not hasattr(model, "model") or not hasattr(model.model, "diffusion_model"):
        raise ValueError("The MODEL input is not a diffusion model. Connect the MODEL output of a checkpoint loader.")
    sampling = model.get_model_object("model_sampling")
    if is_flow(model):
        if not isinstance(sampling, comfy.model_sampling.CONST):
            raise ValueError(f"This {type(model.model).__name__} model's sampling ({type(sampling).__name__}) is not flow "
                             "matching; ESD runs Flux.1 and SD3.x as they are trained. Remove the node that changed it.")
        return
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or len(sampling.sigmas) != 1000:
        raise ValueError(
            f"ESD needs a Stable Diffusion UNet (1.x, 2.x, SDXL) or a Flux.1 / SD3.x transformer; this model "
            f"({type(model.model).__name__}) is another kind. Load one of those."
        )
    if model.model.model_type not in (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION):
        raise ValueError(f"Unsupported prediction type {model.model.model_type}; ESD supports eps and v-prediction models.")


class ComfyErasureHost(ErasureHost):
    """ErasureHost over a ComfyUI MODEL. Works on a clone; the input MODEL and its weights are never changed.

    Use it inside ``torch.inference_mode(False)``, and call ``release()`` when done (also on errors).
    """

    block_inputs_change_in_place = False  # whether the denoiser's blocks add to their inputs in place

    def __init__(self, model, clip, resolution: int = 0, gradient_checkpointing: bool = True):
        check_supported(model)
        if clip is None:
            raise ValueError("A CLIP is needed to encode the concept. Connect the CLIP output of the checkpoint loader.")
        multiple = 16 if is_flow(model) else 8  # flow transformers take 2x2 patches of the 8x-downscaled latents
        if resolution and resolution % multiple:
            raise ValueError(f"resolution must be a multiple of {multiple} for this model, got {resolution}.")
        self.clip = clip
        self.patcher = model.clone()
        self.family = family_of(model)
        self.prediction = "v" if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION else "epsilon"
        self.sdxl = is_sdxl(model)
        self.resolution = int(resolution) or default_resolution(model)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        channels = int(getattr(model.model.latent_format, "latent_channels", 4))
        self.latent_shape = (channels, self.resolution // 8, self.resolution // 8)
        self.model_sampling = self.patcher.get_model_object("model_sampling")
        self.device = self.patcher.load_device
        self.active_delta: TrainableDelta | None = None
        self._wrapped = False
        self._others_freed = False
        self._grad_flags: dict[str, bool] = {}
        self._forward_patches = ForwardPatches()
        self._replaced: list[tuple[torch.nn.Module, str, torch.Tensor]] = []  # (module, name, loaded tensor)
        sigmas = self.model_sampling.sigmas.detach().to("cpu", torch.float64)
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
        timesteps = torch.as_tensor(timestep, device="cpu").reshape(-1).expand(rows)
        if all(c[0].shape == conds[0][0].shape for c in conds):
            return self._predict_batch(x_t, timesteps, conds)
        # prompts of different token lengths cannot share a batch: one row at a time
        return torch.cat([self._predict_batch(x_t[i : i + 1], timesteps[i : i + 1], [c]) for i, c in enumerate(conds)])

    # --- internals -----------------------------------------------------------------------------
    def _predict_batch(self, x_t: torch.Tensor, timesteps: torch.Tensor, conds: list) -> torch.Tensor:
        """eps = (x - denoised) / sigma, with x = x_t * sqrt(1 + sigma^2) the k-diffusion input at the row's timestep."""
        sigma64 = self._sigmas[timesteps.long()]
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
        first_load = not self._wrapped
        if first_load:
            pieces_by_tensor = self._pieces_by_tensor()
            for name, pieces in pieces_by_tensor.items():
                self.patcher.add_weight_wrapper(PREFIX + name, _Wrapper(self, pieces))
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
        if first_load:
            self._copy_unwrapped_tensors(set(pieces_by_tensor))

    def _copy_unwrapped_tensors(self, wrapped: set[str]) -> None:
        """Replace the loaded inference tensors that no wrapper (``wrapped``: the tensors with one) hands over as a
        copy (a Flux norm's ``scale``, SD3's position table) with ordinary copies for the training, since autograd
        cannot save inference tensors; ``release()`` puts the loaded ones back."""
        for module_name, module in self.patcher.model.diffusion_model.named_modules():
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor.is_inference() and f"{module_name}.{name}".lstrip(".") not in wrapped:
                    copy = tensor.clone()
                    if name in module._parameters:
                        module._parameters[name] = torch.nn.Parameter(copy, requires_grad=False)
                    else:
                        module._buffers[name] = copy
                    self._replaced.append((module, name, tensor))

    def _pieces_by_tensor(self) -> dict[str, list[Piece]]:
        """Every ComfyUI tensor the delta may reach (those of ComfyUI's layers, which take weight wrappers), with the
        erasure tensors it is made of: for a UNet, itself."""
        return {name: [Piece(name)] for name in self._wrappable()}

    def _wrappable(self) -> list[str]:
        names = []
        for module_name, module in self.patcher.model.diffusion_model.named_modules():
            if hasattr(module, "weight_function"):
                names += [f"{module_name}.{kind}" for kind in ("weight", "bias") if getattr(module, kind, None) is not None]
        return names

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
                    if self.block_inputs_change_in_place:  # work on copies, so the recomputation sees what the forward saw
                        args = [a.clone() if torch.is_tensor(a) else a for a in args]
                        return forward(*args, **{k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
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
        while self._replaced:
            module, name, loaded = self._replaced.pop()
            (module._parameters if name in module._parameters else module._buffers)[name] = loaded
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


class ComfyFlowHost(FlowMatching, ComfyErasureHost):
    """ErasureHost over a Flux.1 or SD3.x MODEL: velocity predictions, Euler on the MODEL's own shifted sigmas, and
    Flux.1-dev's distilled ``guidance`` as an input of every prediction. Its erasure names the transformer's layer
    weights as diffusers does (``transformer_pieces``)."""

    alphas_cumprod = ErasureHost.alphas_cumprod  # flow models have no DDPM schedule
    block_inputs_change_in_place = True  # ComfyUI's Flux blocks do (``img += ...``)

    def __init__(self, model, clip, resolution: int = 0, gradient_checkpointing: bool = True, guidance: float = 3.5):
        super().__init__(model, clip, resolution, gradient_checkpointing)
        self.prediction = "flow"
        self.is_flux = is_flux(model)
        self.distilled_guidance = guidance if self.is_flux and model.model.model_config.unet_config.get("guidance_embed") else None

    def layer_tensors(self) -> dict[str, torch.Tensor]:
        self._load()
        return unet_tensors(self.patcher)

    def encode(self, text: str):
        with torch.no_grad():
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
        return cond.detach().clone(), pooled.detach().clone()

    def sampling_scheduler(self, steps: int):
        """Euler on the sigmas ComfyUI samples this MODEL with (its "simple" schedule): the MODEL's own sigma at
        evenly spaced times, shifted as its model sampling says (which a ModelSamplingFlux/SD3 node may have set)."""
        sigmas = [float(self.model_sampling.percent_to_sigma(step / steps)) for step in range(steps)]
        return euler_scheduler({"shift": 1.0}, steps, self.device, sigmas=sigmas)

    def _predict_batch(self, x_t: torch.Tensor, timesteps: torch.Tensor, conds: list) -> torch.Tensor:
        """v = (x - denoised) / sigma, with x = x_t and sigma = timestep / 1000 (the Euler scheduler's timesteps)."""
        sigma = (timesteps.to(torch.float64) / 1000).to(self.device, torch.float32)
        kwargs = {"y": torch.cat([c[1].to(self.device) for c in conds])}
        if self.distilled_guidance is not None:
            kwargs["guidance"] = torch.full((len(conds),), float(self.distilled_guidance), device=self.device)
        context = torch.cat([c[0].to(self.device) for c in conds])
        denoised = self.patcher.model.apply_model(x_t, sigma, c_crossattn=context, **kwargs)
        return ((x_t - denoised.float()) / sigma.view(-1, 1, 1, 1)).float()

    def _pieces_by_tensor(self) -> dict[str, list[Piece]]:
        """ComfyUI's transformer tensors with the diffusers-named layers each holds (q, k and v of a fused qkv); the
        others (norms, biases) hold none, and are wrapped only so that ComfyUI hands their forward a copy, not the
        inference tensor it loaded, which autograd could not save."""
        grouped = {name: [] for name in self._wrappable()}
        for comfy_name, piece in transformer_pieces(self.patcher).values():
            if comfy_name in grouped:
                grouped[comfy_name].append(piece)
        return grouped


def erasure_host(model, clip, resolution: int = 0, gradient_checkpointing: bool = True, guidance: float = 3.5) -> ComfyErasureHost:
    """The host for a MODEL: ``ComfyFlowHost`` for Flux.1 and SD3.x (``guidance``: Flux.1-dev's distilled guidance),
    ``ComfyErasureHost`` for Stable Diffusion UNets."""
    if hasattr(model, "model") and is_flow(model):
        return ComfyFlowHost(model, clip, resolution, gradient_checkpointing, guidance)
    return ComfyErasureHost(model, clip, resolution, gradient_checkpointing)
