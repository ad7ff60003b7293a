"""Kill soak: SIGKILL a training run at seeded random moments, resume it each time,
and compare the end with an uninterrupted run, bit for bit.

    python benchmarks/kill_soak.py --kills 20 --seed 0 --workdir runs/kill_soak

A tiny run (MNIST-1D, MLP of width 16, 4 steps per epoch, phases
``sgd:3,sam:3,sgd:2``: two switches; ``--checkpoint-every 1 --keep-last 2``, so
retention deletes old steps) is started as ``python -m sam_jax.train ...`` in a
subprocess and killed with SIGKILL at a moment drawn for each kill (seeded):

* ``random``: a uniform time within the uninterrupted run's wall time;
* ``ckpt-write``: while a checkpoint is being written (an ``*.orbax-checkpoint-tmp*``
  directory exists in ``checkpoints/``);
* ``deletion``: while retention's trash (``checkpoints/_deleted/``) holds a step;
* ``rewrite``: while ``config.json`` or ``metrics.jsonl`` is being rewritten (its
  ``.<name>.*.tmp`` file exists);
* ``append``: right after ``metrics.jsonl`` grew (between the epoch's record and
  its checkpoint).

The watcher polls the workdir every ~0.2 ms and kills when it sees the moment
(leftovers of the previous kill, until the resume cleans them up, do not count)
(after a random number of earlier occurrences of it, so kills spread over the
run); a moment whose window closes before the signal lands is reported as such
(the "left behind" column says what the kill left on disk). Each kill is followed
by a resume (the same command); when a run finishes before its moment comes, the
run is compared and the next kills go to a fresh run ("campaign"). At the end
the final parameters of every campaign (`sam_jax.train.load_variables`, every leaf
``np.array_equal``) and its ``metrics.jsonl`` records (without ``epoch_time`` and
``wall_time``) are compared with the uninterrupted run's.

Prints a table (kill #, moment, what was in flight, what was left behind, resumed
ok) and a verdict; writes ``soak.json`` in ``--workdir``; exits 1 on any
difference or failed resume.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ARGS = ["--dataset", "mnist1d", "--model", "mlp", "--model-kwargs",
            '{"width": 16, "depth": 1}', "--phases", "sgd:3,sam:3,sgd:2",
            "--batch-size", "32", "--steps-per-epoch", "4", "--lr", "0.05",
            "--checkpoint-every", "1", "--keep-last", "2", "--no-progress"]
MOMENTS = ("random", "ckpt-write", "deletion", "rewrite", "append")
TIMING = ("epoch_time", "wall_time")


def _command(workdir: str) -> list[str]:
    return [sys.executable, "-m", "sam_jax.train", *RUN_ARGS, "--workdir", workdir]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _observe(workdir: str) -> dict:
    """What is in flight in ``workdir`` right now."""
    state = {"ckpt_tmp": [], "trash": [], "rewrite": [], "metrics_size": -1}
    ckdir = os.path.join(workdir, "checkpoints")
    try:
        for entry in os.scandir(ckdir):
            if "orbax-checkpoint-tmp" in entry.name:
                state["ckpt_tmp"].append(entry.name)
    except OSError:
        pass
    try:
        state["trash"] = os.listdir(os.path.join(ckdir, "_deleted"))
    except OSError:
        pass
    try:
        for entry in os.scandir(workdir):
            if entry.name.endswith(".tmp") and (entry.name.startswith(".metrics.jsonl.")
                                                or entry.name.startswith(".config.json.")):
                state["rewrite"].append(entry.name)
    except OSError:
        pass
    try:
        state["metrics_size"] = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
    except OSError:
        pass
    return state


def _describe(state: dict) -> str:
    parts = []
    if state["ckpt_tmp"]:
        parts.append("writing " + ",".join(sorted(state["ckpt_tmp"])).replace(
            ".orbax-checkpoint-tmp", " (tmp)"))
    if state["trash"]:
        parts.append("trash: step " + ",".join(sorted(state["trash"])))
    if state["rewrite"]:
        parts.append("rewriting " + ",".join(n.split(".")[1] for n in state["rewrite"]))
    return "; ".join(parts) or "-"


def _hit(moment: str, state: dict, last_size: int) -> bool:
    if moment == "ckpt-write":
        return bool(state["ckpt_tmp"])
    if moment == "deletion":
        return bool(state["trash"])
    if moment == "rewrite":
        return bool(state["rewrite"])
    if moment == "append":
        return last_size >= 0 and state["metrics_size"] > last_size
    return False


def _run_until(workdir: str, moment: str, skip: int, delay: float, log) -> dict:
    """Starts the run; kills it at ``moment`` (after ``skip`` earlier occurrences,
    or after ``delay`` s for ``random``). Returns what happened."""
    start = time.time()
    proc = subprocess.Popen(_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(), cwd=ROOT, text=True)
    seen, was_in, last_size, killed_state = 0, False, -1, None
    # leftovers of the previous kill (a tmp dir, a step in the trash) are not "in
    # flight": they are ignored until they disappear (cleaned up by the resume)
    old = _observe(workdir)
    while proc.poll() is None:
        state = _observe(workdir)
        for key in ("ckpt_tmp", "trash", "rewrite"):
            old[key] = [n for n in old[key] if n in state[key]]
            state[key] = [n for n in state[key] if n not in old[key]]
        if moment == "random":
            hit = time.time() - start >= delay
        else:
            hit = _hit(moment, state, last_size)
        last_size = state["metrics_size"]
        if hit and not was_in:
            seen += 1
            if seen > skip:
                killed_state = state
                os.kill(proc.pid, signal.SIGKILL)
                break
        was_in = hit and moment != "append" and moment != "random"
        time.sleep(0.0002)
    out, err = proc.communicate()
    log.write(f"--- {moment} skip={skip} rc={proc.returncode}\n{out}\n{err}\n")
    return {"killed": killed_state is not None, "rc": proc.returncode,
            "seconds": time.time() - start, "in_flight": killed_state,
            "left": _observe(workdir), "stderr": err}


def _records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in f if line.strip()]


def _params_equal(a_dir: str, b_dir: str) -> bool:
    import jax
    import numpy as np

    from sam_jax.train import load_variables

    a, b = load_variables(a_dir), load_variables(b_dir)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
            and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="number of SIGKILLs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--workdir", default="runs/kill_soak", help="scratch directory "
                        "(emptied first)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = os.path.abspath(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    log = open(os.path.join(root, "soak.log"), "w")

    ref = os.path.join(root, "reference")
    t0 = time.time()
    done = subprocess.run(_command(ref), capture_output=True, text=True, env=_env(), cwd=ROOT)
    ref_seconds = time.time() - t0
    log.write(f"--- reference rc={done.returncode}\n{done.stdout}\n{done.stderr}\n")
    if done.returncode != 0:
        print("the uninterrupted reference run failed:\n" + done.stderr[-3000:])
        return 1
    ref_records = _records(ref)
    print(f"reference run: {ref_seconds:.1f} s wall, {len(ref_records)} epochs; "
          f"{args.kills} kills, seed {args.seed}")

    table, campaigns, campaign = [], [], 0
    workdir = os.path.join(root, f"run{campaign}")
    pending_resume = None  # index in table of the last kill, whose resume is next
    kill = 0
    while kill < args.kills:
        moment = rng.choice(MOMENTS)
        skip = rng.randint(0, 2) if moment in ("ckpt-write", "deletion", "append") else 0
        delay = rng.uniform(0.0, ref_seconds)
        outcome = _run_until(workdir, moment, skip, delay, log)
        if pending_resume is not None:
            # this invocation was the resume of the previous kill: ok unless it failed
            # by itself (a kill of this invocation is the next row's business)
            ok = outcome["killed"] or outcome["rc"] == 0
            table[pending_resume]["resumed_ok"] = ok
            if not ok:
                table[pending_resume]["error"] = outcome["stderr"].strip()[-500:]
            pending_resume = None
        if outcome["killed"]:
            kill += 1
            what = f"{moment}" + (f" #{skip + 1}" if moment in ("ckpt-write", "deletion",
                                                                 "append") else "")
            if moment == "random":
                what += f" @{delay:.1f}s"
            table.append({"kill": kill, "campaign": campaign, "moment": what,
                          "at_s": round(outcome["seconds"], 2),
                          "in_flight": ("epoch record appended; " if moment == "append"
                                        else "") + _describe(outcome["in_flight"]),
                          "left_behind": _describe(outcome["left"]), "resumed_ok": None})
            pending_resume = len(table) - 1
            print(f"kill {kill:2d}: {what:<16s} at {outcome['seconds']:5.1f} s; in flight: "
                  f"{table[-1]['in_flight']}; left: {table[-1]['left_behind']}", flush=True)
        elif outcome["rc"] == 0:  # finished before the moment came: compare, start anew
            campaigns.append(workdir)
            campaign += 1
            workdir = os.path.join(root, f"run{campaign}")
            print(f"(run finished before its '{moment}' moment came; a fresh run takes "
                  f"the next kills)", flush=True)
        else:
            print("the run failed by itself:\n" + outcome["stderr"][-3000:])
            return 1
    # the last resume runs to the end
    final = subprocess.run(_command(workdir), capture_output=True, text=True, env=_env(),
                           cwd=ROOT)
    log.write(f"--- final rc={final.returncode}\n{final.stdout}\n{final.stderr}\n")
    if pending_resume is not None:
        table[pending_resume]["resumed_ok"] = final.returncode == 0
        if final.returncode != 0:
            table[pending_resume]["error"] = final.stderr.strip()[-500:]
    campaigns.append(workdir)

    params_ok = all(_params_equal(c, ref) for c in campaigns)
    metrics_ok = all(_records(c) == ref_records for c in campaigns)
    resumed_ok = all(row["resumed_ok"] for row in table)
    bit_identical = sum(_params_equal(c, ref) and _records(c) == ref_records for c in campaigns)

    header = f"{'kill':>4}  {'moment':<16}  {'at s':>6}  {'in flight':<34}  " \
             f"{'left behind':<34}  resumed ok"
    print("\n" + header + "\n" + "-" * len(header))
    for row in table:
        print(f"{row['kill']:>4}  {row['moment']:<16}  {row['at_s']:>6.1f}  "
              f"{row['in_flight'][:34]:<34}  {row['left_behind'][:34]:<34}  "
              f"{'yes' if row['resumed_ok'] else 'NO'}")
    verdict = params_ok and metrics_ok and resumed_ok
    print(f"\n{len(table)} kills over {len(campaigns)} run(s); every resume ok: "
          f"{'yes' if resumed_ok else 'NO'}; final parameters bit-identical to the "
          f"uninterrupted run (every leaf np.array_equal): {bit_identical}/{len(campaigns)} "
          f"runs; metrics.jsonl equal without wall times: {'yes' if metrics_ok else 'NO'}")
    print(f"verdict: {'PASS' if verdict else 'FAIL'}")
    summary = {"kills": len(table), "seed": args.seed, "campaigns": len(campaigns),
               "reference_seconds": ref_seconds, "params_bit_identical": params_ok,
               "metrics_equal": metrics_ok, "resumed_ok": resumed_ok,
               "bit_identical_runs": bit_identical, "table": table, "verdict": verdict}
    with open(os.path.join(root, "soak.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
