"""Released-format motion modules, exports and LoRA merges, against diffusers' own code."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from safetensors.torch import save_file

import freeanimate_jax
from freeanimate_jax import WeightsError
from freeanimate_jax.models.motion import MotionAdapter, MotionModule, UNetMotionModel
from freeanimate_jax.weights.convert import export_state_dict
from freeanimate_jax.weights.export import export_motion_adapter, export_original
from freeanimate_jax.weights.motion import (
    detect_version,
    diffusers_to_original_key,
    load_motion_module,
    merge_lora,
    original_to_diffusers_key,
    read_motion_state,
)
from tests import tiny

FRAMES = 5
# Released modules have 8 heads and 32 groups, which leave no trace in the weights.
ADAPTER = dict(block_out_channels=(32, 64), motion_layers_per_block=2,
               motion_num_attention_heads=8, motion_norm_num_groups=32)
RELEASES = {"v1": dict(motion_max_seq_length=24, use_motion_mid_block=False),
            "v2": dict(motion_max_seq_length=32, use_motion_mid_block=True),
            "v3": dict(motion_max_seq_length=32, use_motion_mid_block=False)}


def original_state(torch_adapter) -> dict[str, torch.Tensor]:
    """A diffusers adapter's weights as AnimateDiff released them (one table per attention)."""
    out = {}
    for key, value in torch_adapter.state_dict().items():
        if key.endswith("pos_embed.pe"):
            for attn in ("attn1", "attn2"):
                block = key.removesuffix(".pos_embed.pe")
                out[f"{diffusers_to_original_key(f'{block}.{attn}')}.pos_encoder.pe"] = value
        else:
            out[diffusers_to_original_key(key)] = value
    return {k: v.clone().contiguous() for k, v in out.items()}


def params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in export_state_dict(model).items()}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Per release: a diffusers folder, and the same weights as a released-style `.ckpt`
    (`state_dict` wrapper, `module.` prefix, a non-tensor entry as AnimateDiff's files have)."""
    root = tmp_path_factory.mktemp("motion_weights")
    tiny.save_unet(root / "unet", **tiny.SD1_UNET)
    out = {"root": root}
    for i, (version, extra) in enumerate(RELEASES.items()):
        ref = tiny.save_motion_adapter(root / version, seed=10 + i, **ADAPTER, **extra)
        state = {f"module.{k}": v for k, v in original_state(ref).items()}
        torch.save({"state_dict": state, "animatediff_config": "{}"}, root / f"{version}.ckpt")
        out[version] = ref
    return out


def test_key_mapping_matches_released_names_and_diffusers_conversion(files):
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    released = {
        "down_blocks.0.motion_modules.1.temporal_transformer.proj_in.weight":
            "down_blocks.0.motion_modules.1.proj_in.weight",
        "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1"
        ".to_out.0.bias": "mid_block.motion_modules.0.transformer_blocks.0.attn2.to_out.0.bias",
        "up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.norms.0.weight":
            "up_blocks.3.motion_modules.2.transformer_blocks.0.norm1.weight",
        "up_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.bias":
            "up_blocks.1.motion_modules.0.transformer_blocks.0.norm3.bias",
        "down_blocks.2.motion_modules.0.temporal_transformer.norm.weight":
            "down_blocks.2.motion_modules.0.norm.weight",
    }
    for orig, diff in released.items():
        assert original_to_diffusers_key(orig) == diff
        assert diffusers_to_original_key(diff) == orig
    table = ("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
             "attention_blocks.0.pos_encoder.pe")
    assert original_to_diffusers_key(table) is None
    # The whole tiny original state: ours renames exactly as diffusers' single-file converter.
    orig = original_state(files["v2"])
    theirs = convert_animatediff_checkpoint_to_diffusers(orig)
    ours = {original_to_diffusers_key(k): k for k in orig if original_to_diffusers_key(k)}
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(theirs[k], orig[ours[k]]) for k in theirs)


