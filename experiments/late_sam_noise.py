"""Late-phase SAM under label noise: does a little SAM at the end reach full SAM's accuracy?

The accuracy half of Zhou et al. (ICLR 2025, papers.md §2), "a few epochs of SAM at
the end of SGD training reach (nearly) the test accuracy of full SAM", tested where
it can be resolved. On clean MNIST-1D (``late_sam``) full SAM beats full SGD by
+0.50 ± 1.05 % over 3 seeds on 1,000 test examples: within noise, so no late-SAM run
can be told apart from either end. Here the training labels carry symmetric label
noise (test labels clean), where SAM's advantage over SGD is large — Foret et al.
(ICLR 2021, §"robustness to label noise") and Baek, Kolter & Raghunathan ("Why is
SAM robust to label noise?", ICLR 2024), both **[recalled]**, not in papers.md —
and ``label_noise`` measured +7.8 pp (40 % noise, 5 seeds) on this dataset and model.
The label-noise setting is OURS: the late-phase SAM paper uses clean CIFAR.

Protocol:

* Pilot (``--pilot``): full SGD vs full SAM per noise rate and ρ on 2 pilot seeds
  (100, 101: not the study's), trained on the training split minus 10 % held out
  and scored on that validation part with its (noisy) labels; the rule
  (``choose_setting``): per noise rate the ρ with the highest SAM validation
  accuracy, then the noise rate with the largest SAM − SGD validation gain. The test
  set played no part (its accuracy is recorded "not used").
* Study, per seed s (label noise drawn with seed s; SGD and SAM share the init, the
  flipped set and the data order, so differences are paired by seed): full SGD and
  full SAM keeping checkpoints, then SGD→SAM runs (SAM in the last k epochs) and
  SAM→SGD runs (SAM in the first k) branched from them with ``init_from`` /
  ``init_step`` (``late_sam.make_train_config``: momentum reset at the switch, the
  schedule on the global epoch). Records as ``late_sam.run_seed`` plus memorization
  (flipped training examples predicted as their noisy label).
* The rule (``smallest_matching_proportion``): a late-SAM proportion p "reaches full
  SAM" when d = acc(SGD→SAM p) − acc(full SAM), paired by seed, has mean(d) ≥
  −SE(d), SE = std(d)/√n. Reported: the smallest such p and its cost in gradient
  evaluations relative to full SGD, 1 + p (a SAM step = 2; the engine's counts agree).
  The claim holds when full SAM − full SGD > 2 paired SE and the smallest p is ≤
  ``late_sam.FEW_EPOCHS`` (0.25).

Commands::

    python -m experiments.late_sam_noise --scale cpu --workdir runs/late_sam_noise_cpu
    python -m experiments.late_sam_noise --pilot --scale cpu --workdir runs/late_sam_noise_pilot_cpu

Runtime on the shared 2-core CPU: cpu preset (5 seeds × 7 runs = 35 runs) 28 min 41 s
wall under a load average of 14-23 from other engineers' jobs (the process got 30 % of
the machine), 8 min 50 s of CPU time (508 s user + 22 s sys: our idle-machine
estimate); pilot (12 runs) 10 min 15 s wall under load ~15-20; tiny ~1-2 min under
load (compilation; 25-30 s of CPU); paper (CIFAR-10, WRN-16-8, 200 epochs, 5 seeds ×
8 runs ≈ 5 × 5.8 full-SGD-run equivalents): ~2 GPU-days (estimate, not run).

Result at cpu scale (MNIST-1D 8,000 train / 12,000 test, 40 % label noise, cnn1d width
64, T = 30, ρ = 0.1, seeds 0-4): full SAM 88.11 % vs full SGD 80.62 % test accuracy,
SAM − SGD = +7.49 ± 0.33 % (paired SE; 95 % CI [+6.57, +8.41]): resolved. SGD→SAM
with SAM in the last 3 / 10 / 20 / 40 % of the epochs: 81.09 / 81.87 / 82.49 / 83.10 %,
i.e. 6 / 17 / 25 / 33 % of SAM's gain (each gain over SGD resolved), all 5-7 points
(15-20 SE) below full SAM: no proportion tried reaches full SAM, so the accuracy claim
did NOT hold here. SAM in the first 20 % then SGD: 84.55 % (53 % of the gain). Late
SAM recovers 20-50 % of SAM's λ_max reduction. Caveat: with the WRN step schedule the
late phase runs at lr 0.002, Σ lr·steps of the last 20 % = 1.5 vs ~39 for the paper's
Fig. 1 late phase (25 CIFAR epochs at lr 0.004). Table: docs/experiments.md.

Ablation, learning-rate schedule (``--schedule constant``: lr 0.05 throughout, so the
switch changes only the optimizer; Σ lr·steps of the last 20 % = 37.5; our choice, not
the paper's)::

    python -m experiments.late_sam_noise --scale cpu --schedule constant \
        --workdir runs/late_sam_noise_constant

16 min 56 s wall under a load average of 16-27 (54 % of a core), 530 s user + 24 s sys
CPU. Seeds 0-4: full SGD 65.69 %, full SAM 78.72 % (SAM − SGD = +13.02 ± 0.45 %, paired
SE); SAM in the last 3 / 10 / 20 / 40 %: 68.59 / 69.76 / 70.11 / 71.04 %, i.e. 22 / 31 /
34 / 41 % of SAM's gain, 7.7-10.1 points (≥ 12 SE) below full SAM: the claim does not
hold with a large late learning rate either (same with the mean of the last 3 epochs'
test accuracy, which fluctuates by ~2 points per epoch at constant lr).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments import common
from experiments import late_sam
from experiments.late_sam import StudyConfig

EXPERIMENT = "late_sam_noise"
#: Gradient evaluations of one SAM step relative to one SGD step (ascent + descent).
SAM_STEP_COST = 2.0


# ----------------------------------------------------------------------- the pilot

@dataclasses.dataclass(frozen=True)
class PilotConfig:
    """The quick pilot that chose the noise rate and ρ of the study.

    Full SGD vs full SAM (each ρ) per noise rate and seed, trained on the training
    split minus a held-out validation part and scored on that validation part. The
    validation labels are as noisy as the training labels (the noise is drawn before
    the carve, ``get_dataset``), as they would be in practice; their clean labels are
    reported beside them but not used to choose. Test accuracy is recorded for
    information only and is not used to choose anything.

    Attributes:
      study: the training recipe (dataset, model, epochs, ``train``); its ``rho``,
        its noise rate and its switching grid are ignored.
      noise_rates: symmetric label-noise fractions of the training labels to try.
      rhos: SAM radii to try.
      seeds: pilot seeds (disjoint from the study's seeds, so that the study's
        numbers are not the ones the choice was made on).
      validation_fraction, validation_seed: the held-out part of the training split.
    """

    study: StudyConfig
    noise_rates: tuple[float, ...]
    rhos: tuple[float, ...]
    seeds: tuple[int, ...]
    validation_fraction: float = 0.1
    validation_seed: int = 0


def noisy_dataset_kwargs(study: StudyConfig, seed: int) -> dict:
    """The study's dataset options with the label noise drawn with the run's seed."""
    kwargs = dict(study.dataset_kwargs)
    if kwargs.get("label_noise"):
        kwargs["label_noise_seed"] = seed
    return kwargs


def _clean_copy(dataset):
    """The same examples with their clean labels (``per_example["clean_y"]``)."""
    clean = dataset.per_example.get("clean_y", dataset.y)
    return dataclasses.replace(dataset, y=np.asarray(clean, dtype=np.int32))


def run_pilot(pilot: PilotConfig, workdir: Path, progress: common.RunProgress | None = None
              ) -> list[dict]:
    """Train the pilot grid; one record per (noise, seed, optimizer, ρ)."""
    from sam_jax.data import get_dataset
    from sam_jax.models import get_model
    from sam_jax.train import run

    base = pilot.study
    records = []
    for noise in pilot.noise_rates:
        for seed in pilot.seeds:
            kwargs = {**base.dataset_kwargs, "label_noise": noise, "label_noise_seed": seed,
                      "validation_fraction": pilot.validation_fraction,
                      "validation_seed": pilot.validation_seed}
            val = get_dataset(base.dataset, "validation", **kwargs)
            val_clean = _clean_copy(val)
            model = get_model(base.model, val.num_classes, **base.model_kwargs)
            study = dataclasses.replace(base, dataset_kwargs=kwargs)
            for opt, rho in [("sgd", None)] + [("sam", r) for r in pilot.rhos]:
                name = f"noise{noise:g}_seed{seed}_{opt}" + ("" if rho is None else f"_rho{rho:g}")
                config = late_sam.make_train_config(
                    dataclasses.replace(study, rho=rho or base.rho), workdir / name,
                    f"{opt}:{base.total_epochs}", seed)
                config = dataclasses.replace(config, lambda_max_every=0)
                result = run(config)
                rec = {"noise": noise, "seed": seed, "optimizer": opt, "rho": rho,
                       "val_acc_noisy_labels": common.evaluate(model, result.variables, val)["acc"],
                       "val_acc_clean_labels": common.evaluate(model, result.variables,
                                                               val_clean)["acc"],
                       "test_acc": result.history[-1]["test_acc"]}
                records.append(rec)
                if progress is not None:
                    progress.finished(f"pilot noise {noise:.0%} seed {seed} {opt.upper()}"
                                      + ("" if rho is None else f" ρ={rho:g}")
                                      + f": val acc {rec['val_acc_noisy_labels']:.4f}",
                                      reused=result.resumed_from >= base.total_epochs)
    return records


def pilot_summary(records: Sequence[dict]) -> list[dict]:
    """Mean over pilot seeds per (noise, optimizer, ρ), with SAM − SGD paired by seed."""
    rows = []
    keys = sorted({(r["noise"], r["optimizer"], r["rho"] or 0.0) for r in records},
                  key=lambda k: (k[0], k[1] != "sgd", k[2]))  # SGD first per noise rate
    for noise, opt, rho in keys:
        group = [r for r in records if r["noise"] == noise and r["optimizer"] == opt
                 and (r["rho"] or 0.0) == rho]
        sgd = {r["seed"]: r for r in records if r["noise"] == noise and r["optimizer"] == "sgd"}
        row = {"noise": noise, "optimizer": opt, "rho": rho if opt == "sam" else None,
               "n": len(group)}
        for key in ("val_acc_noisy_labels", "val_acc_clean_labels", "test_acc"):
            row[key] = common.mean_std(r[key] for r in group)
        row["val_gain_over_sgd"] = common.mean_std(
            r["val_acc_noisy_labels"] - sgd[r["seed"]]["val_acc_noisy_labels"] for r in group)
        rows.append(row)
    return rows


def choose_setting(summary: Sequence[dict]) -> dict:
    """The pilot's rule, on validation accuracy with noisy labels only.

    Per noise rate, ρ* = the ρ with the highest mean validation accuracy of full SAM;
    then the noise rate whose SAM(ρ*) − SGD validation gain (mean over the pilot seeds)
    is largest. Test accuracy plays no part.
    """
    best = {}
    for row in summary:
        if row["optimizer"] != "sam":
            continue
        current = best.get(row["noise"])
        if current is None or row["val_acc_noisy_labels"]["mean"] > \
                current["val_acc_noisy_labels"]["mean"]:
            best[row["noise"]] = row
    if not best:
        raise ValueError("the pilot has no SAM runs")
    chosen = max(best.values(), key=lambda r: r["val_gain_over_sgd"]["mean"])
    return {"noise": chosen["noise"], "rho": chosen["rho"],
            "val_gain_over_sgd": chosen["val_gain_over_sgd"]["mean"],
            "best_rho_per_noise": {str(n): r["rho"] for n, r in sorted(best.items())}}


def format_pilot(summary: Sequence[dict]) -> str:
    header = ["noise", "optimizer", "ρ", "val acc % (noisy labels)", "val acc % (clean labels)",
              "SAM − SGD val % (noisy)", "test acc % (not used)"]
    table = [[f"{100 * r['noise']:.0f} %", r["optimizer"].upper(),
              "—" if r["rho"] is None else f"{r['rho']:g}",
              common.fmt_mean_std(r["val_acc_noisy_labels"], 2, 100),
              common.fmt_mean_std(r["val_acc_clean_labels"], 2, 100),
              "—" if r["optimizer"] == "sgd" else common.fmt_mean_std(r["val_gain_over_sgd"], 2, 100),
              common.fmt_mean_std(r["test_acc"], 2, 100)] for r in summary]
    return common.format_table(header, table)


# ------------------------------------------------------------------------ the study

RECORD_FILE = "late_sam_noise_record.json"


def _runs_of_seed(study: StudyConfig) -> list[tuple[str, str, int]]:
    """(name, direction, SAM epochs) of every run of one seed, in training order."""
    T = study.total_epochs
    runs = [("sgd", "baseline", 0), ("sam", "baseline", T)]
    runs += [(f"sgd_to_sam_{k}", "sgd_to_sam", k) for k in sorted(study.sgd_to_sam_epochs)]
    runs += [(f"sam_to_sgd_{k}", "sam_to_sgd", k) for k in sorted(study.sam_to_sgd_epochs)]
    return runs


def run_seed(study: StudyConfig, seed: int, workdir: Path,
             progress: common.RunProgress | None = None) -> dict:
    """All runs of one seed, with ``late_sam``'s records plus memorization.

    The same runs as ``late_sam.run_seed`` (full SGD and full SAM keep checkpoints at
    the switch points; the switched runs branch from them with ``init_from`` /
    ``init_step``; ``late_sam.make_train_config``), with three additions that
    ``late_sam.run_seed`` lacks: the label noise is drawn with the run's seed,
    progress is reported per run, and a finished run (its record file) is reused.

    Record keys: those of ``late_sam.run_seed`` (direction, sam_epochs,
    sam_proportion, test_acc, train_acc and gen_gap on the *noisy* training labels,
    lambda_max, lambda_2, grad_evals, own_grad_evals) plus ``train_acc_clean`` (on the
    clean labels), ``memorized`` (flipped examples predicted as their noisy label) and
    ``flipped_as_clean`` (predicted as their clean label).
    """
    from sam_jax.data import get_dataset
    from sam_jax.models import get_model
    from sam_jax.train import run

    T = study.total_epochs
    study = dataclasses.replace(study, dataset_kwargs=noisy_dataset_kwargs(study, seed))
    train_ds = get_dataset(study.dataset, "train", **study.dataset_kwargs)
    model = get_model(study.model, train_ds.num_classes, **study.model_kwargs)
    flipped = np.flatnonzero(train_ds.per_example.get("noisy", np.zeros(len(train_ds), bool)))
    root = workdir / f"seed{seed}"
    sgd_points, sam_points = study.switch_points()

    records: dict[str, dict] = {}
    for name, direction, k in _runs_of_seed(study):
        run_dir = root / name
        record_path = run_dir / RECORD_FILE
        if record_path.exists():
            records[name] = json.loads(record_path.read_text())
            if progress is not None:
                progress.finished(f"seed {seed} {_label(name, k, T)}", reused=True)
            continue
        prefix = 0.0
        if name == "sgd":
            config = late_sam.make_train_config(study, run_dir, f"sgd:{T}", seed,
                                                keep_epochs=sgd_points)
        elif name == "sam":
            config = late_sam.make_train_config(study, run_dir, f"sam:{T}", seed,
                                                keep_epochs=sam_points)
        elif direction == "sgd_to_sam":
            t = T - k
            config = late_sam.make_train_config(study, run_dir, f"sgd:{t},sam:{k}", seed,
                                                init_from=root / "sgd", init_step=t)
            prefix = records["sgd"]["grad_evals_by_epoch"][t - 1]
        else:
            config = late_sam.make_train_config(study, run_dir, f"sam:{k},sgd:{T - k}", seed,
                                                init_from=root / "sam", init_step=k)
            prefix = records["sam"]["grad_evals_by_epoch"][k - 1]
        result = run(config)
        last = result.history[-1]
        train = common.evaluate(model, result.variables, train_ds)
        record = {
            "direction": direction, "sam_epochs": k, "sam_proportion": k / T,
            "test_acc": last["test_acc"], "train_acc": train["acc"],
            "train_loss": train["loss"], "gen_gap": train["acc"] - last["test_acc"],
            "train_acc_clean": common.evaluate(model, result.variables,
                                               _clean_copy(train_ds))["acc"],
            "lambda_max": last["lambda_max"], "lambda_2": last["lambda_2"],
            "grad_evals": result.grad_evals, "own_grad_evals": result.grad_evals - prefix,
            "label_noise_seed": study.dataset_kwargs.get("label_noise_seed"),
        }
        if flipped.size:
            subset = train_ds.take(flipped)
            record["memorized"] = common.evaluate(model, result.variables, subset)["acc"]
            record["flipped_as_clean"] = common.evaluate(model, result.variables,
                                                         _clean_copy(subset))["acc"]
        if name in ("sgd", "sam"):
            by_epoch = {h["epoch"]: h["grad_evals"] for h in result.history}
            record["grad_evals_by_epoch"] = [by_epoch[e] for e in range(T)]
        common.write_json(record_path, record)
        records[name] = record
        if progress is not None:
            progress.finished(f"seed {seed} {_label(name, k, T)}: test acc "
                              f"{record['test_acc']:.4f}")
    return records


def _label(name: str, k: int, T: int) -> str:
    if name == "sgd":
        return "full SGD"
    if name == "sam":
        return "full SAM"
    if name.startswith("sgd_to_sam"):
        return f"SGD→SAM (SAM in the last {k}/{T} epochs)"
    return f"SAM→SGD (SAM in the first {k}/{T} epochs)"


# ---------------------------------------------------------------------- statistics

def gradient_cost_rel_sgd(sam_proportion: float, sam_step_cost: float = SAM_STEP_COST) -> float:
    """Gradient evaluations of a run with SAM in a ``sam_proportion`` of its epochs,
    relative to full SGD: ``(1 − p) · 1 + p · c`` (c = 2 for SAM)."""
    if not 0.0 <= sam_proportion <= 1.0:
        raise ValueError(f"sam_proportion must be in [0, 1], got {sam_proportion}")
    return 1.0 + sam_proportion * (sam_step_cost - 1.0)


def paired_se(a: Sequence[float], b: Sequence[float]) -> dict:
    """``a − b`` paired by seed: mean, std, n, standard error std/√n (NaN for n < 2)."""
    stats = common.paired_difference(a, b)
    stats["se"] = stats["std"] / math.sqrt(stats["n"]) if stats["n"] > 1 else float("nan")
    return stats


def within_one_se(late: Sequence[float], full_sam: Sequence[float]) -> dict:
    """Is a late-SAM run's test accuracy within one standard error of full SAM's?

    Criterion: with d = late − full SAM paired by seed, ``mean(d) ≥ −SE(d)``
    (SE = std(d)/√n): late SAM is at most one standard error below full SAM (being
    above full SAM counts as reaching it). Undefined (False) with fewer than 2 seeds.
    """
    diff = paired_se(late, full_sam)
    diff["within"] = bool(math.isfinite(diff["se"]) and diff["mean"] >= -diff["se"])
    return diff


def smallest_matching_proportion(proportions: Sequence[float],
                                 late_acc: Sequence[Sequence[float]],
                                 full_sam_acc: Sequence[float]) -> dict:
    """The smallest late-SAM proportion within one SE of full SAM (``within_one_se``).

    Args:
      proportions: (P,) SAM proportions of the SGD→SAM runs.
      late_acc: (P, seeds) their test accuracies.
      full_sam_acc: (seeds,) full SAM's test accuracies, same seed order.

    Returns:
      ``{"per_proportion": [...], "smallest": p or None, "cost_rel_sgd": 1 + p or None,
      "all_larger_within": whether every larger proportion is within too}``.
    """
    per = []
    for p, acc in sorted(zip(proportions, late_acc), key=lambda t: t[0]):
        per.append({"sam_proportion": float(p), **within_one_se(acc, full_sam_acc)})
    hits = [row["sam_proportion"] for row in per if row["within"]]
    smallest = min(hits) if hits else None
    return {
        "per_proportion": per, "smallest": smallest,
        "cost_rel_sgd": None if smallest is None else gradient_cost_rel_sgd(smallest),
        "all_larger_within": None if smallest is None else all(
            row["within"] for row in per if row["sam_proportion"] >= smallest),
    }


def analyse(study: StudyConfig, per_seed: dict[int, dict]) -> dict:
    """Rows (``late_sam.aggregate`` plus memorization) and the claim's verdicts."""
    seeds = sorted(per_seed)
    T = study.total_epochs
    acc = lambda name: [per_seed[s][name]["test_acc"] for s in seeds]
    rows = late_sam.aggregate(study, per_seed)
    gain = paired_se(acc("sam"), acc("sgd"))
    for row in rows:
        name = row["run"]
        row["vs_full_sam"] = within_one_se(acc(name), acc("sam"))
        row["vs_full_sgd"] = paired_se(acc(name), acc("sgd"))
        row["share_of_sam_gain"] = (row["vs_full_sgd"]["mean"] / gain["mean"]
                                    if gain["mean"] > 0 else None)
        row["grad_evals_rel_sgd_formula"] = gradient_cost_rel_sgd(row["sam_proportion"])
        for key in ("memorized", "flipped_as_clean", "train_acc_clean"):
            if all(key in per_seed[s][name] for s in seeds):
                row[key] = common.mean_std(per_seed[s][name][key] for s in seeds)
    late = sorted(study.sgd_to_sam_epochs)
    match = smallest_matching_proportion(
        [k / T for k in late], [acc(f"sgd_to_sam_{k}") for k in late], acc("sam"))
    early = sorted(study.sam_to_sgd_epochs)
    early_match = smallest_matching_proportion(
        [k / T for k in early], [acc(f"sam_to_sgd_{k}") for k in early], acc("sam"))
    resolvable = bool(math.isfinite(gain["se"]) and gain["mean"] > 2 * gain["se"])
    claim = {
        "n_seeds": len(seeds),
        "sam_minus_sgd": gain,
        "sam_beats_sgd_by_2se": resolvable,
        "sgd_to_sam": match,
        "sam_to_sgd": early_match,
        "few_epochs": late_sam.FEW_EPOCHS,
        # The claim: a late SAM phase of at most FEW_EPOCHS of training reaches full
        # SAM's test accuracy (within 1 paired SE), in a setting where SAM's gain over
        # SGD is resolved (> 2 paired SE).
        "late_sam_reaches_full_sam": bool(resolvable and match["smallest"] is not None
                                          and match["smallest"] <= late_sam.FEW_EPOCHS),
    }
    return {"rows": rows, "claim": claim}


