"""The attention contract: captures, RA-SA anchoring, IBA injection, and the TPU kernel path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import freeanimate_jax
from freeanimate_jax import parallel
from freeanimate_jax.models.attention import (
    Attention,
    AttnControl,
    LayerInputs,
    Runtime,
    attention_paths,
    dot_product_attention,
)
from tests import tiny
from tests.helpers import assert_parity, nchw_to_nhwc, np_anchored_attention


def test_ra_sa_equals_hand_written_anchored_attention():
    layer = Attention(16, heads=2, dim_head=8, rngs=nnx.Rngs(0))
    layer.path = "layer"
    x = jax.random.normal(jax.random.key(1), (3, 6, 16))
    anchor = jax.random.normal(jax.random.key(2), (1, 5, 16))
    out = layer(x, None, AttnControl(inputs={"layer": LayerInputs(anchor=anchor)}))
    expected = np_anchored_attention(layer, x, anchor, heads=2)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)
    # And anchoring is not a no-op.
    assert float(jnp.max(jnp.abs(out - layer(x)))) > 1e-3


def test_in_batch_anchor_equals_explicit_anchor():
    layer = Attention(16, heads=2, dim_head=8, rngs=nnx.Rngs(0))
    layer.path = "down.attn1"
    x = jax.random.normal(jax.random.key(3), (4, 6, 16))
    ctrl = AttnControl(anchor_index=(3, 3, 3, 3), anchor_layers=("*attn1",))
    explicit = AttnControl(inputs={"down.attn1": LayerInputs(anchor=x[3:4])})
    np.testing.assert_array_equal(np.asarray(layer(x, None, ctrl)),
                                  np.asarray(layer(x, None, explicit)))
    # The anchor element itself attends to [h; h]: duplicated keys leave softmax unchanged.
    np.testing.assert_allclose(np.asarray(layer(x, None, ctrl)[3]), np.asarray(layer(x)[3]),
                               atol=1e-6)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_maps_and_hidden_injection_give_equal_layer_outputs(cross):
    layer = Attention(16, cross_attention_dim=12 if cross else None, heads=2, dim_head=8,
                      rngs=nnx.Rngs(4))
    layer.path = "l"
    keys = jax.random.split(jax.random.key(5), 4)
    h_pre, h_now = (jax.random.normal(k, (2, 9, 16)) for k in keys[:2])
    context = jax.random.normal(keys[2], (2, 7, 12)) if cross else None
    anchor = None if cross else jax.random.normal(keys[3], (1, 9, 16))
    inversion = AttnControl(inputs={"l": LayerInputs(anchor=anchor)}, capture_hidden=("l",),
                            capture_maps=("l",))
    layer(h_pre, context, inversion)
    cache = inversion.captured["l"]
    np.testing.assert_array_equal(np.asarray(cache["hidden"]), np.asarray(h_pre))
    lk = 7 if cross else 18
    assert cache["maps"].shape == (2, 2, 9, lk)
    out_maps = layer(h_now, context, AttnControl(
        inputs={"l": LayerInputs(anchor=anchor, maps=cache["maps"])}))
    out_hidden = layer(h_now, context, AttnControl(
        inputs={"l": LayerInputs(anchor=anchor, hidden=cache["hidden"])}))
    assert_parity(out_maps, out_hidden, "maps vs hidden injection", tol=1e-5)
    assert float(jnp.max(jnp.abs(out_hidden - layer(h_now, context)))) > 1e-3
    if cross:  # same prompt: IBA cross-attention equals the inversion's own output
        assert_parity(out_hidden, layer(h_pre, context), "IBA cross = inversion cross", tol=1e-5)


def test_captures_equal_the_layers_actual_inputs(tmp_path):
    """Our captured `hidden` for every attention layer equals what diffusers' layer of the same
    name receives, and the contract's layer paths are diffusers' module names."""
    ref_model = tiny.save_unet(tmp_path, **tiny.SD1_UNET)
    ours = freeanimate_jax.load(tmp_path)
    seen = {}

    def hook(name):
        def pre(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).detach().numpy()
        return pre

    for name, module in ref_model.named_modules():
        if type(module).__name__ == "Attention":
            module.register_forward_pre_hook(hook(name), with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        ref_model(x, 250, ctx)
    ctrl = AttnControl(capture_hidden=("*",))
    ours(jnp.asarray(nchw_to_nhwc(x)), 250, jnp.asarray(ctx.numpy()), attn=ctrl)
    captured = ctrl.captured
    assert set(captured) == set(seen) == set(attention_paths(ours))
    assert len(seen) == 12  # 2 down + 3 up transformers + mid, each with attn1 and attn2
    for path, ref in seen.items():
        assert_parity(captured[path]["hidden"], ref, f"captured input of {path}")


def test_unet_maps_and_hidden_injection_are_equal(tmp_path):
    """IBA at model level: the preview pass's caches injected as maps or as hidden inputs."""
    tiny.save_unet(tmp_path, **tiny.SD1_UNET)
    unet = freeanimate_jax.load(tmp_path)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    z_pre, z_now = jax.random.normal(k1, (2, 8, 8, 4)), jax.random.normal(k2, (2, 8, 8, 4))
    ctx = jax.random.normal(k3, (2, 7, 32))
    iba = ("*attn1", "*attn2")
    inversion = AttnControl(capture_hidden=iba, capture_maps=iba)
    unet(z_pre, 500, ctx, attn=inversion)
    cache = inversion.captured
    as_maps = {p: LayerInputs(maps=c["maps"]) for p, c in cache.items()}
    as_hidden = {p: LayerInputs(hidden=c["hidden"]) for p, c in cache.items()}
    out_maps = unet(z_now, 500, ctx, attn=AttnControl(inputs=as_maps))
    out_hidden = unet(z_now, 500, ctx, attn=AttnControl(inputs=as_hidden))
    assert_parity(out_maps, out_hidden, "unet with maps vs hidden IBA", tol=1e-5)
    assert float(jnp.max(jnp.abs(out_hidden - unet(z_now, 500, ctx)))) > 1e-3


