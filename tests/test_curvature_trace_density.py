"""Hutchinson trace, SLQ density and eigenvector alignment against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import curvature
from sam_jax.curvature.lanczos import start_vector


def matrix_with_spectrum(spectrum, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(spectrum), len(spectrum))))
    return (q * np.asarray(spectrum)) @ q.T


def test_hutchinson_within_three_standard_errors():
    rng = np.random.default_rng(0)
    matrix = matrix_with_spectrum(rng.uniform(-2, 10, 120), 0).astype(np.float32)
    result = curvature.hutchinson_trace(matrix, num_probes=200, seed=1)
    exact = float(np.trace(matrix.astype(np.float64)))
    assert abs(result.trace - exact) < 3 * result.stderr
    # The standard error matches Rademacher theory: Var(zᵀAz) = 2 Σ_{i≠j} A_ij².
    off_diagonal = matrix.astype(np.float64) - np.diag(np.diag(matrix))
    theory = np.sqrt(2 * np.sum(off_diagonal**2) / 200)
    assert result.stderr == pytest.approx(theory, rel=0.3)
    assert result.num_hvps == 200 and result.distribution == "rademacher"


def test_density_integrates_to_one_and_matches_trace_moments():
    n, runs, steps = 100, 20, 30
    spectrum = np.concatenate([np.linspace(-1, 2, 90), [4, 5, 6, 7, 8, 9, 10, 11, 12, 15]])
    with jax.enable_x64(True):
        matrix = jnp.asarray(matrix_with_spectrum(spectrum, 1))
        result = curvature.spectral_density(matrix, steps, num_runs=runs, seed=3)
        starts = [np.asarray(start_vector(n, 3 + r, jnp.float64)) for r in range(runs)]
    matrix = np.asarray(matrix)
    step = result.grid[1] - result.grid[0]
    assert np.sum(result.density) * step == pytest.approx(1.0, abs=1e-12)
    assert len(result.grid) == 10_000 and np.all(result.density >= 0)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, atol=1e-12)

    # Gauss quadrature is exact for polynomials of degree < 2·steps: each run's
    # moments equal vᵀHv and vᵀH²v for its own start vector v.
    m1_runs = np.mean([v @ matrix @ v for v in starts])
    m2_runs = np.mean([v @ matrix @ matrix @ v for v in starts])
    assert result.quadrature_moment(1) == pytest.approx(m1_runs, rel=1e-10)
    assert result.quadrature_moment(2) == pytest.approx(m2_runs, rel=1e-10)

    # The smoothed density keeps those moments (the Gaussian kernel adds its
    # variance σ² to the second moment); only the Riemann sum differs, ~1e-6 here.
    assert result.moment(1) == pytest.approx(result.quadrature_moment(1), abs=1e-5)
    assert result.moment(2) - result.sigma_squared == pytest.approx(result.quadrature_moment(2), abs=1e-4)

    # And they estimate tr(H)/n and tr(H²)/n: for v uniform on the sphere,
    # Var(vᵀAv) = 2/(n+2) · (tr(A²)/n − (tr A/n)²); allow 4 standard errors.
    def standard_error(a):
        return np.sqrt(2 / (n + 2) * (np.trace(a @ a) / n - (np.trace(a) / n) ** 2) / runs)

    assert abs(result.moment(1) - np.trace(matrix) / n) < 4 * standard_error(matrix) + 1e-5
    squared = matrix @ matrix
    assert abs(result.moment(2) - result.sigma_squared - np.trace(squared) / n) < 4 * standard_error(squared) + 1e-4
    node_range = np.mean(result.nodes.max(axis=1)) - np.mean(result.nodes.min(axis=1))
    assert result.sigma_squared == pytest.approx(1e-5 * (node_range + 0.02))
    assert result.num_hvps == runs * steps


def test_density_peaks_at_isolated_eigenvalues():
    spectrum = np.concatenate([np.zeros(40), [5.0] * 10])
    matrix = matrix_with_spectrum(spectrum, 2)
    runs = 2
    result = curvature.spectral_density(matrix.astype(np.float32), 10, num_runs=runs)
    # Two distinct eigenvalues: Lanczos stops after 2 steps with nodes exactly 0 and 5,
    # and the weight at 5 is the start vector's squared projection on that eigenspace,
    # ‖P₅v‖². The density's mass near 5 is the mean of those (the Gaussian kernel's
    # std is ~0.007, so ±0.1 holds all of it) — not just ≈ 10/50 = 0.2 on average.
    weighted = result.weights > 1e-6
    np.testing.assert_allclose(np.sort(result.nodes[weighted]), [0.0] * runs + [5.0] * runs, atol=1e-4)
    _, vectors = np.linalg.eigh(matrix)
    top = vectors[:, -10:]  # eigenspace of 5
    starts = [np.asarray(start_vector(50, r, jnp.float32), np.float64) for r in range(runs)]
    exact = np.mean([np.sum((top.T @ v) ** 2) for v in starts])
    near_five = np.abs(result.grid - 5) < 0.1
    mass = np.sum(result.density[near_five]) * (result.grid[1] - result.grid[0])
    assert mass == pytest.approx(exact, abs=1e-4)
    assert abs(exact - 0.2) > 1e-3  # the old "≈ 0.2 ± 0.1" check could not tell these apart
    # the mass near 0 is the rest
    near_zero = np.abs(result.grid) < 0.1
    assert np.sum(result.density[near_zero]) * (result.grid[1] - result.grid[0]) == pytest.approx(1 - exact, abs=1e-4)


def test_cosine_alignment():
    tree = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([[0.0]])}
    other = {"a": jnp.array([-1.0, 1.0]), "b": jnp.array([[0.0]])}
    assert curvature.cosine_alignment(tree, other) == pytest.approx(1 / np.sqrt(2))
    assert curvature.cosine_alignment(tree, other, absolute=False) == pytest.approx(-1 / np.sqrt(2))
    assert curvature.cosine_alignment(tree, jax.tree.map(jnp.zeros_like, tree)) == 0.0
    matrix = np.diag([3.0, 1.0]).astype(np.float32)
    eig = curvature.lanczos_eigs(matrix, top_k=1, num_steps=2)
    assert curvature.cosine_alignment(jnp.array([2.0, 0.0]), eig) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="size"):
        curvature.cosine_alignment(jnp.ones(3), jnp.ones(2))


def test_density_with_the_basis_in_host_memory_equals_device_mode():
    from sam_jax import curvature

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    matrix = ((q * np.linspace(-1.0, 3.0, 30)) @ q.T).astype(np.float32)
    device = curvature.spectral_density(matrix, 20, seed=1)
    host = curvature.spectral_density(matrix, 20, seed=1, basis_memory="host")
    np.testing.assert_allclose(np.asarray(host.nodes), np.asarray(device.nodes), atol=1e-5)
    np.testing.assert_allclose(np.asarray(host.weights), np.asarray(device.weights), atol=1e-5)
