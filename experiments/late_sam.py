"""Figs. 1, 3 and 5 of Zhou et al. (ICLR 2025): switching between SGD and SAM.

Reproduces "SAM efficiently selects flatter minima late in training": a model trained
with SGD for epochs [0, t) and SAM for [t, T) (θ_{SGD→SAM,t}) reaches nearly the test
accuracy and the sharpness of full SAM even when the SAM proportion (T − t)/T is
small, while the reverse switch (θ_{SAM→SGD,t}, SAM first) loses SAM's effect.

The study, per seed, with the training engine (``sam_jax.train.run``):

1. one full SGD run (``sgd:T``) that keeps a checkpoint at every switch point t;
2. one full SAM run (``sam:T``), likewise;
3. each SGD→SAM run branches from the SGD run's checkpoint at t
   (``phases="sgd:t,sam:T−t", init_from=<sgd run>, init_step=t``): the SGD prefix is
   paid once; each SAM→SGD run branches from the SAM run in the same way.

Momentum is reset at the switch and the learning-rate schedule runs on the global
epoch (the paper's code, papers.md §2). For every final model: test accuracy, train
accuracy on the un-augmented train set (generalization gap = train − test accuracy),
the test-accuracy difference to full SAM, the top-2 Hessian eigenvalues by Lanczos
(papers.md §2: the first ≤ 5,000 un-augmented train examples, summed CE / n, no label
smoothing, BN in train mode — recorded in the JSON), and the gradient evaluations
relative to full SGD (a SAM step costs 2). The test set is also evaluated after every
epoch (``eval_every=1``; it does not change training) for Fig. 1a.

Outputs in the workdir: ``results.json``; ``late_sam.png`` (Figs. 3/5: test-accuracy
difference to full SAM, generalization gap and λ_max against the SAM proportion, one
column per direction, y shared per row, full SGD / full SAM as reference lines, error
bars = 95 % t-interval over seeds); ``fig1a_test_error.png`` (Fig. 1a: test error
over epochs for SGD, SAM and SGD→SAM with the switch marked, mean and 95 % t-band over
seeds). The printed verdict states each criterion next to its yes/no.

Hyper-parameters: ``PROVENANCE`` gives the source of every field of the cpu and
paper presets ([code] / [text] / [recalled] as in papers.md, or "chosen by us").

Command (the README's main job)::

    python -m experiments.late_sam --scale cpu --workdir runs/late_sam

Runtime on a 2-core CPU: tiny 20 s-2.5 min (compilation; load-dependent); cpu
(30 runs) 1 min 50 s when the machine was nearly idle (before the per-epoch test
evaluation, which adds ~3-4 % per SGD epoch), 18 min 01 s wall / 6 min 03 s user CPU
under a load of 12-24 (shared machine); paper (CIFAR-10, WRN-16-8, 200 epochs, 5 seeds):
~1 GPU-day (estimate). Result at cpu scale (seeds 0-2): full SAM halves λ_max (0.77 vs
1.46); SAM in the last 20 % of epochs recovers 56 % of that reduction, SAM in the first
20 % then SGD −12 %; test accuracies (SAM − SGD = +0.50 points, 95 % CI [−2.12, +3.12])
are within noise, also along training (Fig. 1a). Table: docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments import common


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One switching study.

    Attributes:
      dataset, dataset_kwargs, model, model_kwargs: what to train (``sam_jax`` names).
      total_epochs: T.
      sgd_to_sam_epochs: SAM epochs k at the end of the SGD→SAM runs (switch at
        t = T − k); proportions k / T.
      sam_to_sgd_epochs: SAM epochs k at the start of the SAM→SGD runs (switch at t = k).
      rho: SAM radius.
      train: other ``TrainConfig`` fields shared by every run (lr, schedule,
        batch_size, momentum, weight_decay, label_smoothing, steps_per_epoch, ...).
      lambda_examples, lambda_iters, lambda_bn_mode: the sharpness protocol
        (papers.md §2: ≤ 5,000 un-augmented train examples, top-2 eigenvalues by
        Lanczos, BN in train mode = "batch").
      lambda_chunk: examples per HVP chunk of the λ_max measurement
        (``TrainConfig.lambda_max_chunk``; the authors: 128 [code], BN statistics
        per chunk in ``batch`` mode). ``None``: not passed, the engine's default
        applies. Every preset sets 128.
      fig1_sam_epochs: the SGD→SAM run drawn in Fig. 1a (one of
        ``sgd_to_sam_epochs``); ``None``: the one whose SAM proportion is closest to
        the paper's Fig. 1 switch, t = 175 of T = 200 (proportion 1/8) [text].
      seeds: default seeds.
    """

    dataset: str
    model: str
    total_epochs: int
    sgd_to_sam_epochs: tuple[int, ...]
    sam_to_sgd_epochs: tuple[int, ...]
    rho: float
    seeds: tuple[int, ...]
    dataset_kwargs: dict = dataclasses.field(default_factory=dict)
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)
    lambda_examples: int = 5000
    lambda_iters: int = 20
    lambda_bn_mode: str = "batch"
    lambda_chunk: int | None = None
    fig1_sam_epochs: int | None = None

    def __post_init__(self):
        for name in ("sgd_to_sam_epochs", "sam_to_sgd_epochs"):
            bad = [k for k in getattr(self, name) if not 0 < k < self.total_epochs]
            if bad:
                raise ValueError(f"{name} must lie in (0, {self.total_epochs}), got {bad}")
        if self.rho <= 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if not self.seeds:
            raise ValueError("need at least one seed")
        if self.fig1_sam_epochs is not None and self.fig1_sam_epochs not in self.sgd_to_sam_epochs:
            raise ValueError(f"fig1_sam_epochs must be one of sgd_to_sam_epochs "
                             f"{self.sgd_to_sam_epochs}, got {self.fig1_sam_epochs}")
        if self.lambda_chunk is not None and self.lambda_chunk < 1:
            raise ValueError(f"lambda_chunk must be >= 1 or None, got {self.lambda_chunk}")

    def switch_points(self) -> tuple[list[int], list[int]]:
        """Epochs t where the SGD run and the SAM run must keep a checkpoint."""
        sgd = sorted({self.total_epochs - k for k in self.sgd_to_sam_epochs})
        sam = sorted(set(self.sam_to_sgd_epochs))
        return sgd, sam

    def fig1_run(self) -> int | None:
        """SAM epochs k of the SGD→SAM run in Fig. 1a (see ``fig1_sam_epochs``)."""
        if self.fig1_sam_epochs is not None:
            return self.fig1_sam_epochs
        if not self.sgd_to_sam_epochs:
            return None
        return min(sorted(self.sgd_to_sam_epochs),
                   key=lambda k: abs(k / self.total_epochs - PAPER_FIG1_PROPORTION))


