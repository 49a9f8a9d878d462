"""The VAE objective (`train.objective=vae`) against diffusers: the loss and every VAE gradient
of MSE(decode(mean + std x eps), x) + kl_weight x DiagonalGaussianDistribution.kl() equal a
PyTorch step on the same AutoencoderKL. A run of it (`freeanimate toy build`'s first stage) is
in tests/test_toy_family.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import freeanimate_jax
from freeanimate_jax.train import state as train_state
from freeanimate_jax.train import step
from freeanimate_jax.train.settings import NoiseConfig
from freeanimate_jax.weights.convert import export_state_dict
from tests import tiny
from tests.helpers import assert_parity

KL_WEIGHT = 0.05  # large enough that the KL's gradient is a visible part of the total


@pytest.fixture(scope="module")
def grads(tmp_path_factory):
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("vae_parity")
    ref = tiny.randomize(AutoencoderKL(**tiny.VAE), seed=3)
    ref.save_pretrained(root / "vae")
    g = torch.Generator().manual_seed(0)
    b, f, size = 2, 2, 32
    x = torch.rand(b * f, 3, size, size, generator=g) * 2 - 1
    eps = torch.randn(b * f, 4, size // 2, size // 2, generator=g)

    ref.zero_grad(set_to_none=True)
    posterior = ref.encode(x).latent_dist
    z = posterior.mean + posterior.std * eps
    rec = ref.decode(z).sample
    loss = torch.nn.functional.mse_loss(rec, x) + KL_WEIGHT * posterior.kl().mean()
    loss.backward()
    ref_grads = {n: p.grad.numpy().copy() for n, p in ref.named_parameters()}

    ours = freeanimate_jax.load(root / "vae")
    graphdef, trained, frozen = train_state.split(ours, ".")
    nhwc = lambda v: jnp.asarray(  # noqa: E731
        v.permute(0, 2, 3, 1).numpy().reshape(b, f, *v.shape[2:], v.shape[1]))
    inputs = {"pixels": nhwc(x), "eps": nhwc(eps)}
    cfg = step.StepConfig(noise=NoiseConfig(), caption_dropout=0.0, grad_accum=1, seed=0,
                          objective="vae", kl_weight=KL_WEIGHT)
    value_and_grad = jax.jit(jax.value_and_grad(step.vae_loss_fn), static_argnums=(2, 5))
    our_loss, our_grads = value_and_grad(trained, frozen, graphdef, inputs, None, cfg)
    merged = nnx.merge(graphdef, our_grads, frozen, copy=True)
    return {"ref_loss": float(loss.detach()), "loss": float(our_loss), "ref": ref_grads,
            "ours": export_state_dict(merged),
            "kl": float(posterior.kl().mean().detach())}


def test_loss_and_every_vae_gradient_equal_diffusers(grads):
    assert_parity(grads["loss"], grads["ref_loss"], "loss")
    assert grads["kl"] * KL_WEIGHT > 0.05 * grads["ref_loss"]  # the KL term is really in it
    assert sorted(grads["ours"]) == sorted(grads["ref"])
    for name, ref in grads["ref"].items():
        assert np.max(np.abs(ref)) > 0, f"{name}: zero reference gradient"
        assert_parity(grads["ours"][name], ref, f"grad {name}")
