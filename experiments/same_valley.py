"""Fig. 4c of Zhou et al. (ICLR 2025): late SAM lands in the SGD solution's valley.

Reproduces "SAM efficiently selects flatter minima late in training", Fig. 4c: along
``θ_λ = (1 − λ) θ_{SGD→SAM} + λ θ_SGD`` on ``λ ∈ linspace(−0.2, 1.2, 40)`` the train
loss shows no barrier (same valley), and the second-order finite difference
``L''(θ_λ) = (L(θ_{λ+h}) + L(θ_{λ−h}) − 2 L(θ_λ)) / (2h)²`` (h = 0.1, the paper's
formula, via ``sam_jax.landscape.interpolate``) grows with λ (θ_{SGD→SAM} is flatter).

The loss along θ_λ (``--protocol``):

* ``authors`` (default; their code, papers.md §2): the model in **eval** mode, with
  the BN running mean/var interpolated linearly together with the parameters (the
  whole variables tree moves along θ_λ), on 1,000 random training images
  (``train_ds.subset(1000, seed=0)``, the same images for every pair; the seed is
  ours), plain cross entropy;
* ``batch_bn`` (this module before): BN in train mode (batch statistics of each
  1,000-example batch), the other collections held at θ_{SGD→SAM}'s, the first N
  train images (N = 4,000, the whole set, at cpu scale).

For a model without BatchNorm (the cpu preset's ``cnn1d``) the two differ only in
the images. The figure's subtitle and ``results.json`` name the protocol used.

The pair of models comes from the late-SAM study: a full SGD run and a run branched
from its checkpoint at t = T − k with SAM for the last k epochs (same seed, same
data order). By default this module trains its own pair with the ``late_sam``
preset of the same scale; ``--from-late-sam DIR`` reuses the runs of
``python -m experiments.late_sam --workdir DIR`` instead (no training).

Command::

    python -m experiments.same_valley --scale cpu --workdir runs/same_valley

Runtime on a 2-core CPU: tiny ~20-40 s; cpu 40-50 s from late_sam's runs (3 seeds,
load 12-15; 15 s when idle), ~2 min (idle) training its own pair. Result (cpu, seeds
0-2, authors' protocol): barrier 0 in every seed (same valley); L'' at late SAM vs
SGD 0.00159 / 0.00120 / 0.00062 vs 0.00113 / 0.00182 / 0.00152 — seed 0 reverses on
these 1,000 images (13 of 15 image subsets tried favour SGD); on all 4,000 images
(``--protocol batch_bn``) SGD's L'' is larger in every seed (docs/experiments.md).
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
#: Train examples of the ``batch_bn`` protocol (the first N; the whole train set at
#: cpu scale). The default ``authors`` protocol uses 1,000 random ones.
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


#: The evaluation protocols of the loss along θ_λ.
PROTOCOLS = {
    # [code] the authors' Fig. 4c script (papers.md §2): model in eval mode, BN
    # running mean/var interpolated linearly together with the parameters, 1,000
    # random training images.
    "authors": "eval mode, BN running statistics interpolated with the parameters, "
               "{n} random train images",
    # This module before (kept as an option): BN in train mode (batch statistics of
    # each 1,000-example batch, the λ_max protocol's mode), the non-parameter
    # collections of θ_SGD→SAM, the first N train images.
    "batch_bn": "BN in train mode (batch statistics), buffers of θ_SGD→SAM, the first {n} "
                "train images",
}
#: Train images of the authors' protocol [code].
AUTHORS_EXAMPLES = 1000
#: Seed of the random choice of those images (chosen by us; the same images for
#: every pair): ``train_ds.subset(n, seed=EXAMPLE_SEED)``.
EXAMPLE_SEED = 0
#: "No barrier" (chosen by us): the barrier (rise above the straight line between
#: the endpoint losses) is at most this fraction of the larger endpoint loss.
BARRIER_TOLERANCE = 0.05

_EVAL_FNS: dict = {}


def eval_mode_fns(model):
    """``(loss_fn, accuracy_fn)`` of a whole variables pytree in eval mode.

    Both take ``(variables, batch) -> (sum, count)`` with ``variables`` holding
    ``params`` and any ``batch_stats``, so that ``landscape.interpolate`` moves the
    BN running statistics along θ_λ together with the parameters. Plain cross
    entropy (no label smoothing). Cached per model (one compilation per model).
    """
    import jax.numpy as jnp
    import optax

    if model not in _EVAL_FNS:
        def loss_fn(variables, batch):
            logits = model.apply(variables, batch["x"], train=False)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
            return jnp.sum(losses), jnp.asarray(losses.shape[0], jnp.float32)

        def accuracy_fn(variables, batch):
            logits = model.apply(variables, batch["x"], train=False)
            correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
            return jnp.sum(correct), jnp.asarray(correct.shape[0], jnp.float32)

        _EVAL_FNS[model] = (loss_fn, accuracy_fn)
    return _EVAL_FNS[model]


def loss_examples(train_ds, protocol: str, examples: int | None = None,
                  example_seed: int = EXAMPLE_SEED):
    """The train examples the loss is evaluated on (un-augmented arrays).

    ``authors``: ``min(examples or 1000, N)`` random ones, ``train_ds.subset(n,
    seed=example_seed)`` (sorted indices of ``default_rng(seed).choice(N, n,
    replace=False)``); ``batch_bn``: the first ``examples`` ones.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    if protocol == "authors":
        n = min(examples or AUTHORS_EXAMPLES, train_ds.num_examples)
        return train_ds.subset(n, seed=example_seed).arrays()
    if examples is None:
        raise ValueError("the batch_bn protocol needs an explicit number of examples")
    n = min(examples, train_ds.num_examples)
    return train_ds.subset(n).arrays()


