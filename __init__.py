"""ESD concept erasure for ComfyUI: the pack's entry point (ComfyUI imports custom_nodes/<pack>/__init__.py).

Nodes: Train Concept Erasure (ESD) and Erasure Options (ESD) under "training"; Save Erasure, Apply
Erasure and Load Erased UNet under "loaders". Erasures are kept in models/erasures (add ``erasures:``
in extra_model_paths.yaml for more).
"""

try:
    from comfy_api.latest import io as _v3_io  # noqa: F401
except ImportError as error:
    raise ImportError(
        "The ESD concept erasure nodes need ComfyUI's V3 node API (comfy_api.latest), which this ComfyUI lacks. "
        "Update ComfyUI (tested with 0.3.64)."
    ) from error

from .nodes.erasure_nodes import comfy_entrypoint, register_folders

register_folders()

__all__ = ["comfy_entrypoint"]
