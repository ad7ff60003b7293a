"""Eigen-SAM refreshes decided on the host (`TrainConfig.host_step_kinds`).

The loop compiles a refresh step and a plain step and picks one per step from the
optimizer's count; the result must equal the transform's in-graph ``lax.cond``
schedule, across a phase switch (momentum carried), an ``init_from`` branch in the
middle of the Eigen-SAM phase, and with the per-device (shard_map) step.
"""
import jax
import numpy as np
import pytest

from sam_jax.train import TrainConfig, loop, run

# sgd for 1 epoch, then Eigen-SAM for 4 epochs of 2 steps: counts 0..7, refreshes at 3 and 6.
BASE = dict(dataset="mnist1d", model="cnn1d", model_kwargs={"width": 4}, batch_size=32,
            steps_per_epoch=2, eval_batch_size=500, progress=False, lr=0.05,
            phases="sgd:1,eigen_sam:4:0.05:refresh_every=3:power_iters=2:refresh_counter=global",
            momentum_at_switch="carry")


def _config(workdir, **changes):
    return TrainConfig(workdir=str(workdir), **{**BASE, **changes})


def _assert_close(a, b, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=atol)


def _equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _eigenvalues(result):
    return [r.get("eigenvalue") for r in result.history]


@pytest.mark.parametrize("per_device", [False, True])
def test_host_refresh_equals_in_graph_cond(tmp_path, per_device):
    cache = loop.CompileCache()
    host = run(_config(tmp_path / "host", per_device_perturbation=per_device), cache=cache)
    cond = run(_config(tmp_path / "cond", per_device_perturbation=per_device,
                       host_step_kinds=False), cache=cache)
    _assert_close(host.variables, cond.variables)
    values = _eigenvalues(host)
    # epoch 1 has counts 0, 1 (no estimate yet); refreshes at counts 3 and 6
    assert values[0] is None and values[1] == 0.0 and values[2] != 0.0 and values[4] != values[2]
    np.testing.assert_allclose(values[1:], _eigenvalues(cond)[1:], rtol=1e-5)
    # both compiled variants of the host path were built, and the cond path's
    flags = {key[-1] for key in cache.traces if key[1].name == "eigen_sam"}
    assert flags == {None, False, True}


def test_init_from_mid_phase_reads_the_count_from_the_checkpoint(tmp_path):
    # A host-refresh branch at epoch 2 of an in-graph run: the count restored from the
    # checkpoint is 2, so the branch's first refresh is at its 2nd step (count 3).
    full = run(_config(tmp_path / "full", keep_every=1, host_step_kinds=False))
    branch = run(_config(tmp_path / "branch", init_from=str(tmp_path / "full"), init_step=2))
    assert branch.resumed_from == 2
    _assert_close(branch.variables, full.variables)
    np.testing.assert_allclose(_eigenvalues(branch), _eigenvalues(full)[2:], rtol=1e-5)


def test_eigen_refresh_is_refused_for_other_optimizers():
    from sam_jax.models import get_model
    from sam_jax.train.step import make_train_step

    config = _config("unused", phases="sam:1")
    spec = loop.optimizer_spec(config, config.phase_list[0])
    with pytest.raises(ValueError, match="Eigen-SAM option"):
        make_train_step(get_model("cnn1d", 10, width=4), spec, label_smoothing=0.0,
                        l2_weight_decay=0.0, eigen_refresh=True)