def interpolation_study(study: late_sam.StudyConfig, variables_sgd, variables_late,
                        examples: int | None = None, protocol: str = "authors",
                        h: float = 0.1, example_seed: int = EXAMPLE_SEED) -> dict:
    """Loss, accuracy and L'' along θ_λ, λ ∈ linspace(−0.2, 1.2, 40) (papers.md §2).

    Args:
      study: the study the models come from (dataset and model).
      variables_sgd, variables_late: the two models' variables.
      examples: train examples defining the loss (see :func:`loss_examples`;
        ``authors`` default 1,000).
      protocol: ``"authors"`` (default, [code]): eval mode with every variable
        collection, BN running mean/var included, interpolated along θ_λ, on
        random train images; ``"batch_bn"`` (ours before): BN in train mode
        (batch statistics of each 1,000-example batch), the other collections
        held at θ_{SGD→SAM}'s, on the first ``examples`` train images.
      h: finite-difference step (paper: 0.1).
      example_seed: seed of the random images (``authors``).

    Returns:
      dict with lambdas, losses, accuracies, second_derivative, barrier heights and
      the endpoint values; ``lpp_increasing`` says whether L'' at λ = 1 (θ_SGD)
      exceeds L'' at λ = 0 (θ_{SGD→SAM}); ``protocol`` and its description.
    """
    from sam_jax import curvature, landscape
    from sam_jax.data import get_dataset
    from sam_jax.models import get_model

    train_ds = get_dataset(study.dataset, "train", **study.dataset_kwargs)
    arrays = loss_examples(train_ds, protocol, examples, example_seed)
    n = len(arrays["y"])
    size = 1000
    batches = [{"x": arrays["x"][i:i + size], "y": arrays["y"][i:i + size]}
               for i in range(0, n, size)]
    model = get_model(study.model, train_ds.num_classes, **study.model_kwargs)
    if protocol == "authors":
        loss_fn, accuracy_fn = eval_mode_fns(model)
        point_a, point_b = dict(variables_late), dict(variables_sgd)
        if set(point_a) != set(point_b):
            raise ValueError(f"the two models have different variable collections: "
                             f"{sorted(point_a)} vs {sorted(point_b)}")
    else:
        loss_fn = curvature.flax_loss_fn(model, variables_late, bn_mode="batch")
        accuracy_fn = landscape.flax_accuracy_fn(model, variables_late, bn_mode="batch")
        point_a, point_b = variables_late["params"], variables_sgd["params"]
    result = landscape.interpolate(loss_fn, point_a, point_b, batches, metric_fn=accuracy_fn,
                                   h=h, denominator="paper")
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
        "protocol": protocol, "protocol_description": PROTOCOLS[protocol].format(n=n),
        "examples": n, "example_seed": example_seed if protocol == "authors" else None,
        "bn_mode": "running, interpolated" if protocol == "authors" else "batch",
    }


