"""Regenerate the small default datasets shipped in dataset/data/ from the staged public corpora.

Every subset is deterministic: the first N records of a source file (no sampling), so running this script
twice gives byte-identical files. Lines are copied verbatim from the sources; nothing is rewritten.
Provenance and licenses of every source are in dataset/data/ATTRIBUTION.md.

    python dataset/make_shipped_data.py                      # reads <repo>/../shared/data
    python dataset/make_shipped_data.py --shared_dir /path/to/data --out_dir /tmp/data
"""

import argparse
import json
import logging
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Source files, relative to --shared_dir.
TINYSTORIES = "pretrain/tinystories/tinystories_lowercased_pretrain.jsonl"
TINYSTORIES_TEST = "pretrain/tinystories/tinystories_lowercased_pretrain_test.jsonl"
POETRY = "pretrain/chinese_poetry/chinese_poetry_pretrain.jsonl"
POETRY_TEST = "pretrain/chinese_poetry/chinese_poetry_pretrain_test.jsonl"
ALPACA_EN = "sft/alpaca_en/alpaca_en_sft.jsonl"
ALPACA_ZH = "sft/alpaca_zh/alpaca_zh_sft.jsonl"
LORA_IDENTITY = "sft/minimind_lora_identity/lora_identity.jsonl"
HH_HARMLESS = "dpo/hh_rlhf_harmless_test/hh_harmless_test_dpo.jsonl"

# How much of each source is shipped (about 2.8 MB English + 0.5 MB Chinese pretraining text).
NUM_STORIES, NUM_POEMS = 3400, 2200
NUM_STORIES_TEST, NUM_POEMS_TEST = 109, 70  # all 109 held-out stories; poems in the same ratio as train
NUM_SFT_EN, NUM_SFT_ZH = 3000, 1000
NUM_SFT_EN_TEST, NUM_SFT_ZH_TEST = 150, 50
MAX_SFT_CHARS = 600  # a conversation is "short" when all its message contents together have <= 600 characters
# a run of combining marks ("Zalgo" text): a corrupted record of 600 characters can be 600 tokens and more
COMBINING_RUN = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]{8,}")
NUM_DPO, NUM_DPO_TEST = 1000, 200
MAX_DPO_CHARS = 800  # a preference pair is "short" when its prompt and both replies have <= 800 characters


def read_lines(path: Path) -> list[str]:
    """All lines of a jsonl file, newline included, in file order."""
    with open(path, encoding="utf-8") as f:
        return f.readlines()


def short_conversations(lines: list[str]) -> list[str]:
    """The lines whose conversation has at most MAX_SFT_CHARS characters of message content in total, none of
    them in a run of combining marks."""
    def contents(line: str) -> list[str]:
        return [m["content"] for m in json.loads(line)["conversations"]]
    return [line for line in lines
            if sum(map(len, contents(line))) <= MAX_SFT_CHARS and not any(map(COMBINING_RUN.search, contents(line)))]


def short_pairs(lines: list[str]) -> list[str]:
    """The preference pairs whose shared prompt plus both final replies have at most MAX_DPO_CHARS characters."""
    def size(record: dict) -> int:
        return sum(len(m["content"]) for m in record["chosen"]) + len(record["rejected"][-1]["content"])
    return [line for line in lines if size(json.loads(line)) <= MAX_DPO_CHARS]


def user_prompt(line: str) -> str:
    """The first user message of an SFT line, used to keep test prompts out of the training set."""
    return next(m["content"] for m in json.loads(line)["conversations"] if m["role"] == "user")


def interleave(*sources: list[str]) -> list[str]:
    """Merge lists so each one is spread evenly over the result, in order (a deterministic round-robin by ratio).

    Item k of a list of length n sits at relative position (k + 0.5) / n; sorting by that position puts, for
    3400 stories and 2200 poems, about three poems between every five stories, so any prefix of the file
    (a short run) sees both languages.
    """
    keyed = [((k + 0.5) / len(src), s, line) for s, src in enumerate(sources) for k, line in enumerate(src)]
    return [line for _, _, line in sorted(keyed)]


def write_jsonl(path: Path, lines: list[str]) -> None:
    """Write the lines and log the record count and size."""
    path.write_text("".join(lines), encoding="utf-8")
    logging.info("%-20s %6d records  %7.1f kB", path.name, len(lines), path.stat().st_size / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared_dir", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                        help="folder of the staged corpora, with its README.md (default: <repo>/../shared/data)")
    parser.add_argument("--out_dir", type=Path, default=REPO_ROOT / "dataset" / "data",
                        help="where the shipped jsonl files are written (default: <repo>/dataset/data)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.shared_dir / ALPACA_EN).is_file():
        parser.error(f"--shared_dir {args.shared_dir} does not hold {ALPACA_EN}; pass the staged data folder")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    shared = args.shared_dir

    # Pretraining text: train from the sources' train splits, test from their held-out splits only.
    stories, poems = read_lines(shared / TINYSTORIES)[:NUM_STORIES], read_lines(shared / POETRY)[:NUM_POEMS]
    write_jsonl(args.out_dir / "pretrain.jsonl", interleave(stories, poems))
    stories = read_lines(shared / TINYSTORIES_TEST)[:NUM_STORIES_TEST]
    poems = read_lines(shared / POETRY_TEST)[:NUM_POEMS_TEST]
    write_jsonl(args.out_dir / "pretrain_test.jsonl", interleave(stories, poems))

    # SFT: the first short conversations. alpaca_zh translates alpaca_en records 0-21320 in order, so the
    # Chinese test set starts halfway through alpaca_zh (translations of English records near 9000, far past
    # the ~3500 English ones shipped; the very end of alpaca_zh is left untranslated upstream) and the
    # English test set takes the records right after the English train set. No test record is a
    # translation of a training record, and no test prompt equals a training prompt.
    en = short_conversations(read_lines(shared / ALPACA_EN))
    zh = short_conversations(read_lines(shared / ALPACA_ZH))
    train_en, train_zh = en[:NUM_SFT_EN], zh[:NUM_SFT_ZH]
    seen = {user_prompt(line) for line in train_en + train_zh}
    test_en = [line for line in en[NUM_SFT_EN:] if user_prompt(line) not in seen][:NUM_SFT_EN_TEST]
    test_zh = [line for line in zh[len(zh) // 2:] if user_prompt(line) not in seen][:NUM_SFT_ZH_TEST]
    write_jsonl(args.out_dir / "sft.jsonl", interleave(train_en, train_zh))
    write_jsonl(args.out_dir / "sft_test.jsonl", interleave(test_en, test_zh))

    # LoRA: the whole MiniMind identity set. DPO: the first short HH-RLHF harmless pairs, the next ones held out.
    write_jsonl(args.out_dir / "lora_identity.jsonl", read_lines(shared / LORA_IDENTITY))
    pairs = short_pairs(read_lines(shared / HH_HARMLESS))
    write_jsonl(args.out_dir / "dpo.jsonl", pairs[:NUM_DPO])
    write_jsonl(args.out_dir / "dpo_test.jsonl", pairs[NUM_DPO:NUM_DPO + NUM_DPO_TEST])


if __name__ == "__main__":
    main()