def test_xla_kernel_matches_jax_reference():
    q, k, v = (jax.random.normal(key, (2, 33, 4 * 40)) for key in
               jax.random.split(jax.random.key(0), 3))
    ours = dot_product_attention(q, k, v, heads=4)
    ref = jax.nn.dot_product_attention(*(t.reshape(2, 33, 4, 40) for t in (q, k, v)),
                                       implementation="xla").reshape(2, 33, 160)
    assert_parity(ours, ref, "xla kernel", tol=1e-5)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        Runtime(kernel="flash")


def test_misspelt_layer_inputs_are_an_error():
    with pytest.raises(TypeError):
        LayerInputs(iba_gates=True)  # there is no such field: nothing is silently ignored
    with pytest.raises(TypeError, match="expected LayerInputs"):
        AttnControl(inputs={"l": {"anchor": jnp.zeros((1, 2, 3))}})


def _v5e_mesh():
    from jax.experimental import topologies

    return parallel.make_mesh(devices=topologies.get_topology_desc("v5e:2x2", "tpu").devices)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [40, 80, 160])
def test_tpu_flash_kernel_compiles_ahead_of_time_for_v5e(head_dim):
    from jax.sharding import NamedSharding

    mesh = _v5e_mesh()
    heads = 320 * (head_dim // 40) // head_dim
    sharded = NamedSharding(mesh, parallel.frames_spec(1))
    q = jax.ShapeDtypeStruct((8, 1024, heads * head_dim), jnp.bfloat16, sharding=sharded)
    kv = jax.ShapeDtypeStruct((8, 2048, heads * head_dim), jnp.bfloat16, sharding=sharded)

    runtime = parallel.runtime(mesh)
    assert runtime.kernel == "tpu_flash"  # the mesh's platform picks the kernel

    def f(q, k, v):
        return dot_product_attention(q, k, v, heads, runtime=runtime)

    with parallel.use(mesh):
        lowered = jax.jit(f).lower(q, kv, kv)
        compiled = lowered.compile()
    assert "tpu_custom_call" in lowered.as_text()  # the Pallas kernel, not an XLA fallback
    assert compiled.memory_analysis().argument_size_in_bytes > 0


@pytest.mark.slow
def test_tiny_unet_compiles_for_v5e_with_the_flash_kernel(tmp_path):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _v5e_mesh()
    from freeanimate_jax.weights.loader import build

    abstract = build(
        dict(tiny.SD1_UNET, _class_name="UNet2DConditionModel"), abstract=True,
        param_dtype=jnp.bfloat16)
    graphdef, state = nnx.split(abstract)
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                         state)
    sharded = NamedSharding(mesh, parallel.frames_spec(4))
    x = jax.ShapeDtypeStruct((8, 32, 32, 4), jnp.bfloat16, sharding=sharded)
    ctx = jax.ShapeDtypeStruct((8, 77, 32), jnp.bfloat16,
                               sharding=NamedSharding(mesh, parallel.frames_spec(3)))
    ctrl_runtime = parallel.runtime(mesh)

    def f(state, x, ctx):
        return nnx.merge(graphdef, state)(x, 500, ctx, attn=AttnControl(runtime=ctrl_runtime))

    with parallel.use(mesh):
        lowered = jax.jit(f).lower(state, x, ctx)
        mem = lowered.compile().memory_analysis()
    assert lowered.as_text().count("tpu_custom_call") >= 2
    assert mem.argument_size_in_bytes > 0