def format_rows(rows: Sequence[dict]) -> str:
    header = ["run", "SAM epochs", "SAM prop.", "grad evals / SGD", "test acc %",
              "Δ vs full SAM % (± SE)", "within 1 SE", "share of SAM gain",
              "memorized %", "λ_max"]
    order = ([r for r in rows if r["run"] == "sgd" and r["direction"] == "sgd_to_sam"]
             + [r for r in rows if r["direction"] == "sgd_to_sam" and r["run"] not in ("sgd", "sam")]
             + [r for r in rows if r["direction"] == "sam_to_sgd" and r["run"] not in ("sgd", "sam")]
             + [r for r in rows if r["run"] == "sam" and r["direction"] == "sgd_to_sam"])
    names = {"sgd": "full SGD", "sam": "full SAM"}
    table = []
    for r in order:
        d = r["vs_full_sam"]
        share = r["share_of_sam_gain"]
        table.append([
            names.get(r["run"], "SGD→SAM" if r["direction"] == "sgd_to_sam" else "SAM→SGD"),
            r["sam_epochs"], f"{r['sam_proportion']:.2f}", f"{r['grad_evals_rel_sgd']:.2f}",
            common.fmt_mean_std(r["test_acc"], 2, 100),
            "—" if r["run"] == "sam" else f"{100 * d['mean']:+.2f} ± {100 * d['se']:.2f}",
            "—" if r["run"] == "sam" else ("yes" if d["within"] else "no"),
            "—" if share is None or r["run"] in ("sgd", "sam") else f"{int(round(100 * share))} %",
            common.fmt_mean_std(r["memorized"], 1, 100) if "memorized" in r else "—",
            common.fmt_mean_std(r["lambda_max"], 2)])
    return common.format_table(header, table)


