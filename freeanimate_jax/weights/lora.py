"""`merge_lora`: fold a LoRA into the UNet and text encoder weights, in place.

Accepted namings (one file may mix them):
- diffusers/PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.<module>...`;
  alphas from the safetensors `lora_adapter_metadata` (`lora_alpha`, `alpha_pattern`,
  `use_rslora`) that diffusers' `save_lora_weights` writes, else alpha = rank (scale 1).
- older diffusers: `...processor.to_q_lora.down.weight`, `...lora.down.weight`,
  `...lora_linear_layer.down.weight`.
- kohya: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  `lora_te_text_model_...`; UNet modules in diffusers naming or in the original SD naming
  (`lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`).

kohya names replace every `.` by `_`, which is ambiguous to parse; they are looked up instead in
a table built from our own models' module paths (and their original-SD names), so a name either
names exactly one layer or none. Every key is checked before any weight changes: a LoRA that
does not fit (unknown layer, other shapes, SDXL's second text encoder) changes nothing and fails
with one WeightsError line naming the keys.

Merge: W += s * up @ down (PyTorch layout), s = scale * alpha / rank (kohya/PEFT convention;
alpha / sqrt(rank) with rsLoRA). Linear and conv LoRAs (1x1 and kxk, LoCon) are supported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from freeanimate_jax.models.layers import Conv2d, Linear
from freeanimate_jax.weights.convert import WeightsError
from freeanimate_jax.weights.loader import read_torch_pickle

if TYPE_CHECKING:
    from freeanimate_jax.weights.pipeline import SDPipelineModels

_COMPONENTS = ("unet", "text_encoder")
# key suffix -> role (first match wins: `.lora.down.weight` before `_lora.down.weight`)
_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # attention processor LoRA
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
# old diffusers attention-processor names -> the layer they adapt
_PROCESSOR = {"unet": {"to_out": "to_out.0"},
              "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                               "to_out": "out_proj"}}
_FOREIGN = ("text_encoder_2.", "lora_te2_", "lora_te1_", "transformer.", "lora_transformer_")
# diffusers UNet names -> original SD (CompVis) names
_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_TOP_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
LORA_FILE = "pytorch_lora_weights.safetensors"


def ldm_unet_path(path: str, layers_per_block: int, up_has_attention: Sequence[bool]) -> str | None:
    """A diffusers UNet module (or parameter) path -> its original SD name, e.g.
    `down_blocks.0.attentions.1.proj_in` -> `input_blocks.2.1.proj_in`; None outside SD's
    block layout."""
    for src, dst in _TOP_LDM.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    parts, n = path.split("."), layers_per_block + 1
    kind = parts[2] if len(parts) > 3 else ""
    if parts[0] == "down_blocks" and kind in ("resnets", "attentions"):
        i, j = int(parts[1]), int(parts[3])
        head, rest = f"input_blocks.{n * i + j + 1}.{int(kind == 'attentions')}", parts[4:]
    elif parts[0] == "down_blocks" and kind == "downsamplers" and parts[4:5] == ["conv"]:
        head, rest = f"input_blocks.{n * (int(parts[1]) + 1)}.0.op", parts[5:]
    elif parts[0] == "up_blocks" and kind in ("resnets", "attentions"):
        i, j = int(parts[1]), int(parts[3])
        head, rest = f"output_blocks.{n * i + j}.{int(kind == 'attentions')}", parts[4:]
    elif parts[0] == "up_blocks" and kind == "upsamplers":
        i = int(parts[1])
        # the upsampler follows the resnet (and the attention, where the block has one)
        head = f"output_blocks.{n * i + layers_per_block}.{2 if up_has_attention[i] else 1}"
        rest = parts[4:]
    elif parts[:3] == ["mid_block", "attentions", "0"]:
        head, rest = "middle_block.1", parts[3:]
    elif parts[:2] == ["mid_block", "resnets"] and len(parts) > 2:
        head, rest = f"middle_block.{2 * int(parts[2])}", parts[3:]
    else:
        return None
    if kind == "resnets" or parts[:2] == ["mid_block", "resnets"]:
        rest = [_RESNET_LDM.get(rest[0], rest[0]), *rest[1:]] if rest else rest
    return ".".join([head, *rest])


def _layers(model: nnx.Module) -> dict[str, Linear | Conv2d]:
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, Linear | Conv2d)}


def _ldm_layout(paths: Sequence[str]) -> tuple[int, list[bool]]:
    """(layers_per_block, which up blocks have attentions), read off the UNet's module paths."""
    resnets = [int(m[1]) for p in paths if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", p))]
    ups = [int(m[1]) for p in paths if (m := re.match(r"up_blocks\.(\d+)\.", p))]
    attn = [any(p.startswith(f"up_blocks.{i}.attentions.") for p in paths)
            for i in range(max(ups, default=-1) + 1)]
    return max(resnets, default=0) + 1, attn


def _kohya_table(layers: Mapping[str, Mapping[str, nnx.Module]]) -> dict[str, tuple | None]:
    """kohya name -> (component, module path); None where two paths share a name."""
    names: dict[str, list[tuple[str, str]]] = {}

    def add(name: str, target: tuple[str, str]) -> None:
        if target not in names.setdefault(name, []):
            names[name].append(target)

    unet_paths = list(layers["unet"])
    per_block, up_attn = _ldm_layout(unet_paths)
    for p in unet_paths:
        add("lora_unet_" + p.replace(".", "_"), ("unet", p))
        if (ldm := ldm_unet_path(p, per_block, up_attn)) is not None:
            add("lora_unet_" + ldm.replace(".", "_"), ("unet", p))
    for p in layers["text_encoder"]:
        for name in (p, "text_model." + p):
            add("lora_te_" + name.replace(".", "_"), ("text_encoder", p))
    return {name: targets[0] if len(targets) == 1 else None for name, targets in names.items()}


def read_lora(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, PEFT metadata) of a LoRA file, or of the diffusers LoRA folder holding one."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / LORA_FILE] if (path / LORA_FILE).is_file() else \
            sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise WeightsError(f"{path}: expected {LORA_FILE} or exactly one .safetensors file, "
                               f"found {len(found)}")
        path = found[0]
    if not path.is_file():
        raise WeightsError(f"{path}: no such LoRA file")
    if path.suffix.lower() != ".safetensors":
        return read_torch_pickle(path), {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        adapter = json.loads(meta.get("lora_adapter_metadata") or "{}")
    except Exception as e:
        raise WeightsError(f"{path}: not a readable LoRA safetensors file "
                           f"({type(e).__name__}: {str(e).splitlines()[0]})") from e
    return state, adapter


def _parse(key: str, kohya: Mapping[str, tuple | None]) -> tuple[str, str, tuple | None, str]:
    """key -> (role, LoRA module name, (component, module path) or None, problem)."""
    suffix, role = next(((s, r) for s, r in _SUFFIXES if key.endswith(s)), ("", ""))
    if not role:
        kind = "DoRA/LoHa/LoKr or a LoRA bias" if re.search(
            r"dora|magnitude|hada_|lokr_|lora_B\.bias", key) else "not a LoRA weight"
        return "", "", None, f"{key}: unsupported key ({kind})"
    stem = key[:-len(suffix)]
    if key.startswith(_FOREIGN):
        return role, stem, None, f"{key}: targets a model these pipelines lack (SDXL/SD3/Flux?)"
    if key.startswith(("lora_unet_", "lora_te_")):
        target = kohya.get(stem)
        return role, stem, target, "" if target else f"{key}: no such layer"
    component, _, module = stem.partition(".")
    if component not in _COMPONENTS:  # unprefixed: old `save_attn_procs` UNet LoRAs
        component, module = "unet", stem
    parts = [p for p in module.split(".") if p != "processor"]
    if component == "text_encoder" and parts[:1] == ["text_model"]:
        parts = parts[1:]  # transformers >= 5 CLIPTextModel has no `text_model.` level
    if key.endswith(("_lora.down.weight", "_lora.up.weight")) and parts:
        parts[-1] = _PROCESSOR[component].get(parts[-1], parts[-1])
    return role, stem, (component, ".".join(parts)), ""


def _peft_alpha(meta: Mapping, component: str, module: str, rank: int) -> float:
    """PEFT's alpha / rank for `module`, from diffusers' saved adapter metadata."""
    alpha = meta.get(f"{component}.lora_alpha")
    if alpha is None:
        return 1.0
    for pattern, value in (meta.get(f"{component}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's own matching rule
            alpha = value
            break
    root = rank ** 0.5 if meta.get(f"{component}.use_rslora") else rank
    return float(alpha) / root


def _delta(layer: Linear | Conv2d, down: np.ndarray, up: np.ndarray) -> np.ndarray | str:
    """up @ down in our layout (Linear (in, out), Conv HWIO), or why it does not fit."""
    shape = tuple(layer.weight.shape)
    kh, kw, cin, cout = shape if isinstance(layer, Conv2d) else (1, 1, *shape)
    given = f"down {tuple(down.shape)} / up {tuple(up.shape)}"
    # Linear and 1x1-conv LoRAs are interchangeable: kohya and PEFT store either form
    if down.ndim == 2 and (kh, kw) == (1, 1):
        down = down[:, :, None, None]
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if down.ndim != 4 or up.ndim != 2 or down.shape[1:] != (cin, kh, kw) \
            or up.shape != (cout, down.shape[0]):
        layer_desc = f"conv layer (in {cin}, out {cout}, kernel {kh}x{kw})" \
            if isinstance(layer, Conv2d) else f"linear layer (in {cin}, out {cout})"
        return f"{given} vs {layer_desc}"
    rank = down.shape[0]
    delta = (up.astype(np.float32) @ down.reshape(rank, -1).astype(np.float32))
    delta = delta.reshape(cout, cin, kh, kw)
    return delta[:, :, 0, 0].T if isinstance(layer, Linear) else delta.transpose(2, 3, 1, 0)


def _fail(path: Path, problems: list[str]) -> WeightsError:
    more = f"; ... and {len(problems) - 6} more" if len(problems) > 6 else ""
    return WeightsError(f"{path}: LoRA does not fit these models (LoRA for a different base "
                        f"model?): {'; '.join(problems[:6])}{more}")


def merge_lora(models: SDPipelineModels, path: str | Path, scale: float = 1.0) -> int:
    """Merge the LoRA at `path` (file or diffusers LoRA folder) into `models.unet` and
    `models.text_encoder` (an `SDPipelineModels`) in place; returns the number of layers changed.

    Nothing changes unless every key fits. Merging is W += s * delta in fp32, cast back to each
    weight's dtype.
    """
    path = Path(path).expanduser()
    state, meta = read_lora(path)
    if not state:
        raise WeightsError(f"{path}: holds no tensors")
    layers = {c: _layers(getattr(models, c)) for c in _COMPONENTS}
    kohya = _kohya_table(layers)
    problems: list[str] = []
    groups: dict[tuple[str, str, str], dict[str, str]] = {}  # (component, module, name)
    for key in sorted(state):
        role, stem, target, problem = _parse(key, kohya)
        if problem:
            problems.append(problem)
        elif target[1] not in layers[target[0]]:
            problems.append(f"{key}: no layer {target[0]}.{target[1]}")
        else:
            groups.setdefault((*target, stem), {})[role] = key
    deltas: dict[tuple[str, str], np.ndarray] = {}
    for (component, module, _), keys in groups.items():
        if "down" not in keys or "up" not in keys:
            have = next(iter(keys.values()))
            problems.append(f"{have}: no matching {'up' if 'down' in keys else 'down'} weight")
            continue
        down, up = np.asarray(state[keys["down"]]), np.asarray(state[keys["up"]])
        delta = _delta(layers[component][module], down, up)
        if isinstance(delta, str):
            problems.append(f"{keys['down']}: {delta}")
            continue
        rank = down.shape[0]
        factor = (float(np.asarray(state[keys["alpha"]], np.float32)) / rank if "alpha" in keys
                  else _peft_alpha(meta, component, module, rank))
        prev = deltas.get((component, module), 0.0)
        deltas[(component, module)] = prev + np.float32(scale * factor) * delta
    if problems:
        raise _fail(path, problems)
    for (component, module), delta in deltas.items():
        weight = layers[component][module].weight
        old = weight.get_value()
        new = (old.astype(jnp.float32) + delta).astype(old.dtype)
        weight.set_value(jax.device_put(new, old.sharding))  # keeps a sharded model sharded
    return len(deltas)
