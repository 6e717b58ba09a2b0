r"""Draw training curves of one or more runs from their metrics.jsonl into one PNG, to compare runs and ablations.

    python eval/plot_metrics.py out/runs/pretrain_256
    python eval/plot_metrics.py out/runs/pretrain_256 out/runs/full_sft_256 --labels pretrain sft \
        --metrics loss,eval_loss,lr,tokens_per_s --x tokens_seen --smooth 0.9 --output curves.png

Each run is a run directory (`<save_dir>/runs/<run>/`, as the training loop writes it) or a metrics.jsonl file.
The figure has one panel per metric and one line per run. The training loop writes two kinds of lines
(trainer/monitor.py): log lines {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen",
"elapsed_s", ...} every --log_interval steps, and eval lines {"step", "eval_loss", "eval_ppl", "eval_<metric>", ...}
every --eval_interval steps; eval metrics are drawn with markers. A metric a run does not log is left out of that
run's panel (and a panel no run has is dropped), with a note on stderr. Runs without a display work: matplotlib
draws with its Agg backend.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # draw to files only; no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

DEFAULT_METRICS = "loss,eval_loss,lr,tokens_per_s"
X_AXES = {"step": "optimizer step", "tokens_seen": "tokens seen (training tokens)", "elapsed_s": "wall time (s)"}
# y-axis labels with units for the metrics the training loop writes; any other metric is labelled by its name
Y_LABELS = {
    "loss": "training loss (nats)",
    "eval_loss": "eval loss (nats)",
    "lm_loss": "training LM loss (nats/token)",
    "eval_lm_loss": "eval LM loss (nats/token)",
    "eval_ppl": "eval perplexity (exp of the LM loss)",
    "lr": "learning rate",
    "grad_norm": "gradient L2 norm (before clipping)",
    "tokens_per_s": "throughput (tokens/s)",
    "tokens_seen": "tokens seen",
    "elapsed_s": "wall time (s)",
}
EVAL_PREFIX = "eval_"  # metrics of eval lines start with it (trainer/monitor.py evaluate)
RAW_ALPHA = 0.3  # opacity of the unsmoothed training loss under its --smooth curve


def metrics_file(run: str | Path) -> Path:
    """The metrics.jsonl of `run`: the file itself, or `<run>/metrics.jsonl` for a run directory.

    Raises:
        SystemExit: when there is no such file.
    """
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no metrics.jsonl there; pass a run directory (<save_dir>/runs/<run>) "
                         "or a metrics.jsonl file")
    return path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, one dict per non-empty line, in file order.

    Raises:
        SystemExit: naming `file:line` when a line is not a JSON object with a "step".
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"error: {path}:{line_number}: not valid JSON ({error.msg}); "
                                 "fix or delete that line") from None
            if not isinstance(record, dict) or "step" not in record:
                raise SystemExit(f'error: {path}:{line_number}: expected a JSON object with a "step", '
                                 f"got {line.strip()[:80]}")
            records.append(record)
    return records


def metric_series(records: list[dict], metric: str, x: str = "step") -> tuple[list[float], list[float]]:
    """The points (xs, ys) of `metric` against `x` over the records that hold the metric, in file order.

    Eval lines carry only "step", so for x = tokens_seen or elapsed_s their x is read off the log lines: linearly
    interpolated in step between the log lines around it (the value at the nearest log line outside their range).
    Returns ([], []) when no record holds the metric, or x cannot be known (no log line carries it).
    """
    points = [(record["step"], record.get(x), float(record[metric])) for record in records if metric in record]
    if x == "step":
        return [float(step) for step, _, _ in points], [y for _, _, y in points]
    known = sorted((record["step"], float(record[x])) for record in records if x in record)
    if not known:
        return [], []
    xs = [float(value) if value is not None else interpolate(known, step) for step, value, _ in points]
    return xs, [y for _, _, y in points]


def interpolate(known: list[tuple[int, float]], step: int) -> float:
    """The value at `step` on the piecewise-linear curve through the sorted (step, value) points `known`."""
    if step <= known[0][0]:
        return known[0][1]
    for (step0, value0), (step1, value1) in zip(known, known[1:]):
        if step <= step1:
            return value0 + (value1 - value0) * (step - step0) / (step1 - step0)
    return known[-1][1]


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average s_t = weight * s_(t-1) + (1 - weight) * v_t, with s_0 = v_0 (0 <= weight < 1).

    The smoothing of TensorBoard's scalar plots, without its debiasing (s_0 = v_0 already starts on the data).
    """
    smoothed = []
    for value in values:
        smoothed.append(value if not smoothed else weight * smoothed[-1] + (1 - weight) * value)
    return smoothed