#: The paper's Fig. 1 switch: SGD to t = 175, then SAM to T = 200 [text].
PAPER_FIG1_PROPORTION = 25 / 200

SCALE_PRESETS: dict[str, StudyConfig] = {
    # Seconds: the CI smoke test of the whole pipeline (branching included).
    "tiny": StudyConfig(
        dataset="mnist1d", dataset_kwargs={"num_samples": 600}, model="cnn1d",
        model_kwargs={"width": 8}, total_epochs=4, sgd_to_sam_epochs=(1, 2),
        sam_to_sgd_epochs=(1,), rho=0.05, seeds=(0,),
        train={"lr": 0.05, "batch_size": 32, "steps_per_epoch": 5, "schedule": "cosine"},
        lambda_examples=200, lambda_iters=6, lambda_chunk=128),
    # Minutes on 2 CPU cores: MNIST-1D (4000 train / 1000 test), the MNIST-1D CNN,
    # the paper's WRN step schedule (lr ×1, ×0.2 after 0.3T, ×0.04 after 0.6T).
    # Everything but the schedule, the momentum and the λ_max protocol is chosen by
    # us (PROVENANCE["cpu"]; docs/experiments.md says how): with a cosine schedule
    # the last epochs have lr ≈ 0 and late SAM cannot move; batch 32 gives 125 steps
    # per epoch (the paper has 391) and rho 0.1 halves λ_max of full SAM vs SGD.
    "cpu": StudyConfig(
        dataset="mnist1d",                               # chosen by us
        model="cnn1d",                                   # chosen by us
        total_epochs=60,                                 # chosen by us
        sgd_to_sam_epochs=(3, 6, 12, 30),                # chosen by us
        sam_to_sgd_epochs=(6, 12, 30, 54),               # chosen by us
        rho=0.1,                                         # chosen by us (by trying)
        seeds=(0, 1, 2),                                 # chosen by us (Figs. 3/5: 3 seeds [text])
        train={"lr": 0.1,                                # chosen by us
               "batch_size": 32,                         # chosen by us (by trying)
               "schedule": "wrn_step",                   # [code] the authors' WRN schedule
               "momentum": 0.9,                          # [code]
               "weight_decay": 5e-4},                    # chosen by us
        lambda_examples=4000,                            # [code] ≤ 5,000: the whole train set
        lambda_iters=20,                                 # chosen by us (they use ARPACK)
        lambda_chunk=128,                                # [code] HVP chunks of 128 (no BN here)
        fig1_sam_epochs=6),                              # chosen by us: 0.10, nearest the paper's 1/8
    # The paper (papers.md §2). Every field carries its provenance tag; [recalled]
    # values are from memory of the paper, not re-checked (PROVENANCE["paper"]).
    "paper": StudyConfig(
        dataset="cifar10",                               # [text] Fig. 1
        dataset_kwargs={"crop_padding": 4,               # [code] random crop, pad 4
                        "flip": True,                    # [code] horizontal flip
                        "cutout": 16,                    # [code] Cutout 16 px for WRN
                        "cutout_prob": 0.5},             # [code] applied with probability 0.5
        model="wrn16_8_davda54",                         # [text] WRN-16-8; [code] davda54's layout (17.16 M)
        total_epochs=200,                                # [text] Fig. 1: T = 200
        sgd_to_sam_epochs=(5, 10, 25, 50, 100, 150),     # 25 [text] (Fig. 1, t = 175); others chosen by us
        sam_to_sgd_epochs=(50, 100, 150, 175, 190, 195), # chosen by us (Fig. 5 grid not in our notes)
        rho=0.05,                                        # [recalled] SAM paper's CIFAR value; script default 2.0 [code]
        seeds=(0, 1, 2, 3, 4),                           # [text] Fig. 1: 5 seeds
        train={"lr": 0.1,                                # [recalled] SAM paper's CIFAR value; script default 0.01 [code]
               "batch_size": 128,                        # [code]
               "schedule": "wrn_step",                   # [code] ×0.2 at 0.3T, ×0.04 at 0.6T
               "momentum": 0.9,                          # [code]
               "weight_decay": 5e-4,                     # [recalled] SAM paper's CIFAR value; script default 1e-4 [code]
               "label_smoothing": 0.1},                  # [code]
        lambda_examples=5000,                            # [code] first 5,000 un-augmented train images
        lambda_iters=20,                                 # chosen by us (they use ARPACK top-2 [code])
        lambda_chunk=128,                                # [code] HVPs in chunks of 128
        fig1_sam_epochs=25),                             # [text] Fig. 1: t = 175 of 200
}

