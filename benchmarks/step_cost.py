"""Cost of one jitted training step of the SAM family, side by side.

Run:  python -m benchmarks.step_cost            (about 2-4 minutes on 2 CPU cores,
                                                 most of it Eigen-SAM's cond refresh
                                                 step of the CNN, see below)
      python -m benchmarks.step_cost --quick    (fewer repeats, for a smoke check)
      python -m benchmarks.step_cost --tiny     (tiny models, 2 repeats: smoke test)
      python -m benchmarks.step_cost --memory-only   (compile only: the memory tables,
                                                 at each model's batch size and twice it)
      python -m benchmarks.step_cost --memory-only --batch-sizes 16,64,256

For an MLP and a small CNN it times a full jitted step (gradient, transform, base
SGD with momentum, apply) of SGD, SAM, USAM, ASAM, Eigen-SAM (released defaults:
rho 0.05, alpha 0.2, refresh every 100 steps, 5 power iterations; reported per step
averaged over the refresh cycle, and its two kinds of step separately; once with the
refresh decided in the graph by ``lax.cond``, once decided by the caller with the
static ``eigen_refresh`` flag, which avoids XLA:CPU's slow convolutions inside
``cond`` bodies, jax-ml/jax#12868) and
``optax.contrib.sam`` (opaque mode, normalized SGD ascent, sync_period 2). Timing
starts after compilation; the repeats of all methods are interleaved (a fresh random
order each round) so that they see the same machine load; the median is reported,
and the minimum beside it (the better estimate of the intrinsic cost on a machine
shared with other jobs). Memory is the compiled
step's ``memory_analysis()``: temp + argument + output bytes in the timing table,
and a second table per model with temp, argument, output, alias and peak bytes and
each method's peak (and temp) in excess of SGD's, in MiB and in units of the
parameter size (target: SAM at most one extra copy of the parameters). Nothing is
donated, so argument and output each hold parameters and optimizer state once.
``--memory-only`` compiles each model at two batch sizes (or ``--batch-sizes``) and
ends with the excess at each: an excess that grows with the batch is activation-sized
buffers live across the two gradient passes, one that stays put scales with the
parameters.

Targets (issue 2): SAM <= 2.05x SGD, ours <= 1.0x optax.contrib.sam,
Eigen-SAM <= 1.15x SAM.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_jax

EIGEN_REFRESH_EVERY = 100  # released default p


class BenchMLP(nn.Module):
    width: int = 512

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for _ in range(2):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


class BenchCNN(nn.Module):
    channels: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
        x = nn.relu(nn.Conv(2 * self.channels, (3, 3), strides=(2, 2))(x))
        x = nn.relu(nn.Conv(2 * self.channels, (3, 3), strides=(2, 2))(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(10)(x)


def models(tiny: bool = False):
    """(name, model, input shape) of the benchmarked models (``tiny``: smoke-test sizes)."""
    if tiny:
        return [("MLP 12-8-8-10", BenchMLP(width=8), (4, 12)),
                ("CNN 3 conv (2-4-4), 8x8x3", BenchCNN(channels=2), (2, 8, 8, 3))]
    return [
        # batch 256: the released Eigen-SAM README's batch size
        ("MLP 784-512-512-10", BenchMLP(), (256, 784)),
        ("CNN 3 conv (32-64-64), 32x32x3", BenchCNN(), (64, 32, 32, 3)),
    ]


def problem_title(name: str, batch_size: int, tiny: bool = False) -> str:
    return f"{name}, batch {batch_size}{' (tiny)' if tiny else ''}"


def problems(tiny: bool = False):
    """(title, model, input shape) of the benchmarked models at their own batch size."""
    return [(problem_title(name, shape[0], tiny), model, shape)
            for name, model, shape in models(tiny)]


def transforms() -> dict[str, Callable[[], optax.GradientTransformation]]:
    base = lambda: optax.sgd(0.05, momentum=0.9)  # noqa: E731
    return {
        "SGD": lambda: optax.chain(sam_jax.make_perturbation("sgd"), base()),
        "SAM": lambda: optax.chain(sam_jax.sam(0.05), base()),
        "USAM": lambda: optax.chain(sam_jax.usam(0.05), base()),
        "ASAM": lambda: optax.chain(sam_jax.asam(0.5, 0.01), base()),
        "Eigen-SAM": lambda: optax.chain(
            sam_jax.eigen_sam(0.05, 0.2, EIGEN_REFRESH_EVERY, 5), base()),
        "optax.contrib.sam": lambda: optax.contrib.sam(
            base(), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
            sync_period=2, opaque_mode=True),
    }


def make_step(model, tx, contrib: bool, **extra_args):
    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def step(params, opt_state, batch):
        grad_fn = lambda p: jax.grad(loss_fn)(p, batch)  # noqa: E731
        extra = (lambda p, i: grad_fn(p)) if contrib else grad_fn
        updates, opt_state = tx.update(grad_fn(params), opt_state, params, grad_fn=extra,
                                       **extra_args)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step)


def with_count(opt_state, count: int):
    """The same chained state with Eigen-SAM's step counter set (picks the step kind)."""
    def fix(node):
        if isinstance(node, sam_jax.optim.EigenSAMState):
            return node._replace(count=jnp.asarray(count, jnp.int32))
        return node
    return jax.tree.map(fix, opt_state, is_leaf=lambda n: isinstance(n, sam_jax.optim.EigenSAMState))


