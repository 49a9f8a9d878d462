"""CLIPTextModel parity with transformers' CLIPTextModel, loading layouts, and tokenize()."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import freeanimate_jax  # noqa: E402
from freeanimate_jax.models.clip_text import CLIPTextModel, tokenize  # noqa: E402
from freeanimate_jax.models.layers import LayerNorm  # noqa: E402
from freeanimate_jax.weights.convert import parameter_names  # noqa: E402
from tests.helpers import assert_parity  # noqa: E402

VOCAB, LENGTH = 1000, 77


def _torch_clip(**overrides):
    """A tiny random transformers CLIPTextModel (special token ids inside the tiny vocab)."""
    cfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
               vocab_size=VOCAB, max_position_embeddings=LENGTH, hidden_act="quick_gelu",
               bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    cfg.update(overrides)
    torch.manual_seed(0)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()


def _ids(batch=2, length=LENGTH, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length), dtype=np.int64)


def _ref(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(torch model, our model loaded through `freeanimate_jax.load`) for the quick_gelu CLIP."""
    path = tmp_path_factory.mktemp("clip")
    model = _torch_clip()
    model.save_pretrained(path)
    return model, freeanimate_jax.load(path)


def test_saved_keys_have_no_prefix_and_equal_our_paths(saved, tmp_path):
    """transformers 5 writes `embeddings.*`, `encoder.layers.*`, `final_layer_norm.*`."""
    model, ours = saved
    model.save_pretrained(tmp_path)
    keys = sorted(load_file(str(tmp_path / "model.safetensors")))
    assert keys == parameter_names(ours)
    assert "encoder.layers.2.self_attn.out_proj.weight" in keys


@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu", "layer_norm_eps": 1e-6,
                                            "num_hidden_layers": 2}])
def test_parity_last_hidden_state(tmp_path, overrides):
    model = _torch_clip(**overrides)
    model.save_pretrained(tmp_path)
    ours = freeanimate_jax.load(tmp_path)
    ids = _ids()
    err = assert_parity(ours(jnp.asarray(ids)), _ref(model, ids), "last_hidden_state")
    print(f"clip {overrides or 'quick_gelu'}: max abs err {err:.2e}")