#: Where every hyper-parameter of the cpu and paper presets comes from. Tags as in
#: papers.md: [code] the authors' released code, [text] the paper, [recalled] from
#: memory of the paper, not re-checked; "chosen by us" for our own choices. Copied
#: into results.json (``config.provenance``).
PROVENANCE: dict[str, dict[str, str]] = {
    "cpu": {
        "dataset": "chosen by us: MNIST-1D (4,000 train / 1,000 test), runs on a CPU",
        "model": "chosen by us: cnn1d (the MNIST-1D baseline CNN, width 25, no BN)",
        "total_epochs": "chosen by us: T = 60",
        "sgd_to_sam_epochs": "chosen by us: 3, 6, 12, 30 SAM epochs at the end",
        "sam_to_sgd_epochs": "chosen by us: 6, 12, 30, 54 SAM epochs at the start",
        "rho": "chosen by us by trying: 0.1 halves full SAM's λ_max vs SGD",
        "seeds": "chosen by us: 0, 1, 2 (the paper's Figs. 3/5 use 3 seeds [text])",
        "lr": "chosen by us: 0.1",
        "batch_size": "chosen by us by trying: 32 (125 steps per epoch; the paper has 391)",
        "schedule": "[code] the authors' WRN step schedule (×0.2 after 0.3T, ×0.04 after 0.6T)",
        "momentum": "[code] 0.9",
        "weight_decay": "chosen by us: 5e-4",
        "momentum_at_switch": "[code] reset (SGD and SAM are separate optimizer objects)",
        "lambda_examples": "[code] ≤ 5,000 un-augmented train examples: all 4,000 here",
        "lambda_iters": "chosen by us: 20 Lanczos steps (the authors use ARPACK top-2 [code])",
        "lambda_bn_mode": "[code] train mode (batch statistics); cnn1d has no BN",
        "lambda_chunk": "[code] HVPs over chunks of 128 examples, as the authors; cnn1d has "
                        "no BN, so the chunk size changes λ_max only by float rounding "
                        "(before: one chunk per eval batch of 500)",
        "fig1_sam_epochs": "chosen by us: 6 of 60 (0.10, closest to the paper's 25 of 200)",
    },
    "paper": {
        "dataset": "[text] CIFAR-10 (Fig. 1)",
        "dataset_kwargs": "[code] random crop (pad 4) + horizontal flip + Cutout 16 px "
                          "with probability 0.5",
        "model": "[text] WRN-16-8 (Fig. 1) in the authors' layout [code] (davda54/sam's "
                 "WideResNet: 3 units per group, 17,158,106 parameters): wrn16_8_davda54",
        "total_epochs": "[text] T = 200 (Fig. 1)",
        "sgd_to_sam_epochs": "25 SAM epochs is [text] (Fig. 1: SGD to t = 175); 5, 10, 50, "
                             "100, 150 are chosen by us (the grid of Fig. 3 is not in our notes)",
        "sam_to_sgd_epochs": "chosen by us (the grid of Figs. 3/5 is not in our notes)",
        "rho": "[recalled] 0.05, the SAM paper's CIFAR default; the script's argparse "
               "default is 2.0 [code], not necessarily the paper's",
        "seeds": "[text] 5 seeds (Fig. 1); Figs. 3/5 use 3",
        "lr": "[recalled] 0.1, the SAM paper's CIFAR default; the script's argparse "
              "default is 0.01 [code]",
        "batch_size": "[code] 128",
        "schedule": "[code] WRN step schedule (×1 before 0.3T, ×0.2 before 0.6T, then ×0.04)",
        "momentum": "[code] 0.9",
        "weight_decay": "[recalled] 5e-4, the SAM paper's CIFAR default; the script's "
                        "argparse default is 1e-4 [code]",
        "label_smoothing": "[code] 0.1",
        "momentum_at_switch": "[code] reset (SGD and SAM are separate optimizer objects)",
        "lambda_examples": "[code] the first 5,000 un-augmented train images",
        "lambda_iters": "chosen by us: 20 Lanczos steps (the authors use ARPACK top-2 [code])",
        "lambda_bn_mode": "[code] train mode (BN batch statistics), no label smoothing",
        "lambda_chunk": "[code] HVPs over chunks of 128 examples (BN statistics per chunk)",
        "fig1_sam_epochs": "[text] 25 SAM epochs (Fig. 1: t = 175 of 200)",
    },
}


# ------------------------------------------------------------------------- the runs

def _engine_has(field: str) -> bool:
    from sam_jax.train import TrainConfig

    return field in {f.name for f in dataclasses.fields(TrainConfig)}