def verdict_lines(claim: dict) -> list[str]:
    n = claim["n_seeds"]
    g = claim["sam_minus_sgd"]
    m = claim["sgd_to_sam"]
    yes = lambda b: "yes" if b else "no"
    lines = [f"full SAM − full SGD > 2 SE (paired over {n} seeds): "
             f"{yes(claim['sam_beats_sgd_by_2se'])}, {100 * g['mean']:+.2f} ± "
             f"{100 * g['se']:.2f} % (SE; 95 % CI [{100 * g['ci_low']:+.2f}, "
             f"{100 * g['ci_high']:+.2f}])"]
    if m["smallest"] is None:
        lines.append("smallest SGD→SAM proportion within 1 SE of full SAM "
                     "(mean(late − SAM) ≥ −SE, paired): none of the proportions tried")
    else:
        lines.append(f"smallest SGD→SAM proportion within 1 SE of full SAM "
                     f"(mean(late − SAM) ≥ −SE, paired): {m['smallest']:.2f} "
                     f"(SAM in the last {100 * m['smallest']:.0f} % of epochs), costing "
                     f"{m['cost_rel_sgd']:.2f}× full SGD's gradient evaluations (full SAM: "
                     f"{gradient_cost_rel_sgd(1.0):.2f}×); all larger proportions within too: "
                     f"{yes(m['all_larger_within'])}")
    e = claim["sam_to_sgd"]
    if e["per_proportion"]:
        lines.append("SAM→SGD (SAM first) within 1 SE of full SAM: " + ", ".join(
            f"prop. {p['sam_proportion']:.2f}: {yes(p['within'])}" for p in e["per_proportion"]))
    lines.append(f"late SAM (≤ {claim['few_epochs']:.0%} of epochs) reaches full SAM's test "
                 f"accuracy (within 1 paired SE, with SAM − SGD > 2 SE): "
                 f"{yes(claim['late_sam_reaches_full_sam'])}")
    return lines


