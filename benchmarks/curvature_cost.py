"""Cost of the curvature toolkit: HVP vs gradient, Lanczos vs power iteration.

Run: ``python -m benchmarks.curvature_cost`` (≈ 2–4 min on a shared 2-core CPU).

1. HVP time / gradient time (both jitted, timed after compilation, median of 50
   interleaved calls) for an MLP and a small CNN on a batch of 256 sklearn digits
   (8×8). The forward-over-reverse HVP should cost ≤ 2.5 gradients (papers.md §4:
   ≈ 2–3).
2. A small CNN trained briefly with SGD on digits; over all 1,797 images (4
   batches, the last one shorter; mean loss, no BatchNorm): Hessian-vector products
   and wall time until the top-1 and top-2 eigenvalues are within 1e-3 relative of
   a reference (Lanczos with 100 steps), for
     * Lanczos — the first step whose top Ritz values are within 1e-3 (read off the
       leading blocks of T), and Lanczos stopped by its own residual estimate
       (``tol=1e-3``, needs no reference);
     * power iteration with deflation — PyHessian's rule (relative change < 1e-3,
       ≤ 100 iterations per eigenvalue) and the first iterates that are truly
       within 1e-3.
   Mean over 3 seeds of the start vector; times exclude compilation.

The models are defined here (not imported from ``sam_jax.models``) so the numbers
depend only on the curvature toolkit.
"""
from __future__ import annotations

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from sam_jax import curvature
from sam_jax.curvature.hvp import batch_hvp, batch_loss_and_grad

TOLERANCE = 1e-3
SEEDS = (0, 1, 2)


class MLP(nn.Module):
    width: int = 256

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


class SmallCNN(nn.Module):
    channels: int = 16

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
        x = nn.relu(nn.Conv(2 * self.channels, (3, 3), strides=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def digits():
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1), NHWC
    return {"x": x, "y": data.target.astype(np.int32)}


def interleaved_median_times(fns_and_args, repeats=50):
    """Median wall time of each ``(fn, args)``, calls interleaved so that load from
    other processes on a shared CPU hits all of them alike; compilation excluded."""
    for fn, args in fns_and_args:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in fns_and_args]
    for _ in range(repeats):
        for slot, (fn, args) in zip(times, fns_and_args):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            slot.append(time.perf_counter() - start)
    return [statistics.median(slot) for slot in times]


def hvp_over_grad(model, data, batch_size=256):
    batch = {k: v[:batch_size] for k, v in data.items()}
    variables = model.init(jax.random.key(0), batch["x"])
    loss_fn = curvature.flax_loss_fn(model, variables, bn_mode="running")
    params = variables["params"]
    vector = jax.tree.map(jnp.ones_like, params)
    grad_time, hvp_time = interleaved_median_times(
        [(batch_loss_and_grad(loss_fn), (params, batch)), (batch_hvp(loss_fn), (params, batch, vector))]
    )
    num_params = sum(p.size for p in jax.tree.leaves(params))
    return num_params, grad_time, hvp_time


