"""Speed-up of the vmapped phase-diagram trainer over a Python loop of the same jitted step.

Run:  python -m benchmarks.grid_trainer              (about 1.5 minutes on 2 CPU cores)
      python -m benchmarks.grid_trainer --quick      (a smaller grid, for a smoke check)

Workload: the phase diagram of ``experiments.benign_overfitting`` at its ``cpu``
shapes -- a 12 (n) x 12 (||mu||) grid x 5 seeds = 720 cells per optimizer, SGD and
SAM (1,440 trainings), each ``--steps`` minibatch steps of the patch CNN plus its
evaluation at step 0 and at the end (data generated inside JAX).

* **Grid**: ``sam_jax.train.grid.train_grid`` -- one jitted ``vmap`` over the 720
  cells around the ``lax.scan`` over steps, one call per optimizer.
* **Loop**: the same math one cell at a time, driven from Python: a jitted
  ``grid.init_state`` per cell, then ``--steps`` calls of the jitted single-cell
  ``grid.train_step`` (the very function the grid scans), then the jitted
  ``grid.evaluate_cell``. It uses the grid's padded shapes, so that one compilation
  serves every cell (unpadded shapes would recompile for every distinct n: the loop
  would only get slower). Looping all 1,440 cells would take most of an hour, so the
  loop runs a sample of ``--loop-cells`` cells per optimizer, spread over the grid,
  and its total is the median seconds per cell x 720 (``loop_total_est``).

Both are timed after compilation (compile time reported separately), in one process
with the thread count pinned (``--threads``: CPU affinity and XLA's intra-op pool),
interleaved over ``--repeats`` rounds so that both see the same machine load; the
medians over rounds are reported. Target (issue 9): speed-up >= 20x.

Measured on the 2-core development machine (load 5-6 from other jobs), 2026-11-29:

| optimizer | grid ms/cell | loop ms/cell | speed-up | grid fixed ms/cell | grid us/cell-step | loop us/step call |
|-----------|--------------|--------------|----------|--------------------|-------------------|-------------------|
| SGD       | 4.22         | 16.5         | 3.9x     | 1.48               | 13.7              | 48                |
| SAM       | 6.83         | 23.7         | 3.5x     | 1.51               | 26.8              | 75                |
| both      | 5.52         |              | 3.6x     |                    |                   |                   |

A second run at load ~1.5: SGD 3.97 vs 16.3 ms per cell (4.1x), SAM 6.77 vs 22.1 (3.3x),
both 3.6x; grid 13.7 / 28.1 us per cell-step, loop 43 / 75 us per step call.

The target (20x) is **not** met on this CPU, and cannot be with this workload: the
speed-up of long runs is bounded by (loop per step call) / (grid per cell-step) =
48 / 13.7 = 3.5x (SGD), 75 / 26.8 = 2.8x (SAM). The loop's step call is the jitted
call's dispatch plus one cell's arithmetic (~50-75 us); the grid removes the dispatch
but not the arithmetic: one minibatch gradient (B P = 20 patches x d = 200 x 2m = 20
filters, forward + backward, ~0.16 M multiply-adds) costs ~9 us per cell under vmap
(~35 GFLOP/s from the 2 shared cores), the minibatch gather ~2.5 us (both profiled
alone in a scan at 144 cells); SAM takes two gradients. 20x would need <= 2.4 us per SGD cell-step, i.e. > 130 GFLOP/s for the
gradient alone. The ratio grows where dispatch dominates the arithmetic (an
accelerator, smaller d), not measured here.

Before the profiling fixes in ``sam_jax/train/grid.py`` (commit c2f64a6, same session,
same load): grid 10.3 / 10.0 ms per cell (SGD / SAM), loop 23.8 / 27.5 ms, 2.5x
(earlier sessions' runs: 3.3x, 4.0x). Then a fixed cost of 4-6 ms per cell (data
generation and the two evaluations; profiled at 144 cells) was as large as the 200 steps: JAX lowers its threefry hash on CPU as
a rolled loop (~30 ns per random 32-bit value here), XLA recomputed the whole
RNG -> erf_inv chain in every consumer of the noise draws, and a gather picked the
noise patches. ``grid.py`` now draws the same numbers bit for bit through an
unrolled threefry PRNG implementation, materializes the draws (``lax.map`` over
coordinates) and selects instead of gathering: the fixed cost is ~1.5 ms per cell
and the grid got ~2x faster. The loop got faster too (its per-step ``fold_in`` and
``randint`` ran the rolled loop as well, the likely reason; not isolated), so the
ratio moved little: both sides run the same step function.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time


def pin_threads(threads: int) -> None:
    """Pin this process to ``threads`` CPUs and XLA:CPU's pool to as many threads (before jax loads)."""
    if "jax" in sys.modules:
        raise RuntimeError("pin_threads must run before jax is imported")
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} " \
                              f"intra_op_parallelism_threads={threads}".strip()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-cells", type=int, default=6, help="sampled cells per optimizer for the loop")
    parser.add_argument("--quick", action="store_true", help="4 x 4 x 2 grid, 50 steps, 1 repeat")
    args = parser.parse_args(argv)
    pin_threads(args.threads)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from sam_jax.train import grid

    if args.quick:
        args.steps, args.repeats, args.loop_cells = 50, 1, 3
        ns, norms, seeds = np.geomspace(10, 200, 4).round(), np.geomspace(0.3, 10, 4), range(2)
    else:
        ns, norms, seeds = np.geomspace(10, 200, 12).round(), np.geomspace(0.3, 10, 12), range(5)
    dim, batch = 200, 10
    cells = grid.make_cells(n=ns.astype(int), dim=dim, signal_norm=norms, tau=0.5, lr=0.1, seed=seeds)
    specs = {name: grid.GridSpec(optimizer=name, steps=args.steps, batch_size=batch, n_max=int(ns.max()),
                                 dim_max=dim, n_test=1000)
             for name in ("sgd", "sam")}
    sample = np.linspace(0, cells.size - 1, args.loop_cells).round().astype(int)
    print(f"grid: {len(ns)} n x {len(norms)} ||mu|| x {len(list(seeds))} seeds = {cells.size} cells per "
          f"optimizer, d = {dim}, batch {batch}, {args.steps} steps, P = 2, m = 10; "
          f"threads pinned to {args.threads}; loop: {args.loop_cells} sampled cells per optimizer",
          flush=True)

    def block(tree):
        return jax.block_until_ready(tree)

    loop_fns = {}
    for name, spec in specs.items():
        loop_fns[name] = (jax.jit(grid.init_state, static_argnums=0),
                          jax.jit(grid.train_step, static_argnums=0),
                          jax.jit(grid.evaluate_cell, static_argnums=0))

    step_call_s = {n: [] for n in specs}  # the loop's seconds per step call (its steps only)

    def run_loop(name, index):
        spec = specs[name]
        init, step, evaluate = loop_fns[name]
        cell = grid.Cells(*(jnp.asarray(np.asarray(v)[index]) for v in cells))
        data, state = init(spec, cell)
        first = block(evaluate(spec, cell, state.params, data))
        t0 = time.perf_counter()
        for t in range(spec.steps):
            state, _ = step(spec, cell, data, state, t)
        block(state)
        step_call_s[name].append((time.perf_counter() - t0) / spec.steps)
        last = evaluate(spec, cell, state.params, data)
        return block((first, last, state.params))

    # The same grid with 1 step: its data generation + 2 evaluations (fixed cost per cell).
    one_step = {name: dataclasses.replace(spec, steps=1) for name, spec in specs.items()}

    def run_grid(name, steps_one=False):
        spec = one_step[name] if steps_one else specs[name]
        return grid.train_grid(spec, cells)  # returns numpy: already synchronized

    compile_s, grid_s, loop_s = {}, {n: [] for n in specs}, {n: [] for n in specs}
    grid1_s = {n: [] for n in specs}
    for name in specs:  # first calls: compilation (+ one execution)
        t0 = time.perf_counter()
        run_grid(name)
        t1 = time.perf_counter()
        run_loop(name, 0)
        t2 = time.perf_counter()
        compile_s[name] = {"grid_first_call": t1 - t0, "loop_first_cell": t2 - t1}
        run_grid(name, steps_one=True)  # compile the 1-step grid
        print(f"{name}: first grid call (compile + run) {t1 - t0:.1f} s, first loop cell "
              f"(compile + run) {t2 - t1:.1f} s", flush=True)

    checks = {}
    for r in range(args.repeats):
        for name in specs:
            t0 = time.perf_counter()
            result = run_grid(name)
            grid_s[name].append(time.perf_counter() - t0)
            per_cell = []
            for i in sample:
                t0 = time.perf_counter()
                params = run_loop(name, int(i))[2]
                per_cell.append(time.perf_counter() - t0)
                checks.setdefault(name, []).append(
                    float(np.max(np.abs(np.asarray(params["filters"]) - result.params["filters"][i]))))
            loop_s[name].append(statistics.median(per_cell))
            t0 = time.perf_counter()
            run_grid(name, steps_one=True)
            grid1_s[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.repeats} {name}: grid {grid_s[name][-1]:.2f} s, loop median "
                  f"{loop_s[name][-1]:.3f} s per cell", flush=True)

    rows, out = [], {}
    for name in specs:
        g = statistics.median(grid_s[name])
        per_cell = statistics.median(loop_s[name])
        loop_total = per_cell * cells.size
        out[name] = {"grid_s": g, "loop_per_cell_s": per_cell, "loop_total_est_s": loop_total,
                     "speedup": loop_total / g, "max_abs_param_diff": max(checks[name]), **compile_s[name]}
        rows.append((name.upper(), f"{g:.2f}", f"{1e3 * g / cells.size:.2f}", f"{1e3 * per_cell:.1f}",
                     f"{loop_total:.0f}", f"{loop_total / g:.1f}x",
                     f"{compile_s[name]['grid_first_call']:.1f}", f"{max(checks[name]):.1e}"))
    # Where the time goes: the grid's cost per cell-step (its steps only) against the
    # loop's cost per step call (the dispatch floor + one cell's arithmetic).
    rows2 = []
    for name in specs:
        g1 = statistics.median(grid1_s[name])
        per_cell_step = (out[name]["grid_s"] - g1) / (specs[name].steps - 1) / cells.size
        per_call = statistics.median(step_call_s[name])
        out[name].update(grid_fixed_s=g1, grid_per_cell_step_s=per_cell_step, loop_per_step_call_s=per_call)
        rows2.append((name.upper(), f"{1e3 * g1 / cells.size:.2f}", f"{1e6 * per_cell_step:.1f}",
                      f"{1e6 * per_call:.0f}", f"{per_call / per_cell_step:.1f}x"))
    header2 = ("optimizer", "grid fixed ms/cell (data + 2 evals)", "grid us/cell-step",
               "loop us/step call", "steps-only ratio")
    widths2 = [max(len(str(x)) for x in col) for col in zip(header2, *rows2)]
    line2 = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths2)) + " |"  # noqa: E731
    g_all = sum(out[n]["grid_s"] for n in specs)
    l_all = sum(out[n]["loop_total_est_s"] for n in specs)
    rows.append(("both", f"{g_all:.2f}", f"{1e3 * g_all / (2 * cells.size):.2f}", "", f"{l_all:.0f}",
                 f"{l_all / g_all:.1f}x", "", ""))
    header = ("optimizer", "grid s", "grid ms/cell", "loop ms/cell", "loop total est s", "speed-up",
              "grid 1st call s", "max |Δparams| loop vs grid")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    print()
    print(line2(header2))
    print("|" + "|".join("-" * (w + 2) for w in widths2) + "|")
    for row in rows2:
        print(line2(row))
    print("(grid fixed: the same grid with 1 step; grid per cell-step = (grid - fixed) / (steps - 1) / cells; "
          "steps-only ratio = loop per call / grid per cell-step: the speed-up's ceiling for long runs)")
    print(f"\nmedians over {args.repeats} interleaved rounds; compile excluded (the '1st call' "
          f"column is compile + one run); loop total = median s per sampled cell x {cells.size}. "
          f"Target >= 20x: {'met' if l_all / g_all >= 20 else 'NOT met'} ({l_all / g_all:.1f}x).")
    return out


if __name__ == "__main__":
    main()