# -------------------------------------------------------------------------- figure

def plot_study(study: StudyConfig, per_seed: dict[int, dict], path, scale: str) -> str:
    """Three panels against the SAM proportion p: test accuracy (95 % t-bands), the
    test-accuracy difference to full SAM paired by seed (± 1 SE: the selection rule)
    and λ_max, with full SGD / full SAM as horizontal references."""
    plt = common.pyplot()
    seeds = sorted(per_seed)
    T = study.total_epochs
    colors = {"sgd": common.PALETTE[0], "sam": common.PALETTE[1],
              "sgd_to_sam": common.PALETTE[2], "sam_to_sgd": common.PALETTE[3]}
    curves = [(d, ks, text) for d, ks, text in (
        ("sgd_to_sam", sorted(study.sgd_to_sam_epochs), "SGD→SAM (SAM in the last p)"),
        ("sam_to_sgd", sorted(study.sam_to_sgd_epochs), "SAM→SGD (SAM in the first p)")) if ks]
    value = lambda name, key: np.array([per_seed[s][name][key] for s in seeds], float)
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.4))
    for ax, (key, label, sc) in zip(axes[[0, 2]], [("test_acc", "test accuracy (%)", 100.0),
                                                   ("lambda_max", "λ_max of the training loss (Lanczos)", 1.0)]):
        for name, text in (("sgd", "full SGD (cost 1×)"), ("sam", "full SAM (cost 2×)")):
            v = value(name, key) * sc
            mean, half = v.mean(), common.ci_half_width(v)
            ax.axhline(mean, color=colors[name], lw=1.2, ls="--", label=text)
            ax.axhspan(mean - half, mean + half, color=colors[name], alpha=0.12, lw=0)
        for direction, ks, text in curves:
            runs = np.stack([value(f"{direction}_{k}", key) for k in ks], axis=1) * sc
            if len(ks) > 1:
                common.plot_band(ax, [k / T for k in ks], runs, label=text,
                                 color=colors[direction], marker="o")
            else:  # one point: its 95 % t-interval as an error bar (a band has no width)
                ax.errorbar([ks[0] / T], runs.mean(axis=0), yerr=[common.ci_half_width(runs[:, 0])],
                            fmt="o", capsize=3, color=colors[direction], label=text + " (95 % CI)")
        ax.set_ylabel(label)
    axes[0].set_title("test accuracy (band: 95 % t-interval over seeds)")
    axes[2].set_title("sharpness of the final model")
    # Middle: the selection rule, late − full SAM paired by seed, mean ± 1 SE.
    ax = axes[1]
    sam_acc = value("sam", "test_acc")
    ax.axhline(0.0, color=colors["sam"], lw=1.2, ls="--", label="full SAM")
    d = (value("sgd", "test_acc") - sam_acc) * 100
    se = d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else 0.0
    ax.axhline(d.mean(), color=colors["sgd"], lw=1.2, ls="--", label="full SGD (± 1 SE)")
    ax.axhspan(d.mean() - se, d.mean() + se, color=colors["sgd"], alpha=0.12, lw=0)
    for direction, ks, text in curves:
        diffs = np.stack([(value(f"{direction}_{k}", "test_acc") - sam_acc) * 100 for k in ks])
        ses = diffs.std(axis=1, ddof=1) / math.sqrt(diffs.shape[1]) if diffs.shape[1] > 1 \
            else np.zeros(len(ks))
        ax.errorbar([k / T for k in ks], diffs.mean(axis=1), yerr=ses, fmt="o-", capsize=3,
                    color=colors[direction], label=text + " ± 1 SE")
    ax.set_ylabel("test acc − full SAM, paired by seed (%)")
    ax.set_title("the rule: within 1 SE of full SAM (dashed 0)?")
    ax.legend(loc="lower right")
    for ax in axes:
        ax.set_xlim(0, 1)
        ax.set_xlabel("SAM proportion of the epochs p")
        top = ax.secondary_xaxis("top", functions=(lambda p: 1 + p, lambda c: c - 1))
        top.set_xlabel("gradient evaluations / full SGD (1 + p)")
    axes[0].legend(loc="lower right")
    noise = study.dataset_kwargs.get("label_noise", 0.0)
    width = study.model_kwargs.get("width")
    dataset = {"mnist1d": "MNIST-1D", "cifar10": "CIFAR-10"}.get(study.dataset, study.dataset)
    fig.suptitle(f"{dataset} with {100 * noise:.0f} % symmetric label noise on the training "
                 f"labels (test labels clean), {study.model}" + (f" width {width}" if width else "")
                 + f", T = {T} epochs, ρ = {study.rho:g}, "
                 f"{study.train.get('schedule', 'cosine')} lr schedule (peak "
                 f"{study.train.get('lr', 0.1):g}), seeds {seeds[0]}–{seeds[-1]} "
                 f"(n = {len(seeds)}){common.smoke_tag(scale)}\n"
                 f"left/right: {common.BAND_CAPTION}; dashed lines: full SGD / full SAM with "
                 f"their 95 % t-interval shaded", fontsize=9)
    fig.tight_layout()
    return common.save_figure(fig, path)


