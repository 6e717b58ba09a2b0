"""Runs users can trust (issue: scale and reliability): DDP and FSDP under torchrun give the losses of one process,
checkpoints survive SIGKILL at any moment, resume is bit-exact, and a diverged run stops after saving its last
good state.

Tiny models (hidden 64, 2 layers) on the first lines of the shipped data, as in test_trainer.py; torchrun runs use
the gloo backend on CPU.
"""

import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from test_trainer import ENV, REPO, pretrain_argv, train_losses
from trainer import train_pretrain
from trainer.checkpoint import load_resume_state, resume_states, write_dir_atomically
from trainer.trainer_utils import build_optimizer, causal_lm_loss, load_model, parse_args

PRETRAIN = [sys.executable, "trainer/train_pretrain.py"]


def torchrun(nproc: int, argv: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(nproc), "trainer/train_pretrain.py", *argv],
                            capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "runs" / "pretrain_64" / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(directory / "model.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# DDP and FSDP


def has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


DEEPSPEED = pytest.param("deepspeed", marks=pytest.mark.skipif(
    not has_deepspeed(), reason='DeepSpeed is not installed (pip install --no-build-isolation -e ".[deepspeed]")'))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", DEEPSPEED])
def test_two_processes_match_one_process_with_twice_the_accumulation(data, tmp_path, parallel):
    # 2 ranks x 2 accumulated micro-batches of 1 block read the same 4 blocks per step as 1 process x 4 blocks
    # accumulated 2 x 2: rank r reads batches r, r + 2, ... and the single process reads them in that order
    common = ["--max_steps", "3", "--batch_size", "1", "--eval_data_path", ""]
    result = torchrun(2, pretrain_argv(data, tmp_path / "multi", *common, "--accumulation_steps", "2",
                                       "--parallel", parallel))
    assert f"x 2 process(es), {parallel}" in result.stderr + result.stdout  # the effective batch is printed
    single = train_pretrain.main(pretrain_argv(data, tmp_path / "single", *common, "--accumulation_steps", "4"))
    assert single["step"] == 3

    multi_losses = train_losses(tmp_path / "multi" / "out")
    assert list(multi_losses) == [1, 2, 3] and all(math.isfinite(loss) for loss in multi_losses.values())
    assert multi_losses == pytest.approx(train_losses(tmp_path / "single" / "out"), rel=1e-5)
    # the weights dir holds whole tensors (gathered from the shards under FSDP), close to the single run's
    got, expected = weights(tmp_path / "multi" / "out" / "pretrain_64"), weights(tmp_path / "single" / "out" /
                                                                                   "pretrain_64")
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[key], expected[key], atol=1e-5) for key in expected)
    state = torch.load(resume_states(tmp_path / "multi" / "checkpoints" / "pretrain_64_resume")[-1] /
                       "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def test_fsdp_state_resumes_in_one_process(data, tmp_path):
    # DCP reshards on load: 2 FSDP ranks save at step 2, one plain process continues to step 4
    argv = pretrain_argv(data, tmp_path / "run", "--batch_size", "1", "--accumulation_steps", "2",
                         "--eval_data_path", "", "--max_steps", "4")
    torchrun(2, [*argv, "--parallel", "fsdp", "--max_steps", "2"])
    assert [path.name for path in resume_states(tmp_path / "run" / "checkpoints" / "pretrain_64_resume")] == [
        "step_00000002"]
    resumed = train_pretrain.main([*argv, "--accumulation_steps", "4", "--from_resume", "1"])
    assert resumed["step"] == 4
    uninterrupted = train_pretrain.main(pretrain_argv(data, tmp_path / "ref", "--batch_size", "1",
                                                      "--accumulation_steps", "4", "--eval_data_path", "",
                                                      "--max_steps", "4"))
    assert uninterrupted["step"] == 4
    assert train_losses(tmp_path / "run" / "out") == pytest.approx(train_losses(tmp_path / "ref" / "out"), rel=1e-5)


@pytest.mark.skipif(not has_deepspeed(), reason="DeepSpeed is not installed")
def test_deepspeed_zero3_run_resumes_and_matches_one_process(data, tmp_path):
    # the shipped ZeRO-3 config, with every weight partitioned (the tiny model's would all be under the threshold)
    config = json.loads((REPO / "trainer" / "ds_config" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    argv = pretrain_argv(data, tmp_path / "run", "--batch_size", "1", "--accumulation_steps", "2",
                         "--eval_interval", "2", "--max_steps", "4", "--parallel", "deepspeed",
                         "--deepspeed_config", str(tmp_path / "zero3.json"))
    torchrun(2, [*argv, "--max_steps", "2"])  # the schedule of 2 steps differs only after the warmup: not reached
    torchrun(2, [*argv, "--from_resume", "1"])
    reference = train_pretrain.main(pretrain_argv(data, tmp_path / "ref", "--batch_size", "1",
                                                  "--accumulation_steps", "4", "--eval_data_path", "",
                                                  "--max_steps", "4"))
    assert reference["step"] == 4
    assert train_losses(tmp_path / "run" / "out") == pytest.approx(train_losses(tmp_path / "ref" / "out"), rel=1e-5)
    got, expected = weights(tmp_path / "run" / "out" / "pretrain_64"), weights(tmp_path / "ref" / "out" /
                                                                               "pretrain_64")
    assert all(torch.allclose(got[key], expected[key], atol=1e-5) for key in expected)  # gathered from ZeRO-3
    evals = [record for record in metrics(tmp_path / "run" / "out") if "eval_loss" in record]
    assert [record["step"] for record in evals] == [2, 4] and all(math.isfinite(r["eval_loss"]) for r in evals)


@pytest.mark.skipif(not has_deepspeed(), reason="DeepSpeed is not installed")
def test_a_ddp_state_is_refused_under_deepspeed_with_a_clear_message(data, tmp_path):
    argv = pretrain_argv(data, tmp_path, "--eval_data_path", "", "--max_steps", "4")
    train_pretrain.main([*argv, "--max_steps", "2"])
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                             "trainer/train_pretrain.py", *argv, "--from_resume", "1", "--parallel", "deepspeed"],
                            capture_output=True, text=True, env=ENV, cwd=REPO, timeout=240)
    assert result.returncode != 0
    assert "step_00000002 was saved under --parallel ddp or fsdp, which this run does not use" in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_only_the_last_resume_states_are_kept(data, tmp_path):
    train_pretrain.main(pretrain_argv(data, tmp_path, "--max_steps", "5", "--save_interval", "1", "--keep_last", "2",
                                      "--eval_data_path", ""))
    states = resume_states(tmp_path / "checkpoints" / "pretrain_64_resume")
    assert [path.name for path in states] == ["step_00000004", "step_00000005"]
    assert not list((tmp_path / "checkpoints" / "pretrain_64_resume").glob("*.tmp*"))


def test_a_save_killed_between_its_two_renames_is_repaired_by_the_next(tmp_path):
    write_dir_atomically(tmp_path / "ckpt", lambda tmp: (tmp / "weights").write_text("old"))
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old-123")  # killed after the first rename: only the old copy
    (tmp_path / "ckpt.tmp-123").mkdir()  # and a half-written new one

    def broken_write(tmp):
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_dir_atomically(tmp_path / "ckpt", broken_write)
    assert [path.name for path in tmp_path.iterdir()] == ["ckpt"]
    assert (tmp_path / "ckpt" / "weights").read_text() == "old"


def assert_loadable(tmp_path: Path) -> int:
    """The newest resume state loads into a fresh model and optimizer; returns its step (0: none yet)."""
    states = resume_states(tmp_path / "checkpoints" / "pretrain_64_resume")
    if not states:
        return 0
    args = parse_args("pretrain", "test", argv=pretrain_argv({"pretrain": "", "pretrain_test": ""}, tmp_path))
    model = load_model(args)[0]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = load_resume_state(states[-1], model, build_optimizer(model, args), scaler)
    if (tmp_path / "out" / "pretrain_64").exists():
        weights(tmp_path / "out" / "pretrain_64")  # the weights dir is complete too
    return state["step"]


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(data, tmp_path):
    argv = ["--epochs", "2", "--max_steps", "40", "--save_interval", "1", "--eval_data_path", "", "--batch_size", "2"]
    # Bit for bit only between runs with the same thread settings: on AVX-512/AMX CPUs the matrix kernels' summation
    # order depends on the thread count. So the reference is a subprocess with ENV too, like the killed runs.
    reference = subprocess.run([*PRETRAIN, *pretrain_argv(data, tmp_path / "ref", *argv)], cwd=REPO, env=ENV,
                               capture_output=True, text=True, timeout=240)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = tmp_path / "run"
    command = [*PRETRAIN, *pretrain_argv(data, run, *argv, "--from_resume", "1")]
    rng, saved_steps = random.Random(0), []
    for trial in range(3):  # each trial: start (resuming), wait for progress, SIGKILL at a random moment
        process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start_step, deadline = assert_loadable(run), time.time() + 120
        while newest_saved_step(run) <= start_step and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))  # saves run every step, so many kills land inside one
        process.send_signal(signal.SIGKILL)
        process.wait()
        saved_steps.append(assert_loadable(run))
    assert 0 < saved_steps[-1] < 40, saved_steps  # the kills interrupted the run before its end
    finished = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]

    got, expected = weights(run / "out" / "pretrain_64"), weights(tmp_path / "ref" / "out" / "pretrain_64")
    assert all(torch.equal(got[key], expected[key]) for key in expected)  # bit-exact
    assert train_losses(run / "out") == train_losses(tmp_path / "ref" / "out")


