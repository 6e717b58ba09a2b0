"""--time_budget MINUTES (issue: the quick path): the schedule runs on the fraction of the budget spent, the run
saves and ends when it is spent, and a resumed run continues the same budget.

Tiny models on the first lines of the shipped data (test_trainer.py's settings), budgets of a few seconds.
"""

import json
import os
import signal
import threading

import pytest

from test_trainer import pretrain_argv
from trainer import train_pretrain
from trainer.trainer_utils import cosine_lr, time_budget_lr

MAX_LR, FLOOR_RATIO = 2e-3, 0.1


def records(save_dir) -> list[dict]:
    lines = (save_dir / "runs" / "pretrain_64" / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


def test_time_budget_lr_warms_up_by_steps_then_decays_over_the_budget():
    budget = 600.0
    assert time_budget_lr(0, 0.0, budget, MAX_LR, 10, FLOOR_RATIO) == cosine_lr(0, MAX_LR, 10, 100, FLOOR_RATIO)
    assert time_budget_lr(9, 5.0, budget, MAX_LR, 10, FLOOR_RATIO) == pytest.approx(MAX_LR)
    assert time_budget_lr(50, 300.0, budget, MAX_LR, 10, FLOOR_RATIO) == pytest.approx((1 + FLOOR_RATIO) * MAX_LR / 2)
    assert time_budget_lr(90, 600.0, budget, MAX_LR, 10, FLOOR_RATIO) == pytest.approx(FLOOR_RATIO * MAX_LR)
    assert time_budget_lr(99, 700.0, budget, MAX_LR, 10, FLOOR_RATIO) == pytest.approx(FLOOR_RATIO * MAX_LR)


def budget_argv(data, tmp_path, minutes: float, *extra) -> list[str]:
    return pretrain_argv(data, tmp_path, "--time_budget", str(minutes), "--epochs", "1000", "--eval_data_path", "",
                         "--learning_rate", str(MAX_LR), "--save_interval", "1000000", *extra)


def test_a_budget_run_ends_when_the_time_is_spent_with_the_schedule_at_its_floor(data, tmp_path):
    summary = train_pretrain.main(budget_argv(data, tmp_path, 0.05))  # 3 seconds
    steps = records(tmp_path / "out")
    assert not summary["stopped"] and summary["step"] == steps[-1]["step"] > 5
    assert steps[-1]["elapsed_s"] >= 3.0  # ended by the budget, not by the 1,000 epochs
    assert steps[-1]["lr"] < FLOOR_RATIO * MAX_LR + 0.02 * MAX_LR  # the last step ran at the floor's edge
    assert all(a["lr"] >= b["lr"] for a, b in zip(steps[2:], steps[3:]))  # decaying after the warmup
    seen = [r["tokens_seen"] for r in steps]  # recorded: blocks of 32 tokens, at most 4 a step
    assert seen[0] == 4 * 32 and all(0 < b - a <= 4 * 32 and (b - a) % 32 == 0 for a, b in zip(seen, seen[1:]))
    weights = tmp_path / "out" / "pretrain_64"
    assert (weights / "model.safetensors").is_file() and not (weights / "PARTIAL.json").exists()  # a finished stage


def test_a_resumed_budget_run_continues_the_same_budget(data, tmp_path):
    argv = budget_argv(data, tmp_path, 0.1)  # 6 seconds in all
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))  # stop it about a third of the way in
    timer.start()
    try:
        first = train_pretrain.main(argv)
    finally:
        timer.cancel()
    assert first["stopped"]
    stopped_at = records(tmp_path / "out")[-1]
    assert stopped_at["elapsed_s"] < 6.0

    resumed = train_pretrain.main([*argv, "--from_resume", "1"])
    assert not resumed["stopped"] and resumed["step"] > first["step"]
    after = [r for r in records(tmp_path / "out") if r["step"] > first["step"]]
    assert after[0]["elapsed_s"] > stopped_at["elapsed_s"]  # the clock went on from where it stopped
    assert after[-1]["elapsed_s"] >= 6.0 and after[-1]["lr"] < FLOOR_RATIO * MAX_LR + 0.02 * MAX_LR
