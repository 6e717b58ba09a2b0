"""The same prompts through every stage's checkpoint, greedy, side by side: what each stage changes.

    python eval/compare_checkpoints.py                                    # every stage under out/ at width 256
    python eval/compare_checkpoints.py pretrain full_sft lora_identity dpo grpo --prompt "Who are you?"
    python eval/compare_checkpoints.py out/full_sft_256 out/dpo_256 --max_new_tokens 64 --json

Each checkpoint is a stage name (`full_sft` -> <save_dir>/full_sft_<hidden_size>[_moe], as the trainer names its
directories) or a directory; a LoRA adapter directory is put on the base model its adapter_config.json names and
merged (model/loading.py's strict loader, as scripts/chat.py opens one). Without any, every checkpoint under
--save_dir at --hidden_size (and --use_moe) is taken, in the order of the stages (pretrain, full_sft, unlikelihood,
reason_sft, lora_*, dpo, distill, grpo, ppo, agent, then the rest by name); reward models are left out (they
score text and write none).

Every reply is greedy (temperature 0, no repetition penalty) through the reply path of chat and
eval/check_replies.py (scripts/generation.py: `prompt_ids`, `ReplyStream`), so a reply here is the one
`scripts/chat.py --temperature 0` gives, and the one transformers' `generate(do_sample=False)` gives. A chat
model reads the prompt as a user turn of the chat template. A pretrained-only model (the `pretrain` stage, or
those --raw names) has never seen the chat format: it is given the raw prompt to continue as plain text
(`scripts/chat.py --raw 1`), and the output says so.

The text output has one block per prompt and one row per checkpoint (the reply wrapped beside its name); --json
prints {"prompts", "checkpoints": [{"name", "path", "stage", "format", ...}], "replies": [{"prompt",
"replies": [{"checkpoint", "format", "reply", "tokens", "finish_reason"}]}]} instead. Replies include a
reasoning model's <think>...</think> as it wrote it.
"""

import argparse
import gc
import json
import os
import re
import shutil
import textwrap
from pathlib import Path

from dataset.cli import positive_int
from eval.check_replies import DEFAULT_PROMPTS as CHAT_PROMPTS
from model.loading import load_checkpoint
from scripts.generation import DEFAULT_HIDDEN_SIZE, DEFAULT_SAVE_DIR, ReplyStream, prompt_ids
from trainer.checkpoint import checkpoint_name
from trainer.trainer_utils import stage_scripts

# the chat prompts of eval/check_replies.py (SFT stories, the LoRA identity) and a GSM8K-style question (GRPO)
DEFAULT_PROMPTS = [*CHAT_PROMPTS, "Tom has 3 apples and buys 5 more. How many apples does he have now?"]
# the stages in the order of the pipeline; a directory's stage is its name less _<hidden_size>[_moe]
STAGE_ORDER = ("pretrain", "full_sft", "unlikelihood", "reason_sft", "lora", "dpo", "distill", "grpo", "ppo", "agent")
RAW_STAGES = ("pretrain",)  # trained on plain text only: no chat template
CHAT, RAW = "chat", "raw"
FORMAT_NOTES = {CHAT: "chat template", RAW: "pretrained only: raw text continuation, no chat template"}


# ----------------------------------------------------------------------------------------------------------------
# Which checkpoints


def stage_of(directory_name: str) -> str:
    """The stage a checkpoint directory's name gives: `full_sft_256_moe` -> `full_sft` (the name when it has no
    _<hidden_size> suffix)."""
    return re.sub(r"_\d+(_moe)?$", "", directory_name)


def is_checkpoint(directory: Path) -> bool:
    """A weights directory (config.json) or a LoRA adapter directory (adapter_config.json)."""
    return (directory / "config.json").is_file() or (directory / "adapter_config.json").is_file()


def is_reward_model(directory: Path) -> bool:
    """A reward model's directory (trainer/train_reward.py): its config.json names MiniMindRewardModel."""
    config = directory / "config.json"
    return config.is_file() and "MiniMindRewardModel" in (json.loads(config.read_text()).get("architectures") or [])


def stage_rank(stage: str) -> tuple[int, str]:
    """Sort key: the position of the stage (or of its prefix, lora_identity -> lora) in STAGE_ORDER, then name."""
    for index, known in enumerate(STAGE_ORDER):
        if stage == known or stage.startswith(known + "_"):
            return index, stage
    return len(STAGE_ORDER), stage