def _spearman(lambdas: np.ndarray, values: np.ndarray) -> float:
    """Rank correlation of L'' with λ on [0, 1] (1 = monotone increase)."""
    from scipy.stats import spearmanr

    inside = (lambdas >= 0) & (lambdas <= 1)
    return float(spearmanr(lambdas[inside], values[inside]).statistic)


def claim_verdict(per_seed: dict) -> dict:
    """The Fig. 4c claims per seed, with the criterion of each (``criteria``)."""
    runs = list(per_seed.values())
    no_barrier = [r["barrier"] <= BARRIER_TOLERANCE * max(r["loss_sgd"], r["loss_sgd_to_sam"])
                  for r in runs]
    return {
        "no_barrier_all_seeds": all(no_barrier),
        "lpp_larger_at_sgd_all_seeds": all(r["lpp_increasing"] for r in runs),
        "lpp_rank_increasing_all_seeds": all(r["lpp_spearman_on_0_1"] > 0 for r in runs),
        "max_barrier": max(r["barrier"] for r in runs),
        "criteria": {
            "no_barrier_all_seeds":
                f"barrier max_λ∈[0,1] L(θ_λ) − [(1−λ)L(θ_0) + λL(θ_1)] ≤ "
                f"{100 * BARRIER_TOLERANCE:.0f} % of the larger endpoint loss, every seed",
            "lpp_larger_at_sgd_all_seeds": "L'' at λ = 1 (SGD) > L'' at λ = 0 (late SAM), "
                                           "every seed",
            "lpp_rank_increasing_all_seeds": "Spearman(L'', λ) on [0, 1] > 0, every seed",
        },
    }


def format_table(per_seed: dict) -> str:
    header = ["seed", "L(θ_SGD→SAM)", "L(θ_SGD)", "barrier", "L'' at λ=0 (late SAM)",
              "L'' at λ=1 (SGD)", "Spearman(L'', λ) on [0,1]"]
    rows = [[seed, f"{r['loss_sgd_to_sam']:.4g}", f"{r['loss_sgd']:.4g}", f"{r['barrier']:.3g}",
             f"{r['lpp_at_sgd_to_sam']:.4g}", f"{r['lpp_at_sgd']:.4g}",
             f"{r['lpp_spearman_on_0_1']:.2f}"] for seed, r in per_seed.items()]
    return common.format_table(header, rows)


def format_verdict(claim: dict) -> str:
    yes = lambda v: "yes" if v else "no"
    crit = claim["criteria"]
    return "\n".join([
        f"same valley, no barrier ({crit['no_barrier_all_seeds']}): "
        f"{yes(claim['no_barrier_all_seeds'])} — largest barrier {claim['max_barrier']:.3g}",
        f"late SAM flatter along the segment ({crit['lpp_larger_at_sgd_all_seeds']}): "
        f"{yes(claim['lpp_larger_at_sgd_all_seeds'])}",
        f"L'' grows with λ ({crit['lpp_rank_increasing_all_seeds']}): "
        f"{yes(claim['lpp_rank_increasing_all_seeds'])}",
    ])


def plot_interpolation(per_seed: dict, path, title: str = "") -> str:
    """Fig. 4c: loss (top) and L'' (bottom) vs λ, one line per seed."""
    plt = common.pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    for seed, res in per_seed.items():
        top.plot(res["lambdas"], res["losses"], label=f"seed {seed}")
        bottom.plot(res["lambdas"], res["second_derivative"], label=f"seed {seed}")
    for ax in (top, bottom):
        for x in (0.0, 1.0):
            ax.axvline(x, color="gray", lw=0.8, ls=":")
    top.set_ylabel("train loss L(θ_λ)\n(cross entropy)")
    top.set_title("θ_λ = (1−λ) θ_SGD→SAM + λ θ_SGD   (dotted: λ=0 late SAM, λ=1 SGD)")
    bottom.set_title("L''(λ) = [L(θ_λ+h) + L(θ_λ−h) − 2 L(θ_λ)] / (2h)²,  h = 0.1")
    bottom.set_ylabel("L''(λ)")
    bottom.set_xlabel("λ (interpolation coefficient)")
    top.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return common.save_figure(fig, path)


