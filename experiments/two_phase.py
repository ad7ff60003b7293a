"""Example 4.1 and Fig. 4a/4b of Zhou et al. (ICLR 2025): the two phases after switching.

Reproduces "SAM efficiently selects flatter minima late in training", Section 4:
after SGD has converged, switching to SAM (i) escapes the SGD minimum exponentially
fast — the loss grows like C^t' with C > 1 — and (ii) then converges to a flatter
minimum in the same valley.

Toy landscape (papers.md §2, Example 4.1)::

    L(u, v) = mean_i L_i(u, v),   L_i(u, v) = ½ a_i (1 + u²) v²,   mean_i a_i = 1

so ``L = ½ (1 + u²) v²``. The global minima are ``M = {v = 0}`` and the Hessian on M
has top eigenvalue ``h = 1 + u²``: smaller |u| is flatter. The minibatch loss
``L_B = mean_{i∈B} L_i`` has the same minima, so its gradient noise vanishes on M like
the minibatch noise of an interpolating network. Near M, with ``a_B`` the batch mean:

* SGD:  ``v ← (1 − η a_B h) v``;
* USAM (the paper's theory uses unnormalized SAM):
  ``v ← (1 − η a_B h (1 + ρ a_B h)) v``.

So log-loss moves by ``2 log|1 − η a_B h (…)|`` per step, whose mean over batches (the
Lyapunov exponent, computed exactly here by enumerating every batch) decides
stability. SGD started just above its edge ``h*_SGD`` catapults (v grows, |u| shrinks)
and settles just below it; there ``h > h*_USAM``, so USAM escapes at the exact rate
``r(h) = E_B 2 log|1 − η a_B h (1 + ρ a_B h)| > 0`` per step, i.e. the loss grows like
``C^t'`` with ``C = e^r`` (the fit on the simulated log-loss is compared with it), and
because USAM never increases |u| (each step multiplies u by
``1 − η a_B (1 + ρ a_B v²) v'²`` with v' the perturbed v, in (0, 1) here) it can only
come to rest at ``h < h*_USAM < h_SGD``: a flatter minimum on the same line M.

The same escape is then measured on a small network, averaged over many trials as the
paper's Fig. 4b (100 trials there): an MLP on scikit-learn's digits, squared loss as
in the theory, trained to convergence with plain SGD and switched to SAM or USAM
(``sam_jax.sam`` / ``sam_jax.usam`` chained with ``optax.sgd``) or kept on SGD (the
control). Every trial (its own initialization and minibatch stream) runs in one
``vmap`` over trials of a ``lax.scan`` over steps; λ_max of each trial's full-batch
Hessian is measured by Lanczos (``sam_jax.curvature.HessianOperator`` +
``lanczos_eigs``). The escape rate is fitted per trial (slope r of the log-loss over
the first half of its rise) and reported as the mean with its 95 % t-interval over
trials, with ``C = e^r``.

Command::

    python -m experiments.two_phase --scale cpu --workdir runs/two_phase_cpu

Runtime on the shared 2-core CPU (load ≈ 20 from other jobs): tiny ~75 s wall, 17 s
CPU (smoke test); cpu 12 min 12 s wall, 2 min 43 s CPU (toy ~1 s; network 3 seeds × 20
trials). Result (cpu, seeds 0-2): toy escape C = e^r = 2.70 per step (fit) vs 2.68
(exact), sharpness 1+u² 19.13 → 8.67, all 300 trials flatter; network (60 trials):
C = 2.07 [1.92, 2.23] (SAM) and 1.15 [1.10, 1.21] (USAM) vs 1.02 for continued SGD,
λ_max 3.55 at the switch → 2.74 (SAM) / 3.29 (USAM) vs 3.55 (SGD). docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Sequence

import numpy as np
from scipy.optimize import brentq

from experiments import common


# --------------------------------------------------------------------------- toy model

@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Toy two-phase experiment (Example 4.1 with minibatch noise).

    Attributes:
      lr: step size η of SGD and USAM. SGD's edge of stability is then h ≈ 2/η = 20.
      rho: USAM radius ρ. 0.02 puts USAM's edge at h ≈ 15, well below SGD's.
      num_components: n, the number of loss components (the "training set").
      batch_size: B, components per minibatch (sampled without replacement).
      curvature_spread: a_i = 1 + spread · linspace(−1, 1, n) (mean exactly 1).
      u0, v0: SGD start; u0 = 4.45 puts h0 = 20.8 just above SGD's edge so that the
        catapult is gentle and SGD settles close to its edge (a sharp minimum).
      switch_loss: a trial switches to USAM at the first step ≥ min_sgd_steps at which
        its loss is below this (SGD has converged); at the latest at max_sgd_steps.
      min_sgd_steps, max_sgd_steps: bounds of the SGD phase.
      sam_steps: USAM steps after the switch (t' = 0 … sam_steps−1).
      trials: independent trials per seed (the paper's Fig. 4b averages 100).
    """

    lr: float = 0.1
    rho: float = 0.02
    num_components: int = 8
    batch_size: int = 4
    curvature_spread: float = 0.2
    u0: float = 4.45
    v0: float = 1e-3
    switch_loss: float = 1e-10
    min_sgd_steps: int = 200
    max_sgd_steps: int = 3000
    sam_steps: int = 120
    trials: int = 100

    def __post_init__(self):
        if self.lr <= 0 or self.rho < 0:
            raise ValueError(f"need lr > 0 and rho >= 0, got lr={self.lr}, rho={self.rho}")
        if not 1 <= self.batch_size <= self.num_components:
            raise ValueError(f"batch_size must be in [1, num_components], got {self.batch_size}")
        if not 0 <= self.curvature_spread < 1:
            raise ValueError("curvature_spread must be in [0, 1) so every a_i > 0")
        if self.trials < 1 or self.sam_steps < 2:
            raise ValueError("need trials >= 1 and sam_steps >= 2")


