"""A tiny random-weight SD 1.5 + ControlNet family, made deterministically in code.

It has the real architecture (the same model classes, a real CLIP BPE tokenizer over single
bytes) at toy width, so the demo, the tests and the notebooks exercise every code path on a CPU
in seconds with no download. Its pictures are noise: it shows the machinery, not the art.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import jax.numpy as jnp

from freeanimate_jax.diffusion.ddim import SchedulerConfig
from freeanimate_jax.models import known_configs
from freeanimate_jax.models.layers import host_init
from freeanimate_jax.weights.loader import build
from freeanimate_jax.weights.pipeline import SDPipelineModels

TINY_SIZE = 64  # pixels; the latent is 8x8 (the VAE downsamples 8x, like SD's)

_UNET_BLOCKS = dict(
    block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=4, norm_num_groups=8,
    cross_attention_dim=32, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
TINY_CONFIGS = {
    "unet": dict(_UNET_BLOCKS, _class_name="UNet2DConditionModel", in_channels=4,
                 out_channels=4, up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    "controlnet": dict(_UNET_BLOCKS, _class_name="ControlNetModel", in_channels=4,
                       conditioning_embedding_out_channels=[8, 16, 16, 32]),
    "vae": dict(_class_name="AutoencoderKL", block_out_channels=[8, 16, 16, 16],
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1,
                norm_num_groups=8, latent_channels=4, scaling_factor=0.18215),
    "text_encoder": dict(architectures=["CLIPTextModel"], hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5, vocab_size=514),
}


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes (byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A real CLIPTokenizer whose vocabulary is single bytes (no merges): 514 tokens."""
    from freeanimate_jax.platform import no_torch_advice

    with no_torch_advice():
        from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    # The tokenizer reads its files once; the folder goes away with the context.
    with tempfile.TemporaryDirectory(prefix="freeanimate-tiny-tokenizer-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


TINY_MOTION = dict(_class_name="MotionAdapter", block_out_channels=[32, 64],
                   motion_layers_per_block=1, motion_num_attention_heads=4,
                   motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=True)


def tiny_motion_adapter(seed: int = 10, dtype=jnp.float32):
    """A tiny v2-layout motion adapter (32 positions, mid-block module) fitting `tiny_models`."""
    with host_init(seed):
        return build(TINY_MOTION, param_dtype=dtype, seed=seed)


def tiny_models(seed: int = 0, dtype=jnp.float32) -> SDPipelineModels:
    """The tiny family with weights drawn from `seed`; identical on every machine."""
    made = {}
    for i, (name, cfg) in enumerate(TINY_CONFIGS.items()):
        with host_init(seed + i):  # seconds, not a minute of per-shape compiles
            made[name] = build(cfg, param_dtype=dtype, seed=seed + i)
    return SDPipelineModels(unet=made["unet"], vae=made["vae"],
                            text_encoder=made["text_encoder"], tokenizer=tiny_tokenizer(),
                            scheduler=SchedulerConfig.from_dict(known_configs.SD15_SCHEDULER),
                            controlnet=made["controlnet"])
