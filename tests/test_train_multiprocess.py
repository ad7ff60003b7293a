"""Multi-process training (``jax.distributed`` on CPU, gloo collectives).

Two processes × 2 simulated CPU devices train the same tiny config (digits, CNN-6
width 2 with BatchNorm, ``sgd:1,sam:1``, 2 steps per epoch) as one process × 4
devices, with per-device ε and with synced ε; then each layout resumes the other's
checkpoint at the phase boundary and finishes the run.

Equality. Both layouts run the same compiled program on the same 4-device mesh with
the same per-device rows; the only difference is how the cross-device all-reduce
(gradients, BatchNorm statistics, metrics) sums its 4 float32 operands: XLA's
in-process CPU all-reduce in one process, gloo across processes. Different
summation orders round differently, so the results are not bit-for-bit equal
(`test_psum_order_is_reported` shows it: summing device rows 1, 1e8, -1e8, 1, the
single process adds every column in device order, gloo's ring all-reduce starts
each chunk of the array at another device); measured here
the largest difference of any parameter or BatchNorm statistic after 4 steps is
1.8e-7 (a couple of float32 ulps at the parameters' scale). The tolerance
``ATOL = 1e-5`` leaves room for that rounding to grow over the 4 steps while
staying 3 orders of magnitude below the difference between per-device and synced
ε (2.9e-2 here), which the test also checks, so a layout that silently computed
the other ε, or fed the wrong rows, would fail.

λ_max. Every run also logs λ_max and λ₂ after its last epoch (`tiny_config`:
Lanczos, 8 steps, 32 examples in two HVP chunks of 16), through the
data-parallel Hessian operator on the run's mesh, so in the 2-process runs both
processes compute every Hessian-vector product, each placing only its devices'
rows of the split chunks. The logged values of the two layouts agree within
``LAMBDA_RTOL`` (see there), and both processes of a run hold the same values.

Slow: 6 fresh processes compile the steps again (about 40 s of CPU each); 5.5 min
wall on the shared 2-core machine at load 6-20. The λ_max measurements (one HVP
compilation per run) add about 40 s: 135 s instead of 93 s at load 2-4. CI runs the slow tests too
(``.ci/run``). The fast tests at the end need no subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

slow = pytest.mark.slow  # every test that uses the `runs` fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
TIMEOUT = float(os.environ.get("SAM_JAX_MULTIPROCESS_TIMEOUT", 900))
ATOL = 1e-5
# λ_max / λ₂ of the two layouts, relative. Each Hessian-vector product all-reduces
# the per-device partial products (and the BatchNorm statistics of the chunk)
# with XLA's in-process all-reduce in one process and gloo's ring order across
# two (see above), so every product rounds differently, at the parameters already
# ~1e-7 apart; the 8 Lanczos steps carry that rounding into the Ritz values, a
# little amplified (measured: 1.2e-6 / 1.7e-6 for λ_max / λ₂ with per-device ε,
# 7e-8 / 1.2e-7 with synced ε; the 1-device and 4-device operators of one
# process differ by as much, ~2e-6). 1e-4 leaves room for that and is still far
# below the λ_max difference between per-device and synced ε (5 % here, checked
# below), so λ_max computed from other rows, another ε or a partial sum would fail.
LAMBDA_RTOL = 1e-4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(spec: dict, tmp) -> list:
    path = os.path.join(tmp, f"spec_{spec['tag']}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return [subprocess.Popen([sys.executable, WORKER, path, str(pid)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for pid in range(spec["num_processes"])]


def _wait(procs_by_tag: dict) -> None:
    failures = []
    for tag, procs in procs_by_tag.items():
        for pid, proc in enumerate(procs):
            try:
                out, _ = proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                failures.append(f"{tag} process {pid} timed out after {TIMEOUT:.0f} s:\n"
                                f"{out[-4000:]}")
                continue
            if proc.returncode != 0:
                failures.append(f"{tag} process {pid} exited with {proc.returncode}:\n"
                                f"{out[-4000:]}")
    if failures:
        pytest.fail("\n\n".join(failures))


def _spec(tag: str, tmp, num_processes: int, runs: list) -> dict:
    return {"tag": tag, "num_processes": num_processes, "local_devices": 4 // num_processes,
            "port": _free_port(), "rows_out": os.path.join(tmp, f"rows_{tag}"),
            "runs": [{"workdir": os.path.join(tmp, name), "per_device": per_device,
                      "out": os.path.join(tmp, f"{name}.npz")} for name, per_device in runs]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("multiprocess"))
    # Phase 1: both layouts, per-device and synced ε, concurrently.
    one = _spec("one", tmp, 1, [("p1_device", True), ("p1_synced", False)])
    two = _spec("two", tmp, 2, [("p2_device", True), ("p2_synced", False)])
    _wait({"one": _launch(one, tmp), "two": _launch(two, tmp)})
    # Phase 2: each layout resumes the other's checkpoint at epoch 1 (the phase
    # boundary) and finishes the run: copies of the workdirs without epoch 2.
    for src, dst in (("p2_device", "p1_from_p2"), ("p1_device", "p2_from_p1")):
        shutil.copytree(os.path.join(tmp, src), os.path.join(tmp, dst))
        shutil.rmtree(os.path.join(tmp, dst, "checkpoints", "2"))
    one_r = _spec("one_r", tmp, 1, [("p1_from_p2", True)])
    two_r = _spec("two_r", tmp, 2, [("p2_from_p1", True)])
    _wait({"one_r": _launch(one_r, tmp), "two_r": _launch(two_r, tmp)})

    def load(name):
        with np.load(os.path.join(tmp, f"{name}.npz")) as f:
            return dict(f)

    def rows(tag, pid):
        with open(os.path.join(tmp, f"rows_{tag}.{pid}")) as f:
            return json.load(f)

    names = ("p1_device", "p1_synced", "p2_device", "p2_synced", "p1_from_p2", "p2_from_p1")
    return {"tmp": tmp, "vars": {n: load(n) for n in names}, "rows": rows}


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@slow
def test_variables_hold_params_and_batch_stats(runs):
    keys = list(runs["vars"]["p2_device"])
    assert any(k.startswith("['params']") for k in keys)
    assert any(k.startswith("['batch_stats']") for k in keys)


@slow
@pytest.mark.parametrize("mode", ["device", "synced"])
def test_two_processes_equal_one_process(runs, mode):
    one, two = runs["vars"][f"p1_{mode}"], runs["vars"][f"p2_{mode}"]
    diff = _max_diff(one, two)
    bitwise = all(np.array_equal(one[k], two[k]) for k in one)
    print(f"{mode} ε: 2 processes vs 1 process: bit-for-bit {bitwise}, max |Δ| {diff:.3g}")
    assert diff <= ATOL


@slow
def test_per_device_and_synced_epsilon_differ_far_beyond_tolerance(runs):
    # The per-device (m-sharpness) step is not the synced one: the tolerance above
    # could not hide a process that ran the wrong ε.
    for p in ("p1", "p2"):
        assert _max_diff(runs["vars"][f"{p}_device"], runs["vars"][f"{p}_synced"]) > 100 * ATOL


@slow
def test_each_process_feeds_only_its_half_of_every_batch(runs):
    for pid in (0, 1):
        info = runs["rows"]("two", pid)
        assert info["process_count"] == 2
        assert info["fed"], "no batch went through put_process_batch"
        for global_rows, local_rows in info["fed"]:
            assert local_rows * 2 == global_rows
    assert runs["rows"]("one", 0)["fed"] == []  # one process: the plain device_put


@slow
def test_files_written_once_and_checkpoints_complete(runs):
    from sam_jax.train import checkpoint_epochs
    from sam_jax.train.logging import read_metrics

    workdir = os.path.join(runs["tmp"], "p2_device")
    records = read_metrics(workdir)
    assert [r["epoch"] for r in records] == [0, 1]  # process 1 appended nothing
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["num_processes"] == 2
    assert checkpoint_epochs(workdir) == [1, 2]


@slow
def test_checkpoint_written_by_two_processes_restores_in_one(runs):
    from sam_jax.train import load_variables

    p2 = runs["vars"]["p2_device"]
    restored = load_variables(os.path.join(runs["tmp"], "p2_device"))  # this process
    import jax

    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(restored)}
    assert all(np.array_equal(flat[k], p2[k]) for k in p2)  # bit-for-bit


@slow
@pytest.mark.parametrize("resumed,reference", [("p1_from_p2", "p1_device"),
                                               ("p2_from_p1", "p2_device")])
def test_resume_across_layouts_finishes_the_run(runs, resumed, reference):
    tag = "one_r" if resumed.startswith("p1") else "two_r"
    assert runs["rows"](tag, 0)["resumed_from"] == [1]
    workdir = os.path.join(runs["tmp"], resumed)
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "corrupt"))
    diff = _max_diff(runs["vars"][resumed], runs["vars"][reference])
    print(f"{resumed} vs uninterrupted {reference}: max |Δ| {diff:.3g}")
    assert diff <= ATOL
    got, want = _lambdas(runs, resumed), _lambdas(runs, reference)
    assert np.all(np.abs(got - want) <= LAMBDA_RTOL * np.abs(want))


def _lambdas(runs, name: str) -> np.ndarray:
    """(λ_max, λ₂) that process 0 logged for the last epoch of run ``name``."""
    from sam_jax.train.logging import read_metrics

    record = read_metrics(os.path.join(runs["tmp"], name))[-1]
    assert record["epoch"] == 1 and "lambda_max" in record, f"{name}: no λ_max logged"
    values = np.array([record["lambda_max"], record["lambda_2"]], dtype=np.float64)
    assert np.all(np.isfinite(values)) and values[0] > 0 and values[0] >= values[1]
    assert record["lambda_max_examples"] == 32
    return values


@slow
@pytest.mark.parametrize("mode", ["device", "synced"])
def test_lambda_max_of_two_processes_equals_one_process(runs, mode):
    one, two = _lambdas(runs, f"p1_{mode}"), _lambdas(runs, f"p2_{mode}")
    rel = np.abs(two - one) / np.abs(one)
    print(f"{mode} ε: (λ_max, λ₂) 1 process {one.tolist()}, 2 processes {two.tolist()}, "
          f"relative |Δ| {rel.tolist()}")
    assert np.all(rel <= LAMBDA_RTOL)


@slow
def test_lambda_max_tolerance_is_far_below_the_epsilon_modes_difference(runs):
    for p in ("p1", "p2"):
        device, synced = _lambdas(runs, f"{p}_device"), _lambdas(runs, f"{p}_synced")
        assert abs(device[0] - synced[0]) > 100 * LAMBDA_RTOL * abs(device[0])


@slow
def test_every_process_takes_part_in_the_lambda_max_products(runs):
    # lambda_max_iters=8 products, each over 2 chunks of 16 (lambda_max_examples=32,
    # lambda_max_chunk=16): 16 chunks placed on the mesh per run, in every process.
    placed = 8 * 2
    for name in ("p2_device", "p2_synced"):
        per_process = [runs["rows"]("two", pid)["lambda"][name] for pid in (0, 1)]
        # Each process runs the Lanczos recurrence on its own replica of the same
        # all-reduced products, so they agree exactly (a process that decided to
        # stop at another step would leave the other waiting in a collective).
        assert per_process[0]["lambda_max"] is not None
        assert per_process[0]["lambda_max"] == per_process[1]["lambda_max"]
        assert per_process[0]["lambda_2"] == per_process[1]["lambda_2"]
        for pid, info in enumerate(per_process):
            # Split over the 4 devices: process 0 places rows 0-7, process 1 rows 8-15.
            assert [tuple(b) for b in info["hvp_batches"]] == \
                [(16, 8 * pid, 8 * pid + 8, False)] * placed, f"{name} process {pid}"
    one = runs["rows"]("one", 0)["lambda"]["p1_device"]["hvp_batches"]
    assert [tuple(b) for b in one] == [(16, 0, 16, False)] * placed  # the same mesh


@slow
def test_psum_order_is_reported(runs):
    # Not an assertion on the order (an implementation detail of XLA and gloo):
    # printed for the record of why the layouts are not bit-for-bit equal. Measured
    # here: 1 process [1.0]*8 (every column summed 0→1→2→3); 2 processes
    # [1, 1, 0, 0, 0, 0, 2, 2] (gloo's ring all-reduce starts each chunk at
    # another device).
    one, two = runs["rows"]("one", 0)["psum_order"], runs["rows"]("two", 0)["psum_order"]
    print(f"psum of rows (1, 1e8, -1e8, 1) in float32, per column: 1 process {one}, "
          f"2 processes {two}")
    assert len(one) == len(two) == 8
    assert set(one) | set(two) <= {0.0, 1.0, 2.0}


# ------------------------------------------------------- fast, single process
class _FakeSharding:
    def __init__(self, spans):
        self.spans = spans

    def addressable_devices_indices_map(self, shape):
        return {i: (slice(a, b),) + (slice(None),) * (len(shape) - 1)
                for i, (a, b) in enumerate(self.spans)}


def test_local_rows_is_the_union_of_this_process_shards():
    from sam_jax.train.distributed import local_rows

    assert local_rows(_FakeSharding([(12, 16), (8, 12)]), (16, 3)) == slice(8, 16)
    with pytest.raises(ValueError, match="not contiguous"):
        local_rows(_FakeSharding([(0, 4), (8, 12)]), (16, 3))


def test_put_process_batch_in_one_process_is_the_plain_device_put():
    import jax

    from sam_jax.train import distributed, parallel

    mesh = parallel.make_mesh()
    batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
             "y": np.arange(8, dtype=np.int32)}
    got = distributed.put_process_batch(batch, mesh)
    want = jax.device_put(batch, parallel.batch_sharded(mesh))
    for key in batch:
        assert got[key].sharding == want[key].sharding
        np.testing.assert_array_equal(np.asarray(got[key]), batch[key])
        for a, b in zip(got[key].addressable_shards, want[key].addressable_shards):
            assert a.device == b.device and a.index == b.index


def test_cli_passes_its_flags_to_initialize_and_the_rest_to_the_train_cli(monkeypatch):
    from sam_jax.train import cli, distributed

    calls = {}
    monkeypatch.setattr(distributed, "initialize",
                        lambda *args: calls.setdefault("initialize", args))
    monkeypatch.setattr(distributed, "shutdown", lambda: calls.setdefault("shutdown", True))
    monkeypatch.setattr(distributed, "set_local_cpu_devices",
                        lambda k: calls.setdefault("cpu", k))
    monkeypatch.setattr(cli, "main", lambda argv: calls.setdefault("train", argv) and 0)
    argv = ["--coordinator-address", "10.0.0.1:1234", "--num-processes", "4",
            "--process-id", "3", "--local-cpu-devices", "2", "--", "--workdir", "w",
            "--phases", "sgd:1"]
    assert distributed.main(argv) == 0
    assert calls == {"cpu": 2, "initialize": ("10.0.0.1:1234", 4, 3),
                     "train": ["--workdir", "w", "--phases", "sgd:1"], "shutdown": True}


def test_initialize_reads_the_environment(monkeypatch):
    import jax

    from sam_jax.train import distributed

    seen = {}
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
    monkeypatch.setattr(jax.config, "update", lambda *a: seen.setdefault("config", a))
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "h:1")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "1")
    distributed.initialize()
    assert (seen["coordinator_address"], seen["num_processes"], seen["process_id"]) == \
        ("h:1", 2, 1)
    assert seen["config"] == ("jax_cpu_collectives_implementation", "gloo")
