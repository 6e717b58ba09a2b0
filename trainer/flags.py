"""The shared flags of the stage scripts, their types, and the checks made when they are read.

    args = parse_args("dpo", __doc__, add_flags=dpo_flags, defaults={...})   # parsing only: nothing starts here
    setup_run(args)                                                          # trainer/distributed.py: device,
                                                                             # dtype, torchrun, seeds

Every numeric flag takes one of the types below, so a value out of range ends in argparse's one line ("argument
--learning_rate: must be a finite number > 0, got -1") before anything is loaded, instead of a traceback or a
silently meaningless run. The types are defined once, in dataset/cli.py, because dataset/prepare.py needs them
too and dataset/ never imports trainer/ (the arrow goes trainer/ -> dataset/, as DESIGN.md draws it). The stage
scripts import all of this through trainer/trainer_utils.py.
"""

import argparse
import os
from pathlib import Path

from dataset.cli import (HelpFormatter, fraction, int_in_range, non_negative_float, non_negative_int,  # noqa: F401
                         positive_float, positive_int)
from model.loading import default_device
from trainer.checkpoint import checkpoint_name
from trainer.distributed import log

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Flag types (the numeric ones: dataset/cli.py)


def compile_setting(value: str):
    """--compile's value: "auto", or 0 / 1 as ints."""
    if value not in ("0", "1", "auto"):
        raise argparse.ArgumentTypeError(f"{value!r}: use 0, 1 or auto")
    return value if value == "auto" else int(value)


# ----------------------------------------------------------------------------------------------------------------
# The shared flags


