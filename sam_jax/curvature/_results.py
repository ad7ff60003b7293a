"""Result dataclasses shared by the curvature algorithms."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sam_jax.curvature.operator import OperatorSettings


@dataclasses.dataclass(frozen=True)
class EigenResult:
    """Extreme eigenpairs of a Hessian and the settings that produced them.

    Attributes:
      eigenvalues: top-k eigenvalues, descending (float64 numpy).
      eigenvectors: matching unit eigenvectors, each a pytree like the params.
      residual_norms: ``‖H v − λ v‖`` for each top pair, measured with one extra
        HVP per pair (NaN when residuals were not requested).
      bottom_eigenvalues: bottom-k eigenvalues, ascending (negative curvature).
      bottom_eigenvectors: matching unit eigenvectors (pytrees).
      bottom_residual_norms: as ``residual_norms`` for the bottom pairs.
      method: ``"lanczos"`` or ``"power"``.
      num_steps: Lanczos steps taken, or power iterations in total.
      seed: seed of the random start vector.
      dtype: dtype the Krylov basis / iterates were accumulated in.
      num_hvps: dataset-level Hessian-vector products spent (residuals included).
      settings: the operator's settings (reduction, BN mode, dropout, examples).
      iterations: power iteration only: iterations used for each eigenvalue.
      converged: power iteration only: whether each met its tolerance.
      history: power iteration only: the Rayleigh quotient after every iteration,
        one tuple per eigenvalue (for convergence studies).
    """

    eigenvalues: np.ndarray
    eigenvectors: tuple
    residual_norms: np.ndarray
    bottom_eigenvalues: np.ndarray
    bottom_eigenvectors: tuple
    bottom_residual_norms: np.ndarray
    method: str
    num_steps: int
    seed: int
    dtype: str
    num_hvps: int
    settings: OperatorSettings
    iterations: tuple = ()
    converged: tuple = ()
    history: tuple = ()

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue found."""
        if len(self.eigenvalues) == 0:
            raise ValueError("no top eigenvalues were requested")
        return float(self.eigenvalues[0])

    @property
    def top_eigenvector(self) -> Any:
        if len(self.eigenvectors) == 0:
            raise ValueError("no top eigenvectors were requested")
        return self.eigenvectors[0]


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """Hutchinson estimate of ``tr(H)``.

    Attributes:
      trace: mean of the probe estimates ``zᵀ H z``.
      stderr: standard error of that mean (sample std with ddof=1 / √num_probes).
      samples: the per-probe estimates.
      num_probes, seed, num_hvps, settings: how it was obtained.
      distribution: probe distribution (``"rademacher"``).
    """

    trace: float
    stderr: float
    samples: np.ndarray
    num_probes: int
    seed: int
    num_hvps: int
    distribution: str
    settings: OperatorSettings


@dataclasses.dataclass(frozen=True)
class DensityResult:
    """Spectral density by stochastic Lanczos quadrature (papers.md §4).

    Attributes:
      grid: eigenvalue grid (``grid_size`` points).
      density: smoothed density on ``grid``, renormalized to integrate to 1.
      nodes: ``(num_runs, num_steps)`` Ritz values of each run's tridiagonal T.
      weights: ``(num_runs, num_steps)`` squared first components of T's
        eigenvectors (each row sums to 1).
      sigma_squared: Gaussian kernel variance actually used.
      num_steps, num_runs, seed, dtype, num_hvps, settings: how it was obtained.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma_squared: float
    num_steps: int
    num_runs: int
    seed: int
    dtype: str
    num_hvps: int
    settings: OperatorSettings

    def moment(self, order: int) -> float:
        """``∫ λ^order ρ(λ) dλ`` of the smoothed density (Riemann sum on the grid)."""
        step = self.grid[1] - self.grid[0]
        return float(np.sum(self.grid**order * self.density) * step)

    def quadrature_moment(self, order: int) -> float:
        """``mean_runs Σ_i w_i θ_i^order``: the unsmoothed quadrature estimate of
        ``tr(H^order)/n`` (exact for each run's start vector up to degree 2·num_steps−1)."""
        return float(np.mean(np.sum(self.weights * self.nodes**order, axis=1)))