def component_curvatures(cfg: ToyConfig) -> np.ndarray:
    """The a_i of the n loss components (mean exactly 1)."""
    return 1.0 + cfg.curvature_spread * np.linspace(-1.0, 1.0, cfg.num_components)


def all_batch_means(cfg: ToyConfig) -> np.ndarray:
    """a_B for every possible minibatch (each equally likely under uniform sampling)."""
    a = component_curvatures(cfg)
    combos = itertools.combinations(range(cfg.num_components), cfg.batch_size)
    return np.array([a[list(c)].mean() for c in combos])


def log_loss_rate(h, cfg: ToyConfig, rho: float) -> np.ndarray:
    """Exact expected growth of log L per step near M at sharpness h (rho=0: SGD).

    Returns ``E_B 2 log|1 − η a_B h (1 + ρ a_B h)|``; positive means the minimum is
    unstable (escape at rate C = exp of this), negative means it attracts.
    """
    a_b = all_batch_means(cfg)[:, None]
    h = np.atleast_1d(np.asarray(h, dtype=np.float64))[None, :]
    factor = 1.0 - cfg.lr * a_b * h * (1.0 + rho * a_b * h)
    return 2.0 * np.log(np.abs(factor)).mean(axis=0)


def stability_edge(cfg: ToyConfig, rho: float) -> float:
    """Largest-curvature stable minimum: the h in (1, 2/η] where log_loss_rate = 0."""
    rate = lambda h: float(log_loss_rate(h, cfg, rho)[0])
    upper = 2.0 / cfg.lr
    while rate(upper) <= 0:  # the noisy edge can sit slightly above 2/η
        upper *= 1.1
    lower = 1.0 + 1e-9
    if rate(lower) >= 0:
        raise ValueError(f"no stable minimum for lr={cfg.lr}, rho={rho}")
    # The rate has a −inf singularity where a factor hits 0; it is negative below the
    # edge and positive above, so bracket from a point just below 2/η-ish.
    return float(brentq(rate, lower, upper, xtol=1e-10))


def _toy_loss(u, v, mean_a):
    return 0.5 * mean_a * (1.0 + u**2) * v**2


def safe_log(loss) -> np.ndarray:
    """log of a loss that may underflow to 0 once a trial has converged onto M."""
    return np.log(np.maximum(np.asarray(loss, dtype=np.float64), np.finfo(np.float64).tiny))


def simulate_toy(cfg: ToyConfig, seed: int, record_trial: int = 0) -> dict:
    """Run ``cfg.trials`` independent SGD→USAM trials on the toy, vectorized.

    Args:
      cfg: the toy configuration.
      seed: numpy seed (minibatch sampling and the sign of v0).
      record_trial: the trial whose full (u, v) path is returned for Fig. 4a.

    Returns:
      dict with ``h_sgd`` (sharpness 1+u² at the switch), ``h_final`` (after USAM),
      ``switch_step``, ``loss_after_switch`` [trials, sam_steps] (loss after t'+1
      USAM steps, t'=0 being the loss at the switch), ``path_sgd`` / ``path_sam``
      (arrays [steps, 2] of (u, v) for ``record_trial``).
    """
    rng = np.random.default_rng(seed)
    a = component_curvatures(cfg)
    mean_a = a.mean()
    n, batch, trials = cfg.num_components, cfg.batch_size, cfg.trials
    u = np.full(trials, cfg.u0)
    v = cfg.v0 * rng.choice([-1.0, 1.0], trials)
    switched = np.zeros(trials, dtype=bool)
    switch_step = np.full(trials, -1)
    sam_count = np.zeros(trials, dtype=int)
    losses = np.full((trials, cfg.sam_steps), np.nan)
    h_sgd = np.full(trials, np.nan)
    path_sgd, path_sam = [(u[record_trial], v[record_trial])], []
    step = 0
    with np.errstate(under="ignore"):
        while (sam_count < cfg.sam_steps).any():
            # Switch the trials whose SGD has converged (or ran out of steps).
            loss = _toy_loss(u, v, mean_a)
            ready = ~switched & (((step >= cfg.min_sgd_steps) & (loss <= cfg.switch_loss))
                                 | (step >= cfg.max_sgd_steps))
            h_sgd[ready] = 1.0 + u[ready] ** 2
            switch_step[ready] = step
            losses[ready, 0] = loss[ready]
            sam_count[ready] = 1
            switched |= ready

            # One minibatch per trial, without replacement within the batch.
            idx = np.argsort(rng.random((trials, n)), axis=1)[:, :batch]
            a_b = a[idx].mean(axis=1)
            grad_u, grad_v = a_b * u * v**2, a_b * (1.0 + u**2) * v
            # USAM evaluates the same minibatch's gradient at w + ρ g (rho=0: SGD).
            rho = np.where(switched, cfg.rho, 0.0)
            up, vp = u + rho * grad_u, v + rho * grad_v
            u, v = u - cfg.lr * a_b * up * vp**2, v - cfg.lr * a_b * (1.0 + up**2) * vp
            step += 1

            active = switched & (sam_count < cfg.sam_steps)
            rows = np.nonzero(active)[0]
            losses[rows, sam_count[rows]] = _toy_loss(u[rows], v[rows], mean_a)
            sam_count[rows] += 1
            target = path_sam if switched[record_trial] else path_sgd
            target.append((u[record_trial], v[record_trial]))
    if not np.isfinite(u).all() or not np.isfinite(v).all():
        raise FloatingPointError("toy run diverged; lower lr or rho")
    return {
        "h_sgd": h_sgd,
        "h_final": 1.0 + u**2,
        "switch_step": switch_step,
        "loss_after_switch": losses,
        "path_sgd": np.array(path_sgd),
        "path_sam": np.array([path_sgd[-1]] + path_sam),
    }


