"""Tiny random diffusers models for parity tests, saved with `save_pretrained`.

Weights are redrawn (not diffusers' init, which zeroes the ControlNet's convs and leaves
outputs near zero) so any mismatch shows in the output.
"""

import torch

SD1_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
# SD 2.x style: linear projections, a per-block head list, upcast attention, 3 levels.
SD2_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=16,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=24, attention_head_dim=[2, 4, 8], use_linear_projection=True,
                upcast_attention=True, norm_num_groups=16)
CONTROLNET = dict(block_out_channels=(32, 64), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                  conditioning_embedding_out_channels=(8, 16, 16, 32))


def randomize(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_scale = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + noise if is_norm_scale else noise)
    return model.eval()


def save_unet(path, seed: int = 0, **config):
    from diffusers import UNet2DConditionModel

    model = randomize(UNet2DConditionModel(**config), seed)
    model.save_pretrained(path)
    return model


def save_controlnet(path, seed: int = 1, **config):
    from diffusers import ControlNetModel

    model = randomize(ControlNetModel(**config), seed)
    model.save_pretrained(path)
    return model


MOTION_ADAPTER = dict(block_out_channels=(32, 64), motion_layers_per_block=2,
                      motion_num_attention_heads=2, motion_norm_num_groups=8,
                      motion_max_seq_length=24, use_motion_mid_block=True)


def save_motion_adapter(path, seed: int = 2, **config):
    from diffusers import MotionAdapter

    model = randomize(MotionAdapter(**config), seed)
    model.save_pretrained(path)
    return model
