"""X-ray of what the model is fed: one packed pretraining block and one SFT batch, token by token.

    python scripts/xray/batches.py                      # 48-token block of the quick path's held-out stories
    python scripts/xray/batches.py --max_seq_len 96 --block 3 --sft_rows 2

Pretraining (dataset/lm_dataset.py, PretrainDataset): documents are tokenized, each followed by <|endoftext|>,
joined into one stream and cut into blocks of --max_seq_len tokens, so a block holds the end of one document
and the start of the next, and nothing is padded. labels are the input ids themselves: the model shifts them,
so the label printed at position t is the token position t must predict (input t + 1). With --doc_mask 1 the
position ids restart at 0 after every separator and the model builds a block-diagonal causal mask
(model_minimind.build_attention_mask): the matrix printed shows, around the first separator, which keys (columns)
each query (row) may attend to; "#" = attends, "." = masked.

SFT (SFTDataset, dataset/chat_format.py): each conversation goes through the ChatML template; labels are -100
(no loss) on the system/user turns and the template's own tokens, and the token ids on what the assistant writes,
its closing <|im_end|> included. A token that is part of a character's UTF-8 bytes prints as "\ufffd".
A batch is right-padded to its longest sample: padding has input id
<|endoftext|>, label -100 and attention_mask 0.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from dataset.lm_dataset import PretrainDataset, SFTDataset
from model.model_minimind import IGNORE_INDEX, build_attention_mask

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA = REPO_ROOT / "dataset" / "data"
MASK_WINDOW = 6  # tokens shown on each side of the separator in the attention-mask matrix


def show(tokenizer, token_id: int) -> str:
    """One token as readable text: its decoded string with spaces and newlines made visible."""
    return repr(tokenizer.decode([token_id]))[1:-1].replace(" ", "\u2423")


def packed_block(tokenizer, data_path: Path, max_seq_len: int, block: int | None) -> tuple[int, dict]:
    """A block of `data_path` packed as PretrainDataset packs it, with --doc_mask's position ids.

    Args:
        block: its index from 0, or None for the first block in which a new document starts.
    Returns:
        (the block's index, {"input_ids", "labels", "position_ids"}: (max_seq_len,) LongTensors).
    Raises:
        SystemExit: the file has no such block.
    """
    dataset = PretrainDataset(data_path, tokenizer, max_seq_len, doc_mask=True)
    if block is None:
        block = next((i for i in range(len(dataset)) if (dataset[i]["position_ids"][1:] == 0).any()), 0)
    if block >= len(dataset):
        raise SystemExit(f"--block {block}: {data_path} packs into {len(dataset)} blocks of {max_seq_len} tokens; "
                         f"pass --block below {len(dataset)}")
    return block, dataset[block]


def print_block(tokenizer, item: dict[str, torch.Tensor]) -> None:
    input_ids, position_ids = item["input_ids"], item["position_ids"]
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    print(f"{'t':>4} {'input id':>8} {'token':<16} {'label (next token)':<20} {'position id':>11}")
    for t, token_id in enumerate(input_ids.tolist()):
        label = show(tokenizer, int(input_ids[t + 1])) if t + 1 < len(input_ids) else "(next block)"
        marker = "   <- separator: the next document starts" if token_id == separator else ""
        print(f"{t:>4} {token_id:>8} {show(tokenizer, token_id):<16} {label:<20} {int(position_ids[t]):>11}{marker}")
    starts = (position_ids == 0).nonzero().flatten().tolist()
    print(f"\n{len(starts)} document start(s) in the block, at t = {starts}")
    if len(starts) < 2:
        print("no separator inside this block: the mask is the plain causal triangle (try another --block)")
        return
    mask = build_attention_mask(None, position_ids[None], len(input_ids), 0, torch.device("cpu"))[0, 0]
    lo, hi = max(0, starts[1] - MASK_WINDOW), min(len(input_ids), starts[1] + MASK_WINDOW)
    print(f"attention mask with --doc_mask 1, queries (rows) and keys (columns) t = {lo}..{hi - 1}:")
    for query in range(lo, hi):
        row = "".join("#" if mask[query, key] else "." for key in range(lo, hi))
        print(f"{query:>4} {row}  {show(tokenizer, int(input_ids[query]))}")


def print_sft_batch(tokenizer, data_path: Path, max_seq_len: int, rows: int) -> None:
    """The first `rows` conversations of `data_path` collated into one batch, every position printed."""
    dataset = SFTDataset(data_path, tokenizer, max_seq_len)
    order = sorted(range(min(len(dataset), 200)), key=lambda i: dataset.lengths[i])[:rows]  # short ones, to read
    batch = dataset.collate([dataset[i] for i in order])
    width = batch["input_ids"].shape[1]
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    for row in range(len(order)):
        print(f"\nrow {row} (line {order[row] + 1} of {data_path.name}), {int(mask[row].sum())} real tokens of {width}")
        print(f"{'t':>4} {'input id':>8} {'token':<16} {'label':>7} {'attention_mask':>14}")
        for t in range(width):
            token_id, label = int(batch["input_ids"][row, t]), int(batch["labels"][row, t])
            shown = "-100" if label == IGNORE_INDEX else str(label)
            print(f"{t:>4} {token_id:>8} {show(tokenizer, token_id):<16} {shown:>7} {int(mask[row, t]):>14}")
        learned = [int(i) for i in batch["labels"][row] if i != IGNORE_INDEX]
        print(f"loss on {len(learned)} tokens: {tokenizer.decode(learned)!r}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain_data", type=Path, default=DATA / "pretrain_quick_test.jsonl",
                        help="pretraining jsonl to pack (default: dataset/data/pretrain_quick_test.jsonl)")
    parser.add_argument("--sft_data", type=Path, default=DATA / "sft_stories.jsonl",
                        help="SFT jsonl to batch, its shortest conversations among the first 200 (default: "
                             "dataset/data/sft_stories.jsonl)")
    parser.add_argument("--max_seq_len", type=int, default=48, help="block length in tokens (default: 48)")
    parser.add_argument("--block", type=int, default=None,
                        help="which block of the packed file to print, from 0 (default: the first block in which "
                             "a new document starts)")
    parser.add_argument("--sft_rows", type=int, default=2, help="conversations in the SFT batch (default: 2)")
    parser.add_argument("--tokenizer_path", default=str(REPO_ROOT / "model" / "tokenizer"),
                        help="tokenizer directory (default: model/tokenizer)")
    args = parser.parse_args(argv)
    if args.max_seq_len < 2 or (args.block or 0) < 0 or args.sft_rows < 1:
        parser.error("need --max_seq_len >= 2, --block >= 0 and --sft_rows >= 1")
    for flag in ("pretrain_data", "sft_data"):
        if not getattr(args, flag).is_file():
            parser.error(f"--{flag} {getattr(args, flag)}: no such file")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    block, item = packed_block(tokenizer, args.pretrain_data, args.max_seq_len, args.block)
    print(f"== one packed pretraining block: block {block} of {args.pretrain_data.name}, "
          f"{args.max_seq_len} tokens, --doc_mask 1 ==")
    print_block(tokenizer, item)
    print(f"\n== one SFT batch: {args.sft_rows} conversations of {args.sft_data.name}, right-padded ==")
    print_sft_batch(tokenizer, args.sft_data, 512, args.sft_rows)


if __name__ == "__main__":
    main()