def train(model, data, steps=300, batch_size=128, lr=0.05, seed=0):
    variables = model.init(jax.random.key(seed), data["x"][:2])
    loss_fn = curvature.flax_loss_fn(model, variables, bn_mode="running")
    tx = optax.sgd(lr, momentum=0.9)
    params, opt_state = variables["params"], tx.init(variables["params"])

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(lambda p: loss_fn(p, batch)[0] / batch["x"].shape[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        index = rng.integers(0, len(data["y"]), batch_size)
        params, opt_state = step(params, opt_state, {k: v[index] for k, v in data.items()})
    return loss_fn, params


def steps_until(histories, references, tol=TOLERANCE):
    """First 1-based index at which every history is within ``tol`` relative of its reference."""
    length = min(len(h) for h in histories)
    for index in range(length):
        if all(abs(h[index] - r) <= tol * abs(r) for h, r in zip(histories, references)):
            return index + 1
    return None


def timed(fn):
    """Wall time of ``fn()`` after one untimed call (compilation excluded)."""
    fn()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def relative_error(values, references):
    return float(np.max(np.abs(np.asarray(values) - references) / np.abs(references)))


def trained_cnn_operator(data):
    """Hessian of the mean loss over all digits at a briefly trained CNN (4 batches)."""
    loss_fn, params = train(SmallCNN(), data)
    batches = [{k: v[i : i + 512] for k, v in data.items()} for i in range(0, len(data["y"]), 512)]
    return curvature.HessianOperator(loss_fn, params, batches)


def lanczos_vs_power(operator, top_k):
    """HVPs / time / error to get the top-k eigenvalues to 1e-3, for each method."""
    reference = curvature.lanczos_eigs(operator, top_k=top_k, num_steps=100, seed=123)
    lams = reference.eigenvalues
    rows = {"lanczos_exact": [], "lanczos_tol": [], "power_pyhessian": [], "power_exact": []}
    for seed in SEEDS:
        decomposition = curvature.lanczos_tridiagonal(operator, 80, seed=seed)
        ritz = [decomposition.ritz(j)[0][::-1] for j in range(1, decomposition.num_steps + 1)]
        histories = [[r[i] if len(r) > i else np.inf for r in ritz] for i in range(top_k)]
        steps = steps_until(histories, lams)
        result, seconds = timed(
            lambda: curvature.lanczos_eigs(operator, top_k, num_steps=steps, seed=seed, compute_residuals=False)
        )
        rows["lanczos_exact"].append((result.num_hvps, seconds, relative_error(result.eigenvalues, lams)))
        result, seconds = timed(
            lambda: curvature.lanczos_eigs(
                operator, top_k, num_steps=80, seed=seed, tol=TOLERANCE, compute_residuals=False
            )
        )
        rows["lanczos_tol"].append((result.num_hvps, seconds, relative_error(result.eigenvalues, lams)))
        result, seconds = timed(
            lambda: curvature.power_iteration(operator, top_k, seed=seed, compute_residuals=False)
        )
        rows["power_pyhessian"].append((result.num_hvps, seconds, relative_error(result.eigenvalues, lams)))
        seconds_per_hvp = seconds / result.num_hvps
        # Without a stopping rule: iterate long, then count the iterations each
        # deflated eigenvalue needed to come within 1e-3 of its reference.
        long_run = curvature.power_iteration(
            operator, top_k, seed=seed, tol=1e-6, max_iters=200, compute_residuals=False
        )
        needed = [steps_until([history], [lam]) for history, lam in zip(long_run.history, lams)]
        total = sum(n if n is not None else np.nan for n in needed)
        rows["power_exact"].append((total, total * seconds_per_hvp, TOLERANCE))
    return lams, reference, operator, rows


def main():
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    data = digits()
    print("\n## HVP cost (batch 256 of sklearn digits, jitted, median of 50 interleaved calls)\n")
    print("| model | params | grad (ms) | HVP (ms) | HVP / grad |")
    print("|---|---:|---:|---:|---:|")
    for name, model in (("MLP 64-256-256-10", MLP()), ("CNN conv16-conv32/2-64-10", SmallCNN())):
        num_params, grad_time, hvp_time = hvp_over_grad(model, data)
        print(f"| {name} | {num_params:,} | {grad_time * 1e3:.2f} | {hvp_time * 1e3:.2f} | {hvp_time / grad_time:.2f} |")

    labels = {
        "lanczos_exact": "Lanczos, first step within 1e-3",
        "lanczos_tol": "Lanczos, own stopping rule (tol=1e-3)",
        "power_pyhessian": "power iteration + deflation, PyHessian rule (Δ<1e-3, ≤100 it.)",
        "power_exact": "power iteration + deflation, first iterates within 1e-3 (time: × s/HVP)",
    }
    operator = trained_cnn_operator(data)
    for top_k in (1, 2):
        lams, reference, operator, rows = lanczos_vs_power(operator, top_k)
        print(
            f"\n## Top-{top_k} eigenvalue(s) of the trained CNN to {TOLERANCE:g} relative "
            f"({operator.num_examples:.0f} digits in {operator.num_batches} batches, mean loss)\n"
        )
        print(
            f"reference (Lanczos, 100 steps): λ = {np.array2string(lams, precision=5)}, "
            f"residuals ‖Hv−λv‖ = {np.array2string(reference.residual_norms, precision=2)}\n"
        )
        print("| method | HVPs (mean of 3 seeds) | time (s) | max rel. error |")
        print("|---|---:|---:|---:|")
        for key, label in labels.items():
            hvps, seconds, errors = zip(*rows[key])
            error = "≤ 1e-3" if key == "power_exact" else f"{np.mean(errors):.1e}"
            print(f"| {label} | {np.mean(hvps):.1f} | {np.mean(seconds):.2f} | {error} |")


if __name__ == "__main__":
    main()
