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

`run` is a sequence of named pieces: `prepare` (data, model, mesh, schedule and one
`PhaseOptimizer` per phase), `start_point` (fresh, resume from the workdir's own
checkpoint, or branch from another run's), `train_epoch`, `measure` (test
evaluation and λ_max) and `save_checkpoint`.

Compiled steps live in a `CompileCache` passed to `run` (default: the process-wide
`CompileCache.default()`), so an experiment that launches many branched runs
compiles each kind of step once; the learning rate (and ρ where the cache traces
it) is an argument of the compiled step, not part of it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import time
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.optim import registry as optim_registry
from sam_jax.train import distributed, parallel
from sam_jax.train.checkpoint import Checkpointer, CheckpointError, checkpoint_dir
from sam_jax.train.config import (LOGISTICS_FIELDS, RUN_IDENTITY_FIELDS, Phase, RunIdentity,
                                  TrainConfig, identity_differences)
from sam_jax.train.config import _DEPRECATED_HOST_ALIAS as _HOST_ALIAS
from sam_jax.train.logging import Progress
from sam_jax.train.phases import CompileCache, PhaseOptimizer, optimizer_spec
from sam_jax.train.schedules import make_schedule
from sam_jax.train.step import TrainState, make_eval_step

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


__all__ = ["CompileCache", "PhaseOptimizer", "RunResult", "TrainingDiverged", "check_config",
           "checkpoint_epochs", "load_variables", "make_evaluator", "optimizer_spec", "run"]


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
        PhaseOptimizer(config, phase, steps_for_validation)  # raises on bad rho / options
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


def _init_variables(model, config: TrainConfig, input_shape, num_classes: int,
                    cache: Optional[CompileCache] = None) -> tuple[Any, Any]:
    cache = CompileCache.default() if cache is None else cache
    init = cache.init_fn(model, config, input_shape, num_classes)
    variables = init(jax.random.PRNGKey(config.seed))
    return variables["params"], variables.get("batch_stats", {})


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
    differ = []
    if RunIdentity.of(saved) != config.run_identity():
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
            f"on resume ({', '.join(f for f in LOGISTICS_FIELDS if f != _HOST_ALIAS)})")
    _warn_code_change(meta, directory)


