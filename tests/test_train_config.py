"""Phase syntax, schedules, config validation and CLI errors (no training)."""
import math

import pytest

from sam_jax.train import TrainConfig, parse_phases
from sam_jax.train.cli import build_parser, main
from sam_jax.train.config import Phase
from sam_jax.train.loop import check_config
from sam_jax.train.schedules import cosine, make_schedule, wrn_step


def test_parse_phases_examples():
    assert parse_phases("sgd:150,sam:10") == (Phase("sgd", 150), Phase("sam", 10))
    phases = parse_phases("sgd:20, sam:5:0.1 ,eigen_sam:3:rho=0.05:alpha=0.2:refresh_every=10")
    assert phases[1] == Phase("sam", 5, 0.1)
    assert phases[2] == Phase("eigen_sam", 3, 0.05, (("alpha", 0.2), ("refresh_every", 10)))
    assert parse_phases("usam:2:0.5,asam:1") == (Phase("usam", 2, 0.5), Phase("asam", 1))
    assert Phase("sam", 5, 0.1, (("eta", 0.01),)).to_str() == "sam:5:0.1:eta=0.01"


@pytest.mark.parametrize("spec, fragment", [
    ("", "empty"),
    ("sgd", "malformed phase"),
    ("sgd:ten", "not an integer"),
    ("sgd:0", "must be > 0"),
    ("sam:5:-0.1", "rho must be"),
    ("sam:5:abc", "neither a rho"),
    ("sam:5:0.1:0.2", "two rho"),
    (":5", "malformed phase"),
])
def test_parse_phases_rejects_malformed(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_phases(spec)


def test_phase_index_and_boundaries_are_global():
    config = TrainConfig(phases="sgd:3,sam:2,sgd:1")
    assert [config.phase_index(e) for e in range(6)] == [0, 0, 0, 1, 1, 2]
    assert config.phase_boundaries() == (0, 3, 5, 6)
    assert config.total_epochs == 6
    with pytest.raises(ValueError, match="past the last phase"):
        config.phase_index(6)


def test_cosine_schedule_known_values():
    schedule = cosine(0.1, total_steps=100)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(50) == pytest.approx(0.05)
    assert schedule(25) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert schedule(100) == pytest.approx(0.0, abs=1e-12)


def test_wrn_step_schedule_on_global_epoch():
    # T = 10 epochs of 4 steps: x1 for epochs 0-2 (< 3), x0.2 for 3-5 (< 6), x0.04 after.
    schedule = wrn_step(0.1, total_steps=40, steps_per_epoch=4)
    by_epoch = [schedule(4 * e) for e in range(10)]
    assert by_epoch == pytest.approx([0.1] * 3 + [0.02] * 3 + [0.004] * 4)
    assert schedule(11) == pytest.approx(0.1) and schedule(12) == pytest.approx(0.02)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear", 0.1, 10, 1)


@pytest.mark.parametrize("changes, fragment", [
    (dict(rho=-0.1), "rho must be"),
    (dict(phases="sgd:2,sam:x"), "not an integer"),
    (dict(phases="sgd:2,adamw:1"), "unknown optimizer 'adamw'"),
    (dict(schedule="exp"), "unknown schedule"),
    (dict(weight_decay_mode="l1"), "unknown weight_decay_mode"),
    (dict(momentum_at_switch="keep"), "unknown momentum_at_switch"),
    (dict(batch_size=0), "batch_size must be"),
    (dict(init_from="/nowhere"), "init_from and init_step"),
    (dict(init_from="/nowhere", init_step=99), "init_step must be in"),
    (dict(phases="sgd:1,eigen_sam:1:alpha=0.2:bogus=1"), "bogus"),
])
def test_check_config_errors(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_config(TrainConfig(**changes))


def test_cli_maps_flags_onto_config():
    args = vars(build_parser().parse_args([
        "--phases", "sgd:2,sam:1:0.1", "--batch-size", "64", "--no-progress",
        "--model-kwargs", '{"width": 4}', "--clip-norm", "none", "--keep-last", "3",
        "--momentum-at-switch", "carry", "--nesterov"]))
    args.pop("cpu_devices")
    config = TrainConfig(**args)
    assert config.phases == "sgd:2,sam:1:0.1" and config.batch_size == 64
    assert config.progress is False and config.nesterov is True
    assert config.model_kwargs == {"width": 4} and config.clip_norm is None
    assert config.keep_last == 3 and config.momentum_at_switch == "carry"


@pytest.mark.parametrize("argv, fragment", [
    (["--dataset", "imagenet22k"], "unknown dataset"),
    (["--model", "vit_huge"], "unknown model"),
    (["--rho", "-1"], "rho must be"),
    (["--phases", "sgd:1;sam:1"], "phase"),
    (["--init-from", "/definitely/missing", "--init-step", "1", "--phases", "sgd:1,sam:1"],
     "no checkpoint"),
    (["--model-kwargs", "[1]"], "JSON object"),
])
def test_cli_bad_inputs_exit_with_named_problem(argv, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--workdir", str(tmp_path / "run"), "--no-progress", "--phases", "sgd:1",
              "--steps-per-epoch", "1", *argv])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err
