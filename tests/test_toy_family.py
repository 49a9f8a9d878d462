"""The toy family's plumbing: a fresh family loads like any diffusers folder, packs to fp16
under the size limit with SHA256SUMS, and the hash check names a missing, extra or altered
file; `freeanimate toy build` runs a stage through `train run`, exports it into the family and
skips it once done."""

import json

import jax
import numpy as np
import pytest

from freeanimate_jax.cli import main
from freeanimate_jax.toy import family
from freeanimate_jax.weights.convert import WeightsError, export_state_dict
from freeanimate_jax.weights.pipeline import load_pipeline


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A fresh family with a ControlNet and a motion adapter made from its UNet, packed."""
    from freeanimate_jax.train import state as st
    from freeanimate_jax.weights.export import export_model_folder, export_motion_adapter

    root = tmp_path_factory.mktemp("toy_family")
    fam = family.init_family(root / "family")
    unet = load_pipeline(fam).unet
    cn = st.new_controlnet(unet, downscale=4)
    export_model_folder(cn, dict(cn.config), fam / "controlnet")
    adapter = st.new_adapter(dict(unet.config), "v3", norm_per_frame=True, seed=0)
    export_motion_adapter(adapter, fam / "motion_adapter")
    total = family.pack_family(fam, root / "packed")
    return fam, root / "packed", total


def test_a_fresh_family_is_the_toy_architecture(packed):
    fam, _, _ = packed
    models = load_pipeline(fam, fam / "controlnet")
    assert models.vae.downscale == 4 and models.vae.latent_channels == 4
    assert models.unet.config["block_out_channels"] == family.TOY_CONFIGS["unet"][
        "block_out_channels"]
    # The ControlNet's condition embedding halves 64 px twice, to the 16x16 latents.
    assert len(models.controlnet.config["conditioning_embedding_out_channels"]) == 3


def test_the_pack_is_fp16_within_the_limit_and_loads_with_the_same_values(packed):
    from safetensors.numpy import load_file

    fam, out, total = packed
    assert total <= family.MAX_SHIPPED_BYTES
    weights = sorted(out.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"vae", "unet", "text_encoder", "controlnet",
                                                "motion_adapter"}
    for p in weights:
        assert {v.dtype for v in load_file(str(p)).values()} == {np.dtype(np.float16)}
    family.verify(out)
    a = export_state_dict(load_pipeline(fam).unet)
    b = export_state_dict(load_pipeline(out).unet)
    for k in a:  # fp16 rounding only: relative 2^-11
        assert np.allclose(b[k], a[k], rtol=2**-10, atol=1e-7), k


@pytest.mark.parametrize("damage", ["alter", "remove", "add", "garble"])
def test_the_hash_check_names_the_damaged_file(packed, tmp_path, damage):
    import shutil

    _, out, _ = packed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    target = copy / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "alter":
        data = bytearray(target.read_bytes())
        data[-1] ^= 1
        target.write_bytes(bytes(data))
    elif damage == "remove":
        target.unlink()
    elif damage == "add":
        target = copy / "unet" / "extra.bin"
        target.write_bytes(b"x")
    else:  # a SHA256SUMS line that is not '<sha>  <path>'
        sums = copy / "SHA256SUMS"
        sums.write_text("not a hash line\n" + sums.read_text())
        with pytest.raises(WeightsError, match="line 1 is 'not a hash line'"):
            family.verify(copy)
        return
    with pytest.raises(WeightsError, match=str(target.relative_to(copy))):
        family.verify(copy)


def test_build_trains_the_vae_stage_exports_it_and_skips_it_once_done(tmp_path, capsys):
    import jax.numpy as jnp

    from freeanimate_jax.toy.data import ToySource

    out = tmp_path / "toy"
    args = ["toy", "build", "--out", str(out), "--stages", "vae", "all:train.max_steps=2",
            "all:train.global_batch=8", "all:data.synthetic_videos=8",
            "all:data.synthetic_frames=1", "all:train.ckpt_every=2"]
    before = load_pipeline(family.init_family(tmp_path / "ref"))  # the same seed-0 family
    assert main(args) == 0
    done = json.loads((out / "vae" / "EXPORTED.json").read_text())
    assert done["step"] == 2
    trained = load_pipeline(out / "family")
    old, new = export_state_dict(before.vae), export_state_dict(trained.vae)
    assert all(not np.array_equal(old[k], new[k]) for k in old)  # every VAE weight trained
    for part in ("unet", "text_encoder"):  # and nothing else
        a, b = export_state_dict(getattr(before, part)), export_state_dict(getattr(trained, part))
        assert all(np.array_equal(a[k], b[k]) for k in a), part
    # The exported latent scale is 1 / std of the trained encoder's posterior means over the
    # run's frames (its toy source: 8 videos x 1 frame), computed here independently.
    src = ToySource(num_videos=8, num_frames=1, size=64)
    frames = np.concatenate([src[i]["frames"] for i in range(8)]).astype(np.float32)
    mean, _ = trained.vae.encode(jnp.asarray(frames / 127.5 - 1.0))
    assert trained.vae.scaling_factor == pytest.approx(1.0 / float(jnp.std(mean)), rel=1e-4)
    capsys.readouterr()
    assert main(args) == 0
    assert "skipped" in capsys.readouterr().out
    assert main(["toy", "build", "--out", str(out), "--stages", "vea"]) == 2
    assert main(["toy", "build", "--out", str(out), "vae:train.nope=1"]) == 2
    # Other settings into the same --out are refused, not silently skipped.
    assert main([*args[:-1], "all:train.ckpt_every=1"]) == 2
    assert "other settings" in capsys.readouterr().err
    # A later stage needs the earlier ones done in its --out.
    assert main(["toy", "build", "--out", str(tmp_path / "other"), "--stages", "unet"]) == 2
    assert "stage vae" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()  # refused before anything was written
    jax.clear_caches()


def test_the_shipped_family_passes_its_hash_check_and_loads_through_load():
    import freeanimate_jax

    root = family.verify()  # every shipped file against SHA256SUMS
    assert root == family.SHIPPED
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= family.MAX_SHIPPED_BYTES
    for sub, kind in (("vae", "AutoencoderKL"), ("unet", "UNet2DConditionModel"),
                      ("text_encoder", "CLIPTextModel"), ("controlnet", "ControlNetModel"),
                      ("motion_adapter", "MotionAdapter")):
        model = freeanimate_jax.load("builtin:toy", subfolder=sub)
        config = json.loads((root / sub / "config.json").read_text())
        assert type(model).__name__ == kind, sub
        for key, want in family.TOY_CONFIGS.get(sub, {}).items():
            if key != "scaling_factor":  # the VAE's is measured at export
                assert config[key] == want, (sub, key)
    vae = json.loads((root / "vae" / "config.json").read_text())
    assert 0.2 < vae["scaling_factor"] < 5  # 1/std of the trained latents, not the init's 1
