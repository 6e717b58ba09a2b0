"""Regenerate the small raw samples in dataset/data/raw/ from the staged public corpora.

These files are the *inputs* of dataset/prepare.py in the tests and docs/data.md: one file per common raw
format (a plain-text book, Alpaca, ShareGPT, OpenAI messages, two preference formats, CSV, Parquet).
Every record is real and taken in file order by a fixed rule (no sampling), so two runs give identical
files. Where a format is not found in the staged data as such (ShareGPT chats, OpenAI messages, flat
prompt/chosen/rejected pairs), real records are only re-keyed into it, their texts unchanged.
Sources and licenses: ATTRIBUTION.md beside this file.

    python dataset/data/raw/make_raw_samples.py                 # reads <repo>/../shared/data
    python dataset/data/raw/make_raw_samples.py --shared_dir /path/to/data --out_dir /tmp/raw
"""

import argparse
import json
import logging
import tarfile
from pathlib import Path

import datasets
from datasets import Dataset

REPO_ROOT = Path(__file__).resolve().parents[3]

# Source files, relative to --shared_dir.
GUTENBERG = "pretrain/gutenberg_en/gutenberg_en_raw.tar.gz"
ALICE = "alice_in_wonderland.txt"  # member of the Gutenberg tarball
C4 = "pretrain/llamafactory_demo/c4_demo.jsonl"
ALPACA_EN = "sft/llamafactory_demo/alpaca_en_demo.json"
ALPACA_ZH = "sft/llamafactory_demo/alpaca_zh_demo.json"
DPO_EN = "dpo/llamafactory_dpo_demo/dpo_en_demo.json"
DPO_ZH = "dpo/llamafactory_dpo_demo/dpo_zh_demo.json"

NUM_ALPACA_EN = 100           # records 0-99 of alpaca_en_demo
NUM_CSV, NUM_OPENAI = 40, 40  # alpaca_zh_demo records 0-39 as CSV, 40-79 as OpenAI messages
C4_SCAN, C4_MAX_CHARS = 200, 1500  # the C4 documents under 1,500 characters among the first 200
NUM_SHAREGPT, SHAREGPT_MAX_CHARS = 30, 2500  # the first 30 English pairs under 2,500 characters ...
NUM_PREFERENCE, PREFERENCE_MAX_CHARS = 25, 2000  # ... then the next 25 single-turn pairs under 2,000
NUM_DPO_ZH, DPO_ZH_MAX_CHARS = 20, 800  # the first 20 Chinese pairs under 800 characters

SHAREGPT_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaMA-Factory "from" -> OpenAI "role"


def gutenberg_body(text: str) -> str:
    """The book between Project Gutenberg's '*** START OF' and '*** END OF' lines (header and license dropped)."""
    start = text.index("\n", text.index("*** START OF")) + 1
    return text[start:text.index("*** END OF")].replace("\r\n", "\n").strip("\n") + "\n"


def pair_chars(record: dict) -> int:
    """Characters of a LLaMA-Factory preference pair: its prompt turns and both replies."""
    return (sum(len(turn["value"]) for turn in record["conversations"])
            + len(record["chosen"]["value"]) + len(record["rejected"]["value"]))


def alpaca_user_turn(record: dict) -> str:
    """The user's message of an Alpaca record: the instruction, then a blank line and the input if any."""
    return record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared_dir", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                        help="folder of the staged corpora (default: <repo>/../shared/data)")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent,
                        help="where the samples are written (default: this folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    datasets.disable_progress_bars()
    if not (args.shared_dir / ALPACA_EN).is_file():
        parser.error(f"--shared_dir {args.shared_dir} does not hold {ALPACA_EN}; pass the staged data folder")
    shared, out = args.shared_dir, args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    # A raw book: one whole Gutenberg text, header and license footer removed, line ends made "\n".
    with tarfile.open(shared / GUTENBERG) as archive:
        book = archive.extractfile(ALICE).read().decode("utf-8-sig")
    (out / ALICE).write_text(gutenberg_body(book), encoding="utf-8")

    # Web text with real e-mail addresses and phone numbers (for PII masking), as Parquet.
    c4 = [json.loads(line) for line in (shared / C4).read_text(encoding="utf-8").splitlines()[:C4_SCAN]]
    Dataset.from_list([doc for doc in c4 if len(doc["text"]) < C4_MAX_CHARS]).to_parquet(out / "c4_demo.parquet")

    # Alpaca: English as the original .json array, Chinese as CSV and re-keyed as OpenAI messages.
    alpaca_en = json.loads((shared / ALPACA_EN).read_text(encoding="utf-8"))
    write_json(out / "alpaca_en_demo.json", alpaca_en[:NUM_ALPACA_EN])
    alpaca_zh = json.loads((shared / ALPACA_ZH).read_text(encoding="utf-8"))
    Dataset.from_list(alpaca_zh[:NUM_CSV]).to_csv(out / "alpaca_zh_demo.csv", index=False)
    openai = [{"messages": [{"role": "user", "content": alpaca_user_turn(r)},
                            {"role": "assistant", "content": r["output"]}]}
              for r in alpaca_zh[NUM_CSV:NUM_CSV + NUM_OPENAI]]
    Dataset.from_list(openai).to_json(out / "openai_messages_zh.jsonl", lines=True, force_ascii=False)

    # Preference pairs. ShareGPT chats: the prompt turns plus the chosen reply. Flat pairs: single-turn prompts
    # as strings. LLaMA-Factory's own preference format: Chinese records copied as they are.
    pairs_en = json.loads((shared / DPO_EN).read_text(encoding="utf-8"))
    chats = [r for r in pairs_en if pair_chars(r) < SHAREGPT_MAX_CHARS][:NUM_SHAREGPT]
    write_json(out / "sharegpt_en.json", [{"conversations": r["conversations"] + [r["chosen"]]} for r in chats])
    used = {id(r) for r in chats}
    flat = [r for r in pairs_en if id(r) not in used and len(r["conversations"]) == 1
            and r["conversations"][0]["from"] == "human" and pair_chars(r) < PREFERENCE_MAX_CHARS][:NUM_PREFERENCE]
    Dataset.from_list([{"prompt": r["conversations"][0]["value"], "chosen": r["chosen"]["value"],
                        "rejected": r["rejected"]["value"]} for r in flat]).to_json(
        out / "preference_en.jsonl", lines=True, force_ascii=False)
    pairs_zh = json.loads((shared / DPO_ZH).read_text(encoding="utf-8"))
    write_json(out / "dpo_zh_demo.json", [r for r in pairs_zh if pair_chars(r) < DPO_ZH_MAX_CHARS][:NUM_DPO_ZH])

    for path in sorted(out.iterdir()):
        if path.suffix != ".py" and path.name != "ATTRIBUTION.md":
            logging.info("%-26s %7.1f kB", path.name, path.stat().st_size / 1000)


if __name__ == "__main__":
    main()
