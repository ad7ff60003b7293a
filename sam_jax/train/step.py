"""Pure train and eval steps (jitted by `sam_jax.train.parallel`).

One step of any phase:

1. the *clean* pass: loss, logits and the updated BatchNorm statistics at ``params``
   (train mode), and its gradient ``g``;
2. the optimizer chain ``perturbation -> [clip] -> [decayed weights] -> momentum``
   gets ``g`` and a ``grad_fn`` that evaluates the same minibatch's gradient
   elsewhere. ``grad_fn`` runs the model in train mode (batch statistics) but
   **discards** the statistics it computes, so BatchNorm's state comes from the
   clean pass only (official JAX SAM; updating them twice is davda54/sam #17);
3. ``params <- params - lr * direction``; ``lr`` (and, with ``traced_rho``, ρ) is
   an argument computed on the host, so one compiled step serves every schedule
   and phase (and every ρ > 0).

With ``grad_accum=K`` (gradient accumulation) steps 1-2 run once per microbatch
(the perturbation per microbatch) and the rest of the chain once per step on the
mean of the K perturbed gradients; see `make_train_step`.
"""
from __future__ import annotations

import contextlib
import functools
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


def _hyper(hyper) -> tuple:
    """``(lr, rho)`` from a step's third argument: ``{"lr", "rho"}`` or a bare lr."""
    if isinstance(hyper, dict):
        return hyper["lr"], hyper.get("rho")
    return hyper, None


def _sum_trees(trees: list):
    """``((t0 + t1) + t2) ...`` leaf by leaf (the first tree as is when alone)."""
    return functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), trees)


