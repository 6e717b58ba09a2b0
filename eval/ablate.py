r"""An ablation: one flag of a stage script at several values, several seeds each, equal time or equal steps.

    python eval/ablate.py --script trainer/train_pretrain.py --flag doc_mask --values 0 1 --seeds 1 2 3 \
        --time_budget 2
    python eval/ablate.py --script trainer/train_pretrain.py --flag learning_rate --values 1e-3 2e-3 4e-3 \
        --seeds 1 2 --max_steps 200 -- --eval_interval 50

Each (value, seed) runs the real stage script in a subprocess, `--<flag> <value> --seed <seed>` plus the flags
after `--`, with its own --save_dir and --checkpoint_dir under --output_dir (<flag>_<value>_seed<seed>/out,
.../checkpoints; the script's output in .../train.log), for the same --time_budget (minutes of wall time, the
shared flag: the learning-rate schedule runs on the fraction spent, eval and saving included) or the same
--max_steps. Then each run's metrics.jsonl (trainer/monitor.py) gives its final eval loss (the last eval, at the
last step), its steps and its tokens seen, and the script prints one row per value: the seeds, the mean final
eval loss, its spread (sample standard deviation over the seeds, and min..max), the mean tokens seen and steps.
It writes ablation.json (every run and the table) and ablation.png (the eval loss against the wall time with
--time_budget, else against the step: one colour per value, a thin line per seed) into --output_dir.

The runs go one at a time, never in parallel, so that each has the machine to itself, in the order seed by seed
(every value with seed 1, then every value with seed 2, ...) so that a slow spell of the machine does not fall
on one value only. Wall-time budgets are still only as fair as the machine is quiet: on a machine shared with
other jobs a run gets fewer steps when something else runs beside it, so timings from a shared machine are not
comparable; the table's tokens seen and steps show what each run really got.

The ablations of the course, and their commands (the stage scripts' own flags; `--metric auto` compares the
next-token cross-entropy: eval_lm_loss where a run logs it, as a MoE run does beside its eval_loss, which adds
the router's balance loss, else eval_loss):

    doc_mask     python eval/ablate.py --script trainer/train_pretrain.py --flag doc_mask --values 0 1 \
                     --seeds 1 2 3 --time_budget 2
    MoE / dense  python eval/ablate.py --script trainer/train_pretrain.py --flag use_moe --values 0 1 \
                     --seeds 1 2 3 --time_budget 2
    lr           python eval/ablate.py --script trainer/train_pretrain.py --flag learning_rate \
                     --values 5e-4 1e-3 2e-3 4e-3 --seeds 1 2 3 --time_budget 2
    LoRA rank    python eval/ablate.py --script trainer/train_lora.py --flag lora_rank --values 4 8 16 \
                     --seeds 1 2 3 --max_steps 100 -- --from_weight out/full_sft_256
    DPO beta     python eval/ablate.py --script trainer/train_dpo.py --flag beta --values 0.05 0.1 0.3 \
                     --seeds 1 2 3 --max_steps 100 --metric eval_reward_accuracy -- --from_weight out/full_sft_256

A run's --save_dir is its own, so a stage to start from is given as a directory (--from_weight out/full_sft_256),
not a stage name. DPO's loss is -log sigmoid(beta * margin): its value depends on beta itself, so the beta
ablation compares the held-out reward accuracy (eval_reward_accuracy, higher is better) instead.

Packing vs padding has no flag yet, and this script does not fake one: pretraining always packs documents into
full blocks (dataset/lm_dataset.py PretrainDataset; --doc_mask only changes what a token attends to inside a
block), and SFT always pads its length-grouped batches (SFTDataset). The ablation needs a stage flag that
switches the data layout, e.g. `--packing 0|1` on trainer/train_full_sft.py (pack SFT samples into full rows,
with position_ids restarting at each sample as --doc_mask does), or a one-document-per-row padded mode for
PretrainDataset; then `--flag packing --values 0 1 --time_budget 2` compares them at equal time, where packing
should show more tokens seen.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dataset.cli import positive_float, positive_int
from eval.plot_metrics import X_AXES, Y_LABELS, metric_series, plt, read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
# flags this script sets on every run; given after `--` they would undo the comparison
CONTROLLED_FLAGS = ("seed", "save_dir", "checkpoint_dir", "time_budget", "max_steps")
AUTO_METRIC = "auto"  # eval_lm_loss where a run logs it (MoE), else eval_loss: the next-token cross-entropy
LOG_TAIL_LINES = 15  # lines of a failed run's log shown
SHARED_MACHINE_WARNING = ("warning: the runs go one after another on this machine; on a machine shared with other "
                          "jobs their timings are not comparable (a run gets fewer steps while something else "
                          "runs), so read the tokens seen and steps beside the losses")


# ----------------------------------------------------------------------------------------------------------------
# The command line and its checks


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's flags, and the flags after `--` that go to every run of the stage script unchanged."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --script SCRIPT --flag FLAG --values V [V ...] [--seeds S [S ...]] "
              "(--time_budget MINUTES | --max_steps N) [options] [-- flags for every run of SCRIPT]")
    parser.add_argument("--script", required=True,
                        help="the stage script to run, e.g. trainer/train_pretrain.py (relative to the current "
                             "directory or to the repository)")
    parser.add_argument("--flag", required=True, help="the stage script's flag to vary, without --, e.g. doc_mask")
    parser.add_argument("--values", nargs="+", required=True, help="the values of --flag to compare, e.g. 0 1")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                        help="the --seed of the runs of each value (initialization and data order) "
                             "(default: 1 2 3)")
    parser.add_argument("--time_budget", type=positive_float, default=None,
                        help="minutes of wall time per run (the stage's --time_budget): equal time")
    parser.add_argument("--max_steps", type=positive_int, default=None,
                        help="optimizer steps per run (the stage's --max_steps): equal steps")
    parser.add_argument("--metric", default=AUTO_METRIC,
                        help="the eval metric of metrics.jsonl to compare, e.g. eval_loss, eval_ppl, "
                             "eval_reward_accuracy; auto: eval_lm_loss where a run logs it, else eval_loss "
                             "(default: %(default)s)")
    parser.add_argument("--x", choices=list(X_AXES), default=None,
                        help="the plot's horizontal axis (default: elapsed_s with --time_budget, else step)")
    parser.add_argument("--output_dir", default=None,
                        help="where the runs, ablation.json and ablation.png go (default: "
                             "out/ablations/<script name>_<flag>)")
    args = parser.parse_args(own)
    if args.time_budget is None and args.max_steps is None:
        parser.error("give --time_budget MINUTES (equal time per run) or --max_steps N (equal steps), so that the "
                     "runs are comparable")
    if len(set(args.values)) < len(args.values) or len(set(args.seeds)) < len(args.seeds):
        parser.error("--values and --seeds must not repeat a value")
    script = Path(args.script)
    args.script = (script if script.is_file() else REPO_ROOT / script).resolve()
    if not args.script.is_file():
        parser.error(f"--script {script}: no such file (here or under {REPO_ROOT})")
    args.flag = args.flag.removeprefix("--")
    if args.flag in CONTROLLED_FLAGS:
        parser.error(f"--flag {args.flag}: eval/ablate.py sets --{args.flag} itself (--seeds, --time_budget, "
                     "--max_steps, a directory per run); vary another flag")
    args.x = args.x or ("elapsed_s" if args.time_budget else "step")
    args.output_dir = Path(args.output_dir or REPO_ROOT / "out" / "ablations" / f"{args.script.stem}_{args.flag}"
                           ).absolute()
    return args, extra


def given(flags: list[str], name: str) -> str | None:
    """The value `--name` has in `flags` (as `--name value` or `--name=value`), None when it is not there."""
    for index, flag in enumerate(flags):
        if flag == f"--{name}":
            return flags[index + 1] if index + 1 < len(flags) else ""
        if flag.startswith(f"--{name}="):
            return flag.split("=", 1)[1]
    return None


def check_extra_flags(flag: str, extra: list[str]) -> None:
    """Refuse flags after `--` that this script sets itself, and a --from_weight stage name.

    Raises:
        SystemExit: one sentence naming the flag and what to do.
    """
    for name in (*CONTROLLED_FLAGS, flag):
        if given(extra, name) is not None:
            raise SystemExit(f"error: --{name} after `--`: eval/ablate.py sets it on every run"
                             f"{' (from --flag, --values)' if name == flag else ''}; drop it there")
    weight = given(extra, "from_weight")
    if weight not in (None, "none") and not Path(weight).is_dir():
        raise SystemExit(f"error: --from_weight {weight} after `--`: each run has its own --save_dir, where no "
                         "stage name resolves; pass the checkpoint directory, e.g. --from_weight out/full_sft_256")


# ----------------------------------------------------------------------------------------------------------------
# Running and reading the runs


def run_directory(output_dir: Path, flag: str, value: str, seed: int) -> Path:
    """<output_dir>/<flag>_<value>_seed<seed> (characters other than letters, digits, . - + replaced by _)."""
    return output_dir / re.sub(r"[^\w.+-]", "_", f"{flag}_{value}_seed{seed}")


def run_command(args: argparse.Namespace, extra: list[str], value: str, seed: int, run_dir: Path) -> list[str]:
    """The stage script's command line for one (value, seed): the extra flags, the varied flag, the seed, this
    run's directories, and the budget."""
    budget = ([f"--time_budget={args.time_budget:g}"] if args.time_budget else []) + (
        [f"--max_steps={args.max_steps}"] if args.max_steps else [])
    return [sys.executable, str(args.script), *extra, f"--{args.flag}={value}", f"--seed={seed}",
            f"--save_dir={run_dir / 'out'}", f"--checkpoint_dir={run_dir / 'checkpoints'}", *budget]


