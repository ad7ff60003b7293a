"""Command line: ``python -m sam_jax.train --dataset mnist1d --model cnn1d
--phases sgd:20,sam:5 --workdir DIR``.

Every `TrainConfig` field is a flag (``batch_size`` -> ``--batch-size``; booleans
have ``--no-`` forms; dict fields take JSON, e.g. ``--model-kwargs '{"width": 8}'``;
``none`` unsets an optional number; ``--data-dir`` is the TFDS data directory,
``dataset_kwargs["data_dir"]``). Errors print one line and no traceback:
``error: <what is wrong> (see python -m sam_jax.train --help)`` with exit status 2
for invalid arguments, a refused resume or an unusable workdir, and 1 for a failure
while training (divergence, a disk that fills up while saving). Warnings (a corrupt
checkpoint skipped, another code version) print as ``warning: ...`` lines.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
import warnings

from sam_jax.train.config import TrainConfig

_HELP = {
    "workdir": "output directory: config.json, metrics.jsonl, checkpoints/",
    "dataset": "mnist1d | digits | patch | cifar10 | cifar100 | svhn | fashion_mnist | mnist",
    "dataset_kwargs": "JSON dict passed to get_dataset, e.g. '{\"num_samples\": 10000}'",
    "model": "mlp | cnn6 | cnn1d | resnet18 | resnet50 | wrn16_8 | wrn28_10 | wrn | patch_cnn",
    "model_kwargs": "JSON dict passed to get_model, e.g. '{\"width\": 8}'",
    "phases": "name:epochs[:rho][:key=value...] list, e.g. sgd:150,sam:10 (global epochs). "
              "Optimizers and their key=value options (from sam_jax.optim.registry): {phases}",
    "rho": "default perturbation radius of phases without one (SAM paper 0.05)",
    "perturbation_kwargs": "JSON dict of options for every non-SGD perturbation",
    "batch_size": "global batch size (late-phase SAM code: 128)",
    "grad_accum": "gradient accumulation: K microbatches per step (batch_size is the global "
                  "batch, split into K); per-microbatch epsilon (m-sharpness, m = microbatch "
                  "size), perturbed gradients averaged; BN: own statistics per microbatch, "
                  "one running-statistics update per step",
    "accum_epsilon": "with --grad-accum > 1: microbatch (epsilon per microbatch) | batch "
                     "(full-batch epsilon, exact: ascent and perturbed gradients averaged "
                     "over the microbatches; any algorithm)",
    "eval_batch_size": "test evaluation batch size",
    "steps_per_epoch": "cap on steps per epoch; none = one pass over the train set",
    "lr": "peak learning rate",
    "schedule": "cosine | wrn_step | constant, on the global step",
    "warmup_epochs": "linear warm-up epochs",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "weight decay coefficient",
    "weight_decay_mode": "decoupled (in SGD, PyTorch repos) | loss (L2 in the loss, official JAX SAM)",
    "label_smoothing": "label smoothing of the training loss (late-phase SAM code: 0.1)",
    "clip_norm": "global-norm clip of the final gradient (official JAX SAM: 5.0)",
    "momentum_at_switch": "reset (paper's code) | carry the momentum buffer across a switch",
    "num_devices": "devices on the data mesh axis; none = all",
    "per_device_perturbation": "per-device epsilon (m-sharpness) via shard_map",
    "seed": "seed of init, data order and dropout",
    "init_from": "start from another run's checkpoint: its workdir",
    "init_step": "... at this epoch (global epochs continue from it)",
    "resume": "resume from the latest checkpoint in workdir",
    "keep_last": "keep the last N checkpoints (none: all); phase boundaries are always kept",
    "keep_every": "also keep every N-th epoch",
    "keep_epochs": "also save and keep these epochs, comma-separated (e.g. 30,48,54)",
    "checkpoint_every": "save every N epochs (phase boundaries and the last epoch always)",
    "lambda_max_every": "log lambda_max (Lanczos) every k epochs (0: never)",
    "lambda_max_examples": "train examples (un-augmented) for lambda_max",
    "lambda_max_chunk": "examples per HVP chunk of the lambda_max measurement (BN 'batch' "
                        "mode normalizes each chunk by its own statistics; 128 as the "
                        "late-phase SAM code)",
    "lambda_max_bn_mode": "batch (late-phase SAM) | running (PyHessian)",
    "lambda_max_iters": "Lanczos steps for lambda_max",
    "eval_every": "evaluate on the test set every N epochs",
    "progress": "tqdm progress bar",
    "host_step_kinds": "for algorithms with an expensive and a cheap step kind: compile "
                       "both and pick one per step on the host by the transform's own "
                       "rule (no lax.cond, fast on CPU); --no-... keeps the in-graph cond",
    "eigen_refresh_on_host": "deprecated alias of --host-step-kinds",
}


def _optional(cast):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else cast(text)
    parse.__name__ = cast.__name__
    return parse


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


PROG = "python -m sam_jax.train"
HELP_POINTER = f"(see {PROG} --help)"


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage dump) and exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"error: {message} {HELP_POINTER}\n")


def _default_text(default) -> str:
    if default is None:
        return "none"
    if isinstance(default, dict):
        return json.dumps(default)
    return str(default)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, usage=f"{PROG} [--option value ...] (every option below)",
        description="Train a model with phases of SAM-family optimizers "
                    "(e.g. --phases sgd:20,sam:5).")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = str(hints[field.name])
        default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
                   else field.default)
        text = _HELP.get(field.name, "")
        if field.name == "phases":  # generated from the declarations
            from sam_jax.optim import registry

            text = text.format(phases=registry.phases_help())
        kwargs = {"default": default,
                  "help": f"{text} (default: {_default_text(default)})".replace("%", "%%")}
        if hint.startswith("<class 'bool'>") or hint.startswith("bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
            on = flag if default else "--no-" + flag[2:]
            kwargs["help"] = f"{text} (default: {on})".replace("%", "%%")
        elif "dict" in hint:
            kwargs["type"] = _json_dict
        elif "tuple" in hint:
            kwargs["type"] = _int_tuple
        elif "int" in hint:
            kwargs["type"] = _optional(int) if "None" in hint else int
        elif "float" in hint:
            kwargs["type"] = _optional(float) if "None" in hint else float
        else:
            kwargs["type"] = str
        parser.add_argument(flag, dest=field.name, **kwargs)
    # SUPPRESS: absent from the namespace unless given, so that code mapping
    # ``vars(parse_args(...))`` onto TrainConfig keeps working
    parser.add_argument("--data-dir", default=argparse.SUPPRESS,
                        help="TFDS data directory of a TFDS dataset (cifar10, cifar100, svhn, "
                             "fashion_mnist, mnist); sets dataset_kwargs['data_dir'] "
                             "(default: TFDS's own)")
    parser.add_argument("--cpu-devices", type=_positive_int, default=None,
                        help="simulate this many CPU devices (set before JAX starts; >= 1)")
    return parser


def _apply_data_dir(args: dict, data_dir) -> None:
    """Maps ``--data-dir`` onto ``dataset_kwargs["data_dir"]`` (TFDS datasets only)."""
    if data_dir is None:
        return
    from sam_jax.data.registry import TFDS

    if args["dataset"] not in TFDS:
        raise ValueError(f"--data-dir is the TFDS data directory; --dataset "
                         f"{args['dataset']} is built in (no download, no data directory). "
                         f"TFDS datasets: {', '.join(TFDS)}")
    given = args["dataset_kwargs"].get("data_dir")
    if given is not None and given != data_dir:
        raise ValueError(f"--data-dir {data_dir} and --dataset-kwargs data_dir {given} "
                         "disagree; give one")
    args["dataset_kwargs"] = {**args["dataset_kwargs"], "data_dir": data_dir}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each: ``warning: <Category>: <message>``."""
    print(f"warning: {category.__name__}: {message}", file=sys.stderr if file is None else file)


