"""Reverse-SAM (the descent-direction baseline): ε = −ρ g/‖g‖, on the shared quadratic."""

import numpy as np

import sam_jax


def test_reverse_sam_is_the_gradient_at_w_minus_rho_g_hat(quadratic, assert_close):
    q, rho = quadratic, 0.2
    (out,), state = q.run_steps(sam_jax.reverse_sam(rho), 1)
    g = q.np_grad(q.w0)
    assert_close(out, q.np_grad(q.w0 - rho * g / np.linalg.norm(g)))
    assert_close(state.perturbation_norm, rho)