def make_train_config(study: StudyConfig, workdir: Path, phases: str, seed: int,
                      init_from: Path | None = None, init_step: int | None = None,
                      keep_every: int | None = None, keep_epochs: Sequence[int] = ()):
    """The ``TrainConfig`` of one run of the study.

    Checkpoints: the last epoch, the phase boundaries and ``keep_epochs`` (the switch
    points the branches start from) are kept, nothing else (``keep_last=1``).

    λ_max is measured at the last epoch only; the test set is evaluated after every
    epoch (``eval_every=1``, for Fig. 1a: one pass over the test set per epoch, about
    1 % of an MNIST-1D epoch's time at cpu scale; evaluation does not feed back into
    training, so the trained models and the final numbers are unchanged).
    """
    from sam_jax.train import TrainConfig

    total = study.total_epochs
    extra = {}
    if study.lambda_chunk is not None:
        if not _engine_has("lambda_max_chunk"):
            raise ValueError("this StudyConfig sets lambda_chunk but TrainConfig has no "
                             "lambda_max_chunk field (update sam_jax)")
        extra["lambda_max_chunk"] = study.lambda_chunk
    return TrainConfig(
        workdir=str(workdir), dataset=study.dataset, dataset_kwargs=dict(study.dataset_kwargs),
        model=study.model, model_kwargs=dict(study.model_kwargs), phases=phases,
        rho=study.rho, seed=seed, init_from=None if init_from is None else str(init_from),
        init_step=init_step, keep_last=1, keep_every=keep_every,
        keep_epochs=tuple(keep_epochs),
        checkpoint_every=1 if keep_every else total, eval_every=1,
        lambda_max_every=total, lambda_max_examples=study.lambda_examples,
        lambda_max_iters=study.lambda_iters, lambda_max_bn_mode=study.lambda_bn_mode,
        progress=False, momentum_at_switch="reset", **extra, **study.train)


def runs_per_seed(study: StudyConfig) -> int:
    """Training runs per seed: full SGD, full SAM and one per switch point."""
    return 2 + len(study.sgd_to_sam_epochs) + len(study.sam_to_sgd_epochs)


def _finished(workdir: Path, total_epochs: int) -> bool:
    """Whether ``workdir`` already holds the run's final checkpoint (it is reused)."""
    from sam_jax.train import checkpoint_epochs

    if not Path(workdir).is_dir():
        return False
    try:
        return total_epochs in checkpoint_epochs(str(workdir))
    except Exception:  # no checkpoint directory yet
        return False


def run_seed(study: StudyConfig, seed: int, workdir: Path, log=print,
             progress: common.RunProgress | None = None) -> dict:
    """All runs of one seed; returns per-run records keyed by run name.

    Each record: direction, sam_epochs, sam_proportion, test_acc, train_acc
    (un-augmented, eval mode), gen_gap, lambda_max, lambda_2, grad_evals (including
    the shared prefix), own_grad_evals (what this run itself computed), and the
    run's own test-accuracy curve (``curve_epochs``: epochs completed, 1-based;
    ``curve_test_acc``); a branched run's curve starts after its switch.

    Args:
      progress: reports each finished run (done/total, ETA, reused); ``None``: a
        progress over this seed's runs is made here.
      log: kept for callers that pass one; progress lines go to ``progress``.
    """
    from sam_jax.data import get_dataset
    from sam_jax.models import get_model
    from sam_jax.train import run

    del log
    total = study.total_epochs
    sgd_points, sam_points = study.switch_points()
    train_ds = get_dataset(study.dataset, "train", **study.dataset_kwargs)
    model = get_model(study.model, train_ds.num_classes, **study.model_kwargs)
    root = workdir / f"seed{seed}"
    if progress is None:
        progress = common.RunProgress(runs_per_seed(study), "late_sam")

    def record(result, direction, sam_epochs, prefix_evals=0.0):
        last = result.history[-1]
        train = common.evaluate(model, result.variables, train_ds)
        curve = [(h["epoch"] + 1, h["test_acc"]) for h in result.history if "test_acc" in h]
        return {"direction": direction, "sam_epochs": sam_epochs,
                "sam_proportion": sam_epochs / total, "test_acc": last["test_acc"],
                "train_acc": train["acc"], "train_loss": train["loss"],
                "gen_gap": train["acc"] - last["test_acc"],
                "lambda_max": last["lambda_max"], "lambda_2": last["lambda_2"],
                "lambda_bn_mode": last.get("lambda_max_bn_mode", study.lambda_bn_mode),
                "lambda_examples": last.get("lambda_max_examples"),
                "grad_evals": result.grad_evals,
                "own_grad_evals": result.grad_evals - prefix_evals,
                "wall_time_s": last.get("wall_time"),
                "curve_epochs": [e for e, _ in curve],
                "curve_test_acc": [a for _, a in curve]}

    def evals_at(history, epoch):  # cumulative gradient evaluations after `epoch` epochs
        return next(h["grad_evals"] for h in history if h["epoch"] == epoch - 1)

    def train(name, label, phases, **kwargs):
        reused = _finished(root / name, total)
        result = run(make_train_config(study, root / name, phases, seed, **kwargs))
        progress.finished(f"seed {seed} {label}: test acc {result.history[-1]['test_acc']:.4f}",
                          reused=reused)
        return result

    runs = {}
    sgd = train("sgd", "full SGD", f"sgd:{total}", keep_epochs=sgd_points)
    runs["sgd"] = record(sgd, "baseline", 0)
    sam = train("sam", "full SAM", f"sam:{total}", keep_epochs=sam_points)
    runs["sam"] = record(sam, "baseline", total)
    for k in study.sgd_to_sam_epochs:
        t_switch = total - k
        result = train(f"sgd_to_sam_{k}", f"SGD→SAM (SAM for the last {k} of {total} epochs)",
                       f"sgd:{t_switch},sam:{k}", init_from=root / "sgd", init_step=t_switch)
        runs[f"sgd_to_sam_{k}"] = record(result, "sgd_to_sam", k,
                                         evals_at(sgd.history, t_switch))
    for k in study.sam_to_sgd_epochs:
        result = train(f"sam_to_sgd_{k}", f"SAM→SGD (SAM for the first {k} of {total} epochs)",
                       f"sam:{k},sgd:{total - k}", init_from=root / "sam", init_step=k)
        runs[f"sam_to_sgd_{k}"] = record(result, "sam_to_sgd", k, evals_at(sam.history, k))
    return runs


