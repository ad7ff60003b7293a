"""sam_jax.attacks: PGD against the closed-form worst case of a linear model."""

import numpy as np
import pytest

def test_pgd_one_step_is_the_closed_form_worst_case_of_a_linear_model():
    import jax
    import jax.numpy as jnp

    from sam_jax.attacks import pgd_linf

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
    x = jnp.asarray(rng.uniform(0.2, 0.8, size=(5, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, size=5), jnp.int32)
    eps = 0.05
    adv = pgd_linf(lambda z: z @ w, x, y, epsilon=eps, step_size=eps, num_steps=1)
    # For two classes the CE input gradient is a positive multiple of w_other − w_y.
    other = 1 - y
    direction = jnp.sign(w[:, other].T - w[:, y].T)
    np.testing.assert_allclose(adv, x + eps * direction, atol=1e-6)
    # More steps and a random start stay in the ball and the [0, 1] box.
    adv = pgd_linf(lambda z: z @ w, x, y, epsilon=0.3, step_size=0.1, num_steps=10,
                   key=jax.random.PRNGKey(1))
    assert float(jnp.max(jnp.abs(adv - x))) <= 0.3 + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_pgd_rejects_negative_epsilon():
    import jax.numpy as jnp

    from sam_jax.attacks import pgd_linf

    with pytest.raises(ValueError, match="epsilon"):
        pgd_linf(lambda z: z, jnp.zeros((1, 2)), jnp.zeros(1, jnp.int32), epsilon=-1,
                 step_size=0.1)
