"""Perplexity and bits per byte of a checkpoint on a jsonl file: how well the model predicts held-out text.

    python eval/eval_ppl.py --model_path out/pretrain_256 --data_path dataset/data/pretrain_test.jsonl
    python eval/eval_ppl.py --model_path out/full_sft_256 --data_path dataset/data/sft_test.jsonl   # assistant tokens
    python eval/eval_ppl.py --model_path out/pretrain_256 --max_seq_len 256 --stride 128 --output ppl.json

What is scored:
- pretraining files ({"text"}): every token of every document, the first one predicted from <|endoftext|>
  (the separator that precedes a document in training);
- SFT files ({"conversations"}): the assistant's tokens only, with their closing <|im_end|> (what SFT trains).

    mean NLL      = -1/N * sum log p(token | everything before it in its document), in nats per token
    perplexity    = exp(mean NLL)
    bits per byte = -sum log2 p(token | ...) / (UTF-8 bytes of the scored text)

Perplexity depends on the tokenizer (a tokenizer with longer tokens has fewer, harder tokens); bits per byte
does not, so it compares models with different tokenizers (as in the Gopher and Pile papers, Gao et al. 2020).

Documents longer than the context are scored with a sliding window (as in the transformers perplexity guide):
windows of --max_seq_len tokens start every --stride tokens, and each window scores only the tokens the previous
one did not, so every token is scored once with at least max_seq_len - stride tokens of context (when it has
them). --stride equal to --max_seq_len gives disjoint windows (fastest, least context).
"""

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from dataset.lm_dataset import (DOCUMENT_SEPARATOR, DataFormatError, build_assistant_labels, check_pretrain_record,
                                check_sft_record, read_jsonl)
from model.loading import load_checkpoint
from model.model_minimind import IGNORE_INDEX, token_logprobs

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# From records to scored token sequences