@functools.lru_cache(maxsize=None)
def _git_commit() -> Optional[str]:
    """The git commit (``git rev-parse HEAD``) of the checkout this sam_jax was
    imported from; None outside a git checkout, without git, or after a 10 s
    timeout. Asked once per process."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(here),
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


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
@dataclasses.dataclass
class RunSetup:
    """What a run needs, derived once from its config (`prepare`).

    Attributes:
      config, cache: the run's config and compile cache.
      phases: the parsed phases; optimizers: one `PhaseOptimizer` per phase.
      model, mesh, shards: the Flax module, the data mesh and its device count.
      train_ds, test_ds, num_classes: the data.
      steps_per_epoch, total_epochs, schedule: the global step axis and its lr.
      eval_batch_size: the test batch size (capped, a multiple of ``shards``).
      workdir: absolute run directory.
    """

    config: TrainConfig
    cache: CompileCache
    phases: list
    optimizers: list
    model: Any
    mesh: Any
    shards: int
    train_ds: Any
    test_ds: Any
    num_classes: int
    steps_per_epoch: int
    total_epochs: int
    schedule: Any
    eval_batch_size: int
    workdir: str

    def train_step(self, opt: PhaseOptimizer, step_kind: Optional[bool] = None):
        return self.cache.train_step(self.model, self.config, opt, self.mesh,
                                     self.num_classes, step_kind)

    def eval_step(self):
        return self.cache.eval_step(self.model, self.config, self.mesh, self.num_classes)


@dataclasses.dataclass
class StartPoint:
    """Where a run starts (`start_point`).

    Attributes:
      kind: ``"fresh"`` (initialization), ``"resume"`` (the workdir's own latest
        checkpoint) or ``"branch"`` (``init_from``/``init_step``).
      epoch: the first global epoch to train.
      state: the train state at that point.
      opt_phase: the phase whose optimizer ``state.opt_state`` belongs to (None:
        no optimizer state yet).
      grad_evals: cumulative gradient evaluations before ``epoch``.
      wall_offset: the wall time already spent (a resume continues the clock).
      checkpoint: the latest own checkpoint epoch (None when fresh or a branch).
    """

    kind: str
    epoch: int
    state: TrainState
    opt_phase: Optional[int]
    grad_evals: float
    wall_offset: float
    checkpoint: Optional[int]


def prepare(config: TrainConfig, cache: Optional[CompileCache] = None) -> RunSetup:
    """Validates ``config`` and builds everything its run needs but the state."""
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
    return RunSetup(
        config=config, cache=CompileCache.default() if cache is None else cache,
        phases=phases,
        optimizers=[PhaseOptimizer(config, phase, steps_per_epoch) for phase in phases],
        model=model, mesh=mesh, shards=shards, train_ds=train_ds, test_ds=test_ds,
        num_classes=num_classes, steps_per_epoch=steps_per_epoch, total_epochs=total_epochs,
        schedule=schedule, eval_batch_size=eval_bs, workdir=os.path.abspath(config.workdir))


def start_point(setup: RunSetup, ckpt: Checkpointer) -> StartPoint:
    """Where the run starts: its own latest checkpoint (resume) > ``init_from``
    (branch) > a fresh initialization.

    Raises:
      CheckpointError: checkpoints exist and ``resume=False``, or the checkpoint
        belongs to a run with another identity (`_check_resume_compatible`).
    """
    config = setup.config
    params, batch_stats = _init_variables(setup.model, config, setup.train_ds.input_shape,
                                          setup.num_classes, setup.cache)
    latest = ckpt.latest_epoch()
    if latest is not None and not config.resume:
        raise CheckpointError(f"{ckpt.directory} already holds checkpoints (latest epoch "
                              f"{latest}) and resume=False; use a new workdir")
    if latest is not None:
        return _resume(setup, ckpt, latest, params, batch_stats)
    if config.init_from is not None:
        return _branch(setup, params, batch_stats)
    return StartPoint("fresh", 0, TrainState(params, batch_stats, None), None, 0.0, 0.0, None)


def _resume(setup: RunSetup, ckpt: Checkpointer, latest: int, params, batch_stats) -> StartPoint:
    meta = ckpt.restore_meta(latest)
    _check_resume_compatible(meta, setup.config, ckpt.directory, ckpt.epochs(), setup.shards)
    params, batch_stats = ckpt.restore_variables(latest, params, batch_stats)
    opt_phase, opt_state = meta["opt_phase"], None
    if opt_phase is not None:
        like = setup.optimizers[opt_phase].init(params)
        opt_state = ckpt.restore_opt_state(latest, like)
    return StartPoint("resume", latest, TrainState(params, batch_stats, opt_state), opt_phase,
                      meta["grad_evals"], meta.get("wall_time", 0.0), latest)


def _branch(setup: RunSetup, params, batch_stats) -> StartPoint:
    config = setup.config
    source = Checkpointer(checkpoint_dir(config.init_from), read_only=True, keep_last=None)
    opt_state, opt_phase = None, None
    try:
        meta = source.restore_meta(config.init_step)
        params, batch_stats = source.restore_variables(config.init_step, params, batch_stats)
        # The optimizer state is reused only when this run trains the epoch before
        # init_step with the same optimizer and the saved leaves fit it.
        if config.init_step > 0:
            prev = config.phase_index(config.init_step - 1)
            like = setup.optimizers[prev].init(params)
            if (meta.get("opt_name") == setup.phases[prev].name
                    and source.opt_state_matches(config.init_step, like)):
                opt_state, opt_phase = source.restore_opt_state(config.init_step, like), prev
    finally:
        source.close()
    return StartPoint("branch", config.init_step, TrainState(params, batch_stats, opt_state),
                      opt_phase, float(meta.get("grad_evals", 0.0)), 0.0, None)


def train_epoch(setup: RunSetup, state: TrainState, epoch: int,
                progress: Optional[Progress] = None) -> tuple[TrainState, dict]:
    """Trains global epoch ``epoch`` (its phase's optimizer state already in ``state``).

    The state passed in is donated to the compiled steps: use only the returned one.

    Returns:
      ``(state, record)``, the record holding the epoch's training metrics
      (`_train_record`) and its last learning rate.
    """
    config, mesh = setup.config, setup.mesh
    opt = setup.optimizers[config.phase_index(epoch)]
    # One compiled step, or two kinds (expensive / cheap, as the algorithm declares)
    # picked on the host by the transform's own rule on its count, read from the
    # state at the epoch start (so a switch, 'carry', a resume and init_from all
    # count right).
    steps = {kind: setup.train_step(opt, kind) for kind in opt.step_kinds}
    count = opt.count(state.opt_state) if opt.step_picker is not None else 0
    state = parallel.put_replicated(state, mesh)
    step_metrics, lr = [], 0.0
    # In a multi-process job each process reads and augments only its devices' rows.
    rows = parallel.process_rows(mesh, config.batch_size)
    batches = setup.train_ds.batches(config.batch_size, seed=config.seed, epoch=epoch,
                                     augment=True, rows=rows)
    for i, batch in zip(range(setup.steps_per_epoch), batches):
        global_step = epoch * setup.steps_per_epoch + i
        lr = setup.schedule(global_step)
        step_fn = steps[opt.pick(count)]
        count += 1
        batch = parallel.put_batch(batch, mesh, config.batch_size if rows else None)
        state, metrics = step_fn(state, batch, opt.hyperparams(lr),
                                 dropout_key(config.seed, global_step, setup.shards))
        step_metrics.append(metrics)
        if progress is not None:
            progress.update()
    record = _train_record(jax.device_get(step_metrics))
    record["lr"] = lr
    return state, record


def measure(setup: RunSetup, state: TrainState, epoch: int) -> dict:
    """The evaluations due after ``epoch``: test loss/accuracy every ``eval_every``
    epochs and at the end; λ_max every ``lambda_max_every`` epochs and at the end."""
    config = setup.config
    last = epoch + 1 == setup.total_epochs
    out = {}
    if last or (epoch + 1) % config.eval_every == 0:
        out.update(_evaluate(setup.eval_step(), state, setup.test_ds, setup.eval_batch_size,
                             setup.mesh))
    if config.lambda_max_every and ((epoch + 1) % config.lambda_max_every == 0 or last):
        out.update(_lambda_max(setup.model, state, setup.train_ds, config, setup.mesh))
    return out


def checkpoint_due(setup: RunSetup, epoch: int) -> bool:
    """Whether the state after ``epoch`` is saved: the last epoch, phase boundaries
    and ``keep_epochs`` (other runs branch from them) and every ``checkpoint_every``
    epochs."""
    done = epoch + 1
    return (done == setup.total_epochs or done in setup.config.phase_boundaries()
            or done in setup.config.keep_epochs
            or done % setup.config.checkpoint_every == 0)


def save_checkpoint(setup: RunSetup, ckpt: Checkpointer, state: TrainState, epoch: int,
                    opt_phase: int, grad_evals: float, wall_time: float) -> None:
    """Saves the state after ``epoch`` with what a resume or a branch needs."""
    meta = {"epoch": epoch + 1, "global_step": (epoch + 1) * setup.steps_per_epoch,
            "opt_phase": opt_phase, "opt_name": setup.phases[opt_phase].name,
            "grad_evals": grad_evals, "wall_time": wall_time,
            "config": setup.config.to_dict(), "num_shards": setup.shards, **_code_version()}
    ckpt.save(epoch + 1, state.params, state.batch_stats, state.opt_state, meta)


def run(config: TrainConfig, cache: Optional[CompileCache] = None) -> RunResult:
    """Trains according to ``config`` and returns the final variables and history.

    Resumes automatically from the latest checkpoint in ``config.workdir`` (when
    ``config.resume``), otherwise starts from ``init_from``/``init_step`` or from a
    fresh initialization. A finished run called again returns at once (and says
    so on the console when ``config.progress``).

    Args:
      config: the run.
      cache: the compiled steps to reuse (`CompileCache`); None: the process-wide
        `CompileCache.default()`, so repeated runs in one process (an experiment's
        seeds, branches and sweeps) compile each kind of step once.

    Raises:
      ValueError: invalid config (unknown dataset/model/optimizer, ρ < 0, malformed
        phases, batch size not divisible by the devices, ...).
      CheckpointError (a ValueError): missing, corrupt or mismatched checkpoint.
      TrainingDiverged: NaN/inf loss; the last good checkpoint stays intact.
    """
    from sam_jax.train.workdir import check_usable
    check_usable(config.workdir)  # a file / read-only workdir: one WorkdirError, no write
    setup = prepare(config, cache)
    workdir = setup.workdir
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=config.keep_last,
                        keep_every=config.keep_every,
                        keep_epochs=tuple(sorted(set(config.phase_boundaries())
                                                 | set(config.keep_epochs))))
    try:
        start = start_point(setup, ckpt)
    except BaseException:
        ckpt.close()
        raise
    state, opt_phase, grad_evals = start.state, start.opt_phase, start.grad_evals
    log = distributed.metrics_log(workdir,
                                  keep_before_epoch=start.epoch if start.epoch else None,
                                  resumed=start.kind == "resume")
    # Only a fresh run, or a resume whose identity matched the checkpoint's (checked
    # in start_point, before anything was written), gets here: config.json always
    # describes the config that produced the run's history (logistics may differ).
    config_path = distributed.write_config(workdir, config.to_dict(), {
        "num_classes": setup.num_classes, "input_shape": list(setup.train_ds.input_shape),
        "steps_per_epoch": setup.steps_per_epoch, "total_epochs": setup.total_epochs,
        "num_devices": setup.shards, "resumed_from": start.epoch,
        "sam_jax_git_commit": _git_commit()})
    progress = Progress(setup.total_epochs * setup.steps_per_epoch,
                        start.epoch * setup.steps_per_epoch,
                        config.progress and distributed.is_primary())
    if start.epoch == setup.total_epochs:
        progress.already_complete(setup.total_epochs, workdir, log.path)
    t_start = time.time()
    last_saved = start.checkpoint
    try:
        for epoch in range(start.epoch, setup.total_epochs):
            phase_idx = config.phase_index(epoch)
            opt = setup.optimizers[phase_idx]
            if opt_phase != phase_idx:
                state = state._replace(opt_state=opt.switch_from(state.opt_state, state.params))
                opt_phase = phase_idx
            progress.describe(epoch, opt.name)
            t_epoch = time.time()
            state, train = train_epoch(setup, state, epoch, progress)
            grad_evals += opt.grad_evals_per_step * setup.steps_per_epoch
            if not (math.isfinite(train["train_loss"]) and _all_finite(state.params)):
                where = (f"last good checkpoint: epoch {last_saved} in {ckpt.directory}"
                         if last_saved is not None else "no checkpoint was saved")
                raise TrainingDiverged(
                    f"training diverged in epoch {epoch} (phase {opt.name}, lr "
                    f"{train['lr']:.4g}): non-finite loss or parameters; nothing was saved "
                    f"for this epoch ({where})")
            record = {"epoch": epoch, "step": (epoch + 1) * setup.steps_per_epoch,
                      "phase": opt.name, "phase_index": phase_idx, "optimizer": opt.name,
                      "rho": opt.rho, "lr": train.pop("lr"), "grad_evals": grad_evals,
                      **train}
            record.update(measure(setup, state, epoch))
            record["epoch_time"] = time.time() - t_epoch
            record["wall_time"] = start.wall_offset + time.time() - t_start
            log.append(record)
            progress.epoch_done(record)
            if checkpoint_due(setup, epoch):
                save_checkpoint(setup, ckpt, state, epoch, opt_phase, grad_evals,
                                record["wall_time"])
                last_saved = epoch + 1
    finally:
        progress.close()
        ckpt.close()

    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return RunResult(variables=variables, history=list(log.records), config=config,
                     workdir=workdir, checkpoint_dir=ckpt.directory, metrics_path=log.path,
                     config_path=config_path, final_epoch=setup.total_epochs,
                     grad_evals=grad_evals, resumed_from=start.epoch)


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


def _train_record(step_metrics: list[dict]) -> dict:
    """An epoch's training record from its steps' metrics.

    ``train_loss``/``train_acc``: over the epoch's examples; ``grad_norm``,
    ``perturbation_norm`` and ``update_norm`` (‖θ_after − θ_before‖ of a step): the
    mean over the epoch's steps; ``param_norm``: ‖θ‖ after the epoch's last step
    (the norm of the parameters a checkpoint at this epoch saves); the algorithm's
    declared fields: their latest value.
    """
    count = sum(float(m["count"]) for m in step_metrics)
    record = {
        "train_loss": sum(float(m["loss_sum"]) for m in step_metrics) / count,
        "train_acc": sum(float(m["correct"]) for m in step_metrics) / count,
        "grad_norm": float(np.mean([m["grad_norm"] for m in step_metrics])),
        "perturbation_norm": float(np.mean([m["perturbation_norm"] for m in step_metrics])),
        "update_norm": float(np.mean([m["update_norm"] for m in step_metrics])),
        "param_norm": float(step_metrics[-1]["param_norm"]),
    }
    for key in step_metrics[0]:  # the algorithm's declared logged fields
        if key not in _STEP_METRICS:
            record[key] = float(step_metrics[-1][key])  # latest value
    return record


# Metrics every train step returns (`make_train_step`); others are the algorithm's.
_STEP_METRICS = ("loss_sum", "correct", "count", "grad_norm", "perturbation_norm",
                 "update_norm", "param_norm")


def _evaluate(eval_fn, state: TrainState, dataset, batch_size: int, mesh) -> dict:
    rows = parallel.process_rows(mesh, batch_size)
    totals = _eval_totals(eval_fn, state.params, state.batch_stats, dataset, batch_size,
                          lambda batch: parallel.put_batch(batch, mesh,
                                                           batch_size if rows else None),
                          rows=rows)
    return {"test_loss": totals["loss"], "test_acc": totals["acc"]}


def _eval_totals(eval_fn, params, batch_stats, dataset, batch_size: int, put,
                 rows: Optional[slice] = None) -> dict:
    # Dispatch every batch first and fetch once: no host round trip per batch.
    per_batch = [eval_fn(params, batch_stats, put(batch))
                 for batch in dataset.batches(batch_size, shuffle=False, drop_remainder=False,
                                              pad_remainder=True, rows=rows)]
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
        eval_fn, put, rows = jax.jit(make_eval_step(model)), (lambda batch: batch), None
    else:
        parallel.check_batch_size(batch_size, mesh, "batch_size")
        eval_fn = parallel.jit_eval_step(make_eval_step(model), mesh)
        rows = parallel.process_rows(mesh, batch_size)
        put = lambda batch: parallel.put_batch(  # noqa: E731
            batch, mesh, batch_size if rows else None)

    def evaluate(variables: dict, dataset) -> dict:
        size = batch_size if mesh is not None else min(batch_size, dataset.num_examples)
        return _eval_totals(eval_fn, variables["params"], variables.get("batch_stats", {}),
                            dataset, size, put, rows=rows)

    return evaluate


def _lambda_max(model, state: TrainState, dataset, config: TrainConfig, mesh) -> dict:
    """Top-2 Hessian eigenvalues by Lanczos on the first ``lambda_max_examples``
    un-augmented training examples (late-phase SAM protocol, papers.md §2), the
    Hessian-vector products taken over chunks of ``lambda_max_chunk`` examples
    (128, with BatchNorm statistics per chunk in ``batch`` mode: [code], the
    late-phase SAM authors' code, zzp1012/SAM-in-Late-Phase).

    Each chunk is split over the run's data mesh (``HessianOperator(mesh=...)``):
    the product is the same function of the whole chunk (BatchNorm statistics
    over the whole chunk), computed by every device of the run, in every process
    of a multi-process run (each feeding only its devices' rows). The Lanczos
    recurrence itself is small and runs in every process on its own copy of the
    replicated products, so every process ends with the same eigenvalues."""
    from sam_jax import curvature

    n = min(config.lambda_max_examples, dataset.num_examples)
    arrays = dataset.subset(n).arrays()
    size = config.lambda_max_chunk
    batches = [{"x": arrays["x"][i:i + size], "y": arrays["y"][i:i + size]}
               for i in range(0, n, size)]
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    loss_fn = curvature.flax_loss_fn(model, jax.device_get(variables),
                                     bn_mode=config.lambda_max_bn_mode)
    operator = curvature.HessianOperator(loss_fn, jax.device_get(state.params), batches,
                                         mesh=mesh)
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
