"""Test-wide JAX setup and the fixtures several modules share.

Four simulated CPU devices, so multi-device code (sharding, shard_map, pmap) is
exercised on this 2-core machine. This must happen before JAX initializes its
backends, i.e. before any test module touches a device.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def finished_tiny_mlp(tmp_path_factory):
    """The finished ``_helpers.TINY_MLP`` run (checkpoints at epochs 1, 2, 3).

    Shared read-only by every module that needs it; tests that change a run work
    on a copy of its workdir.
    """
    from _helpers import tiny_mlp_config

    from sam_jax.train import checkpoint_epochs, run

    result = run(tiny_mlp_config(tmp_path_factory.mktemp("tiny_mlp") / "finished"))
    assert checkpoint_epochs(result.workdir) == [1, 2, 3]
    return result
