"""The README's "add your own variant" recipe, executed: one function + one declaration.

An L-infinity-ball SAM (epsilon = rho * sign(g)) registered at run time is built by
name, gives the gradient at w + rho sign(g) on a quadratic, and trains through the
engine with its cost counted (2 gradients per step) without any engine change.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sam_jax.optim import _core, registry


def linf_sam(rho=0.05, *, axis_name=None, sync_perturbation=True):
    """SAM with an L-infinity ball: epsilon = rho * sign(g)."""

    def perturb(g, params, state, grad_fn, extra_args):
        epsilon = jax.tree.map(lambda x: rho * jnp.sign(x), g)
        return epsilon, {"perturbation_norm": _core.tree_norm(epsilon)}

    return _core.perturbation_transform(perturb, rho, axis_name=axis_name,
                                        sync_perturbation=sync_perturbation, name="linf_sam")


@pytest.fixture
def registered():
    registry.register(_core.Algorithm(name="linf_sam", factory=linf_sam, title="L-inf SAM"))
    yield
    registry.ALGORITHMS.pop("linf_sam", None)
    registry.PERTURBATIONS.pop("linf_sam", None)


def test_registered_variant_gives_the_gradient_at_w_plus_rho_sign_g(registered):
    a = jnp.array([1.0, 4.0, 0.5])
    loss = lambda w: 0.5 * jnp.sum(a * w ** 2)
    w = jnp.array([0.3, -0.2, 0.0])
    tx = optax.chain(registry.make_perturbation("linf_sam", 0.1), optax.sgd(1.0))
    state = tx.init(w)
    g = jax.grad(loss)(w)
    updates, state = tx.update(g, state, w, grad_fn=jax.grad(loss))
    # By hand: g = a w = (0.3, -0.8, 0); eps = 0.1 sign(g) = (0.1, -0.1, 0);
    # grad at w + eps = a (0.4, -0.3, 0) = (0.4, -1.2, 0); SGD(lr 1) returns its negative.
    np.testing.assert_allclose(updates, -np.array([0.4, -1.2, 0.0]), rtol=1e-6)
    assert float(registry.perturbation_stats(state)["perturbation_norm"]) == pytest.approx(0.1 * np.sqrt(2))
    assert registry.gradient_evals_per_step("linf_sam") == 2.0


def test_registered_variant_trains_through_the_engine(registered, tmp_path):
    from sam_jax.train import TrainConfig, run

    result = run(TrainConfig(workdir=str(tmp_path / "run"), dataset="digits", model="mlp",
                             model_kwargs={"width": 8}, phases="sgd:1,linf_sam:1:0.001",
                             batch_size=64, steps_per_epoch=3, progress=False))
    assert [r["phase"] for r in result.history] == ["sgd", "linf_sam"]
    assert [r["grad_evals"] for r in result.history] == [3.0, 9.0]
    assert result.history[1]["perturbation_norm"] > 0