# ----------------------------------------------------------------------- aggregation

def aggregate(study: StudyConfig, per_seed: dict[int, dict]) -> list[dict]:
    """One row per (direction, SAM epochs): mean ± std over seeds of every metric.

    Both directions get the full-SGD (proportion 0) and full-SAM (proportion 1)
    endpoints, so each curve of Figs. 3/5 runs from 0 to 1.
    """
    seeds = sorted(per_seed)
    full_sgd_evals = np.mean([per_seed[s]["sgd"]["grad_evals"] for s in seeds])
    rows = []
    layout = [("sgd_to_sam", "sgd", 0)] + [("sgd_to_sam", f"sgd_to_sam_{k}", k)
                                           for k in sorted(study.sgd_to_sam_epochs)]
    layout += [("sgd_to_sam", "sam", study.total_epochs), ("sam_to_sgd", "sgd", 0)]
    layout += [("sam_to_sgd", f"sam_to_sgd_{k}", k) for k in sorted(study.sam_to_sgd_epochs)]
    layout += [("sam_to_sgd", "sam", study.total_epochs)]
    for direction, name, k in layout:
        records = [per_seed[s][name] for s in seeds]
        row = {"direction": direction, "run": name, "sam_epochs": k,
               "sam_proportion": k / study.total_epochs}
        for key in ("test_acc", "train_acc", "gen_gap", "lambda_max", "lambda_2"):
            row[key] = common.mean_std(r[key] for r in records)
        row["test_acc_minus_full_sam"] = common.mean_std(
            per_seed[s][name]["test_acc"] - per_seed[s]["sam"]["test_acc"] for s in seeds)
        row["gen_gap_minus_full_sam"] = common.mean_std(
            per_seed[s][name]["gen_gap"] - per_seed[s]["sam"]["gen_gap"] for s in seeds)
        row["grad_evals_rel_sgd"] = float(np.mean([r["grad_evals"] for r in records])
                                          / full_sgd_evals)
        rows.append(row)
    return rows


#: "A few epochs": the largest SAM proportion the verdict counts as late (or early) SAM.
FEW_EPOCHS = 0.25
#: Share of full SAM's λ_max reduction a switched run must recover to count as "flat".
RECOVERED_SHARE = 0.5


