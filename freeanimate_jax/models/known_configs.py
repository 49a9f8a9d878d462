"""Configs of the released models, for abstract (download-free) instantiation: fit checks on
TPU topologies and parameter counts. Values as published in the hub repos' config.json."""

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

OPENPOSE_CONTROLNET = {
    "_class_name": "ControlNetModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "resnet_time_scale_shift": "default",
    "upcast_attention": False, "use_linear_projection": False,
}

SD15_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
}

SD15_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
    "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 49408,
}

SD15_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}


def _motion_adapter(positions: int, mid_block: bool) -> dict:
    return {"_class_name": "MotionAdapter", "block_out_channels": [320, 640, 1280, 1280],
            "motion_layers_per_block": 2, "motion_mid_block_layers_per_block": 1,
            "motion_num_attention_heads": 8, "motion_norm_num_groups": 32,
            "motion_max_seq_length": positions, "use_motion_mid_block": mid_block,
            "conv_in_channels": None}


# The released AnimateDiff SD1.5 modules: v1 has a 24-position table, v2 adds a mid-block
# module, v3 drops it again (guoyww/animatediff-motion-adapter-v1-5{,-2,-3}).
SD15_MOTION_ADAPTERS = {"v1": _motion_adapter(24, False), "v2": _motion_adapter(32, True),
                        "v3": _motion_adapter(32, False)}
