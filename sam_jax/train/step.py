"""Pure train and eval steps (jitted by `sam_jax.train.parallel`).

One step of any phase:

1. the *clean* pass: loss, logits and the updated BatchNorm statistics at ``params``
   (train mode), and its gradient ``g``;
2. the optimizer chain ``perturbation -> [clip] -> [decayed weights] -> momentum``
   gets ``g`` and a ``grad_fn`` that evaluates the same minibatch's gradient
   elsewhere. ``grad_fn`` runs the model in train mode (batch statistics) but
   **discards** the statistics it computes, so BatchNorm's state comes from the
   clean pass only (official JAX SAM; updating them twice is davda54/sam #17);
3. ``params <- params - lr * direction``; ``lr`` is an argument computed on the host
   from the global step, so one compiled step serves every schedule and phase.

With ``grad_accum=K`` (gradient accumulation) steps 1-2 run once per microbatch
(the perturbation per microbatch) and the rest of the chain once per step on the
mean of the K perturbed gradients; see `make_train_step`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sam_jax import optim
from sam_jax.losses import cross_entropy  # noqa: F401  (also exported here, as before)
from sam_jax.optim import _core as optim_core
from sam_jax.optim import registry as optim_registry
from sam_jax.train.config import ACCUM_EPSILON

Params = Any


class TrainState(NamedTuple):
    """What a step reads and writes.

    Attributes:
      params: the ``params`` collection.
      batch_stats: the ``batch_stats`` collection (``{}`` for models without BN).
      opt_state: the optimizer chain's state (see `build_optimizer`).
    """

    params: Params
    batch_stats: Any
    opt_state: Any


class OptimizerSpec(NamedTuple):
    """The hashable description of one phase's optimizer (a compile-cache key).

    Attributes:
      name: perturbation name (``sgd`` = identity).
      rho: perturbation radius.
      kwargs: sorted ``(key, value)`` extras of the perturbation.
      momentum, nesterov: the momentum buffer (``optax.trace``).
      weight_decay: decoupled weight decay (0 when the decay is in the loss).
      clip_norm: global-norm clip of the final gradient (None: off).
    """

    name: str
    rho: float
    kwargs: tuple
    momentum: float
    nesterov: bool
    weight_decay: float
    clip_norm: Optional[float]


# Index of the perturbation and of the momentum trace in `build_optimizer`'s chain;
# `momentum_at_switch='carry'` copies the element at TRACE_INDEX across a switch.
PERTURBATION_INDEX = 0
TRACE_INDEX = -1


def build_optimizer(spec: OptimizerSpec, axis_name: Optional[str] = None,
                    sync_perturbation: bool = True) -> optax.GradientTransformationExtraArgs:
    """``chain(perturbation, [clip], [add_decayed_weights], trace)`` for one phase.

    The chain returns the *direction* (the momentum buffer); the step applies
    ``-lr * direction``, which is exactly ``optax.sgd(lr, momentum, nesterov)``
    (``chain(trace, scale_by_learning_rate)``) with lr taken from the global step.

    Clipping comes *after* the perturbation, i.e. it clips the final (perturbed)
    gradient as the official JAX SAM does (papers.md §1); decoupled weight decay is
    added before the momentum as PyTorch's SGD does.

    Args:
      spec: the phase's `OptimizerSpec`.
      axis_name: ``'data'`` inside ``shard_map`` (per-device ε), else None.
      sync_perturbation: passed to the perturbation with ``axis_name``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    return optax.chain(*optimizer_parts(spec, axis_name, sync_perturbation))


