"""Run configuration: the `TrainConfig` dataclass and the phase syntax.

A run is a sequence of optimizer phases over one global epoch axis, e.g.
``"sgd:150,sam:10"`` trains with SGD for epochs 0-149 and SAM for 150-159 (the
late-phase SAM paper's switching runs, papers.md §2). The learning-rate schedule
and the phase boundaries are functions of the *global* epoch, also when a run
starts from another run's checkpoint (``init_from``/``init_step``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from typing import Any

PHASE_SYNTAX = (
    "phases are 'name:epochs[:rho][:key=value...]' separated by commas, "
    "e.g. 'sgd:150,sam:10' or 'sgd:20,sam:5:0.1' or 'looksam:10:0.05:k=5'"
)
SCHEDULES = ("cosine", "wrn_step", "constant")
WEIGHT_DECAY_MODES = ("decoupled", "loss")
MOMENTUM_AT_SWITCH = ("reset", "carry")
BN_MODES = ("batch", "running")
# Gradient accumulation: where the perturbation's ascent gradient comes from.
ACCUM_EPSILON = ("microbatch", "batch")
# Deprecated field name, kept so that older code and config.json files load.
_DEPRECATED_HOST_ALIAS = "eigen_refresh_on_host"


@dataclasses.dataclass(frozen=True)
class Phase:
    """One optimizer phase.

    Attributes:
      name: perturbation name understood by `sam_jax.optim.make_perturbation`
        (``sgd`` is the identity: plain SGD).
      epochs: number of epochs in the phase (> 0).
      rho: perturbation radius for this phase; ``None`` uses `TrainConfig.rho`.
      kwargs: extra keyword arguments of the perturbation (its phase options:
        ``sam_jax.optim.registry.phase_options(name)``; the CLI's ``--phases``
        help lists them for every registered algorithm).
    """

    name: str
    epochs: int
    rho: float | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()

    def to_str(self) -> str:
        parts = [self.name, str(self.epochs)]
        if self.rho is not None:
            parts.append(repr(float(self.rho)))
        parts += [f"{k}={v}" for k, v in self.kwargs]
        return ":".join(parts)


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_phases(spec: str) -> tuple[Phase, ...]:
    """Parses ``"sgd:150,sam:10"`` into phases.

    Args:
      spec: comma-separated ``name:epochs[:rho][:key=value...]`` items.

    Returns:
      A tuple of `Phase`.

    Raises:
      ValueError: naming the malformed item (empty, non-integer or non-positive
        epochs, negative rho, unknown perturbation name).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"malformed phases {spec!r}: empty; {PHASE_SYNTAX}")
    phases = []
    for item in spec.split(","):
        fields = [f.strip() for f in item.strip().split(":")]
        if len(fields) < 2 or not fields[0]:
            raise ValueError(f"malformed phase {item!r} in {spec!r}: {PHASE_SYNTAX}")
        name, epochs_text, rest = fields[0].lower(), fields[1], fields[2:]
        try:
            epochs = int(epochs_text)
        except ValueError:
            raise ValueError(
                f"malformed phase {item!r}: epochs {epochs_text!r} is not an integer; "
                f"{PHASE_SYNTAX}") from None
        if epochs <= 0:
            raise ValueError(f"malformed phase {item!r}: epochs must be > 0, got {epochs}")
        rho, kwargs = None, []
        for field in rest:
            if "=" in field:
                key, value = field.split("=", 1)
                if key.strip() == "rho":
                    rho = float(value)
                else:
                    kwargs.append((key.strip(), _parse_value(value.strip())))
            elif rho is None:
                try:
                    rho = float(field)
                except ValueError:
                    raise ValueError(
                        f"malformed phase {item!r}: {field!r} is neither a rho value "
                        f"nor key=value; {PHASE_SYNTAX}") from None
            else:
                raise ValueError(f"malformed phase {item!r}: two rho values; {PHASE_SYNTAX}")
        if rho is not None and (rho < 0 or not math.isfinite(rho)):
            raise ValueError(f"phase {item!r}: rho must be a finite number >= 0, got {rho}")
        phases.append(Phase(name, epochs, rho, tuple(kwargs)))
    return tuple(phases)


