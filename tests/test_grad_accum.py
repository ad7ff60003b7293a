"""Gradient accumulation in the engine (`make_train_step(grad_accum=K)`,
`TrainConfig.grad_accum`, `--grad-accum`), against formulas on a linear softmax
model, plus the renamed config field and the generated ``--phases`` help.

Formulas (K microbatches B_j of a batch, L_j the mean cross-entropy on B_j):
``g_j = grad L_j(w)``, ``eps_j = rho g_j / (||g_j|| + 1e-12)``,
``h_j = grad L_j(w + eps_j)``; the first step with momentum (trace starts at 0) is
``w - lr * mean_j h_j``. With K = 1 it is full-batch SAM.
"""
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.train import TrainConfig, loop
from sam_jax.train.step import OptimizerSpec, TrainState, build_optimizer, make_train_step

RHO, LR, K, N, D, C = 0.2, 0.1, 2, 8, 5, 3

_rng = np.random.default_rng(0)
BATCH = {"x": _rng.normal(size=(N, D)).astype(np.float32),
         "y": _rng.integers(0, C, size=N).astype(np.int32)}
RNG = np.array([0, 0], np.uint32)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        return nn.Dense(C)(x)


class WithBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(4)(x))
        return nn.Dense(C)(x)


def _spec(name="sam", rho=RHO):
    return OptimizerSpec(name=name, rho=rho, kwargs=(), momentum=0.9, nesterov=False,
                         weight_decay=0.0, clip_norm=None)


def _loss(params, xs, ys):  # by hand: mean cross-entropy of x W + b
    logits = xs @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(ys.shape[0]), ys])


def _sam_grad(params, xs, ys):
    g = jax.grad(_loss)(params, xs, ys)
    norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
    eps = jax.tree.map(lambda x: RHO * x / (norm + 1e-12), g)
    return jax.grad(_loss)(jax.tree.map(jnp.add, params, eps), xs, ys)


@pytest.fixture(scope="module")
def linear():
    model = Linear()
    params = model.init(jax.random.PRNGKey(1), BATCH["x"])["params"]
    steps = {k: jax.jit(make_train_step(model, _spec(), label_smoothing=0.0, l2_weight_decay=0.0,
                                        grad_accum=k)) for k in (1, K)}
    state = TrainState(params, {}, build_optimizer(_spec()).init(params))
    return model, params, steps, state


def _close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_k_microbatches_step_from_the_mean_of_per_microbatch_sam_gradients(linear):
    _, params, steps, state = linear
    new, metrics = steps[K](state, BATCH, np.float32(LR), RNG)
    m = N // K
    h = [_sam_grad(params, BATCH["x"][j * m:(j + 1) * m], BATCH["y"][j * m:(j + 1) * m])
         for j in range(K)]
    mean_h = jax.tree.map(lambda *xs: sum(xs) / K, *h)
    _close(new.params, jax.tree.map(lambda p, d: p - LR * d, params, mean_h), rtol=1e-5, atol=1e-6)
    assert int(new.opt_state[0].count) == K  # the perturbation ran per microbatch
    # metrics: sums over the whole batch, ||g|| of the full-batch clean gradient
    assert float(metrics["count"]) == N
    np.testing.assert_allclose(float(metrics["loss_sum"]),
                               N * float(_loss(params, BATCH["x"], BATCH["y"])), rtol=1e-5)
    full_g = jax.grad(_loss)(params, BATCH["x"], BATCH["y"])
    np.testing.assert_allclose(float(metrics["grad_norm"]),
                               float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(full_g)))),
                               rtol=1e-5)