def fit_escape_rate(log_loss: np.ndarray, fraction: float = 0.5) -> dict:
    """Fit log L(t') ≈ a + r t' on the escape phase of a (mean) log-loss curve.

    The window is t' = 0 up to the first step where the curve has covered ``fraction``
    of its rise from t' = 0 to its maximum: the linear (exponential-escape) regime,
    before the nonlinear return to M.

    Args:
      log_loss: 1-D array, log of the loss after the switch.
      fraction: share of the rise included in the fit.

    Returns:
      ``{"rate": r, "intercept": a, "C": exp(r), "window": [0, end],
      "rise": max − start}``; a
      non-positive ``rise`` means no escape (rate is then the slope over the first
      10 steps, for the record).
    """
    log_loss = np.asarray(log_loss, dtype=np.float64)
    peak = int(np.nanargmax(log_loss))
    rise = float(log_loss[peak] - log_loss[0])
    if rise <= 0 or peak < 2:
        end = min(10, len(log_loss))
    else:
        target = log_loss[0] + fraction * rise
        end = max(int(np.argmax(log_loss[: peak + 1] >= target)) + 1, 3)
    steps = np.arange(end)
    rate, intercept = np.polyfit(steps, log_loss[:end], 1)
    return {"rate": float(rate), "intercept": float(intercept), "C": float(np.exp(rate)),
            "window": [0, end - 1], "rise": rise}


def toy_summary(cfg: ToyConfig, run: dict) -> dict:
    """Escape fit vs the exact rate, and the flatness of the final minima, for one seed."""
    mean_log = safe_log(run["loss_after_switch"]).mean(axis=0)
    fit = fit_escape_rate(mean_log)
    predicted = log_loss_rate(run["h_sgd"], cfg, cfg.rho)
    final_log = safe_log(run["loss_after_switch"][:, -1])
    return {
        "escape_rate_fit": fit["rate"],
        "escape_C_fit": fit["C"],
        "escape_window": fit["window"],
        "escape_rate_exact": float(predicted.mean()),
        "escape_rate_exact_min": float(predicted.min()),
        "h_sgd_mean": float(run["h_sgd"].mean()),
        "h_sgd_min": float(run["h_sgd"].min()),
        "h_final_mean": float(run["h_final"].mean()),
        "h_final_max": float(run["h_final"].max()),
        "fraction_flatter": float((run["h_final"] < run["h_sgd"]).mean()),
        "fraction_escaped": float((predicted > 0).mean()),
        "switch_step_mean": float(run["switch_step"].mean()),
        "log_loss_at_switch_mean": float(mean_log[0]),
        "log_loss_peak_mean": float(mean_log.max()),
        "log_loss_final_mean": float(final_log.mean()),
    }


def fit_trials(log_losses: np.ndarray) -> dict:
    """Per-trial escape fits (``fit_escape_rate``) → rate r and C = e^r with a 95 % t-CI.

    Args:
      log_losses: (trials, steps) log of the loss after the switch.

    Returns:
      ``{"rate": mean_std of r, "rate_ci": half-width, "C": e^mean r,
      "C_ci": [e^(mean−ci), e^(mean+ci)], "rise": mean_std of the rise}``.
    """
    fits = [fit_escape_rate(row) for row in log_losses]
    rates = [f["rate"] for f in fits]
    half = common.ci_half_width(rates)
    stats = common.mean_std(rates)
    return {"rate": stats, "rate_ci": half, "C": float(np.exp(stats["mean"])),
            "C_ci": [float(np.exp(stats["mean"] - half)), float(np.exp(stats["mean"] + half))],
            "rise": common.mean_std(f["rise"] for f in fits)}


def _seeds_text(seeds) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def _log_ylim(curves, pad_decades: float = 0.5):
    """Log-axis limits spanning the plotted data (not a fit's extrapolation)."""
    values = np.concatenate([np.ravel(c) for c in curves])
    values = values[np.isfinite(values) & (values > 0)]
    lo, hi = np.log10(values.min()), np.log10(values.max())
    return 10 ** (lo - pad_decades), 10 ** (hi + pad_decades)


