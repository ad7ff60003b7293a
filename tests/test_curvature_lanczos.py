"""Lanczos, power iteration and matfree agreement on matrices with known spectra."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import curvature


def random_symmetric(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    return (a + a.T) / 2


@pytest.mark.parametrize("n,seed", [(8, 0), (25, 1), (40, 2)])
def test_full_lanczos_reproduces_eigh_in_float64(n, seed):
    matrix = random_symmetric(n, seed)
    with jax.enable_x64(True):
        decomposition = curvature.lanczos_tridiagonal(jnp.asarray(matrix), n, seed=seed)
        ritz_values, _ = decomposition.ritz()
        basis = np.asarray(decomposition.basis)
    np.testing.assert_allclose(ritz_values, np.linalg.eigvalsh(matrix), rtol=0, atol=1e-10)
    # Full reorthogonalization keeps the basis orthonormal to machine precision.
    np.testing.assert_allclose(basis @ basis.T, np.eye(n), atol=1e-12)


def test_full_lanczos_float32_close_to_eigh():
    matrix = random_symmetric(30, 3)
    values, _ = curvature.lanczos_tridiagonal(matrix.astype(np.float32), 30).ritz()
    np.testing.assert_allclose(values, np.linalg.eigvalsh(matrix), atol=1e-4)


def test_top_and_bottom_pairs_with_residuals():
    matrix = random_symmetric(50, 4)
    exact_values, exact_vectors = np.linalg.eigh(matrix)
    with jax.enable_x64(True):
        result = curvature.lanczos_eigs(jnp.asarray(matrix), top_k=3, bottom_k=2, num_steps=50)
    np.testing.assert_allclose(result.eigenvalues, exact_values[::-1][:3], atol=1e-10)
    np.testing.assert_allclose(result.bottom_eigenvalues, exact_values[:2], atol=1e-10)
    assert result.bottom_eigenvalues[0] < 0  # negative curvature is found
    assert np.all(result.residual_norms < 1e-9) and np.all(result.bottom_residual_norms < 1e-9)
    # Eigenvectors equal eigh's up to sign.
    assert abs(np.dot(np.asarray(result.eigenvectors[0]), exact_vectors[:, -1])) == pytest.approx(1, abs=1e-9)
    assert result.method == "lanczos" and result.dtype == "float64"
    assert result.num_hvps == 50 + 5  # steps plus one residual product per pair


def test_tolerance_stops_early_and_is_accurate():
    # A clear gap at the top: converges in far fewer steps than the dimension.
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(200, 200)))
    spectrum = np.concatenate([[50.0, 20.0], rng.uniform(-1, 1, 198)])
    matrix = (q * spectrum) @ q.T
    result = curvature.lanczos_eigs(matrix.astype(np.float32), top_k=1, num_steps=100, tol=1e-4)
    assert result.num_steps < 40
    assert result.lambda_max == pytest.approx(50.0, rel=1e-4)


def test_power_iteration_finds_largest_magnitude_pitfall():
    # Eigenvalues {-5, 3, 1, 0.5, ...}: power iteration returns -5 (largest |λ|),
    # Lanczos's top eigenvalue is 3.
    rng = np.random.default_rng(6)
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    spectrum = np.concatenate([[-5.0, 3.0, 1.0], np.linspace(-0.5, 0.5, 17)])
    matrix = ((q * spectrum) @ q.T).astype(np.float32)
    power = curvature.power_iteration(matrix, top_k=2, tol=1e-6, max_iters=500)
    np.testing.assert_allclose(power.eigenvalues, [-5.0, 3.0], rtol=1e-3)
    assert all(power.converged) and power.num_hvps == sum(power.iterations) + 2
    lanczos = curvature.lanczos_eigs(matrix, top_k=1, bottom_k=1, num_steps=20)
    assert lanczos.lambda_max == pytest.approx(3.0, rel=1e-5)
    assert lanczos.bottom_eigenvalues[0] == pytest.approx(-5.0, rel=1e-5)


def test_matfree_agrees_on_tridiagonal_eigenvalues():
    from matfree import decomp

    matrix = random_symmetric(60, 7)
    with jax.enable_x64(True):
        start = jax.random.normal(jax.random.key(0), (60,), jnp.float64)
        ours = curvature.lanczos_tridiagonal(jnp.asarray(matrix), 15, start=start)
        tridiag = decomp.tridiag_sym(15, materialize=True, reortho="full")
        result = tridiag(lambda v: jnp.asarray(matrix) @ v, start)
        theirs = np.linalg.eigvalsh(np.asarray(result.J_small))
    np.testing.assert_allclose(ours.ritz()[0], theirs, atol=1e-9)


def test_invalid_arguments():
    matrix = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="num_steps"):
        curvature.lanczos_tridiagonal(matrix, 5)
    with pytest.raises(ValueError, match="x64"):
        curvature.lanczos_tridiagonal(matrix, 2, accumulate_dtype=jnp.float64)
    with pytest.raises(ValueError, match="square"):
        curvature.lanczos_eigs(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="top_k"):
        curvature.lanczos_eigs(matrix, top_k=0, bottom_k=0)
    with pytest.raises(ValueError, match="zero"):
        curvature.lanczos_tridiagonal(matrix, 2, start=np.zeros(4, np.float32))


def test_invariant_subspace_stops_early():
    # Identity: the Krylov space is one-dimensional.
    decomposition = curvature.lanczos_tridiagonal(np.eye(10, dtype=np.float32), 5)
    assert decomposition.num_steps == 1
    assert decomposition.alphas[0] == pytest.approx(1.0, abs=1e-6)
