"""SAM in the two Flax training idioms (sam_jax/flax_train.py), checked against SAM by hand.

The model is Dense(3→4) → BatchNorm → ReLU → Dense(4→3) in linen and in NNX. The
expected step is written out with plain jnp on a dict of arrays, independently of
Flax: clean gradient g at θ, ε = ρ g / ‖g‖, gradient h at θ + ε (train-mode
BatchNorm, batch statistics), SGD with momentum m ← h + μ m, θ ← θ − lr m; the
running statistics move by the clean pass's batch mean and (biased) variance only.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.train_state import TrainState

import sam_jax
from sam_jax.flax_train import SAMTrainState, nnx_update, nnx_value_and_grad_fn, value_and_grad_fn

RHO, LR, MOMENTUM, BN_MOMENTUM, BN_EPS = 0.3, 0.2, 0.9, 0.8, 1e-5
STEPS = 3


def batches():
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(8, 3)).astype(np.float32), "y": rng.integers(0, 3, 8).astype(np.int32)}
            for _ in range(STEPS)]


def make_tx():
    return optax.chain(sam_jax.sam(RHO), optax.sgd(LR, momentum=MOMENTUM))


# ---------------------------------------------------------------- the step by hand

def hand_forward(p, x):
    h = x @ p["w1"] + p["b1"]
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    h = (h - mean) / jnp.sqrt(var + BN_EPS) * p["scale"] + p["shift"]
    return jnp.maximum(h, 0) @ p["w2"] + p["b2"], mean, var


def hand_loss(p, batch):
    logits = hand_forward(p, batch["x"])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


@jax.jit
def hand_sam_step(p, stats, momentum, batch):
    g = jax.grad(hand_loss)(p, batch)
    norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, gw: w + RHO * gw / norm, p, g)
    h = jax.grad(hand_loss)(perturbed, batch)
    _, mean, var = hand_forward(p, batch["x"])  # the clean pass's statistics
    stats = {"mean": BN_MOMENTUM * stats["mean"] + (1 - BN_MOMENTUM) * mean,
             "var": BN_MOMENTUM * stats["var"] + (1 - BN_MOMENTUM) * var}
    momentum = jax.tree.map(lambda hw, m: hw + MOMENTUM * m, h, momentum)
    return jax.tree.map(lambda w, m: w - LR * m, p, momentum), stats, momentum


def hand_sam_training(p, stats, data):
    """STEPS steps of SAM + SGD(momentum) by hand; returns params and running stats after each step."""
    momentum = jax.tree.map(jnp.zeros_like, p)
    out = []
    for batch in data:
        p, stats, momentum = hand_sam_step(p, stats, momentum, batch)
        out.append((p, stats))
    return out


def assert_tree_close(actual, expected, **tol):
    tol = {"rtol": 2e-5, "atol": 2e-6, **tol}
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), **tol)


# ---------------------------------------------------------------- linen + TrainState

class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS)(x)
        return nn.Dense(3)(nn.relu(x))


def linen_to_hand(params):
    return {"w1": params["Dense_0"]["kernel"], "b1": params["Dense_0"]["bias"],
            "scale": params["BatchNorm_0"]["scale"], "shift": params["BatchNorm_0"]["bias"],
            "w2": params["Dense_1"]["kernel"], "b2": params["Dense_1"]["bias"]}


@pytest.fixture(scope="module")
def linen_setup():
    model = LinenNet()
    variables = model.init(jax.random.key(1), jnp.ones((2, 3)))
    stats = variables["batch_stats"]["BatchNorm_0"]
    expected = hand_sam_training(linen_to_hand(variables["params"]), dict(stats), batches())
    return model, variables, expected


def linen_bn_step(state, batch):
    def loss_fn(params, batch):
        logits, new = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     batch["x"], train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), new["batch_stats"]

    state, (loss, batch_stats) = state.apply_loss(loss_fn, batch, has_aux=True)
    return state.replace(batch_stats=batch_stats), loss


def test_linen_train_state_matches_sam_by_hand(linen_setup):
    model, variables, expected = linen_setup
    state = SAMTrainState.create(apply_fn=model.apply, params=variables["params"], tx=make_tx(),
                                 batch_stats=variables["batch_stats"])
    step = jax.jit(linen_bn_step)
    for batch, (want_params, want_stats) in zip(batches(), expected):
        state, loss = step(state, batch)
        assert_tree_close(linen_to_hand(state.params), want_params)
        # running statistics from the clean pass at θ (not from θ + ε)
        assert_tree_close(dict(state.batch_stats["BatchNorm_0"]), want_stats)
    assert int(state.step) == STEPS
    assert float(sam_jax.perturbation_stats(state.opt_state)["perturbation_norm"]) == pytest.approx(RHO, rel=1e-5)


def test_linen_apply_gradients_with_grad_fn_equals_apply_loss(linen_setup):
    """The lower-level path (grads + grad_fn from value_and_grad_fn) is the same step."""
    model, variables, expected = linen_setup
    state = SAMTrainState.create(apply_fn=model.apply, params=variables["params"], tx=make_tx(),
                                 batch_stats=variables["batch_stats"])

    @jax.jit
    def step(state, batch):
        def loss_fn(params):
            logits, new = model.apply({"params": params, "batch_stats": state.batch_stats},
                                      batch["x"], train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), new
        (loss, new), grads, grad_fn = value_and_grad_fn(loss_fn, state.params, has_aux=True)
        return state.apply_gradients(grads=grads, grad_fn=grad_fn, batch_stats=new["batch_stats"])

    for batch, (want_params, want_stats) in zip(batches(), expected):
        state = step(state, batch)
    assert_tree_close(linen_to_hand(state.params), want_params)
    assert_tree_close(dict(state.batch_stats["BatchNorm_0"]), want_stats)


def test_flax_train_state_fails_with_sam_and_sam_train_state_is_flax_for_sgd(linen_setup):
    model, variables, _ = linen_setup
    params = variables["params"]
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match="needs grad_fn"):  # the problem the helper solves
        TrainState.create(apply_fn=model.apply, params=params, tx=make_tx()).apply_gradients(grads=grads)
    with pytest.raises(ValueError, match="needs grad_fn"):  # no grad_fn: Flax's behaviour
        SAMTrainState.create(apply_fn=model.apply, params=params, tx=make_tx()).apply_gradients(grads=grads)
    # a plain optax transform (no extra-args support) with and without grad_fn: Flax's step bit for bit
    tx = optax.scale(-0.5)
    flax_state = TrainState.create(apply_fn=model.apply, params=params, tx=tx).apply_gradients(grads=grads)
    ours = SAMTrainState.create(apply_fn=model.apply, params=params, tx=tx)
    for state in (ours.apply_gradients(grads=grads), ours.apply_gradients(grads=grads, grad_fn=lambda p: p)):
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state.params, flax_state.params))
        assert int(state.step) == 1


def test_rho_zero_train_state_is_sgd_bit_for_bit(linen_setup):
    model, variables, _ = linen_setup
    batch = batches()[0]
    loss_fn = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        model.apply({"params": p, "batch_stats": variables["batch_stats"]}, b["x"], train=True,
                    mutable=["batch_stats"])[0], b["y"]).mean()
    sam_state = SAMTrainState.create(apply_fn=model.apply, params=variables["params"],
                                     tx=optax.chain(sam_jax.sam(0.0), optax.sgd(LR)))
    sgd_state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(LR))
    sam_state, loss = jax.jit(lambda s, b: s.apply_loss(loss_fn, b))(sam_state, batch)
    sgd_state = jax.jit(lambda s, b: s.apply_gradients(grads=jax.grad(loss_fn)(s.params, b)))(sgd_state, batch)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), sam_state.params, sgd_state.params))
    assert float(loss) == pytest.approx(float(jax.jit(loss_fn)(variables["params"], batch)), rel=1e-6)


# ---------------------------------------------------------------- NNX + nnx.Optimizer

class NNXNet(nnx.Module):
    def __init__(self, rngs, dropout=0.0):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=BN_MOMENTUM, epsilon=BN_EPS, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.l2 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def nnx_loss(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()


def nnx_to_hand(model):
    return {"w1": model.l1.kernel[...], "b1": model.l1.bias[...], "scale": model.bn.scale[...],
            "shift": model.bn.bias[...], "w2": model.l2.kernel[...], "b2": model.l2.bias[...]}


def nnx_stats(model):
    return {"mean": model.bn.mean[...], "var": model.bn.var[...]}


@pytest.mark.parametrize("jit", [pytest.param(True, id="nnx.jit"),
                                 pytest.param(False, id="eager", marks=pytest.mark.slow)])
def test_nnx_optimizer_matches_sam_by_hand(jit):
    model = NNXNet(nnx.Rngs(2))
    expected = hand_sam_training(nnx_to_hand(model), nnx_stats(model), batches())
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

    def train_step(model, optimizer, batch):
        return nnx_update(optimizer, model, nnx_loss, batch)

    step = nnx.jit(train_step) if jit else train_step
    for batch, (want_params, want_stats) in zip(batches(), expected):
        loss = step(model, optimizer, batch)
        assert_tree_close(nnx_to_hand(model), want_params)
        assert_tree_close(nnx_stats(model), want_stats)  # the clean pass's statistics only
    assert int(optimizer.step[...]) == STEPS
    assert np.isfinite(float(loss))


def test_nnx_grad_fn_versus_a_naive_split_merge():
    """The helper's grad_fn returns the same gradients as the obvious hand-written
    split/merge grad_fn, and the same parameters after a step; but the naive one merges
    the model's own Variable objects, so its perturbed pass overwrites the model's
    BatchNorm statistics (a second EMA update, from θ + ε). The helper keeps the clean ones."""
    batch = batches()[0]
    model_naive, model_ours = NNXNet(nnx.Rngs(3)), NNXNet(nnx.Rngs(3))
    stats0 = nnx_stats(model_naive)
    graphdef, _, rest = nnx.split(model_naive, nnx.Param, ...)

    def naive_grad_fn(params):
        copy = nnx.merge(graphdef, params, rest)
        return nnx.as_pure(nnx.state(nnx.grad(nnx_loss)(copy, batch), nnx.Param))

    params0 = nnx.as_pure(nnx.state(model_ours, nnx.Param))
    _, clean_grads, grad_fn = nnx_value_and_grad_fn(nnx_loss, NNXNet(nnx.Rngs(3)), batch)
    point = jax.tree.map(lambda w: w + 0.1, params0)
    assert_tree_close(grad_fn(point), naive_grad_fn(point), rtol=0, atol=0)

    model_naive = NNXNet(nnx.Rngs(3))
    graphdef, _, rest = nnx.split(model_naive, nnx.Param, ...)
    opt_naive = nnx.Optimizer(model_naive, make_tx(), wrt=nnx.Param)
    opt_naive.update(model_naive, nnx.grad(nnx_loss)(model_naive, batch), grad_fn=naive_grad_fn)
    nnx_update(nnx.Optimizer(model_ours, make_tx(), wrt=nnx.Param), model_ours, nnx_loss, batch)
    assert_tree_close(nnx.state(model_ours, nnx.Param), nnx.state(model_naive, nnx.Param), rtol=0, atol=0)

    _, mean, var = hand_forward(jax.tree.map(np.asarray, nnx_to_hand(NNXNet(nnx.Rngs(3)))), batch["x"])
    clean = {"mean": BN_MOMENTUM * stats0["mean"] + (1 - BN_MOMENTUM) * mean,
             "var": BN_MOMENTUM * stats0["var"] + (1 - BN_MOMENTUM) * var}
    assert_tree_close(nnx_stats(model_ours), clean)
    naive_mean = np.asarray(nnx_stats(model_naive)["mean"])
    assert not np.allclose(naive_mean, np.asarray(clean["mean"]), rtol=1e-3, atol=1e-4)


def test_nnx_perturbed_pass_uses_the_clean_pass_dropout_mask():
    """With dropout, grad_fn at the current parameters returns the clean gradient exactly:
    the same mask (the RNG state before the clean pass); the model's RNG advances once."""
    model = NNXNet(nnx.Rngs(4, dropout=5), dropout=0.5)
    batch = batches()[0]
    count_before = int(model.drop.rngs.count[...])
    loss, grads, grad_fn = nnx_value_and_grad_fn(nnx_loss, model, batch)
    assert int(model.drop.rngs.count[...]) == count_before + 1
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    assert_tree_close(grad_fn(params), nnx.as_pure(nnx.state(grads, nnx.Param)), rtol=0, atol=0)
    assert int(model.drop.rngs.count[...]) == count_before + 1  # grad_fn wrote nothing back
    # and the masks differ between steps (the clean pass advanced the RNG)
    _, grads2, _ = nnx_value_and_grad_fn(nnx_loss, model, batch)
    assert not all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)))