def _quiet_closed_loop(hook):
    """An unraisable-exception hook that drops orbax's late ``RuntimeError: Event
    loop is closed`` (a tensorstore callback into the private event loop of a
    restore that already failed and was reported); everything else goes to ``hook``."""
    def unraisable(info):
        if isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(
                info.exc_value):
            return
        hook(info)
    return unraisable


def main(argv: list[str] | None = None) -> int:
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    cpu_devices = args.pop("cpu_devices")
    data_dir = args.pop("data_dir", None)
    warnings.showwarning = _show_warning
    try:
        _apply_data_dir(args, data_dir)
        config = TrainConfig(**args)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    if cpu_devices is not None:
        import jax

        jax.config.update("jax_num_cpu_devices", cpu_devices)
    from sam_jax.train.checkpoint import CheckpointWriteError
    from sam_jax.train.loop import TrainingDiverged, check_config, run
    from sam_jax.train.workdir import WorkdirError

    try:
        check_config(config)
    except ValueError as err:
        parser.error(str(err))
    start = time.time()
    try:
        result = run(config)
    except TrainingDiverged as err:
        return _fail(1, str(err))
    except CheckpointWriteError as err:  # disk full / read-only while saving
        return _fail(1, str(err))
    except WorkdirError as err:  # unusable --workdir, found before anything is written
        return _fail(2, str(err))
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.error(str(err))
    except OSError as err:  # another write failure (e.g. metrics.jsonl on a full disk)
        return _fail(1, f"{err.strerror or err} ({getattr(err, 'filename', None) or ''})")
    if not config.progress:  # with progress on, the per-epoch table was printed live
        from sam_jax.train.logging import summarize

        print(summarize(result.history))
    print(f"done: {result.final_epoch} epochs, {result.grad_evals:.0f} gradient evaluations, "
          f"{time.time() - start:.1f} s this invocation; results in {result.workdir}")
    return 0


def _fail(code: int, message: str) -> int:
    """Prints one ``error:`` line (with the ``--help`` pointer for exit status 2)."""
    print(f"error: {message}" + (f" {HELP_POINTER}" if code == 2 else ""), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
