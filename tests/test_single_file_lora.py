"""Single-file SD checkpoints and LoRA merging (CPU, tiny models, offline).

The single file is a tiny diffusers pipeline written in the original (CompVis) layout by a small
reverse key map (a test utility; `load_single_file` uses diffusers' forward conversion, so a wrong
map fails the round trip). LoRA reference: diffusers' `load_lora_weights` + `fuse_lora` (peft).
"""

import json
import os
import shlex
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from freeanimate_jax import WeightsError  # noqa: E402
from freeanimate_jax.weights import single_file  # noqa: E402
from freeanimate_jax.weights.convert import export_state_dict  # noqa: E402
from freeanimate_jax.weights.lora import ldm_unet_path, merge_lora  # noqa: E402
from freeanimate_jax.weights.pipeline import load_pipeline  # noqa: E402
from freeanimate_jax.weights.single_file import load_single_file  # noqa: E402
from tests import tiny  # noqa: E402

VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, latent_channels=4,
           sample_size=32, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2)
VOCAB = "l o w e r s t i d n lo l</w> w</w> r</w> t</w> low</w> er</w> lowest</w> newer</w> " \
        "wider <unk> <|startoftext|> <|endoftext|>".split()
LORA_FILE = "pytorch_lora_weights.safetensors"


