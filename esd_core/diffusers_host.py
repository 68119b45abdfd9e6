"""The diffusers hosts: what they share, the Stable Diffusion host (SD1.x, SD2.x, SDXL), and model loading.
(The flow-matching host, for Flux.1 and SD3.x, is in ``flow_host``.)"""

import copy
import json
import math
import os
import warnings
from abc import abstractmethod
from contextlib import contextmanager

import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from torch.nn.utils import parametrize

from .apply import unet_family
from .host import ErasureHost
from .keys import UnetLayout, diffusers_to_ldm_names
from .methods import layer_tensors
from .trainable import TrainableDelta

# The text components a pipeline may have, as (tokenizer, encoder) attribute names.
TOKENIZERS_AND_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# The most bytes of selected weights whose deltas are added to the weights (``DiffusersHost.adds_to_weights``): the
# tiny world's (under 10 MB) are, a full-size UNet's (SD1.5 esd-x: 176 MB) keep the memory-flat output path.
WEIGHT_DELTA_MAX_BYTES = 64 * 2**20

# On the CPU, a UNet with at most this many bytes of weights (the tiny world's: 9 MiB) runs its feed-forwards whole
# (``feed_forwards_row_wise``).
WHOLE_FEED_FORWARD_MAX_BYTES = 64 * 2**20


class PipelineHost(ErasureHost):
    """What the diffusers hosts share: one pipeline's denoiser (``self.denoiser``) and text encoders, frozen on
    the device, the delta attached to the denoiser's layers, prompts checked and encoded. The VAE is not needed."""

    def __init__(self, pipeline: DiffusionPipeline, denoiser: torch.nn.Module, device, gradient_checkpointing: bool):
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.denoiser = denoiser.to(self.device).requires_grad_(False)
        if gradient_checkpointing:  # recompute block activations in backward: less memory, ~30% more time per update
            self.denoiser.enable_gradient_checkpointing()
        for encoder in self._text_encoders():
            encoder.to(self.device).requires_grad_(False)
        self.dtype = self.denoiser.dtype
        self.vae_scale_factor = pipeline.vae_scale_factor

    def latent_size(self, resolution: int | None, multiple: int, native: int) -> int:
        """The latent side for ``resolution`` pixels (``native`` latents when None), which must be a multiple of ``multiple``."""
        if resolution is not None and (resolution <= 0 or resolution % multiple):
            raise ValueError(f"The resolution must be a positive multiple of {multiple} pixels, got {resolution}; "
                             "leave it out for the model's native size.")
        return resolution // self.vae_scale_factor if resolution else native

    def _text_encoders(self):
        return [e for _, name in TOKENIZERS_AND_ENCODERS if (e := getattr(self.pipeline, name, None)) is not None]

    def _tokenizers(self):
        return [t for name, _ in TOKENIZERS_AND_ENCODERS if (t := getattr(self.pipeline, name, None)) is not None]

    def layer_tensors(self) -> dict[str, torch.Tensor]:
        return layer_tensors(self.denoiser)

    @contextmanager
    def attach(self, delta: TrainableDelta):
        """While the delta is on, each selected layer answers as if its weight were ``weight + delta``: added to the
        weight on its way into the layer for a small fp32 model (``adds_to_weights``), else added to its output."""
        with (_added_to_weights if self.adds_to_weights(delta) else _added_to_outputs)(self.denoiser, delta):
            yield

    def adds_to_weights(self, delta: TrainableDelta) -> bool:
        """Whether the delta goes into the weights: only in fp32 (in bf16 a small delta would round away) and only
        when the selected weights are small, since each training pass keeps a ``weight + delta`` copy of them for
        backward. There it is the faster way, since each layer then runs once, not once more (thinly) for its
        delta (the tiny world's erasures: docs/benchmarks.md)."""
        size = sum(math.prod(shape) for shape in delta.shapes.values()) * self.dtype.itemsize
        return self.dtype == torch.float32 and size <= WEIGHT_DELTA_MAX_BYTES

    @torch.no_grad()
    def encode(self, text: str):
        check_known_words(text, self._tokenizers())
        warn_if_truncated(text, self._tokenizers())
        return self._encode_prompt(text)

    @abstractmethod
    def _encode_prompt(self, text: str):
        """The pipeline's own encoding of one prompt: the conditioning tuple ``predict`` takes."""


