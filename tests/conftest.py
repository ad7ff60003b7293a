"""Test-wide JAX setup.

Four simulated CPU devices, so multi-device code (sharding, shard_map, pmap) is
exercised on this 2-core machine. This must happen before JAX initializes its
backends, i.e. before any test module touches a device.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