def discover(save_dir: Path, hidden_size: int, use_moe: bool) -> list[Path]:
    """Every checkpoint directory <save_dir>/<stage>_<hidden_size>[_moe] (use_moe picks the suffix) that a reply
    can come from, in stage order; reward models are left out.

    Raises:
        SystemExit: when there is none, naming --save_dir and what makes the first stage.
    """
    suffix = re.escape(checkpoint_name("", hidden_size, use_moe))  # "_256" or "_256_moe"
    found = [path for path in (save_dir.iterdir() if save_dir.is_dir() else [])
             if re.fullmatch(rf".+{suffix}", path.name) and is_checkpoint(path) and not is_reward_model(path)]
    if not found:
        raise SystemExit(f"error: --save_dir {save_dir} holds no checkpoint at --hidden_size {hidden_size}"
                         f"{' --use_moe 1' if use_moe else ''}; train one first (python trainer/train_pretrain.py), "
                         "or name checkpoint directories")
    return sorted(found, key=lambda path: stage_rank(stage_of(path.name)))


def resolve(name: str, save_dir: Path, hidden_size: int, use_moe: bool) -> Path:
    """The directory a checkpoint argument names: an existing directory, else the stage `name` under save_dir.

    Raises:
        SystemExit: one sentence naming the checkpoint, where it was looked for and the script that makes it.
    """
    if Path(name).is_dir():
        if not is_checkpoint(Path(name)):
            raise SystemExit(f"error: checkpoint {name}: the directory has no config.json or adapter_config.json; "
                             "not a checkpoint")
        return Path(name)
    if os.sep in name:
        raise SystemExit(f"error: checkpoint {name}: no such directory")
    directory = save_dir / checkpoint_name(name, hidden_size, use_moe)
    if is_checkpoint(directory):
        return directory
    scripts = stage_scripts()
    script = scripts.get(name) or ("trainer/train_lora.py --save_weight " + name if name.startswith("lora") else None)
    made_by = f"python {script} makes it" if script else f"no stage is named {name} (stages: {', '.join(scripts)})"
    raise SystemExit(f"error: checkpoint {name}: nothing at {directory} (--save_dir {save_dir}, --hidden_size "
                     f"{hidden_size}, --use_moe {int(use_moe)}); {made_by}")


# ----------------------------------------------------------------------------------------------------------------
# Replies


def reply_prompt_ids(tokenizer, prompt: str, prompt_format: str) -> list[int]:
    """The ids the model continues: the prompt as a user turn of the chat template, or as raw text (RAW)."""
    if prompt_format == RAW:
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids(tokenizer, [{"role": "user", "content": prompt}])


def greedy_replies(model, tokenizer, prompts: list[str], prompt_format: str, max_new_tokens: int) -> list[dict]:
    """One greedy reply per prompt (temperature 0, repetition penalty 1.0: scripts/generation.py's ReplyStream).

    Returns:
        per prompt {"reply": the decoded generated tokens (special tokens dropped, <think> kept), "tokens": how
        many were generated, "finish_reason": "stop" (end of turn or text) or "length" (max_new_tokens)}.
    """
    replies = []
    for prompt in prompts:
        ids = reply_prompt_ids(tokenizer, prompt, prompt_format)
        reply = ReplyStream(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                            repetition_penalty=1.0).complete()
        replies.append({"reply": tokenizer.decode(reply.token_ids, skip_special_tokens=True),
                        "tokens": len(reply.token_ids), "finish_reason": reply.finish_reason})
    return replies


def describe(directory: Path, raw_names: set[str]) -> dict:
    """{"name", "path", "stage", "format" (CHAT or RAW), "base" (a LoRA adapter's base model, else None)}."""
    stage = stage_of(directory.name)
    base = None
    if (directory / "adapter_config.json").is_file():
        base = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
    raw = stage in raw_names or directory.name in raw_names
    return {"name": directory.name, "path": str(directory), "stage": stage, "format": RAW if raw else CHAT,
            "base": base}


