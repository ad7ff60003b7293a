"""sam_jax's jitted SAM / SGD steps and HVP against PyTorch eager, on one CPU.

Run:  python -m benchmarks.vs_pytorch                 (both thread counts, 1 and 2;
                                                       4-8 min on an idle 2-core
                                                       machine, most of it the
                                                       ResNet-18)
      python -m benchmarks.vs_pytorch --threads 2 --models cnn1d
      python -m benchmarks.vs_pytorch --investigate     (the ResNet-18 gap: XLA CPU
                                                       flags, bfloat16, layouts,
                                                       several CPU devices)
      python -m benchmarks.vs_pytorch --tiny            (smoke test, seconds; the
                                                       numbers are not results)

Needs the ``[bench]`` extra (a CPU PyTorch): ``pip install -e '.[bench]'``.

What is compared (same architecture, parameter count, batch, data and loss; the
parameter counts are printed and asserted equal):

* ``cnn1d``: sam_jax's MNIST-1D CNN (3 strided 1-D convs, 25 channels), batch 32 of
  40-sample signals; ``mlp``: sam_jax's MLP 784-512-512-10, batch 256;
  ``resnet18``: sam_jax's CIFAR ResNet-18 with BatchNorm (width 16 by default,
  ``--resnet-width 64`` for the paper model), batch 64 of 32x32x3 images.
* SAM step. JAX: ``optax.chain(sam_jax.sam(0.05), optax.sgd(0.05, 0.9))`` in one
  jitted step (parameters, BN statistics and optimizer state donated, so it updates
  in place like PyTorch); BN statistics come from the clean pass, the perturbed
  pass's are discarded. PyTorch: davda54/sam's recipe, eager: forward-backward with
  BN updating its running statistics, ``e(w) = rho g / (||g|| + 1e-12)`` added in
  place (``first_step``), a second forward-backward with BN momentum 0
  (``disable_running_stats``), ``w`` restored and ``torch.optim.SGD(momentum=0.9)``
  steps (``second_step``). Test ``tests/test_benchmarks_smoke.py`` checks that the
  two give the same parameters after a step from the same weights.
* SGD step: one forward-backward and SGD with momentum, both sides.
* HVP: ``sam_jax.curvature.hvp`` (forward-over-reverse, jitted) against PyTorch's
  double backward (``torch.autograd.grad(loss, params, create_graph=True)``, then
  the gradient of ``<g, v>``), same model and batch, BN in training mode.

Timing: one process per thread count (JAX's thread pool is fixed when JAX starts).
``--threads k`` sets ``torch.set_num_threads(k)`` (and one inter-op thread) and, for
k = 1, ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``
before JAX is imported; for k >= 2 JAX keeps its default pool (one thread per core:
2 on this machine), so k = 2 is the comparison "both use the whole machine". The
JAX and PyTorch samples are interleaved (A, B, A, B, with the first of each pair
alternating), compilation and 3 warm-up calls are excluded, JAX outputs are
``block_until_ready``-ed, and a sample of a fast step is several calls long (at
least ~20 ms). Reported: median and interquartile range over the samples, the
ratio PyTorch median / JAX median (> 1: sam_jax is faster) and the 1-minute load
average (``/proc/loadavg``) before and after. On a shared machine these numbers are
noisy; the ratios, taken from interleaved samples, are the robust part.

Result here (docs/benchmarks.md has the tables; an otherwise idle 2-core machine,
``--samples 11 --max-case-seconds 30``, 217 s): SAM step on ``cnn1d`` sam_jax 0.83 ms
vs PyTorch 3.88 ms at 2 threads (4.7x faster); ``mlp`` even (1.19x at 1 thread, 0.92x
at 2); ResNet-18 (width 16) PyTorch 1.17x faster at 1 thread and 1.9x at 2 threads
(706 vs 369 ms): XLA:CPU's ResNet step does not speed up with the second thread,
PyTorch's does. HVP faster or even everywhere. Under heavy load PyTorch with 2
threads collapses by 10-70x. ``--investigate``: splitting the batch over 2-4 CPU
devices narrows the 2-thread ResNet gap to 1.2-1.4x; no XLA flag tried helps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = ("cnn1d", "mlp", "resnet18")
STEPS = ("SAM", "SGD", "HVP")
RHO, LR, MOMENTUM = 0.05, 0.05, 0.9

# ResNet-gap attempts for --investigate: (label, extra XLA_FLAGS, options).
INVESTIGATIONS = [
    ("baseline (float32, NHWC, default flags)", "", {}),
    ("--xla_cpu_use_thunk_runtime=false", "--xla_cpu_use_thunk_runtime=false", {}),
    ("--xla_cpu_use_onednn=true", "--xla_cpu_use_onednn=true", {}),
    ("--xla_cpu_use_xnnpack=true", "--xla_cpu_use_xnnpack=true", {}),
    ("bfloat16 params + inputs (both frameworks)", "", {"dtype": "bfloat16"}),
    ("PyTorch channels_last (NHWC) memory format", "", {"channels_last": True}),
    # Narrower YNNPACK fusion sets (jaxlib 0.10.2's default compiles like
    # individual_convolution,individual_dot,reduce).
    ("YNNPACK: convolutions only",
     "--xla_cpu_experimental_ynn_fusion_type=individual_convolution", {}),
    ("YNNPACK: convolutions and dots only",
     "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot", {}),
    # Data parallelism inside one process: the batch split over 2 CPU devices (each
    # runs its half of every convolution on its own thread), BN statistics and
    # gradients all-reduced: the same step as one device (synced perturbation).
    ("2 CPU devices, batch split in halves", "", {"devices": 2}),
    ("2 CPU devices, single-threaded Eigen per device", "--xla_cpu_multi_thread_eigen=false",
     {"devices": 2}),
    ("4 CPU devices, batch split in quarters", "", {"devices": 4}),
    ("8 CPU devices, batch split in eighths", "", {"devices": 8}),
]


# --------------------------------------------------------------------------- models


def problem(name: str, tiny: bool = False, resnet_width: int = 16):
    """(JAX module, input shape as JAX sees it, input shape as PyTorch sees it)."""
    from sam_jax.models import get_model

    if name == "cnn1d":
        width, batch = (4, 4) if tiny else (25, 32)
        return get_model("cnn1d", 10, width=width), (batch, 40), (batch, 1, 40)
    if name == "mlp":
        width, batch, dim = (8, 4, 12) if tiny else (512, 256, 784)
        return get_model("mlp", 10, width=width, depth=2), (batch, dim), (batch, dim)
    if name == "resnet18":
        width, batch, side = (4, 4, 8) if tiny else (resnet_width, 64, 32)
        return (get_model("resnet18", 10, width=width), (batch, side, side, 3),
                (batch, 3, side, side))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def torch_model(name: str, tiny: bool = False, resnet_width: int = 16):
    """The PyTorch twin of ``problem(name)``'s module (same layers, same order)."""
    import torch
    from torch import nn

    if name == "cnn1d":
        width = 4 if tiny else 25

        class CNN1D(nn.Module):  # Greydanus' ConvBase, as sam_jax.models.CNN1D
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv1d(1, width, 5, stride=2, padding=1)
                self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
                self.conv3 = nn.Conv1d(width, width, 3, stride=2, padding=1)
                self.linear = nn.Linear(width * 5, 10)

            def forward(self, x):
                x = torch.relu(self.conv1(x))
                x = torch.relu(self.conv2(x))
                x = torch.relu(self.conv3(x))
                return self.linear(x.flatten(1))

        return CNN1D()
    if name == "mlp":
        width, dim = (8, 12) if tiny else (512, 784)
        return nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width),
                             nn.ReLU(), nn.Linear(width, 10))
    if name == "resnet18":
        width = 4 if tiny else resnet_width

        def bn(c):
            return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)

        class BasicBlock(nn.Module):  # kuangliu/pytorch-cifar, as sam_jax.models.resnet
            def __init__(self, cin, cout, stride):
                super().__init__()
                self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
                self.bn1 = bn(cout)
                self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
                self.bn2 = bn(cout)
                self.shortcut = nn.Sequential()
                if stride != 1 or cin != cout:
                    self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

            def forward(self, x):
                out = torch.relu(self.bn1(self.conv1(x)))
                out = self.bn2(self.conv2(out))
                return torch.relu(out + self.shortcut(x))

        class ResNet18(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
                self.bn1 = bn(width)
                blocks, cin = [], width
                for stage in range(4):
                    for index in range(2):
                        cout = width * 2**stage
                        blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and index == 0 else 1))
                        cin = cout
                self.blocks = nn.Sequential(*blocks)
                self.linear = nn.Linear(cin, 10)

            def forward(self, x):
                out = torch.relu(self.bn1(self.conv1(x)))
                out = self.blocks(out)
                return self.linear(out.mean(dim=(2, 3)))

        return ResNet18()
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def jax_param_count(params) -> int:
    import jax

    return int(sum(leaf.size for leaf in jax.tree.leaves(params)))