def claim_verdict(study: StudyConfig, rows: list[dict], per_seed: dict) -> dict:
    """Tests the paper's claims on this study with explicit, printed criteria.

    * ``sam_flatter_than_sgd``: full SAM's λ_max is below full SGD's in every seed
      (otherwise the study cannot say anything about sharpness).
    * For each SGD→SAM proportion: the share of SAM's sharpness reduction that late
      SAM recovers, ``(λ_SGD − λ_late) / (λ_SGD − λ_SAM)`` (1 = all of it), and whether
      its test accuracy is within ``tolerance`` of full SAM's, tolerance = max(0.5 %,
      2 × the std of full SAM's test accuracy over seeds).
    * For each SAM→SGD proportion: the same share (the paper expects it near 0 for
      small SAM proportions: early SAM alone does not make the end flat).
    * ``late_sam_matches_full_sam``: some SGD→SAM run with SAM proportion ≤
      ``FEW_EPOCHS`` (0.25: the paper's "a few epochs at the end") recovers ≥ 50 % of
      the sharpness reduction AND is within the test-accuracy tolerance of full SAM.
      This is weaker than the paper's "nearly the same as full SAM": half of the
      reduction suffices.
    * ``early_sam_loses_flatness``: every SAM→SGD run with SAM proportion ≤
      ``FEW_EPOCHS`` recovers < 50 % of the sharpness reduction (SAM early, then SGD,
      ends about as sharp as SGD).
    * ``sam_beats_sgd_test_acc_resolvable``: the paired SAM − SGD test-accuracy
      difference exceeds 2 standard errors (else the accuracy parts are uninformative).

    ``criteria`` holds the text of each criterion (printed next to its boolean).
    """
    seeds = sorted(per_seed)
    lam = lambda name: np.mean([per_seed[s][name]["lambda_max"] for s in seeds])
    acc = lambda name: np.mean([per_seed[s][name]["test_acc"] for s in seeds])
    sam_acc_std = common.mean_std(per_seed[s]["sam"]["test_acc"] for s in seeds)["std"]
    tolerance = max(0.005, 2 * sam_acc_std)
    reduction = lam("sgd") - lam("sam")
    verdict = {
        "sam_flatter_than_sgd_all_seeds": all(
            per_seed[s]["sam"]["lambda_max"] < per_seed[s]["sgd"]["lambda_max"] for s in seeds),
        "lambda_max_full_sgd": lam("sgd"), "lambda_max_full_sam": lam("sam"),
        "test_acc_full_sgd": acc("sgd"), "test_acc_full_sam": acc("sam"),
        "test_acc_tolerance": tolerance, "per_proportion": [],
    }
    matching = []
    for row in rows:
        if row["run"] in ("sgd", "sam"):
            continue
        share = (lam("sgd") - row["lambda_max"]["mean"]) / reduction if reduction > 0 else None
        acc_ok = abs(row["test_acc_minus_full_sam"]["mean"]) <= tolerance
        verdict["per_proportion"].append({
            "direction": row["direction"], "sam_epochs": row["sam_epochs"],
            "sam_proportion": row["sam_proportion"],
            "sharpness_reduction_recovered": share,
            "test_acc_minus_full_sam": row["test_acc_minus_full_sam"]["mean"],
            "test_acc_within_tolerance": acc_ok})
        if (row["direction"] == "sgd_to_sam" and share is not None
                and share >= RECOVERED_SHARE and acc_ok):
            matching.append(row["sam_proportion"])
    # Can this scale resolve the accuracy part of the claim at all? The paired
    # SAM − SGD test-accuracy difference must exceed 2 standard errors.
    diff = common.mean_std(per_seed[s]["sam"]["test_acc"] - per_seed[s]["sgd"]["test_acc"]
                           for s in seeds)
    sem = diff["std"] / np.sqrt(diff["n"]) if diff["n"] > 1 else float("inf")
    verdict["test_acc_sam_minus_sgd"] = diff
    verdict["test_acc_sam_minus_sgd_paired"] = common.paired_difference(
        [per_seed[s]["sam"]["test_acc"] for s in seeds],
        [per_seed[s]["sgd"]["test_acc"] for s in seeds])
    verdict["sam_beats_sgd_test_acc_resolvable"] = bool(diff["mean"] > 2 * sem)
    verdict["smallest_matching_sgd_to_sam_proportion"] = min(matching) if matching else None
    verdict["late_sam_matches_full_sam"] = bool(matching) and min(matching) <= FEW_EPOCHS
    early = [p for p in verdict["per_proportion"]
             if p["direction"] == "sam_to_sgd" and p["sam_proportion"] <= FEW_EPOCHS]
    verdict["early_sam_loses_flatness"] = bool(early) and all(
        p["sharpness_reduction_recovered"] is not None
        and p["sharpness_reduction_recovered"] < RECOVERED_SHARE for p in early)
    few, share_pct, tol = f"{FEW_EPOCHS:.2f}", f"{100 * RECOVERED_SHARE:.0f} %", \
        f"{100 * tolerance:.2f} %"
    verdict["criteria"] = {
        "sam_flatter_than_sgd_all_seeds": "λ_max lower in every seed",
        "late_sam_matches_full_sam":
            f"an SGD→SAM run with ≤ {few} SAM proportion recovers ≥ {share_pct} of full "
            f"SAM's λ_max reduction and has |Δ test acc vs SAM| ≤ {tol}",
        "early_sam_loses_flatness":
            f"every SAM→SGD run with ≤ {few} SAM proportion recovers < {share_pct} of it",
        "sam_beats_sgd_test_acc_resolvable":
            "paired SAM − SGD test acc > 2 standard errors over seeds",
    }
    return verdict


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def format_verdict(claim: dict) -> str:
    """The verdict lines the module prints: each boolean with its criterion."""
    crit = claim["criteria"]
    smallest = claim["smallest_matching_sgd_to_sam_proportion"]
    resolvable = claim["sam_beats_sgd_test_acc_resolvable"]
    lines = [
        f"full SAM flatter than full SGD ({crit['sam_flatter_than_sgd_all_seeds']}): "
        f"{_yes(claim['sam_flatter_than_sgd_all_seeds'])}"
        f" — λ_max {claim['lambda_max_full_sgd']:.2f} (SGD) vs "
        f"{claim['lambda_max_full_sam']:.2f} (SAM)",
        f"late SAM gets most of full SAM's flatness ({crit['late_sam_matches_full_sam']}): "
        f"{_yes(claim['late_sam_matches_full_sam'])}"
        + (f" — smallest such SAM proportion {smallest:.3f}" if smallest is not None else ""),
        f"early SAM then SGD ends about as sharp as SGD ({crit['early_sam_loses_flatness']}): "
        f"{_yes(claim['early_sam_loses_flatness'])}",
        f"SAM's test-acc gain over SGD resolvable at this scale "
        f"({crit['sam_beats_sgd_test_acc_resolvable']}): {_yes(resolvable)} — SAM − SGD "
        f"{common.fmt_paired(claim['test_acc_sam_minus_sgd_paired'], 2, 100)} points",
    ]
    if not resolvable:
        lines.append("  (so the test-acc part of the late-SAM criterion cannot discriminate: "
                     "SGD itself is within noise of SAM)")
    return "\n".join(lines)


def format_proportions(claim: dict) -> str:
    """Per switched run: share of SAM's λ_max reduction recovered, Δ test acc."""
    tol = 100 * claim["test_acc_tolerance"]
    header = ["direction", "SAM epochs", "SAM prop.", "λ_max reduction recovered",
              "Δ test vs SAM %", f"|Δ test| ≤ {tol:.2f} %"]
    table = []
    for p in claim["per_proportion"]:
        share = p["sharpness_reduction_recovered"]
        table.append([p["direction"].replace("_to_", "→").upper().replace("→", " → "),
                      p.get("sam_epochs", ""), f"{p['sam_proportion']:.3f}",
                      "n/a" if share is None else f"{100 * share:.0f} %",
                      f"{100 * p.get('test_acc_minus_full_sam', float('nan')):+.2f}",
                      _yes(p["test_acc_within_tolerance"])])
    return common.format_table(header, table)


