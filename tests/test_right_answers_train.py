"""`run(config)` against hand-computed values (issue 11).

* The momentum buffer right after an SGD→SAM switch, for ``momentum_at_switch``
  ``reset`` and ``carry``, equals the formula computed here with ``jax.grad`` on the
  model alone (not the engine): ``m₁ = ∇L(w₀) + wd·w₀`` after the SGD epoch,
  ``d = ∇L(w₁ + ρ ĝ) + wd·w₁`` for the first SAM step, and the buffer is ``d``
  (reset) or ``d + μ·m₁`` (carry); the params follow ``w₂ = w₁ − lr·buffer``.
* A run resumed from a checkpoint written *after* the switch (the later checkpoint
  removed, as a kill right after it leaves it) ends bit for bit where the
  uninterrupted run ends, optimizer state included.

One step per epoch, constant lr, MNIST-1D and a width-4 cnn1d: all runs share the
compiled steps through run()'s process-wide cache.
"""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.data import get_dataset
from sam_jax.models import get_model
from sam_jax.train import TrainConfig, run
from sam_jax.train.checkpoint import Checkpointer, checkpoint_dir
from sam_jax.train.loop import optimizer_spec
from sam_jax.train.step import build_optimizer

from _helpers import trees_equal

LR, MU, WD, RHO = 0.05, 0.9, 5e-4, 0.05
BASE = dict(dataset="mnist1d", model="cnn1d", model_kwargs={"width": 4}, batch_size=32,
            steps_per_epoch=1, eval_batch_size=500, progress=False, lr=LR, schedule="constant",
            momentum=MU, weight_decay=WD, weight_decay_mode="decoupled", rho=RHO,
            phases="sgd:1,sam:2", keep_last=None, checkpoint_every=1, seed=0, eval_every=100,
            lambda_max_every=3, lambda_max_examples=64, lambda_max_iters=60)


def _config(workdir, **changes):
    return TrainConfig(workdir=str(workdir), **{**BASE, **changes})


@functools.lru_cache(maxsize=None)
def _model_and_init():
    """The model and its initial params (as run() initializes them: PRNGKey(seed))."""
    train = get_dataset("mnist1d", "train")
    model = get_model("cnn1d", train.num_classes, width=4)
    init = jax.jit(lambda: model.init(jax.random.PRNGKey(BASE["seed"]),
                                      jnp.zeros((2, *train.input_shape)), train=False))
    return train, model, init()["params"]


def _saved(config, epoch):
    """(params, momentum trace, whole opt_state) of ``config``'s checkpoint at ``epoch``."""
    params = _model_and_init()[2]
    phase_index = config.phase_index(epoch - 1)
    spec = optimizer_spec(config, config.phase_list[phase_index], 1)
    like = build_optimizer(spec).init(params)
    ckpt = Checkpointer(checkpoint_dir(config.workdir), read_only=True, keep_last=None)
    try:
        params = ckpt.restore_variables(epoch, params, {})[0]
        opt_state = ckpt.restore_opt_state(epoch, like)
    finally:
        ckpt.close()
    return params, opt_state[-1].trace, opt_state


def _close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


def _max_abs(tree) -> float:
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("right_answers")
    out = {"reset": run(_config(root / "reset")),
           "carry": run(_config(root / "carry", momentum_at_switch="carry"))}
    # A run killed right after its epoch-2 checkpoint (the first one after the switch):
    # a copy of the uninterrupted run without the later checkpoint, then rerun.
    killed = root / "killed"
    shutil.copytree(root / "reset", killed)
    shutil.rmtree(os.path.join(checkpoint_dir(str(killed)), "3"))
    out["resumed"] = run(_config(killed))
    return out


@pytest.fixture(scope="module")
def by_hand():
    """w₀, m₁, w₁ and the first SAM direction d at w₁, from jax.grad on the model."""
    config = _config("unused")
    train, model, w0 = _model_and_init()

    def batch(epoch):
        b = next(train.batches(config.batch_size, seed=config.seed, epoch=epoch, augment=True))
        return jnp.asarray(b["x"]), jnp.asarray(b["y"])

    @jax.jit
    def grad(params, xy):
        x, y = xy

        def loss(p):
            logits = model.apply({"params": p}, x, train=True)
            return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

        return jax.grad(loss)(params)

    add = lambda a, b, s=1.0: jax.tree.map(lambda u, v: u + s * v, a, b)
    m1 = add(grad(w0, batch(0)), w0, WD)
    w1 = add(w0, m1, -LR)
    g = grad(w1, batch(1))
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    d = add(grad(add(w1, g, RHO / (norm + 1e-12)), batch(1)), w1, WD)
    return {"w0": w0, "m1": m1, "w1": w1, "d": d}


def test_sgd_epoch_momentum_and_params_by_hand(runs, by_hand):
    for name in ("reset", "carry"):
        w1, m1, _ = _saved(runs[name].config, 1)
        _close(m1, by_hand["m1"], atol=1e-6)
        _close(w1, by_hand["w1"], atol=1e-7)


