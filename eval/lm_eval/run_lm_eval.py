r"""Run lm-evaluation-harness on a MiniMind checkpoint: `lm_eval --model hf`, with MiniMind known to transformers.

    python eval/lm_eval/run_lm_eval.py --model_args pretrained=out/full_sft_256 --tasks arc_easy_local --limit 50
    python eval/lm_eval/run_lm_eval.py --model_args pretrained=out/full_sft_256 --tasks arc_easy_local \
        --metadata data_file=path/to/arc.jsonl --batch_size 8 --output_path out/lm_eval

The flags are lm_eval's own (`lm_eval run --help` lists them: --tasks, --limit, --num_fewshot, --batch_size,
--device, --output_path, --log_samples, ...); this script passes them to lm_eval's command line after two steps:
1. it imports model.model_minimind, which registers MiniMindConfig / MiniMindForCausalLM with transformers'
   AutoConfig / AutoModelForCausalLM, so the harness's `hf` model opens a checkpoint whose config.json says
   model_type "minimind" (plain `lm_eval` stops there: transformers does not know that model type);
2. it adds `--model hf` and `--include_path eval/lm_eval` (the offline tasks of this folder, e.g.
   arc_easy_local.yaml) unless the command line names its own;
3. it opens the MiniMind checkpoint `pretrained=` names strictly (model.loading.load_pretrained), as every tool
   of this repository does: the harness's from_pretrained would score a checkpoint missing a tensor with random
   values in its place.
To score a checkpoint with plain `lm_eval` instead (e.g. next to a published model, with nothing of this
repository imported), export it as a stock transformers Qwen3 directory first:
`python scripts/convert_model.py to_hf --model_path out/full_sft_256`.
"""

import json
import sys
from pathlib import Path

from model.loading import load_pretrained
from model.model_minimind import MiniMindConfig  # importing it registers MiniMind with the transformers Auto classes

TASKS_DIR = Path(__file__).resolve().parent  # the local task YAMLs


def lm_eval_argv(argv: list[str]) -> list[str]:
    """The lm_eval command line for `argv`: argv plus `--model hf` and `--include_path <this folder>` if absent."""
    def has(*flags: str) -> bool:
        return any(arg == flag or arg.startswith(flag + "=") for arg in argv for flag in flags)

    return [*([] if has("--model", "-M") else ["--model", "hf"]), *argv,
            *([] if has("--include_path") else ["--include_path", str(TASKS_DIR)])]


def check_checkpoint(argv: list[str]) -> None:
    """Load the MiniMind checkpoint that --model_args pretrained=<dir> names strictly, if it names one.

    Raises:
        SystemExit: its weights do not fit its config (load_pretrained names the tensors).
    """
    model_args = [value for flag, value in zip(argv, argv[1:]) if flag == "--model_args"]
    model_args += [arg.removeprefix("--model_args=") for arg in argv if arg.startswith("--model_args=")]
    for pair in ",".join(model_args).split(","):
        key, _, value = pair.partition("=")
        config = Path(value.strip()) / "config.json"
        if key.strip() != "pretrained" or not config.is_file():
            continue
        if json.loads(config.read_text()).get("model_type") == MiniMindConfig.model_type:  # not a Qwen3 export
            load_pretrained(config.parent, "--model_args pretrained")


def main(argv: list[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate  # an optional dependency: the `lm_eval` extra
    except ImportError:
        raise SystemExit('error: this script needs lm-evaluation-harness: pip install -e ".[lm_eval]"') from None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        argv = ["--help"]
    check_checkpoint(argv)
    # lm_eval's command line reads sys.argv (versions with subcommands put `run` in front of these flags)
    sys.argv = ["lm_eval", *lm_eval_argv(argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
