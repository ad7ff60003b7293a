"""``run(config) -> RunResult``: phases, switching, checkpoints, resume, logging.

The epoch loop is plain Python over jitted steps. Everything that decides what a
step computes is a pure function of the config and the global position:

* the phase of global epoch ``e`` (`TrainConfig.phase_index`),
* the learning rate of global step ``s`` (`sam_jax.train.schedules`),
* the batches of epoch ``e`` (``Dataset.batches(seed=seed, epoch=e)``),
* the dropout key of step ``s`` (`dropout_key`),

so a run resumed from its checkpoint at epoch ``e`` (or branched from another run's
checkpoint with ``init_from``/``init_step``) computes exactly what the
uninterrupted run computes from epoch ``e`` on.

Compiled steps are cached per (model, optimizer, loss, mesh) for the life of the
process, so an experiment that launches many branched runs compiles each phase once.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.optim import registry as optim_registry
from sam_jax.train import parallel
from sam_jax.train.checkpoint import Checkpointer, CheckpointError, checkpoint_dir
from sam_jax.train.config import (RUN_IDENTITY_FIELDS, Phase, TrainConfig,
                                  identity_differences)
from sam_jax.train.logging import MetricsLog, Progress, write_config
from sam_jax.train.schedules import make_schedule
from sam_jax.train.step import (PERTURBATION_INDEX, TRACE_INDEX, OptimizerSpec, TrainState,
                                build_optimizer, make_eval_step, make_train_step)

# Fields a resumed run must share with the run that wrote the checkpoint: every
# TrainConfig field except the logistics ones (`config.LOGISTICS_FIELDS`).
_RESUME_MUST_MATCH = RUN_IDENTITY_FIELDS


class CodeVersionWarning(UserWarning):
    """A run is resumed by another version of sam_jax than the one that wrote its
    checkpoint (package version or git commit)."""


class TrainingDiverged(RuntimeError):
    """The training loss (or the parameters) became NaN/inf; nothing was saved."""


@dataclasses.dataclass
class RunResult:
    """What `run` returns.

    Attributes:
      variables: final ``{"params": ..., "batch_stats": ...}`` (batch_stats absent
        for models without BatchNorm).
      history: the per-epoch records (as in ``metrics.jsonl``), from epoch 0 of
        this workdir (a resumed run includes the records written before the kill).
      config: the config that ran.
      workdir, checkpoint_dir, metrics_path, config_path: where the results are.
      final_epoch: completed global epochs.
      grad_evals: cumulative gradient evaluations (per example batch; includes the
        prefix of an ``init_from`` source run).
      resumed_from: the epoch this invocation started from (0 for a fresh run).
    """

    variables: dict
    history: list
    config: TrainConfig
    workdir: str
    checkpoint_dir: str
    metrics_path: str
    config_path: str
    final_epoch: int
    grad_evals: float
    resumed_from: int


# --------------------------------------------------------------------- caches
_TRAIN_STEPS: dict = {}
_EVAL_STEPS: dict = {}
_INITS: dict = {}


def _model_key(config: TrainConfig, num_classes: int) -> tuple:
    return (config.model, json.dumps(config.model_kwargs, sort_keys=True), num_classes)


def _mesh_key(mesh) -> tuple:
    return tuple(d.id for d in mesh.devices.flat)


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


def _train_step(model, config: TrainConfig, spec: OptimizerSpec, mesh, num_classes: int,
                step_kind: Optional[bool] = None):
    per_device = config.per_device_perturbation and spec.name != "sgd"
    l2 = config.weight_decay if config.weight_decay_mode == "loss" else 0.0
    key = (_model_key(config, num_classes), spec, float(config.label_smoothing), float(l2),
           per_device, _mesh_key(mesh), int(config.grad_accum), config.accum_epsilon,
           step_kind)
    if key not in _TRAIN_STEPS:
        step = make_train_step(model, spec, label_smoothing=config.label_smoothing,
                               l2_weight_decay=l2,
                               axis_name=parallel.DATA_AXIS if per_device else None,
                               sync_perturbation=not per_device, step_kind=step_kind,
                               grad_accum=int(config.grad_accum),
                               accum_epsilon=config.accum_epsilon)
        _TRAIN_STEPS[key] = parallel.jit_train_step(step, mesh, per_device)
    return _TRAIN_STEPS[key]


def _host_step_picker(config: TrainConfig, spec: OptimizerSpec):
    """``count -> bool`` for a phase whose algorithm has two compiled step kinds
    (declared ``step_picker``) when the host decides (the config's host-picking
    flag, ``TrainConfig.host_step_kinds``), else None. The picker applies the
    transform's own in-graph rule."""
    if not config.host_step_kinds or spec.name == "sgd":
        return None
    return optim_registry.step_picker(spec.name, **dict(spec.kwargs))


