"""experiments/eigen_counterexamples: the Taylor facts it rests on, its verdict logic,
its run configuration, and the tiny end-to-end run.

* On a cubic loss L(w) = ½ wᵀAw + ⅙ Σ c_i w_i³ the Taylor expansion of ∇L terminates:
  ∇L(w + ε) = g + Hε + ½ c⊙ε². So the library's transforms must give exactly
  SAM = g + ρHĝ + (ρ²/2) c⊙ĝ², Reverse-SAM = g − ρHĝ + (ρ²/2) c⊙ĝ²,
  EGR (hvp) = g + ρHĝ, and the module's anti-EGR = g − ρHĝ: SAM − EGR and
  Reverse-SAM − anti-EGR are the second-order term alone.
* ``claims`` on hand-made records: first-order models that match give "no", a gap
  between SAM and EGR or between Reverse-SAM and anti-EGR gives "yes".
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from experiments import common, eigen_counterexamples as ce
from sam_jax.train.config import parse_phases

A = jnp.array([[2.0, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 0.5]])
C = jnp.array([1.5, -0.7, 2.0])
W = jnp.array([0.4, -1.1, 0.8])
RHO = 0.3


def _grad(w):
    return A @ w + 0.5 * C * w**2


def _update(tx, w):
    state = tx.init(w)
    out, _ = tx.update(_grad(w), state, w, grad_fn=_grad)
    return out


@pytest.fixture(scope="module")
def expansion():
    g = _grad(W)
    g_hat = g / jnp.linalg.norm(g)
    hessian = A + jnp.diag(C * W)
    return {"g": g, "Hg": hessian @ g_hat, "T": 0.5 * C * g_hat**2}


def test_sam_reverse_egr_match_the_terminating_taylor_expansion(expansion):
    g, hg, t = expansion["g"], expansion["Hg"], expansion["T"]
    sam = _update(sam_jax.sam(RHO), W)
    rev = _update(sam_jax.reverse_sam(RHO), W)
    egr = _update(sam_jax.egr(RHO, mode="hvp"), W)
    anti = _update(ce.anti_egr(RHO, mode="hvp"), W)
    np.testing.assert_allclose(sam, g + RHO * hg + RHO**2 * t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rev, g - RHO * hg + RHO**2 * t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(egr, g + RHO * hg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(anti, g - RHO * hg, rtol=1e-5, atol=1e-6)
    # What separates each method from its first-order model is the second-order term.
    np.testing.assert_allclose(sam - egr, RHO**2 * t, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rev - anti, RHO**2 * t, rtol=1e-4, atol=1e-6)


def test_anti_egr_is_registered_with_the_engine_and_costs_like_egr():
    from sam_jax import optim

    ce.register_anti_egr()
    ce.register_anti_egr()  # idempotent
    assert optim.PERTURBATIONS["anti_egr"] is ce.anti_egr
    assert optim.gradient_evals_per_step("anti_egr", mode="hvp") == 3.0
    assert optim.gradient_evals_per_step("anti_egr", mode="finite_difference") == 2.0
    out = _update(optim.make_perturbation("anti_egr", RHO, mode="hvp"), W)
    np.testing.assert_allclose(out, 2 * _grad(W) - _update(sam_jax.egr(RHO, mode="hvp"), W),
                               rtol=1e-6)


def test_egr_finite_difference_differs_from_hvp_by_r_over_2_times_T(expansion):
    # (∇L(w + rĝ) − g)/r = Hĝ + (r/2) c⊙ĝ², so fd − hvp = ρ r · (½ c⊙ĝ²).
    r = 0.05
    fd = _update(sam_jax.egr(RHO, mode="finite_difference", fd_step=r), W)
    hvp = _update(sam_jax.egr(RHO, mode="hvp"), W)
    np.testing.assert_allclose(fd - hvp, RHO * r * expansion["T"], rtol=2e-3, atol=1e-6)


def test_phase_strings_parse_and_carry_the_options():
    cfg = ce.SCALE_PRESETS["cpu"]
    (phase,) = parse_phases(cfg.phases("egr", 0.2))
    assert (phase.name, phase.epochs, phase.rho, dict(phase.kwargs)) == ("egr", cfg.epochs, 0.2,
                                                                         {"mode": "hvp"})
    (phase,) = parse_phases(cfg.phases("reverse_sam", 0.05))
    assert (phase.name, phase.rho) == ("reverse_sam", 0.05)
    assert cfg.phases("sgd", None) == f"sgd:{cfg.epochs}"
    fd = ce.CounterConfig(dataset="mnist1d", model="mlp", epochs=2, rhos=(0.1,), seeds=(0,),
                          egr_mode="finite_difference", egr_fd_step=0.02)
    assert dict(parse_phases(fd.phases("egr", 0.1))[0].kwargs) == {
        "mode": "finite_difference", "fd_step": 0.02}
    assert dict(parse_phases(cfg.phases("anti_egr", 0.2))[0].kwargs) == {"mode": "hvp"}
    # One SGD run, then every method at every ρ.
    assert ce.run_list(cfg) == [("sgd", None)] + [(m, r) for r in cfg.rhos for m in ce.METHODS]


def _records(lam, loss):
    """per_run from {run_name: per-seed λ_max list} (same test loss pattern)."""
    out = {}
    for name, values in lam.items():
        out[name] = {s: {"lambda_max": v, "final_test_loss": loss[name][s],
                         "final_train_loss": 0.0, "final_test_acc": 0.9, "lambda_2": 0.0,
                         "grad_evals": 1.0, "median_epoch_time_s": 1.0}
                     for s, v in enumerate(values)}
    return out


def test_claims_first_order_models_matching_say_no_and_gaps_say_yes():
    cfg = ce.CounterConfig(dataset="mnist1d", model="mlp", epochs=1, rhos=(0.1,), seeds=(0,))
    seeds = [0, 1, 2, 3]
    sgd = np.array([2.0, 2.4, 1.8, 2.2])
    noise = np.array([0.01, -0.02, 0.015, -0.005])
    # Each method matches its first-order model up to noise of both signs.
    lam = {"sgd": sgd, "sam_rho0.1": sgd - 0.5 + noise, "reverse_sam_rho0.1": sgd + 3.0 - noise,
           "egr_rho0.1": sgd - 0.5 + noise[::-1], "anti_egr_rho0.1": sgd + 3.0 + noise}
    loss = {k: np.full(4, 0.3) for k in lam}
    d = ce.claims(cfg, _records(lam, loss), seeds)["per_rho"][0]
    assert d["reverse_vs_sgd_sharpness"] == "sharper" and d["sam_flatter_than_sgd"]
    assert not d["egr_differs_from_sam"] and not d["anti_egr_differs_from_reverse"]
    assert not d["not_only_gradient_norm"]
    assert d["egr_share_of_sam_effect_lambda_max"] == pytest.approx(
        np.mean(noise[::-1] - 0.5) / np.mean(noise - 0.5))
    assert d["egr_share_of_sam_effect_train_loss"] is None      # no effect to share
    # anti-EGR sharper than Reverse-SAM by 1.0 in every seed.
    lam["anti_egr_rho0.1"] = sgd + 4.0 - noise
    d = ce.claims(cfg, _records(lam, loss), seeds)["per_rho"][0]
    assert d["anti_egr_minus_reverse_lambda_max"]["mean"] == pytest.approx(1.0)
    assert d["anti_egr_differs_from_reverse"] and d["not_only_gradient_norm"]
    assert d["anti_egr_share_of_reverse_effect_lambda_max"] == pytest.approx(4.0 / (3.0 - noise.mean()))
    # EGR's train loss lower than SAM's in every seed (λ_max and test loss equal).
    lam["anti_egr_rho0.1"] = sgd + 3.0 + noise
    loss["egr_rho0.1"] = np.array([0.2, 0.21, 0.19, 0.2])
    recs = _records(lam, loss)
    for s in seeds:
        recs["egr_rho0.1"][s]["final_train_loss"] = -0.1 + 0.001 * s
    d = ce.claims(cfg, recs, seeds)["per_rho"][0]
    assert d["egr_minus_sam_train_loss"]["ci_high"] < 0
    assert d["egr_differs_from_sam"] and d["not_only_gradient_norm"]


def test_a_diverged_run_is_left_out_of_the_pairs_and_counts_as_a_difference():
    cfg = ce.CounterConfig(dataset="mnist1d", model="mlp", epochs=1, rhos=(0.1,), seeds=(0,))
    seeds = [0, 1, 2, 3]
    sgd = np.array([2.0, 2.4, 1.8, 2.2])
    noise = np.array([0.01, -0.02, 0.015, -0.005])
    lam = {"sgd": sgd, "sam_rho0.1": sgd - 0.5 + noise, "reverse_sam_rho0.1": sgd + 3.0 - noise,
           "egr_rho0.1": sgd - 0.5 + noise[::-1],
           "anti_egr_rho0.1": np.array([np.nan, 5.4, 4.8, 5.2])}   # seed 0 diverged
    loss = {k: np.full(4, 0.3) for k in lam}
    recs = _records(lam, loss)
    recs["anti_egr_rho0.1"][0].update(diverged=True, final_test_loss=np.nan,
                                      final_train_loss=np.nan)
    d = ce.claims(cfg, recs, seeds)["per_rho"][0]
    assert d["diverged"] == {"sam": 0, "reverse_sam": 0, "egr": 0, "anti_egr": 1, "sgd": 0}
    pair = d["anti_egr_minus_reverse_lambda_max"]
    assert pair["n"] == 3
    assert pair["mean"] == pytest.approx(np.mean(lam["anti_egr_rho0.1"][1:]
                                                 - lam["reverse_sam_rho0.1"][1:]))
    assert d["anti_egr_differs_from_reverse"] and not d["egr_differs_from_sam"]
    rows = ce.summarize(cfg, recs, seeds)
    anti = next(r for r in rows if r["run"] == "anti_egr_rho0.1")
    assert anti["diverged"] == 1 and anti["lambda_max"]["n"] == 3
    assert anti["lambda_max"]["mean"] == pytest.approx(5.133333333)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eigen_counterexamples")
    ce.main(["--scale", "tiny", "--workdir", str(workdir)])
    return workdir


@pytest.mark.slow
def test_tiny_cli_results_structure(tiny):
    data = json.loads((tiny / common.RESULTS_FILE).read_text())
    cfg = ce.SCALE_PRESETS["tiny"]
    assert data["experiment"] == "eigen_counterexamples" and data["scale"] == "tiny"
    assert data["figures"] == ["eigen_counterexamples.png"]
    assert (tiny / "eigen_counterexamples.png").exists() and (tiny / "eigen_counterexamples.pdf").exists()
    res = data["results"]
    names = [ce.run_name(m, r) for m, r in ce.run_list(cfg)]
    assert [r["run"] for r in res["rows"]] == names
    for name in names:
        for seed in cfg.seeds:
            rec = res["per_run"][name][str(seed)]
            assert rec["epoch"] == list(range(1, cfg.epochs + 1))       # eval_every = 1
            assert len(rec["test_loss"]) == len(rec["train_loss"]) == cfg.epochs
            assert all(v is not None for v in rec["test_loss"])
            assert rec["lambda_examples"] == cfg.lambda_examples
            # At chance = train loss above 0.9 ln 10 (a constant predictor).
            assert rec["at_chance"] == (rec["final_train_loss"] > 0.9 * np.log(10))
    steps = cfg.train["steps_per_epoch"] * cfg.epochs
    evals = {r["run"]: r["grad_evals"]["mean"] for r in res["rows"]}
    assert evals["sgd"] == steps and evals["sam_rho0.1"] == 2 * steps
    assert evals["reverse_sam_rho0.1"] == 2 * steps and evals["egr_rho0.1"] == 3 * steps  # HVP = 2
    assert evals["anti_egr_rho0.1"] == 3 * steps
    (d,) = res["claim"]["per_rho"]
    assert d["rho"] == 0.1 and d["egr_minus_sam_test_loss"]["n"] == len(cfg.seeds)
    assert "anti-EGR" in res["table"] and "Reverse-SAM" in res["table"]
    assert isinstance(d["not_only_gradient_norm"], bool)