# ------------------------------------------------------------------------- presets

_CPU_RECIPE = dict(
    # 20,000 MNIST-1D signals split 40/60: 8,000 train (as in label_noise) and a
    # 12,000-example test set (label_noise: 2,000; late_sam: 1,000), so that the test
    # set's sampling error (~0.3 % at 88 %) is small next to the seed-to-seed spread.
    dataset="mnist1d", model="cnn1d", model_kwargs={"width": 64}, total_epochs=30,
    # SAM in the last 1, 3, 6, 12 epochs (3.3, 10, 20, 40 %); SAM in the first 6 (20 %)
    # then SGD (one point only: a SAM→SGD run costs nearly a full run).
    sgd_to_sam_epochs=(1, 3, 6, 12), sam_to_sgd_epochs=(6,),
    # label_noise's MNIST-1D recipe (chosen there by trials, see docs/experiments.md):
    # cnn1d width 64 (memorizes noisy labels; width 25 barely does), batch 64, lr 0.05,
    # momentum 0.9, wd 5e-4, and the late-phase SAM paper's WRN step schedule
    # (lr ×0.2 after 30 %, ×0.04 after 60 % of T), T = 30 as in label_noise (a first
    # pilot at T = 20 gave SAM − SGD of only +0.5 to +1.5 % test accuracy).
    train={"lr": 0.05, "batch_size": 64, "schedule": "wrn_step", "momentum": 0.9,
           "weight_decay": 5e-4},
    # λ_max: late_sam's protocol (Lanczos, BN mode "batch"; cnn1d has no BN) on the
    # first 2,000 training examples (late_sam: 4,000) to save time.
    lambda_examples=2000, lambda_iters=20)

