"""LookSAM against the formulas of Liu et al. (2022), Algorithm 1, written out here.

Full steps (count % k == 0): g_s = grad L(w + rho g/||g||), store
g_v = g_s - (<g_s, g> / ||g||^2) g, update = g_s.  Other steps:
update = g + alpha (||g|| / ||g_v||) g_v.  Cost 1 + 1/k gradients per step.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_jax
from sam_jax.optim import LookSAMState, gradient_evals_per_step, registry

A = np.array([3.0, 1.0, 0.5])
B = np.array([0.2, -0.1, 0.3])  # L(w) = 0.5 w^T diag(A) w - B^T w: g not along the axes


def grad_fn(p):
    return {"w": jnp.asarray(A, jnp.float32) * p["w"] - jnp.asarray(B, jnp.float32)}


W0 = np.array([1.0, -2.0, 0.5])


def reference(rho, alpha, k, lr, steps):
    """The updates LookSAM + plain SGD(lr) produce, in float64 numpy."""
    w, g_v, out = W0.copy(), None, []
    for t in range(steps):
        g = A * w - B
        if t % k == 0:
            g_s = A * (w + rho * g / np.linalg.norm(g)) - B
            g_v = g_s - (g_s @ g) / (g @ g) * g
            update = g_s
        else:
            update = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
        out.append(update)
        w = w - lr * update
    return np.array(out)


def run_looksam(rho, alpha, k, lr, steps, host_picker: bool):
    tx = optax.chain(sam_jax.looksam(rho, alpha, k, eps=0.0), optax.sgd(lr))
    params = {"w": jnp.asarray(W0, jnp.float32)}
    state = tx.init(params)
    in_graph = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
    picked = {flag: jax.jit(lambda p, s, f=flag: tx.update(grad_fn(p), s, p, grad_fn=grad_fn,
                                                           looksam_full=f))
              for flag in (False, True)}
    pick = registry.step_picker("looksam", k=k)
    updates = []
    for t in range(steps):
        step = picked[pick(t)] if host_picker else in_graph
        u, state = step(params, state)
        updates.append(-np.asarray(u["w"]) / lr)
        params = optax.apply_updates(params, u)
    return np.array(updates), state


@pytest.mark.parametrize("host_picker", [False, True])
def test_k_plus_one_steps_match_the_formulas(host_picker):
    rho, alpha, k, lr = 0.3, 0.7, 3, 0.1
    got, state = run_looksam(rho, alpha, k, lr, k + 1, host_picker)
    want = reference(rho, alpha, k, lr, k + 1)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert isinstance(state[0], LookSAMState) and int(state[0].count) == k + 1
    # Steps 1 and 2 reuse g_v; step 3 (= k) is a full SAM step again.
    assert not np.allclose(want[1], A * (W0 - lr * want[0]) - B)


def test_first_step_by_hand():
    # w = (1, -2, 0.5): g = (3 - 0.2, -2 + 0.1, 0.25 - 0.3) = (2.8, -1.9, -0.05).
    g = np.array([2.8, -1.9, -0.05])
    rho = np.linalg.norm(g) * 0.1  # eps = 0.1 g
    g_s = g + 0.1 * A * g  # = A (w + 0.1 g) - B
    got, state = run_looksam(rho, 0.7, 2, 0.1, 1, host_picker=False)
    np.testing.assert_allclose(got[0], [2.8 * 1.3, -1.9 * 1.1, -0.05 * 1.05], rtol=1e-5)
    np.testing.assert_allclose(got[0], g_s, rtol=1e-5)
    g_v = g_s - (g_s @ g) / (g @ g) * g
    np.testing.assert_allclose(state[0].orthogonal["w"], g_v, rtol=1e-4, atol=1e-6)
    assert float(state[0].orthogonal_norm) == pytest.approx(np.linalg.norm(g_v), rel=1e-4)


def test_cheap_steps_compute_no_second_gradient():
    tx = sam_jax.looksam(0.1, 0.7, 4)
    params = {"w": jnp.asarray(W0, jnp.float32)}
    state = tx.init(params)
    calls = []

    def counting(p):
        calls.append(1)  # counts traces of the perturbed-gradient evaluation
        return grad_fn(p)

    jax.make_jaxpr(lambda s: tx.update(grad_fn(params), s, params, grad_fn=counting,
                                       looksam_full=False))(state)
    assert calls == []
    jaxpr = jax.make_jaxpr(lambda s: tx.update(grad_fn(params), s, params, grad_fn=counting,
                                               looksam_full=True))(state)
    assert calls == [1] and "cond" not in str(jaxpr)
    assert "cond" in str(jax.make_jaxpr(lambda s: tx.update(grad_fn(params), s, params,
                                                            grad_fn=grad_fn))(state))


def test_declared_cost_picker_and_k_one_is_sam():
    assert gradient_evals_per_step("looksam", k=5) == pytest.approx(1.2)
    assert gradient_evals_per_step("looksam") == pytest.approx(1.1)  # k = 10
    pick = registry.step_picker("looksam", k=3)
    assert [pick(t) for t in range(7)] == [True, False, False, True, False, False, True]
    assert registry.step_kind_arg("looksam") == "looksam_full"
    params = {"w": jnp.asarray(W0, jnp.float32)}
    sam_out, _ = sam_jax.sam(0.2).update(grad_fn(params), sam_jax.sam(0.2).init(params), params,
                                         grad_fn=grad_fn)
    tx = sam_jax.looksam(0.2, k=1)
    state = tx.init(params)
    for _ in range(2):
        out, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        np.testing.assert_array_equal(out["w"], sam_out["w"])
    with pytest.raises(ValueError, match="k must be"):
        sam_jax.looksam(0.1, k=0)


def test_cli_runs_both_without_engine_changes_and_counts_their_cost(tmp_path):
    """`python -m sam_jax.train --phases sgd:2,looksam:1,gsam:1`: grad_evals follows the
    declared costs (5 steps per epoch; LookSAM with k = 5: one full step per epoch)."""
    from sam_jax.train.cli import main
    from sam_jax.train.logging import read_metrics

    workdir = tmp_path / "run"
    rc = main(["--dataset", "mnist1d", "--model", "mlp", "--batch-size", "64",
               "--steps-per-epoch", "5", "--workdir", str(workdir), "--no-progress",
               "--phases", "sgd:2,looksam:1:0.05:k=5,gsam:1:0.1:rho_min=0.02:lr_max=0.1",
               "--lr", "0.1", "--schedule", "cosine"])
    assert rc == 0
    history = read_metrics(str(workdir))
    assert [r["phase"] for r in history] == ["sgd", "sgd", "looksam", "gsam"]
    per_step = [1.0, 1.0, gradient_evals_per_step("looksam", k=5),
                gradient_evals_per_step("gsam")]
    assert per_step == [1.0, 1.0, pytest.approx(1.2), 2.0]
    assert [r["grad_evals"] for r in history] == pytest.approx(list(np.cumsum(per_step) * 5))
    assert history[-1]["grad_evals"] == pytest.approx(5 + 5 + 6 + 10)
    # The declared logged fields reach metrics.jsonl; GSAM's rho follows the step's lr.
    assert history[2]["orthogonal_norm"] > 0
    lr = history[3]["lr"]
    assert history[3]["effective_rho"] == pytest.approx(0.02 + (0.1 - 0.02) * lr / 0.1, rel=1e-5)
    assert json.load(open(os.path.join(workdir, "config.json")))["config"]["phases"].startswith(
        "sgd:2,looksam")



@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices")
def test_per_device_in_graph_schedule_matches_the_shard_formulas(shards):
    """shard_map, per-device epsilon, in-graph cond: a full step then a cheap one."""
    x, y, params, np_grad, step = shards
    rho, alpha = 0.3, 0.7
    tx = sam_jax.looksam(rho, alpha, k=2, eps=0.0, axis_name="data", sync_perturbation=False)
    fn = step(tx)
    state = tx.init(params)
    w = np.asarray(params["w"], np.float64)
    out1, state = fn(params, state, x, y)
    out2, state = fn(params, state, x, y)  # same point: cheap step with the stored g_v
    gs = [np_grad(w, s) for s in range(4)]
    g_s = [np_grad(w + rho * g / np.linalg.norm(g), s) for s, g in enumerate(gs)]
    g_v = np.mean([a - (a @ g) / (g @ g) * g for a, g in zip(g_s, gs)], axis=0)
    np.testing.assert_allclose(out1["w"], np.mean(g_s, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.orthogonal["w"], g_v, rtol=1e-4, atol=1e-6)
    cheap = np.mean([g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v for g in gs], 0)
    np.testing.assert_allclose(out2["w"], cheap, rtol=1e-5, atol=1e-6)