def plot_toy(cfg: ToyConfig, run: dict, edges: dict, path, seed: int) -> str:
    """Fig. 4a: the SGD then USAM path over the contours of L(u, v)."""
    import matplotlib

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    path_sgd, path_sam = run["path_sgd"], run["path_sam"]
    both = np.concatenate([path_sgd, path_sam])
    vmax = max(1.2 * np.abs(both[:, 1]).max(), 1e-3)
    uu, vv = np.meshgrid(np.linspace(0, cfg.u0 * 1.1, 300), np.linspace(-vmax, vmax, 300))
    levels = np.geomspace(1e-4, max(_toy_loss(uu, vv, 1.0).max(), 1e-3), 20)
    contours = ax.contourf(uu, vv, _toy_loss(uu, vv, 1.0), levels=levels, cmap="Greys_r",
                           norm=matplotlib.colors.LogNorm())
    fig.colorbar(contours, ax=ax, label="L(u, v)", format="%.0e")
    ax.axhline(0, color="gray", lw=2, label="minima M = {v = 0}")
    ax.plot(path_sgd[:, 0], path_sgd[:, 1], "-", color=common.PALETTE[0], lw=0.8, label="SGD")
    ax.plot(path_sam[:, 0], path_sam[:, 1], "-", color=common.PALETTE[1], lw=0.8, label="USAM")
    ax.plot(*path_sgd[-1], "o", color=common.PALETTE[0], label="end of SGD (switch)")
    ax.plot(*path_sam[-1], "*", color=common.PALETTE[1], ms=12, label="end of USAM")
    for name, h, style in (("SGD edge", edges["h_edge_sgd"], ":"),
                           ("USAM edge", edges["h_edge_usam"], "--")):
        ax.axvline(np.sqrt(h - 1.0), color="k", ls=style, lw=0.8, label=f"{name} (1+u²={h:.1f})")
    ax.set_xlabel("u  (sharpness on M is 1 + u²)")
    ax.set_ylabel("v")
    ax.set_title(f"Example 4.1: SGD then USAM, one trial (seed {seed}); "
                 f"η = {cfg.lr}, ρ = {cfg.rho}, batch {cfg.batch_size} of {cfg.num_components}")
    ax.legend(fontsize=7, loc="upper left")
    return common.save_figure(fig, path)


def plot_escape(ax, log_losses: np.ndarray, label: str, color, fit_on_mean: dict | None,
                per_trial: dict | None):
    """One variant on a semi-log axis: geometric mean over trials with its 95 % t-band
    (in log space), and, if given, the fitted escape C^t' over its fit window."""
    t = np.arange(log_losses.shape[1])
    mean = log_losses.mean(axis=0)
    half = np.array([common.ci_half_width(log_losses[:, j]) for j in t])
    ax.semilogy(t, np.exp(mean), color=color, lw=1.5, label=label)
    ax.fill_between(t, np.exp(mean - half), np.exp(mean + half), color=color, alpha=0.2, lw=0)
    if fit_on_mean and fit_on_mean["rise"] > 0:
        window = np.arange(fit_on_mean["window"][1] + 1)
        text = (f"fit: C = e^r = {per_trial['C']:.2f} [{per_trial['C_ci'][0]:.2f}, "
                f"{per_trial['C_ci'][1]:.2f}] per step" if per_trial else
                f"fit: C = e^r = {fit_on_mean['C']:.2f} per step")
        ax.semilogy(window, np.exp(fit_on_mean["intercept"] + fit_on_mean["rate"] * window),
                    "--", color=color, lw=1.2, dashes=(3, 1.5), alpha=0.9, label=f"  {text}")
    return np.exp(mean - half), np.exp(mean + half)