def torch_param_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _flax_layers(tree, prefix=()):
    """Leaf layers (dicts of arrays) of a Flax variable tree in creation order."""
    import numpy as np

    if all(not isinstance(v, dict) and hasattr(v, "shape") for v in tree.values()):
        return [(prefix, {k: np.array(v) for k, v in tree.items()})]  # writable copies
    out = []
    for key, value in tree.items():  # linen keeps creation order
        out += _flax_layers(value, prefix + (key,))
    return out


def flax_path(name: str, torch_name: str) -> tuple[str, ...]:
    """The Flax variable path of a PyTorch twin's leaf layer (by its module name)."""
    parts = torch_name.split(".")
    if name == "mlp":  # Sequential(Linear, ReLU, Linear, ReLU, Linear)
        return (f"Dense_{int(parts[0]) // 2}",)
    if name == "cnn1d":
        return ("Dense_0",) if parts[0] == "linear" else (f"Conv_{int(parts[0][-1]) - 1}",)
    top = {"conv1": "Conv_0", "bn1": "BatchNorm_0", "linear": "Dense_0"}
    if parts[0] != "blocks":
        return (top[parts[0]],)
    inner = {"conv1": "Conv_0", "bn1": "BatchNorm_0", "conv2": "Conv_1", "bn2": "BatchNorm_1",
             "shortcut.0": "Conv_2", "shortcut.1": "BatchNorm_2"}
    return (f"BasicBlock_{parts[1]}", inner[".".join(parts[2:])])


def copy_jax_to_torch(name: str, variables, model) -> None:
    """Load Flax ``variables`` ({'params', ['batch_stats']}) into the PyTorch twin."""
    import numpy as np
    import torch

    params = dict(_flax_layers(dict(variables["params"])))
    stats = dict(_flax_layers(dict(variables.get("batch_stats", {}))))
    leaves = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear,
                                torch.nn.BatchNorm2d))]
    assert len(leaves) == len(params), (len(leaves), len(params))
    with torch.no_grad():
        for torch_name, module in leaves:
            path = flax_path(name, torch_name)
            layer = params[path]
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(torch.from_numpy(layer["scale"]))
                module.bias.copy_(torch.from_numpy(layer["bias"]))
                module.running_mean.copy_(torch.from_numpy(stats[path]["mean"]))
                module.running_var.copy_(torch.from_numpy(stats[path]["var"]))
                continue
            kernel = layer["kernel"]
            if isinstance(module, torch.nn.Linear):
                if name == "cnn1d":  # Flax flattens (N, L, C), PyTorch (N, C, L)
                    length = 5  # 40 -> 19 -> 10 -> 5 samples
                    channels = kernel.shape[0] // length
                    kernel = kernel.reshape(length, channels, -1).transpose(1, 0, 2).reshape(
                        kernel.shape[0], -1)
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
            else:
                axes = (2, 1, 0) if kernel.ndim == 3 else (3, 2, 0, 1)
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.transpose(axes))))
            if module.bias is not None:
                module.bias.copy_(torch.from_numpy(layer["bias"]))


def torch_input(name: str, x):
    """The JAX-layout input array as PyTorch's layout (NCL / NCHW)."""
    import numpy as np

    if name == "cnn1d":
        return np.ascontiguousarray(x[:, None, :])
    if name == "resnet18":
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


# ---------------------------------------------------------------------- JAX side


def batch_sharding(devices: int):
    """(batch split over the first ``devices`` devices, replicated): the engine's data mesh."""
    from sam_jax.train import parallel

    mesh = parallel.make_mesh(devices)
    return parallel.batch_sharded(mesh), parallel.replicated(mesh)


