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
VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, latent_channels=4,
           sample_size=32, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1)
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


def clip_tokenizer(tmp_path):
    """transformers' own tiny CLIP BPE test vocabulary (see tests/test_clip_text.py)."""
    import json

    import transformers

    vocab = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>",
             "t</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>",
             "<|startoftext|>", "<|endoftext|>"]
    src = tmp_path / "tok_src"
    src.mkdir()
    (src / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (src / "merges.txt").write_text("\n".join(["#version: 0.2", "l o", "lo w</w>", "e r</w>", ""]))
    return transformers.CLIPTokenizer.from_pretrained(src, model_max_length=77)


def save_sd_pipeline(tmp_path, folder):
    """A tiny random SD 1.x pipeline (text encoder, tokenizer, VAE, UNet, DDIM) saved with
    `save_pretrained` into `folder`; returns the torch pipeline."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=1000, max_position_embeddings=77, bos_token_id=21, eos_token_id=22,
        pad_token_id=22)).eval()
    pipe = diffusers.StableDiffusionPipeline(
        vae=randomize(diffusers.AutoencoderKL(**VAE), 3),
        text_encoder=text_encoder, tokenizer=clip_tokenizer(tmp_path),
        unet=randomize(diffusers.UNet2DConditionModel(**SD1_UNET), 4),
        scheduler=diffusers.DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe
