"""The ComfyUI nodes of the pack (V3 schema): train an erasure, save it, apply it, load erased UNet weights.

The training node's inputs, and the options node's, are made from the option spec (``esd_core/options.py``).

Every node leaves its input MODEL untouched: it returns a clone carrying patches, which ComfyUI applies when
the model is loaded and takes off bit-exactly afterwards.
"""

import logging
import math
import os
import re

import torch
from typing_extensions import override

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import ComfyExtension, io

from ..esd_core.config import EraseConfig
from ..esd_core.erasure_file import DamagedErasureError, ErasureDelta, LowRank, file_key, fingerprint, key_prefix
from ..esd_core.lora_format import layer_tensors, save_erasure
from ..esd_core.esd import NonFiniteLossError, erase
from ..esd_core.options import COMMAND_LINE, DTYPES, ERASE_NODE, OPTIONS, OPTIONS_NODE, SAVE_NODE, BY_NAME, Option, defaults, shown_on
from .comfy_host import PREFIX, erasure_host, family_of, is_flow, is_sdxl, model_layout, unet_tensors
from .loss_plot import loss_curve_image
from .unet_files import UnetFileError, diffusers_config, load_unet_weights

TRAINING = "training"  # ComfyUI's own training nodes' category
LOADERS = "loaders"  # and its loaders', where saving and applying an erasure sit with the LoRA nodes
FOLDER = "erasures"
SAVE_FOLDERS = (FOLDER, "loras")
NO_FILE = "none"
FINGERPRINT_LIMIT = 100_000_000  # values; above this Apply skips the "trained on other weights" check
Erasure = io.Custom("ERASURE")
ErasureOptions = io.Custom("ESD_OPTIONS")

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


def delta_patches(model, delta: ErasureDelta) -> dict:
    """ModelPatcher patches that add the delta to the weights, made by ComfyUI's own LoRA loader from the delta in
    the keys of its files (``diffusion_model.<layer>``, or ``transformer.<diffusers layer>`` for Flux and SD3, which
    the loader maps onto its fused layers; + ``.lora_up.weight``/``.lora_down.weight``/``.alpha`` for a low-rank
    delta, ``.diff``/``.diff_b`` for a full one): so an erasure patches a model as a LoRA file of it would."""
    prefix, state = key_prefix(delta.family), {}
    for name, stored in delta.deltas.items():
        if isinstance(stored, LowRank):
            state |= layer_tensors(prefix + name.rsplit(".", 1)[0], stored, stored.rank)
        else:
            state[file_key(name, prefix)] = stored
    return comfy.lora.load_lora(state, comfy.lora.model_lora_keys_unet(model.model, {}))


def apply_delta(model, delta: ErasureDelta, strength: float):
    """A clone of ``model`` with the delta patched in at ``strength``; refuses a delta for another model."""
    delta.check_compatible(unet_tensors(model), family_of(model))
    patched = model.clone()
    if strength != 0:
        accepted = patched.add_patches(delta_patches(model, delta), strength)
        if len(accepted) != len(delta.deltas):
            raise ValueError(f"Only {len(accepted)} of the {len(delta.deltas)} tensors of the erasure found their layer.")
    return patched


def node_input(option: Option, **overrides) -> io.Input:
    """The ComfyUI widget of one option of the spec: its type, default, range and help."""
    common = dict(default=option.default, tooltip=option.help) | overrides
    if option.choices:
        return io.Combo.Input(option.input_name, options=list(option.choices), **common)
    if option.kind is bool:
        return io.Boolean.Input(option.input_name, **common)
    if option.kind is str:
        return io.String.Input(option.input_name, multiline=option.multiline, **common)
    bounds = dict(min=option.minimum, max=option.maximum) | ({"step": option.step} if option.step else {})
    if option.kind is int:  # said outright: the frontend gives a "seed" widget a randomize-after-run control otherwise
        return io.Int.Input(option.input_name, **bounds, **({"control_after_generate": False} | common))
    return io.Float.Input(option.input_name, round=False, **bounds, **common)


def settings_of(inputs: dict) -> dict:
    """Node inputs (by input name) as settings (by option name)."""
    by_input = {option.input_name: option.name for option in OPTIONS if option.shown_on != COMMAND_LINE}
    return {by_input[name]: value for name, value in inputs.items() if name in by_input}


def train(model, clip, chosen: dict) -> io.NodeOutput:
    """Train an erasure of ``model`` with the settings ``chosen``; the erased clone, the erasure, its loss curve."""
    config = EraseConfig.from_settings(chosen)
    losses: list[float] = []
    bar = comfy.utils.ProgressBar(config.iterations)

    def progress(iteration: int, loss: float) -> None:
        losses.append(loss)
        bar.update_absolute(iteration + 1, config.iterations)
        comfy.model_management.throw_exception_if_processing_interrupted()

    interrupted = False
    with torch.inference_mode(False):
        host = erasure_host(model, clip, int(chosen["resolution"]), bool(chosen["gradient_checkpointing"]), float(chosen["sample_guidance"]))
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