def jax_steps(module, dtype: str = "float32", precision: str | None = None,
              devices: int = 1):
    """Jitted (SAM step, SGD step, HVP) for a Flax module.

    Steps: ``(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state,
    loss)`` with the first three donated. HVP: ``(params, batch_stats, x, y, v) -> Hv``.
    ``devices > 1``: the batch is split over that many devices and the rest
    replicated (XLA all-reduces the gradients and BN statistics, so the step is the
    one-device step).
    """
    import jax
    import jax.numpy as jnp
    import optax

    import sam_jax
    from sam_jax.curvature import hvp

    def loss_and_stats(params, batch_stats, x, y):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
            logits, new = module.apply(variables, x, train=True, mutable=["batch_stats"])
            new_stats = new["batch_stats"]
        else:
            logits, new_stats = module.apply(variables, x, train=True), batch_stats
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
        return loss, new_stats

    def make(tx):
        def step(params, batch_stats, opt_state, x, y):
            (loss, new_stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(
                params, batch_stats, x, y)
            # The perturbed pass uses batch statistics; its running-stat update is dropped.
            grad_fn = lambda p: jax.grad(lambda q: loss_and_stats(q, batch_stats, x, y)[0])(p)  # noqa: E731
            updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), new_stats, opt_state, loss

        if precision is not None:
            inner = step

            def step(*args):
                with jax.default_matmul_precision(precision):
                    return inner(*args)

        if devices > 1:
            data, repl = batch_sharding(devices)
            return tx, jax.jit(step, donate_argnums=(0, 1, 2),
                               in_shardings=(repl, repl, repl, data, data),
                               out_shardings=repl)
        return tx, jax.jit(step, donate_argnums=(0, 1, 2))

    base = lambda: optax.sgd(LR, momentum=MOMENTUM)  # noqa: E731
    sam = make(optax.chain(sam_jax.sam(RHO), base()))
    sgd = make(optax.chain(sam_jax.make_perturbation("sgd"), base()))

    def hvp_fn(params, batch_stats, x, y, vector):
        return hvp(lambda p: loss_and_stats(p, batch_stats, x, y)[0], params, vector)

    return sam, sgd, jax.jit(hvp_fn)


def jax_init(module, x_shape, dtype: str = "float32", seed: int = 0):
    import jax
    import jax.numpy as jnp

    variables = module.init(jax.random.key(seed), jnp.zeros(x_shape, jnp.float32), train=True)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    if dtype != "float32":
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    return params, stats


# ------------------------------------------------------------------- PyTorch side


class DavdaSAM:
    """davda54/sam's ``SAM`` optimizer (non-adaptive), its ``first_step`` /
    ``second_step`` and ``disable_running_stats`` / ``enable_running_stats``."""

    def __init__(self, params, rho, lr, momentum):
        import torch

        self.torch = torch
        self.params = [p for p in params]
        self.rho = rho
        self.base = torch.optim.SGD(self.params, lr=lr, momentum=momentum)
        self.old = {}

    def zero_grad(self):
        self.base.zero_grad()

    def first_step(self, zero_grad=False):
        torch = self.torch
        with torch.no_grad():
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
            scale = self.rho / (grad_norm + 1e-12)
            for p in self.params:
                if p.grad is None:
                    continue
                self.old[p] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    def second_step(self, zero_grad=False):
        with self.torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    continue
                p.data = self.old[p]
        self.base.step()
        if zero_grad:
            self.zero_grad()


def _set_bn_momentum(model, restore: bool):
    from torch.nn.modules.batchnorm import _BatchNorm

    for module in model.modules():
        if isinstance(module, _BatchNorm):
            if restore:
                if hasattr(module, "backup_momentum"):
                    module.momentum = module.backup_momentum
            else:
                module.backup_momentum = module.momentum
                module.momentum = 0


def disable_running_stats(model):
    _set_bn_momentum(model, restore=False)


def enable_running_stats(model):
    _set_bn_momentum(model, restore=True)