def test_nnx_update_with_plain_sgd_is_optimizer_update():
    batch = batches()[0]
    model_a, model_b = NNXNet(nnx.Rngs(5)), NNXNet(nnx.Rngs(5))
    for tx in (optax.sgd(LR, momentum=MOMENTUM), optax.scale(-LR)):  # extra-args and plain transforms
        opt_a = nnx.Optimizer(model_a, tx, wrt=nnx.Param)
        opt_b = nnx.Optimizer(model_b, tx, wrt=nnx.Param)
        loss = nnx_update(opt_a, model_a, nnx_loss, batch)
        loss_b, grads = nnx.value_and_grad(nnx_loss)(model_b, batch)
        opt_b.update(model_b, grads)
        assert float(loss) == float(loss_b)
        assert_tree_close(nnx.state(model_a), nnx.state(model_b), rtol=0, atol=0)


def test_nnx_update_has_aux_returns_the_clean_pass_aux():
    model = NNXNet(nnx.Rngs(6))
    batch = batches()[0]

    def loss_with_logits(model, batch):
        logits = model(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), logits

    params_before = nnx_to_hand(model)
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    loss, logits = nnx_update(optimizer, model, loss_with_logits, batch, has_aux=True)
    want_logits = hand_forward(params_before, batch["x"])[0]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
    assert float(loss) == pytest.approx(float(hand_loss(params_before, batch)), rel=1e-5)


