"""eval/plot_metrics.py: the curves it draws are the values of metrics.jsonl, in a PNG of the requested size."""

import json
import re

import matplotlib.image
import pytest

from eval.plot_metrics import ema, main, metric_series, read_metrics

# what trainer/monitor.py's MetricsLog writes: log lines every 10 steps, eval lines (only "step" + eval_*) between
LOG_LINES = [
    {"step": 10, "epoch": 0, "loss": 7.5, "lr": 1e-3, "grad_norm": 1.5, "tokens_per_s": 2000.0,
     "tokens_seen": 4096, "elapsed_s": 2.0},
    {"step": 20, "epoch": 0, "loss": 6.25, "lr": 2e-3, "grad_norm": 0.8, "tokens_per_s": 2500.0,
     "tokens_seen": 8192, "elapsed_s": 4.0},
    {"step": 30, "epoch": 1, "loss": 5.0, "lr": 1e-3, "grad_norm": 0.6, "tokens_per_s": 3000.0,
     "tokens_seen": 12288, "elapsed_s": 7.0},
]
EVAL_LINES = [{"step": 15, "eval_loss": 6.5, "eval_ppl": 665.1}, {"step": 30, "eval_loss": 5.25, "eval_ppl": 190.6}]


def write_metrics(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def run_dir(tmp_path):
    records = [LOG_LINES[0], EVAL_LINES[0], LOG_LINES[1], LOG_LINES[2], EVAL_LINES[1]]  # the loop's order
    write_metrics(tmp_path / "runs" / "pretrain_64" / "metrics.jsonl", records)
    return tmp_path / "runs" / "pretrain_64"


def test_series_are_the_file_values(run_dir):
    records = read_metrics(run_dir / "metrics.jsonl")
    assert metric_series(records, "loss") == ([10.0, 20.0, 30.0], [7.5, 6.25, 5.0])
    assert metric_series(records, "lr", x="elapsed_s") == ([2.0, 4.0, 7.0], [1e-3, 2e-3, 1e-3])
    assert metric_series(records, "eval_loss") == ([15.0, 30.0], [6.5, 5.25])


def test_eval_points_take_tokens_seen_from_the_log_lines_around_them(run_dir):
    records = read_metrics(run_dir / "metrics.jsonl")
    # step 15 is halfway between the log lines of steps 10 (4096 tokens) and 20 (8192); step 30 has its own
    assert metric_series(records, "eval_loss", x="tokens_seen") == ([6144.0, 12288.0], [6.5, 5.25])


def test_ema_matches_hand_computed_values():
    # s0 = 4; s1 = 0.5 * 4 + 0.5 * 2 = 3; s2 = 0.5 * 3 + 0.5 * 0 = 1.5
    assert ema([4.0, 2.0, 0.0], 0.5) == [4.0, 3.0, 1.5]


def test_writes_png_of_requested_size_for_two_runs(run_dir, tmp_path):
    other = write_metrics(tmp_path / "other.jsonl", [{**line, "loss": line["loss"] + 1} for line in LOG_LINES])
    output = tmp_path / "curves.png"
    main([str(run_dir), str(other), "--labels", "a", "b", "--x", "tokens_seen", "--smooth", "0.5",
          "--size", "640x480", "--output", str(output)])
    assert output.stat().st_size > 0
    assert matplotlib.image.imread(output).shape[:2] == (480, 640)  # (height, width) in pixels


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(LOG_LINES[0]) + "\n" + json.dumps(LOG_LINES[1]) + "\n" + '{"step": 30, "loss": \n')
    with pytest.raises(SystemExit, match=re.escape(f"{path}:3: not valid JSON")):
        read_metrics(path)
    path.write_text(json.dumps(LOG_LINES[0]) + "\n" + "[1, 2]\n")
    with pytest.raises(SystemExit, match=re.escape(f'{path}:2: expected a JSON object with a "step"')):
        read_metrics(path)


def test_missing_metrics_are_skipped_with_a_note(run_dir, tmp_path, capsys):
    no_eval = write_metrics(tmp_path / "no_eval" / "metrics.jsonl", LOG_LINES)
    output = tmp_path / "curves.png"
    main([str(run_dir), str(no_eval.parent), "--metrics", "loss,eval_loss,rewards_margin", "--output", str(output)])
    err = capsys.readouterr().err
    assert "note: run no_eval has no eval_loss" in err
    assert "note: no run has rewards_margin: panel skipped" in err
    assert output.stat().st_size > 0


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl there"):
        main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "curves.png")])
