"""The SAM papers' WRN-16-8 (davda54/sam layout) against a parameter count built
by hand from davda54's ``example/model/wide_res_net.py``, and its structure."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.models import WideResNet, get_model


def _davda54_count(depth, k, num_classes, in_channels=3):
    """Parameters of davda54's WideResNet, layer by layer as its code builds them.

    Conv2d(bias=False): c_in·c_out·kh·kw; BatchNorm2d: 2·c; Linear: in·out + out.
    Block = DownsampleUnit(in, out) + (depth − 4) // 6 BasicUnit(out).
    """
    filters = [16, 16 * k, 32 * k, 64 * k]
    n = (depth - 4) // 6
    conv = lambda cin, cout, size=3: cin * cout * size * size
    bn = lambda c: 2 * c
    total = conv(in_channels, filters[0])
    for cin, cout in zip(filters[:-1], filters[1:]):
        total += bn(cin) + conv(cin, cout) + bn(cout) + conv(cout, cout) + conv(cin, cout, 1)
        total += n * (bn(cout) + conv(cout, cout) + bn(cout) + conv(cout, cout))
    return total + bn(filters[3]) + filters[3] * num_classes + num_classes


def _count(model, shape=(1, 32, 32, 3)):
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


def test_hand_count_is_the_published_17_16_million():
    assert _davda54_count(16, 8, 10) == 17_158_106
    assert round(_davda54_count(16, 8, 10) / 1e6, 2) == 17.16


@pytest.mark.parametrize("depth,k,classes", [(16, 8, 10), (16, 8, 100), (10, 2, 10), (22, 4, 10)])
def test_davda54_layout_parameter_count_matches_hand_count(depth, k, classes):
    model = WideResNet(classes, depth=depth, widen_factor=k, layout="davda54")
    assert _count(model) == _davda54_count(depth, k, classes)


def test_registry_name_is_the_17_16_million_network_and_wrn16_8_is_not():
    assert _count(get_model("wrn16_8_davda54", 10)) == 17_158_106
    assert _count(get_model("wrn16_8", 10)) == 10_961_370  # Zagoruyko layout: 2 blocks/group


@pytest.mark.slow  # compiles a small conv net (~45 s on the loaded shared CPU)
def test_davda54_layout_has_three_units_per_group_and_zero_head():
    model = WideResNet(10, depth=16, widen_factor=1, width=4, layout="davda54")
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)), train=False)
    blocks = [name for name in variables["params"] if name.startswith("WideBlock")]
    assert len(blocks) == 9  # 3 groups x (1 downsampling + 2 basic units)
    head = variables["params"]["Dense_0"]
    assert not np.any(head["kernel"]) and not np.any(head["bias"])  # davda54 zero-inits it
    logits = model.apply(variables, jnp.ones((2, 8, 8, 3)), train=False)
    np.testing.assert_array_equal(logits, 0.0)


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="layout"):
        WideResNet(10, depth=16, widen_factor=1, layout="other").init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
