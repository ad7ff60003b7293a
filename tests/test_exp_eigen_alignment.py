"""experiments/eigen_alignment: the measurements against right answers, and the tiny run.

* the minibatch top eigenpair (library Lanczos) equals a dense ``eigh`` of the
  minibatch Hessian on a model small enough to build it;
* the probe's ε (read from the library transform through a spy ``grad_fn``) equals
  SAM's ``ρ ĝ`` and Eigen-SAM's ``ρ (ĝ + α sign⟨g,v⟩ (v − ⟨ĝ,v⟩ ĝ))``;
* ``--scale tiny`` through ``main``: results.json's structure, the refresh count of
  the per-epoch schedule, and identities (SAM's |cos(ε,v₁)| = |cos(g,v₁)|; Eigen-SAM's
  ε before its first refresh is ρ g, so the same).
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
            assert all(0 <= c <= 1 + 1e-6 for c in run["align"]["cos_g_v1"])
        # SAM's epsilon is along g: the two cosines agree
        sam = seed_runs["sam"]["align"]
        np.testing.assert_allclose(sam["cos_eps_v1"], sam["cos_g_v1"], atol=1e-4)
        eig = seed_runs["eigen_sam"]
        assert eig["refreshes"] == 2  # index 4 of each of the 2 epochs
        # before the first refresh (steps 0 and 3 < 4) epsilon = rho g: same cosine
        np.testing.assert_allclose(eig["align"]["cos_eps_v1"][:2], eig["align"]["cos_g_v1"][:2],
                                   atol=1e-4)
        assert seed_runs["sgd"]["refreshes"] == 0
    verdict = setting["verdict"]
    assert set(verdict) == {"sam_poorly_aligned", "eigen_sam_better_aligned",
                            "eigen_sam_lower_lambda_than_sam", "eigen_sam_lower_lambda_than_sgd",
                            "sam_lower_lambda_than_sgd"}
    assert all(isinstance(v["holds"], bool) and v["criterion"] for v in verdict.values())
    paired = setting["summary"]["paired"]["lambda_eigen_minus_sam"]
    assert paired["n"] == 2 and paired["ci_low"] <= paired["mean"] <= paired["ci_high"]
    assert "tiny scale: smoke test" not in results["table"]  # printed by main, not in the table