@pytest.mark.parametrize("version", list(RELEASES))
def test_versions_are_detected_and_loaded(files, version):
    path = files["root"] / f"{version}.ckpt"
    found = detect_version(read_motion_state(path))
    assert found == version and found.reason
    adapter = freeanimate_jax.load(path)
    assert isinstance(adapter, MotionAdapter)
    cfg = adapter.cfg
    assert cfg.max_seq_length == RELEASES[version]["motion_max_seq_length"]
    assert cfg.mid_block == RELEASES[version]["use_motion_mid_block"]
    assert cfg.norm_per_frame and cfg.resnet_norm_across_frames == (version == "v1")
    assert cfg.block_out_channels == (32, 64) and cfg.heads == (8, 8) and cfg.groups == 32
    # Bit-exact against the diffusers folder of the same weights.
    assert_same_params(adapter, freeanimate_jax.load(files["root"] / version))
    forced = load_motion_module(path, version="v1")
    assert forced.cfg.resnet_norm_across_frames and forced.cfg.max_seq_length == cfg.max_seq_length


def _video_unet(root, adapter):
    return UNetMotionModel.from_unet2d(freeanimate_jax.load(root / "unet"), adapter)


@nnx.jit
def _forward(model, x, ctx):  # compiled: op-by-op the tiny video UNet takes ~20 s on a CPU
    return model(x, 321, ctx)


def test_original_checkpoint_runs_like_the_diffusers_folder_with_per_frame_norm(files):
    # The original format implies the original per-frame GroupNorm; diffusers' folder, loaded
    # as diffusers runs it, normalises across frames (that switch is tested in test_motion.py).
    root = files["root"]
    original = freeanimate_jax.load(root / "v2.ckpt")
    folder = freeanimate_jax.load(root / "v2")
    for _, m in nnx.iter_graph(folder):
        if isinstance(m, MotionModule):
            assert not m.norm_per_frame
            m.norm_per_frame = True
    g = torch.Generator().manual_seed(0)
    x = jnp.asarray(torch.randn(1, FRAMES, 8, 8, 4, generator=g).numpy())
    ctx = jnp.asarray(torch.randn(1, 7, 32, generator=g).numpy())
    expected = _forward(_video_unet(root, folder), x, ctx)
    out = _forward(_video_unet(root, original), x, ctx)
    assert out.shape == (1, FRAMES, 8, 8, 4) and float(jnp.max(jnp.abs(expected))) > 0.1
    err = float(jnp.max(jnp.abs(out - expected)))
    print(f"original vs diffusers folder (per-frame norm): max abs error {err:.1e}")
    assert err == 0.0


