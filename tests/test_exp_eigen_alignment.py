"""experiments/eigen_alignment: the measurements against right answers, and the tiny run.

* the minibatch top eigenpair (library Lanczos) equals a dense ``eigh`` of the
  minibatch Hessian on a model small enough to build it;
* the probe's ε (read from the library transform through a spy ``grad_fn``) equals
  SAM's ``ρ ĝ`` and Eigen-SAM's ``ρ (ĝ + α sign⟨g,v⟩ (v − ⟨ĝ,v⟩ ĝ))``;
* the paired differences and verdicts on hand-made runs with known t-intervals;
* ``--scale tiny`` through ``main``: results.json's structure, the refresh count of
  the per-epoch schedule, identities (SAM's |cos(ε,v₁)| = |cos(g,v₁)|; Eigen-SAM's
  ε before its first refresh is ρ g, so the same; every optimizer measures the same
  point at step 0), and the summary and verdicts recomputed from the per-seed runs.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments import eigen_alignment as ea

SMALL = ea.Setting("mnist1d_cnn1d", "mnist1d", "cnn1d", dataset_kwargs={"num_samples": 600},
                   model_kwargs={"width": 2}, epochs=1, batch_size=16, refresh_every=3,
                   power_iters=3, lanczos_steps=40, rho=0.1, alpha=0.2)


@pytest.fixture(scope="module")
def ctx():
    return ea._Compiled(SMALL)


@pytest.fixture(scope="module")
def batch(ctx):
    return next(ctx.train.batches(SMALL.batch_size, seed=0, epoch=0))


def test_minibatch_eigenpair_matches_dense_hessian(ctx, batch):
    params = ctx.init(jax.random.key(0))["params"]
    flat, unravel = ravel_pytree(params)

    def loss(w):
        total, count = ctx.loss_fn(unravel(w), batch)
        return total / count

    hessian = np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64)
    values, vectors = np.linalg.eigh((hessian + hessian.T) / 2)
    value, v1, residual = ctx.minibatch_top_eigenpair(params, batch, seed=0)
    np.testing.assert_allclose(value, values[-1], rtol=1e-3)
    assert abs(abs(v1 @ vectors[:, -1]) - 1) < 1e-3
    assert residual < 1e-2


def test_probe_epsilon_is_the_library_perturbation(ctx, batch):
    rho, alpha = SMALL.rho, SMALL.alpha
    # SAM: epsilon = rho g / (||g|| + 1e-12)
    state = ctx.new_state("sam", 0)
    g, eps, _ = ctx.probes["sam", None](state, batch)
    g, eps = ctx.ravel(g), ctx.ravel(eps)
    np.testing.assert_allclose(eps, rho * g / (np.linalg.norm(g) + 1e-12), rtol=1e-4,
                               atol=1e-7)
    # Eigen-SAM before any refresh: the released pre-estimate rho * g (unnormalized)
    state = ctx.new_state("eigen_sam", 0)
    g, eps, _ = ctx.probes["eigen_sam", False](state, batch)
    np.testing.assert_allclose(ctx.ravel(eps), rho * ctx.ravel(g), rtol=1e-4, atol=1e-7)
    # after one refresh step (count 3 is index 3 of the epoch: a refresh)
    assert ctx.pickers["eigen_sam"](3) and not ctx.pickers["eigen_sam"](4)
    step_fn = ctx.steps["eigen_sam", True]
    state = state._replace(opt_state=(state.opt_state[0]._replace(count=jnp.asarray(3)),
                                      *state.opt_state[1:]))
    state, _ = step_fn(state, batch, np.float32(0.01), np.zeros(2, np.uint32))
    g, eps, v = (ctx.ravel(t) for t in ctx.probes["eigen_sam", False](state, batch))
    np.testing.assert_allclose(v, ctx.ravel(state.opt_state[0].eigenvector), rtol=1e-6)
    g_hat = g / (np.linalg.norm(g) + 1e-12)
    expected = rho * (g_hat + alpha * np.sign(g @ v) * (v - (g_hat @ v) * g_hat))
    np.testing.assert_allclose(eps, expected, rtol=1e-4, atol=1e-7)


def test_cnn6_takes_digits_8x8_inputs():
    from sam_jax.data import get_dataset
    from sam_jax.models import get_model

    digits = get_dataset("digits", "train")
    assert digits.input_shape == (8, 8, 1)
    model = get_model("cnn6", 10, width=2)
    x = jnp.asarray(digits.arrays()["x"][:4])
    variables = model.init(jax.random.key(0), x, train=False)
    assert model.apply(variables, x, train=False).shape == (4, 10)


def _t_interval(values):
    """Mean and 95 % Student-t interval, computed here with scipy."""
    from scipy import stats

    d = np.asarray(values, np.float64)
    half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return d.mean(), d.mean() - half, d.mean() + half


def _check_summary_against_runs(per_seed, summary, verdict):
    """The paired λ_max / |cos| differences and every verdict, recomputed from the
    per-seed runs (final λ_max, mean |cos(ε, v1)|) with scipy's t-interval."""
    seeds = sorted(per_seed, key=int)

    def final_lambda(name):
        return np.array([per_seed[s][name]["curve"]["lambda_max"][-1] for s in seeds])

    def mean_cos(name):
        return np.array([np.mean(per_seed[s][name]["align"]["cos_eps_v1"]) for s in seeds])

    diffs = {"lambda_eigen_minus_sam": final_lambda("eigen_sam") - final_lambda("sam"),
             "lambda_eigen_minus_sgd": final_lambda("eigen_sam") - final_lambda("sgd"),
             "lambda_sam_minus_sgd": final_lambda("sam") - final_lambda("sgd"),
             "cos_eps_eigen_minus_sam": mean_cos("eigen_sam") - mean_cos("sam")}
    intervals = {k: _t_interval(d) for k, d in diffs.items()}
    for key, expected in intervals.items():
        got = summary["paired"][key]
        assert got["n"] == len(seeds)
        np.testing.assert_allclose([got["mean"], got["ci_low"], got["ci_high"]], expected,
                                   rtol=1e-9, atol=1e-12, err_msg=key)
    _, _, sam_high = _t_interval(mean_cos("sam"))
    assert {k: v["holds"] for k, v in verdict.items()} == {
        "sam_poorly_aligned": sam_high < ea.POOR_ALIGNMENT,
        "eigen_sam_better_aligned": intervals["cos_eps_eigen_minus_sam"][1] > 0,
        "eigen_sam_lower_lambda_than_sam": intervals["lambda_eigen_minus_sam"][2] < 0,
        "eigen_sam_lower_lambda_than_sgd": intervals["lambda_eigen_minus_sgd"][2] < 0,
        "sam_lower_lambda_than_sgd": intervals["lambda_sam_minus_sgd"][2] < 0}