def plot_toy_escape(cfg: ToyConfig, runs: dict, summaries: dict, path, seeds, scale) -> str:
    """Fig. 4b (toy): log-loss after the switch to USAM, all seeds' trials pooled."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    logs = np.concatenate([safe_log(runs[s]["loss_after_switch"]) for s in seeds])
    fit = fit_escape_rate(logs.mean(axis=0))
    agg = common.aggregate_seeds(list(summaries.values()))
    per_trial = fit_trials(logs)
    lo, hi = plot_escape(ax, logs, f"USAM after SGD, geometric mean of {len(logs)} trials",
                         common.PALETTE[1], fit, per_trial)
    rate = agg["escape_rate_exact"]["mean"]
    window = np.arange(fit["window"][1] + 1)
    ax.semilogy(window, np.exp(fit["intercept"] + rate * window), ":", color="k", lw=1,
                label=f"  exact rate (linear stability): C = e^r = {np.exp(rate):.2f}")
    # The return onto M continues far below (the loss underflows towards 0): show the
    # escape and the return to the switch level, 10 decades below the switch at most.
    bottom, top = _log_ylim([lo, hi])
    floor = float(np.exp(logs[:, 0].mean())) * 1e-10
    if bottom < floor:
        bottom = floor
        below = np.nonzero(np.exp(logs.mean(axis=0)) < floor)[0]
        if below.size:
            ax.set_xlim(-1, min(logs.shape[1], below[0] + 15))
        ax.text(0.99, 0.03, "the mean continues below the axis\n(convergence onto M)",
                transform=ax.transAxes, ha="right", fontsize=7, color="gray")
    ax.set_ylim(bottom, top)
    ax.set_xlabel("USAM steps t' after the switch")
    ax.set_ylabel("train loss L (log scale)")
    ax.set_title(f"Example 4.1: loss after switching SGD → USAM ({_seeds_text(seeds)}){common.smoke_tag(scale)}\n"
                 f"band: 95 % t-interval over trials (of log L); C = e^r, r = fitted "
                 f"slope of log L", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    return common.save_figure(fig, path)


# ----------------------------------------------------------------------- small network

@dataclasses.dataclass(frozen=True)
class NetConfig:
    """Small-network escape experiment: SGD to convergence, then SAM / USAM / SGD.

    Attributes:
      width, depth: hidden units per layer and hidden layers of ``sam_jax.models`` mlp.
      train_size: digits examples used (the rest of the 1,797 are unused).
      lr, batch_size: plain SGD (no momentum, as in the theory); chosen by us. With
        lr 0.5 SGD settles at λ_max ≈ 3.7, just under its edge 2/η = 4.
      sgd_steps: steps before the switch (enough for the train loss to plateau).
      sam_steps: steps after the switch; the full train loss is logged every step.
      rho_sam, rho_usam: radii after the switch (0 disables that variant); chosen by
        us. USAM's edge is η λ (1 + ρ λ) = 2, so ρ = 0.05 makes λ ≈ 3.7 unstable
        (factor ≈ 1.27 per step) without blowing up; 0.2 diverged in our trials.
      loss: "mse" on one-hot targets (the theory's squared loss) or "ce".
      trials: independent trials per seed (own init and minibatch stream), run in
        one vmap; the paper's Fig. 4b averages 100.
      lanczos_steps: Lanczos steps per λ_max measurement.
    """

    width: int = 64
    depth: int = 2
    train_size: int = 1000
    lr: float = 0.5
    batch_size: int = 128
    sgd_steps: int = 6000
    sam_steps: int = 200
    rho_sam: float = 0.02
    rho_usam: float = 0.05
    loss: str = "mse"
    trials: int = 20
    lanczos_steps: int = 20

    def __post_init__(self):
        if self.loss not in ("mse", "ce"):
            raise ValueError(f"loss must be 'mse' or 'ce', got {self.loss!r}")
        if self.lr <= 0 or min(self.rho_sam, self.rho_usam) < 0:
            raise ValueError("need lr > 0 and non-negative rho")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")

    def variants(self) -> tuple[str, ...]:
        """The runs after the switch: the SGD control, then SAM / USAM if enabled."""
        return ("sgd",) + (("sam",) if self.rho_sam > 0 else ()) + (("usam",) if self.rho_usam > 0 else ())


def load_digits_subset(size: int):
    """scikit-learn digits scaled to [0, 1], first ``size`` examples: (x, y)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if not 1 <= size <= len(digits.target):
        raise ValueError(f"train_size must be in [1, {len(digits.target)}], got {size}")
    x = (digits.data[:size] / 16.0).astype(np.float32)
    return x, digits.target[:size].astype(np.int32)


def build_network(cfg: NetConfig) -> dict:
    """Model, data, the jitted vmapped phases and the curvature loss (seed-free)."""
    import jax
    import jax.numpy as jnp
    import optax

    import sam_jax
    from sam_jax.losses import cross_entropy
    from sam_jax.models import get_model

    x_np, y_np = load_digits_subset(cfg.train_size)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    model = get_model("mlp", num_classes=10, width=cfg.width, depth=cfg.depth)

    def per_example(params, xb, yb):
        logits = model.apply({"params": params}, xb, train=False)
        if cfg.loss == "mse":
            return 0.5 * jnp.sum((logits - jax.nn.one_hot(yb, 10)) ** 2, axis=-1)
        return cross_entropy(logits, yb)

    def curvature_loss(params, batch):
        """``(loss_sum, count)``: the curvature module's loss convention."""
        losses = per_example(params, batch["x"], batch["y"])
        return jnp.sum(losses), jnp.asarray(losses.shape[0], losses.dtype)

    full_loss = lambda p: jnp.mean(per_example(p, x, y))
    txs = {"sgd": optax.sgd(cfg.lr),
           "sam": optax.chain(sam_jax.sam(cfg.rho_sam), optax.sgd(cfg.lr)),
           "usam": optax.chain(sam_jax.usam(cfg.rho_usam), optax.sgd(cfg.lr))}

    def run_phase(tx, params, key, steps, log_loss):
        def step(carry, step_key):
            p, state = carry
            idx = jax.random.permutation(step_key, x.shape[0])[:cfg.batch_size]
            grad_fn = jax.grad(lambda q: jnp.mean(per_example(q, x[idx], y[idx])))
            updates, state = tx.update(grad_fn(p), state, p, grad_fn=grad_fn)
            p = optax.apply_updates(p, updates)
            return (p, state), (full_loss(p) if log_loss else None)
        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                           jax.random.split(key, steps))
        return params, losses

    @jax.jit
    def sgd_phase(keys):
        """(trials,) keys → params after SGD and the full loss at the switch (vmapped)."""
        def one(key):
            init_key, data_key = jax.random.split(key)
            params = model.init(init_key, x[:1], train=False)["params"]
            params, _ = run_phase(txs["sgd"], params, data_key, cfg.sgd_steps, False)
            return params, full_loss(params)
        return jax.vmap(one)(keys)

    def make_after(name):
        @jax.jit
        def after(params, keys):
            def one(p, key):
                p, losses = run_phase(txs[name], p, key, cfg.sam_steps, True)
                return p, losses
            return jax.vmap(one)(params, keys)
        return after

    return dict(model=model, batch={"x": x, "y": y}, curvature_loss=curvature_loss,
                sgd_phase=sgd_phase, after={name: make_after(name) for name in cfg.variants()})


