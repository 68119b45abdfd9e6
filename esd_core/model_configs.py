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
