"""experiments.late_adversarial: augmentation, the authors' step schedule, one optimizer
whose momentum carries into the AT epochs (hand-checked), and the tiny CLI."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, late_adversarial as la
from sam_jax.attacks import pgd_linf
from sam_jax.losses import cross_entropy

TINY = la.SCALE_PRESETS["tiny"]


@pytest.fixture(scope="module")
def parts():
    return la.build(TINY)


def _trace(opt_state):
    (trace,) = [s.trace for s in opt_state if hasattr(s, "trace")]
    return trace


def test_training_batches_are_augmented_with_the_configured_crop(parts):
    # The old module called batches() without augment: every image was the plain one.
    assert TINY.crop_padding == 1
    seed, epoch, pad = 3, 1, TINY.crop_padding
    xs, ys, _, _ = la.epoch_inputs(parts, TINY, seed, epoch)
    plain = [b for _, b in zip(range(parts["steps"]), parts["train_ds"].batches(
        TINY.batch_size, seed=seed, epoch=epoch))]
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]).spawn(2)[1])
    for step, batch in enumerate(plain):
        np.testing.assert_array_equal(ys[step], batch["y"])  # same order as the plain stream
        n, h, w = batch["x"].shape[:3]
        dy, dx = rng.integers(0, 2 * pad + 1, size=n), rng.integers(0, 2 * pad + 1, size=n)
        padded = np.pad(batch["x"], ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        expected = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        np.testing.assert_array_equal(xs[step], expected)
        assert not np.array_equal(xs[step], batch["x"])
    assert la.SCALE_PRESETS["paper"].crop_padding == 4 and la.SCALE_PRESETS["paper"].flip


@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_lr_each_epoch_is_the_authors_step_schedule(scale):
    cfg = la.SCALE_PRESETS[scale]
    assert cfg.schedule == "wrn_step"
    fake = {"steps": 7, "schedule": None}
    from sam_jax.train import make_schedule

    fake["schedule"] = make_schedule(cfg.schedule, cfg.lr, cfg.total_epochs * 7, 7)
    T = cfg.total_epochs
    for epoch in range(T):
        factor = 1.0 if epoch < 0.3 * T else 0.2 if epoch < 0.6 * T else 0.04
        np.testing.assert_allclose(la.learning_rates(fake, epoch), cfg.lr * factor, rtol=1e-6)
    # the late AT epochs run at a constant 4 % of the peak rate, not a decaying tail
    assert all(0.6 * T <= e for e in range(cfg.switch_epoch, T))


def test_paper_preset_uses_the_authors_optimizer_defaults():
    cfg = la.SCALE_PRESETS["paper"]
    assert (cfg.lr, cfg.weight_decay, cfg.momentum, cfg.batch_size) == (0.01, 1e-4, 0.9, 128)
    assert cfg.dataset_kwargs == {"normalize": False}
    assert (cfg.epsilon, cfg.step_size, cfg.num_steps) == (4 / 255, 2 / 255, 10)


@pytest.mark.slow  # ~35 s on the shared CPU (compiles a 1-step epoch)
def test_momentum_carries_into_the_first_adversarial_step(parts):
    seed, switch = 0, TINY.switch_epoch
    variables, opt_state = la.init_state(parts, seed)
    variables, opt_state = la.train_epochs(parts, TINY, seed, variables, opt_state,
                                           range(0, switch), adversarial=False)
    m0, w0 = _trace(opt_state), variables["params"]
    xs, ys, keys, lrs = la.epoch_inputs(parts, TINY, seed, switch)
    new_vars, new_state, _ = parts["epochs"][True](variables, opt_state, xs[:1], ys[:1],
                                                   keys[:1], lrs[:1])
    # By hand: PGD from the same key on the model in eval mode, the clean-mode CE
    # gradient at the adversarial batch, then PyTorch SGD: m1 = μ m0 + g + wd w0.
    model = parts["model"]
    x_adv = pgd_linf(lambda x: model.apply(variables, x, train=False), xs[0], ys[0],
                     epsilon=TINY.epsilon, step_size=TINY.step_size, num_steps=TINY.num_steps,
                     key=keys[0])
    grad = jax.grad(lambda p: cross_entropy(model.apply({"params": p}, x_adv, train=True),
                                            ys[0]).mean())(w0)
    expected = jax.tree.map(lambda m, g, w: TINY.momentum * m + g + TINY.weight_decay * w,
                            m0, grad, w0)
    for got, want in zip(jax.tree.leaves(_trace(new_state)), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    for got, w, m in zip(jax.tree.leaves(new_vars["params"]), jax.tree.leaves(w0),
                         jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, w - lrs[0] * m, rtol=2e-4, atol=1e-6)
    # A fresh optimizer at the switch would give g + wd w0: the carried term matters.
    carried = sum(float(jnp.sum((TINY.momentum * m) ** 2)) for m in jax.tree.leaves(m0))
    assert carried > 1e-6


def test_run_seed_branches_late_at_from_the_prefix_with_its_momentum(parts):
    seed, switch, total = 0, TINY.switch_epoch, TINY.total_epochs
    out = la.run_seed(parts, TINY, seed)
    start = la.init_state(parts, seed)
    prefix = la.train_epochs(parts, TINY, seed, *start, range(0, switch), False)
    carried = la.train_epochs(parts, TINY, seed, *prefix, range(switch, total), True)
    fresh = la.train_epochs(parts, TINY, seed, prefix[0], parts["tx"].init(prefix[0]["params"]),
                            range(switch, total), True)
    got = la.evaluate(parts, carried[0])
    assert out["late_at"]["clean_loss"] == pytest.approx(got["clean_loss"], rel=1e-5)
    assert la.evaluate(parts, fresh[0])["clean_loss"] != pytest.approx(got["clean_loss"], rel=1e-5)
    assert out["late_at"]["grad_evals_rel_standard"] == pytest.approx(
        (switch + (1 + TINY.num_steps) * TINY.late_at_epochs) / total)


@pytest.mark.slow
def test_tiny_cli_writes_tables_verdicts_and_curves(tmp_path, capsys):
    la.main(["--scale", "tiny", "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert common.SMOKE_NOTICE in printed and "| training" in printed
    assert "late AT more robust than standard (paired 95 % CI above 0):" in printed
    data = json.loads((tmp_path / common.RESULTS_FILE).read_text())
    results = data["results"]
    assert set(results["rows"]) == set(la.RUNS)
    for row in results["rows"].values():
        assert 0 <= row["robust_acc"]["mean"] <= row["clean_acc"]["mean"] + 1e-9
    assert results["rows"]["full_at"]["grad_evals_rel_standard"]["mean"] == pytest.approx(
        1 + TINY.num_steps)
    curves = results["per_seed"]["0"]["curves"]
    assert list(curves["full_at"]) == [str(e) for e in range(1, TINY.total_epochs + 1)]
    assert set(results["claim"]) >= {"late_at_more_robust_than_standard", "late_at_nearly_full_at"}
    assert len(results["lr_per_epoch"]) == TINY.total_epochs
    assert data["figures"] == ["late_adversarial.png"]
    assert (tmp_path / "late_adversarial.pdf").exists()
