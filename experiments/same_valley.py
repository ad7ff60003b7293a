"""Fig. 4c of Zhou et al. (ICLR 2025): late SAM lands in the SGD solution's valley.

Reproduces "SAM efficiently selects flatter minima late in training", Fig. 4c: along
``θ_λ = (1 − λ) θ_{SGD→SAM} + λ θ_SGD`` on ``λ ∈ linspace(−0.2, 1.2, 40)`` the train
loss shows no barrier (same valley), and the second-order finite difference
``L''(θ_λ) = (L(θ_{λ+h}) + L(θ_{λ−h}) − 2 L(θ_λ)) / (2h)²`` (h = 0.1, the paper's
formula, via ``sam_jax.landscape.interpolate``) grows with λ (θ_{SGD→SAM} is flatter).

The pair of models comes from the late-SAM study: a full SGD run and a run branched
from its checkpoint at t = T − k with SAM for the last k epochs (same seed, same
data order). By default this module trains its own pair with the ``late_sam``
preset of the same scale; ``--from-late-sam DIR`` reuses the runs of
``python -m experiments.late_sam --workdir DIR`` instead (no training).

Command::

    python -m experiments.same_valley --scale cpu --workdir runs/same_valley

Runtime on a 2-core CPU: tiny ~20 s; cpu ~15 s from late_sam's runs, ~2 min training
its own pair. Result (cpu, seeds 0-2): no barrier; L'' 0.0012-0.0014 at late SAM vs
0.0017-0.0020 at SGD (docs/experiments.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments import common, late_sam

#: SAM epochs at the end of the SGD→SAM run used for the pair, per scale (the paper's
#: Fig. 1 pair is t = 175 of T = 200: k = 25, proportion 1/8).
PAIR_SAM_EPOCHS = {"tiny": 2, "cpu": 12, "paper": 25}
#: Train examples on which the loss is evaluated (the whole train set at cpu scale).
LOSS_EXAMPLES = {"tiny": 1000, "cpu": 4000, "paper": 5000}


def train_pair(study: late_sam.StudyConfig, sam_epochs: int, seed: int, workdir: Path):
    """Train θ_SGD (``sgd:T``) and θ_{SGD→SAM} branched at t = T − sam_epochs."""
    from sam_jax.train import run

    total = study.total_epochs
    t_switch = total - sam_epochs
    sgd = run(late_sam.make_train_config(study, workdir / "sgd", f"sgd:{total}", seed,
                                         keep_every=t_switch))
    late = run(late_sam.make_train_config(study, workdir / f"sgd_to_sam_{sam_epochs}",
                                          f"sgd:{t_switch},sam:{sam_epochs}", seed,
                                          init_from=workdir / "sgd", init_step=t_switch))
    return sgd.variables, late.variables


def load_pair(late_sam_dir: Path, seed: int, sam_epochs: int):
    """θ_SGD and θ_{SGD→SAM, T−k} saved by a finished ``late_sam`` run."""
    from sam_jax.train import load_variables

    root = Path(late_sam_dir) / f"seed{seed}"
    late_dir = root / f"sgd_to_sam_{sam_epochs}"
    if not late_dir.is_dir():
        raise ValueError(f"{late_dir} does not exist: run late_sam with {sam_epochs} SAM epochs "
                         f"in its sgd_to_sam_epochs, or choose --sam-epochs accordingly")
    return load_variables(str(root / "sgd")), load_variables(str(late_dir))


def interpolation_study(study: late_sam.StudyConfig, variables_sgd, variables_late,
                        examples: int, bn_mode: str = "batch", h: float = 0.1) -> dict:
    """Loss, accuracy and L'' along θ_λ, λ ∈ linspace(−0.2, 1.2, 40) (papers.md §2).

    Args:
      study: the study the models come from (dataset and model).
      variables_sgd, variables_late: the two models' variables.
      examples: the first ``examples`` un-augmented train examples define the loss.
      bn_mode: BatchNorm mode of the loss ("batch": train-mode statistics of each
        batch, as for the paper's sharpness; recorded). Other collections are taken
        from θ_{SGD→SAM}.
      h: finite-difference step (paper: 0.1).

    Returns:
      dict with lambdas, losses, accuracies, second_derivative, barrier heights and
      the endpoint values; ``lpp_increasing`` says whether L'' at λ = 1 (θ_SGD)
      exceeds L'' at λ = 0 (θ_{SGD→SAM}).
    """
    from sam_jax import curvature, landscape
    from sam_jax.data import get_dataset
    from sam_jax.models import get_model

    train_ds = get_dataset(study.dataset, "train", **study.dataset_kwargs)
    n = min(examples, train_ds.num_examples)
    arrays = train_ds.subset(n).arrays()
    size = 1000
    batches = [{"x": arrays["x"][i:i + size], "y": arrays["y"][i:i + size]}
               for i in range(0, n, size)]
    model = get_model(study.model, train_ds.num_classes, **study.model_kwargs)
    loss_fn = curvature.flax_loss_fn(model, variables_late, bn_mode=bn_mode)
    accuracy_fn = landscape.flax_accuracy_fn(model, variables_late, bn_mode=bn_mode)
    result = landscape.interpolate(loss_fn, variables_late["params"], variables_sgd["params"],
                                   batches, metric_fn=accuracy_fn, h=h, denominator="paper")
    lambdas, second = result.lambdas, result.second_derivative
    at = lambda value: float(np.interp(value, lambdas, second))
    return {
        "lambdas": lambdas, "losses": result.losses, "accuracies": result.metrics,
        "second_derivative": second, "h": result.h, "denominator": result.denominator,
        "barrier": result.barrier,
        "barrier_above_max_endpoint": result.barrier_above_max_endpoint,
        "loss_sgd_to_sam": result.endpoint_losses[0], "loss_sgd": result.endpoint_losses[1],
        "lpp_at_sgd_to_sam": at(0.0), "lpp_at_sgd": at(1.0),
        "lpp_increasing": at(1.0) > at(0.0),
        "lpp_spearman_on_0_1": _spearman(lambdas, second),
        "bn_mode": bn_mode, "examples": n,
    }


def _spearman(lambdas: np.ndarray, values: np.ndarray) -> float:
    """Rank correlation of L'' with λ on [0, 1] (1 = monotone increase)."""
    from scipy.stats import spearmanr

    inside = (lambdas >= 0) & (lambdas <= 1)
    return float(spearmanr(lambdas[inside], values[inside]).statistic)


def plot_interpolation(per_seed: dict, path) -> str:
    """Fig. 4c: loss (top) and L'' (bottom) vs λ, one line per seed."""
    plt = common.pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    for seed, res in per_seed.items():
        top.plot(res["lambdas"], res["losses"], label=f"seed {seed}")
        bottom.plot(res["lambdas"], res["second_derivative"], label=f"seed {seed}")
    for ax in (top, bottom):
        for x in (0.0, 1.0):
            ax.axvline(x, color="gray", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    top.set_ylabel("train loss L(θ_λ)")
    top.set_yscale("log")
    top.set_title("θ_λ = (1−λ) θ_SGD→SAM + λ θ_SGD   (λ=0: late SAM, λ=1: SGD)")
    bottom.set_ylabel("L''(θ_λ), h = 0.1")
    bottom.set_xlabel("λ")
    top.legend(fontsize=8)
    return common.save_figure(fig, path)


def run_experiment(scale: str, workdir, seeds: Sequence[int] | None = None,
                   from_late_sam: Path | None = None, sam_epochs: int | None = None) -> dict:
    """Train (or load) the pair per seed, interpolate, write JSON + figure."""
    study = late_sam.SCALE_PRESETS[scale]
    seeds = tuple(seeds) if seeds else study.seeds[:1]
    sam_epochs = sam_epochs or PAIR_SAM_EPOCHS[scale]
    if not 0 < sam_epochs < study.total_epochs:
        raise ValueError(f"sam_epochs must be in (0, {study.total_epochs}), got {sam_epochs}")
    workdir = common.prepare_workdir(workdir)
    per_seed = {}
    with common.Timer() as timer:
        for seed in seeds:
            if from_late_sam is not None:
                pair = load_pair(from_late_sam, seed, sam_epochs)
            else:
                pair = train_pair(study, sam_epochs, seed, workdir / f"seed{seed}")
            per_seed[seed] = interpolation_study(study, *pair, examples=LOSS_EXAMPLES[scale])
        figure = plot_interpolation(per_seed, workdir / "fig4c_same_valley.png")
    summary_keys = ("barrier", "barrier_above_max_endpoint", "loss_sgd_to_sam", "loss_sgd",
                    "lpp_at_sgd_to_sam", "lpp_at_sgd", "lpp_spearman_on_0_1")
    results = {
        "per_seed": {str(s): r for s, r in per_seed.items()},
        "aggregate": common.aggregate_seeds([{k: r[k] for k in summary_keys}
                                             for r in per_seed.values()]),
        "claim": {
            "lpp_larger_at_sgd_all_seeds": all(r["lpp_increasing"] for r in per_seed.values()),
            "max_barrier": max(r["barrier"] for r in per_seed.values()),
        },
    }
    config = {"study": study, "sam_epochs": sam_epochs, "seeds": seeds,
              "from_late_sam": from_late_sam, "lambdas": "linspace(-0.2, 1.2, 40)", "h": 0.1}
    common.write_results(workdir, "same_valley", scale, config, results, timer.seconds,
                         [figure])
    results["wall_time_s"] = timer.seconds
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    parser = common.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--from-late-sam", type=Path, default=None,
                        help="reuse the runs of a finished late_sam workdir")
    parser.add_argument("--sam-epochs", type=int, default=None,
                        help="SAM epochs at the end of θ_SGD→SAM (default per scale)")
    args = parser.parse_args(argv)
    results = run_experiment(args.scale, args.workdir, args.seeds, args.from_late_sam,
                             args.sam_epochs)
    for seed, r in results["per_seed"].items():
        print(f"seed {seed}: loss θ_SGD→SAM {r['loss_sgd_to_sam']:.4g}, θ_SGD {r['loss_sgd']:.4g}, "
              f"barrier {r['barrier']:.4g}; L'' at λ=0 (late SAM) {r['lpp_at_sgd_to_sam']:.4g} "
              f"vs λ=1 (SGD) {r['lpp_at_sgd']:.4g}; Spearman(L'', λ) on [0,1] "
              f"{r['lpp_spearman_on_0_1']:.2f}")
    print("claim:", results["claim"], f"wall time {results['wall_time_s']:.0f} s")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