def optimizer_parts(spec: OptimizerSpec, axis_name: Optional[str] = None,
                    sync_perturbation: bool = True) -> list:
    """The transforms `build_optimizer` chains: ``[perturbation, [clip], [decay], trace]``
    (gradient accumulation runs the first once per microbatch, the rest once per step)."""
    kwargs = dict(spec.kwargs)
    if spec.name != "sgd" and axis_name is not None:
        kwargs.update(axis_name=axis_name, sync_perturbation=sync_perturbation)
    parts = [optim.make_perturbation(spec.name, spec.rho, **kwargs)]
    if spec.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(spec.clip_norm))
    if spec.weight_decay:
        parts.append(optax.add_decayed_weights(spec.weight_decay))
    parts.append(optax.trace(decay=spec.momentum, nesterov=spec.nesterov))
    return parts


def _example_weights(batch) -> jax.Array:
    if "mask" in batch:
        return batch["mask"].astype(jnp.float32)
    return jnp.ones(batch["y"].shape[0], jnp.float32)


def l2_penalty(params: Params) -> jax.Array:
    """``0.5 * ||params||²`` over every parameter (official JAX SAM: BN and biases included)."""
    return 0.5 * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))


def make_train_step(model: nn.Module, spec: OptimizerSpec, *, label_smoothing: float,
                    l2_weight_decay: float, axis_name: Optional[str] = None,
                    sync_perturbation: bool = True,
                    eval_mode_curvature: bool = True,
                    step_kind: Optional[bool] = None,
                    grad_accum: int = 1,
                    accum_epsilon: str = "microbatch",
                    **step_kind_alias) -> Callable:
    """The pure train step ``(state, batch, lr, rng) -> (state, metrics)``.

    Everything algorithm-specific comes from the phase's declaration
    (`sam_jax.optim.registry`): the extra ``update`` inputs it asks for, the fields
    it logs, and its step kinds.

    Args:
      model: Flax module ``__call__(x, train)``.
      spec: the phase's optimizer.
      label_smoothing: of the training loss.
      l2_weight_decay: coefficient of ``0.5·wd·‖w‖²`` inside the loss (0: off).
      axis_name: ``'data'`` when the step runs per device inside ``shard_map``:
        then the loss, BatchNorm statistics, metrics and (for SGD / ρ = 0) the
        gradient are pmean-ed here, the SAM transform pmeans its own output.
      sync_perturbation: see `build_optimizer`.
      eval_mode_curvature: an algorithm that asks for the eval-mode gradient
        function (``optim._core.EVAL_MODE_GRAD_FN``, e.g. for HVPs) gets it with
        BN running statistics (released code of the algorithms that do); otherwise
        it uses ``grad_fn`` (train mode).
      step_kind: for algorithms with two step kinds (declared ``step_picker``):
        ``True`` / ``False`` compiles the expensive / cheap kind, passed to
        ``update`` under the algorithm's ``step_kind_arg`` (no ``lax.cond``); the
        caller picks one per step with `sam_jax.optim.registry.step_picker`. None
        keeps the transform's in-graph schedule.
      **step_kind_alias: ``step_kind`` under the algorithm's own keyword (its
        declared ``step_kind_arg``), as older callers pass it.
      grad_accum: K >= 1 microbatches per step (docs/train.md, "Gradient
        accumulation"): the
        (per-device) batch is split into K equal microbatches in order; each gets
        its clean gradient ``g_j``, its own perturbation (the chain's first
        transform, run once per microbatch: ε_j from ``g_j``, m-sharpness with
        m = the microbatch size) and its perturbed gradient; their mean goes
        through the rest of the chain once. BatchNorm: each microbatch is
        normalized by its own statistics; the new running statistics are the mean
        of the K microbatches' updates of the step's statistics (one EMA update
        per step). K = 1 is the plain step (the same code, bit for bit).
      accum_epsilon: with K > 1, ``"microbatch"`` (above) or ``"batch"``: full-batch
        ε, exact: the ascent gradient is the mean of the microbatches' clean
        gradients and ``grad_fn`` (and the eval-mode one) the mean of their
        gradient functions, so the transform runs once per step on the whole
        batch's gradients (without BatchNorm: the K = 1 step, to float rounding;
        step kinds work as without accumulation). Same cost in gradients.

    Returns:
      ``step(state, batch, lr, rng)``; ``metrics`` holds sums over the batch
      (``loss_sum``, ``correct``, ``count``), the norms ``grad_norm``,
      ``perturbation_norm`` and the algorithm's declared logged fields.
    """
    declared = optim_registry.algorithm(spec.name)
    own_arg = declared.step_kind_arg
    for key, value in step_kind_alias.items():
        if value is None:  # None is the default kind under any name
            continue
        if key != own_arg:
            owners = [a.title for a in optim_registry.ALGORITHMS.values()
                      if a.step_kind_arg == key]
            if not owners:
                raise TypeError(f"make_train_step() got an unexpected keyword argument {key!r}")
            article = "an" if owners[0][:1] in "AEIOU" else "a"
            raise ValueError(f"{key} is {article} {owners[0]} option; the phase is {spec.name!r}")
        step_kind = value
    if step_kind is not None and own_arg is None:
        raise ValueError(f"the phase {spec.name!r} has one kind of step; step_kind must be None")
    logged, inputs = declared.logged_fields, declared.update_inputs
    if int(grad_accum) != grad_accum or grad_accum < 1:
        raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}")
    if accum_epsilon not in ACCUM_EPSILON:
        raise ValueError(f"accum_epsilon must be one of {ACCUM_EPSILON}, got {accum_epsilon!r}")
    parts = optimizer_parts(spec, axis_name, sync_perturbation)
    tx = optax.chain(*parts)
    passes_through = spec.name == "sgd" or spec.rho == 0

    def loss_and_aux(params, batch_stats, batch, rng, train=True):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        if train:
            logits, new_vars = model.apply(variables, batch["x"], train=True,
                                           mutable=["batch_stats"], rngs={"dropout": rng})
            new_stats = new_vars.get("batch_stats", {})
        else:
            logits, new_stats = model.apply(variables, batch["x"], train=False), batch_stats
        weights = _example_weights(batch)
        losses = cross_entropy(logits, batch["y"], label_smoothing)
        loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        objective = loss + l2_weight_decay * l2_penalty(params) if l2_weight_decay else loss
        return objective, (loss, logits, new_stats)

    def update_inputs(state: TrainState, batch, lr, rng) -> dict:
        extra = {} if step_kind is None else {own_arg: bool(step_kind)}
        for name in inputs:  # what the algorithm asks for, from what the engine has
            if name == optim_core.EVAL_MODE_GRAD_FN:
                if eval_mode_curvature and state.batch_stats:
                    extra[name] = jax.grad(
                        lambda p: loss_and_aux(p, state.batch_stats, batch, rng, train=False)[0])
            elif name == optim_core.LEARNING_RATE:
                extra[name] = lr
            else:
                raise ValueError(f"{spec.name!r} asks for update input {name!r}, which this "
                                 f"engine does not provide ({optim_core.ENGINE_INPUTS})")
        return extra

    def step(state: TrainState, batch, lr, rng):
        if axis_name is not None:  # a different dropout key per device (see loop.dropout_key)
            rng = rng.at[1].add(jax.lax.axis_index(axis_name).astype(rng.dtype))
        if grad_accum > 1 and accum_epsilon == "batch":
            return batch_epsilon_step(state, batch, lr, rng)
        if grad_accum > 1:
            return accumulated_step(state, batch, lr, rng)
        grad_of = jax.value_and_grad(loss_and_aux, has_aux=True)
        (_, (loss, logits, new_stats)), grads = grad_of(state.params, state.batch_stats, batch, rng)

        def grad_fn(params):  # train-mode BN; its updated statistics are discarded
            return jax.grad(lambda p: loss_and_aux(p, state.batch_stats, batch, rng)[0])(params)

        extra = update_inputs(state, batch, lr, rng)
        grad_norm = optax.tree.norm(grads)
        direction, opt_state = tx.update(grads, state.opt_state, state.params,
                                         grad_fn=grad_fn, **extra)
        if axis_name is not None and passes_through:
            # The identity / rho = 0 transform returns the local gradient untouched.
            direction = jax.lax.pmean(direction, axis_name)
        params = jax.tree.map(lambda p, d: p - (lr * d).astype(p.dtype), state.params, direction)

        weights = _example_weights(batch)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["y"]) * weights)
        metrics = {"loss_sum": loss * jnp.sum(weights), "correct": correct,
                   "count": jnp.sum(weights), "grad_norm": grad_norm}
        stats = optim.perturbation_stats(opt_state)
        metrics["perturbation_norm"] = stats.get("perturbation_norm", jnp.zeros((), jnp.float32))
        for key in logged:
            metrics[key] = stats[key]
        return finish(params, new_stats, opt_state, metrics)

    def finish(params, new_stats, opt_state, metrics):
        if axis_name is not None:
            sums = {k: jax.lax.psum(metrics[k], axis_name) for k in ("loss_sum", "correct", "count")}
            means = jax.lax.pmean({k: v for k, v in metrics.items() if k not in sums}, axis_name)
            metrics = {**sums, **means}
            new_stats = jax.lax.pmean(new_stats, axis_name)
        return TrainState(params, new_stats, opt_state), metrics

    perturbation, rest = parts[0], optax.chain(*parts[1:])

    def split(batch, rng):
        size = batch["y"].shape[0]
        if size % grad_accum:
            raise ValueError(f"the (per-device) batch of {size} examples does not split into "
                             f"grad_accum={grad_accum} equal microbatches")
        m = size // grad_accum
        micros = [jax.tree.map(lambda x, j=j: x[j * m:(j + 1) * m], batch)
                  for j in range(grad_accum)]
        return micros, [jax.random.fold_in(rng, j) for j in range(grad_accum)]

    def mean_of(fns):
        def fn(params):
            total = None
            for f in fns:  # one microbatch's backward pass at a time
                g = f(params)
                total = g if total is None else jax.tree.map(jnp.add, total, g)
            return jax.tree.map(lambda x: x / len(fns), total)
        return fn

    def batch_epsilon_step(state: TrainState, batch, lr, rng):
        # Full-batch ε: the ascent gradient and every gradient the transform asks
        # for are means over the microbatches, i.e. the whole batch's (without BN);
        # the transform runs once per step, so step kinds work as without accumulation.
        micros, rngs = split(batch, rng)
        grad_of = jax.value_and_grad(loss_and_aux, has_aux=True)
        totals, grad_fns, eval_fns = None, [], []
        for micro, micro_rng in zip(micros, rngs):
            (_, (loss, logits, stats_j)), grads = grad_of(state.params, state.batch_stats,
                                                         micro, micro_rng)
            weights = _example_weights(micro)
            sums = {"grads": grads, "batch_stats": stats_j,
                    "loss_sum": loss * jnp.sum(weights), "count": jnp.sum(weights),
                    "correct": jnp.sum((jnp.argmax(logits, -1) == micro["y"]) * weights)}
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            grad_fns.append(jax.grad(lambda p, micro=micro, r=micro_rng:
                                     loss_and_aux(p, state.batch_stats, micro, r)[0]))
            eval_fns.append(update_inputs(state, micro, lr, micro_rng))
        mean = lambda tree: jax.tree.map(lambda x: x / grad_accum, tree)  # noqa: E731
        grads = mean(totals["grads"])
        extra = dict(eval_fns[0])
        if optim_core.EVAL_MODE_GRAD_FN in extra:
            extra[optim_core.EVAL_MODE_GRAD_FN] = mean_of(
                [e[optim_core.EVAL_MODE_GRAD_FN] for e in eval_fns])
        direction, opt_state = tx.update(grads, state.opt_state, state.params,
                                         grad_fn=mean_of(grad_fns), **extra)
        if axis_name is not None and passes_through:
            direction = jax.lax.pmean(direction, axis_name)
        params = jax.tree.map(lambda p, d: p - (lr * d).astype(p.dtype), state.params, direction)
        metrics = {k: totals[k] for k in ("loss_sum", "correct", "count")}
        metrics["grad_norm"] = optax.tree.norm(grads)
        stats = optim.perturbation_stats(opt_state)
        metrics["perturbation_norm"] = stats.get("perturbation_norm", jnp.zeros((), jnp.float32))
        for key in logged:
            metrics[key] = stats[key]
        return finish(params, mean(totals["batch_stats"]), opt_state, metrics)

    def accumulated_step(state: TrainState, batch, lr, rng):
        # K microbatches in order, unrolled (XLA:CPU runs convolutions inside while
        # bodies far slower, jax-ml/jax#12868); the perturbation's state is threaded.
        micros, rngs = split(batch, rng)
        pert_state = state.opt_state[0]
        totals, per_micro = None, []
        for micro, micro_rng in zip(micros, rngs):
            grad_of = jax.value_and_grad(loss_and_aux, has_aux=True)
            (_, (loss, logits, stats_j)), grads = grad_of(state.params, state.batch_stats,
                                                         micro, micro_rng)

            def grad_fn(params, micro=micro, micro_rng=micro_rng):
                return jax.grad(
                    lambda p: loss_and_aux(p, state.batch_stats, micro, micro_rng)[0])(params)

            extra = update_inputs(state, micro, lr, micro_rng)
            direction, pert_state = perturbation.update(grads, pert_state, state.params,
                                                        grad_fn=grad_fn, **extra)
            weights = _example_weights(micro)
            correct = jnp.sum((jnp.argmax(logits, -1) == micro["y"]) * weights)
            sums = {"direction": direction, "grads": grads, "batch_stats": stats_j,
                    "loss_sum": loss * jnp.sum(weights), "correct": correct,
                    "count": jnp.sum(weights)}
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            per_micro.append(optim.perturbation_stats((pert_state,)))
        mean = lambda tree: jax.tree.map(lambda x: x / grad_accum, tree)  # noqa: E731
        direction = mean(totals["direction"])
        if axis_name is not None and passes_through:
            direction = jax.lax.pmean(direction, axis_name)
        direction, rest_state = rest.update(direction, tuple(state.opt_state[1:]), state.params)
        opt_state = (pert_state, *rest_state)
        params = jax.tree.map(lambda p, d: p - (lr * d).astype(p.dtype), state.params, direction)
        new_stats = mean(totals["batch_stats"])
        metrics = {k: totals[k] for k in ("loss_sum", "correct", "count")}
        metrics["grad_norm"] = optax.tree.norm(mean(totals["grads"]))
        zero = jnp.zeros((), jnp.float32)
        metrics["perturbation_norm"] = sum(s.get("perturbation_norm", zero)
                                           for s in per_micro) / grad_accum
        for key in logged:  # the latest value, as without accumulation
            metrics[key] = per_micro[-1][key]
        return finish(params, new_stats, opt_state, metrics)

    return step


def make_eval_step(model: nn.Module, axis_name: Optional[str] = None) -> Callable:
    """``(params, batch_stats, batch) -> {loss_sum, correct, count}`` in eval mode.

    The test loss is the plain cross-entropy (no label smoothing, no L2).
    """

    def step(params, batch_stats, batch):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits = model.apply(variables, batch["x"], train=False)
        weights = _example_weights(batch)
        losses = cross_entropy(logits, batch["y"])
        correct = (jnp.argmax(logits, -1) == batch["y"]) * weights
        metrics = {"loss_sum": jnp.sum(losses * weights), "correct": jnp.sum(correct),
                   "count": jnp.sum(weights)}
        if axis_name is not None:
            metrics = jax.lax.psum(metrics, axis_name)
        return metrics

    return step
