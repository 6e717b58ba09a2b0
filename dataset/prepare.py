"""Prepare training data: raw files -> clean jsonl for pretraining, SFT and DPO, and a look at what is in it.

    python dataset/prepare.py convert --data_path book.txt --output book.jsonl             # -> {"text"} documents
    python dataset/prepare.py convert --data_path alpaca.json --output sft.jsonl           # -> {"conversations"}
    python dataset/prepare.py clean --data_path sft.jsonl --output sft_clean.jsonl --keep_languages en,zh
    python dataset/prepare.py mix --data_path a.jsonl --data_path b.jsonl --weights 3 1 --output mix.jsonl
    python dataset/prepare.py split --data_path sft_clean.jsonl --test_fraction 0.05     # -> _train / _test files
    python dataset/prepare.py stats --data_path sft_clean.jsonl --png lengths.png
    python dataset/prepare.py show --data_path sft_clean.jsonl --num_samples 2           # as the model sees them

Each subcommand's --help lists its flags. The formats: dataset/convert.py (raw -> ours), dataset/cleaning.py
(the cleaning steps), dataset/lm_dataset.py (what the stage scripts read). A bad file or record stops with one
line naming the file and line (or record) and what was expected.
"""

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

import datasets
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from dataset.cli import HelpFormatter, fraction, positive_float, positive_int
from dataset.cleaning import CleanConfig, clean_records, corpus_stats, report_dicts, report_table, stats_text
from dataset.convert import FORMATS, TEXT_UNITS, convert_files, count_tokens, read_records, split_key, write_records
from dataset.lm_dataset import DOCUMENT_SEPARATOR, DataFormatError, build_assistant_labels, split_prompt_and_reply
from model.model_minimind import IGNORE_INDEX

REPO_ROOT = Path(__file__).resolve().parents[1]
LOSS_COLOR, NO_LOSS_COLOR, RESET = "\033[1;32m", "\033[2m", "\033[0m"  # bold green / dim / reset (ANSI)
LOSS_OPEN, LOSS_CLOSE = "[[", "]]"  # with --no_color, loss-bearing text is shown [[like this]]


# ----------------------------------------------------------------------------------------------------------
# Mixing


def mix_sources(sizes: list[list[int]], weights: list[float], total: float | None = None,
                seed: int = 0) -> tuple[list[tuple[int, int]], list[dict]]:
    """Choose records from several sources so that each source's share of the total size is its weight.

    Args:
        sizes: for each source, the size of each record (its tokens, or 1 to count records).
        weights: one positive weight per source; shares are weights / sum(weights).
        total: the size of the mixture; None: the largest one in which no record repeats (set by the source
            that runs out first at its share). A source asked for more than it has is repeated: whole passes
            over a shuffled order, then part of one more.
        seed: seed of the record order within each source and of the mixture's order.
    Returns:
        (picks, per_source): picks are (source, record index) pairs in a shuffled order; per_source holds for
        each source the records and size taken and the passes over it (taken / available records).
        A record is taken while it brings the source closer to its budget, so each source's size is within
        half a record of total * share.
    """
    shares = [weight / sum(weights) for weight in weights]
    if total is None:
        total = min(sum(source) / share for source, share in zip(sizes, shares))
    rng = random.Random(seed)
    picks, per_source = [], []
    for source, (source_sizes, share) in enumerate(zip(sizes, shares)):
        budget, taken, order, position, count = total * share, 0, [], 0, 0
        while True:
            if position == len(order):  # a new pass over the source
                order, position = rng.sample(range(len(source_sizes)), len(source_sizes)), 0
            index = order[position]
            if budget - taken < source_sizes[index] / 2:
                break
            picks.append((source, index))
            taken, position, count = taken + source_sizes[index], position + 1, count + 1
        per_source.append({"records": count, "size": taken, "passes": count / len(source_sizes)})
    rng.shuffle(picks)
    for row in per_source:
        row["share"] = row["size"] / max(1, sum(r["size"] for r in per_source))
    return picks, per_source


# ----------------------------------------------------------------------------------------------------------
# Splitting