SCALE_PRESETS: dict[str, StudyConfig] = {
    # Seconds: the CI smoke test (noise, branching in both directions, reuse).
    "tiny": StudyConfig(
        dataset="mnist1d", dataset_kwargs={"num_samples": 600, "label_noise": 0.4},
        model="cnn1d", model_kwargs={"width": 8}, total_epochs=4, sgd_to_sam_epochs=(1, 2),
        sam_to_sgd_epochs=(1,), rho=0.05, seeds=(0, 1),
        train={"lr": 0.05, "batch_size": 32, "steps_per_epoch": 4, "schedule": "wrn_step"},
        lambda_examples=100, lambda_iters=5),
    # Minutes on 2 CPU cores. Noise rate and ρ chosen by the pilot (PILOT_PRESETS["cpu"],
    # validation split, seeds 100-101; docs/experiments.md): 40 % noise, ρ = 0.1.
    "cpu": StudyConfig(
        dataset_kwargs={"num_samples": 20000, "train_split": 0.4, "label_noise": 0.4},
        rho=0.1, seeds=(0, 1, 2, 3, 4), **_CPU_RECIPE),
    # Configured, not run (~2 GPU-days, estimate: 5 seeds × (SGD + SAM + 4 late + 2
    # early branches) ≈ 5 × 5.8 full-SGD-run equivalents of 200 epochs of WRN-16-8).
    # The late-phase SAM paper's CIFAR-10 recipe (papers.md §2, [code]: WRN-16-8, 200
    # epochs, batch 128, momentum 0.9, label smoothing 0.1, crop + flip + Cutout 16, the
    # WRN step schedule; lr 0.1, wd 5e-4 [recalled SAM-paper defaults]) — but the
    # paper does NOT use label noise: the 40 % symmetric label noise, ρ = 0.1 and the
    # switching grid (SAM in the last 5/10/20/40 %, first 20/50 %) are OUR choices.
    # Run the pilot (``--pilot --scale paper``) first and set noise and ρ from it.
    "paper": StudyConfig(
        dataset="cifar10",
        dataset_kwargs={"crop_padding": 4, "flip": True, "cutout": 16, "label_noise": 0.4},
        model="wrn16_8", total_epochs=200, sgd_to_sam_epochs=(10, 20, 40, 80),
        sam_to_sgd_epochs=(40, 100), rho=0.1, seeds=(0, 1, 2, 3, 4),
        train={"lr": 0.1, "batch_size": 128, "schedule": "wrn_step", "momentum": 0.9,
               "weight_decay": 5e-4, "label_smoothing": 0.1},
        lambda_examples=5000, lambda_iters=20),
}


