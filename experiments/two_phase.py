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
``λ(h) = E_B 2 log|1 − η a_B h (1 + ρ a_B h)| > 0`` (the fit on the simulated log-loss
is compared with it), and because USAM never increases |u| (each step multiplies u by
``1 − η a_B (1 + ρ a_B v²) v'²`` with v' the perturbed v, in (0, 1) here) it can only
come to rest at ``h < h*_USAM < h_SGD``: a flatter minimum on the same line M.

The same escape curve is then measured on a small network (an MLP on scikit-learn's
digits, squared loss as in the theory) trained to convergence with SGD and switched to
SAM or USAM (``sam_jax.sam`` / ``sam_jax.usam`` chained with ``optax.sgd``).

Command::

    python -m experiments.two_phase --scale cpu --workdir runs/two_phase

Runtime on a 2-core CPU: tiny ~17 s, cpu ~1.3 min (the toy alone ~5 s).
Result (cpu, seeds 0-2): toy escape rate 0.995 ± 0.008 per step (exact 0.987), 1+u²
19.13 → 8.67, all 300 trials flatter; MLP: loss rises ×e^3.4 (SAM) and ×e^2.6 (USAM)
then settles, λ_max 3.70 (SGD) → 2.76 (SAM) / 3.32 (USAM). docs/experiments.md.
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


