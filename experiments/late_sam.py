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
relative to full SGD (a SAM step costs 2).

Command (the README's main job)::

    python -m experiments.late_sam --scale cpu --workdir runs/late_sam

Runtime on a 2-core CPU: tiny ~30 s; cpu 1 min 50 s idle, 6 min under heavy load
(30 runs); paper (CIFAR-10, WRN-16-8, 200 epochs, 5 seeds): ~1 GPU-day (estimate).
Result at cpu scale (seeds 0-2): full SAM halves λ_max (0.77 vs 1.46); SAM in the last
20 % of epochs recovers 56 % of that reduction, SAM in the first 20 % then SGD −12 %;
test accuracies (SAM − SGD = 0.50 ± 1.05 %) are within noise. Table:
docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from functools import reduce
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

    def __post_init__(self):
        for name in ("sgd_to_sam_epochs", "sam_to_sgd_epochs"):
            bad = [k for k in getattr(self, name) if not 0 < k < self.total_epochs]
            if bad:
                raise ValueError(f"{name} must lie in (0, {self.total_epochs}), got {bad}")
        if self.rho <= 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if not self.seeds:
            raise ValueError("need at least one seed")

    def switch_points(self) -> tuple[list[int], list[int]]:
        """Epochs t where the SGD run and the SAM run must keep a checkpoint."""
        sgd = sorted({self.total_epochs - k for k in self.sgd_to_sam_epochs})
        sam = sorted(set(self.sam_to_sgd_epochs))
        return sgd, sam


SCALE_PRESETS: dict[str, StudyConfig] = {
    # Seconds: the CI smoke test of the whole pipeline (branching included).
    "tiny": StudyConfig(
        dataset="mnist1d", dataset_kwargs={"num_samples": 600}, model="cnn1d",
        model_kwargs={"width": 8}, total_epochs=4, sgd_to_sam_epochs=(1, 2),
        sam_to_sgd_epochs=(1,), rho=0.05, seeds=(0,),
        train={"lr": 0.05, "batch_size": 32, "steps_per_epoch": 5, "schedule": "cosine"},
        lambda_examples=200, lambda_iters=6),
    # Minutes on 2 CPU cores: MNIST-1D (4000 train / 1000 test), the MNIST-1D CNN,
    # the paper's WRN step schedule (lr ×1, ×0.2 after 0.3T, ×0.04 after 0.6T).
    # Chosen by trying (docs/experiments.md): with a cosine schedule the last epochs
    # have lr ≈ 0 and late SAM cannot move; batch 32 gives 125 steps per epoch (the
    # paper has 391) and rho 0.1 halves λ_max of full SAM relative to SGD.
    "cpu": StudyConfig(
        dataset="mnist1d", model="cnn1d", total_epochs=60,
        sgd_to_sam_epochs=(3, 6, 12, 30), sam_to_sgd_epochs=(6, 12, 30, 54),
        rho=0.1, seeds=(0, 1, 2),
        train={"lr": 0.1, "batch_size": 32, "schedule": "wrn_step", "momentum": 0.9,
               "weight_decay": 5e-4},
        lambda_examples=4000, lambda_iters=20),
    # The paper (papers.md §2, [code]): WRN-16-8 on CIFAR-10, 200 epochs, batch 128,
    # momentum 0.9, label smoothing 0.1, crop (pad 4) + flip + Cutout 16, the WRN step
    # schedule; Fig. 1 switches at t = 175 (25 SAM epochs); the other SAM proportions
    # are our choice (the exact grid of Fig. 3 is not in our notes). lr 0.1, wd 5e-4,
    # rho 0.05 are the SAM paper's CIFAR defaults [recalled], not the script's argparse
    # defaults (lr 0.01, wd 1e-4, rho 2.0).
    "paper": StudyConfig(
        dataset="cifar10", dataset_kwargs={"crop_padding": 4, "flip": True, "cutout": 16},
        model="wrn16_8", total_epochs=200,
        sgd_to_sam_epochs=(5, 10, 25, 50, 100, 150),
        sam_to_sgd_epochs=(50, 100, 150, 175, 190, 195),
        rho=0.05, seeds=(0, 1, 2, 3, 4),
        train={"lr": 0.1, "batch_size": 128, "schedule": "wrn_step", "momentum": 0.9,
               "weight_decay": 5e-4, "label_smoothing": 0.1},
        lambda_examples=5000, lambda_iters=20),
}


# ------------------------------------------------------------------------- the runs

def make_train_config(study: StudyConfig, workdir: Path, phases: str, seed: int,
                      init_from: Path | None = None, init_step: int | None = None,
                      keep_every: int | None = None):
    """The ``TrainConfig`` of one run of the study (λ_max at the last epoch only)."""
    from sam_jax.train import TrainConfig

    total = study.total_epochs
    return TrainConfig(
        workdir=str(workdir), dataset=study.dataset, dataset_kwargs=dict(study.dataset_kwargs),
        model=study.model, model_kwargs=dict(study.model_kwargs), phases=phases,
        rho=study.rho, seed=seed, init_from=None if init_from is None else str(init_from),
        init_step=init_step, keep_last=1, keep_every=keep_every,
        checkpoint_every=1 if keep_every else total, eval_every=total,
        lambda_max_every=total, lambda_max_examples=study.lambda_examples,
        lambda_max_iters=study.lambda_iters, lambda_max_bn_mode=study.lambda_bn_mode,
        progress=False, momentum_at_switch="reset", **study.train)


def _gcd(values: Sequence[int]) -> int | None:
    return reduce(math.gcd, values) if values else None


def run_seed(study: StudyConfig, seed: int, workdir: Path, log=print) -> dict:
    """All runs of one seed; returns per-run records keyed by run name.

    Each record: direction, sam_epochs, sam_proportion, test_acc, train_acc
    (un-augmented, eval mode), gen_gap, lambda_max, lambda_2, grad_evals (including
    the shared prefix), own_grad_evals (what this run itself computed).
    """
    from sam_jax.data import get_dataset
    from sam_jax.models import get_model
    from sam_jax.train import run

    total = study.total_epochs
    sgd_points, sam_points = study.switch_points()
    train_ds = get_dataset(study.dataset, "train", **study.dataset_kwargs)
    model = get_model(study.model, train_ds.num_classes, **study.model_kwargs)
    root = workdir / f"seed{seed}"

    def record(result, direction, sam_epochs, prefix_evals=0.0):
        last = result.history[-1]
        train = common.evaluate(model, result.variables, train_ds)
        return {"direction": direction, "sam_epochs": sam_epochs,
                "sam_proportion": sam_epochs / total, "test_acc": last["test_acc"],
                "train_acc": train["acc"], "train_loss": train["loss"],
                "gen_gap": train["acc"] - last["test_acc"],
                "lambda_max": last["lambda_max"], "lambda_2": last["lambda_2"],
                "lambda_bn_mode": last.get("lambda_max_bn_mode", study.lambda_bn_mode),
                "lambda_examples": last.get("lambda_max_examples"),
                "grad_evals": result.grad_evals,
                "own_grad_evals": result.grad_evals - prefix_evals,
                "wall_time_s": last.get("wall_time")}

    def evals_at(history, epoch):  # cumulative gradient evaluations after `epoch` epochs
        return next(h["grad_evals"] for h in history if h["epoch"] == epoch - 1)

    runs = {}
    with common.Timer() as t:
        sgd = run(make_train_config(study, root / "sgd", f"sgd:{total}", seed,
                                    keep_every=_gcd(sgd_points)))
    runs["sgd"] = record(sgd, "baseline", 0)
    log(f"  seed {seed}: full SGD  test acc {runs['sgd']['test_acc']:.4f}  ({t.seconds:.0f} s)")
    with common.Timer() as t:
        sam = run(make_train_config(study, root / "sam", f"sam:{total}", seed,
                                    keep_every=_gcd(sam_points)))
    runs["sam"] = record(sam, "baseline", total)
    log(f"  seed {seed}: full SAM  test acc {runs['sam']['test_acc']:.4f}  ({t.seconds:.0f} s)")
    for k in study.sgd_to_sam_epochs:
        t_switch = total - k
        result = run(make_train_config(study, root / f"sgd_to_sam_{k}",
                                       f"sgd:{t_switch},sam:{k}", seed,
                                       init_from=root / "sgd", init_step=t_switch))
        runs[f"sgd_to_sam_{k}"] = record(result, "sgd_to_sam", k,
                                         evals_at(sgd.history, t_switch))
    for k in study.sam_to_sgd_epochs:
        result = run(make_train_config(study, root / f"sam_to_sgd_{k}",
                                       f"sam:{k},sgd:{total - k}", seed,
                                       init_from=root / "sam", init_step=k))
        runs[f"sam_to_sgd_{k}"] = record(result, "sam_to_sgd", k, evals_at(sam.history, k))
    log(f"  seed {seed}: {len(runs)} runs done")
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
    * ``early_sam_loses_flatness``: every SAM→SGD run with SAM proportion ≤
      ``FEW_EPOCHS`` recovers < 50 % of the sharpness reduction (SAM early, then SGD,
      ends about as sharp as SGD).
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
            "direction": row["direction"], "sam_proportion": row["sam_proportion"],
            "sharpness_reduction_recovered": share, "test_acc_within_tolerance": acc_ok})
        if (row["direction"] == "sgd_to_sam" and share is not None and share >= 0.5
                and acc_ok):
            matching.append(row["sam_proportion"])
    # Can this scale resolve the accuracy part of the claim at all? The paired
    # SAM − SGD test-accuracy difference must exceed 2 standard errors.
    diff = common.mean_std(per_seed[s]["sam"]["test_acc"] - per_seed[s]["sgd"]["test_acc"]
                           for s in seeds)
    sem = diff["std"] / np.sqrt(diff["n"]) if diff["n"] > 1 else float("inf")
    verdict["test_acc_sam_minus_sgd"] = diff
    verdict["sam_beats_sgd_test_acc_resolvable"] = bool(diff["mean"] > 2 * sem)
    verdict["smallest_matching_sgd_to_sam_proportion"] = min(matching) if matching else None
    verdict["late_sam_matches_full_sam"] = bool(matching) and min(matching) <= FEW_EPOCHS
    early = [p for p in verdict["per_proportion"]
             if p["direction"] == "sam_to_sgd" and p["sam_proportion"] <= FEW_EPOCHS]
    verdict["early_sam_loses_flatness"] = bool(early) and all(
        p["sharpness_reduction_recovered"] is not None
        and p["sharpness_reduction_recovered"] < 0.5 for p in early)
    return verdict


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