def _pilot_for(study: StudyConfig, noise_rates, rhos, seeds) -> PilotConfig:
    kwargs = {k: v for k, v in study.dataset_kwargs.items() if k != "label_noise"}
    return PilotConfig(study=dataclasses.replace(study, dataset_kwargs=kwargs),
                       noise_rates=noise_rates, rhos=rhos, seeds=seeds)


PILOT_PRESETS: dict[str, PilotConfig] = {
    "tiny": _pilot_for(SCALE_PRESETS["tiny"], (0.4,), (0.05,), (100,)),
    # 2 noise rates × (SGD + 2 ρ) × 2 seeds = 12 runs. ρ = 0.2 was dropped after the
    # first pilot (T = 20), where it collapsed at 40 % noise (docs/experiments.md).
    "cpu": _pilot_for(SCALE_PRESETS["cpu"], (0.2, 0.4), (0.05, 0.1), (100, 101)),
    "paper": _pilot_for(SCALE_PRESETS["paper"], (0.2, 0.4), (0.05, 0.1, 0.2), (100, 101)),
}


def with_schedule(study: StudyConfig, schedule: str | None) -> StudyConfig:
    """The study with its learning-rate schedule replaced (ablation ``--schedule``).

    ``None`` keeps the preset's schedule (every preset: ``wrn_step``). Everything else
    (peak lr, ρ, noise, seeds, switch points) is unchanged. Under ``constant`` the
    switch point changes only the optimizer: the late phase keeps the peak lr (cpu:
    Σ lr·steps over the last 20 % = 0.05 × 750 = 37.5, vs 1.5 under ``wrn_step`` and
    ~39 for the paper's Fig. 1 late phase). The schedule ablation is OUR choice, not
    the paper's (the paper uses the WRN step / cosine schedules).
    """
    if schedule is None or schedule == study.train.get("schedule"):
        return study
    from sam_jax.train.config import SCHEDULES

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    return dataclasses.replace(study, train={**study.train, "schedule": schedule})


