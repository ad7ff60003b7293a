"""The train step against hand computations, on 4 simulated CPU devices.

* the synced (jit + shardings) step equals the single-device step on the same
  global batch;
* the per-device (shard_map, m-sharpness) SAM step equals SGD on the mean of the
  per-shard SAM gradients computed by hand;
* BatchNorm statistics come from the clean pass only;
* weight decay modes, clipping and label smoothing against their formulas.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sam_jax.models import get_model
from sam_jax.train import parallel
from sam_jax.train.step import (OptimizerSpec, TrainState, build_optimizer, cross_entropy,
                                make_train_step)

LR, RHO = 0.1, 0.05
KEY = jax.random.PRNGKey(1)


def _spec(name="sam", rho=RHO, momentum=0.0, weight_decay=0.0, clip_norm=None):
    return OptimizerSpec(name, rho, (), momentum, False, weight_decay, clip_norm)


def _state(variables, spec):
    return TrainState(variables["params"], variables.get("batch_stats", {}),
                      build_optimizer(spec).init(variables["params"]))


@pytest.fixture(scope="module")
def mlp_problem():
    model = get_model("mlp", 10, width=8)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(16, 12)).astype(np.float32),
             "y": rng.integers(0, 10, 16).astype(np.int32)}
    variables = jax.jit(lambda k: model.init(k, batch["x"], train=False))(jax.random.PRNGKey(0))
    return model, variables, batch


class DenseBN(nn.Module):
    """The smallest model with BatchNorm (cheap to compile), same convention as sam_jax.models."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(nn.relu(x))


@pytest.fixture(scope="module")
def bn_problem():
    model = DenseBN()
    rng = np.random.default_rng(1)
    batch = {"x": rng.normal(size=(16, 12)).astype(np.float32),
             "y": rng.integers(0, 10, 16).astype(np.int32)}
    variables = jax.jit(lambda k: model.init(k, batch["x"], train=False))(jax.random.PRNGKey(0))
    return model, variables, batch


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_synced_step_equals_single_device_step(bn_problem):
    model, variables, batch = bn_problem
    assert len(jax.devices()) == 4
    spec = _spec(momentum=0.9, weight_decay=5e-4)
    step = make_train_step(model, spec, label_smoothing=0.1, l2_weight_decay=0.0)
    single_state, single_metrics = jax.jit(step)(_state(variables, spec), batch, LR, KEY)
    mesh = parallel.make_mesh()
    synced = parallel.jit_train_step(step, mesh, per_device=False)
    state, metrics = synced(_state(variables, spec), parallel.put_batch(batch, mesh), LR, KEY)
    assert state.params["Dense_0"]["kernel"].sharding.is_fully_replicated
    assert _max_diff(state.params, single_state.params) < 1e-5
    assert _max_diff(state.batch_stats, single_state.batch_stats) < 1e-5
    assert float(metrics["loss_sum"]) == pytest.approx(float(single_metrics["loss_sum"]), rel=1e-5)


def test_per_device_step_equals_mean_of_per_shard_sam_gradients(mlp_problem):
    model, variables, batch = mlp_problem
    params = variables["params"]
    spec = _spec()
    mesh = parallel.make_mesh()
    step = make_train_step(model, spec, label_smoothing=0.0, l2_weight_decay=0.0,
                           axis_name="data", sync_perturbation=False)
    per_device = parallel.jit_train_step(step, mesh, per_device=True)
    state, metrics = per_device(_state(variables, spec), parallel.put_batch(batch, mesh), LR, KEY)

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    perturbed_grads, eps_norms = [], []
    for x, y in zip(np.split(batch["x"], 4), np.split(batch["y"], 4)):
        g = jax.grad(loss)(params, x, y)
        norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g)))
        eps = jax.tree.map(lambda v: RHO * v / norm, g)
        eps_norms.append(float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(eps)))))
        perturbed_grads.append(jax.grad(loss)(jax.tree.map(jnp.add, params, eps), x, y))
    mean_grad = jax.tree.map(lambda *gs: sum(gs) / 4, *perturbed_grads)
    expected = jax.tree.map(lambda p, g: p - LR * g, params, mean_grad)
    assert _max_diff(state.params, expected) < 1e-5
    # ... and differs from the synced-epsilon step (m-sharpness matters here).
    synced_step = make_train_step(model, spec, label_smoothing=0.0, l2_weight_decay=0.0)
    synced, _ = jax.jit(synced_step)(_state(variables, spec), batch, LR, KEY)
    assert _max_diff(synced.params, expected) > 1e-6
    assert float(metrics["perturbation_norm"]) == pytest.approx(RHO, rel=1e-5)


