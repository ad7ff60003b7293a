"""Cost of the curvature toolkit: HVP vs gradient, Lanczos vs power iteration.

Run: ``python -m benchmarks.curvature_cost`` (29.5 min on the shared 2-core CPU at
load average 16–22, 2026-11-29; results in docs/curvature.md "Benchmarks").
``--devices 0`` skips part 3, ``--seeds N`` sets the repeats, ``--top-ks 1,2``
the k values.

1. HVP time / gradient time (both jitted, timed after compilation, median of 50
   interleaved calls) for an MLP and a small CNN on a batch of 256 sklearn digits
   (8×8). The forward-over-reverse HVP should cost ≤ 2.5 gradients (papers.md §4:
   ≈ 2–3).
2. A small CNN trained briefly with SGD on digits; over all 1,797 images (4
   batches, the last one shorter; mean loss, no BatchNorm): Hessian-vector products
   and wall time until the top-1, top-2 and top-5 eigenvalues are within 1e-3
   relative of a reference (Lanczos with 100 steps), for
     * Lanczos — the first step whose top Ritz values are within 1e-3 (read off the
       leading blocks of T), and Lanczos stopped by its own residual estimate
       (``tol=1e-3``, needs no reference);
     * power iteration with deflation — PyHessian's rule (relative change < 1e-3,
       ≤ 100 iterations per eigenvalue) and the first iterates that are truly
       within 1e-3 (from one long run per seed: relative change < 1e-6, ≤ 200
       iterations per eigenvalue; time = HVPs × the PyHessian-rule run's seconds
       per HVP).
   Medians over repeats (seeds of the start vector; default 3); within a repeat
   the methods run one after the other for k = 1, 2, 5, so load from other
   processes hits all of them alike. Times exclude compilation.
3. The same dataset Hessian on 4 simulated CPU devices (a subprocess with
   ``jax_num_cpu_devices=4``): the data-parallel operator (``mesh=``, each batch
   split over the devices, the short last batch padded with masked examples) vs
   the single-device operator in the same process — dataset HVP time (median of
   interleaved calls), their largest difference, and Lanczos top-2 (tol=1e-3).
   Simulated devices share the 2 cores, so this measures overhead, not speed-up.

The models are defined here (not imported from ``sam_jax.models``) so the numbers
depend only on the curvature toolkit.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
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
TOP_KS = (1, 2, 5)
DECOMPOSITION_STEPS = 100  # per seed, to read off the first step within 1e-3
POWER_LONG_RUN = 200  # iterations per eigenvalue of the "first iterates within 1e-3" run


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


def relative_error(values, references):
    return float(np.max(np.abs(np.asarray(values) - references) / np.abs(references)))


def trained_cnn_operator(data):
    """Hessian of the mean loss over all digits at a briefly trained CNN (4 batches)."""
    loss_fn, params = train(SmallCNN(), data)
    batches = [{k: v[i : i + 512] for k, v in data.items()} for i in range(0, len(data["y"]), 512)]
    return curvature.HessianOperator(loss_fn, params, batches)


def timed(fn):
    """Wall time of ``fn()`` after one untimed call (compiles the shape-dependent
    eager operations, e.g. forming Ritz vectors from a basis of a new length)."""
    fn()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def lanczos_vs_power(operator, seeds=SEEDS, top_ks=TOP_KS):
    """HVPs / time / error to get the top-k eigenvalues to 1e-3, for each method and k.

    Returns ``(reference EigenResult, rows)`` with ``rows[k][method]`` a list of
    ``(hvps, seconds, max relative error)`` per seed.
    """
    kmax = max(top_ks)
    reference = curvature.lanczos_eigs(operator, top_k=kmax, num_steps=100, seed=123)
    # Compile power iteration once, outside the timings (its shapes do not change);
    # each Lanczos call is timed after an untimed identical call.
    curvature.power_iteration(operator, kmax, max_iters=2, seed=99, compute_residuals=False)
    methods = ("lanczos_exact", "lanczos_tol", "power_pyhessian", "power_exact")
    rows = {k: {m: [] for m in methods} for k in top_ks}
    for seed in seeds:
        decomposition = curvature.lanczos_tridiagonal(operator, DECOMPOSITION_STEPS, seed=seed)
        ritz = [decomposition.ritz(j)[0][::-1] for j in range(1, decomposition.num_steps + 1)]
        long_run = curvature.power_iteration(
            operator, kmax, seed=seed, tol=1e-6, max_iters=POWER_LONG_RUN, compute_residuals=False
        )
        needed = [steps_until([history], [lam]) for history, lam in zip(long_run.history, reference.eigenvalues)]
        for k in top_ks:
            lams = reference.eigenvalues[:k]
            histories = [[r[i] if len(r) > i else np.inf for r in ritz] for i in range(k)]
            steps = steps_until(histories, lams)
            if steps is None:
                rows[k]["lanczos_exact"].append((np.nan, np.nan, np.nan))
            else:
                result, seconds = timed(lambda: curvature.lanczos_eigs(
                    operator, k, num_steps=steps, seed=seed, compute_residuals=False))
                rows[k]["lanczos_exact"].append((result.num_hvps, seconds, relative_error(result.eigenvalues, lams)))
            result, seconds = timed(lambda: curvature.lanczos_eigs(
                operator, k, num_steps=80, seed=seed, tol=TOLERANCE, compute_residuals=False))
            rows[k]["lanczos_tol"].append((result.num_hvps, seconds, relative_error(result.eigenvalues, lams)))
            result, seconds = timed(lambda: curvature.power_iteration(
                operator, k, seed=seed, compute_residuals=False))
            rows[k]["power_pyhessian"].append((result.num_hvps, seconds, relative_error(result.eigenvalues, lams)))
            # Deflation solves the eigenvalues one after the other with seeds seed + i,
            # so the first k solves of the long top-5 run are those of a top-k run.
            total = sum(n if n is not None else np.nan for n in needed[:k])
            rows[k]["power_exact"].append((total, total * seconds / result.num_hvps, TOLERANCE))
    return reference, rows


def median(values):
    values = [v for v in values if not np.isnan(v)]
    return statistics.median(values) if values else np.nan


def parallel_part(num_devices, repeats=10):
    """Part 3, run in a process with ``num_devices`` simulated CPU devices."""
    data = digits()
    single = trained_cnn_operator(data)
    loss_fn, params = single.loss_fn, single.params
    batches = [{k: v[i : i + 512] for k, v in data.items()} for i in range(0, len(data["y"]), 512)]
    parallel = curvature.HessianOperator(loss_fn, params, batches, mesh=curvature.data_mesh(num_devices))
    vector = curvature.lanczos.start_vector(single.dim, 0, single.dtype)
    single_time, parallel_time = interleaved_median_times(
        [(single.matvec_flat, (vector,)), (parallel.matvec_flat, (vector,))], repeats=repeats
    )
    a, b = np.asarray(single.matvec_flat(vector)), np.asarray(parallel.matvec_flat(vector))
    difference = float(np.abs(a - b).max() / np.abs(a).max())
    eigs = {}
    for name, operator in (("single", single), ("parallel", parallel)):
        eigs[name] = timed(lambda: curvature.lanczos_eigs(
            operator, 2, num_steps=80, seed=0, tol=TOLERANCE, compute_residuals=False))
    print(f"\n## Data-parallel operator: {num_devices} simulated CPU devices vs one "
          f"({single.num_examples:.0f} digits in {single.num_batches} batches of ≤ 512; the last, "
          f"261, padded to {261 + (-261) % num_devices} with masked examples)\n")
    print(f"max |H_parallel v − H_single v| / max |H_single v| = {difference:.1e} (float32)\n")
    print("| operator | dataset HVP (ms, median of "
          f"{repeats} interleaved) | Lanczos top-2, tol=1e-3: HVPs | time (s) | λ₁, λ₂ |")
    print("|---|---:|---:|---:|---|")
    for name, seconds in (("single device", single_time), (f"{num_devices} devices (mesh=)", parallel_time)):
        result, lanczos_seconds = eigs["single" if name == "single device" else "parallel"]
        print(f"| {name} | {seconds * 1e3:.0f} | {result.num_hvps} | {lanczos_seconds:.2f} | "
              f"{np.array2string(result.eigenvalues, precision=5)} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="repeats (start-vector seeds)")
    parser.add_argument("--top-ks", default=",".join(map(str, TOP_KS)), help="comma-separated k values")
    parser.add_argument("--devices", type=int, default=4, help="simulated devices for part 3 (0: skip)")
    parser.add_argument("--parallel-part", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parallel_part:
        jax.config.update("jax_num_cpu_devices", args.parallel_part)
        parallel_part(args.parallel_part)
        return
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
        "power_pyhessian": "power + deflation, PyHessian rule (Δ<1e-3, ≤100 it.)",
        "power_exact": "power + deflation, first iterates within 1e-3 (time: HVPs × s/HVP)",
    }
    operator = trained_cnn_operator(data)
    seeds = tuple(range(args.seeds))
    reference, rows = lanczos_vs_power(operator, seeds, tuple(int(k) for k in args.top_ks.split(",")))
    print(
        f"\n## Top-k eigenvalues of the trained CNN to {TOLERANCE:g} relative "
        f"({operator.num_examples:.0f} digits in {operator.num_batches} batches, mean loss, "
        f"{operator.dim:,} parameters)\n"
    )
    print(
        f"reference (Lanczos, 100 steps): λ = {np.array2string(reference.eigenvalues, precision=5)}, "
        f"residuals ‖Hv−λv‖ = {np.array2string(reference.residual_norms, precision=2)}\n"
    )
    print(f"| k | method | HVPs (median of {len(seeds)}) | time (s, median) | max rel. error (median) |")
    print("|---:|---|---:|---:|---:|")
    for k, by_method in rows.items():
        for key, label in labels.items():
            hvps, seconds, errors = zip(*by_method[key])
            error = "≤ 1e-3" if key == "power_exact" else f"{median(errors):.1e}"
            missing = sum(np.isnan(h) for h in hvps)
            note = f" ({missing} of {len(hvps)} not within {POWER_LONG_RUN} it.)" if missing else ""
            print(f"| {k} | {label}{note} | {median(hvps):.0f} | {median(seconds):.2f} | {error} |")
    ratios = {k: median([p[0] for p in rows[k]["power_pyhessian"]]) / median([l[0] for l in rows[k]["lanczos_exact"]])
              for k in rows}
    print("\npower (PyHessian rule) HVPs / Lanczos (first step within 1e-3) HVPs: "
          + ", ".join(f"top-{k} {r:.1f}×" for k, r in ratios.items()))

    if args.devices > 1:
        sys.stdout.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        subprocess.run([sys.executable, "-m", "benchmarks.curvature_cost", "--parallel-part",
                        str(args.devices)], check=True, env=env)


if __name__ == "__main__":
    main()
