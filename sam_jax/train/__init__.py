"""The training engine: phases of SAM-family optimizers over one schedule.

    from sam_jax.train import TrainConfig, run
    result = run(TrainConfig(workdir="runs/a", dataset="mnist1d", model="cnn1d",
                             phases="sgd:20,sam:5"))
    result.history[-1]["test_acc"]

Repeated ``run`` calls in one process share compiled steps through
`CompileCache.default()`; pass ``run(config, cache=CompileCache())`` to isolate them.

Command line: ``python -m sam_jax.train --help``. See docs/train.md.
"""
from sam_jax.train.checkpoint import CheckpointError, Checkpointer
from sam_jax.train.config import Phase, RunIdentity, TrainConfig, parse_phases
from sam_jax.train.grid import Cells, GridResult, GridSpec, make_cells, train_grid
from sam_jax.train.logging import read_metrics
from sam_jax.train.loop import (RunResult, TrainingDiverged, checkpoint_epochs, load_variables,
                                run)
from sam_jax.train.phases import CompileCache, PhaseOptimizer, optimizer_spec
from sam_jax.train.schedules import make_schedule

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "Cells",
    "CompileCache",
    "GridResult",
    "GridSpec",
    "Phase",
    "PhaseOptimizer",
    "RunIdentity",
    "RunResult",
    "TrainConfig",
    "TrainingDiverged",
    "checkpoint_epochs",
    "load_variables",
    "make_cells",
    "make_schedule",
    "optimizer_spec",
    "parse_phases",
    "read_metrics",
    "run",
    "train_grid",
]