def format_rows(rows: list[dict]) -> str:
    header = ["direction", "SAM epochs", "SAM prop.", "test acc %", "Δ test vs SAM %",
              "gen gap %", "λ_max", "λ_2", "grad evals / SGD"]
    table = []
    for r in rows:
        table.append([r["direction"] if r["run"] not in ("sgd", "sam") else
                      ("full SGD" if r["run"] == "sgd" else "full SAM"),
                      r["sam_epochs"], f"{r['sam_proportion']:.3f}",
                      common.fmt_mean_std(r["test_acc"], 2, 100),
                      common.fmt_mean_std(r["test_acc_minus_full_sam"], 2, 100),
                      common.fmt_mean_std(r["gen_gap"], 2, 100),
                      common.fmt_mean_std(r["lambda_max"], 2),
                      common.fmt_mean_std(r["lambda_2"], 2),
                      f"{r['grad_evals_rel_sgd']:.2f}"])
    return common.format_table(header, table)


# -------------------------------------------------------------------------- figures

def _describe(study: StudyConfig, seeds: Sequence[int], scale: str = "") -> str:
    width = study.model_kwargs.get("width")
    model = study.model + (f" (width {width})" if width else "")
    return (f"{study.dataset}, {model}, T = {study.total_epochs} epochs, ρ = {study.rho}, "
            f"seeds {', '.join(map(str, seeds))}{common.smoke_tag(scale)}")


def study_figure(rows: list[dict], title: str = ""):
    """Figs. 3/5: test-acc difference to full SAM, generalization gap and λ_max vs
    SAM proportion, one column per switching direction (y shared per row), with the
    full-SGD and full-SAM values as reference lines; error bars are the 95 %
    t-interval of the mean over seeds. Returns the matplotlib figure."""
    plt = common.pyplot()
    metrics = [("test_acc_minus_full_sam", "test acc − full SAM (%)", 100),
               ("gen_gap", "generalization gap\ntrain − test acc (%)", 100),
               ("lambda_max", "λ_max (Lanczos, top Hessian eigenvalue)", 1)]
    titles = {"sgd_to_sam": "SGD → SAM (SAM for the last epochs)",
              "sam_to_sgd": "SAM → SGD (SAM for the first epochs)"}
    colors = {"sgd_to_sam": common.PALETTE[1], "sam_to_sgd": common.PALETTE[0]}
    base = {r["run"]: r for r in rows if r["run"] in ("sgd", "sam")}
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 8.5), sharex=True,
                             sharey="row", squeeze=False)
    for col, direction in enumerate(("sgd_to_sam", "sam_to_sgd")):
        sub = sorted((r for r in rows if r["direction"] == direction),
                     key=lambda r: r["sam_proportion"])
        x = [r["sam_proportion"] for r in sub]
        for row, (key, label, scale) in enumerate(metrics):
            ax = axes[row][col]
            for run, style, name in (("sgd", "--", "full SGD"), ("sam", ":", "full SAM")):
                if run in base:
                    ax.axhline(base[run][key]["mean"] * scale, color="0.35", ls=style, lw=1.1,
                               label=f"{name} (mean)")
            ax.errorbar(x, [r[key]["mean"] * scale for r in sub],
                        yerr=[common.ci_half_width(r[key]["values"]) * scale for r in sub],
                        fmt="o-", capsize=3, color=colors[direction])
            if col == 0:
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(titles[direction])
            if row == len(metrics) - 1:
                ax.set_xlabel("SAM training proportion (SAM epochs / T)")
            if row == 0 and col == 0:
                ax.legend(loc="best")
    n = rows[0]["test_acc"]["n"] if rows else 0
    fig.suptitle(f"{title}\npoints: mean over {n} seed{'s' if n != 1 else ''}; error bars: 95 % "
                 f"t-interval of the mean; dashed / dotted: full SGD / full SAM", fontsize=9)
    fig.tight_layout()
    return fig


def plot_study(rows: list[dict], path, title: str = "") -> str:
    """Draw :func:`study_figure` to ``path`` (PNG + PDF); return the PNG's name."""
    return common.save_figure(study_figure(rows, title), path)


def test_error_curves(study: StudyConfig, per_seed: dict, sam_epochs: int | None = None
                      ) -> dict[str, np.ndarray]:
    """Per-epoch test error (seeds × T, NaN where not evaluated) for Fig. 1a.

    Keys ``"sgd"``, ``"sam"`` and ``"sgd_to_sam"`` (the SGD→SAM run with
    ``sam_epochs`` SAM epochs, default ``study.fig1_run()``): its first t = T − k
    epochs are the SGD run's (it branched from that run's checkpoint at t), the rest
    its own. Column j is the error after epoch j + 1.
    """
    total = study.total_epochs
    k = sam_epochs if sam_epochs is not None else study.fig1_run()
    seeds = sorted(per_seed)

    def curve(record):
        out = np.full(total, np.nan)
        for epoch, acc in zip(record.get("curve_epochs", []), record.get("curve_test_acc", [])):
            out[epoch - 1] = 1.0 - acc
        return out

    curves = {"sgd": np.array([curve(per_seed[s]["sgd"]) for s in seeds]),
              "sam": np.array([curve(per_seed[s]["sam"]) for s in seeds])}
    late = []
    for i, s in enumerate(seeds):
        own = curve(per_seed[s][f"sgd_to_sam_{k}"])
        own[:total - k] = curves["sgd"][i, :total - k]
        late.append(own)
    curves["sgd_to_sam"] = np.array(late)
    return curves