def _fake_run(final_lambda, cos_eps):
    return {"align": {"step": [0, 3], "cos_g_v1": [0.3, 0.3], "cos_eps_v1": [cos_eps, cos_eps],
                      "cos_v_v1": [0.9, 0.9], "lambda_batch": [1.0, 1.0],
                      "lanczos_rel_residual": [1e-4, 1e-4], "refresh": [False, False]},
            "curve": {"step": [0, 6], "lambda_max": [5.0, final_lambda], "train_loss": [2.0, 1.0],
                      "train_acc": [0.1, 0.6], "test_loss": [2.0, 1.1], "test_acc": [0.1, 0.5]},
            "refreshes": 0}


def test_summary_and_verdict_on_hand_made_runs():
    """Three seeds with known paired differences: Eigen-SAM − SAM final λ_max is
    (−1.0, −0.8, −1.2): mean −1, sd 0.2, 95 % half-width t(0.975, 2) 0.2/√3 with
    t = 4.3027 (tables): below 0. SAM's mean |cos| (0.3, 0.5, 0.4) + half-width
    4.3027 · 0.1/√3 = 0.648 is not < 0.5; Eigen-SAM − SAM |cos| (0.05, −0.05, 0.15)
    has an interval containing 0."""
    lam = {"sgd": (3.0, 3.2, 2.8), "sam": (2.0, 2.1, 1.9), "eigen_sam": (1.0, 1.3, 0.7)}
    cos = {"sgd": (0.3, 0.3, 0.3), "sam": (0.3, 0.5, 0.4), "eigen_sam": (0.35, 0.45, 0.55)}
    per_seed = {seed: {name: _fake_run(lam[name][i], cos[name][i]) for name in ea.OPTIMIZERS}
                for i, seed in enumerate((0, 1, 2))}
    summary = ea.summarize(per_seed)
    verdict = ea.verdict(summary)
    paired = summary["paired"]["lambda_eigen_minus_sam"]
    half = 4.302652729749464 * 0.2 / np.sqrt(3)
    assert paired["n"] == 3 and paired["mean"] == pytest.approx(-1.0)
    assert paired["ci_high"] == pytest.approx(-1.0 + half) and paired["ci_low"] == pytest.approx(-1.0 - half)
    assert summary["sam_mean_cos"]["ci_half_width"] == pytest.approx(4.302652729749464 * 0.1 / np.sqrt(3))
    assert {k: v["holds"] for k, v in verdict.items()} == {
        "sam_poorly_aligned": False, "eigen_sam_better_aligned": False,
        "eigen_sam_lower_lambda_than_sam": True, "eigen_sam_lower_lambda_than_sgd": True,
        "sam_lower_lambda_than_sgd": True}
    _check_summary_against_runs(per_seed, summary, verdict)


