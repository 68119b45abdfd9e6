"""The ComfyUI side of the pack. The node classes live in ``erasure_nodes`` (which imports ComfyUI); the
helpers in ``unet_files`` and ``loss_plot`` import no ComfyUI module, so they can be tested without it."""
