"""--time_budget MINUTES (issue: the quick path): the schedule runs on the fraction of the budget spent, the run
saves and ends when it is spent, and a resumed run continues the same budget.

Tiny models on the first lines of the shipped data (test_trainer.py's settings), budgets of a few seconds.
"""

import json
from time import perf_counter

import pytest

from test_trainer import pretrain_argv
from trainer import train_pretrain, trainer_utils
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


class FakeClock:
    """Stands in for the `time` module inside trainer_utils: every time.time() call moves it on by `tick` seconds,
    so a budget is spent after a fixed number of calls, however fast or loaded the host (perf_counter is real)."""

    def __init__(self, tick: float):
        self.now, self.tick = 1_000_000.0, tick

    def time(self) -> float:
        self.now += self.tick
        return self.now

    perf_counter = staticmethod(perf_counter)


def budget_argv(data, tmp_path, minutes: float, *extra) -> list[str]:
    return pretrain_argv(data, tmp_path, "--time_budget", str(minutes), "--epochs", "1000", "--eval_data_path", "",
                         "--learning_rate", str(MAX_LR), "--save_interval", "1000000", *extra)


def test_a_budget_run_ends_when_the_time_is_spent_with_the_schedule_at_its_floor(data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_utils, "time", FakeClock(0.1))
    summary = train_pretrain.main(budget_argv(data, tmp_path, 0.5))  # 30 fake seconds: about 50 steps
    steps = records(tmp_path / "out")
    assert not summary["stopped"] and summary["step"] == steps[-1]["step"] > 20
    assert steps[-1]["elapsed_s"] >= 29.8  # ended by the budget, not by the 1,000 epochs
    assert steps[-1]["lr"] < FLOOR_RATIO * MAX_LR + 0.01 * MAX_LR  # the last step ran at the floor's edge
    assert all(a["lr"] >= b["lr"] for a, b in zip(steps[2:], steps[3:]))  # decaying after the warmup
    seen = [r["tokens_seen"] for r in steps]  # recorded: blocks of 32 tokens, at most 4 a step
    assert seen[0] == 4 * 32 and all(0 < b - a <= 4 * 32 and (b - a) % 32 == 0 for a, b in zip(seen, seen[1:]))
    weights = tmp_path / "out" / "pretrain_64"
    assert (weights / "model.safetensors").is_file() and not (weights / "PARTIAL.json").exists()  # a finished stage


def test_a_resumed_budget_run_continues_the_same_budget(data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_utils, "time", FakeClock(0.1))
    argv = budget_argv(data, tmp_path, 0.5)
    first = train_pretrain.main([*argv, "--max_steps", "10"])  # ends early, at --max_steps
    stopped_at = records(tmp_path / "out")[-1]
    assert first["step"] == 10 and stopped_at["elapsed_s"] < 30.0

    resumed = train_pretrain.main([*argv, "--from_resume", "1"])  # the rest of the same 30 s
    assert resumed["step"] > first["step"]
    after = [r for r in records(tmp_path / "out") if r["step"] > first["step"]]
    assert after[0]["elapsed_s"] > stopped_at["elapsed_s"]  # the clock went on from where it stopped
    assert after[-1]["elapsed_s"] >= 29.8 and after[-1]["lr"] < FLOOR_RATIO * MAX_LR + 0.01 * MAX_LR


def test_a_budget_without_epochs_repeats_the_data_until_it_is_spent(data, tmp_path):
    from trainer.flags import BUDGET_EPOCHS, parse_args
    argv = ["--data_path", str(data["pretrain"]), "--save_dir", str(tmp_path)]
    assert parse_args("pretrain", "", argv=argv + ["--time_budget", "1"]).epochs == BUDGET_EPOCHS
    assert parse_args("pretrain", "", argv=argv + ["--time_budget", "1", "--epochs", "3"]).epochs == 3
    assert parse_args("pretrain", "", argv=argv, defaults={"epochs": 2}).epochs == 2  # no budget: the stage's
