"""EGR (explicit gradient regularization): g + ρ H g/‖g‖, exactly (HVP) or by a finite
difference, on the shared quadratic where H = A and the finite difference is exact."""

import numpy as np
import pytest

import sam_jax
from sam_jax.optim import gradient_evals_per_step


def test_egr_hvp_mode_is_exact(quadratic, assert_close):
    q, rho = quadratic, 0.3
    (out,), _ = q.run_steps(sam_jax.egr(rho, mode="hvp"), 1)
    g = q.np_grad(q.w0)
    assert_close(out, g + rho * q.A @ (g / np.linalg.norm(g)))


def test_egr_finite_difference_mode(quadratic, assert_close):
    q, rho, r = quadratic, 0.3, 0.05
    (out,), state = q.run_steps(sam_jax.egr(rho, fd_step=r), 1)
    g = q.np_grad(q.w0)
    g_hat = g / np.linalg.norm(g)
    # On a quadratic the finite difference is exact: (grad(w + r ĝ) − g) / r = A ĝ
    assert_close(out, g + rho * (q.np_grad(q.w0 + r * g_hat) - g) / r, rtol=1e-4, atol=1e-4)
    assert_close(out, g + rho * q.A @ g_hat, rtol=1e-4, atol=1e-4)
    assert_close(state.perturbation_norm, r)


def test_egr_cost_and_bad_mode():
    assert gradient_evals_per_step("egr") == 2
    assert gradient_evals_per_step("egr", mode="hvp") == 3  # gradient + HVP (2)
    with pytest.raises(ValueError, match="mode"):
        sam_jax.egr(mode="exact")
