"""Models: logits shapes, BatchNorm collections, train/eval modes, parameter
counts against the published numbers, and the patch CNN against its formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.models import ResNet, get_model, model_names, noise_memorization, signal_learning
from sam_jax.models.resnet import BasicBlock, Bottleneck

# (name, kwargs for a tiny version, input shape, has BatchNorm). The "resnet" and
# "wrn" entries are shallow members of the ResNet-18/50 and WRN families (same
# blocks, fewer of them); the full-depth tiny versions are marked slow because
# eager Flax on 2 shared CPU cores spends ~10 s per deep network.
_SLOW = pytest.mark.slow
TINY = [
    pytest.param("mlp", dict(width=8), (3, 6, 6, 1), False, id="mlp"),
    pytest.param("cnn6", dict(width=2), (3, 8, 8, 3), False, id="cnn6"),
    pytest.param("cnn6", dict(width=2, use_bn=True), (3, 8, 8, 3), True, id="cnn6-bn"),
    pytest.param("cnn1d", dict(width=3), (3, 40, 1), False, id="cnn1d"),
    pytest.param("resnet-basic", dict(stage_sizes=(1, 1), block=BasicBlock, width=2), (3, 8, 8, 3), True,
                 id="resnet-basic"),
    pytest.param("resnet-bottleneck", dict(stage_sizes=(1, 1), block=Bottleneck, width=1), (3, 8, 8, 3), True,
                 id="resnet-bottleneck"),
    pytest.param("wrn", dict(depth=10, widen_factor=2, width=2), (3, 8, 8, 3), True, id="wrn10-2"),
    pytest.param("patch_cnn", dict(width=3), (3, 2, 5), False, id="patch_cnn"),
    pytest.param("resnet18", dict(width=1), (2, 8, 8, 3), True, marks=_SLOW, id="resnet18"),
    pytest.param("resnet50", dict(width=1), (2, 8, 8, 3), True, marks=_SLOW, id="resnet50"),
    pytest.param("wrn16_8", dict(width=1), (2, 8, 8, 3), True, marks=_SLOW, id="wrn16_8"),
    pytest.param("wrn28_10", dict(width=1), (2, 8, 8, 3), True, marks=_SLOW, id="wrn28_10"),
]


def _build(name, num_classes, kwargs):
    if name.startswith("resnet-"):
        return ResNet(num_classes, **kwargs)
    return get_model(name, num_classes, **kwargs)


def _init(model, shape, seed=0):
    x = jax.random.normal(jax.random.key(seed + 1), shape)
    variables = model.init(jax.random.key(seed), x, train=False)
    return variables, x


@pytest.mark.parametrize("name,kwargs,shape,has_bn", TINY)
def test_tiny_models_logits_and_modes(name, kwargs, shape, has_bn):
    num_classes = 2 if name == "patch_cnn" else 7
    model = _build(name, num_classes, kwargs)
    variables, x = _init(model, shape)
    assert set(variables) == ({"params", "batch_stats"} if has_bn else {"params"})

    eval_logits = model.apply(variables, x, train=False)
    assert eval_logits.shape == (shape[0], num_classes)
    assert eval_logits.dtype == jnp.float32
    assert np.all(np.isfinite(eval_logits))

    if has_bn:
        train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        assert train_logits.shape == (shape[0], num_classes)
        # Train mode normalizes with batch statistics, eval mode with the running
        # ones (mean 0, var 1 at init): the two must differ, and the running
        # statistics must move.
        assert not np.allclose(train_logits, eval_logits)
        before = jax.tree.leaves(variables["batch_stats"])
        after = jax.tree.leaves(updates["batch_stats"])
        assert any(not np.allclose(a, b) for a, b in zip(before, after))
    else:
        np.testing.assert_allclose(model.apply(variables, x, train=True), eval_logits, rtol=1e-6)


def test_batchnorm_momentum_matches_pytorch_default():
    """First BN of ResNet after one train step: running mean = 0.1 * batch mean
    of the stem convolution (PyTorch momentum 0.1), computed here by lax.conv."""
    model = ResNet(10, stage_sizes=(1,), width=2)
    variables, x = _init(model, (4, 8, 8, 3))
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    kernel = variables["params"]["Conv_0"]["kernel"]
    stem = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    expected_mean = 0.1 * stem.mean(axis=(0, 1, 2))
    expected_var = 0.9 * 1.0 + 0.1 * stem.var(axis=(0, 1, 2))
    np.testing.assert_allclose(updates["batch_stats"]["BatchNorm_0"]["mean"], expected_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["BatchNorm_0"]["var"], expected_var, rtol=1e-4)


def test_wrn_dropout_uses_dropout_rng_in_train_mode_only():
    model = get_model("wrn", 5, depth=10, widen_factor=1, width=1, dropout_rate=0.5)
    no_dropout = get_model("wrn", 5, depth=10, widen_factor=1, width=1, dropout_rate=0.0)
    variables, x = _init(model, (2, 4, 4, 3))
    run = lambda m, key: m.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0]
    first = run(model, jax.random.key(1))
    assert not np.allclose(first, run(model, jax.random.key(2)))
    # Dropout is active in train mode (differs from the same network without it) ...
    assert not np.allclose(first, run(no_dropout, jax.random.key(1)))
    # ... and off in eval mode: exactly the network without dropout, whatever the key.
    np.testing.assert_allclose(model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(3)}),
                               no_dropout.apply(variables, x, train=False), rtol=1e-6, atol=1e-7)


def test_mlp_forward_and_parameter_count_by_hand():
    model = get_model("mlp", 3, width=5, depth=2)
    variables, x = _init(model, (4, 2, 3, 1))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = np.asarray(x, np.float64).reshape(4, 6)
    for layer in ("Dense_0", "Dense_1"):
        h = np.maximum(h @ p[layer]["kernel"] + p[layer]["bias"], 0)
    expected = h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]
    np.testing.assert_allclose(model.apply(variables, x, train=False), expected, rtol=1e-5, atol=1e-6)
    # (6·5 + 5) + (5·5 + 5) + (5·3 + 3)
    assert _param_count("mlp", 3, (1, 2, 3, 1), width=5, depth=2) == 35 + 30 + 18 == 83


def test_cnn6_parameter_count_by_formula():
    w, c_in, k = 2, 3, 7
    channels = [c_in, w, w, 2 * w, 2 * w, 4 * w, 4 * w]
    convs = sum(9 * a * b for a, b in zip(channels[:-1], channels[1:]))
    plain = convs + sum(channels[1:]) + 4 * w * k + k  # conv biases, classifier
    with_bn = convs + 2 * sum(channels[1:]) + 4 * w * k + k  # no conv bias; BN scale + bias
    assert _param_count("cnn6", k, (1, 8, 8, 3), width=w) == plain
    assert _param_count("cnn6", k, (1, 8, 8, 3), width=w, use_bn=True) == with_bn


def _param_count(name, num_classes=10, shape=(1, 32, 32, 3), **kwargs):
    model = get_model(name, num_classes, **kwargs)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


def _wrn_count(depth, k, num_classes):
    """Closed form for the WRN parameter count (no biases in convolutions)."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 3 * 9 * 16  # stem
    for group in range(3):
        c_in, c_out = widths[group], widths[group + 1]
        for block in range(n):
            c = c_in if block == 0 else c_out
            total += 2 * c + 9 * c * c_out + 2 * c_out + 9 * c_out * c_out  # BN, conv, BN, conv
            if block == 0 and c_in != c_out:
                total += c_in * c_out  # 1x1 shortcut
    return total + 2 * widths[3] + widths[3] * num_classes + num_classes


