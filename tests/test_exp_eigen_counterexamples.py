"""experiments/eigen_counterexamples: the Taylor facts it rests on, its verdict logic,
its run configuration, and the tiny end-to-end run.

* On a cubic loss L(w) = ½ wᵀAw + ⅙ Σ c_i w_i³ the Taylor expansion of ∇L terminates:
  ∇L(w + ε) = g + Hε + ½ c⊙ε². So the library's transforms must give exactly
  SAM = g + ρHĝ + (ρ²/2) c⊙ĝ², Reverse-SAM = g − ρHĝ + (ρ²/2) c⊙ĝ²,
  EGR (hvp) = g + ρHĝ: SAM − EGR is the second-order term alone, and
  ½(SAM + Reverse-SAM) − g is that same term (the "even part" the verdict tests).
* ``claims`` on hand-made records: an odd-only (first-order) effect gives "no",
  an even part or an EGR gap gives "yes".
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
    np.testing.assert_allclose(sam, g + RHO * hg + RHO**2 * t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rev, g - RHO * hg + RHO**2 * t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(egr, g + RHO * hg, rtol=1e-5, atol=1e-6)
    # What separates SAM from EGR is the second-order term only; the even part of
    # SAM/Reverse-SAM is that same term.
    np.testing.assert_allclose(sam - egr, RHO**2 * t, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(0.5 * (sam + rev) - g, RHO**2 * t, rtol=1e-4, atol=1e-6)


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
    # One SGD run, then every method at every ρ.
    assert ce.run_list(cfg) == [("sgd", None)] + [(m, r) for r in cfg.rhos for m in ce.METHODS]


def _records(lam, loss):
    """per_run from {run_name: per-seed λ_max list} (same test loss pattern)."""
    out = {}
    for name, values in lam.items():
        out[name] = {s: {"lambda_max": v, "final_test_loss": loss[name][s],
                         "final_train_loss": 0.0} for s, v in enumerate(values)}
    return out


def test_claims_first_order_only_says_no_and_even_part_says_yes():
    cfg = ce.CounterConfig(dataset="mnist1d", model="mlp", epochs=1, rhos=(0.1,), seeds=(0,))
    seeds = [0, 1, 2, 3]
    sgd = np.array([2.0, 2.4, 1.8, 2.2])
    noise = np.array([0.01, -0.02, 0.015, -0.005])
    # Odd effect only: SAM = SGD − 0.5, Reverse-SAM = SGD + 0.5, EGR = SAM (+ noise).
    lam = {"sgd": sgd, "sam_rho0.1": sgd - 0.5 + noise, "reverse_sam_rho0.1": sgd + 0.5 - noise,
           "egr_rho0.1": sgd - 0.5 + noise[::-1]}
    loss = {k: np.full(4, 0.3) + (v - sgd) * 0.0 for k, v in lam.items()}
    d = ce.claims(cfg, _records(lam, loss), seeds)["per_rho"][0]
    assert d["even_part_lambda_max"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert d["reverse_vs_sgd_sharpness"] == "sharper"
    assert d["sam_flatter_than_sgd"]
    assert not d["egr_differs_from_sam"] and not d["even_part_nonzero"]
    assert not d["not_only_gradient_norm"]
    # Reverse-SAM also flatter than SGD: an even part of −0.45 ± small noise.
    lam["reverse_sam_rho0.1"] = sgd - 0.4 + noise
    d = ce.claims(cfg, _records(lam, loss), seeds)["per_rho"][0]
    assert d["even_part_lambda_max"]["mean"] == pytest.approx(-0.45 + noise.mean())
    assert d["reverse_vs_sgd_sharpness"] == "flatter"
    assert d["even_part_nonzero"] and d["not_only_gradient_norm"]
    # EGR sharper than SAM by 0.3 in every seed.
    lam["reverse_sam_rho0.1"] = sgd + 0.5 - noise
    lam["egr_rho0.1"] = sgd - 0.2 + noise
    d = ce.claims(cfg, _records(lam, loss), seeds)["per_rho"][0]
    assert d["egr_minus_sam_lambda_max"]["mean"] == pytest.approx(0.3)
    assert d["egr_differs_from_sam"] and d["not_only_gradient_norm"]


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
            assert rec["lambda_max"] >= rec["lambda_2"]
            assert rec["lambda_examples"] == cfg.lambda_examples
    steps = cfg.train["steps_per_epoch"] * cfg.epochs
    evals = {r["run"]: r["grad_evals"]["mean"] for r in res["rows"]}
    assert evals["sgd"] == steps and evals["sam_rho0.1"] == 2 * steps
    assert evals["reverse_sam_rho0.1"] == 2 * steps and evals["egr_rho0.1"] == 3 * steps  # HVP = 2
    (d,) = res["claim"]["per_rho"]
    assert d["rho"] == 0.1 and d["egr_minus_sam_test_loss"]["n"] == len(cfg.seeds)
    assert "EGR" in res["table"] and "Reverse-SAM" in res["table"]