def phases_to_str(phases: tuple[Phase, ...]) -> str:
    return ",".join(p.to_str() for p in phases)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (the CLI maps flags 1:1 onto it).

    Defaults follow the late-phase SAM paper's code (papers.md §2) where it has one:
    batch 128, momentum 0.9, momentum reset at a switch, phase boundaries and the
    learning-rate schedule on the global epoch. Weight decay 5e-4 decoupled into
    SGD is the PyTorch repos' convention (davda54/sam and others); the official JAX
    SAM puts L2 (1e-3) inside the loss: ``weight_decay_mode='loss'``.

    Attributes:
      workdir: output directory (config.json, metrics.jsonl, checkpoints/).
      dataset, dataset_kwargs: `sam_jax.data.get_dataset(dataset, **dataset_kwargs)`.
      model, model_kwargs: `sam_jax.models.get_model(model, num_classes, **model_kwargs)`.
      phases: ``"sgd:150,sam:10"`` (see `parse_phases`); epochs are global.
      rho: default perturbation radius for phases that give none (SAM paper: 0.05).
      perturbation_kwargs: extra kwargs for every non-SGD perturbation (a phase's
        own ``key=value`` items override them).
      batch_size: global batch size (split over devices). Paper code: 128.
      grad_accum: gradient accumulation, K microbatches per optimizer step: the
        batch of ``batch_size`` examples (per device: ``batch_size / devices``)
        is split into K equal microbatches; each gets its own perturbation
        (per-microbatch ε: m-sharpness with m = the microbatch size) and the K
        perturbed gradients are averaged before clipping, weight decay and
        momentum. BatchNorm normalizes each microbatch by its own statistics; the
        running statistics get one EMA update per step, from the mean of the
        microbatches' statistics. The perturbation's state advances once per
        microbatch, so algorithms with two step kinds (a declared step picker,
        whose schedule counts optimizer steps) are refused with K > 1 unless
        ``accum_epsilon="batch"``. Changes the run's mathematics (m), not only
        its memory. 1: off.
      accum_epsilon: ``"microbatch"`` (above) or ``"batch"``: full-batch ε, exact:
        the ascent gradient is the mean of the K microbatches' clean gradients and
        the perturbed gradient the mean of their gradients at ``w + ε``; the
        transform runs once per step (any algorithm; without BatchNorm the step
        of ``grad_accum=1`` to float rounding). Same gradient count.
      eval_batch_size: batch size for test evaluation.
      steps_per_epoch: cap on steps per epoch (None: one pass over the train set);
        for quick tests.
      lr: peak learning rate. schedule: ``cosine`` | ``wrn_step`` (×1 before 0.3T,
        ×0.2 before 0.6T, then ×0.04; late-phase SAM code) | ``constant``; both
        run on the global step over the whole phase list.
      warmup_epochs: linear warm-up (0 in the papers' code).
      momentum, nesterov: SGD momentum (0.9, no Nesterov in the papers' code).
      weight_decay, weight_decay_mode: ``decoupled`` (optax.add_decayed_weights in
        the base optimizer, PyTorch convention) or ``loss`` (0.5·wd·‖w‖² inside the
        loss, so it also enters the perturbation gradient, official JAX SAM).
      label_smoothing: 0.1 in the late-phase SAM code; 0 by default here.
      clip_norm: global-norm clipping of the final (perturbed) gradient; official
        JAX SAM uses 5.0; None disables.
      momentum_at_switch: ``reset`` (fresh optimizer at each phase switch, the
        paper's code) or ``carry`` (the momentum buffer is kept).
      num_devices: devices on the ``data`` mesh axis (None: all).
      per_device_perturbation: per-device ε (m-sharpness) via shard_map; False
        gives the synced ε of the global batch.
      seed: seeds init, data order (a pure function of (seed, epoch)) and dropout.
      init_from, init_step: start from another run's checkpoint at epoch
        ``init_step`` (its workdir or its checkpoints/ dir); epochs continue at
        ``init_step``.
      resume: resume automatically from the latest checkpoint in ``workdir``.
      keep_last: keep the last N checkpoints (None: all).
      keep_every: also keep every N-th epoch (None: none). Phase boundaries are
        always kept so other runs can branch from them.
      keep_epochs: also save and keep the checkpoints after exactly these epochs
        (e.g. the switch points other runs branch from), whatever ``keep_last``,
        ``keep_every`` and ``checkpoint_every`` say.
      checkpoint_every: save every N epochs (boundaries and the last epoch always).
      lambda_max_every: log λ_max by Lanczos every k epochs (0: never).
      lambda_max_chunk: examples per Hessian-vector-product chunk of the λ_max
        measurement (in ``batch`` BN mode each chunk is normalized by its own
        statistics): 128 as the late-phase SAM authors' code ([code],
        zzp1012/SAM-in-Late-Phase). Part of the λ_max protocol, hence of the run's identity.
      lambda_max_examples, lambda_max_bn_mode, lambda_max_iters: the λ_max
        protocol (late-phase SAM: ≤ 5000 un-augmented train examples, BN in train
        mode i.e. ``batch``, no label smoothing).
      eval_every: evaluate on the test set every N epochs (and the last one).
      progress: show a tqdm progress bar.
      host_step_kinds: for a phase whose algorithm has two kinds of steps (an
        expensive and a cheap one; it declares a ``step_picker``), compile both
        kinds and pick one per step on the host from the optimizer's count by the
        transform's own rule, instead of the transform's in-graph ``lax.cond``,
        which XLA:CPU runs 40-150x slower for convolutions (jax-ml/jax#12868).
        Same results (to float rounding); False keeps the in-graph ``cond``.
        Logistics: it does not change the run's mathematics.
      eigen_refresh_on_host: deprecated alias of ``host_step_kinds`` (None: not
        given); a value given here is copied into ``host_step_kinds`` with a
        ``DeprecationWarning``.

    Run identity: a resume refuses a change of any field but the logistics ones
    (`LOGISTICS_FIELDS`: workdir, resume, progress, eval_every, checkpoint_every,
    keep_last, keep_every, keep_epochs, lambda_max_every, eval_batch_size,
    host_step_kinds and its alias); the
    others are `RUN_IDENTITY_FIELDS` (`identity_differences`).

    Engine options: an algorithm that declares ``engine_options`` (e.g. the run's
    ``steps_per_epoch``) gets them from the engine unless the phase sets them; see
    the algorithm's module and ``docs/train.md`` for what it does with them.
    """

    workdir: str = "runs/default"
    dataset: str = "mnist1d"
    dataset_kwargs: dict = dataclasses.field(default_factory=dict)
    model: str = "cnn1d"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    phases: str = "sgd:20,sam:5"
    rho: float = 0.05
    perturbation_kwargs: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 128
    grad_accum: int = 1
    accum_epsilon: str = "microbatch"
    eval_batch_size: int = 500
    steps_per_epoch: int | None = None
    lr: float = 0.1
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    weight_decay_mode: str = "decoupled"
    label_smoothing: float = 0.0
    clip_norm: float | None = None
    momentum_at_switch: str = "reset"
    num_devices: int | None = None
    per_device_perturbation: bool = False
    seed: int = 0
    init_from: str | None = None
    init_step: int | None = None
    resume: bool = True
    keep_last: int | None = 2
    keep_every: int | None = None
    keep_epochs: tuple[int, ...] = ()
    checkpoint_every: int = 1
    lambda_max_every: int = 0
    lambda_max_examples: int = 1000
    lambda_max_bn_mode: str = "batch"
    lambda_max_iters: int = 20
    lambda_max_chunk: int = 128
    eval_every: int = 1
    progress: bool = True
    host_step_kinds: bool = True
    eigen_refresh_on_host: bool | None = None  # deprecated alias of host_step_kinds

    def __post_init__(self):
        try:  # a JSON list (config.json) or any iterable of epochs: a sorted tuple
            epochs = tuple(sorted({int(e) for e in self.keep_epochs}))
        except (TypeError, ValueError):
            raise ValueError(f"keep_epochs must be epoch numbers, got {self.keep_epochs!r}") from None
        object.__setattr__(self, "keep_epochs", epochs)
        alias = self.eigen_refresh_on_host
        if alias is not None:
            warnings.warn("TrainConfig.eigen_refresh_on_host is deprecated; use "
                          "host_step_kinds (same meaning, for every algorithm with two "
                          "step kinds)", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "host_step_kinds", bool(alias))
            object.__setattr__(self, "eigen_refresh_on_host", None)

    # ----------------------------------------------------------------- derived
    @property
    def phase_list(self) -> tuple[Phase, ...]:
        return parse_phases(self.phases)

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phase_list)

    def phase_index(self, epoch: int) -> int:
        """Index of the phase that trains global epoch ``epoch`` (0-indexed)."""
        end = 0
        for i, phase in enumerate(self.phase_list):
            end += phase.epochs
            if epoch < end:
                return i
        raise ValueError(f"epoch {epoch} is past the last phase ({self.total_epochs} epochs)")

    def phase_boundaries(self) -> tuple[int, ...]:
        """Epoch counts at which a phase starts or ends (checkpoint steps to keep)."""
        bounds, end = [0], 0
        for phase in self.phase_list:
            end += phase.epochs
            bounds.append(end)
        return tuple(bounds)

    def phase_rho(self, phase: Phase) -> float:
        return self.rho if phase.rho is None else phase.rho

    def phase_kwargs(self, phase: Phase) -> dict:
        return {**self.perturbation_kwargs, **dict(phase.kwargs)}

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if values.get(_DEPRECATED_HOST_ALIAS) is None:  # the alias is folded in
            values.pop(_DEPRECATED_HOST_ALIAS, None)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def run_identity(self) -> "RunIdentity":
        """This config's `RunIdentity`: equal for two configs iff they define the
        same run (they may differ in logistics, `LOGISTICS_FIELDS`)."""
        return RunIdentity.of(self.to_dict())

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**values)

    # -------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        """Checks values that do not need the data or model; raises ValueError."""
        phases = self.phase_list  # raises on malformed phases
        if self.rho < 0 or not math.isfinite(self.rho):
            raise ValueError(f"rho must be a finite number >= 0, got {self.rho}")
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("weight_decay_mode", self.weight_decay_mode, WEIGHT_DECAY_MODES)
        _check_choice("momentum_at_switch", self.momentum_at_switch, MOMENTUM_AT_SWITCH)
        _check_choice("lambda_max_bn_mode", self.lambda_max_bn_mode, BN_MODES)
        _check_choice("accum_epsilon", self.accum_epsilon, ACCUM_EPSILON)
        positive = dict(batch_size=self.batch_size, grad_accum=self.grad_accum,
                        eval_batch_size=self.eval_batch_size,
                        checkpoint_every=self.checkpoint_every, eval_every=self.eval_every,
                        lambda_max_examples=self.lambda_max_examples,
                        lambda_max_iters=self.lambda_max_iters,
                        lambda_max_chunk=self.lambda_max_chunk)
        for name, value in positive.items():
            if int(value) != value or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if any(e <= 0 for e in self.keep_epochs):
            raise ValueError(f"keep_epochs must be positive epoch counts, got {self.keep_epochs}")
        for name in ("steps_per_epoch", "num_devices", "keep_last", "keep_every"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum "
                             f"{self.grad_accum} (equal microbatches)")
        if self.lambda_max_every < 0:
            raise ValueError(f"lambda_max_every must be >= 0, got {self.lambda_max_every}")
        for name in ("lr", "weight_decay", "warmup_epochs"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got "
                                 f"{getattr(self, name)}")
        if self.clip_norm is not None and not math.isfinite(self.clip_norm):
            raise ValueError(f"clip_norm must be a finite number > 0 or None, got "
                             f"{self.clip_norm}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed \
                or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")
        if (self.init_from is None) != (self.init_step is None):
            raise ValueError("init_from and init_step must be given together "
                             f"(got init_from={self.init_from!r}, init_step={self.init_step!r})")
        if self.init_step is not None and not 0 <= self.init_step < self.total_epochs:
            raise ValueError(f"init_step must be in [0, {self.total_epochs}) for phases "
                             f"{self.phases!r}, got {self.init_step}")
        del phases
        return self


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


# ------------------------------------------------------------------ run identity
# Fields a resume may change: they decide where outputs go, how often things are
# saved, logged or shown, and how a step is dispatched, never what the run computes.
# Every other field is part of the run's identity (`RUN_IDENTITY_FIELDS`), so a new
# field is identity unless it is added here with a reason.
LOGISTICS_FIELDS: dict[str, str] = {
    "workdir": "where the run lives (a copied or moved workdir resumes)",
    "resume": "whether to resume at all",
    "progress": "the progress bar",
    "eval_every": "test-evaluation cadence; evaluation does not feed back into training",
    "checkpoint_every": "checkpoint cadence; a resume is bit for bit from any checkpoint",
    "keep_last": "checkpoint retention",
    "keep_every": "checkpoint retention",
    "keep_epochs": "checkpoint retention",
    "lambda_max_every": "lambda_max logging cadence (its protocol fields are identity)",
    "eval_batch_size": "test-evaluation batch size: every test example is evaluated "
                       "either way (the last batch masked), so it changes the logged test "
                       "loss only at float-summation rounding, never the training",
    "host_step_kinds": "dispatch of an algorithm's two step kinds (host pick or in-graph "
                       "cond); same step, equal to float rounding (tests: params bit for "
                       "bit, eigenvalue to one ulp), so it may change at rounding level",
    _DEPRECATED_HOST_ALIAS: "deprecated alias of host_step_kinds",
}


def _identity_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig)
                 if f.name not in LOGISTICS_FIELDS)


# Everything that changes the mathematics of the run or the meaning of what it logs:
# data, model, phases (hence the number of epochs: the schedule spans them all, so
# a finished run cannot be extended in place), optimizer, loss, devices, seed,
# init_from/init_step, and the lambda_max protocol (examples, chunk size, BN mode
# and iterations: in BN 'batch' mode the chunk size changes what lambda_max means).
RUN_IDENTITY_FIELDS: tuple[str, ...] = _identity_fields()


def _canonical(name: str, value: Any) -> Any:
    """A value in the form it has after a JSON round trip (checkpoint meta), with
    ``init_from`` as a normalized absolute path."""
    value = json.loads(json.dumps(value, sort_keys=True))
    if name == "init_from" and isinstance(value, str):
        import os

        value = os.path.normpath(os.path.abspath(value))
    return value


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """What defines a run's mathematics: every identity field's canonical value
    (`RUN_IDENTITY_FIELDS`, in the form a JSON round trip gives, ``init_from`` as an
    absolute path). Two configs describe the same run iff their identities are
    equal (``config.run_identity() == other.run_identity()``); hashable.

    Attributes:
      items: sorted ``(field, canonical JSON text)`` pairs.
    """

    items: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, values: dict) -> "RunIdentity":
        """The identity of a config dict (e.g. a checkpoint's ``meta["config"]``); an
        identity field it lacks (an older version did not know it) counts as that
        field's default, the behaviour it had then."""
        defaults = _field_defaults()
        return cls(tuple(sorted(
            (name, json.dumps(_canonical(name, values[name] if name in values
                                         else defaults[name]), sort_keys=True))
            for name in RUN_IDENTITY_FIELDS)))

    def as_dict(self) -> dict:
        return {name: json.loads(text) for name, text in self.items}


def _field_defaults() -> dict:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING
                     else f.default) for f in dataclasses.fields(TrainConfig)}


def identity_differences(saved: dict, config: "TrainConfig") -> list[tuple[str, Any, Any]]:
    """``[(field, saved value, new value)]`` for each identity field that differs.

    ``saved`` is the config dict that produced a run's history (its checkpoint's
    ``meta["config"]``). A field absent from ``saved`` (written by an older version
    that did not know it) counts as that field's default, the behaviour it had then.
    """
    ours = config.to_dict()
    defaults = _field_defaults()
    differ = []
    for name in RUN_IDENTITY_FIELDS:
        old = saved[name] if name in saved else defaults[name]
        new = ours[name]
        if _canonical(name, old) != _canonical(name, new):
            differ.append((name, old, new))
    return differ
