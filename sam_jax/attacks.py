"""Projected gradient descent (PGD) adversarial examples in the L∞ ball.

The late-phase SAM paper's adversarial-training extension (papers.md §2, [code]):
L∞ PGD with ε = 4/255, step 2/255, 10 steps, a uniform random start for training
(none for evaluation), inputs in [0, 1], the attack crafted with the model in eval
mode. Those are the defaults of :func:`pgd_linf` except ``epsilon``/``step_size``,
which depend on the data's scale and are therefore required arguments.

Example::

    logits_fn = lambda x: model.apply(variables, x, train=False)
    x_adv = pgd_linf(logits_fn, x, y, epsilon=4/255, step_size=2/255, num_steps=10,
                     key=jax.random.PRNGKey(0))   # random start (training)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

#: papers.md §2 [code]: the late-phase SAM adversarial-training attack on CIFAR-10.
PAPER_EPSILON = 4 / 255
PAPER_STEP_SIZE = 2 / 255
PAPER_NUM_STEPS = 10


def pgd_linf(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    *,
    epsilon: float,
    step_size: float,
    num_steps: int = PAPER_NUM_STEPS,
    key: jax.Array | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> jax.Array:
    """L∞ PGD that maximizes the cross entropy of ``logits_fn`` (Madry et al. 2018).

    Each step ascends along the sign of the input gradient, then projects onto
    ``{x' : ‖x' − x‖_∞ ≤ ε} ∩ [lo, hi]``.

    Args:
      logits_fn: ``x -> logits``; pass the model in eval mode (papers.md §2).
      x: clean inputs (any shape, batch first).
      y: int labels ``(N,)``.
      epsilon: radius of the L∞ ball (paper: 4/255 for inputs in [0, 1]).
      step_size: ascent step (paper: 2/255).
      num_steps: PGD iterations (paper: 10).
      key: a ``jax.random`` key for the uniform random start in the ball (training);
        ``None`` starts at ``x`` (evaluation, as in the paper's code).
      bounds: valid input range ``(lo, hi)`` to clip to (paper: [0, 1]); ``None``
        disables clipping (e.g. for standardized inputs).

    Returns:
      Adversarial inputs of the shape and dtype of ``x`` (no gradient flows back).

    Raises:
      ValueError: for negative ``epsilon``/``step_size`` or ``num_steps < 0``.
    """
    if epsilon < 0 or step_size < 0:
        raise ValueError(f"epsilon and step_size must be >= 0, got {epsilon}, {step_size}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    x = jax.lax.stop_gradient(x)

    def project(candidate):
        candidate = jnp.clip(candidate, x - epsilon, x + epsilon)
        if bounds is not None:
            candidate = jnp.clip(candidate, bounds[0], bounds[1])
        return candidate

    def loss(candidate):
        # Summed, so the per-example input gradients do not shrink with the batch.
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(candidate), y).sum()

    start = x
    if key is not None:
        start = project(x + jax.random.uniform(key, x.shape, x.dtype, -epsilon, epsilon))

    def step(_, candidate):
        grad = jax.grad(loss)(candidate)
        return project(candidate + step_size * jnp.sign(grad))

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, num_steps, step, start))
