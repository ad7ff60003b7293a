"""The mechanism: signal learning vs noise memorization under SGD and SAM (Chen et al., NeurIPS 2023).

"Why does SAM generalize better than SGD?" (Chen, Zhang, Kou, Chen, Hsieh, Gu)
explains SAM's advantage on the patch data model by its perturbation: at the SAM
point W_hat = W + tau grad L_B(W) / ||grad L_B(W)||_F the ReLU units that would fit an
example's noise patch are inactive, so SAM does not memorize noise early and learns
the signal instead (papers.md §3, [recalled]). For one cell of the phase diagram
(``experiments.benign_overfitting``) inside the region where SAM beats SGD, this
tracks over iterations, for SGD and SAM, means over seeds with 95 % t-bands:

* signal learning ``max_r <w_{j,r}, j mu>`` (mean over j = +-1);
* noise memorization ``max_r <w_{y_i,r}, xi_i>`` averaged over the training examples,
  and separately over those with flipped labels (and the clean ones);
* the deactivation at the SAM point: among the (unit, example) pairs of each step's
  minibatch with ``<w_{y_i,r}, xi_i> > 0`` at W ("units that fit noise": the ReLU of
  filter r of the example's own label class is active on its noise patch, so the
  gradient grows the memorization), the fraction with ``<w_hat_{y_i,r}, xi_i> <= 0``
  at W_hat; the same for the signal patch (pairs with ``<w_{y_i,r}, yhat_i mu> > 0``)
  for contrast. For the SGD run the same quantity is measured at the point SAM
  *would* evaluate from SGD's iterate (same tau), which shows whether the effect
  needs SAM's own trajectory. Window means of numerator and denominator over
  ``eval_every`` steps;
* test error (observed labels; Bayes error p) and train error.

Training is ``sam_jax.train.grid.train_grid`` with an eval hook and a step hook
(the seeds are the cells of one compiled call per optimizer): the training math is
the grid trainer's, shared with the phase diagrams.

Command::

    python -m experiments.noise_memorization --scale cpu --workdir runs/noise_memorization_cpu

Runtime on 2 CPU cores: tiny ~1-1.5 min (compilation); cpu 1 min 17 s wall under a
load of 8-9 (27 s user CPU); paper (d = 1000 cell, 20 seeds, 2000 steps) minutes
(estimate, not run).
Result at cpu scale (n = 30, d = 200, ||mu|| = 1.2, seeds 0-9): after 500 steps SGD's
noise memorization is 5.2 vs SAM's 0.36 and SAM's signal learning 1.01 vs SGD's 0.40;
test error 0.297 (SGD) vs 0.101 (SAM, = p). At SAM's perturbed point ~100 % of the
noise-fitting units are off during the whole run (signal units: only in the first
~60 steps); from SGD's iterates the same perturbation switches off 94 % early but
only ~5 % by step 500. Tables: docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments import common

EXPERIMENT = "noise_memorization"


@dataclasses.dataclass(frozen=True)
class MechanismConfig:
    """One cell, traced over iterations for SGD and SAM.

    Data model / network [recalled, papers.md §3; template values of Kou et al. 2023]:
      num_patches P, width m, noise_std sigma_p, flip_prob p, sigma0 (init std, our choice).
    The cell (our choice, inside the region where SAM wins in the benign_overfitting
    cpu run): n, dim, signal_norm.
    Training (our choices): steps, batch_size B, lr, tau_const (tau = c m sqrt(B) /
      (P sigma_p sqrt(d)), recalled scaling), sampling, eval_every, n_test.
    """

    n: int
    dim: int
    signal_norm: float
    seeds: tuple
    steps: int = 500
    eval_every: int = 10
    batch_size: int = 10
    lr: float = 0.1
    tau_const: float = 1.0
    num_patches: int = 2
    width: int = 10
    noise_std: float = 1.0
    flip_prob: float = 0.1
    sigma0: float = 0.01
    sampling: str = "replacement"
    n_test: int = 2000

    @property
    def tau(self) -> float:
        from sam_jax.train.grid import sam_radius

        return float(sam_radius(self.dim, tau_const=self.tau_const, width=self.width,
                                batch_size=self.batch_size, num_patches=self.num_patches,
                                noise_std=self.noise_std))


SCALE_PRESETS = {
    "tiny": MechanismConfig(n=20, dim=40, signal_norm=1.0, seeds=(0, 1), steps=20, eval_every=5, n_test=200),
    # n = 30, d = 200, ||mu|| = 1.2: SGD ~0.3 test error, SAM near p in the pilot grid (docs).
    "cpu": MechanismConfig(n=30, dim=200, signal_norm=1.2, seeds=tuple(range(10)), steps=500, eval_every=10),
    "paper": MechanismConfig(n=40, dim=1000, signal_norm=1.5, seeds=tuple(range(20)), steps=2000, eval_every=20),
}


# ------------------------------------------------------------------------- hooks


def eval_hook(spec, cell, params, data) -> dict:
    """Signal learning and noise memorization of the padded cell (masked over real examples)."""
    import jax.numpy as jnp

    from sam_jax.models.patch_cnn import noise_memorization, signal_learning

    signal = signal_learning(params, data["signal"])
    noise = noise_memorization(params, data["noise"], data["y"])
    mask = data["mask"]
    flipped = mask * data["flipped"].astype(mask.dtype)
    clean = mask - flipped
    # NaN where a group is empty (a seed without flipped labels): dropped from the means over seeds
    mean = lambda v, w: jnp.where(jnp.sum(w) > 0, jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1.0), jnp.nan)  # noqa: E731
    return {"signal_learning": signal.mean(), "noise_mem_all": mean(noise, mask),
            "noise_mem_flipped": mean(noise, flipped), "noise_mem_clean": mean(noise, clean)}


def step_hook(spec, cell, params, grads, batch) -> dict:
    """Counts of the units that fit noise (signal) at W and of those inactive at the SAM point."""
    import jax
    import jax.numpy as jnp

    from sam_jax.optim.sam import normalized_ascent_rule

    # The library's own SAM rule gives epsilon (no second copy of the formula).
    epsilon, _ = normalized_ascent_rule(cell.tau, spec.sam_eps)(grads, params, None, None, {})
    point = jax.tree.map(lambda w, e: w + e, params, epsilon)
    labels = batch["y"]
    own_now = params["filters"][labels]        # (B, m, d): w_{y_i, r}
    own_sam = point["filters"][labels]
    noise = batch["noise"]                     # (B, P-1, d)
    signal = jnp.take_along_axis(batch["x"], batch["position"][:, None, None], axis=1)[:, 0]  # yhat_i mu
    out = {}
    flipped = batch["flipped"][:, None, None]
    for name, patches in (("noise", noise), ("signal", signal[:, None, :])):
        now = jnp.einsum("bmd,bpd->bmp", own_now, patches) > 0
        later = jnp.einsum("bmd,bpd->bmp", own_sam, patches) > 0
        off = now & ~later
        out[f"{name}_active"] = now.sum().astype(jnp.float32)
        out[f"{name}_deactivated"] = off.sum().astype(jnp.float32)
        if name == "noise":
            out["noise_active_flipped"] = (now & flipped).sum().astype(jnp.float32)
            out["noise_deactivated_flipped"] = (off & flipped).sum().astype(jnp.float32)
    return out


# ------------------------------------------------------------------------- running


def run(cfg: MechanismConfig, seeds: Sequence[int]) -> dict:
    from sam_jax.train.grid import GridSpec, make_cells, train_grid

    cells = make_cells(n=cfg.n, dim=cfg.dim, signal_norm=cfg.signal_norm, tau=cfg.tau, lr=cfg.lr, seed=seeds)
    progress = common.RunProgress(2, EXPERIMENT)
    out = {}
    for optimizer in ("sgd", "sam"):
        spec = GridSpec(optimizer=optimizer, steps=cfg.steps, batch_size=cfg.batch_size,
                        eval_every=cfg.eval_every, n_max=cfg.n, dim_max=cfg.dim, n_test=cfg.n_test,
                        num_patches=cfg.num_patches, width=cfg.width, sigma0=cfg.sigma0,
                        noise_std=cfg.noise_std, flip_prob=cfg.flip_prob, sampling=cfg.sampling)
        with common.Timer() as timer:
            result = train_grid(spec, cells, step_hook=step_hook, eval_hook=eval_hook)
        history, window = result.history, result.window
        ratio = lambda a, b: np.where(window[b] > 0, window[a] / np.maximum(window[b], 1e-12), np.nan)  # noqa: E731
        out[optimizer] = {
            "eval_steps": spec.eval_steps.tolist(),
            "window_end_steps": (spec.eval_steps[1:]).tolist(),
            **{k: history[k] for k in ("signal_learning", "noise_mem_all", "noise_mem_flipped",
                                       "noise_mem_clean", "test_err", "test_err_clean", "train_err",
                                       "train_loss")},
            "deactivated_noise": ratio("noise_deactivated", "noise_active"),
            "deactivated_noise_flipped": ratio("noise_deactivated_flipped", "noise_active_flipped"),
            "deactivated_signal": ratio("signal_deactivated", "signal_active"),
            "batch_loss": window["batch_loss"],
            "seconds": timer.seconds,
        }
        progress.finished(f"{optimizer.upper()}: {len(seeds)} seeds in one call, final test error "
                          f"{history['test_err'][:, -1].mean():.3f}")
    return out


def analyse(cfg: MechanismConfig, runs: dict) -> dict:
    sgd, sam = runs["sgd"], runs["sam"]
    early = max(1, len(sam["window_end_steps"]) // 10)  # the first 10 % of the windows
    last = lambda a: np.asarray(a, float)[:, -1]  # noqa: E731

    def early_mean(a):
        a = np.asarray(a, float)[:, :early]
        with np.errstate(invalid="ignore"):
            return np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan for row in a])

    def stats(values):  # mean ± std over the seeds where the quantity exists
        values = np.asarray(values, float)
        finite = values[np.isfinite(values)]
        return common.mean_std(finite) if finite.size else {"mean": None, "std": None, "n": 0, "values": []}

    def paired(a, b):
        a, b = np.asarray(a, float), np.asarray(b, float)
        keep = np.isfinite(a) & np.isfinite(b)
        return common.paired_difference(a[keep], b[keep])

    res = {
        "early_windows": early, "early_steps": int(sam["window_end_steps"][early - 1]),
        "final": {o: {k: stats(last(runs[o][k])) for k in
                      ("signal_learning", "noise_mem_all", "noise_mem_flipped", "noise_mem_clean", "test_err",
                       "train_err", "train_loss")} for o in ("sgd", "sam")},
        "early_deactivation": {o: {k: stats(early_mean(runs[o][k])) for k in
                                   ("deactivated_noise", "deactivated_noise_flipped", "deactivated_signal")}
                               for o in ("sgd", "sam")},
        "paired": {
            "noise_mem_all_sgd_minus_sam": common.paired_difference(last(sgd["noise_mem_all"]),
                                                                    last(sam["noise_mem_all"])),
            "noise_mem_flipped_sgd_minus_sam": paired(last(sgd["noise_mem_flipped"]), last(sam["noise_mem_flipped"])),
            "signal_learning_sam_minus_sgd": common.paired_difference(last(sam["signal_learning"]),
                                                                      last(sgd["signal_learning"])),
            "test_err_sgd_minus_sam": common.paired_difference(last(sgd["test_err"]), last(sam["test_err"])),
            "sam_early_deactivation_noise_minus_signal": common.paired_difference(
                early_mean(sam["deactivated_noise"]), early_mean(sam["deactivated_signal"])),
            "early_deactivation_noise_sam_minus_sgd": common.paired_difference(
                early_mean(sam["deactivated_noise"]), early_mean(sgd["deactivated_noise"])),
            "run_mean_deactivation_noise_sam_minus_sgd": common.paired_difference(
                np.nanmean(np.asarray(sam["deactivated_noise"], float), axis=1),
                np.nanmean(np.asarray(sgd["deactivated_noise"], float), axis=1)),
        },
    }
    return res


def verdicts(res: dict) -> list[tuple[str, str, bool]]:
    pr = res["paired"]
    f = lambda d: common.fmt_paired(d, digits=3)  # noqa: E731
    return [
        ("SAM memorizes less noise than SGD (final mean max_r <w_{y_i,r}, xi_i>)",
         f"SGD − SAM = {f(pr['noise_mem_all_sgd_minus_sam'])} (criterion: CI > 0)",
         pr["noise_mem_all_sgd_minus_sam"]["ci_low"] > 0),
        ("... also on the flipped-label examples",
         f"SGD − SAM = {f(pr['noise_mem_flipped_sgd_minus_sam'])} (criterion: CI > 0)",
         pr["noise_mem_flipped_sgd_minus_sam"]["ci_low"] > 0),
        ("SAM learns more signal than SGD (final mean_j max_r <w_{j,r}, j mu>)",
         f"SAM − SGD = {f(pr['signal_learning_sam_minus_sgd'])} (criterion: CI > 0)",
         pr["signal_learning_sam_minus_sgd"]["ci_low"] > 0),
        (f"early (first {res['early_steps']} steps) SAM's perturbation deactivates noise-fitting units more "
         f"than signal units", f"noise − signal fraction = {f(pr['sam_early_deactivation_noise_minus_signal'])} "
         f"(criterion: CI > 0)", pr["sam_early_deactivation_noise_minus_signal"]["ci_low"] > 0),
        ("over the whole run, SAM's perturbation keeps more noise-fitting units off than it would at SGD's iterates",
         f"SAM run − SGD run, fraction averaged over all windows = "
         f"{f(pr['run_mean_deactivation_noise_sam_minus_sgd'])} (criterion: CI > 0)",
         pr["run_mean_deactivation_noise_sam_minus_sgd"]["ci_low"] > 0),
        ("SAM's final test error is lower than SGD's",
         f"SGD − SAM = {f(pr['test_err_sgd_minus_sam'])} (criterion: CI > 0)",
         pr["test_err_sgd_minus_sam"]["ci_low"] > 0),
    ]


# ------------------------------------------------------------------------- figure


def plot(cfg: MechanismConfig, runs: dict, workdir: Path, seeds: Sequence[int]) -> str:
    plt = common.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2), constrained_layout=True)
    colors = {"sgd": common.PALETTE[0], "sam": common.PALETTE[1]}
    steps = np.asarray(runs["sgd"]["eval_steps"])
    wsteps = np.asarray(runs["sgd"]["window_end_steps"])
    panels = [
        (axes[0, 0], "signal_learning", "signal learning  mean_j max_r ⟨w_{j,r}, jμ⟩", steps, {}),
        (axes[0, 1], "noise_mem_all", "noise memorization  max_r ⟨w_{y_i,r}, ξ_i⟩", steps, {}),
        (axes[0, 2], "test_err", "test error (observed labels)", steps, {}),
    ]
    for ax, key, title, x, _ in panels:
        for o in ("sgd", "sam"):
            common.plot_band(ax, x, runs[o][key], label=o.upper(), color=colors[o])
        ax.set_title(title)
        ax.set_xlabel("iteration")
    axes[0, 1].set_ylabel("mean over training examples")
    axes[0, 0].set_ylabel("inner product")
    axes[0, 2].axhline(cfg.flip_prob, color="black", lw=0.8, ls=":", label=f"p = {cfg.flip_prob:g}")
    axes[0, 2].set_ylabel("error")
    axes[0, 2].set_ylim(0, 0.6)
    ax = axes[1, 0]
    for o in ("sgd", "sam"):
        common.plot_band(ax, steps, runs[o]["noise_mem_flipped"], label=f"{o.upper()} flipped labels", color=colors[o])
        common.plot_band(ax, steps, runs[o]["noise_mem_clean"], label=f"{o.upper()} clean labels", color=colors[o],
                         ls="--")
    ax.set_title("noise memorization by label type")
    ax.set_ylabel("mean max_r ⟨w_{y_i,r}, ξ_i⟩")
    ax.set_xlabel("iteration")
    ax = axes[1, 1]
    for o in ("sgd", "sam"):
        tag = "SAM run" if o == "sam" else "SGD run (SAM point from SGD's iterate)"
        common.plot_band(ax, wsteps, runs[o]["deactivated_noise"], label=f"{tag}: noise units", color=colors[o])
        common.plot_band(ax, wsteps, runs[o]["deactivated_signal"], label=f"{tag}: signal units", color=colors[o],
                         ls="--")
    ax.set_title("active at W, inactive at Ŵ = W + τ∇L_B/‖∇L_B‖")
    ax.set_ylabel("fraction of active (unit, example) pairs")
    ax.set_xlabel(f"iteration (means over windows of {cfg.eval_every} steps)")
    ax.set_ylim(-0.02, 1.02)
    ax = axes[1, 2]
    for o in ("sgd", "sam"):
        common.plot_band(ax, steps, runs[o]["train_err"], label=f"{o.upper()} train error", color=colors[o])
        common.plot_band(ax, steps, runs[o]["train_loss"], label=f"{o.upper()} train loss", color=colors[o], ls="--")
    ax.set_title("training set (observed labels)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("error / logistic loss")
    ax.set_ylim(bottom=-0.02)
    for ax in axes.ravel():
        ax.legend(fontsize=7)
    fig.suptitle(f"Patch data (n = {cfg.n}, d = {cfg.dim}, ‖μ‖ = {cfg.signal_norm:g}, P = {cfg.num_patches}, "
                 f"σ_p = {cfg.noise_std:g}, p = {cfg.flip_prob:g}), patch CNN (m = {cfg.width}, σ₀ = {cfg.sigma0:g}), "
                 f"batch {cfg.batch_size}, lr {cfg.lr:g}, SAM τ = {cfg.tau:.3g}; seeds {seeds[0]}–{seeds[-1]} "
                 f"({len(seeds)}).\n{common.BAND_CAPTION}", fontsize=9)
    return common.save_figure(fig, workdir / "noise_memorization.png")


# ------------------------------------------------------------------------- main


def _fmt(stats: dict) -> str:
    if not stats["n"]:
        return "n/a"
    return f"{common.fmt_mean_std(stats, 3)} (n={stats['n']})"


def main(argv: Sequence[str] | None = None) -> dict:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    cfg = SCALE_PRESETS[args.scale]
    seeds = tuple(args.seeds) if args.seeds else cfg.seeds
    workdir = common.prepare_workdir(args.workdir)
    with common.Timer() as timer:
        runs = run(cfg, seeds)
        res = analyse(cfg, runs)
    figures = [plot(cfg, runs, workdir, seeds)]
    claims = verdicts(res)
    res["claims"] = [{"claim": c, "criterion": k, "holds": bool(h)} for c, k, h in claims]
    res["curves"] = runs
    config = {**dataclasses.asdict(cfg), "seeds": seeds, "tau": cfg.tau,
              "provenance": "data model / network / SAM variant / tracked quantities: papers.md §3 [recalled]; "
                            "P, m, sigma_p, p, lr: Kou et al. 2023 template [code]; the cell, steps, batch, "
                            "sigma0, tau_const, sampling, the deactivation metric's definition: our choices"}
    common.write_results(workdir, EXPERIMENT, args.scale, config, res, timer.seconds, figures)

    rows = []
    for key, label in (("signal_learning", "signal learning"), ("noise_mem_all", "noise memorization (all)"),
                       ("noise_mem_flipped", "noise memorization (flipped)"),
                       ("noise_mem_clean", "noise memorization (clean)"), ("test_err", "test error"),
                       ("train_err", "train error"), ("train_loss", "train loss")):
        rows.append([f"{label}, step {cfg.steps}"] + [_fmt(res["final"][o][key]) for o in ("sgd", "sam")])
    for key, label in (("deactivated_noise", "noise units off at Ŵ"),
                       ("deactivated_noise_flipped", "noise units off at Ŵ (flipped)"),
                       ("deactivated_signal", "signal units off at Ŵ")):
        rows.append([f"{label}, first {res['early_steps']} steps"]
                    + [_fmt(res["early_deactivation"][o][key]) for o in ("sgd", "sam")])
    print(f"\ncell n = {cfg.n}, d = {cfg.dim}, ‖μ‖ = {cfg.signal_norm:g}, τ = {cfg.tau:.3g}; mean ± std over "
          f"{len(seeds)} seeds (SGD column: Ŵ is the SAM point from SGD's iterate)")
    print(common.format_table(["quantity", "SGD", "SAM"], rows))
    print()
    print(common.format_table(["claim", "criterion / measured", "holds"],
                              [(c, k, "yes" if h else "no") for c, k, h in claims]))
    if args.scale == "tiny":
        print(common.SMOKE_NOTICE)
    print(f"wall time {timer.seconds:.0f} s (SGD {runs['sgd']['seconds']:.0f} s, SAM {runs['sam']['seconds']:.0f} s, "
          f"incl. compilation); results in {workdir / common.RESULTS_FILE}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
