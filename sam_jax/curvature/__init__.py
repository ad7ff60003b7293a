"""Curvature toolkit: Hessian-vector products, dataset-level Hessian operators,
Lanczos eigenpairs, power iteration, Hutchinson trace, spectral density (SLQ) and
eigenvector alignment. See docs/curvature.md.

Example::

    loss_fn = curvature.flax_loss_fn(model, variables, bn_mode="running")
    op = curvature.HessianOperator(loss_fn, variables["params"], batches)
    eig = curvature.lanczos_eigs(op, top_k=2, num_steps=30)
    print(eig.lambda_max, curvature.hutchinson_trace(op, 50).trace)

    # Data parallel over all devices; Lanczos basis in host memory (large models).
    op = curvature.HessianOperator(loss_fn, variables["params"], batches, mesh=curvature.data_mesh())
    eig = curvature.lanczos_eigs(op, top_k=2, num_steps=30, basis_memory="host")
"""
from sam_jax.curvature._results import DensityResult, EigenResult, TraceResult
from sam_jax.curvature.alignment import cosine_alignment
from sam_jax.curvature.density import density_from_quadrature, spectral_density
from sam_jax.curvature.flax_loss import BN_MODES, flax_loss_fn
from sam_jax.curvature.hvp import batch_hvp, hvp
from sam_jax.curvature.lanczos import LanczosDecomposition, lanczos_eigs, lanczos_memory, lanczos_tridiagonal
from sam_jax.curvature.operator import (
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    OperatorSettings,
    data_mesh,
    dataset_loss,
)
from sam_jax.curvature.power import power_iteration
from sam_jax.curvature.trace import hutchinson_trace
from sam_jax.losses import cross_entropy_sum  # the library's one cross-entropy

__all__ = [
    "BN_MODES",
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "LanczosDecomposition",
    "LinearOperator",
    "MatrixOperator",
    "OperatorSettings",
    "TraceResult",
    "batch_hvp",
    "cosine_alignment",
    "cross_entropy_sum",
    "data_mesh",
    "dataset_loss",
    "density_from_quadrature",
    "flax_loss_fn",
    "hutchinson_trace",
    "hvp",
    "lanczos_eigs",
    "lanczos_memory",
    "lanczos_tridiagonal",
    "power_iteration",
    "spectral_density",
]