class DiffusersHost(PipelineHost):
    """One diffusers Stable Diffusion pipeline (SD1.x, SD2.x, SDXL): its UNet and text encoders."""

    def __init__(self, pipeline: DiffusionPipeline, device="cpu", resolution: int | None = None, gradient_checkpointing: bool = False):
        super().__init__(pipeline, pipeline.unet, device, gradient_checkpointing)
        self.unet = self.denoiser
        if feed_forwards_row_wise(self.unet, self.device, gradient_checkpointing):
            _feed_forward_one_row_at_a_time(self.unet)
        latent_size = self.latent_size(resolution, self.vae_scale_factor, self.unet.config.sample_size)
        self.latent_shape = (self.unet.config.in_channels, latent_size, latent_size)
        config = self.unet.config
        self.is_sdxl = config.addition_embed_type == "text_time"
        self.family = unet_family(self.unet)
        self.prediction_type = pipeline.scheduler.config.prediction_type
        self.prediction = "v" if self.prediction_type == "v_prediction" else "epsilon"
        self._alphas_cumprod = _alphas_cumprod(pipeline.scheduler).to(self.device)
        self._ldm_names = diffusers_to_ldm_names(self.unet.state_dict().keys(), dict(config))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def ldm_name(self, name: str) -> str:
        return self._ldm_names[name]

    @property
    def layout(self) -> UnetLayout:
        return UnetLayout(self._ldm_names)

    def token_tables(self) -> list[torch.Tensor]:
        return [encoder.get_input_embeddings().weight for encoder in self._text_encoders()]

    def encode_with_token(self, text: str, token: str, vectors: list[torch.Tensor]):
        with learned_token(self.pipeline, token, vectors):
            return self._encode_prompt(text)

    def _encode_prompt(self, text: str):
        """The pipeline's own prompt encoding: (embeds, pooled) for SDXL, (embeds, None) for SD1/SD2."""
        if self.is_sdxl:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(text, device=self.device, do_classifier_free_guidance=False)
            return embeds, pooled
        embeds, _ = self.pipeline.encode_prompt(text, self.device, 1, False)
        return embeds, None

    def predict(self, x_t: torch.Tensor, timestep, conds: list) -> torch.Tensor:
        batch = len(conds)
        sample = x_t.to(self.device, self.dtype).expand(batch, -1, -1, -1)
        timesteps = torch.as_tensor(timestep, device=self.device).expand(batch)
        hidden = torch.cat([embeds for embeds, _ in conds]).to(self.dtype)
        extra = {}
        if self.is_sdxl:
            height, width = (size * self.vae_scale_factor for size in self.latent_shape[1:])
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.cat([pooled for _, pooled in conds]).to(self.dtype),
                "time_ids": time_ids.expand(batch, -1),
            }
        with parametrize.cached():  # a weight the delta is added to is computed once per pass, not at every read
            output = self.unet(sample, timesteps, encoder_hidden_states=hidden, **extra).sample.float()
        if self.prediction_type == "v_prediction":
            alpha = self._alphas_cumprod[timesteps].view(-1, 1, 1, 1)
            return alpha.sqrt() * output + (1 - alpha).sqrt() * x_t.to(self.device).float()
        if self.prediction_type != "epsilon":
            raise ValueError(f"Models predicting {self.prediction_type!r} are not supported; use an epsilon or v-prediction model.")
        return output


@contextmanager
def learned_token(pipeline: DiffusionPipeline, token: str, vectors: list[torch.Tensor]):
    """Inside the block the pipeline reads ``token`` as one new word whose embedding in each text encoder is that
    encoder's vector of ``vectors``: its tokenizers are swapped for copies that know the word, and hooks put the
    vector where the word stands. The encoders and the pipeline's own tokenizers are left as they were."""
    pairs = [(t, e) for t, e in TOKENIZERS_AND_ENCODERS if getattr(pipeline, e, None) is not None]
    saved, handles = {}, []
    try:
        for (tokenizer_name, encoder_name), vector in zip(pairs, vectors, strict=True):
            tokenizer = copy.deepcopy(getattr(pipeline, tokenizer_name))
            tokenizer.add_tokens([token])
            saved[tokenizer_name] = getattr(pipeline, tokenizer_name)
            setattr(pipeline, tokenizer_name, tokenizer)
            handles += _token_hooks(getattr(pipeline, encoder_name), tokenizer.convert_tokens_to_ids(token), tokenizer.bos_token_id, vector)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, tokenizer in saved.items():
            setattr(pipeline, name, tokenizer)


