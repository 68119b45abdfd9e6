"""ESD concept erasure for ComfyUI: the pack's entry point (ComfyUI imports custom_nodes/<pack>/__init__.py).

Nodes (category conditioning/erasure): Erase Concept (Train), Save Erasure Delta, Apply Erasure Delta,
Load Erased UNet. Erasures are kept in models/erasures (add ``erasures:`` in extra_model_paths.yaml for more).
"""

from .nodes.erasure_nodes import comfy_entrypoint, register_folders

register_folders()

__all__ = ["comfy_entrypoint"]