def _eval_step(model, config: TrainConfig, mesh, num_classes: int):
    key = (_model_key(config, num_classes), _mesh_key(mesh))
    if key not in _EVAL_STEPS:
        _EVAL_STEPS[key] = parallel.jit_eval_step(make_eval_step(model), mesh)
    return _EVAL_STEPS[key]


# ---------------------------------------------------------------- validation
def check_config(config: TrainConfig) -> list[Phase]:
    """Validates the config and every phase's perturbation; returns the phases."""
    from sam_jax import optim

    config.validate()
    phases = list(config.phase_list)
    # The real steps per epoch needs the data; any positive value validates options
    # that depend on it (an algorithm's declared engine options).
    steps_for_validation = config.steps_per_epoch or 1
    for phase in phases:
        if phase.name not in optim.PERTURBATIONS:
            raise ValueError(f"unknown optimizer {phase.name!r} in phases {config.phases!r}; "
                             f"choose from {sorted(optim.PERTURBATIONS)}")
        # raises on bad rho / options
        build_optimizer(optimizer_spec(config, phase, steps_for_validation))
        if config.grad_accum > 1 and config.accum_epsilon == "microbatch" \
                and phase.name != "sgd" \
                and optim_registry.algorithm(phase.name).step_picker is not None:
            title = optim_registry.algorithm(phase.name).title or phase.name
            raise ValueError(
                f"grad_accum={config.grad_accum} is not supported for {title} phases "
                f"({phase.name!r}): its two step kinds follow a schedule of optimizer "
                "steps, while with per-microbatch epsilon its transform runs once per "
                "microbatch; use accum_epsilon='batch' (full-batch epsilon)")
    return phases


def _load_data(config: TrainConfig):
    from sam_jax.data import get_dataset

    train = get_dataset(config.dataset, "train", **config.dataset_kwargs)
    test = get_dataset(config.dataset, "test", **config.dataset_kwargs)
    return train, test


def _init_variables(model, config: TrainConfig, input_shape, num_classes: int) -> tuple[Any, Any]:
    key = (_model_key(config, num_classes), tuple(input_shape))
    if key not in _INITS:
        sample = jnp.zeros((2, *input_shape), jnp.float32)
        _INITS[key] = jax.jit(lambda rng: model.init(rng, sample, train=False))
    variables = _INITS[key](jax.random.PRNGKey(config.seed))
    return variables["params"], variables.get("batch_stats", {})