@pytest.mark.parametrize(
    "name,expected,published_millions",
    [
        ("resnet18", 11_173_962, 11.2),  # kuangliu/pytorch-cifar ResNet18
        ("resnet50", 23_520_842, 23.5),  # kuangliu/pytorch-cifar ResNet50
        ("wrn28_10", 36_479_194, 36.5),  # Zagoruyko & Komodakis 2016, Table
        ("wrn16_8", 10_961_370, 11.0),  # Zagoruyko & Komodakis 2016, Table
    ],
)
def test_full_size_parameter_counts(name, expected, published_millions):
    count = _param_count(name)
    assert count == expected
    assert round(count / 1e6, 1) == published_millions
    if name.startswith("wrn"):
        depth, k = (28, 10) if name == "wrn28_10" else (16, 8)
        assert count == _wrn_count(depth, k, 10)


def test_cnn1d_matches_mnist1d_baseline_size():
    # MNIST-1D ConvBase: 1->25 (k5), 25->25 (k3), 25->25 (k3), Linear(125, 10).
    expected = (5 * 25 + 25) + 2 * (3 * 25 * 25 + 25) + (125 * 10 + 10)
    assert _param_count("cnn1d", shape=(1, 40, 1)) == expected == 5210


def test_patch_cnn_matches_formula_and_logistic_loss():
    m, num_patches, dim = 4, 3, 6
    model = get_model("patch_cnn", 2, width=m, sigma0=0.5)
    variables, x = _init(model, (5, num_patches, dim))
    w = np.asarray(variables["params"]["filters"], np.float64)  # (2, m, d)
    xs = np.asarray(x, np.float64)
    relu = lambda z: np.maximum(z, 0)
    F = [sum(relu(xs[:, p] @ w[j, r]) for r in range(m) for p in range(num_patches)) / m for j in (0, 1)]
    f = F[1] - F[0]

    logits = np.asarray(model.apply(variables, x), np.float64)
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(get_model("patch_cnn", 1, width=m).apply(variables, x)[:, 0], f, rtol=1e-5, atol=1e-6)

    labels = np.array([1, 0, 1, 1, 0])
    y_pm = 2 * labels - 1
    logistic = np.log1p(np.exp(-y_pm * f))
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    cross_entropy = -log_softmax[np.arange(5), labels]
    np.testing.assert_allclose(cross_entropy, logistic, rtol=1e-5, atol=1e-7)