def plot_toy(cfg: ToyConfig, run: dict, edges: dict, path) -> str:
    """Fig. 4a: the SGD then USAM path over the contours of L(u, v)."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    path_sgd, path_sam = run["path_sgd"], run["path_sam"]
    both = np.concatenate([path_sgd, path_sam])
    vmax = max(1.2 * np.abs(both[:, 1]).max(), 1e-3)
    uu, vv = np.meshgrid(np.linspace(0, cfg.u0 * 1.1, 300), np.linspace(-vmax, vmax, 300))
    levels = np.geomspace(1e-4, max(_toy_loss(uu, vv, 1.0).max(), 1e-3), 20)
    ax.contourf(uu, vv, _toy_loss(uu, vv, 1.0), levels=levels, cmap="Greys_r",
                norm=__import__("matplotlib").colors.LogNorm())
    ax.axhline(0, color="gray", lw=2, label="minima M = {v = 0}")
    ax.plot(path_sgd[:, 0], path_sgd[:, 1], "-", color="tab:blue", lw=0.8, label="SGD")
    ax.plot(path_sam[:, 0], path_sam[:, 1], "-", color="tab:orange", lw=0.8, label="USAM")
    ax.plot(*path_sgd[-1], "o", color="tab:blue", label="θ_SGD end")
    ax.plot(*path_sam[-1], "*", color="tab:orange", ms=12, label="θ_SGD→SAM end")
    for name, h, style in (("SGD edge", edges["h_edge_sgd"], ":"),
                           ("USAM edge", edges["h_edge_usam"], "--")):
        ax.axvline(np.sqrt(h - 1.0), color="k", ls=style, lw=0.8, label=f"{name} (1+u²={h:.1f})")
    ax.set_xlabel("u  (sharpness on M is 1 + u²)")
    ax.set_ylabel("v")
    ax.set_title("Example 4.1: SGD then USAM (one trial)")
    ax.legend(fontsize=7, loc="upper left")
    return common.save_figure(fig, path)


def plot_escape(curves: dict, path, title: str) -> str:
    """Fig. 4b: semi-log train loss vs steps after the switch, with the fitted rate."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        mean_loss = np.asarray(curve["mean_loss"])
        mean_log = np.asarray(curve["mean_log_loss"])
        line, = ax.semilogy(np.arange(len(mean_loss)), mean_loss, label=label)
        ax.semilogy(np.exp(mean_log), ":", color=line.get_color(), lw=1,
                    label="  geometric mean (fitted)")
        fit = curve.get("fit")
        if fit and fit["rise"] > 0:
            t = np.arange(fit["window"][1] + 1)
            ax.semilogy(t, np.exp(fit["intercept"] + fit["rate"] * t), "--", color="k",
                        lw=1, label=f"  fit: loss ∝ C^t', C = {fit['C']:.3f}")
    ax.set_xlabel("steps t' after switching to SAM")
    ax.set_ylabel("train loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return common.save_figure(fig, path)


# ----------------------------------------------------------------------- small network

@dataclasses.dataclass(frozen=True)
class NetConfig:
    """Small-network escape experiment: SGD to convergence, then SAM / USAM.

    Attributes:
      width, depth: hidden units per layer and hidden layers of ``sam_jax.models`` mlp.
      train_size: digits examples used (the rest of the 1,797 are unused).
      lr, batch_size: SGD (no momentum, as in the theory). With lr 0.5 SGD settles
        at λ_max ≈ 3.8, just under its edge 2/η = 4 (measured, seed 0).
      sgd_steps: steps before the switch (enough for the train loss to plateau).
      sam_steps: steps after the switch; the full train loss is logged every step.
      rho_sam, rho_usam: radii after the switch (0 disables that variant). USAM's
        edge is η λ (1 + ρ λ) = 2, so ρ = 0.05 makes λ ≈ 3.8 unstable (factor ≈ 1.27
        per step) without blowing up; larger ρ (0.2) diverged in our trials.
      loss: "mse" on one-hot targets (the theory's squared loss) or "ce".
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

    def __post_init__(self):
        if self.loss not in ("mse", "ce"):
            raise ValueError(f"loss must be 'mse' or 'ce', got {self.loss!r}")
        if self.lr <= 0 or min(self.rho_sam, self.rho_usam) < 0:
            raise ValueError("need lr > 0 and non-negative rho")


def load_digits_subset(size: int):
    """scikit-learn digits scaled to [0, 1], first ``size`` examples: (x, y)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if not 1 <= size <= len(digits.target):
        raise ValueError(f"train_size must be in [1, {len(digits.target)}], got {size}")
    x = (digits.data[:size] / 16.0).astype(np.float32)
    return x, digits.target[:size].astype(np.int32)


def run_network(cfg: NetConfig, seed: int) -> dict:
    """Train the MLP with SGD, then continue with SAM and with USAM from the same point.

    Returns:
      dict with ``sgd_final_loss`` and, per variant ("sam", "usam", and "sgd" —
      SGD continued, the control), ``loss`` (full train loss after each step, index 0 =
      at the switch) and ``lambda_max`` before/after estimated by power iteration
      on the full-batch Hessian.
    """
    import jax
    import jax.numpy as jnp
    import optax

    import sam_jax
    from sam_jax.models import get_model

    x_np, y_np = load_digits_subset(cfg.train_size)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    model = get_model("mlp", num_classes=10, width=cfg.width, depth=cfg.depth)
    params = model.init(jax.random.PRNGKey(seed), x[:1], train=False)["params"]

    def loss_on(p, xb, yb):
        logits = model.apply({"params": p}, xb, train=False)
        if cfg.loss == "mse":
            return 0.5 * jnp.mean(jnp.sum((logits - jax.nn.one_hot(yb, 10)) ** 2, axis=-1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    full_loss = jax.jit(lambda p: loss_on(p, x, y))

    def make_step(tx):
        @jax.jit
        def step(p, state, key):
            idx = jax.random.choice(key, x.shape[0], (cfg.batch_size,), replace=False)
            xb, yb = x[idx], y[idx]
            grad_fn = jax.grad(lambda q: loss_on(q, xb, yb))
            updates, state = tx.update(grad_fn(p), state, p, grad_fn=grad_fn)
            return optax.apply_updates(p, updates), state, full_loss(optax.apply_updates(p, updates))
        return step

    def top_eigenvalue(p, iters=30):
        flat, unravel = jax.flatten_util.ravel_pytree(p)
        hvp = jax.jit(lambda vec: jax.flatten_util.ravel_pytree(
            jax.jvp(jax.grad(full_loss), (p,), (unravel(vec),))[1])[0])
        vec = jax.random.normal(jax.random.PRNGKey(0), flat.shape)
        eig = 0.0
        for _ in range(iters):
            w = hvp(vec / jnp.linalg.norm(vec))
            eig = float(jnp.vdot(vec / jnp.linalg.norm(vec), w))
            vec = w
        return eig

    sgd = optax.sgd(cfg.lr)
    step, state = make_step(sgd), sgd.init(params)
    key = jax.random.PRNGKey(seed + 1)
    for _ in range(cfg.sgd_steps):
        key, sub = jax.random.split(key)
        params, state, _ = step(params, state, sub)
    result = {"sgd_final_loss": float(full_loss(params)),
              "lambda_max_sgd": top_eigenvalue(params), "variants": {}}

    variants = {"sgd": sgd}
    if cfg.rho_sam > 0:
        variants["sam"] = optax.chain(sam_jax.sam(cfg.rho_sam), optax.sgd(cfg.lr))
    if cfg.rho_usam > 0:
        variants["usam"] = optax.chain(sam_jax.usam(cfg.rho_usam), optax.sgd(cfg.lr))
    for name, tx in variants.items():
        p, st, k = params, tx.init(params), jax.random.PRNGKey(seed + 2)
        losses = [result["sgd_final_loss"]]
        variant_step = make_step(tx)
        for _ in range(cfg.sam_steps):
            k, sub = jax.random.split(k)
            p, st, loss = variant_step(p, st, sub)
            losses.append(float(loss))
        result["variants"][name] = {"loss": losses, "lambda_max_end": top_eigenvalue(p)}
    return result


# ---------------------------------------------------------------------------- presets

SCALE_PRESETS = {
    "tiny": dict(toy=ToyConfig(trials=20, sam_steps=60),
                 net=NetConfig(width=16, depth=1, train_size=200, sgd_steps=300, sam_steps=40),
                 seeds=(0,)),
    "cpu": dict(toy=ToyConfig(), net=NetConfig(), seeds=(0, 1, 2)),
    # The paper's Fig. 4b is a toy-scale figure; "paper" adds trials and seeds.
    "paper": dict(toy=ToyConfig(trials=100, sam_steps=200), net=NetConfig(sgd_steps=10000),
                  seeds=(0, 1, 2, 3, 4)),
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
    with common.Timer() as timer:
        edges = {"h_edge_sgd": stability_edge(toy_cfg, 0.0),
                 "h_edge_usam": stability_edge(toy_cfg, toy_cfg.rho)}
        toy_runs = {seed: simulate_toy(toy_cfg, seed) for seed in seeds}
        per_seed = {seed: toy_summary(toy_cfg, run) for seed, run in toy_runs.items()}
        first = toy_runs[seeds[0]]
        figures = [plot_toy(toy_cfg, first, edges, workdir / "fig4a_toy_trajectory.png")]
        mean_log = safe_log(first["loss_after_switch"]).mean(axis=0)
        figures.append(plot_escape(
            {f"toy USAM, mean of {toy_cfg.trials} trials": {
                "mean_loss": first["loss_after_switch"].mean(axis=0),
                "mean_log_loss": mean_log, "fit": fit_escape_rate(mean_log)}},
            workdir / "fig4b_toy_escape.png", "Example 4.1: loss after switching SGD→USAM"))
        results = {
            "toy": {"edges": edges, "per_seed": {str(s): v for s, v in per_seed.items()},
                    "aggregate": common.aggregate_seeds(list(per_seed.values())),
                    "mean_loss_after_switch": first["loss_after_switch"].mean(axis=0)},
        }
        if network:
            results["network"] = network_study(net_cfg, seeds, workdir, figures)
    results["claim"] = claim_verdict(results)
    config = {"toy": toy_cfg, "network": net_cfg if network else None, "seeds": seeds}
    common.write_results(workdir, "two_phase", scale, config, results, timer.seconds, figures)
    return results


def network_study(cfg: NetConfig, seeds, workdir, figures: list) -> dict:
    """Escape curves of the MLP for every seed, their fits, and Fig. 4b (network)."""
    runs = {seed: run_network(cfg, seed) for seed in seeds}
    out = {"per_seed": {}, "curves": {}}
    for seed, run in runs.items():
        entry = {"sgd_final_loss": run["sgd_final_loss"], "lambda_max_sgd": run["lambda_max_sgd"]}
        for name, variant in run["variants"].items():
            fit = fit_escape_rate(safe_log(variant["loss"]))
            entry[f"{name}_escape_C"] = fit["C"]
            entry[f"{name}_escape_rise"] = fit["rise"]
            entry[f"{name}_final_loss"] = variant["loss"][-1]
            entry[f"{name}_lambda_max_end"] = variant["lambda_max_end"]
        out["per_seed"][str(seed)] = entry
    out["aggregate"] = common.aggregate_seeds(list(out["per_seed"].values()))
    curves = {}
    for name in runs[seeds[0]]["variants"]:
        stacked = np.array([runs[s]["variants"][name]["loss"] for s in seeds])
        mean_log = safe_log(stacked).mean(axis=0)
        out["curves"][name] = stacked.mean(axis=0)
        curves[f"MLP, SGD→{name.upper()} (mean of {len(seeds)} seeds)"] = {
            "mean_loss": stacked.mean(axis=0), "mean_log_loss": mean_log,
            "fit": fit_escape_rate(mean_log) if name != "sgd" else None}
    figures.append(plot_escape(curves, workdir / "fig4b_network_escape.png",
                               "MLP on digits: train loss after switching"))
    return out


def claim_verdict(results: dict) -> dict:
    """Did the two phases appear? Escape (rate > 0) and a flatter end, per part.

    Toy: the fitted escape rate is positive and every trial ends flatter. Network:
    the log-loss rise after the switch exceeds twice that of the SGD control, and
    λ_max at the end is below SGD's at the switch and at the control's end.
    """
    toy = results["toy"]["per_seed"].values()
    verdict = {
        "toy_escape_rate_positive_all_seeds": all(s["escape_rate_fit"] > 0 for s in toy),
        "toy_all_trials_flatter": all(s["fraction_flatter"] == 1.0 for s in toy),
    }
    if "network" in results:
        net = results["network"]["per_seed"].values()
        for name in ("sam", "usam"):
            if all(f"{name}_escape_rise" in s for s in net):
                # Against the control (SGD continued from the same point): the loss
                # rises more than twice as much, and λ_max ends below both SGD values.
                verdict[f"network_{name}_loss_rises_all_seeds"] = all(
                    s[f"{name}_escape_rise"] > 2 * max(s.get("sgd_escape_rise", 0.0), 0.0)
                    for s in net)
                verdict[f"network_{name}_flatter_all_seeds"] = all(
                    s[f"{name}_lambda_max_end"]
                    < min(s["lambda_max_sgd"], s.get("sgd_lambda_max_end", np.inf))
                    for s in net)
    return verdict


def main(argv: Sequence[str] | None = None) -> dict:
    parser = common.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-network", action="store_true",
                        help="toy landscape only (no JAX)")
    args = parser.parse_args(argv)
    results = run_experiment(args.scale, args.workdir, args.seeds, network=not args.no_network)
    agg = results["toy"]["aggregate"]
    print(f"toy: SGD edge h*={results['toy']['edges']['h_edge_sgd']:.2f}, "
          f"USAM edge h*={results['toy']['edges']['h_edge_usam']:.2f}")
    print(f"toy: escape rate fit {common.fmt_mean_std(agg['escape_rate_fit'], 3)} "
          f"vs exact {common.fmt_mean_std(agg['escape_rate_exact'], 3)} per step; "
          f"sharpness 1+u²: SGD {common.fmt_mean_std(agg['h_sgd_mean'])} → "
          f"USAM {common.fmt_mean_std(agg['h_final_mean'])}")
    if "network" in results:
        for key, stats in results["network"]["aggregate"].items():
            print(f"network: {key} = {common.fmt_mean_std(stats, 4)}")
    print("claim:", results["claim"])
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
