"""The engine's train step against hand-computed values (issue 11).

* One and two SAM steps with momentum and decoupled weight decay on a linear
  softmax model equal the update written out in float64 numpy:
  ``g = ∇L(w)``, ``ε = ρ g/(‖g‖+1e-12)``, ``d = ∇L(w+ε) + wd·w``,
  ``m ← d + μ m``, ``w ← w − lr·m`` (PyTorch-style decoupled decay before the
  momentum, after the perturbation). The plausible wrong chains (decay before the
  perturbation: SAM loses it; decay after the momentum) are computed here too and
  shown to be far outside the tolerance.
* Eigen-SAM's eigenvalue after refreshes on a BatchNorm model equals the top
  eigenvalue of the *eval-mode* (running statistics) Hessian from ``jax.hessian``,
  and is far from the train-mode (batch statistics) one.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sam_jax.train.step import OptimizerSpec, TrainState, build_optimizer, make_train_step

# ------------------------------------------------------------ SAM + momentum + wd


class Linear(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes, use_bias=False)(x)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    w0 = (0.5 * rng.normal(size=(4, 3))).astype(np.float32)
    return x, y, w0


def _ce_grad(w, x, y, l2=0.0):
    """Gradient of mean softmax cross-entropy of logits x @ w (+ 0.5·l2·‖w‖²), float64."""
    z = x @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return x.T @ p / len(y) + l2 * w


def _sam_direction(w, x, y, rho, l2=0.0):
    g = _ce_grad(w, x, y, l2)
    eps = rho * g / (np.linalg.norm(g) + 1e-12)
    return _ce_grad(w + eps, x, y, l2)


def _expected(w0, x, y, lr, rho, mu, wd, steps, order="right", l2=0.0):
    w, m = w0.astype(np.float64), np.zeros_like(w0, np.float64)
    for _ in range(steps):
        if order == "right":  # perturbation -> add_decayed_weights -> trace
            d = _sam_direction(w, x, y, rho, l2) + wd * w
            m = d + mu * m
            w = w - lr * m
        elif order == "decay_before_perturbation":  # SAM replaces g+wd·w by ∇L(w+ε)
            g = _ce_grad(w, x, y) + wd * w
            eps = rho * g / (np.linalg.norm(g) + 1e-12)
            m = _ce_grad(w + eps, x, y) + mu * m
            w = w - lr * m
        elif order == "decay_after_momentum":
            m = _sam_direction(w, x, y, rho) + mu * m
            w = w - lr * (m + wd * w)
    return w, m


LR, RHO, MU, WD = 0.5, 0.2, 0.9, 0.1


def _run_steps(spec, steps, l2=0.0):
    x, y, w0 = _data()
    step = jax.jit(make_train_step(Linear(), spec, label_smoothing=0.0, l2_weight_decay=l2))
    params = {"Dense_0": {"kernel": jnp.asarray(w0)}}
    state = TrainState(params, {}, build_optimizer(spec).init(params))
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    for _ in range(steps):
        state, _ = step(state, batch, jnp.float32(LR), jnp.zeros(2, jnp.uint32))
    w = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
    trace = np.asarray(state.opt_state[-1].trace["Dense_0"]["kernel"], np.float64)
    return w, trace


@pytest.mark.parametrize("steps", [1, 2])
def test_sam_step_with_momentum_and_decoupled_weight_decay_by_hand(steps):
    spec = OptimizerSpec("sam", RHO, (), MU, False, WD, None)
    w, trace = _run_steps(spec, steps)
    x, y, w0 = _data()
    w_exp, m_exp = _expected(w0, x, y, LR, RHO, MU, WD, steps)
    tol = 2e-6
    np.testing.assert_allclose(w, w_exp, atol=tol, rtol=0)
    np.testing.assert_allclose(trace, m_exp, atol=tol, rtol=0)
    # The wrong chain orders give values far outside the tolerance (the test would fail).
    # (decay after the momentum is the same as before it on the first step)
    for order in ("decay_before_perturbation",) + (("decay_after_momentum",) if steps > 1 else ()):
        w_bad, _ = _expected(w0, x, y, LR, RHO, MU, WD, steps, order=order)
        assert np.max(np.abs(w_bad - w_exp)) > 1000 * tol, order
    # and so does dropping the perturbation or the momentum
    assert np.max(np.abs(_expected(w0, x, y, LR, 0.0, MU, WD, steps)[0] - w_exp)) > 1000 * tol
    if steps == 2:
        assert np.max(np.abs(_expected(w0, x, y, LR, RHO, 0.0, WD, steps)[0] - w_exp)) > 1000 * tol


def test_sam_step_with_l2_in_the_loss_by_hand():
    """weight_decay_mode='loss': the L2 term is part of the loss SAM perturbs, so it
    enters both the ascent gradient and the gradient at w + ε."""
    spec = OptimizerSpec("sam", RHO, (), MU, False, 0.0, None)
    w, _ = _run_steps(spec, 2, l2=WD)
    x, y, w0 = _data()
    w_exp, _ = _expected(w0, x, y, LR, RHO, MU, 0.0, 2, l2=WD)
    np.testing.assert_allclose(w, w_exp, atol=2e-6, rtol=0)
    w_decoupled, _ = _expected(w0, x, y, LR, RHO, MU, WD, 2)
    assert np.max(np.abs(w_decoupled - w_exp)) > 1e-3


# ----------------------------------------------------- Eigen-SAM's eval-mode HVP


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Dense(3)(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        return nn.Dense(2)(jnp.tanh(h))


@pytest.fixture(scope="module")
def bn_problem():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, 16), jnp.int32)
    model = BNNet()
    variables = model.init(jax.random.key(0), x, train=False)
    # Running statistics far from the batch's: eval-mode and train-mode curvature differ.
    stats = {"BatchNorm_0": {"mean": jnp.array([0.8, -0.6, 0.3]),
                             "var": jnp.array([0.2, 3.0, 0.5])}}
    params = variables["params"]
    flat, unravel = ravel_pytree(params)

    def loss(flat_params, train):
        variables = {"params": unravel(flat_params), "batch_stats": stats}
        if train:
            logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(variables, x, train=False)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(16), y])

    hessian = jax.jit(jax.hessian(loss), static_argnums=1)
    spectra = {mode: np.linalg.eigvalsh(np.asarray(hessian(flat, mode == "train"), np.float64))
               for mode in ("eval", "train")}
    return model, params, stats, {"x": x, "y": y}, spectra


def _dominant(spectrum):
    order = np.argsort(-np.abs(spectrum))
    return spectrum[order[0]], abs(spectrum[order[1]]) / abs(spectrum[order[0]])


def test_eigen_sam_refresh_reports_the_eval_mode_hessian_eigenvalue(bn_problem):
    model, params, stats, batch, spectra = bn_problem
    lam_eval, ratio_eval = _dominant(spectra["eval"])
    lam_train, _ = _dominant(spectra["train"])
    # The problem is well posed for power iteration and separates the two modes.
    assert ratio_eval < 0.7
    # Every Rayleigh quotient of the train-mode Hessian (what a train-mode HVP's power
    # iteration reports) lies in its spectrum, far below the eval-mode top eigenvalue.
    assert np.max(np.abs(spectra["train"])) < 0.8 * lam_eval

    reported = _eigen_sam_eigenvalue(model, params, stats, batch, eval_mode_curvature=True)
    assert reported == pytest.approx(lam_eval, rel=1e-3)
    assert abs(reported - lam_train) > 100 * 1e-3 * abs(lam_eval)


def test_eigen_sam_train_mode_hvp_reports_the_train_mode_eigenvalue(bn_problem):
    """The planted bug (HVP in train mode), reached through the engine's own switch:
    the reported value is then the train-mode one, which the test above rejects."""
    model, params, stats, batch, spectra = bn_problem
    reported = _eigen_sam_eigenvalue(model, params, stats, batch, eval_mode_curvature=False)
    lam_train, ratio_train = _dominant(spectra["train"])
    assert ratio_train < 0.8  # 60 warm-started iterations: error ~ 0.8**120
    assert reported == pytest.approx(lam_train, rel=1e-3)
    assert abs(reported - _dominant(spectra["eval"])[0]) > 0.2


def _eigen_sam_eigenvalue(model, params, stats, batch, eval_mode_curvature):
    spec = OptimizerSpec("eigen_sam", 0.05,
                         (("power_iters", 4), ("refresh_every", 1), ("steps_per_epoch", 1000)),
                         0.0, False, 0.0, None)
    step = jax.jit(make_train_step(model, spec, label_smoothing=0.0, l2_weight_decay=0.0,
                                   eval_mode_curvature=eval_mode_curvature, step_kind=True))
    state = TrainState(params, stats, build_optimizer(spec).init(params))
    # lr = 0 keeps the point fixed; resetting the running statistics keeps the eval-mode
    # Hessian fixed, so each refresh continues the same warm-started power iteration.
    for _ in range(15):
        state, metrics = step(state, batch, jnp.float32(0.0), jnp.zeros(2, jnp.uint32))
        state = state._replace(batch_stats=stats)
    reported = float(state.opt_state[0].eigenvalue)
    assert float(metrics["eigenvalue"]) == reported
    return reported