def plot_fig1a(study: StudyConfig, per_seed: dict, path, title: str = "") -> str:
    """Fig. 1a: test error over epochs for SGD, SAM and SGD→SAM (switch marked);
    mean and 95 % t-band over seeds; right panel zooms into the second half."""
    plt = common.pyplot()
    k = study.fig1_run()
    t = study.total_epochs - k
    curves = test_error_curves(study, per_seed, k)
    epochs = np.arange(1, study.total_epochs + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = [("sgd", "SGD", common.PALETTE[0]), ("sam", "SAM", common.PALETTE[2]),
              ("sgd_to_sam", f"SGD → SAM (SAM for the last {k} epochs)",
               common.PALETTE[1])]
    # Zoom: from the schedule's last step (0.6 T for the WRN step schedule) on.
    start = min(int(0.6 * study.total_epochs), max(t - 1, 0))
    for ax, lo in zip(axes, (0, start)):
        for key, label, color in styles:
            # The SGD→SAM run equals the SGD run before the switch: draw it from the
            # switch on (starting at the shared value after epoch t) so SGD stays visible.
            first = max(lo, t - 1) if key == "sgd_to_sam" else lo
            common.plot_band(ax, epochs[first:], 100 * curves[key][:, first:], label=label,
                             color=color)
        ax.axvline(t, color="k", ls="--", lw=0.9, label=f"switch to SAM (after epoch {t})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error (%)")
    axes[0].set_title("all epochs")
    axes[1].set_title(f"epochs {start + 1}–{study.total_epochs} (zoom)")
    axes[0].legend(loc="upper right")
    fig.suptitle(f"{title}\n{common.BAND_CAPTION}; test set evaluated after every epoch",
                 fontsize=9)
    fig.tight_layout()
    return common.save_figure(fig, path)


def draw_figures(study: StudyConfig, seeds, scale: str, rows: list[dict], per_seed: dict,
                 workdir: Path) -> list[str]:
    """Write ``late_sam.png`` and (if the study has an SGD→SAM run) ``fig1a_test_error.png``."""
    description = _describe(study, seeds, scale)
    figures = [plot_study(rows, workdir / "late_sam.png",
                          f"Late-phase SAM switching study (Figs. 3/5) — {description}")]
    if study.fig1_run() is not None:
        figures.append(plot_fig1a(study, per_seed, workdir / "fig1a_test_error.png",
                                  f"Fig. 1a: test error over training — {description}"))
    return figures


def replot(workdir) -> list[str]:
    """Redraw the figures of a finished run from its ``results.json`` (no training)."""
    workdir = Path(workdir)
    data = json.loads((workdir / common.RESULTS_FILE).read_text())
    config = data["config"]["study"]
    for key in ("sgd_to_sam_epochs", "sam_to_sgd_epochs", "seeds"):
        config[key] = tuple(config[key])
    study = StudyConfig(**config)
    results = data["results"]
    per_seed = {int(s): runs for s, runs in results["per_seed"].items()}
    return draw_figures(study, data["config"]["seeds"], data["scale"], results["rows"],
                        per_seed, workdir)


def run_experiment(scale: str, workdir, seeds: Sequence[int] | None = None,
                   study: StudyConfig | None = None, log=print) -> dict:
    """Run the whole study; write ``results.json``, ``late_sam.png`` and
    ``fig1a_test_error.png``; return the results."""
    study = study or SCALE_PRESETS[scale]
    seeds = tuple(seeds) if seeds else study.seeds
    workdir = common.prepare_workdir(workdir)
    progress = common.RunProgress(len(seeds) * runs_per_seed(study), "late_sam")
    with common.Timer() as timer:
        per_seed = {}
        for seed in seeds:
            per_seed[seed] = run_seed(study, seed, workdir, log, progress=progress)
        rows = aggregate(study, per_seed)
        verdict = claim_verdict(study, rows, per_seed)
        figures = draw_figures(study, seeds, scale, rows, per_seed, workdir)
    study_evals = sum(r["own_grad_evals"] for runs in per_seed.values() for r in runs.values())
    naive_evals = sum(r["grad_evals"] for runs in per_seed.values() for r in runs.values())
    results = {
        "rows": rows,
        "per_seed": {str(s): runs for s, runs in per_seed.items()},
        "claim": verdict,
        "compute": {"study_grad_evals": study_evals,
                    "without_branching_grad_evals": naive_evals,
                    "saved_by_branching": 1 - study_evals / naive_evals},
        "table": format_rows(rows),
        "fig1a_sam_epochs": study.fig1_run(),
    }
    config = {"study": study, "seeds": seeds, "provenance": PROVENANCE.get(scale, {})}
    common.write_results(workdir, "late_sam", scale, config, results, timer.seconds, figures)
    results["wall_time_s"] = timer.seconds
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    parser = common.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the figures of a finished run in --workdir")
    args = common.parse_args(__doc__.splitlines()[0], argv, parser)
    if args.replot:
        figures = replot(args.workdir)
        print(f"redrew {', '.join(figures)} in {args.workdir}")
        return {"figures": figures}
    results = run_experiment(args.scale, args.workdir, args.seeds)
    print("\nmean ± std over seeds (Δ test vs SAM: paired per seed)")
    print(results["table"])
    print("\nper switched run (λ_max reduction recovered = (λ_SGD − λ)/(λ_SGD − λ_SAM) on "
          "seed means)")
    print(format_proportions(results["claim"]))
    print("\nverdict (criterion in parentheses):")
    print(format_verdict(results["claim"]))
    common.print_footer(args.scale, results["wall_time_s"], args.workdir)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