def parse_args(stage: str, description: str, add_flags=None, defaults: dict | None = None, argv=None):
    """Parse the shared flags (plus the stage's own) and check them; nothing starts here.

    The checks need no device: paths (check_paths) and a note on the shape flags a --from_weight checkpoint
    overrides. The stage script then calls setup_run(args) (trainer/distributed.py), which resolves --device and
    --dtype, joins torchrun's process group and seeds the generators, as nanochat's scripts call compute_init().

    Args:
        stage: the stage's name; the default --save_weight, e.g. "pretrain".
        add_flags: optional function(parser) adding the stage's own flags.
        defaults: {flag dest: value} overriding shared defaults, e.g. {"learning_rate": 5e-5}.
        argv: the command line without the program name; None reads sys.argv.
    Returns:
        argparse.Namespace with every flag as given (--dtype may still be "auto") and `stage`.
    Raises:
        SystemExit: an invalid flag value (argparse's one line) or a bad path (check_paths).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    paths = parser.add_argument_group("data and checkpoints")
    paths.add_argument("--data_path", help="training jsonl file")
    paths.add_argument("--eval_data_path", help="held-out jsonl file for eval loss and perplexity (empty: no eval)")
    paths.add_argument("--save_dir", default=str(REPO_ROOT / "out"), help="where weights dirs and runs/ logs go")
    paths.add_argument("--checkpoint_dir", default=str(REPO_ROOT / "checkpoints"), help="where resume states go")
    paths.add_argument("--save_weight", default=stage, help="saved as <save_weight>_<hidden_size>[_moe]")
    paths.add_argument("--from_weight", default="none", help="none | a stage name under --save_dir | a directory")
    paths.add_argument("--from_resume", type=int, choices=(0, 1), default=0,
                       help="1: continue the interrupted run from its newest intact resume state. Refused when "
                            "--batch_size, --accumulation_steps, --max_seq_len, --epochs, --seed, the --data_path "
                            "file or the model's shape differ from that run's; free to change: --max_steps, "
                            "--eval_interval, --log_interval, --save_interval, --keep_last, --num_workers, "
                            "--device, and the number of processes under ddp or fsdp (with --accumulation_steps "
                            "x processes unchanged); the optimizer flags (--learning_rate, ...) apply from the "
                            "resumed step on")
    paths.add_argument("--keep_last", type=positive_int, default=2, help="resume states kept (newest first)")
    paths.add_argument("--skip_bad_lines", type=int, choices=(0, 1), default=0,
                       help="1: skip (and count) invalid data lines instead of stopping at the first one")
    paths.add_argument("--tokenizer_path", default=str(REPO_ROOT / "model" / "tokenizer"), help="tokenizer dir")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=positive_int, default=1,
                       help="passes over the training data (with --time_budget and no --epochs: as many as "
                            "the budget allows)")
    optim.add_argument("--max_steps", type=positive_int, help="cap on optimizer steps; the schedule ends there")
    optim.add_argument("--time_budget", type=positive_float,
                       help="minutes of wall time (eval and saving included): the learning-rate schedule runs on "
                            "the fraction spent, and the run saves and ends when it is spent (or at --epochs / "
                            "--max_steps, if sooner); resumes continue the same budget")
    optim.add_argument("--batch_size", type=positive_int, default=16, help="samples per micro-batch per process")
    optim.add_argument("--learning_rate", type=positive_float, default=5e-4, help="peak learning rate after warmup")
    optim.add_argument("--weight_decay", type=non_negative_float, default=0.1,
                       help="AdamW decay of matrices (not norms)")
    optim.add_argument("--warmup_steps", type=non_negative_int, default=20, help="optimizer steps of linear warmup")
    optim.add_argument("--min_lr_ratio", type=fraction, default=0.1,
                       help="final learning rate / peak learning rate (0 to 1)")
    optim.add_argument("--accumulation_steps", type=positive_int, default=1, help="micro-batches per optimizer step")
    optim.add_argument("--grad_clip", type=non_negative_float, default=1.0,
                       help="max global gradient L2 norm (0: no clipping)")
    run = parser.add_argument_group("hardware and logging")
    run.add_argument("--device", default=default_device(), help="cuda | mps | cpu (first available)")
    run.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="autocast dtype over float32 weights; auto: bfloat16 on CUDA that has it, float16 on older "
                          "CUDA, on CPU bfloat16 where a timed matmul shows it clearly faster (AMX, AVX512-BF16), "
                          "else float32 (model/precision.py); the choice is printed first")
    run.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp", "deepspeed"),
                     help="under torchrun: ddp replicates the model on every process, fsdp shards weights, "
                          "gradients and optimizer state over them, deepspeed runs DeepSpeed ZeRO")
    run.add_argument("--deepspeed_config", default=str(REPO_ROOT / "trainer" / "ds_config" / "zero2.json"),
                     help="DeepSpeed JSON (ZeRO options; batch, clipping, dtype come from the flags); zero3.json "
                          "shards the weights too")
    run.add_argument("--compile", "--use_compile", type=compile_setting, default="auto",
                     help="1: torch.compile the model for training (the first step compiles, about a minute); 0: "
                          "eager; auto: compile when the first steps show the run is long enough to earn it back")
    run.add_argument("--gradient_checkpointing", type=int, choices=(0, 1), default=0,
                     help="1: recompute each layer's activations in backward (less memory, ~1/3 more compute)")
    run.add_argument("--keep_freed_memory", type=int, choices=(0, 1), default=1,
                     help="CPU on Linux: keep freed memory for the next step instead of returning it to the OS "
                          "(about 10%% faster; peak memory up to a quarter higher; see keep_freed_memory)")
    run.add_argument("--num_workers", type=non_negative_int, default=0,
                     help="DataLoader worker processes (0: main process)")
    run.add_argument("--seed", type=int_in_range(0, 2**32 - 1), default=42,
                     help="seed of the initialization and the data order (0 to 2**32 - 1)")
    run.add_argument("--log_interval", type=positive_int, default=10, help="optimizer steps between log lines")
    run.add_argument("--eval_interval", type=positive_int, default=100, help="optimizer steps between evals")
    run.add_argument("--eval_batches", type=positive_int, default=50, help="most batches per eval")
    run.add_argument("--save_interval", type=positive_int, default=1000, help="optimizer steps between saves")
    run.add_argument("--use_wandb", type=int, choices=(0, 1), default=0, help="1: also log to Weights & Biases")
    run.add_argument("--wandb_project", default="minimind", help="wandb project name")
    shape = parser.add_argument_group(
        "model shape (for --from_weight none; a checkpoint brings its own, and --hidden_size, --use_moe pick the "
        "stage's directory). The defaults are a 4.6M-parameter model sized for the shipped data on a laptop CPU; "
        "MiniMind2-small is --hidden_size 512 --num_hidden_layers 8 --num_attention_heads 8 "
        "--num_key_value_heads 4, MiniMind2 is --hidden_size 768 --num_hidden_layers 16 (same heads)")
    shape.add_argument("--hidden_size", type=positive_int, default=256, help="width of the residual stream")
    shape.add_argument("--num_hidden_layers", type=positive_int, default=4, help="decoder layers")
    shape.add_argument("--num_attention_heads", type=positive_int, default=4, help="query heads")
    shape.add_argument("--num_key_value_heads", type=positive_int, default=2, help="key/value heads (GQA)")
    shape.add_argument("--max_seq_len", type=int_in_range(2), default=256,
                       help="tokens per training sample (at least 2: one input and the token it predicts)")
    shape.add_argument("--use_moe", type=int, choices=(0, 1), default=0, help="1: Mixture-of-Experts feed-forward")
    shape.add_argument("--num_experts", type=positive_int, default=4, help="experts per MoE layer")
    shape.add_argument("--num_experts_per_tok", type=positive_int, default=1, help="experts each token runs")
    if add_flags is not None:
        add_flags(parser)
    unknown = set(defaults or {}) - {action.dest for action in parser._actions}
    if unknown:
        raise ValueError(f"defaults name no flag: {sorted(unknown)}")
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    args.stage = stage
    check_paths(args)
    given = given_flags(parser, argv)
    log_ignored_shape_flags(args, given)
    if args.time_budget and "epochs" not in given:
        args.epochs = BUDGET_EPOCHS  # the budget ends the run, not the stage's default pass count
    return args


def check_paths(args) -> None:
    """Refuse a missing --data_path / --eval_data_path and an unwritable --save_dir / --checkpoint_dir at once,
    naming the flag, instead of after the model is built or at the first save (step 1000 by default).

    Nothing is created here: a directory that does not exist yet must be creatable (its nearest existing parent a
    writable directory).
    Raises:
        SystemExit: one sentence naming the flag and the path.
    """
    for flag in ("data_path", "eval_data_path"):
        path = getattr(args, flag, None)
        if path and not Path(path).is_file():
            problem = "is a directory; expected a .jsonl file" if Path(path).is_dir() else "no such file"
            raise SystemExit(f"--{flag} {path}: {problem}")
    for flag in ("save_dir", "checkpoint_dir"):
        directory = Path(getattr(args, flag)).absolute()
        existing = next(parent for parent in (directory, *directory.parents) if parent.exists())
        if not existing.is_dir():
            raise SystemExit(f"--{flag} {directory}: {existing} is a file, not a directory; pass another directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise SystemExit(f"--{flag} {directory}: {existing} is not writable (permissions or a read-only file "
                             "system); pass a directory you can write to")


BUDGET_EPOCHS = 10_000  # --epochs under --time_budget when not given: the budget, not the data, ends the run

SHAPE_FLAG_DESTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "use_moe",
                    "num_experts", "num_experts_per_tok")


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests of the flags the command line sets (abbreviated or with "=" too), not left at their defaults."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # parsed again, a flag left out leaves no attribute
    parser._defaults.clear()
    return set(vars(parser.parse_args(argv)))


def log_ignored_shape_flags(args, given: set[str]) -> None:
    """Say (one line) which shape flags given on the command line a --from_weight checkpoint overrides.

    A checkpoint brings its own shape (config.json); of a stage name, only --hidden_size and --use_moe count
    (they pick its directory), of a directory none.
    """
    weight = args.from_weight
    if weight == "none":
        return
    stage_dir = Path(args.save_dir) / checkpoint_name(weight, args.hidden_size, args.use_moe)
    is_directory = not stage_dir.is_dir() and (os.sep in weight or Path(weight).is_dir())  # as resolve_weight_dir
    used = () if is_directory else ("hidden_size", "use_moe")
    ignored = [f"--{dest}" for dest in SHAPE_FLAG_DESTS if dest in given and dest not in used]
    if ignored:
        named = "; the output is named after its width" if "--hidden_size" in ignored else ""
        log(f"{', '.join(ignored)} ignored: --from_weight {weight} brings its own model shape "
            f"(its config.json){named}")