def compare(directories: list[Path], prompts: list[str], max_new_tokens: int, device: str | None = None,
            dtype: str = "auto", raw_names: frozenset[str] = frozenset(RAW_STAGES)) -> dict:
    """Every checkpoint's greedy reply to every prompt, loading one checkpoint at a time.

    Returns:
        {"prompts", "checkpoints": [describe(...)], "replies": [{"prompt", "replies": [{"checkpoint", "format",
        **greedy_replies' fields}] in the order of the checkpoints}] in the order of the prompts}.
    Raises:
        SystemExit: a checkpoint that does not load (model/loading.py's one sentence).
    """
    checkpoints = [describe(directory, raw_names) for directory in directories]
    by_prompt = [{"prompt": prompt, "replies": []} for prompt in prompts]
    for checkpoint in checkpoints:
        model, tokenizer = load_checkpoint(checkpoint["path"], device, dtype=dtype)
        for row, reply in zip(by_prompt, greedy_replies(model, tokenizer, prompts, checkpoint["format"],
                                                        max_new_tokens)):
            row["replies"].append({"checkpoint": checkpoint["name"], "format": checkpoint["format"], **reply})
        del model
        gc.collect()  # one model in memory at a time
    return {"prompts": prompts, "checkpoints": checkpoints, "replies": by_prompt}


# ----------------------------------------------------------------------------------------------------------------
# Output


def format_comparison(result: dict, width: int) -> str:
    """The text table: per prompt a header, then per checkpoint its name and the reply wrapped beside it, its
    paragraphs kept, within `width` characters; a RAW checkpoint's row says it continued raw text."""
    names = [checkpoint["name"] + (" (raw)" if checkpoint["format"] == RAW else "")
             for checkpoint in result["checkpoints"]]
    column = max(map(len, names)) + 3
    text_width = max(20, width - column)
    lines = ["Checkpoints: " + "; ".join(f"{checkpoint['name']} ({FORMAT_NOTES[checkpoint['format']]}"
                                          + (f", LoRA adapter on {checkpoint['base']}" if checkpoint["base"] else "")
                                          + ")" for checkpoint in result["checkpoints"]), ""]
    for number, row in enumerate(result["replies"], start=1):
        lines += [f"=== Prompt {number}/{len(result['replies'])}: {row['prompt']}", ""]
        for name, reply in zip(names, row["replies"]):
            wrapped = [piece for paragraph in (reply["reply"].strip() or "(empty reply)").splitlines()
                       for piece in (textwrap.wrap(paragraph, text_width) or [""])]
            ending = f"[{reply['tokens']} tokens, {'ended' if reply['finish_reason'] == 'stop' else 'cut at max'}]"
            for index, piece in enumerate([*wrapped, ending]):
                lines.append(f"{name if index == 0 else '':<{column}}{piece}")
            lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*",
                        help="stage names (pretrain, full_sft, lora_identity, dpo, grpo, ...) under --save_dir, or "
                             "checkpoint / LoRA adapter directories (default: every checkpoint under --save_dir "
                             "at --hidden_size)")
    parser.add_argument("--save_dir", default=str(DEFAULT_SAVE_DIR),
                        help="where the stage directories are (default: %(default)s)")
    parser.add_argument("--hidden_size", type=positive_int, default=DEFAULT_HIDDEN_SIZE,
                        help="the <hidden_size> in the stage directories' names (default: %(default)s)")
    parser.add_argument("--use_moe", type=int, choices=(0, 1), default=0,
                        help="1: the MoE checkpoints, whose names end in _moe (default: %(default)s)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt; repeat the flag for several (default: " + "; ".join(DEFAULT_PROMPTS) + ")")
    parser.add_argument("--raw", default=",".join(RAW_STAGES),
                        help="comma-separated stage or directory names given the raw prompt to continue instead "
                             "of the chat template (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=200,
                        help="tokens generated at most per reply (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="dtype the models run in; auto: as scripts/chat.py (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the replies as one JSON object instead")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    save_dir = Path(args.save_dir)
    directories = ([resolve(name, save_dir, args.hidden_size, bool(args.use_moe)) for name in args.checkpoints]
                   or discover(save_dir, args.hidden_size, bool(args.use_moe)))
    raw_names = frozenset(name.strip() for name in args.raw.split(",") if name.strip())
    result = compare(directories, args.prompt or DEFAULT_PROMPTS, args.max_new_tokens, args.device, args.dtype,
                     raw_names)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print(format_comparison(result, shutil.get_terminal_size((120, 24)).columns))
    return result


if __name__ == "__main__":
    main()