@pytest.mark.slow
def test_tiny_scale_end_to_end(tmp_path):
    results = ea.main(["--scale", "tiny", "--workdir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == "eigen_alignment" and saved["scale"] == "tiny"
    assert saved["results"]["smoke_test"] is True
    for name in saved["figures"]:
        assert (tmp_path / name).exists() and (tmp_path / name).with_suffix(".pdf").exists()
    setting = saved["results"]["settings"]["mnist1d_cnn1d"]
    spe = setting["steps_per_epoch"]
    assert spe == 480 // 64 and setting["refreshes_per_epoch"] == (spe - 1) // 4 == 1
    assert set(setting["per_seed"]) == {"0", "1"}
    for seed_runs in setting["per_seed"].values():
        for name in ea.OPTIMIZERS:
            run = seed_runs[name]
            assert run["align"]["step"] == list(range(0, 2 * spe, 3))
            assert run["curve"]["step"] == [0, spe, 2 * spe]
            lengths = {len(v) for v in run["align"].values()}
            assert lengths == {len(run["align"]["step"])}
        # Paired design: at step 0 every optimizer has the seed's initialization and
        # the same minibatch, so the measurements there agree (a per-optimizer init or
        # data order would break this).
        first = {name: seed_runs[name] for name in ea.OPTIMIZERS}
        for key in ("cos_g_v1", "lambda_batch"):
            np.testing.assert_allclose([r["align"][key][0] for r in first.values()],
                                       first["sgd"]["align"][key][0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose([r["curve"]["lambda_max"][0] for r in first.values()],
                                   first["sgd"]["curve"]["lambda_max"][0], rtol=1e-6)
        # SGD's "perturbation" is its gradient
        assert seed_runs["sgd"]["align"]["cos_eps_v1"] == seed_runs["sgd"]["align"]["cos_g_v1"]
        # SAM's epsilon is along g: the two cosines agree
        sam = seed_runs["sam"]["align"]
        np.testing.assert_allclose(sam["cos_eps_v1"], sam["cos_g_v1"], atol=1e-4)
        eig = seed_runs["eigen_sam"]
        assert eig["refreshes"] == 2  # index 4 of each of the 2 epochs
        # before the first refresh (steps 0 and 3 < 4) epsilon = rho g: same cosine
        np.testing.assert_allclose(eig["align"]["cos_eps_v1"][:2], eig["align"]["cos_g_v1"][:2],
                                   atol=1e-4)
        assert seed_runs["sgd"]["refreshes"] == 0
    assert all(v["criterion"] for v in setting["verdict"].values())
    _check_summary_against_runs(setting["per_seed"], setting["summary"], setting["verdict"])
    assert "tiny scale: smoke test" not in results["table"]  # printed by main, not in the table
