"""AutoencoderKL parity with diffusers on tiny random models (CPU, fp32).

Every parameter is re-randomised (GroupNorm affines included) so a swapped, transposed or
skipped tensor changes the output; diffusers' own init leaves norms at (1, 0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import freeanimate_jax
from freeanimate_jax.models.vae import AutoencoderKL
from tests.helpers import assert_parity, nchw_to_nhwc

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
            latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
THREE_LEVELS = dict(block_out_channels=(16, 32, 64), layers_per_block=2, norm_num_groups=8,
                    latent_channels=4, sample_size=32,
                    down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3)
# The optional pieces switched off: no mid-block attention, no (post-)quant convs.
BARE = dict(TINY, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
            layers_per_block=2)
# For the compile-heavy chunk/jit tests: structure is what matters there, not width.
SMALL = dict(TINY, block_out_channels=(8, 16), norm_num_groups=4)


def _randomise(module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.rsplit(".", 2)[-2]:  # GroupNorm affine: around (1, 0)
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:  # keep activations O(1): std ~ 1.5 / sqrt(fan_in)
                p.copy_(noise * 1.5 / np.sqrt(p[0].numel()))


def _torch_vae(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**config).eval()
    _randomise(vae, seed + 1)
    return vae


@pytest.fixture(scope="module", params=["tiny", "three_levels", "bare"])
def pair(request, tmp_path_factory):
    config = {"tiny": TINY, "three_levels": THREE_LEVELS, "bare": BARE}[request.param]
    vae = _torch_vae(config)
    folder = tmp_path_factory.mktemp(request.param)
    vae.save_pretrained(folder)
    return request.param, vae, freeanimate_jax.load(folder), folder


def _image(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _shape(name: str, batch: int = 2):
    # three_levels runs a non-square image: catches any H/W mix-up.
    return (batch, 3, 32, 48) if name == "three_levels" else (batch, 3, 32, 32)


def _ref_encode(vae, x_nchw):
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x_nchw)).latent_dist
    return dist.mean.numpy(), dist.logvar.numpy()


def _ref_decode(vae, z_nchw):
    with torch.no_grad():
        return vae.decode(torch.from_numpy(z_nchw)).sample.numpy()


def test_encode_decode_parity(pair):
    name, vae, model, _ = pair
    x = _image(_shape(name))
    ref_mean, ref_logvar = _ref_encode(vae, x)
    mean, logvar = model.encode(jnp.asarray(nchw_to_nhwc(x)))
    err_m = assert_parity(mean, nchw_to_nhwc(ref_mean), f"{name} encode mean")
    err_l = assert_parity(logvar, nchw_to_nhwc(ref_logvar), f"{name} encode logvar")

    z = np.random.default_rng(1).standard_normal(ref_mean.shape).astype(np.float32)
    ref = _ref_decode(vae, z)
    out = model.decode(jnp.asarray(nchw_to_nhwc(z)))
    err_d = assert_parity(out, nchw_to_nhwc(ref), f"{name} decode")
    # The check means something only if the reference is not ~0.
    assert np.abs(ref).max() > 0.1 and np.abs(ref_mean).max() > 0.1
    print(f"{name}: max abs err mean {err_m:.2e} logvar {err_l:.2e} decode {err_d:.2e} "
          f"(max|ref| {np.abs(ref).max():.2f})")


def test_config_attributes(pair):
    name, vae, model, _ = pair
    assert model.scaling_factor == pytest.approx(vae.config.scaling_factor)
    assert model.shift_factor is None
    assert (model.quant_conv is None) == (not vae.config.use_quant_conv)
    assert (model.encoder.mid_block.attentions is None) == (not vae.config.mid_block_add_attention)


def test_chunked_equals_unchunked():
    """Samples never interact, so chunking changes only rounding (XLA fuses a chunk-sized
    batch differently); a misplaced, reordered or dropped chunk would be an O(1) error."""
    model = AutoencoderKL.from_config(SMALL, rngs=nnx.Rngs(0))
    x = jnp.asarray(nchw_to_nhwc(_image((5, 3, 16, 16))))
    mean, logvar = model.encode(x)
    z = jax.random.normal(jax.random.key(0), mean.shape)
    full = model.decode(z)
    m_c, l_c = model.encode(x, chunk=2)  # ragged: 3 strided chunks of 2, one padded sample
    assert_parity(m_c, mean, "chunk=2 mean")
    assert_parity(l_c, logvar, "chunk=2 logvar")
    for chunk in (1, 2, 8):  # exact (5 x 1), ragged (3 x 2, padded), larger than the batch
        assert_parity(model.decode(z, chunk=chunk), full, f"chunk={chunk} decode")
    with pytest.raises(ValueError, match="chunk"):
        model.decode(z, chunk=0)


def test_jit_matches_eager():
    model = AutoencoderKL.from_config(SMALL, rngs=nnx.Rngs(0))
    x = jnp.asarray(nchw_to_nhwc(_image((3, 3, 16, 16))))

    @nnx.jit
    def roundtrip(m, x):
        mean, logvar = m.encode(x)
        return mean, logvar, m.decode(mean)

    mean, logvar = model.encode(x)
    eager = (mean, logvar, model.decode(mean))
    for a, b, what in zip(roundtrip(model, x), eager, ("mean", "logvar", "decode"), strict=True):
        assert_parity(a, b, f"jit {what}")


def test_mutation_is_caught(pair):
    """Parity must be able to fail: a spatially transposed 3x3 kernel has to be noticed."""
    name, vae, loaded, folder = pair
    z = np.random.default_rng(1).standard_normal(
        (1, 4) + tuple(s // loaded.downscale for s in _shape(name)[2:])).astype(np.float32)
    ref, z_nhwc = nchw_to_nhwc(_ref_decode(vae, z)), jnp.asarray(nchw_to_nhwc(z))
    assert_parity(loaded.decode(z_nhwc), ref, "intact decode")
    model = freeanimate_jax.load(folder)  # a fresh copy: the fixture's model stays intact
    w = model.decoder.conv_in.weight
    w[...] = w[...].transpose(1, 0, 2, 3)
    with pytest.raises(AssertionError, match="decode"):
        assert_parity(model.decode(z_nhwc), ref, "decode")


def test_deprecated_attention_names_load(pair, tmp_path):
    """Old checkpoints name the mid-block attention query/key/value/proj_attn."""
    name, vae, model, folder = pair
    if not vae.config.mid_block_add_attention:
        pytest.skip("no attention")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    renamed = {}
    for k, v in state.items():
        for new, dep in old.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{dep}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    legacy = freeanimate_jax.load(tmp_path)
    z = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, 4, 4)), jnp.float32)
    np.testing.assert_array_equal(legacy.decode(z), model.decode(z))


@pytest.mark.parametrize("change, match", [
    ({"down_block_types": ("AttnDownEncoderBlock2D", "DownEncoderBlock2D")}, "unsupported"),
    ({"up_block_types": ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")}, "unsupported"),
    ({"down_block_types": ("DownEncoderBlock2D",)}, "must match"),
    ({"act_fn": "softsign"}, "activation"),
])
def test_unsupported_config_is_a_clear_error(change, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderKL.from_config({**TINY, **change}, rngs=nnx.Rngs(0))


def test_chunks_of_sharded_frames_stay_on_their_devices():
    """16 frames over 8 devices in chunks of 8: each chunk takes one frame from every device,
    so the compiled decode has no collective and its output stays sharded (contiguous chunks
    gathered every chunk onto every device: 8x the work)."""
    from freeanimate_jax import parallel

    model = AutoencoderKL.from_config(SMALL, rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)
    decode = jax.jit(lambda st, z: nnx.merge(graph, st).decode(z, chunk=8))
    z = jax.random.normal(jax.random.key(0), (16, 8, 8, SMALL["latent_channels"]))
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    z_sharded = parallel.shard_frames(z, mesh)
    with jax.set_mesh(mesh):
        hlo = decode.lower(state, z_sharded).compile().as_text()
        out = decode(state, z_sharded)
    assert not [op for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce")
                if op in hlo]
    assert out.sharding.is_equivalent_to(parallel.frame_sharding(mesh, out.ndim), out.ndim)
    assert_parity(out, model.decode(z), "sharded chunked decode")
