"""make_perturbation, gradient_evals_per_step and perturbation_stats."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_jax
from sam_jax.optim import PERTURBATIONS, gradient_evals_per_step, make_perturbation, perturbation_stats

PARAMS = {"w": jnp.array([1.0, -2.0, 0.5])}
SCALES = jnp.array([3.0, 1.0, 0.5])


def grad_fn(p):  # gradient of 0.5 sum(scales * w^2)
    return {"w": SCALES * p["w"]}


def test_every_name_builds_and_steps():
    for name in PERTURBATIONS:
        tx = optax.chain(make_perturbation(name, 0.1), optax.sgd(0.1))
        state = tx.init(PARAMS)
        updates, state = tx.update(grad_fn(PARAMS), state, PARAMS, grad_fn=grad_fn)
        assert np.all(np.isfinite(updates["w"]))
        stats = perturbation_stats(state)
        if name == "sgd":
            assert stats == {}
            np.testing.assert_array_equal(updates["w"], -0.1 * grad_fn(PARAMS)["w"])
        else:
            assert float(stats["grad_norm"]) == pytest.approx(float(jnp.linalg.norm(grad_fn(PARAMS)["w"])))


def test_unknown_name_and_bad_option():
    with pytest.raises(ValueError, match="unknown perturbation"):
        make_perturbation("no_such_sam", 0.1)
    with pytest.raises(ValueError, match="sam"):
        make_perturbation("sam", 0.1, alpha=0.2)
    with pytest.raises(ValueError, match="unknown perturbation"):
        gradient_evals_per_step("adam")


def test_gradient_evals_per_step():
    assert gradient_evals_per_step("sgd") == 1
    for name in ("sam", "usam", "asam", "reverse_sam", "egr"):
        assert gradient_evals_per_step(name) == 2
    assert gradient_evals_per_step("egr", mode="hvp") == 3
    assert gradient_evals_per_step("eigen_sam") == pytest.approx(2.1)
    assert gradient_evals_per_step("eigen_sam", power_iters=10, refresh_every=10) == 4


def test_stats_found_inside_nested_states():
    injected = optax.inject_hyperparams(sam_jax.eigen_sam, static_args=("refresh_every", "power_iters"))(
        rho=0.3, refresh_every=1, power_iters=20)
    tx = optax.chain(optax.clip_by_global_norm(10.0), injected, optax.sgd(0.1, momentum=0.9))
    state = tx.init(PARAMS)
    step = jax.jit(lambda s: tx.update(grad_fn(PARAMS), s, PARAMS, grad_fn=grad_fn))
    for _ in range(2):
        _, state = step(state)
    stats = perturbation_stats(state)
    assert set(stats) == {"grad_norm", "perturbation_norm", "count", "eigenvalue", "eigen_cosine", "rho"}
    assert float(stats["rho"]) == pytest.approx(0.3)
    assert int(stats["count"]) == 2
    assert float(stats["eigenvalue"]) == pytest.approx(3.0, rel=1e-4)  # largest of SCALES
    assert perturbation_stats(optax.sgd(0.1).init(PARAMS)) == {}


@pytest.mark.parametrize("name", ["sam", "usam", "asam", "reverse_sam", "eigen_sam", "egr", "gsam",
                                  "looksam"])
def test_zero_gradient_finite_and_rho_zero_identity(name, quadratic):
    """The family contract: finite at a zero gradient; ρ = 0 returns the incoming
    gradient bit for bit under jit, with a static or an injected (traced) ρ."""
    q = quadratic
    at_min = q.minimizer()
    zero = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    options = {"refresh_every": 1} if name == "eigen_sam" else {}
    tx = make_perturbation(name, 0.1, **options)
    state = tx.init(at_min)
    for _ in range(2):
        updates, state = tx.update(zero(at_min), state, at_min, grad_fn=zero,
                                   **({"learning_rate": 0.1} if name == "gsam" else {}))
        assert np.all(np.isfinite(q.flat(updates)))
        assert np.all(np.isfinite(np.asarray(state.perturbation_norm)))
    extra = {"learning_rate": 0.1} if name == "gsam" else {}
    for tx in (make_perturbation(name, 0.0),
               # integer options (LookSAM's k) stay static; ρ is traced
               optax.inject_hyperparams(PERTURBATIONS[name],
                                        static_args=("k",) if name == "looksam" else ())(rho=0.0)):
        (out,), _ = q.run_steps(tx, 1, **extra)
        assert np.array_equal(out, q.flat(q.grad(q.params)))