def test_patch_cnn_init_scale_and_bad_inputs():
    model = get_model("patch_cnn", 2, width=200, sigma0=0.01)
    variables, _ = _init(model, (1, 2, 100))
    assert variables["params"]["filters"].shape == (2, 200, 100)
    assert abs(float(jnp.std(variables["params"]["filters"])) - 0.01) < 5e-4
    with pytest.raises(ValueError, match="num_classes 1 or 2"):
        _init(get_model("patch_cnn", 3), (1, 2, 4))
    with pytest.raises(ValueError, match=r"\(N, P, d\)"):
        _init(get_model("patch_cnn", 2), (1, 8))


def test_registry_errors():
    assert {"mlp", "cnn6", "cnn1d", "resnet18", "resnet50", "wrn", "wrn16_8", "wrn28_10", "patch_cnn"} <= set(model_names())
    with pytest.raises(ValueError, match="unknown model"):
        get_model("vgg11", 10)
    with pytest.raises(ValueError, match="bad arguments"):
        get_model("mlp", 10, nonsense=3)
    with pytest.raises(ValueError, match="width"):
        get_model("resnet18", 10, width=0)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("mlp", 0)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        _init(get_model("wrn", 10, depth=12), (1, 8, 8, 3))


def test_patch_cnn_signal_learning_and_noise_memorization_by_hand():
    rng = np.random.default_rng(0)
    m, d = 3, 7
    params = {"filters": jnp.asarray(rng.normal(size=(2, m, d)), jnp.float32)}
    mu = rng.normal(size=d).astype(np.float32)
    noise = rng.normal(size=(5, 2, d)).astype(np.float32)
    labels = np.array([0, 1, 1, 0, 1])
    w = np.asarray(params["filters"], np.float64)
    expected_signal = [max(w[0, r] @ -mu for r in range(m)), max(w[1, r] @ mu for r in range(m))]
    np.testing.assert_allclose(signal_learning(params, mu), expected_signal, rtol=1e-5)
    expected_noise = [max(w[labels[i], r] @ noise[i, p] for r in range(m) for p in range(2)) for i in range(5)]
    np.testing.assert_allclose(noise_memorization(params, noise, labels), expected_noise, rtol=1e-5)
