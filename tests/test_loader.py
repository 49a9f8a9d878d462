"""Loading: strict key checks, readable errors, `.bin` safety, hub ids offline, whole SD
pipelines, and the orbax cache of converted models (CPU, tiny models).

Hub tests run against a fake huggingface cache in tmp_path. huggingface_hub reads HF_HUB_CACHE
and HF_HUB_OFFLINE into `huggingface_hub.constants` when it is imported, so setting the
environment in-process is not enough: the `hub_cache` fixture sets both the environment and
those two constants (snapshot_download reads the constants at call time), so the loader runs
unchanged and never touches the network.
"""

import json
import os
import pickle
import shlex
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import freeanimate_jax  # noqa: E402
from freeanimate_jax.diffusion.ddim import SchedulerConfig, ddim_step, make_tables  # noqa: E402
from freeanimate_jax.models.clip_text import tokenize  # noqa: E402
from freeanimate_jax.weights import cache, loader  # noqa: E402
from freeanimate_jax.weights.pipeline import SDPipelineModels, load_pipeline  # noqa: E402
from tests import tiny  # noqa: E402
from tests.helpers import assert_parity, hub_snapshot, nchw_to_nhwc  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"
VAE, SD15_SCHEDULER = tiny.VAE, tiny.SD15_SCHEDULER


def _unet_inputs(seed=0, batch=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
    return x, np.array([421] * batch), rng.standard_normal((batch, 7, 32)).astype(np.float32)


def _run_unet(model, x, t, ctx):
    return np.asarray(model(jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t), jnp.asarray(ctx)))


def _one_line_error(call, *fragments):
    with pytest.raises(freeanimate_jax.WeightsError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    """(torch UNet, folder) for the tiny SD1 UNet, saved as safetensors."""
    path = tmp_path_factory.mktemp("unet")
    return tiny.save_unet(path, **tiny.SD1_UNET), path


def _copy(folder, dest):
    shutil.copytree(folder, dest)
    return dest


# --- strict loading ----------------------------------------------------------------------------

def test_missing_and_renamed_keys_are_named(unet_folder, tmp_path):
    _, folder = unet_folder
    path = _copy(folder, tmp_path / "unet")
    state = load_file(str(path / WEIGHTS))
    del state["conv_in.bias"]
    state["mid_block.attentions.0.proj_inn.weight"] = state.pop(
        "mid_block.attentions.0.proj_in.weight")
    save_file(state, str(path / WEIGHTS))
    with pytest.raises(freeanimate_jax.WeightsError) as info:
        freeanimate_jax.load(path)
    msg = str(info.value)
    assert "missing:    conv_in.bias\n" in msg + "\n"
    assert ("missing:    mid_block.attentions.0.proj_in.weight (found "
            "'mid_block.attentions.0.proj_inn.weight' instead: renamed?)") in msg
    assert "unexpected: mid_block.attentions.0.proj_inn.weight" in msg
    assert str(path) in msg.splitlines()[0]


def test_misshaped_keys_name_both_shapes(unet_folder, tmp_path):
    _, folder = unet_folder
    path = _copy(folder, tmp_path / "unet")
    state = load_file(str(path / WEIGHTS))
    state["conv_out.bias"] = np.zeros(5, np.float32)  # model: 4 output channels
    state["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)  # model: 3x3 kernel
    save_file(state, str(path / WEIGHTS))
    with pytest.raises(freeanimate_jax.WeightsError) as info:
        freeanimate_jax.load(path)
    msg = str(info.value)
    assert "wrong shape: conv_out.bias: checkpoint (5,) (after transpose), model (4,)" in msg
    # Conv kernels are compared in our (H, W, in, out) layout.
    assert ("wrong shape: conv_in.weight: checkpoint (1, 1, 4, 32) (after transpose), "
            "model (3, 3, 4, 32)") in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_unreadable_folders_are_one_line_errors(tmp_path):
    _one_line_error(lambda: freeanimate_jax.load(tmp_path / "nope"), "nope",
                    "no such folder, and not a hub id")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(lambda: freeanimate_jax.load(empty), "no config.json")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    _one_line_error(lambda: freeanimate_jax.load(unknown), "'UNet3DConditionModel'",
                    f"supported: {sorted(loader.MODEL_CLASSES)}", "'UNet2DConditionModel'")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"_class_name": "AutoencoderKL",')
    _one_line_error(lambda: freeanimate_jax.load(broken), "config.json: not valid JSON")
    no_weights = _copy(unknown, tmp_path / "no_weights")
    (no_weights / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **VAE}))
    _one_line_error(lambda: freeanimate_jax.load(no_weights), "no weights")


