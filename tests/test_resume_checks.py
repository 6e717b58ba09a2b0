"""Resume states that check what they resume (issue 15, items 6-10), on real resume states of tiny runs.

`--from_resume 1` refuses other run settings, falls back from a damaged newest state to the one before it, a
stopped run exits 130 / 143 and leaves weights a later stage refuses, output directories are checked at start-up,
a torn metrics line is dropped, a second run on the same checkpoints is refused, and nonsense flags or a
non-finite loss stop the run instead of ending "done". Tiny models on the first lines of the shipped data, as in
test_trainer.py; runs are in-process unless the exit status or a second process is the point.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_trainer import ENV, REPO, pretrain_argv, train_losses
from trainer import train_full_sft, train_pretrain
from trainer.checkpoint import PARTIAL_FILE, resume_states
from trainer.resume_checks import MANIFEST_FILE
from trainer.trainer_utils import causal_lm_loss, parse_args, resolve_weight_dir, run_main

RESUME = "pretrain_64_resume"


def run_argv(data, root: Path, *extra: str) -> list[str]:
    """A pretraining run saving every step, without eval (the runs of this file)."""
    return pretrain_argv(data, root, "--eval_data_path", "", "--save_interval", "1", *extra)


@pytest.fixture(scope="module")
def saved_run(data, tmp_path_factory) -> Path:
    """The root (out/, checkpoints/) of a 2-step run: resume states step_1 and step_2, of batches of 4 blocks."""
    root = tmp_path_factory.mktemp("saved_run")
    assert train_pretrain.main(run_argv(data, root, "--max_steps", "2"))["step"] == 2
    return root


@pytest.fixture(scope="module")
def reference_losses(data, tmp_path_factory) -> dict[int, float]:
    """The losses of the same run made in one go to step 3 (its first two steps are warmup: the same as above)."""
    root = tmp_path_factory.mktemp("reference")
    train_pretrain.main(run_argv(data, root, "--max_steps", "3"))
    return train_losses(root / "out")


def copy_of(saved_run: Path, tmp_path: Path) -> Path:
    """A private copy of the saved run, so each test may resume or damage it."""
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def state_names(root: Path) -> list[str]:
    return [path.name for path in resume_states(root / "checkpoints" / RESUME)]


# ----------------------------------------------------------------------------------------------------------------
# 6. Resume checks what it resumes


@pytest.mark.parametrize("change, message", [
    (["--batch_size", "2"], "--batch_size 2 differs from the resumed run's 4"),
    (["--accumulation_steps", "2"], "--accumulation_steps 2 differs from the resumed run's 1"),
    (["--max_seq_len", "48"], "--max_seq_len 48 differs from the resumed run's 32"),
    (["--seed", "7"], "--seed 7 differs from the resumed run's 42"),
    (["--epochs", "3"], "--epochs 3 differs from the resumed run's 1"),
    (["--num_hidden_layers", "3"], "--num_hidden_layers 3 differs from the resumed run's 2"),
    ("other data file", r"--data_path .*pretrain_test.jsonl \(.* bytes\) differs from the resumed run's "
                        r".*pretrain.jsonl \(.* bytes\)"),
])
def test_resume_refuses_other_settings_of_the_run_in_one_sentence(data, saved_run, tmp_path, change, message):
    root = copy_of(saved_run, tmp_path)
    change = ["--data_path", str(data["pretrain_test"])] if change == "other data file" else change
    metrics_before = (root / "out" / "runs" / "pretrain_64" / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=message + r" \(.*step_00000002\); resume with .* or start a new run with "
                                                   "another --save_weight") as refused:
        train_pretrain.main(run_argv(data, root, "--max_steps", "3", "--from_resume", "1", *change))
    assert "\n" not in str(refused.value)
    # refused before anything was written: the states and the metrics log are those of the interrupted run
    assert state_names(root) == ["step_00000001", "step_00000002"]
    assert (root / "out" / "runs" / "pretrain_64" / "metrics.jsonl").read_text() == metrics_before


def test_resume_accepts_the_changes_its_help_allows(data, saved_run, tmp_path, capsys, reference_losses):
    with pytest.raises(SystemExit):
        parse_args("pretrain", "test", argv=["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    allowed = ["--max_steps", "--eval_interval", "--log_interval", "--save_interval", "--keep_last", "--num_workers",
               "--device"]
    assert all(flag in help_text.split("free to change:")[1] for flag in allowed)

    root = copy_of(saved_run, tmp_path)
    resumed = train_pretrain.main(run_argv(data, root, "--from_resume", "1", "--max_steps", "3", "--log_interval",
                                           "1", "--eval_interval", "7", "--save_interval", "5", "--keep_last", "3",
                                           "--num_workers", "0", "--device", "cpu"))
    assert resumed["step"] == 3
    assert train_losses(root / "out") == pytest.approx(reference_losses, rel=1e-6)


def test_resume_under_another_width_stops_and_names_the_run_that_exists(data, saved_run, tmp_path):
    root = copy_of(saved_run, tmp_path)
    with pytest.raises(SystemExit, match=r"--from_resume 1: .* has no resume state of pretrain_128 but has one of "
                                         r"pretrain_64 \(--hidden_size 64\); resume with that run's flags"):
        train_pretrain.main(run_argv(data, root, "--from_resume", "1", "--hidden_size", "128"))
    assert not (root / "out" / "pretrain_128").exists()
    assert not resume_states(root / "checkpoints" / "pretrain_128_resume")


# ----------------------------------------------------------------------------------------------------------------
# 7. Damaged resume states


def test_every_file_of_a_resume_state_is_in_its_manifest(saved_run):
    for state in resume_states(saved_run / "checkpoints" / RESUME):
        manifest = json.loads((state / MANIFEST_FILE).read_text())
        files = sorted(path.relative_to(state).as_posix() for path in state.rglob("*")
                       if path.is_file() and path.name != MANIFEST_FILE)
        assert sorted(manifest) == files and any(name.endswith(".distcp") for name in files)
        for name in files:
            content = (state / name).read_bytes()
            assert manifest[name] == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def damage(state: Path, how: str) -> None:
    if how == "truncated trainer_state.pt":
        path = state / "trainer_state.pt"
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:  # 8 bytes overwritten in the middle of the model and optimizer tensors: same size, other values
        path = next(state.glob("*.distcp"))
        content = bytearray(path.read_bytes())
        middle = len(content) // 2
        content[middle:middle + 8] = bytes(byte ^ 0xFF for byte in content[middle:middle + 8])
        path.write_bytes(bytes(content))


@pytest.mark.parametrize("how", ["truncated trainer_state.pt", "8 bytes overwritten in a .distcp"])
def test_a_damaged_newest_state_is_named_and_the_one_before_it_resumes(data, saved_run, tmp_path, capsys,
                                                                       reference_losses, how):
    root = copy_of(saved_run, tmp_path)
    newest, previous = resume_states(root / "checkpoints" / RESUME)[-1], resume_states(root / "checkpoints" / RESUME)[0]
    damage(newest, how)
    resumed = train_pretrain.main(run_argv(data, root, "--from_resume", "1", "--max_steps", "3"))
    out = capsys.readouterr().out
    assert f"{newest} is damaged (" in out and f"resumed from {previous} at step 1" in out
    assert resumed["step"] == 3
    # steps 2 and 3 trained again from step 1: the losses of the uninterrupted run
    assert train_losses(root / "out") == pytest.approx(reference_losses, rel=1e-6)


def test_no_intact_resume_state_ends_in_one_sentence(data, saved_run, tmp_path):
    root = copy_of(saved_run, tmp_path)
    newest, previous = resume_states(root / "checkpoints" / RESUME)[::-1]
    damage(newest, "truncated trainer_state.pt")
    damage(previous, "8 bytes overwritten in a .distcp")
    with pytest.raises(SystemExit, match=r"--from_resume 1: no intact resume state in .* \(step_00000002: "
                                         r"trainer_state.pt has .* bytes instead of .*; step_00000001: "
                                         r".*distcp does not match its sha256 checksum\)") as refused:
        train_pretrain.main(run_argv(data, root, "--from_resume", "1", "--max_steps", "3"))
    assert "\n" not in str(refused.value)


# ----------------------------------------------------------------------------------------------------------------
# 8. A stopped run exits 130 / 143, and its weights are not taken for the finished stage


def test_sigterm_saves_exits_143_and_the_next_stage_refuses_the_unfinished_weights(data, tmp_path):
    argv = run_argv(data, tmp_path, "--epochs", "50", "--save_interval", "1000")
    process = subprocess.Popen([sys.executable, "trainer/train_pretrain.py", *argv], cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "out" / "runs" / "pretrain_64" / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and '"loss"' in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # 143, as a shell reports it
    assert "by SIGTERM" in stdout and "continue with --from_resume 1" in stdout
    step = int(state_names(tmp_path)[-1].removeprefix("step_"))
    marker = json.loads((tmp_path / "out" / "pretrain_64" / PARTIAL_FILE).read_text())
    assert marker["step"] == step and marker["total_steps"] > step

    sft = ["--from_weight", "pretrain", "--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ck"),
           "--data_path", str(data["sft"]), "--eval_data_path", "", "--hidden_size", "64", "--device", "cpu"]
    with pytest.raises(SystemExit, match=rf"--from_weight pretrain: .*pretrain_64 holds the weights of an unfinished "
                                         rf"run \(interrupted at step {step} of {marker['total_steps']}\); finish it "
                                         r"with --from_resume 1 .* or delete .*PARTIAL.json to use it as it is"):
        train_full_sft.main(sft)
    # finished (a shorter --max_steps is an allowed change), the weights are the stage's output
    assert train_pretrain.main([*argv, "--from_resume", "1", "--max_steps", str(step + 1)])["step"] == step + 1
    assert not (tmp_path / "out" / "pretrain_64" / PARTIAL_FILE).exists()
    assert resolve_weight_dir("pretrain", str(tmp_path / "out"), 64, False) == tmp_path / "out" / "pretrain_64"


@pytest.mark.parametrize("stop_signal, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_run_main_exits_128_plus_the_signal_of_a_stopped_run(stop_signal, status):
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: {"step": 3, "stopped": True, "signal": stop_signal})
    assert stopped.value.code == status
    run_main(lambda: {"step": 3, "stopped": False, "signal": None})  # a finished run returns: exit status 0


# ----------------------------------------------------------------------------------------------------------------
# 9. Failures found at start-up, torn logs, two runs at once


@pytest.mark.parametrize("flag", ["--save_dir", "--checkpoint_dir"])
def test_an_unwritable_output_directory_is_refused_at_start_up(data, tmp_path, flag):
    (tmp_path / "blocker").write_text("a file where a directory should be")
    argv = [*pretrain_argv(data, tmp_path), flag, str(tmp_path / "blocker" / "sub")]
    with pytest.raises(SystemExit, match=rf"{flag} .*blocker/sub: .*blocker is a file, not a directory"):
        parse_args("pretrain", "test", argv=argv)


def test_a_torn_last_metrics_line_is_dropped_on_resume(data, saved_run, tmp_path, capsys, reference_losses):
    root = copy_of(saved_run, tmp_path)
    metrics = root / "out" / "runs" / "pretrain_64" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    with metrics.open("a") as f:
        f.write('{"step": 3, "epoch": 0, "loss": 7.6')  # a kill in the middle of an append
    resumed = train_pretrain.main(run_argv(data, root, "--from_resume", "1", "--max_steps", "3"))
    assert resumed["step"] == 3
    assert f"{metrics}:{len(lines) + 1}: dropped an incomplete line" in capsys.readouterr().out
    assert all(json.loads(line) for line in metrics.read_text().splitlines())
    assert train_losses(root / "out") == pytest.approx(reference_losses, rel=1e-6)


def test_a_second_run_on_the_same_checkpoints_is_refused_with_the_first_ones_pid(data, tmp_path, monkeypatch):
    argv = run_argv(data, tmp_path, "--max_steps", "2")
    second = {}

    def loss_starting_a_second_run(model, batch):  # during the first run's first step, a second process starts
        if not second:
            second["result"] = subprocess.run([sys.executable, "trainer/train_pretrain.py", *argv], cwd=REPO,
                                              env=ENV, capture_output=True, text=True, timeout=240)
        return causal_lm_loss(model, batch)

    monkeypatch.setattr(train_pretrain, "causal_lm_loss", loss_starting_a_second_run)
    assert train_pretrain.main(argv)["step"] == 2  # the first run is undisturbed
    result = second["result"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"another run (pid {os.getpid()}) is writing {tmp_path / 'checkpoints' / RESUME}" in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# 10. Nonsense runs stop


@pytest.mark.parametrize("flag, value", [
    ("--max_seq_len", "1"), ("--learning_rate", "-1"), ("--learning_rate", "nan"), ("--num_workers", "-1"),
    ("--warmup_steps", "-1"), ("--grad_clip", "-1"), ("--min_lr_ratio", "-0.1"), ("--min_lr_ratio", "1.5"),
    ("--weight_decay", "-0.1"), ("--seed", "-1"),
])
def test_out_of_range_numeric_flags_are_refused_in_one_line(data, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as refused:
        parse_args("pretrain", "test", argv=[*pretrain_argv(data, tmp_path), flag, value])
    assert refused.value.code == 2  # argparse's usage error
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_a_non_finite_loss_with_finite_gradients_stops_the_run(data, tmp_path, monkeypatch):
    calls = {"n": 0}

    def loss_turning_nan(model, batch):  # from the second step on: NaN, but its gradient is the finite one
        calls["n"] += 1
        loss, metrics = causal_lm_loss(model, batch)
        return (loss + loss.detach() * math.nan if calls["n"] > 1 else loss), metrics

    monkeypatch.setattr(train_pretrain, "causal_lm_loss", loss_turning_nan)
    with pytest.raises(SystemExit, match=r"step 2: the loss is nan \(gradient norm .*\), so nothing after step 1 is "
                                         r"saved; the newest state in .* is the one to continue from"):
        train_pretrain.main(run_argv(data, tmp_path, "--max_steps", "4"))
    assert state_names(tmp_path) == ["step_00000001"]