# ---------------------------------------------------------------------------- main

def run_experiment(scale: str, workdir, seeds: Sequence[int] | None = None,
                   study: StudyConfig | None = None, schedule: str | None = None) -> dict:
    """Run the switching study; write ``results.json`` and the figure; return results.

    ``schedule``: replaces the preset's learning-rate schedule (``with_schedule``).
    """
    study = with_schedule(study or SCALE_PRESETS[scale], schedule)
    seeds = tuple(seeds) if seeds else study.seeds
    workdir = common.prepare_workdir(workdir)
    per_run = len(_runs_of_seed(study))
    progress = common.RunProgress(len(seeds) * per_run, EXPERIMENT)
    with common.Timer() as timer:
        per_seed = {seed: run_seed(study, seed, workdir, progress) for seed in seeds}
        analysis = analyse(study, per_seed)
        figure = plot_study(study, per_seed, workdir / f"{EXPERIMENT}.png", scale)
    own = sum(r["own_grad_evals"] for runs in per_seed.values() for r in runs.values())
    naive = sum(r["grad_evals"] for runs in per_seed.values() for r in runs.values())
    results = {
        **analysis,
        "per_seed": {str(s): runs for s, runs in per_seed.items()},
        "compute": {"study_grad_evals": own, "without_branching_grad_evals": naive,
                    "saved_by_branching": 1 - own / naive},
        "table": format_rows(analysis["rows"]),
        "verdicts": verdict_lines(analysis["claim"]),
    }
    common.write_results(workdir, EXPERIMENT, scale, {"study": study, "seeds": seeds},
                         results, timer.seconds, [figure])
    results["wall_time_s"] = timer.seconds
    return results


def run_pilot_experiment(scale: str, workdir, seeds: Sequence[int] | None = None,
                         schedule: str | None = None) -> dict:
    """The pilot (``--pilot``): SGD vs SAM per noise rate and ρ on a validation split."""
    pilot = PILOT_PRESETS[scale]
    pilot = dataclasses.replace(pilot, study=with_schedule(pilot.study, schedule))
    if seeds:
        pilot = dataclasses.replace(pilot, seeds=tuple(seeds))
    workdir = common.prepare_workdir(workdir)
    total = len(pilot.noise_rates) * len(pilot.seeds) * (1 + len(pilot.rhos))
    with common.Timer() as timer:
        records = run_pilot(pilot, workdir, common.RunProgress(total, f"{EXPERIMENT} pilot"))
    summary = pilot_summary(records)
    results = {"records": records, "summary": summary, "choice": choose_setting(summary),
               "table": format_pilot(summary)}
    common.write_results(workdir, f"{EXPERIMENT}_pilot", scale, pilot, results, timer.seconds)
    results["wall_time_s"] = timer.seconds
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    description = __doc__.splitlines()[0]
    parser = common.build_parser(description)
    parser.add_argument("--pilot", action="store_true",
                        help="run the pilot that chose noise rate and ρ (validation split) "
                             "instead of the study")
    from sam_jax.train.config import SCHEDULES

    parser.add_argument("--schedule", choices=SCHEDULES, default=None,
                        help="ablation (OUR choice, not the paper's): replace the preset's "
                             "learning-rate schedule (every preset: wrn_step, whose late phase "
                             "runs at 0.04× the peak lr); 'constant' keeps the peak lr to the "
                             "end, so the switch point changes only the optimizer; default: "
                             "the preset's")
    args = common.parse_args(description, argv, parser)
    if args.pilot:
        results = run_pilot_experiment(args.scale, args.workdir, args.seeds, args.schedule)
        print(results["table"])
        c = results["choice"]
        print(f"choice (highest SAM validation accuracy per noise rate, then the largest SAM − "
              f"SGD validation gain; noisy validation labels, test accuracy not used): noise "
              f"{c['noise']:.0%}, ρ = {c['rho']:g} (gain {100 * c['val_gain_over_sgd']:+.2f} %)")
    else:
        results = run_experiment(args.scale, args.workdir, args.seeds, schedule=args.schedule)
        preset = SCALE_PRESETS[args.scale].train.get("schedule", "cosine")
        if args.schedule and args.schedule != preset:
            print(f"learning-rate schedule: {args.schedule} (ablation; the preset's: {preset})")
        print(results["table"])
        for line in results["verdicts"]:
            print(line)
    common.print_footer(args.scale, results["wall_time_s"], args.workdir)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
