"""The ComfyUI nodes of the pack (V3 schema): train an erasure, save it, apply it, load erased UNet weights.

Every node leaves its input MODEL untouched: it returns a clone carrying patches, which ComfyUI applies when
the model is loaded and takes off bit-exactly afterwards.
"""

import logging
import os
import re

import torch
from typing_extensions import override

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import ComfyExtension, io

from ..esd_core.config import MODES, SAMPLE_WITH_CHOICES, EraseConfig
from ..esd_core.erasure_file import SAVE_DTYPES, DamagedErasureError, ErasureDelta, fingerprint
from ..esd_core.esd import NonFiniteLossError, erase
from ..esd_core.methods import TRAIN_METHODS
from .comfy_host import PREFIX, ComfyErasureHost, family_of, is_sdxl, unet_tensors
from .loss_plot import loss_curve_image
from .unet_files import UnetFileError, diffusers_config, load_unet_weights

CATEGORY = "conditioning/erasure"
FOLDER = "erasures"
NO_FILE = "none"
FINGERPRINT_LIMIT = 100_000_000  # values; above this Apply skips the "trained on other weights" check
Erasure = io.Custom("ERASURE")

log = logging.getLogger("esd_erasure")


def register_folders() -> None:
    """models/erasures as a model folder; users may add more with ``erasures:`` in extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | set(folder_paths.supported_pt_extensions))


def erasure_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.lower().endswith(".safetensors")]


def unet_choices() -> list[str]:
    return [f"{FOLDER}/{f}" for f in folder_paths.get_filename_list(FOLDER)] + [
        f"diffusion_models/{f}" for f in folder_paths.get_filename_list("diffusion_models")
    ]


def delta_patches(delta: ErasureDelta) -> dict:
    """ModelPatcher patches (state-dict key -> ("diff", (tensor,))) that add the delta to the weights."""
    return {PREFIX + name: ("diff", (tensor,)) for name, tensor in delta.deltas.items()}


def apply_delta(model, delta: ErasureDelta, strength: float):
    """A clone of ``model`` with the delta patched in at ``strength``; refuses a delta for another model."""
    delta.check_compatible(unet_tensors(model), family_of(model))
    patched = model.clone()
    if strength != 0:
        accepted = patched.add_patches(delta_patches(delta), strength)
        if len(accepted) != len(delta.deltas):
            raise ValueError(f"Only {len(accepted)} of the {len(delta.deltas)} tensors of the erasure found their layer.")
    return patched


class EraseConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ESDEraseConcept",
            display_name="Erase Concept (Train)",
            category=CATEGORY,
            description=(
                "Erases a concept from the model by ESD fine-tuning (Gandikota et al., ICCV 2023): the erased model, "
                "prompted with the concept, learns to predict what the original predicts under negative guidance away "
                "from it. Returns the erased MODEL (the input is untouched), the erasure itself and its loss curve."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to erase from. It is not changed; an erased copy is returned."),
                io.Clip.Input("clip", tooltip="The model's text encoder, used to encode the concept and the empty prompt."),
                io.String.Input(
                    "concept", default="Van Gogh",
                    tooltip="The text to erase, e.g. an artist, a style or an object. Comma-separate several concepts.",
                ),
                io.String.Input(
                    "erase_from", default="",
                    tooltip="Optional: erase the concept only from this text (e.g. erase 'red' from 'car'). "
                    "Empty: the concept itself. One text for all concepts, or one per concept (comma-separated).",
                ),
                io.Combo.Input(
                    "method", options=list(TRAIN_METHODS), default="esd-x",
                    tooltip="Which UNet layers are trained. " + "; ".join(f"{m}: {d}" for m, (d, _) in TRAIN_METHODS.items()),
                ),
                io.Int.Input("iterations", default=1000, min=1, max=100000, tooltip="Training iterations. The paper uses 1000."),
                io.Float.Input(
                    "learning_rate", default=1e-5, min=1e-9, max=1.0, step=1e-6, round=False,
                    tooltip="Adam learning rate. The paper uses 1e-5; esd-x on SDXL often needs more (e.g. 2e-4).",
                ),
                io.Float.Input(
                    "negative_guidance", default=1.0, min=0.0, max=100.0, step=0.1,
                    tooltip="eta in the paper: target = e(from) - eta * (e(concept) - e(empty)). The paper's 1.0 "
                    "equals 2.0 in the 2025 reference script's convention (its eta is this one plus 1).",
                ),
                io.Int.Input(
                    "sample_steps", default=50, min=1, max=999,
                    tooltip="DDIM steps of the schedule that x_t is drawn from; each iteration runs a random number of them. "
                    "A count that divides 1000 (e.g. 50) starts the schedule nearest pure noise.",
                ),
                io.Float.Input(
                    "sample_guidance", default=3.0, min=0.0, max=100.0, step=0.1,
                    tooltip="Classifier-free guidance scale used while sampling x_t. The paper uses 3.0.",
                ),
                io.Combo.Input(
                    "sample_with", options=list(SAMPLE_WITH_CHOICES), default="trained",
                    tooltip="Which model samples x_t: the one being trained (the paper), the frozen original (the diffusers script), "
                    "or mixed: the original for the erased concept, the one being trained for the preserved texts.",
                ),
                io.Combo.Input(
                    "mode", options=list(MODES), default="fast",
                    tooltip="fast: one sampled trajectory serves several updates (same distribution of x_t and t, far "
                    "less sampling); reference: a fresh trajectory for every update, as in the paper.",
                ),
                io.Int.Input(
                    "reuse", default=0, min=0, max=1000,
                    tooltip="fast mode: examples drawn from each sampled trajectory. 0: sample_steps x batch_size / trajectories.",
                ),
                io.Int.Input(
                    "rank", default=0, min=0, max=1024,
                    tooltip="0: full-rank deltas (the paper). r > 0: each matrix delta is a rank-r product, which "
                    "keeps esd-u / esd-all from needing a second UNet's worth of optimizer memory.",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Seed for the concept order, step counts and noise; the same seed gives the same erasure.",
                ),
                io.Int.Input(
                    "resolution", default=0, min=0, max=4096, step=8,
                    tooltip="Image size (pixels) of the samples trained on. 0: the model's own (SD1 512, SD2 768, SDXL 1024); "
                    "smaller is faster.",
                ),
                io.String.Input(
                    "preserve", default="", optional=True, multiline=True,
                    tooltip="Optional: comma-separated texts the erasure must leave as they were (e.g. other artists, "
                    "related objects). Each update then also trains on these texts and the empty prompt, towards the "
                    "original model's predictions.",
                ),
                io.Float.Input(
                    "preserve_weight", default=1.0, optional=True, min=0.0, max=1000.0, step=0.1,
                    tooltip="Weight of the preservation term against the erasure term (0: off).",
                ),
                io.Int.Input(
                    "trajectories", default=8, optional=True, min=1, max=256,
                    tooltip="fast mode: trajectories sampled together in one batched pass (more: more varied x_t).",
                ),
                io.Int.Input(
                    "batch_size", default=1, optional=True, min=1, max=256,
                    tooltip="Examples per update, of the erased texts and again of the preserved ones. The paper uses 1.",
                ),
                io.Float.Input(
                    "repair_fraction", default=0.0, optional=True, min=0.0, max=0.9, step=0.05,
                    tooltip="Share of the iterations, at the end, that train on the preserved texts alone, to pull back "
                    "what drifted with the erasure; check that the concept stays erased (it did for some concepts, not for "
                    "others). Needs texts to preserve. 0: off (the paper).",
                ),
                io.Boolean.Input(
                    "orthogonal_push", default=False, optional=True,
                    tooltip="Push away from the concept only where it differs from the texts to preserve (the part of its "
                    "direction orthogonal to theirs, at full length): spares them more, may erase less. Needs texts to "
                    "preserve. Off: the paper.",
                ),
                io.Float.Input(
                    "preserve_guidance", default=1.0, optional=True, min=1.0, max=30.0, step=0.5,
                    tooltip="Compare each text to preserve on its guided prediction, as a sampler at this guidance "
                    "combines it with the empty prompt's, so that drift guidance would magnify counts as much. 1: the "
                    "plain predictions.",
                ),
                io.Float.Input(
                    "hold_unconditional", default=0.0, optional=True, min=0.0, max=100.0, step=0.5,
                    tooltip="At each erased example, also train the empty prompt's prediction to stay as it was, with "
                    "this weight: otherwise it drifts with the concept's, and classifier-free guidance undoes much of the "
                    "erasure. 0: off (the paper).",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="A copy of the input model with the erasure applied."),
                Erasure.Output(display_name="ERASURE", tooltip="The erasure (weight delta + metadata); save it or apply it elsewhere."),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss per iteration."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concept, method, iterations, learning_rate, negative_guidance, sample_steps,
                sample_guidance, seed, erase_from="", sample_with="trained", mode="fast", reuse=0, rank=0,
                resolution=0, preserve="", preserve_weight=1.0, trajectories=8, batch_size=1, repair_fraction=0.0,
                orthogonal_push=False, preserve_guidance=1.0, hold_unconditional=0.0) -> io.NodeOutput:
        # the defaults serve callers (and saved workflows) from before an input existed
        config = EraseConfig(
            concept=concept, erase_from=erase_from or "", method=method, iterations=int(iterations), lr=float(learning_rate),
            eta=float(negative_guidance), sample_steps=int(sample_steps), sample_guidance=float(sample_guidance),
            sample_with=sample_with or "trained", seed=int(seed), mode=mode or "fast", reuse=int(reuse or 0),
            rank=int(rank or 0), preserve=preserve or "", preserve_weight=float(preserve_weight),
            preserve_guidance=float(preserve_guidance or 1.0), hold_unconditional=float(hold_unconditional or 0.0),
            repair_fraction=float(repair_fraction or 0.0), orthogonal_push=bool(orthogonal_push),
            trajectories=int(trajectories or 8), batch_size=int(batch_size or 1),
        )
        losses: list[float] = []
        bar = comfy.utils.ProgressBar(config.iterations)

        def progress(iteration: int, loss: float) -> None:
            losses.append(loss)
            bar.update_absolute(iteration + 1, config.iterations)
            comfy.model_management.throw_exception_if_processing_interrupted()

        interrupted = False
        with torch.inference_mode(False):
            host = ComfyErasureHost(model, clip, int(resolution or 0))
            try:
                delta = erase(host, config, progress)
            except comfy.model_management.InterruptProcessingException:
                interrupted = True  # re-raised below, without the training frames (and their tensors) attached
            except NonFiniteLossError as error:
                raise RuntimeError(f"{error} In this node: lower learning_rate.") from error
            finally:
                host.release()
                del host
        if interrupted:
            log.info("ESD: training cancelled after %d of %d iterations; nothing was kept.", len(losses), config.iterations)
            raise comfy.model_management.InterruptProcessingException()
        log.info("ESD: %s done, final loss %.5g", delta.describe(), losses[-1] if losses else float("nan"))
        erased = apply_delta(model, delta, 1.0)
        return io.NodeOutput(erased, delta, loss_curve_image(losses, delta.describe()))


class SaveErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ESDSaveErasure",
            display_name="Save Erasure Delta",
            category=CATEGORY,
            description="Saves an erasure as a .safetensors weight delta (with its metadata) in models/erasures. "
            "The file also loads with LoraLoaderModelOnly.",
            inputs=[
                Erasure.Input("erasure", tooltip="The erasure from 'Erase Concept (Train)'."),
                io.String.Input(
                    "filename_prefix", default="esd/erasure",
                    tooltip="File name start, relative to models/erasures; a number and .safetensors are added.",
                ),
                io.Combo.Input(
                    "dtype", options=list(SAVE_DTYPES), default="fp32",
                    tooltip="Precision of the stored delta. fp32 reproduces the trained model exactly; fp16/bf16 halve the size.",
                ),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, erasure, filename_prefix, dtype="fp32") -> io.NodeOutput:
        if not isinstance(erasure, ErasureDelta):
            raise ValueError("The erasure input must come from 'Erase Concept (Train)' or 'Apply Erasure Delta'.")
        path = next_free_path(folder_paths.get_folder_paths(FOLDER)[0], filename_prefix)
        erasure.save(path, SAVE_DTYPES[dtype or "fp32"])
        log.info("ESD: saved %s to %s", erasure.describe(), path)
        return io.NodeOutput(path, ui={"text": [path]})


def next_free_path(folder: str, prefix: str) -> str:
    """``<folder>/<prefix>_00001.safetensors`` with the next unused number; the prefix may not leave the folder."""
    prefix = (prefix or "erasure").strip().replace("\\", "/")
    target = os.path.abspath(os.path.join(folder, prefix))
    inside = os.path.commonpath([os.path.abspath(folder), target]) == os.path.abspath(folder)
    if not inside or prefix.endswith("/") or target == os.path.abspath(folder):
        raise ValueError(f"filename_prefix {prefix!r} must name a file inside models/{FOLDER}, e.g. 'esd/van_gogh'.")
    directory, stem = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    pattern = re.compile(re.escape(stem) + r"_(\d+)\.safetensors$")
    numbers = [int(m.group(1)) for f in os.listdir(directory) if (m := pattern.match(f))]
    return os.path.join(directory, f"{stem}_{max(numbers, default=0) + 1:05d}.safetensors")


class ApplyErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ESDApplyErasure",
            display_name="Apply Erasure Delta",
            category=CATEGORY,
            description="Applies a saved erasure to a model as a patch (no weight copy; composes with LoRAs).",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the erasure to; it is not changed, a patched copy is returned."),
                io.Combo.Input(
                    "erasure_file", options=[NO_FILE] + erasure_files(),
                    tooltip="A delta file from models/erasures. Ignored when the erasure input is connected.",
                ),
                io.Float.Input(
                    "strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="1 applies the erasure as trained, 0 leaves the model as it is; values between blend.",
                ),
                Erasure.Input("erasure", optional=True, tooltip="Optional: an erasure straight from 'Erase Concept (Train)'."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the erasure applied."),
                Erasure.Output(display_name="ERASURE", tooltip="The erasure that was applied."),
            ],
        )

    @classmethod
    def execute(cls, model, erasure_file, strength, erasure=None) -> io.NodeOutput:
        if erasure is None:
            if not erasure_file or erasure_file == NO_FILE:
                raise ValueError("No erasure given: pick a file in erasure_file (models/erasures) or connect the erasure input.")
            path = folder_paths.get_full_path_or_raise(FOLDER, erasure_file)
            try:
                erasure = ErasureDelta.load(path)
            except DamagedErasureError:
                raise
            except ValueError as error:
                raise ValueError(
                    f"{erasure_file} is not an erasure delta ({error}). Files of full or partial UNet weights load "
                    "with 'Load Erased UNet'."
                ) from error
        patched = apply_delta(model, erasure, float(strength))
        expected = erasure.metadata.get("base_fingerprint")
        # hashing the base weights is cheap for esd-x sized deltas; for esd-u/esd-all it would cost seconds per run
        if expected and strength != 0 and sum(t.numel() for t in erasure.deltas.values()) <= FINGERPRINT_LIMIT:
            base = unet_tensors(model)
            if fingerprint({name: base[name] for name in erasure.deltas}) != expected:
                log.warning("ESD: %s was trained on different base weights than this model's; applying anyway.", erasure.describe())
        return io.NodeOutput(patched, erasure)


class LoadErasedUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ESDLoadErasedUNet",
            display_name="Load Erased UNet",
            category=CATEGORY,
            description=(
                "Replaces the model's UNet weights with erased ones from a file: full or partial state dicts in ldm or "
                "diffusers names, .safetensors or .pt/.ckpt (read with weights_only=True), including the published ESD files."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base model (same architecture as the file); it is not changed."),
                io.Combo.Input(
                    "unet_file", options=unet_choices(),
                    tooltip="Erased UNet weights from models/erasures or models/diffusion_models.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the file's UNet tensors in place of its own."),
                io.String.Output(display_name="report", tooltip="How many tensors were replaced, and the file's layout."),
            ],
        )

    @classmethod
    def execute(cls, model, unet_file) -> io.NodeOutput:
        folder, _, name = (unet_file or "").partition("/")
        if folder not in (FOLDER, "diffusion_models") or not name:
            raise ValueError(f"Pick a file from the list (models/{FOLDER} or models/diffusion_models), got {unet_file!r}.")
        path = folder_paths.get_full_path_or_raise(folder, name)
        unet_config = model.model.model_config.unet_config
        model_tensors = unet_tensors(model)
        # the model's own diffusers names, so a partial file is mapped with the whole layout in view
        reference = [d for d, ldm in comfy.utils.unet_to_diffusers(unet_config).items() if ldm in model_tensors]
        try:
            tensors, naming = load_unet_weights(path, model_tensors, diffusers_config(unet_config, is_sdxl(model)), reference)
        except UnetFileError as error:
            raise ValueError(f"Load Erased UNet: {unet_file}: {error}") from error
        patched = model.clone()
        accepted = patched.add_patches({PREFIX + k: ("set", (v,)) for k, v in tensors.items()}, 1.0)
        report = (
            f"Replaced {len(accepted)} of {len(model_tensors)} UNet tensors with those of {name} ({naming} names, "
            f"{'full' if len(tensors) == len(model_tensors) else 'partial'} state dict)."
        )
        log.info("ESD: %s", report)
        return io.NodeOutput(patched, report, ui={"text": [report]})


class ErasureExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [EraseConcept, SaveErasure, ApplyErasure, LoadErasedUNet]


async def comfy_entrypoint() -> ErasureExtension:
    register_folders()
    return ErasureExtension()