def test_exported_from_package():
    assert sam_jax.SAMTrainState is SAMTrainState and sam_jax.nnx_update is nnx_update
    assert sam_jax.nnx_value_and_grad_fn is nnx_value_and_grad_fn and sam_jax.value_and_grad_fn is value_and_grad_fn
    assert sam_jax.nnx_grad_fn is sam_jax.flax_train.nnx_grad_fn


def hand_eval_loss(p, stats, batch):
    h = batch["x"] @ p["w1"] + p["b1"]
    h = (h - stats["mean"]) / jnp.sqrt(stats["var"] + BN_EPS) * p["scale"] + p["shift"]
    logits = jnp.maximum(h, 0) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def test_nnx_eval_mode_grad_fn_uses_the_running_statistics():
    """nnx_grad_fn(eval_mode=True) is the gradient with BatchNorm on the snapshot's running
    statistics (Eigen-SAM's hvp_grad_fn); the model itself stays in train mode."""
    model = NNXNet(nnx.Rngs(7))
    data = batches()
    nnx.value_and_grad(nnx_loss)(model, data[0])          # move the running stats away from 0/1
    stats = nnx_stats(model)
    grad_fn = sam_jax.nnx_grad_fn(nnx_loss, model, data[1], eval_mode=True)
    point = jax.tree.map(lambda w: w + 0.05, nnx.as_pure(nnx.state(model, nnx.Param)))
    got = grad_fn(point)
    want = jax.grad(hand_eval_loss)(jax.tree.map(lambda w: w + 0.05, nnx_to_hand(model)), stats, data[1])
    got_hand = {"w1": got["l1"]["kernel"], "b1": got["l1"]["bias"], "scale": got["bn"]["scale"],
                "shift": got["bn"]["bias"], "w2": got["l2"]["kernel"], "b2": got["l2"]["bias"]}
    assert_tree_close(got_hand, want)
    assert model.bn.use_running_average is False and model.drop.deterministic is False
    assert_tree_close(nnx_stats(model), stats, rtol=0, atol=0)


def test_nnx_update_passes_hvp_grad_fn_to_eigen_sam():
    model = NNXNet(nnx.Rngs(8))
    tx = optax.chain(sam_jax.eigen_sam(RHO, refresh_every=1), optax.sgd(LR))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = nnx.jit(lambda m, o, b: nnx_update(o, m, nnx_loss, b, hvp_grad_fn=True))
    for batch in batches():
        step(model, optimizer, batch)
    stats = sam_jax.perturbation_stats(nnx.as_pure(optimizer.opt_state))
    assert np.isfinite(float(stats["eigenvalue"])) and float(stats["eigenvalue"]) != 0.0
    assert model.bn.use_running_average is False
