"""Regenerate the GSM8K-derived files in dataset/data/grpo/ from the staged GSM8K copy.

    gsm8k_train.jsonl          GRPO prompts {"id", "prompt", "answer"}: train records 0-399
    gsm8k_test.jsonl           held-out prompts, the same form: test records 0-99 (eval/data/gsm8k_test.jsonl's)
    gsm8k_reasoning_sft.jsonl  SFT conversations {"id", "conversations"}: train records 400-599, the reference
                               solution as the assistant's reasoning_content and the final number as its content

The prompt is the GSM8K question in the zero-shot form that eval/eval_bench.py uses for GSM8K ("Question:
<q>\\nAnswer:", dataset/qa_format.py's build_prompt), so accuracy measured there with --chat_template 1 is
accuracy on the prompts GRPO trains on; the answer is the final number of the reference solution (after "####").
The reasoning file is the "cold start" of DeepSeek-R1 (DeepSeek-AI 2025, section 2.3.1): a few replies in the
<think> format, so that a model that has never written one can be rewarded for it. Records are taken in file order
(no sampling): running this twice gives identical files.

    python dataset/data/grpo/make_grpo_data.py                      # reads <repo>/../shared/data
    python dataset/data/grpo/make_grpo_data.py --shared_dir /path/to/data --out_dir /tmp/grpo
"""

import argparse
import json
import re
from pathlib import Path

from dataset.qa_format import build_prompt

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]

CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")  # GSM8K's "<<48/2=24>>" calculator calls, not meant to be read


def to_prompt_record(record: dict) -> dict:
    """A staged GSM8K record {"id", "question", "answer", "solution"} -> a GRPO prompt {"id", "prompt", "answer"}."""
    return {"id": record["id"], "prompt": build_prompt([], record["question"]), "answer": record["answer"]}


def to_reasoning_record(record: dict) -> dict:
    """A staged GSM8K record -> an SFT conversation whose reply reasons (the solution, without its "#### answer"
    line and calculator annotations) and then answers (the final number)."""
    reasoning = CALCULATOR_ANNOTATION.sub("", record["solution"].rsplit("####", 1)[0]).strip()
    return {"id": record["id"], "conversations": [
        {"role": "user", "content": build_prompt([], record["question"])},
        {"role": "assistant", "content": record["answer"], "reasoning_content": reasoning}]}


# (shipped file, source file relative to --shared_dir, first and last record + 1, conversion)
SLICES = [
    ("gsm8k_train.jsonl", "eval/gsm8k/gsm8k_train.jsonl", (0, 400), to_prompt_record),
    ("gsm8k_test.jsonl", "eval/gsm8k/gsm8k_test.jsonl", (0, 100), to_prompt_record),
    ("gsm8k_reasoning_sft.jsonl", "eval/gsm8k/gsm8k_train.jsonl", (400, 600), to_reasoning_record),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared_dir", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="the staged public data (default: %(default)s)")
    parser.add_argument("--out_dir", default=str(HERE), help="where the files go (default: %(default)s)")
    args = parser.parse_args(argv)
    for name, source, (start, stop), convert in SLICES:
        with open(Path(args.shared_dir) / source, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()][start:stop]
        out = Path(args.out_dir) / name
        out.write_text("".join(json.dumps(convert(r), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        print(f"{out}: {len(records)} records, {out.stat().st_size / 1000:.1f} kB")


if __name__ == "__main__":
    main()