def hash_fraction(key: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by the key alone: the first 8 bytes of SHA-256(salt + key) / 2^64."""
    return int.from_bytes(hashlib.sha256((salt + key).encode("utf-8")).digest()[:8], "big") / 2 ** 64


def split_records(records: list[dict], test_fraction: float, salt: str = "") -> tuple[list[dict], list[dict]]:
    """Deterministic train/test split: a record is test when hash_fraction(split_key(record)) < test_fraction.

    The side depends on the record's key only (not on its position, the other records or a random seed), so
    re-running on the same or a grown file never moves a test record into training, and records sharing a key
    (the same document, or the same first user message) land on the same side.
    Returns:
        (train, test), each in the input order.
    """
    is_test = [hash_fraction(split_key(record), salt) < test_fraction for record in records]
    return ([r for r, test in zip(records, is_test) if not test], [r for r, test in zip(records, is_test) if test])


# ----------------------------------------------------------------------------------------------------------
# Statistics (counted by dataset/cleaning.py's corpus_stats)


def save_histogram(stats: dict, path: str | Path, title: str) -> None:
    """The token-length histogram as a PNG (matplotlib, no display needed)."""
    figure = Figure(figsize=(8, 4.5), dpi=100)
    axes = figure.subplots()
    edges, counts = stats["histogram"]["edges"], stats["histogram"]["counts"]
    axes.stairs(counts, edges, fill=True)
    axes.set(xlabel="tokens per record", ylabel="records", title=title)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


# ----------------------------------------------------------------------------------------------------------
# Showing samples as the model sees them


def model_view(record: dict, tokenizer) -> list[tuple[str, list[int], list[int]]]:
    """The token sequences a stage dataset builds from a record, with their labels.

    Uses dataset/lm_dataset.py's own code: a document followed by <|endoftext|> (every token predicted),
    build_assistant_labels for a conversation (SFTDataset), split_prompt_and_reply for each side of a DPO pair
    (DPODataset). Returns [(title, input_ids, labels)], labels IGNORE_INDEX where there is no loss.
    """
    if "text" in record:
        ids = (tokenizer(record["text"], add_special_tokens=False)["input_ids"]
               + [tokenizer.convert_tokens_to_ids(DOCUMENT_SEPARATOR)])
        return [("document", ids, ids)]
    if "conversations" in record:
        return [("conversation", *build_assistant_labels(tokenizer, record["conversations"], record.get("tools")))]
    views = []
    for side in ("chosen", "rejected"):
        prompt_ids, reply_ids = split_prompt_and_reply(tokenizer, record[side])
        views.append((side, prompt_ids + reply_ids, [IGNORE_INDEX] * len(prompt_ids) + reply_ids))
    return views


def render_with_loss(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """Decode the tokens, marking the runs that carry loss: green (color) or [[between brackets]]."""
    runs, parts = [], []
    for token, label in zip(input_ids, labels):
        has_loss = label != IGNORE_INDEX
        if not runs or runs[-1][0] != has_loss:
            runs.append((has_loss, []))
        runs[-1][1].append(token)
    for has_loss, tokens in runs:
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        if color:
            parts.append((LOSS_COLOR if has_loss else NO_LOSS_COLOR) + text + RESET)
        else:
            parts.append(LOSS_OPEN + text + LOSS_CLOSE if has_loss else text)
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Subcommands


def load_tokenizer(path: str):
    if not (Path(path) / "tokenizer_config.json").is_file():
        raise SystemExit(f"--tokenizer_path {path}: no tokenizer there (tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(path)


def write_report(path: str | None, content: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"report: {path}")


def run_convert(args) -> None:
    stage, records, skipped = convert_files(args.data_path, args.format, args.text_field, args.text_unit,
                                            bool(args.join_lines))
    write_records(args.output, records)
    left_out = ", ".join(f"{n:,} ({reason})" for reason, n in skipped.items()) or "none"
    print(f"{stage}: wrote {len(records):,} records to {args.output}; left out: {left_out}")


def run_clean(args) -> None:
    stage, records = read_records(args.data_path)
    config = CleanConfig(normalize=args.normalize, mask_pii=bool(args.mask_pii), min_chars=args.min_chars,
                         max_chars=args.max_chars, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                         keep_languages=[code for code in (args.keep_languages or "").split(",") if code],
                         dedup=bool(args.dedup), near_dedup=bool(args.near_dedup),
                         near_dup_threshold=args.near_dup_threshold, num_perm=args.num_perm,
                         shingle_size=args.shingle_size)
    kept, report = clean_records(records, config, load_tokenizer(args.tokenizer_path))
    if not kept:
        raise DataFormatError(f"{args.data_path}: every record was removed; loosen the filters (see the table)\n"
                              + report_table(report))
    write_records(args.output, kept)
    print(report_table(report))
    print(f"{stage}: wrote {len(kept):,} of {len(records):,} records to {args.output}")
    write_report(args.report, {"input": args.data_path, "output": args.output, "stage": stage,
                               "steps": report_dicts(report)})


def run_mix(args) -> None:
    sources = [read_records(path) for path in args.data_path]
    stages = {stage for stage, _ in sources}
    if len(stages) > 1:
        raise DataFormatError(f"{', '.join(args.data_path)}: files of different stages ({', '.join(sorted(stages))}); "
                              "mix files of one stage")
    weights = args.weights or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise SystemExit(f"--weights: {len(weights)} weights for {len(sources)} --data_path files")
    tokenizer = load_tokenizer(args.tokenizer_path) if args.by == "tokens" else None
    sizes = [[count_tokens(r, tokenizer) if tokenizer else 1 for r in records] for _, records in sources]
    picks, per_source = mix_sources(sizes, weights, args.total, args.seed)
    write_records(args.output, [sources[source][1][index] for source, index in picks])
    for path, row in zip(args.data_path, per_source):
        print(f"{path}: {row['records']:,} records, {row['size']:,} {args.by} ({row['share']:.1%}), "
              f"{row['passes']:.2f} passes")
    print(f"{stages.pop()}: wrote {len(picks):,} records to {args.output}")
    write_report(args.report, {"output": args.output, "by": args.by,
                               "sources": [{"path": p, **row} for p, row in zip(args.data_path, per_source)]})


def run_split(args) -> None:
    stage, records = read_records(args.data_path)
    stem = Path(args.data_path).with_suffix("")
    train_path = args.train_output or f"{stem}_train.jsonl"
    test_path = args.test_output or f"{stem}_test.jsonl"
    train, test = split_records(records, args.test_fraction, args.salt or "")
    write_records(train_path, train)
    write_records(test_path, test)
    print(f"{stage}: {len(train):,} train records -> {train_path}, {len(test):,} test records -> {test_path} "
          f"({len(test) / len(records):.1%} test)")


def run_stats(args) -> None:
    stage, records = read_records(args.data_path)
    stats = corpus_stats(records, load_tokenizer(args.tokenizer_path), args.bins)
    print(f"{args.data_path} ({stage})")
    print(stats_text(stats))
    if args.png:
        save_histogram(stats, args.png, f"{Path(args.data_path).name}: tokens per record")
        print(f"histogram: {args.png}")
    write_report(args.report, {"input": args.data_path, "stage": stage, **stats})


def run_show(args) -> None:
    stage, records = read_records(args.data_path)
    tokenizer = load_tokenizer(args.tokenizer_path)
    color = not args.no_color
    legend = "green: with loss" if color else f"{LOSS_OPEN}with loss{LOSS_CLOSE}"
    for index in range(args.start, min(args.start + args.num_samples, len(records))):
        for title, input_ids, labels in model_view(records[index], tokenizer):
            trained = sum(label != IGNORE_INDEX for label in labels)
            print(f"=== record {index + 1} of {len(records)} ({stage}, {title}): {len(input_ids)} tokens, "
                  f"{trained} with loss; {legend}")
            print(render_with_loss(tokenizer, input_ids, labels, color))


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    tokenizer_help = "tokenizer that counts tokens and renders chats"
    default_tokenizer = str(REPO_ROOT / "model" / "tokenizer")

    convert = commands.add_parser("convert", help="raw files -> pretrain / SFT / DPO jsonl",
                                  formatter_class=HelpFormatter)
    convert.add_argument("--data_path", action="append", required=True,
                         help="raw file (.txt .jsonl .json .csv .parquet); repeat for several of one format")
    convert.add_argument("--output", required=True, help="jsonl file to write")
    convert.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                         help="raw format; auto: .txt is text, otherwise from the first record's fields")
    convert.add_argument("--text_field", default="text", help="text format: the column holding the document")
    convert.add_argument("--text_unit", default="paragraph", choices=TEXT_UNITS,
                         help=".txt: a document is a blank-line block (paragraph), a line, or the whole file")
    convert.add_argument("--join_lines", type=int, choices=(0, 1), default=0,
                         help="text format, 1: join the lines of a document with spaces (hard-wrapped books)")
    convert.set_defaults(run=run_convert)

    clean = commands.add_parser("clean", help="normalize, filter, deduplicate", formatter_class=HelpFormatter)
    clean.add_argument("--data_path", required=True, help="jsonl file of one stage")
    clean.add_argument("--output", required=True, help="jsonl file to write")
    clean.add_argument("--report", help="also write the per-step counts to this JSON file")
    clean.add_argument("--normalize", default="NFKC", choices=("NFKC", "NFC", "none"), help="Unicode normalization")
    clean.add_argument("--mask_pii", type=int, choices=(0, 1), default=0, help="1: mask e-mail addresses, phones")
    clean.add_argument("--min_chars", type=int, default=0, help="drop records with fewer characters")
    clean.add_argument("--max_chars", type=int, help="drop records with more characters (default: no limit)")
    clean.add_argument("--min_tokens", type=int, default=0, help="drop records with fewer tokens")
    clean.add_argument("--max_tokens", type=int, help="drop records with more tokens, chat template included "
                                                      "(default: no limit)")
    clean.add_argument("--keep_languages", help="comma-separated ISO 639-1 codes to keep, e.g. en,zh "
                                                            "(default: every language)")
    clean.add_argument("--dedup", type=int, choices=(0, 1), default=1, help="1: drop exact duplicates")
    clean.add_argument("--near_dedup", type=int, choices=(0, 1), default=1, help="1: drop near duplicates")
    clean.add_argument("--near_dup_threshold", type=fraction, default=0.8,
                       help="estimated Jaccard similarity of character n-grams from which a record is a near duplicate")
    clean.add_argument("--num_perm", type=positive_int, default=128, help="MinHash permutations")
    clean.add_argument("--shingle_size", type=positive_int, default=5, help="characters per n-gram (shingle)")
    clean.add_argument("--tokenizer_path", default=default_tokenizer, help=tokenizer_help)
    clean.set_defaults(run=run_clean)

    mix = commands.add_parser("mix", help="mix files of one stage by weight or size", formatter_class=HelpFormatter)
    mix.add_argument("--data_path", action="append", required=True, help="jsonl file; repeat for each source")
    mix.add_argument("--output", required=True, help="jsonl file to write")
    mix.add_argument("--weights", type=positive_float, nargs="+",
                     help="relative share of each source (default: equal)")
    mix.add_argument("--by", default="tokens", choices=("tokens", "records"), help="unit of the shares and of --total")
    mix.add_argument("--total", type=positive_float,
                     help="size of the mixture in --by units; a source short of its share is repeated "
                          "(default: the largest mixture with no repeat)")
    mix.add_argument("--seed", type=int, default=0, help="seed of the choice and order of records")
    mix.add_argument("--report", help="also write the per-source counts to this JSON file")
    mix.add_argument("--tokenizer_path", default=default_tokenizer, help=tokenizer_help)
    mix.set_defaults(run=run_mix)

    split = commands.add_parser("split", help="deterministic train/test split by hash", formatter_class=HelpFormatter)
    split.add_argument("--data_path", required=True, help="jsonl file of one stage")
    split.add_argument("--test_fraction", type=fraction, default=0.02, help="expected share of test records")
    split.add_argument("--salt", help="text prepended to every key before hashing; another salt, another split "
                                      "(default: none)")
    split.add_argument("--train_output", help="default: <data_path without .jsonl>_train.jsonl")
    split.add_argument("--test_output", help="default: <data_path without .jsonl>_test.jsonl")
    split.set_defaults(run=run_split)

    stats = commands.add_parser("stats", help="counts, lengths, languages, duplicates", formatter_class=HelpFormatter)
    stats.add_argument("--data_path", required=True, help="jsonl file of one stage")
    stats.add_argument("--bins", type=positive_int, default=20, help="bins of the token-length histogram")
    stats.add_argument("--png", help="also draw the histogram to this PNG file")
    stats.add_argument("--report", help="also write the statistics to this JSON file")
    stats.add_argument("--tokenizer_path", default=default_tokenizer, help=tokenizer_help)
    stats.set_defaults(run=run_stats)

    show = commands.add_parser("show", help="samples as the model sees them, loss marked",
                               formatter_class=HelpFormatter)
    show.add_argument("--data_path", required=True, help="jsonl file of one stage")
    show.add_argument("--num_samples", "-n", type=positive_int, default=3, help="records to show")
    show.add_argument("--start", type=int, default=0, help="index of the first record shown (0-based)")
    show.add_argument("--no_color", action="store_true", help=f"mark the loss with {LOSS_OPEN} {LOSS_CLOSE} "
                                                              "instead of colour")
    show.add_argument("--tokenizer_path", default=default_tokenizer, help=tokenizer_help)
    show.set_defaults(run=run_show)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run one subcommand; a bad file or record ends with its one-line message and exit status 1."""
    args = build_parser().parse_args(argv)
    datasets.disable_progress_bars()  # the subcommands print their own counts
    try:
        args.run(args)
    except (DataFormatError, FileNotFoundError) as error:
        sys.exit(str(error))


if __name__ == "__main__":
    main()