def lambda_max(parts: dict, params, cfg: NetConfig) -> float:
    """Top eigenvalue of the full-batch Hessian (mean loss) by Lanczos."""
    from sam_jax import curvature

    operator = curvature.HessianOperator(parts["curvature_loss"], params, parts["batch"])
    return float(curvature.lanczos_eigs(operator, top_k=1, num_steps=cfg.lanczos_steps,
                                        compute_residuals=False).eigenvalues[0])


def run_network(parts: dict, cfg: NetConfig, seed: int) -> dict:
    """``cfg.trials`` trials of one seed: SGD to convergence, then each variant.

    Trial i uses ``fold_in(PRNGKey(seed), i)`` (split into init and minibatch keys);
    after the switch every variant gets the same minibatch keys.

    Returns:
      dict of arrays over trials: ``sgd_final_loss``, ``lambda_max_sgd`` and, per
      variant, ``loss`` (trials, sam_steps + 1; index 0 = at the switch) and
      ``lambda_max_end``.
    """
    import jax

    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(
        np.arange(cfg.trials))
    params, switch_loss = parts["sgd_phase"](keys)
    take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    result = {"sgd_final_loss": np.asarray(switch_loss, np.float64),
              "lambda_max_sgd": np.array([lambda_max(parts, take(params, i), cfg)
                                          for i in range(cfg.trials)]),
              "variants": {}}
    after_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    for name, after in parts["after"].items():
        end, losses = after(params, after_keys)
        loss = np.concatenate([result["sgd_final_loss"][:, None], np.asarray(losses, np.float64)], 1)
        result["variants"][name] = {
            "loss": loss,
            "lambda_max_end": np.array([lambda_max(parts, take(end, i), cfg)
                                        for i in range(cfg.trials)])}
    return result


# ---------------------------------------------------------------------------- presets

SCALE_PRESETS = {
    "tiny": dict(toy=ToyConfig(trials=20, sam_steps=60),
                 net=NetConfig(width=16, depth=1, train_size=200, sgd_steps=300, sam_steps=40,
                               trials=4, lanczos_steps=8),
                 seeds=(0,)),
    "cpu": dict(toy=ToyConfig(), net=NetConfig(), seeds=(0, 1, 2)),
    # The paper's Fig. 4b averages 100 trials; "paper" runs 100 per seed.
    "paper": dict(toy=ToyConfig(trials=100, sam_steps=200),
                  net=NetConfig(sgd_steps=10000, trials=100), seeds=(0, 1, 2, 3, 4)),
}


def run_experiment(scale: str, workdir, seeds: Sequence[int] | None = None,
                   network: bool = True) -> dict:
    """Run the toy (every seed) and the network (every seed); write JSON and figures.

    Returns:
      The ``results`` dict written to ``workdir/results.json``.
    """
    preset = SCALE_PRESETS[scale]
    seeds = tuple(seeds) if seeds else preset["seeds"]
    toy_cfg, net_cfg = preset["toy"], preset["net"]
    workdir = common.prepare_workdir(workdir)
    progress = common.RunProgress(len(seeds) * (2 if network else 1), "two_phase")
    with common.Timer() as timer:
        edges = {"h_edge_sgd": stability_edge(toy_cfg, 0.0),
                 "h_edge_usam": stability_edge(toy_cfg, toy_cfg.rho)}
        toy_runs, per_seed = {}, {}
        for seed in seeds:
            toy_runs[seed] = simulate_toy(toy_cfg, seed)
            per_seed[seed] = toy_summary(toy_cfg, toy_runs[seed])
            progress.finished(f"toy seed {seed}: escape rate r = "
                              f"{per_seed[seed]['escape_rate_fit']:.3f} per step")
        figures = [plot_toy(toy_cfg, toy_runs[seeds[0]], edges,
                            workdir / "fig4a_toy_trajectory.png", seeds[0]),
                   plot_toy_escape(toy_cfg, toy_runs, per_seed, workdir / "fig4b_toy_escape.png",
                                   seeds, scale)]
        pooled = np.concatenate([safe_log(toy_runs[s]["loss_after_switch"]) for s in seeds])
        results = {
            "toy": {"edges": edges, "per_seed": {str(s): v for s, v in per_seed.items()},
                    "aggregate": common.aggregate_seeds(list(per_seed.values())),
                    "pooled_trial_fit": fit_trials(pooled),
                    "mean_log_loss_after_switch": pooled.mean(axis=0)},
        }
        if network:
            results["network"] = network_study(net_cfg, seeds, workdir, figures, scale, progress)
    results["claim"] = claim_verdict(results)
    config = {"toy": toy_cfg, "network": net_cfg if network else None, "seeds": seeds}
    common.write_results(workdir, "two_phase", scale, config, results, timer.seconds, figures)
    results["wall_time_s"] = timer.seconds
    return results