def run_once(command: list[str], run_dir: Path, flag: str) -> float:
    """Run one command, its output into <run_dir>/train.log; return its wall time in seconds.

    Raises:
        SystemExit: when it fails, naming the run and its log, with the log's last lines; when the stage script
            has no --<flag>, saying so (and for packing vs padding, that no such flag exists yet).
    """
    run_dir.mkdir(parents=True)
    log_path = run_dir / "train.log"
    start = time.time()
    with log_path.open("w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        if re.search(rf"unrecognized arguments:.*--{re.escape(flag)}=", tail):
            hint = (" (packing vs padding has no flag yet: python eval/ablate.py --help says what it needs)"
                    if "pack" in flag or "pad" in flag else "")
            raise SystemExit(f"error: --flag {flag}: {Path(command[1]).name} has no --{flag} (see python "
                             f"{command[1]} --help){hint}")
        raise SystemExit(f"{tail}\nerror: the run in {run_dir} failed (exit status {finished.returncode}); its "
                         f"output is in {log_path}, the end of it above")
    return time.time() - start


def run_metrics_file(run_dir: Path) -> Path:
    """The one metrics.jsonl a run wrote (<run_dir>/out/runs/<run name>/metrics.jsonl).

    Raises:
        SystemExit: when there is none or more than one.
    """
    found = sorted((run_dir / "out" / "runs").glob("*/metrics.jsonl"))
    if len(found) != 1:
        raise SystemExit(f"error: {run_dir / 'out' / 'runs'}: expected one run's metrics.jsonl, found {len(found)}")
    return found[0]


def metric_name(records: list[dict], metric: str) -> str:
    """The metric compared for one run: `metric`, or for AUTO_METRIC eval_lm_loss when the run logs it (MoE:
    the cross-entropy without the router's balance loss), else eval_loss."""
    if metric != AUTO_METRIC:
        return metric
    return "eval_lm_loss" if any("eval_lm_loss" in record for record in records) else "eval_loss"


def read_run(metrics_path: Path, metric: str) -> dict:
    """The figures of one finished run from its metrics.jsonl (trainer/monitor.py's records).

    Returns:
        {"metric": the name compared, "final": its last logged value (the eval at the last step), "steps": the
        last logged step, "tokens_seen", "elapsed_s": of the last log line, "records": all of them}.
    Raises:
        SystemExit: when the run logged no such metric (no held-out data, or another name).
    """
    records = read_metrics(metrics_path)
    name = metric_name(records, metric)
    evals = [record for record in records if name in record]
    if not evals:
        logged = sorted({key for record in records for key in record if key.startswith("eval_")})
        raise SystemExit(f"error: {metrics_path} has no {name} (its eval metrics: {', '.join(logged) or 'none'}); "
                         "give the stage held-out data (--eval_data_path after `--`) or another --metric")
    last_log = [record for record in records if "tokens_seen" in record][-1]
    return {"metric": name, "final": float(evals[-1][name]), "steps": last_log["step"],
            "tokens_seen": last_log["tokens_seen"], "elapsed_s": last_log["elapsed_s"], "records": records}


def summarize(runs: list[dict], values: list[str]) -> list[dict]:
    """Per value (in `values` order) the mean and spread of the runs' final metric over their seeds.

    Returns:
        [{"value", "seeds", "n", "mean", "std" (sample standard deviation, n - 1 in the denominator; None for
        one seed), "min", "max", "tokens_seen" and "steps" (means over the seeds)}].
    """
    table = []
    for value in values:
        mine = [run for run in runs if run["value"] == value]
        finals = [run["final"] for run in mine]
        table.append({"value": value, "seeds": [run["seed"] for run in mine], "n": len(finals),
                      "mean": statistics.fmean(finals), "std": statistics.stdev(finals) if len(finals) > 1 else None,
                      "min": min(finals), "max": max(finals),
                      "tokens_seen": statistics.fmean(run["tokens_seen"] for run in mine),
                      "steps": statistics.fmean(run["steps"] for run in mine)})
    return table


# ----------------------------------------------------------------------------------------------------------------
# Output


def format_table(flag: str, metric: str, table: list[dict]) -> str:
    """The printed table: one row per value."""
    width = max(len(flag), *(len(row["value"]) for row in table))
    header = (f"{flag:<{width}}  {'seeds':<10} {metric + ' mean':>18} {'std':>8} {'min..max':>17} "
              f"{'tokens seen':>12} {'steps':>8}")
    lines = [header, "-" * len(header)]
    for row in table:
        std = f"{row['std']:.4f}" if row["std"] is not None else "-"
        lines.append(f"{row['value']:<{width}}  {' '.join(map(str, row['seeds'])):<10} {row['mean']:>18.4f} "
                     f"{std:>8} {row['min']:>8.4f}..{row['max']:<7.4f} {row['tokens_seen']:>12,.0f} "
                     f"{row['steps']:>8.1f}")
    return "\n".join(lines)


def plot_ablation(runs: list[dict], values: list[str], flag: str, x: str, output: Path) -> None:
    """Each run's eval metric against `x` (a key of eval/plot_metrics.py's X_AXES) into the PNG `output`: one
    colour per value, a thin line per seed (eval/plot_metrics.py's metric_series gives the points)."""
    figure, ax = plt.subplots(figsize=(9, 6), dpi=100)
    for index, value in enumerate(values):
        for number, run in enumerate(run for run in runs if run["value"] == value):
            xs, ys = metric_series(run["records"], run["metric"], x)
            ax.plot(xs, ys, color=f"C{index}", linewidth=0.9, alpha=0.8, marker="o", markersize=3,
                    label=f"--{flag} {value}" if number == 0 else None)
    metrics = sorted({run["metric"] for run in runs})
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel(" / ".join(Y_LABELS.get(metric, metric) for metric in metrics))
    ax.set_title(f"--{flag}: {', '.join(metrics)}, one line per seed")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(output)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args, extra = parse_args(argv)
    check_extra_flags(args.flag, extra)
    planned = [(value, seed) for seed in args.seeds for value in args.values]  # seed by seed: see the docstring
    existing = [run_directory(args.output_dir, args.flag, value, seed) for value, seed in planned]
    if taken := [path for path in existing if path.exists()]:
        raise SystemExit(f"error: --output_dir {args.output_dir} already holds {taken[0].name}; pass another "
                         "--output_dir or delete the old runs")
    print(SHARED_MACHINE_WARNING, file=sys.stderr)
    budget = ", ".join(([f"{args.time_budget:g} min"] if args.time_budget else [])
                       + ([f"{args.max_steps} steps"] if args.max_steps else []))
    runs = []
    for number, (value, seed) in enumerate(planned, start=1):
        run_dir = run_directory(args.output_dir, args.flag, value, seed)
        print(f"run {number}/{len(planned)}: --{args.flag} {value} --seed {seed} ({budget}) -> {run_dir}", flush=True)
        wall_s = run_once(run_command(args, extra, value, seed, run_dir), run_dir, args.flag)
        metrics_path = run_metrics_file(run_dir)
        run = {"value": value, "seed": seed, "run_dir": str(run_dir), "metrics_file": str(metrics_path),
               "wall_s": wall_s, **read_run(metrics_path, args.metric)}
        print(f"  {run['metric']} {run['final']:.4f} after {run['steps']} steps, {run['tokens_seen']:,} tokens, "
              f"{wall_s:.1f} s", flush=True)
        runs.append(run)
    table = summarize(runs, args.values)
    metric_label = "/".join(sorted({run["metric"] for run in runs}))
    print(format_table(args.flag, metric_label, table))
    plot_path, json_path = args.output_dir / "ablation.png", args.output_dir / "ablation.json"
    plot_ablation(runs, args.values, args.flag, args.x, plot_path)
    result = {"script": str(args.script.relative_to(REPO_ROOT) if args.script.is_relative_to(REPO_ROOT)
                            else args.script),
              "flag": args.flag, "values": args.values, "seeds": args.seeds, "time_budget": args.time_budget,
              "max_steps": args.max_steps, "extra_flags": extra, "metric": args.metric, "warning":
              SHARED_MACHINE_WARNING, "table": table,
              "runs": [{key: value for key, value in run.items() if key != "records"} for run in runs],
              "plot": str(plot_path)}
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {json_path} and {plot_path}")
    return result


if __name__ == "__main__":
    main()