def run_experiment(scale: str, workdir, seeds: Sequence[int] | None = None,
                   from_late_sam: Path | None = None, sam_epochs: int | None = None,
                   protocol: str = "authors", examples: int | None = None) -> dict:
    """Train (or load) the pair per seed, interpolate, write JSON + figure."""
    study = late_sam.SCALE_PRESETS[scale]
    seeds = tuple(seeds) if seeds else study.seeds[:1]
    sam_epochs = sam_epochs or PAIR_SAM_EPOCHS[scale]
    if not 0 < sam_epochs < study.total_epochs:
        raise ValueError(f"sam_epochs must be in (0, {study.total_epochs}), got {sam_epochs}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    if examples is None:
        examples = AUTHORS_EXAMPLES if protocol == "authors" else LOSS_EXAMPLES[scale]
    workdir = common.prepare_workdir(workdir)
    per_seed = {}
    progress = common.RunProgress(len(seeds), "same_valley")
    with common.Timer() as timer:
        for seed in seeds:
            if from_late_sam is not None:
                pair, how = load_pair(from_late_sam, seed, sam_epochs), "pair from late_sam"
            else:
                pair = train_pair(study, sam_epochs, seed, workdir / f"seed{seed}")
                how = "pair trained here"
            per_seed[seed] = interpolation_study(study, *pair, examples=examples,
                                                 protocol=protocol)
            progress.finished(f"seed {seed} ({how}): barrier {per_seed[seed]['barrier']:.3g}")
        description = per_seed[seeds[0]]["protocol_description"]
        width = study.model_kwargs.get("width")
        model = study.model + (f" (width {width})" if width else "")
        title = (f"Fig. 4c: linear interpolation — {study.dataset}, {model}, SGD→SAM with the "
                 f"last {sam_epochs} of {study.total_epochs} epochs SAM; seeds "
                 f"{', '.join(map(str, seeds))}{common.smoke_tag(scale)}\n"
                 f"loss: {description} (protocol '{protocol}'); one line per seed")
        figure = plot_interpolation(per_seed, workdir / "fig4c_same_valley.png", title)
    summary_keys = ("barrier", "barrier_above_max_endpoint", "loss_sgd_to_sam", "loss_sgd",
                    "lpp_at_sgd_to_sam", "lpp_at_sgd", "lpp_spearman_on_0_1")
    results = {
        "per_seed": {str(s): r for s, r in per_seed.items()},
        "aggregate": common.aggregate_seeds([{k: r[k] for k in summary_keys}
                                             for r in per_seed.values()]),
        "claim": claim_verdict(per_seed),
        "table": format_table(per_seed),
    }
    config = {"study": study, "sam_epochs": sam_epochs, "seeds": seeds,
              "from_late_sam": from_late_sam, "lambdas": "linspace(-0.2, 1.2, 40)", "h": 0.1,
              "protocol": protocol, "examples": examples,
              "example_seed": EXAMPLE_SEED if protocol == "authors" else None}
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
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="authors",
                        help="loss along θ_λ: 'authors' (default, their code: eval mode, BN "
                             "buffers interpolated, 1,000 random train images) or 'batch_bn' "
                             "(BN batch statistics, first N train images; this module before)")
    parser.add_argument("--examples", type=int, default=None,
                        help="train examples of the loss (default: 1000 for 'authors', the "
                             "scale's LOSS_EXAMPLES for 'batch_bn')")
    args = common.parse_args(__doc__.splitlines()[0], argv, parser)
    results = run_experiment(args.scale, args.workdir, args.seeds, args.from_late_sam,
                             args.sam_epochs, args.protocol, args.examples)
    first = next(iter(results["per_seed"].values()))
    print(f"\nloss along θ_λ: {first['protocol_description']} (protocol '{first['protocol']}')")
    print(results["table"])
    print("\nverdict (criterion in parentheses):")
    print(format_verdict(results["claim"]))
    common.print_footer(args.scale, results["wall_time_s"], args.workdir)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
