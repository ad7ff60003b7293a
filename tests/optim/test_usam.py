"""USAM (Andriushchenko & Flammarion 2022): ε = ρ g, unnormalized, on the shared quadratic."""

import numpy as np

import sam_jax


def test_usam_is_the_gradient_at_w_plus_rho_g(quadratic, assert_close):
    q, rho = quadratic, 0.1
    (out,), state = q.run_steps(sam_jax.usam(rho), 1)
    g = q.np_grad(q.w0)
    assert_close(out, q.np_grad(q.w0 + rho * g))
    assert_close(state.perturbation_norm, rho * np.linalg.norm(g))
    assert_close(state.grad_norm, np.linalg.norm(g))
