"""Lanczos with the basis in host memory (``basis_memory="host"``) against the
default device basis, and the memory each mode holds on the device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import curvature


def symmetric(n, seed=0):
    a = np.random.default_rng(seed).normal(size=(n, n))
    return (a + a.T) / 2


def test_host_basis_gives_the_device_decomposition_float64():
    with jax.enable_x64(True):
        matrix = jnp.asarray(symmetric(120))
        device = curvature.lanczos_tridiagonal(matrix, 40, seed=3)
        host = curvature.lanczos_tridiagonal(matrix, 40, seed=3, basis_memory="host")
        device_eigs = curvature.lanczos_eigs(matrix, top_k=3, bottom_k=2, num_steps=40, seed=3)
        host_eigs = curvature.lanczos_eigs(matrix, top_k=3, bottom_k=2, num_steps=40, seed=3, basis_memory="host")
    # Same start vector, same arithmetic up to summation order (numpy vs XLA).
    assert isinstance(host.basis, np.ndarray) and host.basis_memory == "host"
    assert isinstance(device.basis, jax.Array) and device.basis_memory == "device"
    assert host.basis.shape == (40, 120) and host.dtype == "float64"
    np.testing.assert_allclose(host.alphas, device.alphas, rtol=0, atol=1e-12)
    np.testing.assert_allclose(host.betas, device.betas, rtol=0, atol=1e-12)
    np.testing.assert_allclose(host.basis, np.asarray(device.basis), rtol=0, atol=1e-12)
    np.testing.assert_allclose(host.basis @ host.basis.T, np.eye(40), atol=1e-13)
    np.testing.assert_allclose(host_eigs.eigenvalues, device_eigs.eigenvalues, rtol=1e-12)
    np.testing.assert_allclose(host_eigs.bottom_eigenvalues, device_eigs.bottom_eigenvalues, rtol=1e-12)
    np.testing.assert_allclose(host_eigs.residual_norms, device_eigs.residual_norms, rtol=1e-6, atol=1e-12)
    assert host_eigs.num_hvps == device_eigs.num_hvps == 40 + 5


def test_host_basis_float32_and_float64_without_x64():
    matrix = symmetric(150, seed=1).astype(np.float32)
    exact = np.linalg.eigvalsh(matrix.astype(np.float64))
    device = curvature.lanczos_eigs(matrix, top_k=2, num_steps=150, seed=0)
    host = curvature.lanczos_eigs(matrix, top_k=2, num_steps=150, seed=0, basis_memory="host")
    # float32: both within float32 rounding of the exact top eigenvalues (n steps).
    np.testing.assert_allclose(host.eigenvalues, device.eigenvalues, rtol=1e-5)
    np.testing.assert_allclose(host.eigenvalues, exact[::-1][:2], rtol=1e-5)
    assert host.eigenvectors[0].dtype == jnp.float32
    # A float64 basis needs x64 mode on the device, not on the host: numpy keeps
    # it orthonormal to float64 rounding while the products stay float32.
    assert not jax.config.jax_enable_x64
    with pytest.raises(ValueError, match="x64"):
        curvature.lanczos_tridiagonal(matrix, 5, accumulate_dtype=np.float64)
    wide = curvature.lanczos_tridiagonal(matrix, 60, accumulate_dtype=np.float64, basis_memory="host")
    assert wide.basis.dtype == np.float64 and wide.dtype == "float64"
    np.testing.assert_allclose(wide.basis @ wide.basis.T, np.eye(60), atol=1e-13)
    with pytest.raises(ValueError, match="basis_memory"):
        curvature.lanczos_tridiagonal(matrix, 5, basis_memory="disk")


class RecordingOperator(curvature.MatrixOperator):
    """Records the bytes of all live device arrays while each product is formed."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.live_bytes = []

    def _apply(self, vector):
        product = super()._apply(vector)
        jax.block_until_ready(product)
        self.live_bytes.append(sum(a.nbytes for a in jax.live_arrays()))
        return product


@pytest.mark.parametrize("num_steps", [10, 60])
def test_device_memory_of_each_mode(num_steps):
    dim = 512
    operator = RecordingOperator(symmetric(dim, seed=2).astype(np.float32))
    vector_bytes = dim * 4
    for mode in ("device", "host"):
        operator.live_bytes.clear()
        baseline = sum(a.nbytes for a in jax.live_arrays())  # includes the matrix
        curvature.lanczos_tridiagonal(operator, num_steps, seed=0, basis_memory=mode)
        extra = max(operator.live_bytes) - baseline
        predicted = curvature.lanczos_memory(dim, num_steps, np.float32, mode)
        if mode == "device":
            # The (num_steps + 1) × dim basis lives on the device: grows with num_steps.
            assert extra >= predicted["basis"] == (num_steps + 1) * vector_bytes
            assert extra <= predicted["device"] + 64  # + a few scalars (α, β)
        else:
            # Only the vector being multiplied and its product: O(dim), the same for
            # 10 and 60 steps.
            assert predicted["device"] == 2 * vector_bytes
            assert extra <= predicted["device"] + 64
            assert predicted["host"] == (num_steps + 1 + 3) * vector_bytes


def test_lanczos_memory_resnet50_example():
    # ResNet-50 (25,557,032 parameters), 100 steps, float32: the figure in docs/curvature.md.
    device = curvature.lanczos_memory(25_557_032, 100)
    host = curvature.lanczos_memory(25_557_032, 100, basis_memory="host")
    assert device["basis"] == host["basis"] == 101 * 25_557_032 * 4  # 10.3 GB (9.6 GiB)
    assert device["device"] == 103 * 25_557_032 * 4 and device["host"] == 0
    assert host["device"] == 2 * 25_557_032 * 4  # 204 MB
