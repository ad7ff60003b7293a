"""sam_jax: sharpness-aware minimization for JAX/Flax.

The SAM family as Optax gradient transformations (``sam_jax.sam`` and friends),
curvature tools (``sam_jax.curvature``), loss landscapes (``sam_jax.landscape``),
Flax models, datasets and a training engine (``sam_jax.train``).
"""

__version__ = "0.1.0"

from sam_jax.optim import (  # noqa: E402  (after __version__ so submodules can read it)
    asam,
    egr,
    eigen_sam,
    gradient_evals_per_step,
    gsam,
    looksam,
    make_perturbation,
    perturbation_stats,
    reverse_sam,
    sam,
    usam,
)

# Flax training-loop helpers (sam_jax/flax_train.py), imported on first use so that
# `import sam_jax` does not pay for flax.nnx.
_FLAX_TRAIN = ("SAMTrainState", "value_and_grad_fn", "nnx_grad_fn", "nnx_value_and_grad_fn", "nnx_update")


def __getattr__(name):
    if name in _FLAX_TRAIN:
        from sam_jax import flax_train

        return getattr(flax_train, name)
    raise AttributeError(f"module 'sam_jax' has no attribute {name!r}")