def test_per_device_sgd_step_averages_gradients(mlp_problem):
    model, variables, batch = mlp_problem
    spec = _spec("sgd", rho=0.0)
    mesh = parallel.make_mesh()
    step = make_train_step(model, spec, label_smoothing=0.0, l2_weight_decay=0.0,
                           axis_name="data")
    state, _ = parallel.jit_train_step(step, mesh, True)(
        _state(variables, spec), parallel.put_batch(batch, mesh), LR, KEY)
    plain = make_train_step(model, spec, label_smoothing=0.0, l2_weight_decay=0.0)
    expected, _ = jax.jit(plain)(_state(variables, spec), batch, LR, KEY)
    assert _max_diff(state.params, expected.params) < 1e-6


def test_batch_stats_come_from_the_clean_pass_only(bn_problem):
    model, variables, batch = bn_problem
    spec = _spec(rho=0.5)  # a large rho makes the perturbed pass's statistics differ
    step = make_train_step(model, spec, label_smoothing=0.0, l2_weight_decay=0.0)
    state, _ = jax.jit(step)(_state(variables, spec), batch, LR, KEY)
    _, clean = model.apply(variables, batch["x"], train=True, mutable=["batch_stats"])
    assert _max_diff(state.batch_stats, clean["batch_stats"]) < 1e-6
    # the statistics at the perturbed point are different: the test can fail
    g = jax.grad(lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        model.apply({**variables, "params": p}, batch["x"], train=True,
                    mutable=["batch_stats"])[0], batch["y"])))(variables["params"])
    norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda p, v: p + 0.5 * v / norm, variables["params"], g)
    _, other = model.apply({**variables, "params": perturbed}, batch["x"], train=True,
                           mutable=["batch_stats"])
    assert _max_diff(other["batch_stats"], clean["batch_stats"]) > 1e-6


def test_weight_decay_modes_agree_for_sgd_and_differ_for_sam(mlp_problem):
    model, variables, batch = mlp_problem
    wd = 0.01
    results = {}
    for name in ("sgd", "sam"):
        decoupled_spec = _spec(name, weight_decay=wd)
        decoupled = make_train_step(model, decoupled_spec, label_smoothing=0.0, l2_weight_decay=0.0)
        in_loss_spec = _spec(name)
        in_loss = make_train_step(model, in_loss_spec, label_smoothing=0.0, l2_weight_decay=wd)
        a, _ = jax.jit(decoupled)(_state(variables, decoupled_spec), batch, LR, KEY)
        b, _ = jax.jit(in_loss)(_state(variables, in_loss_spec), batch, LR, KEY)
        results[name] = _max_diff(a.params, b.params)
    assert results["sgd"] < 1e-6  # both are p - lr (g + wd p)
    assert results["sam"] > 1e-7  # the L2 term enters the perturbation only in 'loss' mode


def test_clipping_bounds_the_final_gradient(mlp_problem):
    model, variables, batch = mlp_problem
    spec = _spec(clip_norm=1e-3)
    step = make_train_step(model, spec, label_smoothing=0.0, l2_weight_decay=0.0)
    state, _ = jax.jit(step)(_state(variables, spec), batch, LR, KEY)
    delta = jax.tree.map(jnp.subtract, state.params, variables["params"])
    norm = float(jnp.sqrt(sum(jnp.sum(d ** 2) for d in jax.tree.leaves(delta))))
    assert norm == pytest.approx(LR * 1e-3, rel=1e-4)


def test_label_smoothing_cross_entropy_formula():
    logits = jnp.array([[2.0, -1.0, 0.5]])
    log_p = np.log(np.exp(np.array(logits)) / np.exp(np.array(logits)).sum())
    target = np.array([0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3])
    assert float(cross_entropy(logits, jnp.array([1]), 0.1)[0]) == pytest.approx(
        -(target * log_p).sum(), rel=1e-6)


def test_eigen_sam_step_with_batchnorm_and_eval_mode_hvp_runs(bn_problem):
    model, variables, batch = bn_problem
    spec = OptimizerSpec("eigen_sam", RHO, (("power_iters", 3), ("refresh_every", 1)),
                         0.0, False, 0.0, None)
    state = _state(variables, spec)
    # the first step has no estimate yet (refresh at count > 0): take two steps
    step = jax.jit(make_train_step(model, spec, label_smoothing=0.0, l2_weight_decay=0.0))
    state, _ = step(state, batch, LR, KEY)
    state, metrics = step(state, batch, LR, KEY)
    assert np.isfinite(float(metrics["eigenvalue"])) and float(metrics["eigenvalue"]) != 0.0
    assert 0.0 <= float(metrics["eigen_cosine"]) <= 1.0 + 1e-6