def plot_runs(runs: list[tuple[str, list[dict]]], metrics: list[str], output: str | Path, x: str = "step",
              smooth: float = 0.0, size: tuple[int, int] = (1200, 800), dpi: int = 100) -> list[str]:
    """Draw `metrics` of the (label, records) `runs` to the PNG `output`, one panel per metric, one line per run.

    Args:
        x: the horizontal axis, a key of X_AXES.
        smooth: EMA weight for the training loss (0 = raw); the raw curve stays underneath, faint.
        size: (width, height) of the image in pixels.
    Returns:
        notes on what was left out (a run without a metric, a metric no run has), for the user.
    """
    notes, panels = [], []
    for metric in metrics:
        series = {label: metric_series(records, metric, x) for label, records in runs}
        for label, (xs, _) in series.items():
            if not xs:
                notes.append(f"run {label} has no {metric} (against {x}): left out of that panel")
        if any(xs for xs, _ in series.values()):
            panels.append((metric, series))
        else:
            notes.append(f"no run has {metric}: panel skipped")
    if not panels:
        raise SystemExit(f"error: none of the runs has any of the metrics {', '.join(metrics)}; nothing to draw")

    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False)
    for ax, (metric, series) in zip(axes.flat, panels):
        for index, (label, (xs, ys)) in enumerate(series.items()):
            if not xs:
                continue
            color = f"C{index}"  # the same run keeps its color in every panel
            if metric.startswith(EVAL_PREFIX):
                ax.plot(xs, ys, color=color, marker="o", markersize=4, label=label)
            elif metric == "loss" and smooth > 0:
                ax.plot(xs, ys, color=color, alpha=RAW_ALPHA)
                ax.plot(xs, ema(ys, smooth), color=color, label=f"{label} (EMA {smooth:g})")
            else:
                ax.plot(xs, ys, color=color, label=label)
        ax.set_title(metric)
        ax.set_xlabel(X_AXES[x])
        ax.set_ylabel(Y_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    figure.tight_layout()
    figure.savefig(output, dpi=dpi)
    plt.close(figure)
    return notes


def image_size(text: str) -> tuple[int, int]:
    """Parse WIDTHxHEIGHT (pixels) for --size."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 1200x800, got {text!r}") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"width and height must be positive, got {text!r}")
    return width, height


def smoothing_weight(text: str) -> float:
    """Parse an EMA weight in [0, 1) for --smooth."""
    weight = float(text)
    if not 0 <= weight < 1:
        raise argparse.ArgumentTypeError(f"expected a weight in [0, 1), got {text}")
    return weight


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (<save_dir>/runs/<run>) or metrics.jsonl files")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one legend label per run, in order (default: each run directory's name)")
    parser.add_argument("--metrics", default=DEFAULT_METRICS,
                        help="comma-separated metric keys, one panel each, e.g. grad_norm or eval_ppl "
                             "(default: %(default)s)")
    parser.add_argument("--x", choices=list(X_AXES), default="step",
                        help="horizontal axis: optimizer step, training tokens seen, or wall time in seconds "
                             "(default: %(default)s)")
    parser.add_argument("--smooth", type=smoothing_weight, default=0.0,
                        help="EMA weight in [0, 1) for the training loss, e.g. 0.9; 0 draws it raw "
                             "(default: %(default)s)")
    parser.add_argument("--size", type=image_size, default=(1200, 800),
                        help="image size WIDTHxHEIGHT in pixels (default: 1200x800)")
    parser.add_argument("--dpi", type=int, default=100, help="dots per inch; sets text size against --size "
                        "(default: %(default)s)")
    parser.add_argument("--output", default="curves.png", help="PNG file to write (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise SystemExit(f"error: --labels has {len(args.labels)} labels for {len(args.runs)} runs; give one per run")
    files = [metrics_file(run) for run in args.runs]
    labels = args.labels or [file.parent.name for file in files]
    runs = [(label, read_metrics(file)) for label, file in zip(labels, files)]
    metrics = [metric.strip() for metric in args.metrics.split(",") if metric.strip()]
    notes = plot_runs(runs, metrics, args.output, x=args.x, smooth=args.smooth, size=args.size, dpi=args.dpi)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
