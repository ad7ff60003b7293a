"""One process of the multi-process training test (`tests/test_train_multiprocess.py`).

    python tests/multiprocess_worker.py SPEC.json PROCESS_ID

``SPEC.json``: ``{"num_processes": P, "local_devices": D, "port": PORT,
"runs": [{"workdir": ..., "per_device": bool, "out": ...npz}, ...],
"rows_out": ...json}``. With ``P > 1`` the process joins a ``jax.distributed`` job
on ``127.0.0.1:PORT`` (CPU, gloo collectives); each run trains `tiny_config` in
its workdir (resuming its checkpoints if there are any), and process 0 saves the
final variables to ``out`` (leaf path -> array). Every process writes, to
``rows_out`` + ``.<pid>``, the (global rows, rows this process fed) of each batch
it put on the mesh, and per run the λ_max record it holds and the rows of every
batch of the λ_max Hessian-vector products it placed on the mesh
(``[global rows, first row, end row, replicated]``).
"""
from __future__ import annotations

import json
import os
import sys


def tiny_config(workdir: str, per_device: bool):
    from sam_jax.train import TrainConfig

    return TrainConfig(
        workdir=workdir, dataset="digits", model="cnn6",
        model_kwargs={"width": 2, "use_bn": True}, phases="sgd:1,sam:1", rho=0.05,
        batch_size=16, steps_per_epoch=2, eval_batch_size=64, lr=0.05,
        per_device_perturbation=per_device, seed=3, keep_last=None, progress=False,
        # λ_max after the last epoch on 32 examples in two chunks of 16, each split
        # over the 4 devices (8 rows per process). One chunk shape and 8 Lanczos
        # steps keep it cheap (one HVP compilation per run); equality across
        # layouts does not need convergence.
        lambda_max_every=2, lambda_max_examples=32, lambda_max_chunk=16,
        lambda_max_iters=8)


def psum_order_probe() -> list:
    """psum over the 4 devices of rows filled with 1, 1e8, -1e8, 1 (float32, 8
    columns): each column's value shows the order its all-reduce summed the 4
    operands in (0→1→2→3: 1.0; starting at device 1 or 3: 2.0 or 0.0; ...)."""
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from sam_jax.train import parallel

    mesh = parallel.make_mesh()
    rows = np.repeat(np.array([[1.0], [1e8], [-1e8], [1.0]], np.float32), 8, axis=1)
    x = parallel.put_batch({"x": rows}, mesh)["x"]
    total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "data"), mesh=mesh,
                                  in_specs=P("data"), out_specs=P()))(x)
    return [float(v) for v in np.asarray(jax.device_get(total))[0]]


def main(spec_path: str, process_id: int) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={spec['local_devices']}").strip()
    import jax

    from sam_jax.train import distributed

    if spec["num_processes"] > 1:
        distributed.initialize(f"127.0.0.1:{spec['port']}", spec["num_processes"], process_id,
                               initialization_timeout=120)
    import numpy as np

    from sam_jax.curvature import operator as curvature_operator
    from sam_jax.train import run

    assert jax.device_count() == spec["num_processes"] * spec["local_devices"]
    assert jax.local_device_count() == spec["local_devices"]
    fed = []
    original = distributed.put_process_batch

    def recording(batch, mesh):
        out = original(batch, mesh)
        fed.append([int(np.shape(batch["x"])[0]),
                    sum(int(s.data.shape[0]) for s in out["x"].addressable_shards)])
        return out

    distributed.put_process_batch = recording
    original_local = distributed.put_local_rows

    def recording_local(batch, mesh, global_batch_size):
        # The engine's train and eval batches: this process materialized only its
        # rows (Dataset.batches(rows=...)); record what it built and what it fed.
        out = original_local(batch, mesh, global_batch_size)
        built = int(np.shape(batch["x"])[0])
        assert built == sum(int(s.data.shape[0]) for s in out["x"].addressable_shards)
        fed.append([int(global_batch_size), built])
        return out

    distributed.put_local_rows = recording_local
    hvp_batches = []
    original_put = curvature_operator.put_global

    def recording_put(tree, sharding):
        out = original_put(tree, sharding)
        if isinstance(tree, dict) and {"x", "y"} <= set(tree):  # a batch, not θ or v
            rows = distributed.local_rows(out["x"].sharding, out["x"].shape)
            hvp_batches.append([int(out["x"].shape[0]), rows.start, rows.stop,
                                bool(sharding.is_fully_replicated)])
        return out

    curvature_operator.put_global = recording_put
    resumed, lambdas = [], {}
    for item in spec["runs"]:
        hvp_batches.clear()
        result = run(tiny_config(item["workdir"], item["per_device"]))
        resumed.append(result.resumed_from)
        last = result.history[-1]
        lambdas[os.path.basename(item["workdir"])] = {
            "lambda_max": last.get("lambda_max"), "lambda_2": last.get("lambda_2"),
            "hvp_batches": list(hvp_batches)}
        if jax.process_index() == 0:
            leaves = jax.tree_util.tree_leaves_with_path(result.variables)
            np.savez(item["out"], **{jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
                                     for p, x in leaves})
    with open(f"{spec['rows_out']}.{process_id}", "w") as f:
        json.dump({"fed": fed, "process_count": jax.process_count(), "resumed_from": resumed,
                   "lambda": lambdas, "psum_order": psum_order_probe()}, f)
    if spec["num_processes"] > 1:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