def network_study(cfg: NetConfig, seeds, workdir, figures: list, scale: str,
                  progress: common.RunProgress | None = None) -> dict:
    """Escape curves of the MLP over all trials of every seed, their fits, Fig. 4b (network)."""
    parts = build_network(cfg)
    runs = {}
    for seed in seeds:
        runs[seed] = run_network(parts, cfg, seed)
        if progress:
            progress.finished(f"network seed {seed} ({cfg.trials} trials)")
    variants = cfg.variants()
    pooled = {name: np.concatenate([runs[s]["variants"][name]["loss"] for s in seeds])
              for name in variants}
    lam_sgd = np.concatenate([runs[s]["lambda_max_sgd"] for s in seeds])
    out = {"per_seed": {}, "fits": {}, "trials_total": len(lam_sgd)}
    for seed, run in runs.items():
        entry = {"sgd_final_loss": float(np.mean(run["sgd_final_loss"])),
                 "lambda_max_sgd": float(np.mean(run["lambda_max_sgd"]))}
        for name, variant in run["variants"].items():
            fit = fit_trials(safe_log(variant["loss"]))
            entry[f"{name}_escape_rate"] = fit["rate"]["mean"]
            entry[f"{name}_escape_C"] = fit["C"]
            entry[f"{name}_escape_rise"] = fit["rise"]["mean"]
            entry[f"{name}_final_loss"] = float(np.mean(variant["loss"][:, -1]))
            entry[f"{name}_lambda_max_end"] = float(np.mean(variant["lambda_max_end"]))
        out["per_seed"][str(seed)] = entry
    out["lambda_max_sgd"] = {**common.mean_std(lam_sgd), "ci": common.ci_half_width(lam_sgd)}
    for name in variants:
        logs = safe_log(pooled[name])
        lam_end = np.concatenate([runs[s]["variants"][name]["lambda_max_end"] for s in seeds])
        out["fits"][name] = {
            **fit_trials(logs),
            "fit_on_mean": fit_escape_rate(logs.mean(axis=0)),
            "lambda_max_end": {**common.mean_std(lam_end), "ci": common.ci_half_width(lam_end)},
            "lambda_max_end_minus_sgd": common.paired_difference(lam_end, lam_sgd),
            "fraction_flatter": float(np.mean(lam_end < lam_sgd)),
            "mean_log_loss": logs.mean(axis=0),
        }
    for name in ("sam", "usam"):
        if name in variants:
            rise = lambda v: [fit_escape_rate(row)["rise"] for row in safe_log(pooled[v])]
            out["fits"][name]["rise_minus_sgd"] = common.paired_difference(rise(name), rise("sgd"))
            out["fits"][name]["lambda_end_minus_sgd_end"] = common.paired_difference(
                out["fits"][name]["lambda_max_end"]["values"],
                out["fits"]["sgd"]["lambda_max_end"]["values"])
    figures.append(plot_network_escape(cfg, pooled, out["fits"], workdir / "fig4b_network_escape.png",
                                       seeds, scale))
    return out


NET_LABELS = {"sgd": "SGD continued (control)", "sam": "SGD → SAM", "usam": "SGD → USAM"}
NET_COLORS = {"sgd": common.PALETTE[7], "sam": common.PALETTE[0], "usam": common.PALETTE[1]}


def plot_network_escape(cfg: NetConfig, pooled: dict, fits: dict, path, seeds, scale,
                        zoom_steps: int = 30) -> str:
    """Fig. 4b on a network: log-scale train loss after the switch, over all trials.

    (a) the first ``zoom_steps`` steps, where the escape and its fitted C^t' are
    visible; (b) every step after the switch; shared y axis.
    """
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharey=True,
                             gridspec_kw={"width_ratios": [1, 1.6]})
    bounds = []
    for panel, ax in enumerate(axes):
        for name, loss in pooled.items():
            fit = fits[name]
            radius = {"sam": f" (ρ = {cfg.rho_sam})", "usam": f" (ρ = {cfg.rho_usam})"}.get(name, "")
            logs = safe_log(loss)[:, : zoom_steps + 1] if panel == 0 else safe_log(loss)
            show_fit = panel == 0 and name != "sgd"
            lo, hi = plot_escape(ax, logs, NET_LABELS[name] + radius, NET_COLORS[name],
                                 fit["fit_on_mean"] if show_fit else None,
                                 fit if show_fit else None)
            bounds += [lo, hi]
        ax.set_xlabel(f"steps t' after the switch (η = {cfg.lr:g}, batch {cfg.batch_size})")
    axes[0].set_ylim(*_log_ylim(bounds, 0.2))
    axes[0].set_ylabel(f"full-batch train loss ({'squared' if cfg.loss == 'mse' else 'CE'}, log scale)")
    axes[0].set_title(f"(a) first {zoom_steps} steps: the escape, fitted C^t' (dashed)")
    axes[1].set_title("(b) all steps: back down to a flatter minimum")
    axes[0].legend(fontsize=7, loc="upper right")
    n = len(next(iter(pooled.values())))
    fig.suptitle(f"Fig. 4b on a network: MLP {cfg.depth}×{cfg.width} on {cfg.train_size} digits, "
                 f"{n} trials ({_seeds_text(seeds)}){common.smoke_tag(scale)}\n"
                 f"line: geometric mean over trials; band: 95 % t-interval over trials (of log "
                 f"loss); C = e^r, r = per-trial fitted slope of log loss, [95 % CI]", fontsize=9)
    fig.tight_layout()
    return common.save_figure(fig, path)