TRAIN_DESCRIPTION = (
    "Erases a concept from the model by ESD fine-tuning (Gandikota et al., ICCV 2023): the erased model, prompted "
    "with the concept, learns to predict what the original predicts under negative guidance away from it. Returns "
    "the erased MODEL (the input is untouched), the erasure itself and its loss curve."
)
TRAIN_OUTPUTS = [
    io.Model.Output(display_name="MODEL", tooltip="A copy of the input model with the erasure applied."),
    Erasure.Output(display_name="ERASURE", tooltip="The erasure (weight delta + metadata); save it or apply it elsewhere."),
    io.Image.Output(display_name="loss_curve", tooltip="The training loss per iteration."),
]
MODEL_INPUT = io.Model.Input("model", tooltip="The model to erase from. It is not changed; an erased copy is returned.")
CLIP_INPUT = io.Clip.Input("clip", tooltip="The model's text encoder, used to encode the concept and the empty prompt.")


class TrainErasure(io.ComfyNode):
    """What a user decides; every other setting comes from an optional Erasure Options node."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ESDTrainErasure",
            display_name="Train Concept Erasure (ESD)",
            category=TRAINING,
            description=TRAIN_DESCRIPTION,
            inputs=[
                MODEL_INPUT,
                CLIP_INPUT,
                *(node_input(option) for option in shown_on(ERASE_NODE)),
                ErasureOptions.Input("options", optional=True, tooltip="Optional: settings from an 'Erasure Options (ESD)' "
                                     "node. Without it every such setting keeps its default."),
            ],
            outputs=TRAIN_OUTPUTS,
        )

    @classmethod
    def execute(cls, model, clip, options=None, **inputs) -> io.NodeOutput:
        return train(model, clip, defaults() | settings_of(options or {}) | settings_of(inputs))


class EraseOptions(io.ComfyNode):
    """The settings most users leave alone, with the spec's defaults; plugs into Train Concept Erasure."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ESDErasureOptions",
            display_name="Erasure Options (ESD)",
            category=TRAINING,
            description="More settings for 'Train Concept Erasure (ESD)': sampling, rank, preservation, memory. "
            "Connect its output to the training node's options input.",
            inputs=[node_input(option) for option in shown_on(OPTIONS_NODE)],
            outputs=[ErasureOptions.Output(display_name="options", tooltip="Plug into 'Train Concept Erasure (ESD)'.")],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput({option.input_name: inputs[option.input_name] for option in shown_on(OPTIONS_NODE)})


# The first training node, as saved workflows hold it: its widgets in their order (the frontend fills widgets by
# position), the seed with its "control after generate" value, and two settings since removed (their inputs
# remain so that old workflows load; only their "off" values run).
LEGACY_WIDGETS = ("concept", "erase_from", "method", "iterations", "lr", "eta", "sample_steps", "sample_guidance",
                  "sample_with", "mode", "reuse", "rank", "seed", "resolution")
LEGACY_OPTIONAL = ("preserve", "preserve_weight", "trajectories", "batch_size")
LEGACY_OPTIONAL_AFTER_REMOVED = ("preserve_guidance", "hold_unconditional")
REMOVED = {"repair_fraction": 0.0, "orthogonal_push": False}


class EraseConceptLegacy(io.ComfyNode):
    """Kept so that workflows saved with the first training node load and run; hidden from the node menu."""

    @classmethod
    def define_schema(cls):
        removed = "Removed (it did not earn its place); only its off value runs. Use 'Train Concept Erasure (ESD)'."
        return io.Schema(
            node_id="ESDEraseConcept",
            display_name="Erase Concept (Train, old)",
            category=TRAINING,
            description=TRAIN_DESCRIPTION + " Replaced by 'Train Concept Erasure (ESD)'.",
            is_deprecated=True,
            inputs=[
                MODEL_INPUT,
                CLIP_INPUT,
                *(node_input(BY_NAME[name], **({"control_after_generate": True} if name == "seed" else {}))
                  for name in LEGACY_WIDGETS),
                *(node_input(BY_NAME[name], optional=True) for name in LEGACY_OPTIONAL),
                io.Float.Input("repair_fraction", default=0.0, optional=True, min=0.0, max=0.9, tooltip=removed),
                io.Boolean.Input("orthogonal_push", default=False, optional=True, tooltip=removed),
                *(node_input(BY_NAME[name], optional=True) for name in LEGACY_OPTIONAL_AFTER_REMOVED),
            ],
            outputs=TRAIN_OUTPUTS,
        )

    @classmethod
    def execute(cls, model, clip, **inputs) -> io.NodeOutput:
        for name, off in REMOVED.items():
            if inputs.pop(name, off) != off:
                raise ValueError(f"{name} was removed from the pack; set it to {off} in this old node, or replace the node "
                                 "with 'Train Concept Erasure (ESD)'.")
        given = {name: value for name, value in settings_of(inputs).items() if value is not None}  # old prompts may hold blanks
        return train(model, clip, defaults() | given)


class SaveErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ESDSaveErasure",
            display_name="Save Erasure",
            category=LOADERS,
            description="Saves an erasure with its metadata: as a LoRA that ComfyUI's LoRA loaders, A1111, Forge and "
            "diffusers load, or as the exact weight delta. Saved into models/loras, stock LoRA loaders list it.",
            inputs=[
                Erasure.Input("erasure", tooltip="The erasure from 'Train Concept Erasure (ESD)'."),
                io.String.Input(
                    "filename_prefix", default="esd/erasure",
                    tooltip="File name start, relative to the folder; a number and .safetensors are added.",
                ),
                *(node_input(option) for option in shown_on(SAVE_NODE)),
                io.Combo.Input("folder", options=list(SAVE_FOLDERS), default=FOLDER,
                               tooltip="erasures: models/erasures, listed by 'Apply Erasure'. loras: models/loras, "
                               "listed by ComfyUI's LoRA loaders."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, erasure, filename_prefix, folder=FOLDER, **inputs) -> io.NodeOutput:
        if not isinstance(erasure, ErasureDelta):
            raise ValueError("The erasure input must come from 'Train Concept Erasure (ESD)' or 'Apply Erasure'.")
        if folder not in SAVE_FOLDERS:
            raise ValueError(f"folder must be one of {', '.join(SAVE_FOLDERS)}, got {folder!r}.")
        chosen = {option.name: option.default for option in shown_on(SAVE_NODE)} | settings_of(inputs)
        path = next_free_path(folder_paths.get_folder_paths(folder)[0], filename_prefix, folder)
        written = save_erasure(erasure, path, chosen["save_format"], chosen["lora_rank"], DTYPES[chosen["save_dtype"]])
        log.info("ESD: %s", written)
        return io.NodeOutput(path, ui={"text": [written]})


def next_free_path(folder: str, prefix: str, name: str = FOLDER) -> str:
    """``<folder>/<prefix>_00001.safetensors`` with the next unused number; the prefix may not leave the folder
    (called ``models/<name>`` in the error)."""
    prefix = (prefix or "erasure").strip().replace("\\", "/")
    target = os.path.abspath(os.path.join(folder, prefix))
    inside = os.path.commonpath([os.path.abspath(folder), target]) == os.path.abspath(folder)
    if not inside or prefix.endswith("/") or target == os.path.abspath(folder):
        raise ValueError(f"filename_prefix {prefix!r} must name a file inside models/{name}, e.g. 'esd/van_gogh'.")
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
            display_name="Apply Erasure",
            category=LOADERS,
            description="Applies a saved erasure (a delta, or a LoRA made here or elsewhere) to a model as a patch "
            "(no weight copy; composes with LoRAs).",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the erasure to; it is not changed, a patched copy is returned."),
                io.Combo.Input(
                    "erasure_file", options=[NO_FILE] + erasure_files(),
                    tooltip="An erasure file (delta or LoRA) from models/erasures. Ignored when the erasure input is connected.",
                ),
                io.Float.Input(
                    "strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="1 applies the erasure as trained, 0 leaves the model as it is; values between blend.",
                ),
                Erasure.Input("erasure", optional=True, tooltip="Optional: an erasure straight from 'Train Concept Erasure (ESD)'."),
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
                erasure = ErasureDelta.load(path, model_layout(model), family_of(model))
            except DamagedErasureError:
                raise
            except ValueError as error:
                raise ValueError(
                    f"{erasure_file} cannot be applied: {error} Files of full or partial UNet weights load with 'Load Erased UNet'."
                ) from error
        patched = apply_delta(model, erasure, float(strength))
        expected = erasure.metadata.get("base_fingerprint")
        # hashing the base weights is cheap for esd-x sized deltas; for esd-u/esd-all it would cost seconds per run
        if expected and strength != 0 and sum(math.prod(d.shape) for d in erasure.deltas.values()) <= FINGERPRINT_LIMIT:
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
            category=LOADERS,
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
        if is_flow(model):
            raise ValueError("Load Erased UNet takes Stable Diffusion UNet weights; for Flux.1 and SD3.x load the erased "
                             "transformer with ComfyUI's 'Load Diffusion Model', or apply an erasure with 'Apply Erasure'.")
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
        return [TrainErasure, EraseOptions, EraseConceptLegacy, SaveErasure, ApplyErasure, LoadErasedUNet]


async def comfy_entrypoint() -> ErasureExtension:
    register_folders()
    return ErasureExtension()
