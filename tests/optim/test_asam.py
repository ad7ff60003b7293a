"""ASAM (Kwon et al. 2021): ε = ρ T² g / ‖T g‖ with T = |w| + η, on the shared quadratic."""

import numpy as np
import pytest

import sam_jax


@pytest.mark.parametrize("eta", [0.01, 0.0])
def test_asam_matches_the_adaptive_formula(eta, quadratic, assert_close):
    q, rho = quadratic, 0.5
    (out,), state = q.run_steps(sam_jax.asam(rho, eta), 1)
    g = q.np_grad(q.w0)
    t = np.abs(q.w0) + eta
    eps = rho * t**2 * g / (np.linalg.norm(t * g) + 1e-12)
    assert_close(out, q.np_grad(q.w0 + eps))
    assert_close(state.perturbation_norm, np.linalg.norm(eps))
    assert_close(np.linalg.norm(eps / t), rho)  # ε lies on the adaptive-norm sphere of radius ρ


def test_asam_rejects_a_negative_eta():
    with pytest.raises(ValueError, match="eta"):
        sam_jax.asam(eta=-1.0)