def plot_study(rows: list[dict], path) -> str:
    """Figs. 3/5: test-acc difference to full SAM, generalization gap and λ_max vs
    SAM proportion, one column per switching direction."""
    plt = common.pyplot()
    metrics = [("test_acc_minus_full_sam", "test acc − full SAM (%)", 100),
               ("gen_gap", "generalization gap\ntrain − test acc (%)", 100),
               ("lambda_max", "λ_max (Lanczos)", 1)]
    titles = {"sgd_to_sam": "SGD → SAM (SAM at the end)",
              "sam_to_sgd": "SAM → SGD (SAM at the start)"}
    fig, axes = plt.subplots(len(metrics), 2, figsize=(9, 8), sharex=True, squeeze=False)
    for col, direction in enumerate(("sgd_to_sam", "sam_to_sgd")):
        sub = sorted((r for r in rows if r["direction"] == direction),
                     key=lambda r: r["sam_proportion"])
        x = [r["sam_proportion"] for r in sub]
        for row, (key, label, scale) in enumerate(metrics):
            ax = axes[row][col]
            ax.errorbar(x, [r[key]["mean"] * scale for r in sub],
                        yerr=[r[key]["std"] * scale for r in sub], fmt="o-", capsize=3,
                        color="tab:orange" if direction == "sgd_to_sam" else "tab:blue")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(titles[direction])
                ax.axhline(0, color="k", lw=0.8)
            if row == len(metrics) - 1:
                ax.set_xlabel("SAM training proportion")
    return common.save_figure(fig, path)