def newest_saved_step(run: Path) -> int:
    """The newest complete resume state's step, by name only (cheap enough to poll)."""
    states = resume_states(run / "checkpoints" / "pretrain_64_resume")
    return int(states[-1].name.removeprefix("step_")) if states else 0


# ----------------------------------------------------------------------------------------------------------------
# Numerical guards


def test_nan_loss_stops_after_saving_the_last_good_state(data, tmp_path, monkeypatch):
    calls = {"n": 0}

    def loss_turning_nan(model, batch):  # finite for 2 optimizer steps, then NaN
        calls["n"] += 1
        loss, metrics = causal_lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] > 2 else loss), metrics

    monkeypatch.setattr(train_pretrain, "causal_lm_loss", loss_turning_nan)
    argv = pretrain_argv(data, tmp_path / "nan", "--max_steps", "5", "--eval_data_path", "")
    with pytest.raises(SystemExit, match=r"step 3: the loss is nan .* last good state \(step 2\) is saved .*"
                                         r"--learning_rate"):
        train_pretrain.main(argv)
    monkeypatch.undo()
    # the same first two updates (both in the warmup, whose learning rates do not depend on --max_steps)
    train_pretrain.main(pretrain_argv(data, tmp_path / "ref", "--max_steps", "2", "--eval_data_path", ""))
    assert assert_loadable(tmp_path / "nan") == 2
    got, expected = weights(tmp_path / "nan" / "out" / "pretrain_64"), weights(tmp_path / "ref" / "out" /
                                                                               "pretrain_64")
    assert all(torch.equal(got[key], expected[key]) for key in expected)  # the NaN update was never applied
