"""The toy model family: its architecture, a fresh (untrained) diffusers-layout folder to
train it in, and the shipped, trained copy (`builtin:toy`) with its hash check.

The layout is a diffusers Stable Diffusion pipeline folder plus `controlnet/` and
`motion_adapter/` model folders, so `freeanimate_jax.load` and every command read it as they
read downloaded weights. 64x64 frames, a VAE that downsamples 4x (16x16x4 latents), and the
openpose ControlNet's conditioning embedding downsamples 4x to match (`new_controlnet`). The
text encoder is the tiny random CLIP of `freeanimate_jax.demo` (frozen: a caption's identity
is all the UNet needs from it) with the byte-level tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from freeanimate_jax.models import known_configs
from freeanimate_jax.weights.convert import WeightsError

TOY_SIZE = 64
SHIPPED = Path(__file__).parent / "weights"
HASHES = SHIPPED / "SHA256SUMS"
MAX_SHIPPED_BYTES = 8 * 2**20

_BLOCKS = dict(block_out_channels=[32, 64], layers_per_block=2, attention_head_dim=8,
               norm_num_groups=16, cross_attention_dim=32,
               down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
TOY_CONFIGS = {
    "vae": dict(_class_name="AutoencoderKL", block_out_channels=[16, 32, 64],
                down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1,
                norm_num_groups=8, latent_channels=4, scaling_factor=1.0, sample_size=64),
    "unet": dict(_BLOCKS, _class_name="UNet2DConditionModel", in_channels=4, out_channels=4,
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], sample_size=16),
}
# Sampling and training share SD's noise schedule (scaled_linear betas, as the scheduler).
SCHEDULER = known_configs.SD15_SCHEDULER


def _write_model(model, config: dict, folder: Path, stem: str, dtype=None) -> None:
    from safetensors.numpy import save_file

    from freeanimate_jax.weights.convert import export_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: np.ascontiguousarray(v if dtype is None else v.astype(dtype))
             for k, v in export_state_dict(model).items()}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(folder / f"{stem}.safetensors"))


def init_family(folder: str | Path, seed: int = 0) -> Path:
    """A fresh toy family to train in: random VAE, UNet and ControlNet of TOY_CONFIGS, the
    tiny CLIP text encoder and tokenizer, SD's scheduler config; fp32. Returns the folder."""
    from freeanimate_jax.demo import TINY_CONFIGS, tiny_tokenizer
    from freeanimate_jax.io.atomic import staged
    from freeanimate_jax.models.layers import host_init
    from freeanimate_jax.weights.loader import build

    folder = Path(folder).expanduser()
    configs = dict(TOY_CONFIGS, text_encoder=TINY_CONFIGS["text_encoder"])  # no ControlNet:
    # one is made from the trained UNet (`controlnet: new`), as diffusers' train_controlnet
    with staged(folder, folder=True) as tmp:
        for i, (name, cfg) in enumerate(configs.items()):
            with host_init(seed + i):
                model = build(cfg, param_dtype=jnp.float32, seed=seed + i)
            stem = "model" if name == "text_encoder" else "diffusion_pytorch_model"
            _write_model(model, dict(cfg), tmp / name, stem)
        tiny_tokenizer().save_pretrained(str(tmp / "tokenizer"))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(dict(SCHEDULER, _class_name="DDIMScheduler"), indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"]}, indent=2) + "\n")
    return folder


# -- the shipped family ---------------------------------------------------------------------

def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != HASHES.name)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_hashes(root: Path) -> None:
    lines = [f"{digest(p)}  {p.relative_to(root).as_posix()}" for p in _files(root)]
    (root / HASHES.name).write_text("\n".join(lines) + "\n")


def verify(root: Path = SHIPPED) -> Path:
    """The shipped folder after checking every file against SHA256SUMS; a WeightsError naming
    the first file that is missing, extra or altered."""
    sums = root / HASHES.name
    if not sums.is_file():
        raise WeightsError(f"{root}: no {HASHES.name}; expected the toy family shipped with "
                           f"the package (reinstall it)")
    want = {}
    for i, line in enumerate(sums.read_text().splitlines(), 1):
        sha, _, name = line.partition("  ")
        if len(sha) != 64 or not name or any(c not in "0123456789abcdef" for c in sha):
            raise WeightsError(f"{sums}: line {i} is {line[:80]!r}; expected '<64 hex digits>  "
                               f"<path>' (reinstall the package)")
        want[name] = sha
    have = {p.relative_to(root).as_posix() for p in _files(root)}
    for name in sorted(set(want) | have):
        if name not in have:
            raise WeightsError(f"{root}: {name} is missing; expected the file SHA256SUMS lists")
        if name not in want:
            raise WeightsError(f"{root}: {name} is not in SHA256SUMS; expected only the "
                               f"shipped files")
        if digest(root / name) != want[name]:
            raise WeightsError(f"{root}: {name} does not match its SHA-256 in SHA256SUMS; "
                               f"expected the shipped bytes (reinstall the package)")
    return root


def pack_family(family: str | Path, target: str | Path = SHIPPED) -> int:
    """Write a trained family folder as the shipped one: every safetensors file in fp16, the
    configs, tokenizer and scheduler as they are, and SHA256SUMS; at most MAX_SHIPPED_BYTES
    (a ValueError, nothing written, above it). Returns the bytes written."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from freeanimate_jax.io.atomic import staged

    family, target = Path(family), Path(target)
    with staged(target, folder=True) as tmp:
        for src in sorted(p for p in family.rglob("*") if p.is_file()):
            rel = src.relative_to(family)
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".safetensors":
                state = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v)
                         for k, v in load_file(str(src)).items()}
                save_file(state, str(dst))
                dst.chmod(0o644)
            else:
                shutil.copyfile(src, dst)
        write_hashes(tmp)
        total = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if total > MAX_SHIPPED_BYTES:
            raise ValueError(f"the packed toy family is {total / 2**20:.2f} MiB; expected at "
                             f"most {MAX_SHIPPED_BYTES / 2**20:.0f} MiB (shrink TOY_CONFIGS)")
    return total
