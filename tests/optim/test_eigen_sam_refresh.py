"""Eigen-SAM's refresh schedule: the released per-epoch counter and the global one.

Right answers written out by hand: the exact refresh counts for small cases, the
cost in gradient evaluations, the in-graph schedule equal to the host-picked one,
and the training engine's default (per-epoch, the released code) and its per-phase
override (``refresh_counter=global``).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from sam_jax.optim import gradient_evals_per_step, registry
from sam_jax.optim.eigen_sam import is_refresh_step, refresh_picker, refreshes_per_epoch


def _refreshes(n, **options):
    pick = refresh_picker(**options)
    return [c for c in range(n) if pick(c)]


# ------------------------------------------------------------------ the rule
def test_epoch_counter_refresh_list():
    # spe 5, k 2: within-epoch indices 2 and 4 -> counts 2,4 | 7,9 | 12,14 | 17,19
    assert _refreshes(20, refresh_every=2, steps_per_epoch=5) == [2, 4, 7, 9, 12, 14, 17, 19]
    assert _refreshes(20, refresh_every=2, steps_per_epoch=5, refresh_counter="epoch") == \
        [2, 4, 7, 9, 12, 14, 17, 19]
    # spe 6, k 3: index 3 only (never index 0) -> 3, 9, 15
    assert _refreshes(18, refresh_every=3, steps_per_epoch=6) == [3, 9, 15]
    # CIFAR, batch 256, drop_last: 195 steps per epoch, k = 100: step 100 of each epoch
    assert _refreshes(3 * 195, refresh_every=100, steps_per_epoch=195) == [100, 295, 490]
    # k >= spe: never
    assert _refreshes(30, refresh_every=5, steps_per_epoch=5) == []


def test_global_counter_refresh_list():
    assert _refreshes(15, refresh_every=2, steps_per_epoch=5, refresh_counter="global") == \
        [2, 4, 6, 8, 10, 12, 14]
    assert _refreshes(15, refresh_every=2) == [2, 4, 6, 8, 10, 12, 14]  # no spe: global
    assert _refreshes(3 * 195, refresh_every=100, refresh_counter="global") == \
        [100, 200, 300, 400, 500]


def test_rule_on_arrays_equals_python_rule():
    counts = jnp.arange(40)
    for kwargs in (dict(steps_per_epoch=7), dict(steps_per_epoch=7, refresh_counter="global"),
                   dict()):
        traced = np.asarray(jax.jit(lambda c: is_refresh_step(c, 3, **kwargs))(counts))
        assert traced.tolist() == [bool(is_refresh_step(c, 3, **kwargs)) for c in range(40)]


def test_bad_counter_options():
    with pytest.raises(ValueError, match="needs steps_per_epoch"):
        sam_jax.eigen_sam(refresh_counter="epoch")
    with pytest.raises(ValueError, match="refresh_counter"):
        sam_jax.eigen_sam(refresh_counter="epochs", steps_per_epoch=3)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        sam_jax.eigen_sam(steps_per_epoch=0)


def test_gradient_evals_per_step():
    # global: 2 + 2 p / k
    assert gradient_evals_per_step("eigen_sam") == pytest.approx(2.1)
    assert gradient_evals_per_step("eigen_sam", refresh_every=100, power_iters=5,
                                   steps_per_epoch=195, refresh_counter="global") == \
        pytest.approx(2.1)
    # per epoch: floor((195-1)/100) = 1 refresh of 5 HVPs per 195 steps
    assert gradient_evals_per_step("eigen_sam", refresh_every=100, power_iters=5,
                                   steps_per_epoch=195) == pytest.approx(2 + 10 / 195)
    # spe 5, k 2, p 1: 2 refreshes per epoch -> (2*5 + 2*2) / 5 = 2.8
    assert gradient_evals_per_step("eigen_sam", refresh_every=2, power_iters=1,
                                   steps_per_epoch=5) == pytest.approx(2.8)
    assert refreshes_per_epoch(100, 195) == 1
    assert refreshes_per_epoch(2, 5) == 2
    assert refreshes_per_epoch(5, 5) == 0


def test_engine_declaration():
    assert registry.engine_kwargs("eigen_sam", {"alpha": 0.1}, steps_per_epoch=9) == \
        {"alpha": 0.1, "steps_per_epoch": 9}
    # the user's value wins; transforms that declare nothing get nothing
    assert registry.engine_kwargs("eigen_sam", {"steps_per_epoch": 4}, steps_per_epoch=9) == \
        {"steps_per_epoch": 4}
    assert registry.engine_kwargs("sam", {}, steps_per_epoch=9) == {}
    assert registry.step_picker("sam") is None
    pick = registry.step_picker("eigen_sam", refresh_every=2, steps_per_epoch=5)
    assert [c for c in range(10) if pick(c)] == [2, 4, 7, 9]


# -------------------------------------------- in-graph schedule == host picker
A = np.diag([5.0, 2.0, 1.0, 0.5])


def _quad_grad(w):
    return jnp.asarray(A, w.dtype) @ w


@pytest.mark.parametrize("counter", ["epoch", "global"])
def test_in_graph_schedule_equals_host_picked(counter):
    """The transform's own cond and the host's picker refresh at the same counts.

    One power iteration per refresh from a random start, so every refresh moves
    ``v``; a refresh is detected as a change of ``v``.
    """
    options = dict(refresh_every=2, power_iters=1, steps_per_epoch=5, refresh_counter=counter)
    tx = sam_jax.eigen_sam(0.05, 0.2, seed=1, **options)
    graph = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=_quad_grad))
    host = {flag: jax.jit(lambda g, s, p, flag=flag: tx.update(g, s, p, grad_fn=_quad_grad,
                                                               eigen_refresh=flag))
            for flag in (False, True)}
    pick = refresh_picker(**options)
    w = jnp.array([1.0, -1.0, 0.5, 2.0])
    s_graph = s_host = tx.init(w)
    refreshed = []
    for count in range(13):
        g = _quad_grad(w)
        before = np.asarray(s_graph.eigenvector)
        out_g, s_graph = graph(g, s_graph, w)
        out_h, s_host = host[pick(count)](g, s_host, w)
        np.testing.assert_allclose(np.asarray(out_g), np.asarray(out_h), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(s_graph.eigenvector),
                                   np.asarray(s_host.eigenvector), rtol=1e-6)
        if not np.allclose(before, np.asarray(s_graph.eigenvector)):
            refreshed.append(count)
        w = w - 0.05 * out_g
    expected = [2, 4, 7, 9, 12] if counter == "epoch" else [2, 4, 6, 8, 10, 12]
    assert refreshed == expected


# ------------------------------------------------------------------- engine
BASE = dict(dataset="mnist1d", model="mlp", model_kwargs={"width": 8}, batch_size=32,
            steps_per_epoch=5, eval_batch_size=500, progress=False, lr=0.05,
            checkpoint_every=100, keep_last=1)


def _run_with_spy(tmp_path, monkeypatch, name, phases, **changes):
    from sam_jax.train import TrainConfig, loop, run

    picks = []
    original = loop.optim_registry.step_picker

    def spying(*args, **kwargs):
        pick = original(*args, **kwargs)
        if pick is None:
            return None

        def recorded(count):
            answer = pick(count)
            picks.append((count, answer))
            return answer
        return recorded

    monkeypatch.setattr(loop.optim_registry, "step_picker", spying)
    result = run(TrainConfig(workdir=str(tmp_path / name), phases=phases, **{**BASE, **changes}))
    return result, [c for c, refreshed in picks if refreshed], [c for c, _ in picks]


@pytest.mark.slow
def test_engine_default_is_per_epoch_and_override_is_global(tmp_path, monkeypatch):
    # 3 epochs of 5 steps, k = 2, p = 1
    result, refreshed, seen = _run_with_spy(
        tmp_path, monkeypatch, "epoch", "eigen_sam:3:0.05:refresh_every=2:power_iters=1")
    assert seen == list(range(15))
    assert refreshed == [2, 4, 7, 9, 12, 14]
    # exact cost: per epoch 2*5 gradients + 2 refreshes * 1 HVP * 2 = 14
    assert [r["grad_evals"] for r in result.history] == pytest.approx([14, 28, 42])

    result_g, refreshed_g, _ = _run_with_spy(
        tmp_path, monkeypatch, "global",
        "eigen_sam:3:0.05:refresh_every=2:power_iters=1:refresh_counter=global")
    assert refreshed_g == [2, 4, 6, 8, 10, 12, 14]
    assert result_g.history[-1]["grad_evals"] == pytest.approx(15 * (2 + 2 * 1 / 2))


def test_engine_in_graph_cond_uses_the_same_per_epoch_rule(tmp_path, monkeypatch):
    """Host-picked and in-graph runs agree under the engine's per-epoch default, so
    the engine hands ``steps_per_epoch`` to the transform in both paths; a phase
    after an SGD phase counts from its own start (an epoch boundary)."""
    phases = "sgd:1,eigen_sam:2:0.05:refresh_every=3:power_iters=2"
    host, refreshed, _ = _run_with_spy(tmp_path, monkeypatch, "host", phases)
    cond, _, _ = _run_with_spy(tmp_path, monkeypatch, "cond", phases,
                               host_step_kinds=False)
    assert refreshed == [3, 8]  # index 3 of each Eigen-SAM epoch (spe 5)
    for a, b in zip(jax.tree.leaves(host.variables), jax.tree.leaves(cond.variables)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([r["eigenvalue"] for r in host.history[1:]],
                               [r["eigenvalue"] for r in cond.history[1:]], rtol=1e-5)
    assert host.history[1]["eigenvalue"] != 0.0  # refreshed within the first epoch
