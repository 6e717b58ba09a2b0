"""Regenerate the small benchmark slices shipped in eval/data/ from the staged public eval sets.

Every slice is deterministic: the first N records of a source file, or the first N of every subject in file
order (no sampling), so running this script twice gives byte-identical files. Lines are copied verbatim from
the sources; nothing is rewritten. Provenance, licenses and sha256 of every slice are in eval/data/ATTRIBUTION.md.

    python eval/make_eval_data.py                       # reads <repo>/../shared/data
    python eval/make_eval_data.py --shared_dir /path/to/data --out_dir /tmp/eval_data
"""

import argparse
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# (shipped file, source file relative to --shared_dir, how many records: ("head", N) the first N lines, or
# ("per_subject", N) the first N lines of every subject). Few-shot files are shipped whole per subject (5 each).
SLICES = [
    ("mmlu_dev.jsonl", "eval/mmlu/mmlu_dev.jsonl", ("head", None)),  # all 285 = 5 per subject, for few-shot
    ("mmlu_test.jsonl", "eval/mmlu/mmlu_test.jsonl", ("per_subject", 10)),
    ("arc_easy_train.jsonl", "eval/arc/arc_easy_train.jsonl", ("head", 25)),
    ("arc_easy_dev.jsonl", "eval/arc/arc_easy_dev.jsonl", ("head", 200)),
    ("arc_challenge_train.jsonl", "eval/arc/arc_challenge_train.jsonl", ("head", 25)),
    ("arc_challenge_dev.jsonl", "eval/arc/arc_challenge_dev.jsonl", ("head", 200)),
    ("ceval_dev.jsonl", "eval/ceval/ceval_dev.jsonl", ("head", None)),  # all 260 = 5 per subject
    ("ceval_val.jsonl", "eval/ceval/ceval_val.jsonl", ("per_subject", 4)),
    ("cmmlu_dev.jsonl", "eval/cmmlu/cmmlu_dev.jsonl", ("head", None)),  # all 335 = 5 per subject
    ("cmmlu_test.jsonl", "eval/cmmlu/cmmlu_test.jsonl", ("per_subject", 3)),
    ("truthfulqa_mc.jsonl", "eval/truthfulqa/truthfulqa_mc.jsonl", ("head", 200)),
    ("gsm8k_train.jsonl", "eval/gsm8k/gsm8k_train.jsonl", ("head", 20)),
    ("gsm8k_test.jsonl", "eval/gsm8k/gsm8k_test.jsonl", ("head", 100)),
]


def read_lines(path: Path) -> list[str]:
    """All non-blank lines of a jsonl file, newline included, in file order."""
    with open(path, encoding="utf-8") as f:
        return [line for line in f if line.strip()]


def first_per_subject(lines: list[str], n: int) -> list[str]:
    """The first n lines of every "subject", in file order (subjects stay in the order they appear)."""
    taken = Counter()
    kept = []
    for line in lines:
        subject = json.loads(line)["subject"]
        if taken[subject] < n:
            taken[subject] += 1
            kept.append(line)
    return kept


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared_dir", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                        help="folder of the staged corpora, with its README.md (default: <repo>/../shared/data)")
    parser.add_argument("--out_dir", type=Path, default=REPO_ROOT / "eval" / "data",
                        help="where the shipped slices are written (default: <repo>/eval/data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    missing = [source for _, source, _ in SLICES if not (args.shared_dir / source).is_file()]
    if missing:
        parser.error(f"--shared_dir {args.shared_dir} does not hold {missing[0]}; pass the staged data folder")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, source, (rule, n) in SLICES:
        lines = read_lines(args.shared_dir / source)
        lines = first_per_subject(lines, n) if rule == "per_subject" else lines[:n]
        path = args.out_dir / name
        path.write_text("".join(lines), encoding="utf-8")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        logging.info("%-26s %5d records  %6.1f kB  %s", name, len(lines), path.stat().st_size / 1000, digest)


if __name__ == "__main__":
    main()