def test_hub_layout_with_prefix_and_position_ids(saved, tmp_path):
    """SD1.5's text_encoder/model.safetensors: `text_model.` keys and a position_ids buffer."""
    model, _ = saved
    model.save_pretrained(tmp_path)
    state = {f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(LENGTH).expand(1, -1).contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    ours = freeanimate_jax.load(tmp_path)
    ids = _ids(seed=1)
    err = assert_parity(ours(jnp.asarray(ids)), _ref(model, ids), "hub layout")
    print(f"hub layout: max abs err {err:.2e}")


def test_strict_loading_still_rejects_unknown_keys(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path)
    state = {f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state["text_model.text_projection.weight"] = torch.zeros(32, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(freeanimate_jax.WeightsError, match="text_projection"):
        freeanimate_jax.load(tmp_path)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers_convention(saved, clip_skip):
    model, ours = saved
    ids = _ids(seed=2)
    with torch.no_grad():
        hidden = model(torch.from_numpy(ids), output_hidden_states=True).hidden_states
        ref = model.final_layer_norm(hidden[-(clip_skip + 1)]).numpy()
    err = assert_parity(ours(jnp.asarray(ids), clip_skip=clip_skip), ref, f"clip_skip={clip_skip}")
    print(f"clip_skip={clip_skip}: max abs err {err:.2e}")
    # The skipped layers really are skipped: the output differs from the plain one.
    assert not np.allclose(ours(jnp.asarray(ids)), ref, atol=1e-3)


def test_output_hidden_states_match_transformers(saved):
    model, ours = saved
    ids = _ids(seed=3)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    last, hidden = ours(jnp.asarray(ids), output_hidden_states=True)
    assert len(hidden) == len(ref.hidden_states) == 4
    assert_parity(last, ref.last_hidden_state.numpy(), "last_hidden_state")
    for i, (h, r) in enumerate(zip(hidden, ref.hidden_states, strict=True)):
        assert_parity(h, r.numpy(), f"hidden_states[{i}]")


def test_shorter_sequence_and_bad_arguments(saved):
    model, ours = saved
    ids = _ids(length=9, seed=4)
    assert_parity(ours(jnp.asarray(ids)), _ref(model, ids), "length 9")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(jnp.zeros((1, LENGTH + 1), jnp.int32))
    with pytest.raises(ValueError, match="clip_skip"):
        ours(jnp.asarray(ids), clip_skip=4)


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_jit_matches_eager_and_torch(saved, clip_skip):
    """Under jit: the same numbers as eager up to fp32 rounding, and parity with transformers.

    Not bitwise: XLA fuses the attention softmax under jit, which moves some logits by one ulp
    (6e-8) in the first layer; three layers and the final norm grow that to ~1e-6.
    """
    model, ours = saved
    ids = _ids(seed=5)
    graphdef, state = nnx.split(ours)

    @jax.jit
    def run(state, ids):
        return nnx.merge(graphdef, state)(ids, clip_skip=clip_skip)

    jitted = run(state, jnp.asarray(ids, jnp.int32))
    eager = ours(jnp.asarray(ids, jnp.int32), clip_skip=clip_skip)
    err = assert_parity(jitted, eager, "jit vs eager", tol=1e-5)
    print(f"jit vs eager (clip_skip={clip_skip}): max abs diff {err:.2e}")
    with torch.no_grad():
        hidden = model(torch.from_numpy(ids), output_hidden_states=True).hidden_states
        ref = model.final_layer_norm(hidden[-((clip_skip or 0) + 1)]).numpy()
    assert_parity(jitted, ref, "jit vs transformers")


def test_mutation_layernorm_eps_is_detected(tmp_path):
    """Flax's LayerNorm eps (1e-6) instead of PyTorch's (1e-5) must fail the parity check.

    eps matters relative to the variance of what is normalised. transformers' init (embedding
    std 0.02, variance 4e-4) already shows the mutation at ~50x the parity bound; scaling the
    embeddings by 0.05 (variance ~1e-6, eps's own size) makes it ~4000x, so the test does not
    hinge on the seed. The scaled model is still a valid checkpoint, and it passes unmutated.
    """
    model = _torch_clip(num_hidden_layers=2)
    with torch.no_grad():
        model.embeddings.token_embedding.weight.mul_(0.05)
        model.embeddings.position_embedding.weight.mul_(0.05)
    model.save_pretrained(tmp_path)
    ours = freeanimate_jax.load(tmp_path)
    ids = _ids(seed=6)
    ref = _ref(model, ids)
    assert_parity(ours(jnp.asarray(ids)), ref, "unmutated")
    norms = [node for _, node in nnx.iter_graph(ours) if isinstance(node, LayerNorm)]
    assert len(norms) == 2 * 2 + 1
    for norm in norms:
        norm.eps = 1e-6
    mutated = np.asarray(ours(jnp.asarray(ids)))
    with pytest.raises(AssertionError, match="max abs error"):
        assert_parity(mutated, ref, "eps mutated")
    err, bound = np.abs(mutated - ref).max(), 1e-4 * max(1.0, np.abs(ref).max())
    print(f"eps mutation: max abs err {err:.2e} = {err / bound:.0f}x the parity bound")
    assert err > 100 * bound


def test_bad_config_values_fail_clearly():
    base = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=VOCAB, max_position_embeddings=LENGTH)
    for bad, match in (({"hidden_act": "relu"}, "hidden_act"),
                       ({"num_attention_heads": 5}, "divisible"),
                       ({"layer_norm_eps": 0}, "layer_norm_eps"),
                       ({"num_hidden_layers": 0}, "num_hidden_layers")):
        with pytest.raises(ValueError, match=match):
            CLIPTextModel.from_config({**base, **bad}, rngs=nnx.Rngs(0))


@pytest.fixture
def tokenizer(tmp_path):
    """A tiny CLIP BPE tokenizer (transformers' own test vocabulary), saved and reloaded."""
    vocab = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>",
             "t</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>",
             "<|startoftext|>", "<|endoftext|>"]
    src, out = tmp_path / "src", tmp_path / "tokenizer"
    src.mkdir()
    (src / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (src / "merges.txt").write_text("\n".join(["#version: 0.2", "l o", "lo w</w>", "e r</w>", ""]))
    transformers.CLIPTokenizer.from_pretrained(src, model_max_length=LENGTH).save_pretrained(out)
    return transformers.CLIPTokenizer.from_pretrained(out)


def test_tokenize_pads_and_truncates_like_encode_prompt(tokenizer):
    prompts = ["lower newer", "lowest wider " * 50, ""]
    ids = tokenize(tokenizer, prompts)
    assert ids.shape == (3, LENGTH) and ids.dtype == np.int32
    ref = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True).input_ids
    np.testing.assert_array_equal(ids, np.asarray(ref))
    eos = tokenizer.eos_token_id
    assert ids[0, 0] == tokenizer.bos_token_id and ids[1, -1] == eos and ids[2, 1] == eos
    np.testing.assert_array_equal(tokenize(tokenizer, "lower newer"), ids[:1])
    assert tokenize(tokenizer, prompts, max_length=10).shape == (3, 10)