# --- pickled .bin weights -----------------------------------------------------------------------

def test_bin_weights_load_like_safetensors(unet_folder, tmp_path):
    ref, folder = unet_folder
    ref.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    assert not (tmp_path / WEIGHTS).exists()
    from_bin, from_st = freeanimate_jax.load(tmp_path), freeanimate_jax.load(folder)
    for a, b in zip(jax.tree.leaves(nnx.state(from_bin)), jax.tree.leaves(nnx.state(from_st)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.sentinel))}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(unet_folder, tmp_path, writer):
    _, folder = unet_folder
    path = tmp_path / "evil"
    path.mkdir()
    shutil.copy(folder / "config.json", path)
    sentinel = tmp_path / "pwned"
    obj = {"conv_in.weight": _Payload(sentinel)}
    if writer == "torch.save":
        torch.save(obj, path / "diffusion_pytorch_model.bin")
    else:
        (path / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(obj))
    _one_line_error(lambda: freeanimate_jax.load(path), "refused or unreadable pickle",
                    "weights_only=True")
    assert not sentinel.exists()
    # The payload is live: plain unpickling would have run it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()


# --- hub ids, offline ---------------------------------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface cache, offline; returns a function that publishes a folder in it."""
    import huggingface_hub.constants as hf_constants

    root = tmp_path / "hf_home"
    hub = root / "hub"
    hub.mkdir(parents=True)
    for key, value in (("HF_HOME", root), ("HF_HUB_CACHE", hub), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def publish(repo_id, folder):
        snapshot = hub_snapshot(hub, repo_id)
        shutil.copytree(folder, snapshot, dirs_exist_ok=True)
        return snapshot

    return publish


def test_hub_id_loads_from_the_cache(unet_folder, hub_cache):
    ref, folder = unet_folder
    snapshot = hub_cache("owner/tiny-unet", folder)
    model = freeanimate_jax.load("owner/tiny-unet")
    assert loader.resolve_folder("owner/tiny-unet") == snapshot
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    assert_parity(_run_unet(model, x, t, ctx), nchw_to_nhwc(want.numpy()), "hub unet")


def test_unknown_hub_id_offline_is_one_line(hub_cache):
    _one_line_error(lambda: freeanimate_jax.load("owner/does-not-exist"),
                    "owner/does-not-exist: could not download from the hub",
                    "LocalEntryNotFoundError")


# --- whole pipelines ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory):
    """(torch pipeline, torch ControlNet, pipeline folder, ControlNet folder)."""
    tmp = tmp_path_factory.mktemp("sd")
    pipe = tiny.save_sd_pipeline(tmp, tmp / "sd")
    controlnet = tiny.save_controlnet(tmp / "cn", **tiny.CONTROLNET)
    return pipe, controlnet, tmp / "sd", tmp / "cn"


def _check_pipeline(ours: SDPipelineModels, pipe, controlnet):
    """Prompt -> text embedding -> ControlNet + UNet -> one DDIM step -> VAE decode, each
    against the torch components."""
    assert isinstance(ours, SDPipelineModels)
    assert ours.scheduler == SchedulerConfig.from_dict(SD15_SCHEDULER)
    ids = tokenize(ours.tokenizer, ["lower newer", "wider"])
    ref_ids = pipe.tokenizer(["lower newer", "wider"], padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    emb = ours.text_encoder(jnp.asarray(ids))
    with torch.no_grad():
        ref_emb = pipe.text_encoder(ref_ids).last_hidden_state
    assert_parity(emb, ref_emb.numpy(), "text embedding")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    cond = rng.uniform(0, 1, (2, 3, 64, 64)).astype(np.float32)
    sched = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(10)
    t = int(sched.timesteps[0])
    with torch.no_grad():
        down, mid = controlnet(torch.from_numpy(x), t, ref_emb, torch.from_numpy(cond),
                               return_dict=False)
        ref_eps = pipe.unet(torch.from_numpy(x), t, ref_emb, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
        ref_prev = sched.step(ref_eps, t, torch.from_numpy(x)).prev_sample
        ref_img = pipe.vae.decode(ref_prev / pipe.vae.config.scaling_factor).sample
    xj, tj = jnp.asarray(nchw_to_nhwc(x)), jnp.asarray([t, t])
    down_j, mid_j = ours.controlnet(xj, tj, emb, jnp.asarray(nchw_to_nhwc(cond)))
    eps = ours.unet(xj, tj, emb, down_block_additional_residuals=down_j,
                    mid_block_additional_residual=mid_j)
    assert_parity(eps, nchw_to_nhwc(ref_eps.numpy()), "unet(controlnet) output")
    prev = ddim_step(make_tables(ours.scheduler, 10), eps, t, xj)
    assert_parity(prev, nchw_to_nhwc(ref_prev.numpy()), "DDIM step")
    img = ours.vae.decode(prev / ours.vae.scaling_factor)
    assert_parity(img, nchw_to_nhwc(ref_img.numpy()), "vae decode")
    assert np.abs(ref_eps.numpy()).max() > 0.1 and np.abs(ref_img.numpy()).max() > 0.1


def test_pipeline_folder_matches_torch(sd_folders):
    pipe, controlnet, sd, cn = sd_folders
    assert not (sd / "safety_checker").exists()
    ours = load_pipeline(sd, controlnet=cn)
    _check_pipeline(ours, pipe, controlnet)
    assert load_pipeline(sd).controlnet is None


def test_pipeline_hub_id_downloads_only_what_it_reads(sd_folders, hub_cache):
    pipe, controlnet, sd, cn = sd_folders
    hub_cache("owner/tiny-sd", sd)
    hub_cache("owner/tiny-cn", cn)
    _check_pipeline(load_pipeline("owner/tiny-sd", controlnet="owner/tiny-cn"), pipe, controlnet)
    from huggingface_hub.utils import filter_repo_objects

    from freeanimate_jax.weights.pipeline import hub_patterns
    repo = ["model_index.json", "unet/config.json", f"unet/{WEIGHTS}",
            "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.non_ema.safetensors",
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
            "text_encoder/config.json", "text_encoder/model.safetensors",
            "text_encoder/model.fp16.safetensors", "text_encoder/flax_model.msgpack",
            "vae/config.json", f"vae/{WEIGHTS}", "vae/diffusion_flax_model.msgpack",
            "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
            "safety_checker/config.json", "safety_checker/model.safetensors",
            "feature_extractor/preprocessor_config.json", "v1-5-pruned.safetensors",
            "v1-5-pruned.ckpt", "unet/diffusion_pytorch_model.onnx"]
    got = set(filter_repo_objects(repo, allow_patterns=hub_patterns(),
                                  ignore_patterns=loader._HUB_IGNORE))
    assert got == {"model_index.json", "unet/config.json", f"unet/{WEIGHTS}",
                   "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                   "text_encoder/config.json", "text_encoder/model.safetensors",
                   "vae/config.json", f"vae/{WEIGHTS}", "tokenizer/vocab.json",
                   "tokenizer/merges.txt", "scheduler/scheduler_config.json"}


def test_pipeline_missing_component_is_named(sd_folders, tmp_path):
    _, _, sd, cn = sd_folders
    broken = _copy(sd, tmp_path / "sd")
    shutil.rmtree(broken / "vae")
    msg = _one_line_error(lambda: load_pipeline(broken), "missing vae/",
                          "AutoencoderKL: config.json")
    assert "unet" not in msg and "text_encoder" not in msg
    shutil.rmtree(broken / "scheduler")
    _one_line_error(lambda: load_pipeline(broken), "missing vae/", "missing scheduler/")
    wrong = _copy(sd, tmp_path / "wrong")
    _one_line_error(lambda: load_pipeline(wrong, controlnet=wrong / "unet"),
                    "holds a UNet2DConditionModel, not a ControlNetModel")


# --- orbax cache of converted models ------------------------------------------------------------

def _leaves(model):
    return jax.tree.leaves(nnx.state(model))


def test_save_and_load_converted_is_bit_identical(unet_folder, tmp_path):
    _, folder = unet_folder
    model = freeanimate_jax.load(folder)
    out = cache.save_converted(model, tmp_path / "converted")
    assert cache.is_complete(out)
    restored = cache.load_converted(out)
    assert type(restored) is type(model) and restored.config == model.config
    for a, b in zip(_leaves(restored), _leaves(model), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    x, t, ctx = _unet_inputs(1)
    np.testing.assert_array_equal(_run_unet(restored, x, t, ctx), _run_unet(model, x, t, ctx))
    # The GraphDef (config included) stays hashable: usable as a jit static argument.
    graphdef, state = nnx.split(restored)
    hash(graphdef)
    jitted = jax.jit(lambda g, s, *a: nnx.merge(g, s)(*a), static_argnums=0)
    assert_parity(jitted(graphdef, state, *map(jnp.asarray, (nchw_to_nhwc(x), t, ctx))),
                  _run_unet(model, x, t, ctx), "jit of restored model", tol=1e-5)
    with pytest.raises(freeanimate_jax.WeightsError, match="already exists"):
        cache.save_converted(model, out)
    # Casting on restore, and a bf16 save keeps its dtype.
    as_bf16 = cache.load_converted(out, dtype=jnp.bfloat16)
    assert {x.dtype for x in _leaves(as_bf16)} == {jnp.dtype(jnp.bfloat16)}
    out16 = cache.save_converted(as_bf16, tmp_path / "bf16")
    assert {x.dtype for x in _leaves(cache.load_converted(out16))} == {jnp.dtype(jnp.bfloat16)}


def test_failed_save_leaves_nothing_behind(unet_folder, tmp_path):
    _, folder = unet_folder
    model = freeanimate_jax.load(folder)
    with pytest.raises(TypeError):  # fails after orbax wrote the params
        cache.save_converted(model, tmp_path / "converted", config={"bad": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def counted_reads(monkeypatch):
    """Counts calls to the real weight reader (it still does all the work)."""
    calls = []
    real = loader.read_weights

    def counting(folder):
        calls.append(folder)
        return real(folder)

    monkeypatch.setattr(loader, "read_weights", counting)
    return calls


def test_cache_dir_converts_once(unet_folder, tmp_path, counted_reads):
    _, folder = unet_folder
    src = _copy(folder, tmp_path / "unet")
    store = tmp_path / "cache"
    first = freeanimate_jax.load(src, cache_dir=store)
    assert len(counted_reads) == 1
    (entry,) = store.iterdir()
    assert cache.is_complete(entry) and entry.name.startswith("unet-")
    second = freeanimate_jax.load(src, cache_dir=store)
    assert len(counted_reads) == 1  # restored from orbax, not re-read
    x, t, ctx = _unet_inputs(2)
    np.testing.assert_array_equal(_run_unet(second, x, t, ctx), _run_unet(first, x, t, ctx))
    # Another dtype, or changed weights, is another entry.
    freeanimate_jax.load(src, cache_dir=store, dtype=jnp.bfloat16)
    assert len(counted_reads) == 2 and len(list(store.iterdir())) == 2
    os.utime(src / WEIGHTS, ns=(1, 1))
    freeanimate_jax.load(src, cache_dir=store)
    assert len(counted_reads) == 3 and len(list(store.iterdir())) == 3


# orbax abandons its other read futures when one array fails to restore; their asyncio cleanup
# reports "Event loop is closed" after the (correctly raised) error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_half_written_entry_is_never_used(unet_folder, tmp_path, counted_reads):
    """A directory at the entry path without the completion marker (a crash, a copy, garbage)
    is refused by load_converted and treated as a miss by load: converted again, replaced."""
    _, folder = unet_folder
    store = tmp_path / "cache"
    entry = store / cache.cache_key(folder, jnp.float32)
    (entry / "params").mkdir(parents=True)
    (entry / "params" / "manifest.ocdbt").write_bytes(b"\x00garbage")
    (entry / "config.json").write_text("{not json")
    _one_line_error(lambda: cache.load_converted(entry), "not a complete converted checkpoint")
    (store / f".{entry.name}.staging-0000").mkdir()  # an interrupted save's leftover
    model = freeanimate_jax.load(folder, cache_dir=store)
    assert len(counted_reads) == 1 and cache.is_complete(entry)
    again = freeanimate_jax.load(folder, cache_dir=store)
    assert len(counted_reads) == 1
    for a, b in zip(_leaves(again), _leaves(model), strict=True):
        np.testing.assert_array_equal(a, b)
    # Damaged after completion (marker present, data truncated): an error naming the entry,
    # never zeros, and no silent reconversion.
    data = [f for f in (entry / "params").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert data
    for f in data:
        f.write_bytes(f.read_bytes()[:100])
    for call in (lambda: cache.load_converted(entry),
                 lambda: freeanimate_jax.load(folder, cache_dir=store)):
        _one_line_error(call, str(entry), "unreadable converted checkpoint", "delete it")
    assert len(counted_reads) == 1


def test_pipeline_cache_dir_converts_each_model_once(sd_folders, tmp_path, counted_reads):
    _, _, sd, cn = sd_folders
    first = load_pipeline(sd, controlnet=cn, cache_dir=tmp_path / "cache")
    assert len(counted_reads) == 4 and len(list((tmp_path / "cache").iterdir())) == 4
    second = load_pipeline(sd, controlnet=cn, cache_dir=tmp_path / "cache")
    assert len(counted_reads) == 4
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        a, b = getattr(first, name), getattr(second, name)
        assert type(a) is type(b) and a.config == b.config
        for x, y in zip(_leaves(a), _leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
