"""Full-size UNet configs of the Stable Diffusion families, for building random-weight models (tests, benchmarks).

Only the fields that differ from diffusers' UNet2DConditionModel defaults are listed.
"""

FULL_SIZE_UNET_CONFIGS = {
    "sd1": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(
        sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True
    ),
    "sdxl": dict(
        sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        transformer_layers_per_block=[1, 2, 10], block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}

# The text side of each family: token count, and the pooled embedding size SDXL also conditions on.
TEXT_SHAPES = {"sd1": (77, None), "sd2": (77, None), "sdxl": (77, 1280)}

# SD's training noise schedule (all three families).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# Full-size MMDiT transformer configs of the flow-matching families, as their published transformer/config.json
# files give them (fields that differ from the diffusers class defaults): class name and config.
FULL_SIZE_TRANSFORMER_CONFIGS = {
    "flux-dev": ("FluxTransformer2DModel", dict(guidance_embeds=True)),
    "flux-schnell": ("FluxTransformer2DModel", dict(guidance_embeds=False)),
    "sd3.5-medium": ("SD3Transformer2DModel", dict(
        num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
        qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
    )),
    "sd3.5-large": ("SD3Transformer2DModel", dict(
        num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm",
    )),
}