@pytest.mark.parametrize("mode", ["reset", "carry"])
def test_momentum_right_after_the_switch_by_hand(runs, by_hand, mode):
    w1, m1, _ = _saved(runs[mode].config, 1)
    w2, m2, _ = _saved(runs[mode].config, 2)
    expected = by_hand["d"] if mode == "reset" else jax.tree.map(
        lambda d, m: d + MU * m, by_hand["d"], by_hand["m1"])
    tol = 1e-5
    _close(m2, expected, atol=tol)
    _close(w2, jax.tree.map(lambda w, m: w - LR * m, w1, m2), atol=1e-7)
    # Swapping reset and carry moves the buffer by μ·m₁, far outside the tolerance.
    assert MU * _max_abs(by_hand["m1"]) > 100 * tol


def test_reset_and_carry_differ_exactly_by_the_carried_buffer(runs):
    w1r, m1r, _ = _saved(runs["reset"].config, 1)
    w1c, m1c, _ = _saved(runs["carry"].config, 1)
    assert trees_equal(w1r, w1c) and trees_equal(m1r, m1c)  # the SGD epoch is the same run
    w2r, m2r, _ = _saved(runs["reset"].config, 2)
    w2c, m2c, _ = _saved(runs["carry"].config, 2)
    _close(jax.tree.map(lambda c, r: c - r, m2c, m2r), jax.tree.map(lambda m: MU * m, m1r),
           atol=1e-7)
    # (params are O(0.3): float32 rounding of w₂ is a few 1e-8; lr·μ·m₁ is O(1e-4))
    _close(jax.tree.map(lambda r, c: r - c, w2r, w2c), jax.tree.map(lambda m: LR * MU * m, m1r),
           atol=1e-7)


def test_resume_after_the_switch_is_bit_for_bit_optimizer_state_included(runs):
    full, resumed = runs["reset"], runs["resumed"]
    assert resumed.resumed_from == 2
    assert [full.config.phase_list[full.config.phase_index(e)].name for e in (0, 1, 2)] == \
        ["sgd", "sam", "sam"]  # the kill point (epoch 2) is after the switch, mid-phase
    assert trees_equal(full.variables, resumed.variables)
    _, _, opt_full = _saved(full.config, 3)
    _, _, opt_resumed = _saved(resumed.config, 3)
    assert trees_equal(opt_full, opt_resumed)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    # Sensitivity: the buffer restored at epoch 2 is far from the fresh (zero) buffer a
    # resume that dropped the optimizer state would start from, so epoch 3's step would
    # move the params by lr·μ·m₂ ≠ 0 and the bit-for-bit check above would fail.
    _, m2, _ = _saved(full.config, 2)
    assert LR * MU * _max_abs(m2) > 1e-4


def _mean_ce(model, params, x, y):
    logits = model.apply({"params": params}, x, train=False)
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])


def test_logged_lambda_max_and_lambda_2_equal_a_dense_eigendecomposition(runs):
    """The epoch record's λ_max and λ_2 are the top two eigenvalues of the dense
    Hessian of the mean cross-entropy over the first 64 training examples."""
    from jax.flatten_util import ravel_pytree

    train, model, _ = _model_and_init()
    record = runs["reset"].history[-1]
    assert record["lambda_max_examples"] == 64
    arrays = train.subset(64).arrays()
    x, y = jnp.asarray(arrays["x"]), jnp.asarray(arrays["y"])
    flat, unravel = ravel_pytree(runs["reset"].variables["params"])
    hessian = jax.jit(jax.hessian(lambda f: _mean_ce(model, unravel(f), x, y)))(flat)
    top = np.sort(np.linalg.eigvalsh(np.asarray(hessian, np.float64)))[::-1]
    assert top[0] - top[1] > 1e-3 * top[0]  # distinct, so the order is meaningful
    assert record["lambda_max"] == pytest.approx(top[0], rel=1e-3)
    assert record["lambda_2"] == pytest.approx(top[1], rel=1e-3)


def test_logged_test_accuracy_and_loss_equal_an_independent_evaluation(runs):
    train, model, _ = _model_and_init()
    test = get_dataset("mnist1d", "test")
    x, y = jnp.asarray(test.x), jnp.asarray(test.y)
    params = runs["reset"].variables["params"]
    logits = jax.jit(lambda p: model.apply({"params": p}, x, train=False))(params)
    record = runs["reset"].history[-1]
    assert test.num_examples == 1000  # 2 eval batches of 500, no padding
    correct = int(np.sum(np.argmax(np.asarray(logits), -1) == test.y))
    assert record["test_acc"] == pytest.approx(correct / 1000, abs=1e-12)
    assert record["test_loss"] == pytest.approx(float(_mean_ce(model, params, x, y)), rel=1e-5)
