"""ESD engine: erase a concept from a Stable Diffusion UNet as a weight delta (Gandikota et al., ICCV 2023)."""

__version__ = "0.2.0"