def _grad_evals_per_step(spec: OptimizerSpec) -> float:
    from sam_jax import optim

    if spec.name == "sgd" or spec.rho == 0:
        return 1.0
    return float(optim.gradient_evals_per_step(spec.name, **dict(spec.kwargs)))


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _check_resume_compatible(meta: dict, config: TrainConfig, directory: str,
                             epochs: Optional[list] = None,
                             num_shards: Optional[int] = None) -> None:
    """Refuses to resume a run whose checkpoint was written under another identity.

    Compares every identity field (`config.RUN_IDENTITY_FIELDS`) of ``config`` with
    the config saved in the checkpoint's ``meta``, and the number of devices the run
    used (``num_devices=None`` means all, so the field alone does not pin it: the
    dropout keys and a per-device perturbation depend on it) with ``num_shards``,
    and raises `CheckpointError` naming each difference with both values. A
    code-version change only warns (`CodeVersionWarning`, see `_warn_code_change`).
    """
    saved = meta.get("config", {})
    differ = [(f"{k} (--{k.replace('_', '-')})", old, new)
              for k, old, new in identity_differences(saved, config)]
    if (num_shards is not None and meta.get("num_shards") is not None
            and meta["num_shards"] != num_shards):
        differ.append(("devices used (--num-devices, --cpu-devices)", meta["num_shards"],
                       num_shards))
    if differ:
        detail = "; ".join(f"{k}: run {old!r}, now {new!r}" for k, old, new in differ)
        run_dir = os.path.dirname(os.path.abspath(directory))
        at = f" (its checkpoint epochs: {epochs})" if epochs else ""
        raise CheckpointError(
            f"the checkpoints in {directory} belong to a different run: refusing to resume "
            f"it with a different configuration, which would mix two configurations in "
            f"one history. Differing fields: {detail}. To train this configuration from "
            f"scratch, use a new --workdir; to branch from this run, use a new --workdir "
            f"with --init-from {run_dir} --init-step N{at}. Only logistics may change "
            f"on resume (workdir, progress, eval_every, checkpoint_every, keep_last, "
            f"keep_every, lambda_max_every, host_step_kinds)")
    _warn_code_change(meta, directory)


