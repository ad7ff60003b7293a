"""experiments.two_phase: per-trial escape fits, the vmapped network trials against a
hand-made SAM step, λ_max through sam_jax.curvature against the dense Hessian, the
figure's axis limits, and the tiny CLI."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import common, two_phase as tp

NET = tp.NetConfig(width=4, depth=1, train_size=60, batch_size=16, sgd_steps=30, sam_steps=1,
                   trials=3, lanczos_steps=12)


def test_fit_trials_mean_rate_ci_and_c_on_known_exponentials():
    t = np.arange(50)
    rates = np.array([0.5, 0.7, 0.9])
    logs = np.stack([np.where(t < 20, -30 + r * t, -30 + r * 20 - 0.2 * (t - 20)) for r in rates])
    fit = tp.fit_trials(logs)
    assert fit["rate"]["mean"] == pytest.approx(0.7)
    half = 4.302653 * 0.2 / math.sqrt(3)  # t_{0.975, 2} · sd / √n
    assert fit["rate_ci"] == pytest.approx(half, rel=1e-5)
    assert fit["C"] == pytest.approx(math.exp(0.7))
    assert fit["C_ci"] == pytest.approx([math.exp(0.7 - half), math.exp(0.7 + half)], rel=1e-5)


def test_log_ylim_spans_the_data_not_a_fit():
    lo, hi = tp._log_ylim([np.array([1e-8, 1e-3]), np.array([0.0, 1e2, np.nan])], pad_decades=0.5)
    assert lo == pytest.approx(10 ** -8.5) and hi == pytest.approx(10 ** 2.5)


@pytest.fixture(scope="module")
def net_parts():
    return tp.build_network(NET)


@pytest.mark.slow  # compiles the vmapped phases (~30-90 s on the shared CPU)
def test_first_sam_step_after_the_switch_matches_a_hand_made_step(net_parts):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(4), i))(np.arange(NET.trials))
    params, switch_loss = net_parts["sgd_phase"](keys)
    after_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    end, losses = net_parts["after"]["sam"](params, after_keys)
    x, y = net_parts["batch"]["x"], net_parts["batch"]["y"]
    model = net_parts["model"]
    loss = lambda p, xb, yb: 0.5 * jnp.mean(jnp.sum(
        (model.apply({"params": p}, xb, train=False) - jax.nn.one_hot(yb, 10)) ** 2, -1))
    for i in range(NET.trials):
        p0 = jax.tree.map(lambda a: a[i], params)
        assert float(switch_loss[i]) == pytest.approx(float(loss(p0, x, y)), rel=1e-5)
        step_key = jax.random.split(after_keys[i], NET.sam_steps)[0]
        idx = jax.random.permutation(step_key, x.shape[0])[:NET.batch_size]
        grad = jax.grad(loss)(p0, x[idx], y[idx])
        norm = optax.tree.norm(grad)
        perturbed = jax.tree.map(lambda p, g: p + NET.rho_sam * g / (norm + 1e-12), p0, grad)
        g_sam = jax.grad(loss)(perturbed, x[idx], y[idx])
        p1 = jax.tree.map(lambda p, g: p - NET.lr * g, p0, g_sam)
        for got, want in zip(jax.tree.leaves(jax.tree.map(lambda a: a[i], end)), jax.tree.leaves(p1)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        assert float(losses[i, 0]) == pytest.approx(float(loss(p1, x, y)), rel=1e-4)


@pytest.mark.slow
def test_lambda_max_is_the_top_eigenvalue_of_the_dense_hessian(net_parts):
    params = net_parts["model"].init(jax.random.PRNGKey(0), net_parts["batch"]["x"][:1],
                                     train=False)["params"]
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    loss_sum, count = net_parts["curvature_loss"](params, net_parts["batch"])
    mean_loss = lambda v: net_parts["curvature_loss"](unravel(v), net_parts["batch"])[0] / count
    top = float(np.linalg.eigvalsh(np.asarray(jax.hessian(mean_loss)(flat), np.float64))[-1])
    cfg = tp.NetConfig(**{**NET.__dict__, "lanczos_steps": 40})
    assert tp.lambda_max(net_parts, params, cfg) == pytest.approx(top, rel=1e-3)


def test_net_config_validates():
    with pytest.raises(ValueError, match="trials"):
        tp.NetConfig(trials=0)
    assert tp.NetConfig(rho_usam=0.0).variants() == ("sgd", "sam")


@pytest.mark.slow
def test_tiny_cli_tables_verdicts_and_figures(tmp_path, capsys):
    tp.main(["--scale", "tiny", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert common.SMOKE_NOTICE in out
    assert "| after the switch" in out and "| quantity" in out
    assert "toy: every trial ends flatter (1+u² after USAM < at the switch): yes" in out
    data = json.loads((tmp_path / common.RESULTS_FILE).read_text())
    results = data["results"]
    assert results["claim"]["toy_escape_rate_positive_all_seeds"] is True
    assert results["claim"]["toy_all_trials_flatter"] is True
    net = tp.SCALE_PRESETS["tiny"]["net"]
    assert results["network"]["trials_total"] == net.trials
    assert set(results["network"]["per_seed"]["0"]) >= {"sgd_final_loss", "lambda_max_sgd",
                                                        "sam_escape_C", "usam_escape_C"}
    for name in ("sgd", "sam", "usam"):
        fit = results["network"]["fits"][name]
        assert fit["C"] == pytest.approx(math.exp(fit["rate"]["mean"]))
        assert len(fit["mean_log_loss"]) == net.sam_steps + 1
        assert fit["lambda_max_end"]["n"] == net.trials
    assert data["figures"] == ["fig4a_toy_trajectory.png", "fig4b_toy_escape.png",
                               "fig4b_network_escape.png"]
