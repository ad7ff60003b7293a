"""One phase's optimizer, built once (`PhaseOptimizer`), and the compiled steps the
engine reuses across phases and runs (`CompileCache`).

Everything the training loop needs to know about a phase's optimizer comes from
its `PhaseOptimizer`: the transform (``chain(perturbation, [clip], [decay],
momentum)``, `sam_jax.train.step.build_optimizer`), its cost in gradient
evaluations, the step kinds it compiles and the host picker between them, the
optimizer state at a phase switch (momentum carried or reset, found by type, not by
position in the chain) and the perturbation count in a state. The loop never
indexes into the chain.

A compiled step depends on the phase only through what changes the program: the
algorithm and its options, momentum, weight decay, clipping, and whether ρ is 0.
The learning rate is a traced argument of every step; ρ is one too whenever the
cache's ρ mode is traced (`CompileCache`), so a ρ sweep, or two SAM phases with
different ρ, run one compiled step.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax

from sam_jax.optim import _core as optim_core
from sam_jax.optim import registry as optim_registry
from sam_jax.train import parallel
from sam_jax.train.config import Phase, TrainConfig
from sam_jax.train.step import OptimizerSpec, build_optimizer, make_eval_step, make_train_step

RHO_MODES = ("auto", "traced", "static")


def optimizer_spec(config: TrainConfig, phase: Phase,
                   steps_per_epoch: Optional[int] = None) -> OptimizerSpec:
    """The `OptimizerSpec` of ``phase`` under ``config``.

    ``steps_per_epoch`` (the run's optimizer steps per epoch) is handed to the
    perturbation when it declares it wants it and the phase does not set it (the
    algorithm's declared ``engine_options``).
    """
    decoupled = config.weight_decay if config.weight_decay_mode == "decoupled" else 0.0
    kwargs = {}
    if phase.name != "sgd":
        kwargs = optim_registry.engine_kwargs(phase.name, config.phase_kwargs(phase),
                                              steps_per_epoch=steps_per_epoch)
    return OptimizerSpec(
        name=phase.name, rho=float(config.phase_rho(phase)),
        kwargs=tuple(sorted(kwargs.items())),
        momentum=float(config.momentum), nesterov=bool(config.nesterov),
        weight_decay=float(decoupled), clip_norm=config.clip_norm)


def _is_trace_state(node) -> bool:
    return isinstance(node, optax.TraceState)


class PhaseOptimizer:
    """A phase's optimizer and everything the engine asks about it.

    Built once per phase from ``(config, phase, steps_per_epoch)``.

    Attributes:
      phase: the `Phase`.
      name: the algorithm's registry name (``sgd``: plain SGD).
      spec: the hashable `OptimizerSpec` (ρ included).
      rho: the phase's ρ (0.0 for SGD), as logged.
      grad_evals_per_step: gradient evaluations per step (1 for SGD and ρ = 0;
        else the algorithm's declaration, an HVP counting 2).
      logged_fields: the algorithm's declared fields, logged beside the norms.
      step_picker: ``count -> bool`` choosing the expensive (True) or the cheap
        step kind on the host, for an algorithm that declares two kinds when
        ``config.host_step_kinds``; else None (one compiled step).
      per_device: the step runs per device in ``shard_map`` (per-device ε).
    """

    def __init__(self, config: TrainConfig, phase: Phase, steps_per_epoch: Optional[int]):
        self.phase = phase
        self.name = phase.name
        self.spec = optimizer_spec(config, phase, steps_per_epoch)
        self.rho = self.spec.rho if self.name != "sgd" else 0.0
        declared = optim_registry.algorithm(self.name)
        self.logged_fields = tuple(declared.logged_fields)
        kwargs = dict(self.spec.kwargs)
        if self.name == "sgd" or self.spec.rho == 0:
            self.grad_evals_per_step = 1.0
        else:
            self.grad_evals_per_step = float(
                optim_registry.gradient_evals_per_step(self.name, **kwargs))
        self.step_picker: Optional[Callable[[int], bool]] = None
        if config.host_step_kinds and self.name != "sgd":
            self.step_picker = optim_registry.step_picker(self.name, **kwargs)
        self.per_device = bool(config.per_device_perturbation) and self.name != "sgd"
        self._carry_momentum = config.momentum_at_switch == "carry"
        self._transform = build_optimizer(self.spec)  # raises on bad rho / options

    # ------------------------------------------------------------- the transform
    @property
    def transform(self) -> optax.GradientTransformationExtraArgs:
        """The chain (single device, static ρ); its ``init`` gives the state layout."""
        return self._transform

    def init(self, params) -> Any:
        """A fresh optimizer state for ``params``."""
        return self._transform.init(params)

    @property
    def step_kinds(self) -> tuple:
        """The compiled step kinds: ``(None,)`` (one step) or ``(False, True)``."""
        return (None,) if self.step_picker is None else (False, True)

    def pick(self, count: int) -> Optional[bool]:
        """The step kind of the step whose perturbation count before it is ``count``."""
        return None if self.step_picker is None else bool(self.step_picker(count))

    def hyperparams(self, lr: float) -> dict:
        """The traced scalars of one step: ``{"lr", "rho"}`` (float32)."""
        return {"lr": np.float32(lr), "rho": np.float32(self.rho)}

    # ---------------------------------------------------------- state queries
    @staticmethod
    def count(opt_state) -> int:
        """The perturbation's step count in ``opt_state`` (0 without a family state).

        Found by type (the SAM-family state, `sam_jax.optim.perturbation_stats`),
        wherever it sits in the chain.
        """
        stats = optim_registry.perturbation_stats(opt_state)
        return int(jax.device_get(stats["count"])) if "count" in stats else 0

    def switch_from(self, previous_opt_state, params) -> Any:
        """The optimizer state at the start of this phase.

        A fresh state; with ``momentum_at_switch='carry'`` and a previous phase's
        state, the momentum buffer (the ``optax.TraceState``, found by type) is the
        previous one (the paper's code resets it: ``'reset'``).
        """
        new = self.init(params)
        if previous_opt_state is None or not self._carry_momentum:
            return new
        old = [n for n in jax.tree.leaves(previous_opt_state, is_leaf=_is_trace_state)
               if _is_trace_state(n)]
        if len(old) != 1:
            raise ValueError(f"expected one momentum buffer in the previous optimizer state, "
                             f"found {len(old)}")
        return jax.tree.map(lambda n: old[0] if _is_trace_state(n) else n, new,
                            is_leaf=_is_trace_state)

    def compile_key(self, traced_rho: bool) -> OptimizerSpec:
        """The spec as a compiled step sees it: with a traced ρ, only ``ρ == 0``
        (which compiles without the second gradient) is part of the program."""
        if traced_rho and self.traces_rho(traced_rho):
            return self.spec._replace(rho="traced")
        return self.spec

    def traces_rho(self, traced_rho: bool) -> bool:
        """Whether this phase's compiled step takes ρ as a traced value."""
        return traced_rho and self.name != "sgd" and self.spec.rho != 0


# ------------------------------------------------------------------ compile cache
def _nonzero_rho_hint():
    """`sam_jax.optim._core`'s context manager under which a traced ρ is taken to be
    nonzero (no ``lax.cond`` around the second gradient), or None when it has none."""
    return getattr(optim_core, "assume_nonzero_rho", None)


class CompileCache:
    """The compiled train/eval steps and init functions the engine reuses.

    `sam_jax.train.run` uses `CompileCache.default` (one per process) unless given
    one, so an experiment that calls ``run`` many times compiles each kind of step
    once, as before; pass ``CompileCache()`` for an isolated cache (a test counting
    compilations, or to free memory with `clear`).

    Args:
      rho: how ρ enters a compiled step. ``"traced"``: as a traced scalar, so phases
        and runs that differ only in ρ share one compiled step; ``"static"``: as a
        constant (one compiled step per ρ); ``"auto"`` (default): traced where it
        costs nothing, static where it would slow the step down. With a traced ρ the
        SAM-family transforms keep their ``ρ = 0`` pass-through as an in-graph
        ``lax.cond`` around the second gradient (`sam_jax.optim._core.select_on_rho`),
        and XLA:CPU runs convolutions inside ``cond`` bodies 40-150x slower
        (jax-ml/jax#12868; measured here: a small CNN's SAM step 0.4 s -> 25 s). So
        ``auto`` traces ρ on accelerators, and on CPU only when `sam_jax.optim._core`
        offers ``assume_nonzero_rho`` (the engine knows statically that ρ != 0:
        ``ρ == 0`` phases compile their own step).

    Attributes:
      traces: ``{key: number of times the train step under key was traced}``
        (a retrace means a recompilation).
    """

    _default: Optional["CompileCache"] = None

    def __init__(self, rho: str = "auto"):
        if rho not in RHO_MODES:
            raise ValueError(f"rho must be one of {RHO_MODES}, got {rho!r}")
        self.rho_mode = rho
        self._train: dict = {}
        self._eval: dict = {}
        self._init: dict = {}
        self.traces: dict = {}

    @classmethod
    def default(cls) -> "CompileCache":
        """The process-wide cache `run` uses when it is given none."""
        if cls._default is None:
            cls._default = cls()
        return cls._default

    def clear(self) -> None:
        """Drops every compiled function (they are rebuilt on next use)."""
        self._train.clear()
        self._eval.clear()
        self._init.clear()
        self.traces.clear()

    @property
    def traced_rho(self) -> bool:
        """Whether compiled steps take ρ as a traced value (see ``rho``)."""
        if self.rho_mode != "auto":
            return self.rho_mode == "traced"
        return jax.default_backend() != "cpu" or _nonzero_rho_hint() is not None

    @property
    def train_step_compilations(self) -> int:
        """Total traces (compilations) of train steps through this cache."""
        return sum(self.traces.values())

    # --------------------------------------------------------------- accessors
    def train_step(self, model, config: TrainConfig, opt: PhaseOptimizer, mesh,
                   num_classes: int, step_kind: Optional[bool] = None) -> Callable:
        """The jitted ``step(state, batch, hyper, rng)`` of ``opt``'s phase (the state
        donated: read nothing from the state passed in after the call)."""
        traced = opt.traces_rho(self.traced_rho)
        l2 = config.weight_decay if config.weight_decay_mode == "loss" else 0.0
        key = (_model_key(config, num_classes), opt.compile_key(traced),
               float(config.label_smoothing), float(l2), opt.per_device, _mesh_key(mesh),
               int(config.grad_accum), config.accum_epsilon, step_kind)
        if key not in self._train:
            step = make_train_step(model, opt.spec, label_smoothing=config.label_smoothing,
                                   l2_weight_decay=l2,
                                   axis_name=parallel.DATA_AXIS if opt.per_device else None,
                                   sync_perturbation=not opt.per_device, step_kind=step_kind,
                                   grad_accum=int(config.grad_accum),
                                   accum_epsilon=config.accum_epsilon,
                                   traced_rho=traced, nonzero_rho_hint=_nonzero_rho_hint())
            self.traces[key] = 0

            def counted(*args, _step=step, _key=key):
                self.traces[_key] += 1  # runs once per trace, i.e. per compilation
                return _step(*args)

            self._train[key] = parallel.jit_train_step(counted, mesh, opt.per_device,
                                                       donate_state=True)
        return self._train[key]

    def eval_step(self, model, config: TrainConfig, mesh, num_classes: int) -> Callable:
        key = (_model_key(config, num_classes), _mesh_key(mesh))
        if key not in self._eval:
            self._eval[key] = parallel.jit_eval_step(make_eval_step(model), mesh)
        return self._eval[key]

    def init_fn(self, model, config: TrainConfig, input_shape, num_classes: int) -> Callable:
        """``rng -> variables`` for the model, jitted once per (model, input shape)."""
        key = (_model_key(config, num_classes), tuple(input_shape))
        if key not in self._init:
            import jax.numpy as jnp

            sample = jnp.zeros((2, *input_shape), jnp.float32)
            self._init[key] = jax.jit(lambda rng: model.init(rng, sample, train=False))
        return self._init[key]


def _model_key(config: TrainConfig, num_classes: int) -> tuple:
    return (config.model, json.dumps(config.model_kwargs, sort_keys=True), num_classes)


def _mesh_key(mesh) -> tuple:
    return tuple(d.id for d in mesh.devices.flat)