@functools.lru_cache(maxsize=None)
def _git_commit() -> Optional[str]:
    """The git commit of the sam_jax checkout this process imported (None outside
    a git checkout); read from .git without running git, once per process."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = os.path.join(os.path.dirname(here), ".git")
    try:
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(None, 1)[1]
        path = os.path.join(git, ref)
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip() or None
        with open(os.path.join(git, "packed-refs")) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except OSError:
        return None
    return None


def _code_version() -> dict:
    """What identifies the code: package version and git commit (when a checkout)."""
    return {"sam_jax_version": _version(), "sam_jax_git_commit": _git_commit()}


def _warn_code_change(meta: dict, directory: str) -> None:
    """Warns when the code differs from the one that wrote the checkpoint.

    A warning, not an error: the version string is bumped rarely and the commit
    changes with every edit, most of which (docs, other algorithms, tests) leave
    this run's mathematics alone; refusing would strand every interrupted run
    after any update, while the config identity, which defines the run, is still
    enforced. Whether a code change altered the numbers is for the user to judge.
    """
    now = _code_version()
    changed = [f"{key} {meta[key]!r} then, {now[key]!r} now" for key in now
               if meta.get(key) is not None and now[key] is not None and meta[key] != now[key]]
    if changed:
        warnings.warn(
            f"resuming the run in {directory} with other code than the one that wrote "
            f"its checkpoint at epoch {meta.get('epoch')}: {'; '.join(changed)}. The "
            "configuration matches; the epochs before and after this resume may differ "
            "if the code change altered the computation", CodeVersionWarning, stacklevel=3)


# ----------------------------------------------------------------------- run
def run(config: TrainConfig) -> RunResult:
    """Trains according to ``config`` and returns the final variables and history.

    Resumes automatically from the latest checkpoint in ``config.workdir`` (when
    ``config.resume``), otherwise starts from ``init_from``/``init_step`` or from a
    fresh initialization. A finished run called again returns at once.

    Raises:
      ValueError: invalid config (unknown dataset/model/optimizer, ρ < 0, malformed
        phases, batch size not divisible by the devices, ...).
      CheckpointError (a ValueError): missing, corrupt or mismatched checkpoint.
      TrainingDiverged: NaN/inf loss; the last good checkpoint stays intact.
    """
    from sam_jax.train.workdir import check_usable
    check_usable(config.workdir)  # a file / read-only workdir: one WorkdirError, no write
    phases = check_config(config)
    from sam_jax.models import get_model

    train_ds, test_ds = _load_data(config)
    num_classes = train_ds.num_classes
    model = get_model(config.model, num_classes, **config.model_kwargs)
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_batch_size(config.batch_size, mesh)
    shards = parallel.num_shards(mesh)
    if (config.batch_size // shards) % config.grad_accum:
        raise ValueError(f"the per-device batch {config.batch_size // shards} (batch_size "
                         f"{config.batch_size} over {shards} devices) does not split into "
                         f"grad_accum={config.grad_accum} equal microbatches")

    steps_per_epoch = train_ds.steps_per_epoch(config.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {train_ds.num_examples} "
                         f"training examples of {config.dataset}")
    if config.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    total_epochs = config.total_epochs
    schedule = make_schedule(config.schedule, config.lr, total_epochs * steps_per_epoch,
                             steps_per_epoch, round(config.warmup_epochs * steps_per_epoch))
    eval_bs = min(config.eval_batch_size, -(-test_ds.num_examples // shards) * shards)
    parallel.check_batch_size(eval_bs, mesh, "eval_batch_size")

    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    params, batch_stats = _init_variables(model, config, train_ds.input_shape, num_classes)
    boundaries = config.phase_boundaries()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=config.keep_last,
                        keep_every=config.keep_every, keep_epochs=boundaries)

    # ---- where to start: own checkpoint (resume) > init_from > fresh
    start_epoch, opt_phase, opt_state, grad_evals, wall_offset = 0, None, None, 0.0, 0.0
    latest = ckpt.latest_epoch()
    if latest is not None and not config.resume:
        raise CheckpointError(f"{ckpt.directory} already holds checkpoints (latest epoch "
                              f"{latest}) and resume=False; use a new workdir")
    if latest is not None:
        meta = ckpt.restore_meta(latest)
        _check_resume_compatible(meta, config, ckpt.directory, ckpt.epochs(), shards)
        params, batch_stats = ckpt.restore_variables(latest, params, batch_stats)
        opt_phase = meta["opt_phase"]
        if opt_phase is not None:
            like = build_optimizer(
                optimizer_spec(config, phases[opt_phase], steps_per_epoch)).init(params)
            opt_state = ckpt.restore_opt_state(latest, like)
        start_epoch, grad_evals = latest, meta["grad_evals"]
        wall_offset = meta.get("wall_time", 0.0)
    elif config.init_from is not None:
        source = Checkpointer(checkpoint_dir(config.init_from), read_only=True, keep_last=None)
        try:
            meta = source.restore_meta(config.init_step)
            params, batch_stats = source.restore_variables(config.init_step, params, batch_stats)
            start_epoch, grad_evals = config.init_step, float(meta.get("grad_evals", 0.0))
            # The optimizer state is reused only when this run trains the epoch before
            # init_step with the same optimizer and the saved leaves fit it.
            if config.init_step > 0:
                prev = config.phase_index(config.init_step - 1)
                like = build_optimizer(
                    optimizer_spec(config, phases[prev], steps_per_epoch)).init(params)
                if (meta.get("opt_name") == phases[prev].name
                        and source.opt_state_matches(config.init_step, like)):
                    opt_state, opt_phase = source.restore_opt_state(config.init_step, like), prev
        finally:
            source.close()

    repl = parallel.replicated(mesh)
    state = TrainState(params, batch_stats, opt_state)
    log = MetricsLog(workdir, keep_before_epoch=start_epoch if start_epoch else None,
                     resumed=latest is not None)
    # Only a fresh run, or a resume whose identity matched the checkpoint's (checked
    # above, before anything was written), gets here: config.json always describes
    # the config that produced the run's history (logistics fields may differ).
    config_path = write_config(workdir, config.to_dict(), {
        "num_classes": num_classes, "input_shape": list(train_ds.input_shape),
        "steps_per_epoch": steps_per_epoch, "total_epochs": total_epochs,
        "num_devices": shards, "resumed_from": start_epoch,
        "sam_jax_git_commit": _git_commit()})
    eval_fn = _eval_step(model, config, mesh, num_classes)
    progress = Progress(total_epochs * steps_per_epoch, start_epoch * steps_per_epoch,
                        config.progress)
    t_start = time.time()
    last_saved = latest if latest is not None else None
    try:
        for epoch in range(start_epoch, total_epochs):
            phase_idx = config.phase_index(epoch)
            phase = phases[phase_idx]
            spec = optimizer_spec(config, phase, steps_per_epoch)
            if opt_phase != phase_idx:
                state = _switch(state, config, spec, carry=opt_phase is not None)
                opt_phase = phase_idx
            state = jax.device_put(state, repl)
            picker = _host_step_picker(config, spec)
            if picker is None:
                step_fn = _train_step(model, config, spec, mesh, num_classes)
            else:
                # Two compiled step kinds (expensive / cheap, as the algorithm
                # declares), picked on the host by the transform's own rule on its
                # count, read from the state at each epoch start (so a switch,
                # 'carry', a resume and init_from all count right).
                kind_steps = {flag: _train_step(model, config, spec, mesh, num_classes, flag)
                              for flag in (False, True)}
                count = int(jax.device_get(state.opt_state[PERTURBATION_INDEX].count))
            progress.describe(epoch, phase.name)
            t_epoch = time.time()
            step_metrics, lr = [], 0.0
            batches = train_ds.batches(config.batch_size, seed=config.seed, epoch=epoch,
                                       augment=True)
            for i, batch in zip(range(steps_per_epoch), batches):
                global_step = epoch * steps_per_epoch + i
                lr = schedule(global_step)
                rng = dropout_key(config.seed, global_step, shards)
                if picker is not None:
                    step_fn = kind_steps[picker(count)]
                    count += 1
                state, metrics = step_fn(state, parallel.put_batch(batch, mesh),
                                         np.float32(lr), rng)
                step_metrics.append(metrics)
                progress.update()
            grad_evals += _grad_evals_per_step(spec) * steps_per_epoch
            record = _train_record(jax.device_get(step_metrics))
            if not (math.isfinite(record["train_loss"]) and _all_finite(state.params)):
                where = (f"last good checkpoint: epoch {last_saved} in {ckpt.directory}"
                         if last_saved is not None else "no checkpoint was saved")
                raise TrainingDiverged(
                    f"training diverged in epoch {epoch} (phase {phase.name}, lr {lr:.4g}): "
                    f"non-finite loss or parameters; nothing was saved for this epoch ({where})")
            record = {"epoch": epoch, "step": (epoch + 1) * steps_per_epoch,
                      "phase": phase.name, "phase_index": phase_idx, "optimizer": phase.name,
                      "rho": spec.rho if phase.name != "sgd" else 0.0, "lr": lr,
                      "grad_evals": grad_evals, **record}
            last = epoch + 1 == total_epochs
            if last or (epoch + 1) % config.eval_every == 0:
                record.update(_evaluate(eval_fn, state, test_ds, eval_bs, mesh))
            if config.lambda_max_every and ((epoch + 1) % config.lambda_max_every == 0 or last):
                record.update(_lambda_max(model, state, train_ds, config))
            record["epoch_time"] = time.time() - t_epoch
            record["wall_time"] = wall_offset + time.time() - t_start
            log.append(record)
            progress.describe(epoch, phase.name, record)
            if last or (epoch + 1) in boundaries or (epoch + 1) % config.checkpoint_every == 0:
                meta = {"epoch": epoch + 1, "global_step": (epoch + 1) * steps_per_epoch,
                        "opt_phase": opt_phase, "opt_name": phase.name,
                        "grad_evals": grad_evals, "wall_time": record["wall_time"],
                        "config": config.to_dict(), "num_shards": shards,
                        **_code_version()}
                ckpt.save(epoch + 1, state.params, state.batch_stats, state.opt_state, meta)
                last_saved = epoch + 1
    finally:
        progress.close()
        ckpt.close()

    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return RunResult(variables=variables, history=list(log.records), config=config,
                     workdir=workdir, checkpoint_dir=ckpt.directory, metrics_path=log.path,
                     config_path=config_path, final_epoch=total_epochs, grad_evals=grad_evals,
                     resumed_from=start_epoch)


def dropout_key(seed: int, global_step: int, num_shards: int = 1) -> np.ndarray:
    """The raw PRNG key ``[seed, global_step * num_shards]`` (uint32) of a step.

    Built in numpy rather than by ``jax.random.fold_in`` on the host: a pure function
    of (seed, step), and no threefry op to compile (several seconds on a busy CPU)
    for the many models that have no dropout. The per-device step adds its device
    index to the second word.
    """
    return np.array([seed % 2**32, (global_step * num_shards) % 2**32], dtype=np.uint32)


def _version() -> str:
    import sam_jax

    return sam_jax.__version__


def _switch(state: TrainState, config: TrainConfig, spec: OptimizerSpec, carry: bool) -> TrainState:
    """A fresh optimizer for the new phase; with ``momentum_at_switch='carry'`` the
    momentum buffer of the previous phase is kept (the paper's code resets it)."""
    new_opt_state = build_optimizer(spec).init(state.params)
    if carry and config.momentum_at_switch == "carry":
        parts = list(new_opt_state)
        parts[TRACE_INDEX] = state.opt_state[TRACE_INDEX]
        new_opt_state = tuple(parts)
    return state._replace(opt_state=new_opt_state)


def _train_record(step_metrics: list[dict]) -> dict:
    count = sum(float(m["count"]) for m in step_metrics)
    record = {
        "train_loss": sum(float(m["loss_sum"]) for m in step_metrics) / count,
        "train_acc": sum(float(m["correct"]) for m in step_metrics) / count,
        "grad_norm": float(np.mean([m["grad_norm"] for m in step_metrics])),
        "perturbation_norm": float(np.mean([m["perturbation_norm"] for m in step_metrics])),
    }
    for key in step_metrics[0]:  # the algorithm's declared logged fields
        if key not in _STEP_METRICS:
            record[key] = float(step_metrics[-1][key])  # latest value
    return record


# Metrics every train step returns (`make_train_step`); others are the algorithm's.
_STEP_METRICS = ("loss_sum", "correct", "count", "grad_norm", "perturbation_norm")


def _evaluate(eval_fn, state: TrainState, dataset, batch_size: int, mesh) -> dict:
    totals = _eval_totals(eval_fn, state.params, state.batch_stats, dataset, batch_size,
                          lambda batch: parallel.put_batch(batch, mesh))
    return {"test_loss": totals["loss"], "test_acc": totals["acc"]}


def _eval_totals(eval_fn, params, batch_stats, dataset, batch_size: int, put) -> dict:
    # Dispatch every batch first and fetch once: no host round trip per batch.
    per_batch = [eval_fn(params, batch_stats, put(batch))
                 for batch in dataset.batches(batch_size, shuffle=False, drop_remainder=False,
                                              pad_remainder=True)]
    per_batch = jax.device_get(per_batch)
    totals = {key: sum(float(m[key]) for m in per_batch)
              for key in ("loss_sum", "correct", "count")}
    return {"loss": totals["loss_sum"] / totals["count"],
            "acc": totals["correct"] / totals["count"]}


def make_evaluator(model, batch_size: int = 500, mesh=None):
    """The library's evaluation loop, compiled once: ``evaluate(variables, dataset)``.

    Every example of ``dataset`` (un-augmented, in order; the last batch padded and
    masked), the model in eval mode (BatchNorm running statistics), the plain
    cross-entropy (no label smoothing, no L2): what `run` logs as ``test_loss`` /
    ``test_acc``. Keep the returned function to reuse its compiled step (there is
    no module-level cache).

    Args:
      model: the Flax module.
      batch_size: evaluation batch size (capped at the dataset's size; with
        ``mesh`` it must split over the mesh's devices).
      mesh: a ``data`` mesh (`sam_jax.train.parallel.make_mesh`) to shard batches
        over; None: one device under ``jax.jit``.

    Returns:
      ``evaluate(variables, dataset) -> {"loss": mean cross-entropy, "acc": accuracy}``.
    """
    if mesh is None:
        eval_fn, put = jax.jit(make_eval_step(model)), (lambda batch: batch)
    else:
        parallel.check_batch_size(batch_size, mesh, "batch_size")
        eval_fn = parallel.jit_eval_step(make_eval_step(model), mesh)
        put = lambda batch: parallel.put_batch(batch, mesh)  # noqa: E731

    def evaluate(variables: dict, dataset) -> dict:
        size = batch_size if mesh is not None else min(batch_size, dataset.num_examples)
        return _eval_totals(eval_fn, variables["params"], variables.get("batch_stats", {}),
                            dataset, size, put)

    return evaluate


def _lambda_max(model, state: TrainState, dataset, config: TrainConfig) -> dict:
    """Top-2 Hessian eigenvalues by Lanczos on the first ``lambda_max_examples``
    un-augmented training examples (late-phase SAM protocol, papers.md §2)."""
    from sam_jax import curvature

    n = min(config.lambda_max_examples, dataset.num_examples)
    arrays = dataset.subset(n).arrays()
    size = config.eval_batch_size
    batches = [{"x": arrays["x"][i:i + size], "y": arrays["y"][i:i + size]}
               for i in range(0, n, size)]
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    loss_fn = curvature.flax_loss_fn(model, jax.device_get(variables),
                                     bn_mode=config.lambda_max_bn_mode)
    operator = curvature.HessianOperator(loss_fn, jax.device_get(state.params), batches)
    result = curvature.lanczos_eigs(operator, top_k=2, num_steps=config.lambda_max_iters,
                                    seed=config.seed, compute_residuals=False)
    return {"lambda_max": float(result.eigenvalues[0]), "lambda_2": float(result.eigenvalues[1]),
            "lambda_max_bn_mode": config.lambda_max_bn_mode, "lambda_max_examples": n}


def load_variables(workdir: str, epoch: Optional[int] = None) -> dict:
    """The variables saved by a run at ``epoch`` (None: its latest checkpoint).

    Args:
      workdir: a run directory written by `run`.
      epoch: completed-epoch count of the checkpoint.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (batch_stats absent without BN).
    """
    from sam_jax.models import get_model

    with open(os.path.join(workdir, "config.json")) as f:
        record = json.load(f)
    config = TrainConfig.from_dict(record["config"])
    model = get_model(config.model, record["num_classes"], **config.model_kwargs)
    params, batch_stats = _init_variables(model, config, tuple(record["input_shape"]),
                                          record["num_classes"])
    ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True, keep_last=None)
    try:
        epoch = ckpt.latest_epoch() if epoch is None else epoch
        if epoch is None:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}")
        params, batch_stats = ckpt.restore_variables(epoch, params, batch_stats)
    finally:
        ckpt.close()
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def checkpoint_epochs(workdir: str) -> list[int]:
    """Epochs at which ``workdir`` holds a checkpoint (to branch runs from)."""
    ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True, keep_last=None)
    try:
        return ckpt.epochs()
    finally:
        ckpt.close()