def claim_verdict(results: dict) -> dict:
    """Did the two phases appear? Escape (rate > 0) and a flatter end, per part.

    Toy: the fitted escape rate is positive in every seed and every trial ends
    flatter. Network (all trials pooled, paired 95 % t-intervals over trials): the
    log-loss rise after the switch exceeds the SGD control's (CI above 0), the fitted
    rate's CI lies above 0 (C > 1), and λ_max at the end is below SGD's at the switch
    and below the control's at its end (CIs below 0).
    """
    toy = results["toy"]["per_seed"].values()
    verdict = {
        "toy_escape_rate_positive_all_seeds": all(s["escape_rate_fit"] > 0 for s in toy),
        "toy_all_trials_flatter": all(s["fraction_flatter"] == 1.0 for s in toy),
    }
    if "network" in results:
        fits = results["network"]["fits"]
        for name in ("sam", "usam"):
            if name in fits:
                fit = fits[name]
                verdict[f"network_{name}_escapes"] = bool(
                    fit["rise_minus_sgd"]["ci_low"] > 0 and fit["rate"]["mean"] - fit["rate_ci"] > 0)
                verdict[f"network_{name}_flatter"] = bool(
                    fit["lambda_max_end_minus_sgd"]["ci_high"] < 0
                    and fit["lambda_end_minus_sgd_end"]["ci_high"] < 0)
    return verdict


def format_report(results: dict, net_cfg: NetConfig | None) -> str:
    """The printed tables and verdicts (each with its criterion)."""
    toy = results["toy"]
    agg = toy["aggregate"]
    yes = lambda b: "yes" if b else "no"
    ms = lambda key, d=3: common.fmt_mean_std(agg[key], d)
    pooled = toy["pooled_trial_fit"]
    lines = ["Toy (Example 4.1): mean ± std over seeds; r = fitted slope of the mean log-loss "
             "(per step), C = e^r",
             common.format_table(
                 ["quantity", "value"],
                 [["SGD edge h*_SGD / USAM edge h*_USAM",
                   f"{toy['edges']['h_edge_sgd']:.2f} / {toy['edges']['h_edge_usam']:.2f}"],
                  ["escape rate r, fit", ms("escape_rate_fit")],
                  ["escape rate r, exact (linear stability)", ms("escape_rate_exact")],
                  ["C = e^r, fit", ms("escape_C_fit")],
                  ["C = e^r, per-trial fits pooled [95 % CI]",
                   f"{pooled['C']:.3f} [{pooled['C_ci'][0]:.3f}, {pooled['C_ci'][1]:.3f}]"],
                  ["sharpness 1+u² at the switch (SGD)", ms("h_sgd_mean", 2)],
                  ["sharpness 1+u² after USAM", ms("h_final_mean", 2)],
                  ["fraction of trials flatter", ms("fraction_flatter", 2)]])]
    if "network" in results:
        net = results["network"]
        lines += ["", f"Network: MLP {net_cfg.depth}×{net_cfg.width}, {net['trials_total']} trials "
                  f"pooled over seeds; mean [95 % t-interval over trials]; r = per-trial fitted "
                  f"slope of log loss (per step), C = e^r",
                  common.format_table(
                      ["after the switch", "escape rate r", "C = e^r", "log-loss rise",
                       "λ_max at end", "λ_max end − at switch"],
                      [[NET_LABELS[name], f"{fit['rate']['mean']:.3f} ± {fit['rate_ci']:.3f}",
                        f"{fit['C']:.3f} [{fit['C_ci'][0]:.3f}, {fit['C_ci'][1]:.3f}]",
                        f"{fit['rise']['mean']:.2f}",
                        f"{fit['lambda_max_end']['mean']:.3f} ± {fit['lambda_max_end']['ci']:.3f}",
                        common.fmt_paired(fit["lambda_max_end_minus_sgd"], 3).split(" (")[0]]
                       for name, fit in net["fits"].items()]),
                  f"λ_max at the switch (SGD): {net['lambda_max_sgd']['mean']:.3f} ± "
                  f"{net['lambda_max_sgd']['ci']:.3f}"]
    claim = results["claim"]
    lines += ["", "Verdicts:",
              f"toy: fitted escape rate r > 0 in every seed: "
              f"{yes(claim['toy_escape_rate_positive_all_seeds'])}",
              f"toy: every trial ends flatter (1+u² after USAM < at the switch): "
              f"{yes(claim['toy_all_trials_flatter'])}"]
    for name in ("sam", "usam"):
        if f"network_{name}_escapes" in claim:
            lines += [
                f"network {name.upper()}: escapes (log-loss rise − control's, paired 95 % CI "
                f"above 0, and r's CI above 0): {yes(claim[f'network_{name}_escapes'])}",
                f"network {name.upper()}: flatter (λ_max end − at switch and − control's end, "
                f"paired 95 % CIs below 0): {yes(claim[f'network_{name}_flatter'])}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = common.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-network", action="store_true",
                        help="toy landscape only (no JAX)")
    args = common.parse_args(__doc__.splitlines()[0], argv, parser)
    results = run_experiment(args.scale, args.workdir, args.seeds, network=not args.no_network)
    print()
    print(format_report(results, None if args.no_network else SCALE_PRESETS[args.scale]["net"]))
    common.print_footer(args.scale, results["wall_time_s"], args.workdir)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