def torch_steps(model, x, y, vector=None):
    """(SAM step, SGD step, HVP) closures on fixed tensors ``x``, ``y``; the HVP
    multiplies ``vector`` (a list like ``model.parameters()``; default Gaussian)."""
    import torch
    import torch.nn.functional as F

    sam_opt = DavdaSAM(model.parameters(), RHO, LR, MOMENTUM)
    sgd_opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def sam_step():  # davda54/sam train.py
        enable_running_stats(model)
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        sam_opt.first_step(zero_grad=True)
        disable_running_stats(model)
        F.cross_entropy(model(x).float(), y).backward()
        sam_opt.second_step(zero_grad=True)
        enable_running_stats(model)
        return loss

    def sgd_step():
        sgd_opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        sgd_opt.step()
        return loss

    params = [p for p in model.parameters()]
    if vector is None:
        vector = [torch.randn_like(p) for p in params]

    def hvp():
        disable_running_stats(model)
        loss = F.cross_entropy(model(x).float(), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        out = torch.autograd.grad(dot, params)
        enable_running_stats(model)
        return out

    return sam_step, sgd_step, hvp


# ---------------------------------------------------------------------- timing


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _summary(samples):
    q = (statistics.quantiles(samples, n=4, method="inclusive") if len(samples) >= 2
         else [samples[0]] * 3)
    return {"median": statistics.median(samples), "q1": q[0], "q3": q[2], "n": len(samples)}


def bench_model(name: str, samples: int, tiny: bool, resnet_width: int, steps=STEPS,
                dtype: str = "float32", precision: str | None = None,
                channels_last: bool = False, min_sample_s: float = 0.02,
                max_case_s: float = float("inf"), min_samples: int = 5,
                devices: int = 1) -> dict:
    """Interleaved timings of JAX and PyTorch for one model (in this process)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    module, x_shape, _ = problem(name, tiny, resnet_width)
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=x_shape).astype(np.float32)
    y_np = rng.integers(0, 10, size=x_shape[0])
    tmodel = torch_model(name, tiny, resnet_width)
    params, stats = jax_init(module, x_shape, dtype)
    n_jax, n_torch = jax_param_count(params), torch_param_count(tmodel)
    assert n_jax == n_torch, f"{name}: JAX {n_jax} vs PyTorch {n_torch} parameters"

    x = jnp.asarray(x_np, dtype)
    y = jnp.asarray(y_np, jnp.int32)
    tx_t = torch.from_numpy(torch_input(name, x_np))
    ty_t = torch.from_numpy(y_np.astype(np.int64))
    if dtype == "bfloat16":
        tmodel = tmodel.to(torch.bfloat16)
        tx_t = tx_t.to(torch.bfloat16)
    if channels_last:
        tmodel = tmodel.to(memory_format=torch.channels_last)
        tx_t = tx_t.contiguous(memory_format=torch.channels_last)
    (sam_tx, sam_jit), (sgd_tx, sgd_jit), hvp_jit = jax_steps(module, dtype, precision, devices)
    place = lambda tree: tree  # noqa: E731
    if devices > 1:  # the batch split over the devices, everything else replicated
        data, repl = batch_sharding(devices)
        x, y = jax.device_put((x, y), data)
        place = lambda tree: jax.device_put(tree, repl)  # noqa: E731
    t_sam, t_sgd, t_hvp = torch_steps(tmodel, tx_t, ty_t)

    cases = {}
    compile_s = {}
    for step in steps:
        if step in ("SAM", "SGD"):
            tx, fn = (sam_tx, sam_jit) if step == "SAM" else (sgd_tx, sgd_jit)
            state = {"args": place((jax.tree.map(jnp.copy, params),
                                    jax.tree.map(jnp.copy, stats), tx.init(params)))}
            start = time.perf_counter()
            compiled = fn.lower(*state["args"], x, y).compile()
            compile_s[step] = time.perf_counter() - start

            def run_jax(compiled=compiled, state=state):
                out = compiled(*state["args"], x, y)
                state["args"] = out[:3]
                return out[3]

            run_torch = t_sam if step == "SAM" else t_sgd
        else:
            vector = jax.tree.map(lambda a: jnp.ones_like(a) * 0.01, params)
            start = time.perf_counter()
            compiled = hvp_jit.lower(params, stats, x, y, vector).compile()
            compile_s[step] = time.perf_counter() - start

            def run_jax(compiled=compiled, vector=vector):
                return compiled(params, stats, x, y, vector)

            run_torch = t_hvp
        for _ in range(3):  # warm-up
            jax.block_until_ready(run_jax())
            run_torch()
        # calls per sample so that a sample lasts >= min_sample_s (fast steps)
        start = time.perf_counter()
        jax.block_until_ready(run_jax())
        run_torch()
        once = time.perf_counter() - start
        calls = max(1, min(50, int(min_sample_s / max(once / 2, 1e-6)) + 1)) if not tiny else 1
        cases[step] = (run_jax, run_torch, calls)

    results = {}
    load_before = load_average()
    times = {(step, fw): [] for step in cases for fw in ("jax", "torch")}
    spent = {step: 0.0 for step in cases}
    for index in range(samples):
        for step, (run_jax, run_torch, calls) in cases.items():
            if index >= min_samples and spent[step] > max_case_s:
                continue  # this case's time budget is spent (a slow case on a busy machine)
            order = ("jax", "torch") if index % 2 == 0 else ("torch", "jax")
            for fw in order:
                start = time.perf_counter()
                if fw == "jax":
                    for _ in range(calls):
                        out = run_jax()
                    jax.block_until_ready(out)
                else:
                    for _ in range(calls):
                        run_torch()
                spent[step] += time.perf_counter() - start
                times[(step, fw)].append((time.perf_counter() - start) / calls)
    load_after = load_average()
    for step, (_, _, calls) in cases.items():
        results[step] = {"jax": _summary(times[(step, "jax")]),
                         "torch": _summary(times[(step, "torch")]),
                         "calls_per_sample": calls, "jax_compile_s": compile_s[step]}
    return {"model": name, "params_jax": n_jax, "params_torch": n_torch,
            "x_shape": list(x_shape), "steps": results,
            "load_before": load_before, "load_after": load_after}


def worker(args) -> dict:
    """Measure in this process (JAX must not be imported yet, so the flags apply)."""
    threads = args.threads[0]
    if "jax" in sys.modules:
        print("warning: JAX already imported; XLA_FLAGS of this run do not apply", file=sys.stderr)
    flags = os.environ.get("XLA_FLAGS", "")
    if threads == 1:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    if args.xla_flags:
        flags += " " + args.xla_flags
    os.environ["XLA_FLAGS"] = flags.strip()
    import jax
    import torch

    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    info = {"threads": threads, "xla_flags": os.environ["XLA_FLAGS"], "jax": jax.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "models": []}
    for name in args.models:
        info["models"].append(bench_model(
            name, args.samples, args.tiny, args.resnet_width, steps=args.steps,
            dtype=args.dtype, precision=args.precision, channels_last=args.channels_last,
            max_case_s=args.max_case_seconds, devices=args.devices))
    return info


def _spawn(argv: list[str], timeout: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.vs_pytorch", "--worker", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {argv} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- tables

COLUMNS = ["model", "params JAX", "params torch", "step", "threads", "n", "JAX ms", "JAX IQR",
           "torch ms", "torch IQR", "torch/JAX", "load"]


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else (f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}")


def table_rows(runs: list[dict]) -> list[list[str]]:
    rows = []
    for run in runs:
        for model in run["models"]:
            for step, r in model["steps"].items():
                j, t = r["jax"], r["torch"]
                rows.append([
                    model["model"], f"{model['params_jax']:,}", f"{model['params_torch']:,}", step,
                    str(run["threads"]), str(j["n"]), _fmt_ms(j["median"]),
                    f"{_fmt_ms(j['q1'])}-{_fmt_ms(j['q3'])}", _fmt_ms(t["median"]),
                    f"{_fmt_ms(t['q1'])}-{_fmt_ms(t['q3'])}",
                    f"{t['median'] / j['median']:.2f}",
                    f"{model['load_before']:.1f}->{model['load_after']:.1f}"])
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    right = lambda i: i > 0  # noqa: E731
    def line(cells):
        return "| " + " | ".join(c.rjust(w) if right(i) else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if right(i) else "-" * (w + 2)
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def sam_over_sgd_rows(runs: list[dict]) -> list[list[str]]:
    rows = []
    for run in runs:
        for model in run["models"]:
            s = model["steps"]
            if "SAM" in s and "SGD" in s:
                rows.append([model["model"], str(run["threads"]),
                             f"{s['SAM']['jax']['median'] / s['SGD']['jax']['median']:.2f}",
                             f"{s['SAM']['torch']['median'] / s['SGD']['torch']['median']:.2f}"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2],
                        help="comma-separated thread counts, one process each (default 1,2)")
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    parser.add_argument("--steps", type=lambda s: s.split(","), default=list(STEPS))
    parser.add_argument("--samples", type=int, default=21, help="interleaved samples per case")
    parser.add_argument("--resnet-width", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="tiny models, 2 samples: smoke test")
    parser.add_argument("--investigate", action="store_true",
                        help="the ResNet-18 SAM step under the attempts in INVESTIGATIONS")
    parser.add_argument("--max-case-seconds", type=float, default=120.0,
                        help="stop sampling a case (both frameworks) after this much timed "
                             "wall time, once it has 5 samples; the table's n says how many")
    parser.add_argument("--attempts", type=lambda s: [int(t) for t in s.split(",")], default=None,
                        help="with --investigate: indices into INVESTIGATIONS (default all)")
    parser.add_argument("--json", help="also write the raw results here")
    # worker-only options
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--xla-flags", default="", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.samples = min(args.samples, 2)
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {MODELS}")

    if args.worker:
        result = worker(args)
        if args.json:  # the worker's own copy, kept even if the parent dies
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        print(json.dumps(result))
        return None

    common = ["--samples", str(args.samples), "--resnet-width", str(args.resnet_width),
              "--max-case-seconds", str(args.max_case_seconds)]
    if args.tiny:
        common.append("--tiny")
        print("tiny: smoke test, tiny models and 2 samples; the numbers are not results\n")
    start = time.perf_counter()
    if args.investigate:
        threads = args.threads[-1]
        print(f"ResNet-18 (width {args.resnet_width}, batch 64) SAM step, {threads} threads, "
              f"one process per attempt, {args.samples} interleaved samples\n")
        rows, raw = [], []
        for index, (label, flags, options) in enumerate(INVESTIGATIONS):
            if args.attempts and index not in args.attempts:
                continue
            argv_w = [*common, "--threads", str(threads), "--models", "resnet18", "--steps", "SAM"]
            if flags:
                argv_w.append(f"--xla-flags={flags}")  # "=": the value starts with "--"
            if "precision" in options:
                argv_w += ["--precision", options["precision"]]
            if "dtype" in options:
                argv_w += ["--dtype", options["dtype"]]
            if options.get("channels_last"):
                argv_w.append("--channels-last")
            if options.get("devices", 1) > 1:
                argv_w += ["--devices", str(options["devices"])]
            try:
                run = _spawn(argv_w)
            except RuntimeError as error:
                rows.append([label, "failed", "", "", "", "", str(error).splitlines()[-1][:60]])
                print(rows[-1], flush=True)
                continue
            raw.append({"label": label, **run})
            m = run["models"][0]
            r = m["steps"]["SAM"]
            rows.append([label, _fmt_ms(r["jax"]["median"]), _fmt_ms(r["torch"]["median"]),
                         f"{r['torch']['median'] / r['jax']['median']:.2f}",
                         f"{r['jax_compile_s']:.0f}",
                         f"{m['load_before']:.1f}->{m['load_after']:.1f}", ""])
            print(format_table(["attempt", "JAX ms", "torch ms", "torch/JAX", "compile s", "load",
                                "note"], rows[-1:]), flush=True)
        print()
        print(format_table(["attempt", "JAX ms", "torch ms", "torch/JAX", "compile s", "load",
                            "note"], rows))
        results = {"investigate": raw}
    else:
        runs = []
        for threads in args.threads:
            run = _spawn([*common, "--threads", str(threads), "--models", ",".join(args.models),
                          "--steps", ",".join(args.steps)])
            runs.append(run)
            print(f"threads {threads}: jax {run['jax']}, torch {run['torch']} "
                  f"(torch threads {run['torch_threads']}), XLA_FLAGS='{run['xla_flags']}'",
                  flush=True)
        print()
        print(format_table(COLUMNS, table_rows(runs)))
        print("\nmedian ms per call; IQR = 25th-75th percentile; torch/JAX > 1: sam_jax faster; "
              "load = 1-min load average before->after (2 cores)\n")
        print(format_table(["model", "threads", "JAX SAM/SGD", "torch SAM/SGD"],
                           sam_over_sgd_rows(runs)))
        results = {"runs": runs}
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