def _one_line_error(call, *fragments):
    with pytest.raises(WeightsError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and all(f in msg for f in fragments), (fragments, msg)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(torch pipeline, its diffusers folder) of a tiny random SD 1.x pipeline."""
    tmp = tmp_path_factory.mktemp("sd")
    (tmp / "tok").mkdir()
    (tmp / "tok" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (tmp / "tok" / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    text_encoder = tiny.randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=1000, max_position_embeddings=77, bos_token_id=21, eos_token_id=22,
        pad_token_id=22)), 5)
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny.randomize(diffusers.AutoencoderKL(**VAE), 3), text_encoder=text_encoder,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tmp / "tok", model_max_length=77),
        unet=tiny.randomize(diffusers.UNet2DConditionModel(**tiny.SD1_UNET), 4),
        scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1,
                                          clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp / "sd")
    return pipe, tmp / "sd"


# --- test utility: diffusers -> original (CompVis) layout, tiny SD 1.x only ---------------------

UNET_LAYOUT = (tiny.SD1_UNET["layers_per_block"],
               ["CrossAttn" in t for t in tiny.SD1_UNET["up_block_types"]])


def _vae_to_ldm(state, config):
    n, out = len(config["block_out_channels"]), {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    renames = [("conv_norm_out", "norm_out"), ("conv_shortcut", "nin_shortcut"),
               ("mid_block.attentions.0.", "mid.attn_1.")]
    renames += [(f"mid_block.resnets.{j}.", f"mid.block_{j + 1}.") for j in range(2)]
    for i in range(n):  # the original numbers decoder blocks from the bottom
        renames += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                    (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                    (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                    (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    for k, v in state.items():
        for old, new in renames:
            k = k.replace(old, new)
        if ".attn_1." in k:
            head, rest = k.split(".attn_1.")
            layer, leaf = rest.rsplit(".", 1)
            k = f"{head}.attn_1.{attn[layer]}.{leaf}"
            v = v[:, :, None, None] if v.ndim == 2 else v  # the original stores 1x1 convs
        out[f"first_stage_model.{k}"] = v
    return out


@pytest.fixture(scope="module")
def checkpoint(sd, tmp_path_factory):
    """The tiny pipeline as one original-layout .safetensors file."""
    from safetensors.torch import save_file

    pipe, path = sd[0], tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"
    state = {f"model.diffusion_model.{ldm_unet_path(k, *UNET_LAYOUT)}": v
             for k, v in pipe.unet.state_dict().items()}
    state.update(_vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    state.update({f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
                  for k, v in pipe.text_encoder.state_dict().items()})
    # as in real files: a CLIP buffer and scheduler tables, which conversion ignores
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77)[None]
    state["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def folder_models(sd):
    """`load_pipeline` of the tiny folder: the reference (read only: merges would change it)."""
    return load_pipeline(sd[1])


def _assert_same_models(a, b):
    for name in ("unet", "vae", "text_encoder"):
        ma, mb = getattr(a, name), getattr(b, name)
        assert type(ma) is type(mb) and ma.config == mb.config
        for x, y in zip(jax.tree.leaves(nnx.state(ma)), jax.tree.leaves(nnx.state(mb)),
                        strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    assert a.scheduler == b.scheduler
    prompt = ["lower newer", "wider"]
    assert a.tokenizer(prompt).input_ids == b.tokenizer(prompt).input_ids


# --- single-file checkpoints --------------------------------------------------------------------

def test_single_file_equals_the_folder_and_converts_once(sd, folder_models, checkpoint, tmp_path,
                                                         monkeypatch):
    folder, conversions, real = sd[1], [], single_file._convert  # counts diffusers conversions
    monkeypatch.setattr(single_file, "_convert", lambda *a: conversions.append(a) or real(*a))
    store = tmp_path / "cache"
    first = load_single_file(checkpoint, config=folder, cache_dir=store)
    assert len(conversions) == 1
    (entry,) = store.iterdir()
    assert entry.name.startswith("tiny-sd15-") and single_file.is_complete(entry)
    _assert_same_models(first, folder_models)
    second = load_single_file(checkpoint, config=folder, cache_dir=store)
    assert len(conversions) == 1  # loaded from the cached diffusers folder
    _assert_same_models(second, first)
    bf16 = load_single_file(checkpoint, config=folder, cache_dir=store, dtype=jnp.bfloat16)
    assert len(conversions) == 1
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16.unet))} == {jnp.dtype(jnp.bfloat16)}
    # A changed file is another entry; an unfinished entry (no marker) is converted again.
    os.utime(checkpoint, ns=(1, 1))
    load_single_file(checkpoint, config=folder, cache_dir=store)
    assert len(conversions) == 2 and len(list(store.iterdir())) == 2
    (store / single_file.cache_key(checkpoint, folder) / single_file.MARKER).unlink()
    load_single_file(checkpoint, config=folder, cache_dir=store)
    assert len(conversions) == 3 and len(list(store.iterdir())) == 2
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_config_from_an_offline_hub_cache(sd, folder_models, checkpoint, tmp_path, monkeypatch):
    """A hub id as `config` comes from the huggingface cache offline (configs only)."""
    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "hub" / "models--owner--tiny-sd"
    shutil.copytree(sd[1], repo / "snapshots" / ("0" * 40),
                    ignore=shutil.ignore_patterns("*.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    models = load_single_file(checkpoint, config="owner/tiny-sd", cache_dir=tmp_path / "c")
    _assert_same_models(models, folder_models)
    _one_line_error(lambda: load_single_file(checkpoint, config="owner/absent"),
                    "owner/absent: could not download from the hub")


def test_ckpt_pickles_load_only_with_weights_only(sd, folder_models, checkpoint, tmp_path):
    from safetensors.torch import load_file

    class Payload:  # unpickling it runs a shell command
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(sentinel))}",)

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(checkpoint)), "global_step": 7}, ckpt)
    _assert_same_models(load_single_file(ckpt, config=sd[1], cache_dir=tmp_path / "c"),
                        folder_models)
    evil, sentinel = tmp_path / "evil.ckpt", tmp_path / "pwned"
    torch.save({"state_dict": {"model.diffusion_model.x": Payload()}}, evil)
    _one_line_error(lambda: load_single_file(evil, config=sd[1], cache_dir=tmp_path / "c"),
                    "refused or unreadable pickle", "weights_only=True")
    assert not sentinel.exists()


def test_files_that_are_not_sd_checkpoints(sd, checkpoint, tmp_path):
    state, zero = load_np(str(checkpoint)), np.zeros((4, 4), np.float32)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    cases = {"none.safetensors": "no such file", "notes.txt": "unsupported single-file type '.txt'",
             "junk.safetensors": "not a readable safetensors file"}
    tensors = {"lora": ({"lora_unet_conv_in.lora_down.weight": zero}, "looks like a LoRA"),
               "unet": (load_np(str(sd[1] / "unet" / "diffusion_pytorch_model.safetensors")),
                        "not a Stable Diffusion 1.x checkpoint: looks like a diffusers-format"),
               "sdxl": ({"conditioner.embedders.1.model.x": zero}, "looks like an SDXL"),
               "no_vae": ({k: v for k, v in state.items() if not k.startswith("first_stage")},
                          "no first_stage_model.* (vae) keys")}
    for name, (content, fragment) in tensors.items():
        save_np(content, str(tmp_path / f"{name}.safetensors"))
        cases[f"{name}.safetensors"] = fragment
    for name, fragment in cases.items():
        _one_line_error(lambda n=name: load_single_file(tmp_path / n, config=sd[1],
                                                        cache_dir=tmp_path / "c"), fragment)
    assert not (tmp_path / "c").exists()  # refused before any conversion


def test_incomplete_or_foreign_checkpoints_are_one_line(sd, checkpoint, tmp_path):
    state = load_np(str(checkpoint))
    unet_key, te_key = ("model.diffusion_model.out.2.bias",
                        "cond_stage_model.transformer.text_model.final_layer_norm.bias")
    cases = [({te_key: None}, "weights missing from the file: text_encoder.final_layer_norm.bias"),
             ({unet_key: None}, "weights the config needs are missing"),
             ({unet_key: np.zeros(5, np.float32)}, "conv_out.bias expected shape")]
    for i, (edit, fragment) in enumerate(cases):
        broken = {k: v for k, v in {**state, **edit}.items() if v is not None}
        save_np(broken, str(tmp_path / f"{i}.safetensors"))
        _one_line_error(lambda n=i: load_single_file(tmp_path / f"{n}.safetensors", config=sd[1],
                                                     cache_dir=tmp_path / "c"), fragment)
    assert not list((tmp_path / "c").iterdir())  # nothing half-written is kept


# --- LoRA ---------------------------------------------------------------------------------------

SCALE = 0.7


def _diffusers_fused(folder, lora_dir, weight_name=None):
    """The reference: diffusers' own LoRA loading and `fuse_lora` (unet + text encoder)."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(lora_dir, weight_name=weight_name)
    pipe.fuse_lora(lora_scale=SCALE, components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    return {name: {k: v.numpy() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("unet", "text_encoder")}


@pytest.fixture(scope="module")
def peft_lora(sd, tmp_path_factory):
    """(LoRA folder, adapter configs, reference merged unet/text_encoder state dicts)."""
    pytest.importorskip("peft")  # diffusers' LoRA loading needs it; only the LoRA tests skip
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    out = tmp_path_factory.mktemp("lora")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd[1], safety_checker=None)
    torch.manual_seed(0)
    # init_lora_weights=False: random up weights too, so every delta is non-zero
    cfg = {"unet": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                              target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                              "proj_out", "ff.net.2", "conv1", "time_emb_proj"],
                              alpha_pattern={"attn2.to_k": 2}),
           "text_encoder": LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj", "out_proj", "fc1"])}
    pipe.unet.add_adapter(cfg["unet"])
    # peft's own entry: transformers 5's `add_adapter` wants a newer peft than PyPI has.
    inject_adapter_in_model(cfg["text_encoder"], pipe.text_encoder)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=cfg["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=cfg["text_encoder"].to_dict())
    return out, cfg, _diffusers_fused(sd[1], out)


def _merged(folder, lora, scale=SCALE):
    models = load_pipeline(folder)
    return models, merge_lora(models, lora, scale=scale)


def _assert_merged_like(models, reference, what):
    for name in ("unet", "text_encoder"):
        ours = export_state_dict(getattr(models, name))
        ref = {k.removeprefix("text_model."): v for k, v in reference[name].items()
               if not k.endswith("position_ids")}
        assert set(ours) == set(ref), f"{what} {name}"
        for k, v in ours.items():
            np.testing.assert_allclose(v, ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{what} {k}")


def test_peft_lora_matches_diffusers_fuse(sd, folder_models, peft_lora):
    lora, _, reference = peft_lora
    models, count = _merged(sd[1], lora)
    # UNet: 11 layers per transformer (6), conv1 + time_emb_proj per resnet (12); CLIP: 4 x 2
    changed = sum(not np.array_equal(a, b) for m in ("unet", "text_encoder")
                  for a, b in zip(export_state_dict(getattr(models, m)).values(),
                                  export_state_dict(getattr(folder_models, m)).values(),
                                  strict=True))
    assert count == changed == 6 * 11 + 12 * 2 + 2 * 4
    _assert_merged_like(models, reference, "peft")


def _kohya(lora, cfg, naming):
    """The PEFT LoRA in kohya naming: diffusers module names or original-SD ones."""
    out = {}
    for key, value in load_np(str(lora / LORA_FILE)).items():  # unet.<m>.lora_A -> lora_unet_<m>
        component, rest = key.split(".", 1)
        module, kind = rest.split(".lora_")
        alpha = 2 if "attn2.to_k" in module else cfg[component].lora_alpha  # alpha_pattern
        if naming == "ldm" and component == "unet":
            module = ldm_unet_path(module, *UNET_LAYOUT)
        name = ("lora_unet_" if component == "unet" else "lora_te_text_model_") + module
        name = name.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = np.array(alpha, np.float16)
    return out


@pytest.mark.parametrize("naming", ["diffusers", "ldm"])
def test_kohya_lora_equals_the_peft_lora(sd, peft_lora, tmp_path, naming):
    lora, cfg, reference = peft_lora
    state = _kohya(lora, cfg, naming)
    if naming == "ldm":  # e.g. a down-block attention and an up-block resnet's conv1
        assert {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_output_blocks_3_0_in_layers_2.alpha"} <= set(state)
    save_np(state, str(tmp_path / "kohya.safetensors"))
    models, _ = _merged(sd[1], tmp_path / "kohya.safetensors")
    _assert_merged_like(models, reference, f"kohya ({naming})")


def test_kohya_file_is_what_diffusers_reads(sd, peft_lora, tmp_path):
    """The kohya files above are real kohya: diffusers fuses them like we merge them. (Without
    the attn2.to_k layers, whose other alpha diffusers 0.42 drops for kohya files: its
    alpha_pattern keys keep `.lora.down.weight` and match nothing.)"""
    state = _kohya(*peft_lora[:2], "diffusers")
    save_np({k: v for k, v in state.items() if "attn2_to_k" not in k},
            str(tmp_path / "kohya.safetensors"))
    models, _ = _merged(sd[1], tmp_path / "kohya.safetensors")
    _assert_merged_like(models, _diffusers_fused(sd[1], tmp_path, "kohya.safetensors"),
                        "kohya vs diffusers")


def test_old_diffusers_naming(sd, peft_lora, tmp_path):
    """`processor.to_q_lora.down` / `lora.down` / `lora_linear_layer.down` keys (no alphas: scale
    1) merge like the same tensors in PEFT naming without adapter metadata."""
    renames = {".attn1.to_q": ".attn1.processor.to_q_lora.", ".proj_in": ".proj_in.lora.",
               ".attn2.to_out.0": ".attn2.processor.to_out_lora.",
               ".mlp.fc1": ".mlp.fc1.lora_linear_layer.",
               ".self_attn.q_proj": ".self_attn.to_q_lora."}
    old, plain = {}, {}
    for key, value in load_np(str(peft_lora[0] / LORA_FILE)).items():
        module, kind = key.split(".lora_")
        end = next((e for e in renames if module.endswith(e)), None)
        if end is not None:
            module = module.replace("text_encoder.", "text_encoder.text_model.")
            old[f"{module.removesuffix(end)}{renames[end]}{'down' if kind[0] == 'A' else 'up'}"
                f".weight"] = plain[key] = value
    assert len(old) == 2 * (6 * 3 + 2 * 2)  # 6 transformer blocks, 2 CLIP layers
    save_np(old, str(tmp_path / "old.safetensors"))
    save_np(plain, str(tmp_path / "plain.safetensors"))
    ours, count = _merged(sd[1], tmp_path / "old.safetensors", scale=1.3)
    ref, ref_count = _merged(sd[1], tmp_path / "plain.safetensors", scale=1.3)
    assert count == ref_count == 22
    refs = {n: export_state_dict(getattr(ref, n)) for n in ("unet", "text_encoder")}
    _assert_merged_like(ours, refs, "old naming")


def test_lora_for_another_base_changes_nothing(sd, peft_lora, tmp_path):
    state, models = load_np(str(peft_lora[0] / LORA_FILE)), load_pipeline(sd[1])
    before = export_state_dict(models.unet)

    def check(tensors, *fragments):
        save_np(tensors, str(tmp_path / "bad.safetensors"))
        _one_line_error(lambda: merge_lora(models, tmp_path / "bad.safetensors"),
                        "LoRA for a different base model?", *fragments)
        for k, v in export_state_dict(models.unet).items():  # all-or-nothing
            np.testing.assert_array_equal(v, before[k])

    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    check({**state, key: np.zeros((4, 768), np.float32)},  # SD1.5's 768-wide text context
          f"{key}: down (4, 768) / up (32, 4) vs linear layer (in 32, out 32)")
    check({**state, "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight":
           np.zeros((2, 32), np.float32)}, "text_encoder_2.", "SDXL")
    check({**state, "unet.down_blocks.7.resnets.0.conv1.lora_A.weight": np.zeros((4, 32, 3, 3))},
          "no layer unet.down_blocks.7.resnets.0.conv1")
    kohya = _kohya(*peft_lora[:2], "diffusers")
    kohya["lora_unet_input_blocks_40_1_proj_in.lora_down.weight"] = np.zeros((4, 32), np.float32)
    kohya["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"] = np.array(1.0, np.float32)
    check(kohya, "lora_unet_input_blocks_40_1_proj_in.lora_down.weight: no such layer",
          "lora_te2_")
    check({k: v for k, v in state.items() if "lora_B" not in k}, "no matching up weight")
    check({"unet.conv_in.lora_magnitude_vector": np.zeros(32, np.float32)}, "unsupported key")
    _one_line_error(lambda: merge_lora(models, tmp_path / "absent.safetensors"),
                    "no such LoRA file")