def memory_bytes(compiled) -> int | None:
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if analysis is None:
        return None
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
    return int(sum(getattr(analysis, f, 0) or 0 for f in fields))


MEMORY_FIELDS = ("temp", "argument", "output", "alias")


def memory_stats(compiled) -> dict | None:
    """The compiled program's ``memory_analysis()`` in bytes (jax 0.10's
    ``CompiledMemoryStats``): ``temp`` (XLA's scratch allocation: activations and
    intermediates), ``argument``, ``output``, ``alias`` (outputs that reuse donated
    arguments; 0 here, nothing is donated) and ``peak`` = argument + output + temp -
    alias, the memory the step needs at most. (jax 0.10's ``peak_memory_in_bytes``
    on CPU is argument + output only, without temp, so it is not used.) ``None`` if
    the backend gives no analysis."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if analysis is None:
        return None
    stats = {f: int(getattr(analysis, f"{f}_size_in_bytes", 0) or 0) for f in MEMORY_FIELDS}
    stats["peak"] = stats["argument"] + stats["output"] + stats["temp"] - stats["alias"]
    return stats


def tree_bytes(tree) -> int:
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


def bench_problem(model, input_shape, repeats: int, calls_per_sample: int):
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=input_shape), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 10, size=input_shape[0]), jnp.int32)}
    params = model.init(jax.random.key(0), batch["x"])["params"]

    # case -> (compiled step, args). Eigen-SAM is timed as a plain and a refresh step,
    # both with the in-graph schedule (lax.cond) and with the caller's static flag.
    cases, memory, breakdown = {}, {}, {}
    for name, factory in transforms().items():
        tx = factory()
        state = tx.init(params)
        contrib = name == "optax.contrib.sam"
        kinds = {name: (make_step(model, tx, contrib), state)}
        if name == "Eigen-SAM":
            cond_step = make_step(model, tx, contrib)
            kinds = {
                f"{EIGEN} plain step": (cond_step, with_count(state, 1)),
                f"{EIGEN} refresh step": (cond_step, with_count(state, EIGEN_REFRESH_EVERY)),
                f"{EIGEN_STATIC} plain step": (
                    make_step(model, tx, contrib, eigen_refresh=False), with_count(state, 1)),
                f"{EIGEN_STATIC} refresh step": (
                    make_step(model, tx, contrib, eigen_refresh=True), with_count(state, 1)),
            }
        for case, (step, case_state) in kinds.items():
            args = (params, case_state, batch)
            compiled = step.lower(*args).compile()
            memory[case] = memory_bytes(compiled)
            breakdown[case] = memory_stats(compiled)
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))  # warm up
            cases[case] = (compiled, args, time.perf_counter() - start > 1.0)

    samples = {case: [] for case in cases}
    order_rng = np.random.default_rng(1)
    for round_index in range(repeats):
        # interleaved, in a fresh random order each round: every method sees the same load
        for case in order_rng.permutation(list(cases)):
            compiled, args, slow = cases[case]
            if slow and round_index >= 3:  # a step over 1 s: 3 samples of 1 call suffice
                continue
            calls = 1 if slow else calls_per_sample
            start = time.perf_counter()
            for _ in range(calls):
                out = compiled(*args)
            jax.block_until_ready(out)
            samples[case].append((time.perf_counter() - start) / calls)
    medians = {case: statistics.median(s) for case, s in samples.items()}
    minima = {case: min(s) for case, s in samples.items()}
    p = EIGEN_REFRESH_EVERY
    for times in (medians, minima):
        for label in (EIGEN, EIGEN_STATIC):  # amortized over one refresh cycle
            plain, refresh = times[f"{label} plain step"], times[f"{label} refresh step"]
            times[label] = ((p - 1) * plain + refresh) / p
    for label in (EIGEN, EIGEN_STATIC):
        memory[label] = max(memory[f"{label} plain step"] or 0,
                            memory[f"{label} refresh step"] or 0) or None
        kinds = [breakdown[f"{label} plain step"], breakdown[f"{label} refresh step"]]
        breakdown[label] = max(kinds, key=lambda m: m["peak"]) if all(kinds) else None
    return medians, minima, memory, breakdown, tree_bytes(params)


def memory_problem(model, input_shape, names=None):
    """Compile-only: ``memory_stats`` of each method's step (no timing) and the
    parameter bytes. Eigen-SAM is its refresh step (the larger one)."""
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=input_shape), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 10, size=input_shape[0]), jnp.int32)}
    params = model.init(jax.random.key(0), batch["x"])["params"]
    breakdown = {}
    for name, factory in transforms().items():
        if names is not None and name not in names:
            continue
        tx = factory()
        extra = {"eigen_refresh": True} if name == "Eigen-SAM" else {}
        step = make_step(model, tx, name == "optax.contrib.sam", **extra)
        breakdown[name] = memory_stats(step.lower(params, tx.init(params), batch).compile())
    return breakdown, tree_bytes(params)


EIGEN = "Eigen-SAM"
EIGEN_STATIC = "Eigen-SAM, caller refresh"
ORDER = ["SGD", "SAM", "USAM", "ASAM",
         EIGEN, f"{EIGEN} plain step", f"{EIGEN} refresh step",
         EIGEN_STATIC, f"{EIGEN_STATIC} plain step", f"{EIGEN_STATIC} refresh step",
         "optax.contrib.sam"]


def format_table(title, medians, minima, memory) -> str:
    def ratios(times, name):
        t = times[name]
        return f"{t / times['SGD']:.2f} | {t / times['SAM']:.2f} | {t / times['optax.contrib.sam']:.2f}"

    lines = [f"#### {title}", "",
             "| method | median ms | × SGD | × SAM | × contrib | min ms | × SGD | × SAM | × contrib "
             "| memory MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ORDER:
        mem = memory.get(name)
        mem_text = f"{mem / 2**20:.2f}" if mem else "n/a"
        lines.append(f"| {name} | {medians[name] * 1e3:.2f} | {ratios(medians, name)} | "
                     f"{minima[name] * 1e3:.2f} | {ratios(minima, name)} | {mem_text} |")
    return "\n".join(lines)


MEMORY_ORDER = ["SGD", "SAM", "USAM", "ASAM", EIGEN, EIGEN_STATIC, "optax.contrib.sam"]


def excess(stats, sgd, param_bytes, field="peak") -> str:
    """``stats[field] - sgd[field]`` as "+MiB (+× params)"."""
    if not stats or not sgd:
        return "n/a"
    extra = stats[field] - sgd[field]
    return f"{extra / 2**20:+.3f} ({extra / param_bytes:+.2f})"


def format_memory_table(title, breakdown, param_bytes) -> str:
    """Compiled memory of each method's step, and its excess over SGD's in MiB and in
    units of the parameter size (target for SAM: at most 1 extra copy of the
    parameters)."""
    sgd = breakdown.get("SGD")
    lines = [f"#### {title}: compiled memory (parameters {param_bytes / 2**20:.3f} MiB)", "",
             "| method | temp MiB | argument MiB | output MiB | alias MiB | arg+out+temp−alias MiB "
             "| − SGD MiB (× params) | temp − SGD MiB (× params) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in MEMORY_ORDER:
        if name not in breakdown:
            continue
        m = breakdown[name]
        if not m:
            lines.append(f"| {name} | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        cells = " | ".join(f"{m[f] / 2**20:.3f}" for f in (*MEMORY_FIELDS, "peak"))
        lines.append(f"| {name} | {cells} | {excess(m, sgd, param_bytes)} | "
                     f"{excess(m, sgd, param_bytes, 'temp')} |")
    return "\n".join(lines)


def format_batch_table(title, by_batch, param_bytes) -> str:
    """Each method's peak in excess of SGD's at each batch size (``by_batch``: batch
    size -> ``memory_problem`` breakdown): an excess that grows with the batch is
    activation-sized, one that does not scales with the parameters."""
    sizes = sorted(by_batch)
    lines = [f"#### {title}: peak − SGD's, MiB (× params {param_bytes / 2**20:.3f} MiB), "
             "by batch size", "",
             "| method | " + " | ".join(f"batch {b}" for b in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for name in MEMORY_ORDER:
        if name == "SGD" or not all(name in by_batch[b] for b in sizes):
            continue
        cells = " | ".join(excess(by_batch[b][name], by_batch[b].get("SGD"), param_bytes)
                           for b in sizes)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41, help="timing samples per method")
    parser.add_argument("--calls-per-sample", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="5 repeats of 1 call")
    parser.add_argument("--memory-only", action="store_true",
                        help="compile only and print the memory tables (no timing)")
    parser.add_argument("--batch-sizes", default=None,
                        help="with --memory-only: comma-separated batch sizes to compile each "
                             "model at (default: the model's own batch size and twice it)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models, 2 repeats: smoke test, the numbers are not results")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.calls_per_sample = 5, 1
    if args.tiny:
        args.repeats, args.calls_per_sample = 2, 1
        print("tiny: smoke test, tiny models and 2 repeats; the numbers are not results")
    if args.memory_only:
        for name, model, shape in models(args.tiny):
            sizes = ([int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes
                     else [shape[0], 2 * shape[0]])
            by_batch = {}
            for batch_size in dict.fromkeys(sizes):
                title = problem_title(name, batch_size, args.tiny)
                by_batch[batch_size], param_bytes = memory_problem(model, (batch_size, *shape[1:]))
                print(format_memory_table(title + " (Eigen-SAM: its refresh step, caller flag)",
                                          by_batch[batch_size], param_bytes), "\n", flush=True)
            print(format_batch_table(name, by_batch, param_bytes), "\n", flush=True)
        return

    print(f"jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()}, "
          f"devices {jax.devices()}; median of {args.repeats} interleaved samples "
          f"of {args.calls_per_sample} calls\n")
    verdicts, memory_verdicts = [], []
    for title, model, shape in problems(args.tiny):
        medians, minima, memory, breakdown, param_bytes = bench_problem(
            model, shape, args.repeats, args.calls_per_sample)
        print(format_table(title, medians, minima, memory), "\n", flush=True)
        print(format_memory_table(title, breakdown, param_bytes), "\n", flush=True)
        if breakdown.get("SAM") and breakdown.get("SGD"):
            extra = breakdown["SAM"]["peak"] - breakdown["SGD"]["peak"]
            memory_verdicts.append((title, extra / param_bytes, extra / 2**20))
        for label, num, den, target in [
            ("SAM / SGD", "SAM", "SGD", 2.05),
            ("SAM / optax.contrib.sam", "SAM", "optax.contrib.sam", 1.0),
            ("Eigen-SAM / SAM", EIGEN, "SAM", 1.15),
            ("Eigen-SAM (caller refresh) / SAM", EIGEN_STATIC, "SAM", 1.15),
        ]:
            verdicts.append((f"{title}: {label}", medians[num] / medians[den],
                             minima[num] / minima[den], target))
    print("Targets (median ratio, min ratio):")
    for label, by_median, by_min, target in verdicts:
        verdict = "OK" if by_median <= target else ("OK by min" if by_min <= target else "MISSED")
        print(f"  {label} = {by_median:.3f}, {by_min:.3f} (target <= {target}) {verdict}")
    print("Memory target: SAM (arg+out+temp-alias) - SGD's <= 1 copy of the parameters:")
    for title, extra, mib in memory_verdicts:
        print(f"  {title}: {extra:+.2f} x params ({mib:+.3f} MiB) "
              f"{'OK' if extra <= 1.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