def test_k1_is_full_batch_sam_and_the_plain_step_bit_for_bit(linear):
    model, params, steps, state = linear
    new, metrics = steps[1](state, BATCH, np.float32(LR), RNG)
    h = _sam_grad(params, BATCH["x"], BATCH["y"])
    _close(new.params, jax.tree.map(lambda p, d: p - LR * d, params, h), rtol=1e-5, atol=1e-6)
    plain = jax.jit(make_train_step(model, _spec(), label_smoothing=0.0, l2_weight_decay=0.0))
    ref, ref_metrics = plain(state, BATCH, np.float32(LR), RNG)
    for x, y in zip(jax.tree.leaves((new, metrics)), jax.tree.leaves((ref, ref_metrics))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sgd_accumulated_equals_the_full_batch_gradient_step(linear):
    model, params, _, _ = linear
    spec = _spec("sgd", 0.0)
    state = TrainState(params, {}, build_optimizer(spec).init(params))
    out = [jax.jit(make_train_step(model, spec, label_smoothing=0.0, l2_weight_decay=0.0,
                                   grad_accum=k))(state, BATCH, np.float32(LR), RNG)[0]
           for k in (1, 4)]
    _close(out[0].params, out[1].params, rtol=1e-6, atol=1e-7)


def test_batchnorm_gets_the_mean_of_the_microbatch_updates():
    model = WithBN()
    variables = model.init(jax.random.PRNGKey(2), BATCH["x"], train=False)
    params, stats = variables["params"], variables["batch_stats"]
    spec = _spec()
    state = TrainState(params, stats, build_optimizer(spec).init(params))
    step = jax.jit(make_train_step(model, spec, label_smoothing=0.0, l2_weight_decay=0.0,
                                   grad_accum=K))
    new, _ = step(state, BATCH, np.float32(LR), RNG)
    m = N // K
    updates = [model.apply({"params": params, "batch_stats": stats}, BATCH["x"][j * m:(j + 1) * m],
                           train=True, mutable=["batch_stats"])[1]["batch_stats"]
               for j in range(K)]
    _close(new.batch_stats, jax.tree.map(lambda *xs: sum(xs) / K, *updates), rtol=1e-6, atol=1e-7)


def test_uneven_split_is_refused(linear):
    model, params, _, state = linear
    step = make_train_step(model, _spec(), label_smoothing=0.0, l2_weight_decay=0.0, grad_accum=3)
    with pytest.raises(ValueError, match="equal microbatches"):
        step(state, BATCH, np.float32(LR), RNG)
    with pytest.raises(ValueError, match="positive integer"):
        make_train_step(model, _spec(), label_smoothing=0.0, l2_weight_decay=0.0, grad_accum=0)


@pytest.mark.parametrize("name,kwargs,kind", [
    ("sam", (), None),
    ("eigen_sam", (("power_iters", 2), ("refresh_every", 1)), True),  # a refresh step
    ("looksam", (("k", 2),), None),
])
def test_batch_epsilon_is_the_full_batch_step(linear, name, kwargs, kind):
    # accum_epsilon="batch": ascent gradient and grad_fn are microbatch means, i.e.
    # (no BN) the whole batch's, so the step equals grad_accum=1's for any member.
    model, params, _, _ = linear
    spec = OptimizerSpec(name=name, rho=RHO, kwargs=kwargs, momentum=0.9, nesterov=False,
                         weight_decay=0.0, clip_norm=None)
    state = TrainState(params, {}, build_optimizer(spec).init(params))
    out = [jax.jit(make_train_step(model, spec, label_smoothing=0.0, l2_weight_decay=0.0,
                                   grad_accum=k, accum_epsilon="batch", step_kind=kind))(
        state, BATCH, np.float32(LR), RNG) for k in (1, K)]
    _close(out[0][0].params, out[1][0].params, rtol=1e-5, atol=1e-6)
    assert int(out[1][0].opt_state[0].count) == 1  # the transform ran once
    for key in out[0][1]:
        np.testing.assert_allclose(np.asarray(out[0][1][key]), np.asarray(out[1][1][key]),
                                   rtol=1e-5, atol=1e-6)
    if name == "sam":  # and the hand formula of full-batch SAM
        h = _sam_grad(params, BATCH["x"], BATCH["y"])
        _close(out[1][0].params, jax.tree.map(lambda p, d: p - LR * d, params, h),
               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ config and engine
def test_config_validation_and_step_kind_algorithms_refused():
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        TrainConfig(batch_size=30, grad_accum=4).validate()
    with pytest.raises(ValueError, match="grad_accum must be a positive integer"):
        TrainConfig(grad_accum=0).validate()
    for phases in ("sgd:1,looksam:1", "eigen_sam:1"):
        with pytest.raises(ValueError, match="not supported for"):
            loop.check_config(TrainConfig(phases=phases, grad_accum=2))
    loop.check_config(TrainConfig(phases="sgd:1,sam:1,gsam:1", grad_accum=2))
    loop.check_config(TrainConfig(phases="looksam:1,eigen_sam:1", grad_accum=2,
                                  accum_epsilon="batch"))
    with pytest.raises(ValueError, match="accum_epsilon"):
        TrainConfig(accum_epsilon="global").validate()


def test_grad_accum_is_run_defining():
    a, b = TrainConfig(grad_accum=1), TrainConfig(grad_accum=2)
    with pytest.raises(loop.CheckpointError, match="grad_accum"):
        loop._check_resume_compatible({"config": a.to_dict()}, b, "somewhere")
    c = TrainConfig(grad_accum=2, accum_epsilon="batch")
    with pytest.raises(loop.CheckpointError, match="accum_epsilon"):
        loop._check_resume_compatible({"config": b.to_dict()}, c, "somewhere")


@pytest.mark.parametrize("per_device", [False, True])
def test_engine_run_with_grad_accum(tmp_path, per_device):
    config = TrainConfig(workdir=str(tmp_path), dataset="mnist1d", model="mlp",
                         model_kwargs={"width": 8, "depth": 1}, phases="sgd:1,sam:1",
                         batch_size=32, grad_accum=2, steps_per_epoch=2, progress=False,
                         per_device_perturbation=per_device)
    result = loop.run(config)
    assert [r["phase"] for r in result.history] == ["sgd", "sam"]
    assert result.grad_evals == 2 * 1 + 2 * 2  # per full batch: sgd 1, sam 2
    assert all(np.isfinite(r["train_loss"]) and r["perturbation_norm"] >= 0
               for r in result.history)
    assert result.history[-1]["perturbation_norm"] > 0


def test_engine_batch_epsilon_with_host_step_kinds(tmp_path):
    # Eigen-SAM (two step kinds picked on the host) under full-batch-epsilon accumulation
    # equals the run without accumulation (mlp: no BN), to float rounding.
    base = dict(dataset="mnist1d", model="mlp", model_kwargs={"width": 8, "depth": 1},
                phases="sgd:1,eigen_sam:1:0.05:refresh_every=1:power_iters=1",
                batch_size=32, steps_per_epoch=3, progress=False)
    plain = loop.run(TrainConfig(workdir=str(tmp_path / "k1"), **base))
    accum = loop.run(TrainConfig(workdir=str(tmp_path / "k2"), grad_accum=2,
                                 accum_epsilon="batch", **base))
    _close(plain.variables, accum.variables, rtol=1e-4, atol=1e-5)
    assert accum.history[-1]["eigenvalue"] != 0.0
    np.testing.assert_allclose(accum.history[-1]["eigenvalue"], plain.history[-1]["eigenvalue"],
                               rtol=1e-4)
    assert accum.grad_evals == plain.grad_evals


def test_cli_flag():
    from sam_jax.train.cli import build_parser

    args = build_parser().parse_args(["--grad-accum", "4", "--accum-epsilon", "batch"])
    assert args.grad_accum == 4 and args.accum_epsilon == "batch"


# ------------------------------------------------- host_step_kinds, generated help
def test_host_step_kinds_and_its_deprecated_alias():
    assert TrainConfig().host_step_kinds is True
    with pytest.warns(DeprecationWarning, match="host_step_kinds"):
        old = TrainConfig(eigen_refresh_on_host=False)
    assert old.host_step_kinds is False
    assert "eigen_refresh_on_host" not in old.to_dict()
    assert TrainConfig.from_dict(old.to_dict()) == old
    with warnings.catch_warnings():  # an old config.json still loads
        warnings.simplefilter("ignore", DeprecationWarning)
        assert TrainConfig.from_dict({"eigen_refresh_on_host": False}).host_step_kinds is False
    from sam_jax.train.cli import build_parser

    with pytest.warns(DeprecationWarning):
        args = vars(build_parser().parse_args(["--no-eigen-refresh-on-host"]))
        args.pop("cpu_devices")
        assert TrainConfig(**args).host_step_kinds is False


def test_phases_help_is_generated_from_the_registry():
    from sam_jax.optim import registry
    from sam_jax.train.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    for name in registry.PERTURBATIONS:
        assert f"{name} (" in text or f"{name}:" in text
    assert "refresh_every" in text and "k, eps" in text  # declared / signature options


# ------------------------------------------- the library's evaluation loop (loop.py)
def test_make_evaluator_matches_the_formula_on_every_example():
    from sam_jax.data import get_dataset
    from sam_jax.models import get_model

    test = get_dataset("mnist1d", "test").subset(130)  # 130 = 2 batches of 64 + 2 padded
    model = get_model("mlp", test.num_classes, width=8, depth=1)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *test.input_shape)))
    result = loop.make_evaluator(model, batch_size=64)(variables, test)
    arrays = test.arrays()
    logits = model.apply(variables, arrays["x"], train=False)
    losses = -jax.nn.log_softmax(logits)[np.arange(130), arrays["y"]]
    np.testing.assert_allclose(result["loss"], float(jnp.mean(losses)), rtol=1e-5)
    assert result["acc"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == arrays["y"])))