def _token_hooks(encoder, token_id: int, stand_in: int, vector: torch.Tensor) -> list:
    """Hooks on a CLIP text encoder: its transformer reads ``token_id`` (outside its vocabulary) as ``stand_in``, an id
    it knows below the end token (which keeps the pooled output at the end token), and the token-embedding layer
    answers ``vector`` at those places."""
    places = {}

    def swap_ids(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        places["mask"] = (ids == token_id).unsqueeze(-1)
        swapped = ids.masked_fill(ids == token_id, stand_in)
        return ((), {**kwargs, "input_ids": swapped}) if "input_ids" in kwargs else ((swapped, *args[1:]), kwargs)

    def put_vector(module, args, output):
        return torch.where(places["mask"].to(output.device), vector.to(output.device, output.dtype), output)

    transformer = getattr(encoder, "text_model", encoder)  # the module that reads the ids (with a projection: inside it)
    return [transformer.register_forward_pre_hook(swap_ids, with_kwargs=True),
            encoder.get_input_embeddings().register_forward_hook(put_vector)]


@contextmanager
def _added_to_outputs(unet, delta: TrainableDelta):
    """Forward hooks add each changed layer's delta contribution to its output while the delta is on: no
    full-size copy of any weight, and no small delta lost to bf16 rounding."""
    modules = dict(unet.named_modules())
    handles = []
    try:
        for prefix in sorted({name.rsplit(".", 1)[0] for name in delta.names}):
            module = modules[prefix]
            if getattr(module, "groups", 1) != 1 and any(n.startswith(prefix + ".") for n in delta.factors):
                raise ValueError(f"Low-rank deltas do not support the grouped convolution {prefix!r}; use --rank 0.")
            handles.append(module.register_forward_hook(_output_hook(delta, prefix)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _output_hook(delta: TrainableDelta, prefix: str):
    def hook(module, inputs, output):
        return output + delta.output_change(module, prefix, inputs[0]) if delta.enabled else output

    return hook


@contextmanager
def _added_to_weights(unet, delta: TrainableDelta):
    """torch's parametrizations make each selected tensor read as ``delta.added_to`` it (computed once per UNet
    pass under ``predict``'s cache, and again when gradient checkpointing recomputes a block in backward);
    removed afterwards, which leaves the original tensors in place."""
    modules = dict(unet.named_modules())
    added = []
    try:
        for name in delta.names:
            prefix, tensor_name = name.rsplit(".", 1)
            parametrize.register_parametrization(modules[prefix], tensor_name, _AddedDelta(delta, name), unsafe=True)
            added.append((modules[prefix], tensor_name))
        yield
    finally:
        for module, tensor_name in added:
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)


class _AddedDelta(torch.nn.Module):
    """One tensor's parametrization: the tensor plus its delta while the delta is on, else the tensor itself."""

    def __init__(self, delta: TrainableDelta, name: str):
        super().__init__()
        self.delta, self.name = delta, name

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.delta.added_to(self.name, tensor)


def feed_forwards_row_wise(unet, device: torch.device, gradient_checkpointing: bool) -> bool:
    """Whether each feed-forward runs one row at a time, which saves memory but costs time: 13% on an H200 (200
    esd-x updates of an SD1.5 UNet at 512x512: 39.5 s against 34.8 s) and 6-22% of the tiny world's erasure on 2 CPU
    threads (docs/benchmarks.md). So a GPU does only in the memory-saving mode, with gradient checkpointing,
    and the CPU for a UNet over ``WHOLE_FEED_FORWARD_MAX_BYTES`` of weights (SD1.5: 3.3 GiB in fp32), whose many-row
    sampling passes would otherwise set the peak. (The weights' size stands in for the activations', which holds
    at a UNet's own resolution.)"""
    weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    return gradient_checkpointing or (device.type == "cpu" and weight_bytes > WHOLE_FEED_FORWARD_MAX_BYTES)


def _feed_forward_one_row_at_a_time(unet) -> None:
    """Each feed-forward's 8x-wide hidden layer, otherwise the largest transient of a many-row sampling pass, is
    computed one row at a time: less memory, the same outputs up to float rounding."""
    for block in unet.modules():
        if hasattr(block, "set_chunk_feed_forward"):
            block.set_chunk_feed_forward(1, dim=0)


def _alphas_cumprod(scheduler) -> torch.Tensor:
    """The training noise schedule, from whichever scheduler the pipeline ships."""
    if hasattr(scheduler, "alphas_cumprod"):
        return scheduler.alphas_cumprod.float()
    raise ValueError(f"The pipeline's scheduler {type(scheduler).__name__} has no alphas_cumprod; use a DDPM-family scheduler config.")


def check_known_words(text: str, tokenizers) -> None:
    """Refuse a text of which a tokenizer knows no word (possible with a small vocabulary such as the tiny world's):
    the text encoder would read it as the empty prompt, which an erasure must not touch."""
    for tokenizer in tokenizers:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if text.strip() and all(i == tokenizer.unk_token_id for i in ids):
            raise ValueError(f"The text encoder knows no word of {text!r}, so it would read it as the empty prompt. "
                             "Use words it knows (the tiny world knows its shapes and colours, their synonyms, a, shape, plain and striped).")


def warn_if_truncated(text: str, tokenizers) -> None:
    """Warn, naming the words that will be ignored, when a prompt is longer than the text encoder reads."""
    for tokenizer in tokenizers:
        ids = tokenizer(text, truncation=False, add_special_tokens=True).input_ids
        limit = tokenizer.model_max_length
        if len(ids) > limit:
            cut = tokenizer.decode(ids[limit - 1 : -1])
            warnings.warn(f"The concept {text!r} is longer than the text encoder's {limit} tokens; this part is ignored: {cut!r}. Shorten it.")
            return


def load_pipeline(path: str, config: str | None = None, dtype: torch.dtype = torch.float32, with_vae: bool = True) -> DiffusionPipeline:
    """Load a diffusers model folder, or a single-file checkpoint (``config``: a diffusers folder of its family).

    Erasing never decodes images, so ``with_vae=False`` lets a checkpoint without VAE weights load.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"No model at {path!r}. Give a diffusers model folder or a .safetensors/.ckpt checkpoint.")
    if os.path.isdir(path):
        if config:
            raise ValueError(f"--config is only for a single-file checkpoint, and {path!r} is a folder; leave --config out.")
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(f"{path!r} is a folder without model_index.json, so not a diffusers pipeline folder.")
        try:
            kwargs = {name: None for name in _absent_components(path)}  # e.g. an SD3 saved without its T5 encoder
            if _pipeline_class(path) is StableDiffusionPipeline:
                kwargs.update(safety_checker=None, requires_safety_checker=False)
            return DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
        except Exception as error:
            raise ValueError(f"Could not load the model folder {path!r} (a damaged or missing file in it?): {error}") from error
    if not path.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise ValueError(f"{path!r} is neither a diffusers folder nor a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)}).")
    if config and not os.path.isfile(os.path.join(config, "model_index.json")):
        raise ValueError(f"The config {config!r} is not a diffusers model folder (it has no model_index.json).")
    pipeline_class = _pipeline_class(config) if config else StableDiffusionPipeline
    kwargs = {} if with_vae else {"vae": None}
    try:
        return pipeline_class.from_single_file(path, config=config, dtype=dtype, local_files_only=True, **kwargs)
    except Exception as error:
        hint = "" if config else " Single-file loading needs the model's config offline: add --config with a diffusers folder of the same family."
        raise ValueError(f"Could not load the checkpoint {path!r}: {error}.{hint}") from error


def _model_index(folder: str) -> dict:
    with open(os.path.join(folder, "model_index.json")) as handle:
        return json.load(handle)


def _absent_components(folder: str) -> list[str]:
    """The components a folder's model_index.json marks as saved without (``[null, null]``), which diffusers only
    loads as absent when told so."""
    return [name for name, value in _model_index(folder).items() if value == [None, None]]


def _pipeline_class(folder: str):
    """The pipeline class a diffusers folder's model_index.json names (SD, SDXL, Flux or SD3), SD for any other."""
    name = _model_index(folder).get("_class_name", "")
    known = {"StableDiffusionXLPipeline": StableDiffusionXLPipeline, "FluxPipeline": FluxPipeline,
             "StableDiffusion3Pipeline": StableDiffusion3Pipeline}
    return known.get(name, StableDiffusionXLPipeline if "XL" in name else StableDiffusionPipeline)


def host_for(pipeline: DiffusionPipeline, device="cpu", resolution: int | None = None, gradient_checkpointing: bool = False,
             guidance: float = 3.5) -> PipelineHost:
    """The host for a loaded pipeline: the flow-matching host for one with a transformer (Flux.1, SD3.x; ``guidance``
    is Flux.1-dev's distilled guidance), the Stable Diffusion host for one with a UNet."""
    if getattr(pipeline, "transformer", None) is not None:
        from .flow_host import FlowDiffusersHost  # it builds on this module

        return FlowDiffusersHost(pipeline, device, resolution, gradient_checkpointing, guidance)
    return DiffusersHost(pipeline, device, resolution, gradient_checkpointing)