def test_exports_round_trip_exactly_and_diffusers_reads_them(files, tmp_path):
    from diffusers import MotionAdapter as TorchAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    root, ref = files["root"], files["v2"]
    folder_adapter = freeanimate_jax.load(root / "v2")
    out = export_motion_adapter(folder_adapter, tmp_path / "exported")
    again = freeanimate_jax.load(out)
    assert_same_params(again, folder_adapter)
    assert again.cfg == folder_adapter.cfg
    theirs = {k: v.numpy() for k, v in TorchAdapter.from_pretrained(out).state_dict().items()}
    ours = params(folder_adapter)
    assert sorted(theirs) == sorted(ref.state_dict())  # position tables included
    for k, v in theirs.items():
        if k.endswith(".pe"):  # not parameters of ours: as diffusers computes them
            np.testing.assert_allclose(v, ref.state_dict()[k].numpy(), rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(v, ours[k], err_msg=k)

    for version in RELEASES:
        original = freeanimate_jax.load(root / f"{version}.ckpt")
        file = export_original(original, tmp_path / f"{version}.safetensors")
        again = freeanimate_jax.load(file)
        assert_same_params(again, original)
        assert again.cfg == original.cfg
        written = load_file(str(file))
        source = {k: v.numpy() for k, v in original_state(files[version]).items()}
        assert sorted(written) == sorted(source)
        for k in source:
            np.testing.assert_allclose(written[k], source[k], rtol=0, atol=1e-6, err_msg=k)
        converted = convert_animatediff_checkpoint_to_diffusers(
            {k: torch.from_numpy(v) for k, v in written.items()})
        assert sorted(converted) == sorted(k for k in files[version].state_dict()
                                           if not k.endswith(".pe"))
    with pytest.raises(WeightsError, match="already exists"):
        export_motion_adapter(folder_adapter, out)
    export_motion_adapter(folder_adapter, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["exported", *(f"{v}.safetensors" for v in RELEASES)])  # no staging left behind


def _attentions(shapes, kind: str) -> list[str]:
    return sorted(k.removesuffix(".to_q") for k in shapes
                  if k.endswith((".attn1.to_q", ".attn2.to_q")) and f".{kind}." in k)


def _lora(names, shapes, seed, rank=2):
    """Random rank-`rank` factors in AnimateDiff's format, for every attention in `names`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for attn in names:
        for proj, layer in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"),
                            ("to_out", "to_out.0")):
            n_out, n_in = shapes[f"{attn}.{layer}"]
            out[f"{attn}.processor.{proj}_lora.down.weight"] = torch.randn(rank, n_in, generator=g)
            out[f"{attn}.processor.{proj}_lora.up.weight"] = torch.randn(n_out, rank, generator=g)
    return {k: v * 0.1 for k, v in out.items()}


def _diffusers_fused(files, version, lora, scale):
    """diffusers' own path: AnimateDiffPipeline.load_lora_weights, then fuse_lora."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, UNet2DConditionModel
    from diffusers import MotionAdapter as TorchAdapter

    root = files["root"]
    pipe = AnimateDiffPipeline(
        vae=None, text_encoder=None, tokenizer=None, scheduler=DDIMScheduler(),
        unet=UNet2DConditionModel.from_pretrained(root / "unet"),
        motion_adapter=TorchAdapter.from_pretrained(root / version))
    pipe.load_lora_weights({f"unet.{k}": v for k, v in lora.items()}, adapter_name="lora")
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return {k: v.numpy() for k, v in pipe.unet.state_dict().items()}


def _compare_merged(ours: dict, fused: dict, base: dict, targets: set[str]) -> float:
    worst = 0.0
    for k, v in ours.items():
        err = float(np.max(np.abs(v - fused[k])))
        if k.removesuffix(".weight") in targets:
            assert float(np.max(np.abs(v - base[k]))) > 1e-3, f"{k} was not merged"
            worst = max(worst, err)
        assert err <= 1e-6, f"{k}: {err}"
    return worst


def test_motion_lora_merge_matches_diffusers(files, tmp_path):
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    root, scale = files["root"], 0.8
    base = params(freeanimate_jax.load(root / "v2.ckpt"))
    shapes = {k.removesuffix(".weight"): v.shape for k, v in files["v2"].state_dict().items()}
    attns = _attentions(shapes, "motion_modules")
    lora = {diffusers_to_original_key(k): v for k, v in _lora(attns, shapes, seed=3).items()}
    torch.save({"state_dict": lora}, tmp_path / "motion_lora.ckpt")

    adapter = freeanimate_jax.load(root / "v2.ckpt")
    merge_lora(adapter, tmp_path / "motion_lora.ckpt", scale)
    fused = _diffusers_fused(files, "v2", convert_animatediff_checkpoint_to_diffusers(lora), scale)
    targets = {f"{a}.{p}" for a in attns for p in ("to_q", "to_k", "to_v", "to_out.0")}
    worst = _compare_merged(params(adapter), fused, base, targets)
    print(f"motion LoRA: max |ours - diffusers| = {worst:.2e}")

    # PEFT names, merged into a UNetMotionModel: the same weights.
    peft = {original_to_diffusers_key(k).replace(".processor.", ".")
            .replace("to_out_lora", "to_out.0_lora").replace("_lora.down", ".lora_A")
            .replace("_lora.up", ".lora_B"): v.numpy() for k, v in lora.items()}
    video = _video_unet(root, freeanimate_jax.load(root / "v2.ckpt"))
    merge_lora(video, peft, scale)
    merged = params(video)
    for k, v in params(adapter).items():
        np.testing.assert_array_equal(merged[k], v, err_msg=k)


def test_domain_adapter_merges_into_spatial_attention_like_diffusers(files):
    root, scale = files["root"], 1.0
    unet = freeanimate_jax.load(root / "unet")
    base = params(unet)
    shapes = {k.removesuffix(".weight"): v.shape for k, v in base.items()}  # (out, in)
    attns = _attentions(shapes, "attentions")
    lora = _lora(attns, shapes, seed=4)
    merge_lora(unet, {k: v.numpy() for k, v in lora.items()}, scale, target="spatial")
    fused = _diffusers_fused(files, "v2", lora, scale)
    targets = {f"{a}.{p}" for a in attns for p in ("to_q", "to_k", "to_v", "to_out.0")}
    worst = _compare_merged(params(unet), fused, base, targets)
    print(f"domain adapter: max |ours - diffusers| = {worst:.2e}")


def test_bad_inputs_fail_in_one_line(files, tmp_path):
    root = files["root"]
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="unknown weights format") as e:
        load_motion_module(tmp_path / "notes.txt")
    one_line(e)
    with pytest.raises(WeightsError, match="no config.json") as e:
        load_motion_module(tmp_path / "empty")
    one_line(e)
    with pytest.raises(WeightsError, match="not a MotionAdapter") as e:
        load_motion_module(root / "unet")
    one_line(e)

    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
          "first_stage_model.encoder.conv_in.bias": torch.zeros(4)}
    torch.save({"state_dict": sd, "global_step": 1}, tmp_path / "sd15.ckpt")
    save_file(sd, tmp_path / "sd15.safetensors")
    for name in ("sd15.ckpt", "sd15.safetensors"):
        with pytest.raises(WeightsError, match="not an AnimateDiff motion module") as e:
            freeanimate_jax.load(tmp_path / name)
        one_line(e)

    adapter = freeanimate_jax.load(root / "v2.ckpt")
    before = params(adapter)
    wide = {"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
            f"attention_blocks.0.processor.to_q_lora.{p}.weight": torch.ones(*s)
            for p, s in (("down", (2, 64)), ("up", (64, 2)))}  # made for 64 channels, not 32
    spatial = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora."
               f"{p}.weight": torch.ones(*s) for p, s in (("down", (2, 32)), ("up", (32, 2)))}
    absent = {k.replace("motion_modules.0", "motion_modules.7"): v[:, :32] if "down" in k
              else v[:32] for k, v in wide.items()}
    for bad in (wide, spatial, absent):
        with pytest.raises(WeightsError, match="wrong base.*to_q_lora") as e:
            merge_lora(adapter, bad, 1.0)
        one_line(e)
    torch.save({"state_dict": wide}, tmp_path / "lora.ckpt")
    with pytest.raises(WeightsError, match="motion LoRA") as e:
        freeanimate_jax.load(tmp_path / "lora.ckpt")
    one_line(e)
    assert all(np.array_equal(v, before[k]) for k, v in params(adapter).items())


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path):
    armed = tmp_path / "armed"
    torch.save({"state_dict": {"x": _Payload(armed)}}, tmp_path / "armed.ckpt")
    torch.load(tmp_path / "armed.ckpt", weights_only=False)  # the payload is live...
    assert armed.exists()
    marker = tmp_path / "payload_ran"  # ...and our loader never runs it
    torch.save({"state_dict": {"x": _Payload(marker)}}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsError, match="refused") as e:
        freeanimate_jax.load(tmp_path / "evil.ckpt")
    one_line(e)
    assert not marker.exists()
    # What was refused, and what to do instead; never torch's advice to run the file's code.
    text = str(e.value)
    assert "GLOBAL exec" in text and "convert the file to safetensors" in text, text
    assert "weights_only` set to `False" not in text and "False" not in text