def make_train_step(model: nn.Module, spec: OptimizerSpec, *, label_smoothing: float,
                    l2_weight_decay: float, axis_name: Optional[str] = None,
                    sync_perturbation: bool = True,
                    eval_mode_curvature: bool = True,
                    step_kind: Optional[bool] = None,
                    grad_accum: int = 1,
                    accum_epsilon: str = "microbatch",
                    traced_rho: bool = False,
                    nonzero_rho_hint: Optional[Callable] = None,
                    **step_kind_alias) -> Callable:
    """The pure train step ``(state, batch, hyper, rng) -> (state, metrics)``.

    Everything algorithm-specific comes from the phase's declaration
    (`sam_jax.optim.registry`): the extra ``update`` inputs it asks for, the fields
    it logs, and its step kinds. One code path serves every case: the clean pass
    runs once per microbatch (one microbatch without accumulation), then the
    transform runs either once on the mean gradient (no accumulation, or
    ``accum_epsilon="batch"``) or, per-microbatch ε, its perturbation once per
    microbatch and the rest of the chain once on the mean.

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
        per step). K = 1 is the plain step.
      accum_epsilon: with K > 1, ``"microbatch"`` (above) or ``"batch"``: full-batch
        ε, exact: the ascent gradient is the mean of the microbatches' clean
        gradients and ``grad_fn`` (and the eval-mode one) the mean of their
        gradient functions, so the transform runs once per step on the whole
        batch's gradients (without BatchNorm: the K = 1 step, to float rounding;
        step kinds work as without accumulation). Same cost in gradients.
      traced_rho: build the transform inside the step from ``hyper["rho"]`` (a
        traced scalar), so one compiled step serves every ρ > 0 of this spec; the
        spec's own ρ must then be nonzero (ρ = 0 compiles without the second
        gradient). False: the spec's ρ is a constant of the program.
      nonzero_rho_hint: with ``traced_rho``, a context manager factory under which
        the transform takes the traced ρ to be nonzero (no ``lax.cond``), e.g.
        ``sam_jax.optim._core.assume_nonzero_rho`` where it exists.

    Returns:
      ``step(state, batch, hyper, rng)``, ``hyper`` a dict ``{"lr", "rho"}`` of
      scalars (or the bare learning rate, as older callers pass it: then ρ is the
      spec's). ``metrics`` holds sums over the batch (``loss_sum``, ``correct``,
      ``count``), the norms ``grad_norm`` (of the clean gradient, mean over
      microbatches), ``perturbation_norm`` (‖ε‖), ``param_norm`` (‖θ‖ after the
      step), ``update_norm`` (‖θ_after - θ_before‖) and the algorithm's declared
      logged fields.
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
    passes_through = spec.name == "sgd" or spec.rho == 0
    if traced_rho and passes_through:
        raise ValueError("traced_rho needs a phase with a perturbation and rho != 0 "
                         f"(got {spec.name!r}, rho={spec.rho})")
    parts = optimizer_parts(spec, axis_name, sync_perturbation)  # validates the options
    per_microbatch = grad_accum > 1 and accum_epsilon == "microbatch"

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

    def split(batch, rng) -> list:
        """``[(microbatch, its dropout key)]``: the batch itself when K = 1."""
        if grad_accum == 1:
            return [(batch, rng)]
        size = batch["y"].shape[0]
        if size % grad_accum:
            raise ValueError(f"the (per-device) batch of {size} examples does not split into "
                             f"grad_accum={grad_accum} equal microbatches")
        m = size // grad_accum
        return [(jax.tree.map(lambda x, j=j: x[j * m:(j + 1) * m], batch),
                 jax.random.fold_in(rng, j)) for j in range(grad_accum)]

    def clean_pass(state: TrainState, micro, micro_rng, lr) -> dict:
        """One microbatch at ``params``: its gradient, BN statistics, sums and the
        gradient functions the transform may call."""
        grad_of = jax.value_and_grad(loss_and_aux, has_aux=True)
        (_, (loss, logits, stats)), grads = grad_of(state.params, state.batch_stats,
                                                   micro, micro_rng)
        weights = _example_weights(micro)
        return {
            "grads": grads, "batch_stats": stats,
            "sums": {"loss_sum": loss * jnp.sum(weights),
                     "correct": jnp.sum((jnp.argmax(logits, -1) == micro["y"]) * weights),
                     "count": jnp.sum(weights)},
            # train-mode BN; the statistics it computes are discarded
            "grad_fn": jax.grad(lambda p: loss_and_aux(p, state.batch_stats, micro,
                                                       micro_rng)[0]),
            "extra": update_inputs(state, micro, lr, micro_rng),
        }

    def mean(trees: list):
        if len(trees) == 1:
            return trees[0]
        return jax.tree.map(lambda x: x / grad_accum, _sum_trees(trees))

    def mean_of(fns: list) -> Callable:
        if len(fns) == 1:
            return fns[0]

        def fn(params):  # one microbatch's backward pass at a time
            return mean([f(params) for f in fns])
        return fn

    def step(state: TrainState, batch, hyper, rng):
        lr, rho = _hyper(hyper)
        if traced_rho and rho is None:
            raise ValueError("a traced-rho step needs hyper={'lr': ..., 'rho': ...}")
        if axis_name is not None:  # a different dropout key per device (see loop.dropout_key)
            rng = rng.at[1].add(jax.lax.axis_index(axis_name).astype(rng.dtype))
        hint = (nonzero_rho_hint() if traced_rho and nonzero_rho_hint is not None
                else contextlib.nullcontext())
        with hint:
            chain = (optimizer_parts(spec._replace(rho=rho), axis_name, sync_perturbation)
                     if traced_rho else parts)
            passes = [clean_pass(state, micro, r, lr) for micro, r in split(batch, rng)]
            if per_microbatch:
                direction, opt_state, pert_stats = per_microbatch_update(state, chain, passes)
            else:
                direction, opt_state, pert_stats = whole_batch_update(state, chain, passes)
        if axis_name is not None and passes_through and not per_microbatch:
            # The identity / rho = 0 transform returns the local gradient untouched.
            direction = jax.lax.pmean(direction, axis_name)
        params = jax.tree.map(lambda p, d: p - (lr * d).astype(p.dtype), state.params, direction)

        metrics = dict(_sum_trees([p["sums"] for p in passes]))
        metrics["grad_norm"] = optax.tree.norm(mean([p["grads"] for p in passes]))
        metrics.update(pert_stats)
        metrics["param_norm"] = optax.tree.norm(params)
        metrics["update_norm"] = optax.tree.norm(jax.tree.map(jnp.subtract, params,
                                                              state.params))
        new_stats = mean([p["batch_stats"] for p in passes])
        if axis_name is not None:
            sums = {k: jax.lax.psum(metrics[k], axis_name) for k in ("loss_sum", "correct", "count")}
            means = jax.lax.pmean({k: v for k, v in metrics.items() if k not in sums}, axis_name)
            metrics = {**sums, **means}
            new_stats = jax.lax.pmean(new_stats, axis_name)
        return TrainState(params, new_stats, opt_state), metrics

    def logged_stats(stats: dict) -> dict:
        out = {"perturbation_norm": stats.get("perturbation_norm", jnp.zeros((), jnp.float32))}
        out.update({key: stats[key] for key in logged})
        return out

    def whole_batch_update(state: TrainState, chain: list, passes: list):
        # The transform runs once, on the (mean) clean gradient; every gradient it
        # asks for is the mean over the microbatches, i.e. the whole batch's
        # (without BN); step kinds work as without accumulation.
        extra = dict(passes[0]["extra"])
        if optim_core.EVAL_MODE_GRAD_FN in extra:
            extra[optim_core.EVAL_MODE_GRAD_FN] = mean_of(
                [p["extra"][optim_core.EVAL_MODE_GRAD_FN] for p in passes])
        direction, opt_state = optax.chain(*chain).update(
            mean([p["grads"] for p in passes]), state.opt_state, state.params,
            grad_fn=mean_of([p["grad_fn"] for p in passes]), **extra)
        return direction, opt_state, logged_stats(optim.perturbation_stats(opt_state))

    def per_microbatch_update(state: TrainState, chain: list, passes: list):
        # The chain's first transform (the perturbation) once per microbatch, in
        # order, its state threaded; the rest once on the mean of their outputs.
        # Unrolled: XLA:CPU runs convolutions inside while bodies far slower
        # (jax-ml/jax#12868).
        perturbation, rest = chain[0], optax.chain(*chain[1:])
        pert_state, rest_state = _split_chain_state(state.opt_state)
        directions, per_micro = [], []
        for p in passes:
            direction, pert_state = perturbation.update(p["grads"], pert_state, state.params,
                                                        grad_fn=p["grad_fn"], **p["extra"])
            directions.append(direction)
            per_micro.append(optim.perturbation_stats((pert_state,)))
        direction = mean(directions)
        if axis_name is not None and passes_through:
            direction = jax.lax.pmean(direction, axis_name)
        direction, rest_state = rest.update(direction, rest_state, state.params)
        zero = jnp.zeros((), jnp.float32)
        stats = {"perturbation_norm": sum(s.get("perturbation_norm", zero)
                                          for s in per_micro) / grad_accum}
        stats.update({key: per_micro[-1][key] for key in logged})  # the latest value
        return direction, _join_chain_state(pert_state, rest_state), stats

    return step


def _split_chain_state(opt_state) -> tuple:
    """``(perturbation state, state of the rest of the chain)`` of `build_optimizer`'s
    chain (its layout is `optimizer_parts`'s: the perturbation first)."""
    return opt_state[0], tuple(opt_state[1:])


def _join_chain_state(perturbation_state, rest_state) -> tuple:
    """The inverse of `_split_chain_state`."""
    return (perturbation_state, *rest_state)


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