def detect_format(path: Path) -> str:
    """"pretrain" or "sft", from the first non-blank line's keys.

    Raises:
        DataFormatError: when the line has neither "text" nor "conversations" (or is not a JSON object).
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise DataFormatError(f"{path}:{line_no}: not a JSON line") from None
                if isinstance(record, dict) and "text" in record:
                    return "pretrain"
                if isinstance(record, dict) and "conversations" in record:
                    return "sft"
                raise DataFormatError(f'{path}:{line_no}: expected a "text" (pretraining) or "conversations" '
                                      "(SFT) record")
    raise DataFormatError(f"{path}: the file is empty; expected one JSON object per line")


def scored_sequences(path: Path, tokenizer, data_format: str) -> list[tuple[list[int], list[int], int]]:
    """Every record as (input_ids, targets, bytes): targets[i] is input_ids[i] where token i is scored, else -100.

    Pretraining: input_ids = [<|endoftext|>] + document tokens; every document token is scored and its bytes
    are the document's UTF-8 bytes. SFT: the chat-template rendering; the assistant tokens are scored and their
    bytes are the UTF-8 bytes of their decoded text (special tokens such as <|im_end|> as written).

    Raises:
        DataFormatError: a bad line (file:line), as the training datasets raise it.
    """
    sequences = []
    if data_format == "pretrain":
        separator = tokenizer.convert_tokens_to_ids(DOCUMENT_SEPARATOR)
        for record in read_jsonl(path, check_pretrain_record):
            ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
            sequences.append(([separator, *ids], [IGNORE_INDEX, *ids], len(record["text"].encode("utf-8"))))
        return sequences
    for record in read_jsonl(path, check_sft_record):
        ids, labels = build_assistant_labels(tokenizer, record["conversations"], record.get("tools"))
        scored = [token for token in labels if token != IGNORE_INDEX]
        num_bytes = sum(len(tokenizer.decode(span).encode("utf-8")) for span in contiguous_spans(labels))
        if scored:
            sequences.append((ids, labels, num_bytes))
    return sequences


def contiguous_spans(labels: list[int]) -> list[list[int]]:
    """The runs of consecutive scored tokens (labels != -100), decoded one run at a time so that a multi-byte
    character split over two tokens is counted once."""
    spans, current = [], []
    for token in labels:
        if token == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(token)
    return spans + ([current] if current else [])


def sliding_windows(input_ids: list[int], targets: list[int], max_seq_len: int, stride: int):
    """Cut one sequence into windows of at most max_seq_len tokens that together score each target once.

    Window k covers input_ids[begin:end] with begin = k * step, end = min(begin + max_seq_len, n) and
    step = min(stride, max_seq_len - 1). Its logits at position j predict token j + 1, so it can score the
    tokens begin + 1 .. end - 1; it scores those from the previous window's end on. Since step < max_seq_len,
    a window begins before the previous one ends: every token from 1 to n - 1 is scored exactly once, with at
    least max_seq_len - step tokens of context once the first window is passed. (Token 0 has nothing before
    it: the <|endoftext|> prefix of a document, <|im_start|> of a conversation.)

    Yields:
        (window_ids, window_targets): lists of equal length <= max_seq_len; targets -100 where not scored here.
    """
    n, step = len(input_ids), min(stride, max_seq_len - 1)
    begin = previous_end = 0
    while previous_end < n:
        end = min(begin + max_seq_len, n)
        first = max(previous_end, begin + 1)  # the first token this window scores
        yield input_ids[begin:end], [IGNORE_INDEX] * (first - begin) + targets[first:end]
        previous_end, begin = end, begin + step


# ----------------------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def negative_log_likelihood(model, sequences, max_seq_len: int, stride: int, batch_size: int = 8,
                            pad_token_id: int = 0, progress: bool = True) -> tuple[float, int]:
    """Summed NLL (nats) of the scored tokens of `sequences` and their number, through sliding windows.

    Args:
        model: a causal LM called as model(input_ids=..., attention_mask=...) returning `.logits`
            (batch, seq, vocab); position t predicts token t + 1.
        sequences: (input_ids, targets, bytes) triples from scored_sequences.
        max_seq_len, stride: window length and step in tokens (sliding_windows); 1 <= stride, 2 <= max_seq_len.
    Returns:
        (sum over scored tokens of -log p(token | context), number of scored tokens)
    """
    windows = [window for ids, targets, _ in sequences for window in sliding_windows(ids, targets, max_seq_len, stride)
               if any(t != IGNORE_INDEX for t in window[1])]
    windows.sort(key=lambda window: len(window[0]))  # similar lengths together: little padding
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="scoring", unit="batch", disable=not progress):
        batch = windows[start:start + batch_size]
        length = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
        targets = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, (ids, window_targets) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            targets[row, :len(ids)] = torch.tensor(window_targets)
            attention_mask[row, :len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        total_nll -= token_logprobs(logits, targets.to(device)).sum().item()
        total_tokens += int((targets[:, 1:] != IGNORE_INDEX).sum())
    return total_nll, total_tokens


def summarize(total_nll: float, num_tokens: int, num_bytes: int) -> dict:
    """Mean NLL per token (nats), perplexity, and bits per byte from the totals:

        mean_nll = total_nll / num_tokens,    perplexity = exp(mean_nll),
        bits_per_byte = total_nll / ln 2 / num_bytes    (bits per UTF-8 byte: comparable across tokenizers)

    Raises:
        ValueError: when nothing was scored.
    """
    if num_tokens == 0 or num_bytes == 0:
        raise ValueError("no token was scored")
    mean_nll = total_nll / num_tokens
    return {"tokens": num_tokens, "bytes": num_bytes, "mean_nll": mean_nll, "perplexity": math.exp(mean_nll),
            "bits_per_byte": total_nll / math.log(2) / num_bytes, "bytes_per_token": num_bytes / num_tokens}


def evaluate_file(model, tokenizer, data_path: Path, max_seq_len: int, stride: int, batch_size: int = 8,
                  limit: int | None = None, progress: bool = True) -> dict:
    """Perplexity and bits per byte of `model` on a pretraining or SFT jsonl file (see the module docstring).

    Returns:
        {"format", "records", "tokens", "bytes", "mean_nll", "perplexity", "bits_per_byte", "bytes_per_token"}
    Raises:
        DataFormatError: a bad line (file:line); ValueError: nothing to score.
    """
    data_format = detect_format(data_path)
    sequences = scored_sequences(data_path, tokenizer, data_format)[:limit]
    total_nll, num_tokens = negative_log_likelihood(model, sequences, max_seq_len, stride, batch_size,
                                                    tokenizer.pad_token_id or 0, progress)
    return {"format": data_format, "records": len(sequences),
            **summarize(total_nll, num_tokens, sum(num_bytes for _, _, num_bytes in sequences))}


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(REPO_ROOT / "out" / "pretrain_256"),
                        help="checkpoint directory (or LoRA adapter directory) (default: %(default)s)")
    parser.add_argument("--data_path", default=str(REPO_ROOT / "dataset" / "data" / "pretrain_test.jsonl"),
                        help="jsonl of {\"text\"} or {\"conversations\"} lines (default: %(default)s)")
    parser.add_argument("--max_seq_len", type=int, default=256,
                        help="window length in tokens; use the length the model was trained at (default: 256)")
    parser.add_argument("--stride", type=int, default=None,
                        help="tokens between window starts (default: max_seq_len // 2)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records (default: all)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.stride = args.stride or max(1, args.max_seq_len // 2)
    if args.max_seq_len < 2 or not 1 <= args.stride <= args.max_seq_len:
        parser.error(f"need --max_seq_len >= 2 and 1 <= --stride <= --max_seq_len, got {args.max_seq_len}, "
                     f"{args.stride}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tokenizer = load_checkpoint(args.model_path, args.device)
    try:
        result = evaluate_file(model, tokenizer, Path(args.data_path), args.max_seq_len, args.stride,
                               args.batch_size, args.limit)
    except DataFormatError as error:
        raise SystemExit(str(error)) from None
    result.update(model_path=args.model_path, data_path=args.data_path, max_seq_len=args.max_seq_len,
                  stride=args.stride)
    print(f"{args.data_path} ({result['format']}, {result['records']} records): {result['tokens']:,} tokens scored, "
          f"{result['bytes']:,} bytes")
    print(f"mean NLL {result['mean_nll']:.4f} nats/token | perplexity {result['perplexity']:.2f} | "
          f"bits per byte {result['bits_per_byte']:.4f}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
