"""Plain SGD's place in the family: the identity "perturbation" (registry name ``sgd``)."""

from __future__ import annotations

import optax

from sam_jax.optim import _core


def identity(rho=0.0, *, axis_name=None, sync_perturbation=True, **kwargs):
    """Plain SGD's "perturbation": the gradient passes through; ``grad_fn`` is ignored.

    Takes the same multi-device options as the SAM family so that a training loop can
    treat every phase alike: with ``axis_name`` the gradient is ``pmean``-ed (plain
    data parallelism); ``sync_perturbation`` has nothing to act on.
    """
    del rho, sync_perturbation
    if kwargs:
        raise ValueError(f"'sgd' takes no options besides axis_name, got {sorted(kwargs)}")
    _core.check_axis_name(axis_name)
    if axis_name is None:
        return optax.with_extra_args_support(optax.identity())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        return _core.mean_over_devices(updates, axis_name), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


ALGORITHM = _core.Algorithm(name="sgd", factory=identity, title="SGD",
                            gradient_evals_per_step=lambda **_: 1.0)