def run_experiment(scale: str, workdir, seeds: Sequence[int] | None = None,
                   study: StudyConfig | None = None, log=print) -> dict:
    """Run the whole study, write ``results.json`` and ``late_sam.png``; return results."""
    study = study or SCALE_PRESETS[scale]
    seeds = tuple(seeds) if seeds else study.seeds
    workdir = common.prepare_workdir(workdir)
    with common.Timer() as timer:
        per_seed = {}
        for seed in seeds:
            per_seed[seed] = run_seed(study, seed, workdir, log)
        rows = aggregate(study, per_seed)
        verdict = claim_verdict(study, rows, per_seed)
        figure = plot_study(rows, workdir / "late_sam.png")
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
    }
    config = {"study": study, "seeds": seeds}
    common.write_results(workdir, "late_sam", scale, config, results, timer.seconds, [figure])
    results["wall_time_s"] = timer.seconds
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    parser = common.build_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    results = run_experiment(args.scale, args.workdir, args.seeds)
    print(results["table"])
    claim = results["claim"]
    print(f"full SGD λ_max {claim['lambda_max_full_sgd']:.2f}, full SAM λ_max "
          f"{claim['lambda_max_full_sam']:.2f}; test acc SGD {100 * claim['test_acc_full_sgd']:.2f}%"
          f", SAM {100 * claim['test_acc_full_sam']:.2f}%")
    for p in claim["per_proportion"]:
        share = p["sharpness_reduction_recovered"]
        print(f"  {p['direction']:10s} SAM prop {p['sam_proportion']:.3f}: "
              f"recovers {'n/a' if share is None else f'{100 * share:.0f}%'} of SAM's "
              f"sharpness reduction; test acc within ±{100 * claim['test_acc_tolerance']:.2f}%"
              f" of full SAM: {p['test_acc_within_tolerance']}")
    print(f"SAM − SGD test acc {common.fmt_mean_std(claim['test_acc_sam_minus_sgd'], 2, 100)} %"
          f" (resolvable above 2 standard errors: "
          f"{claim['sam_beats_sgd_test_acc_resolvable']})")
    print(f"late SAM matches full SAM: {claim['late_sam_matches_full_sam']} "
          f"(smallest matching proportion {claim['smallest_matching_sgd_to_sam_proportion']}); "
          f"early SAM loses flatness: {claim['early_sam_loses_flatness']}")
    print(f"wall time {results['wall_time_s']:.0f} s; results in {args.workdir}/results.json")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
