"""X-ray of byte-level BPE: the first merges learned by hand on one paragraph, next to the `tokenizers` trainer's.

    python scripts/xray/bpe_merges.py                    # the first 20 merges of a TinyStories paragraph
    python scripts/xray/bpe_merges.py --text "the cat sat on the mat" --num_merges 5
    python scripts/xray/bpe_merges.py --vocab_sizes 512,2048,6400   # + characters per token, English and Chinese

Byte-level BPE (Sennrich et al. 2016; GPT-2, Radford et al. 2019, sec. 2.2) in four steps, all in `learn_merges`:

1. Split the text into words (GPT-2's regex: a word keeps its leading space, " cat") and write each word as
   bytes, one symbol per byte. The 256 byte symbols are the whole starting vocabulary: nothing is unknown.
2. Count every pair of adjacent symbols over all words, each word weighted by how often it occurs.
3. Merge the most frequent pair into one new symbol everywhere (left to right, without overlaps) and give it the
   next id.
4. Repeat from 2 until the vocabulary has the size asked for (trainer/train_tokenizer.py: 6400 tokens).

Ties (two pairs with the same count) go to the pair with the smaller ids, first symbol first, as the trainer of
the `tokenizers` library breaks them (its merge queue orders by count, then by the reversed pair); the ids of
the 256 byte symbols follow their characters' code points after the 9 reserved tokens. With that rule the hand
merges equal the library's, pair for pair: the script prints both side by side and says where they differ.

Byte symbols are shown as GPT-2 writes them: a printable character per byte, so a space is "Ġ" and a newline "Ċ".
"""

import argparse
import json
from collections import Counter
from pathlib import Path

from tokenizers import pre_tokenizers

from dataset.lm_dataset import check_pretrain_record, read_jsonl
from trainer.train_tokenizer import CONTROL_TOKENS, SPECIAL_TOKENS, iter_training_texts, train_bpe

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA = REPO_ROOT / "dataset" / "data"
# The opening of the first story of the quick path's corpus (TinyStories, Eldan & Li 2023; CDLA-Sharing-1.0)
DEFAULT_TEXT_FILE = DATA / "pretrain_quick_stories_books_truecased.jsonl"


def byte_level_words(text: str) -> Counter:
    """The words of `text` as GPT-2's byte-level pre-tokenizer writes them, with their counts.

    Returns:
        Counter {word: count}; a word is a string of byte symbols, one per UTF-8 byte (" cat" -> "Ġcat").
    """
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return Counter(word for word, _ in pre_tokenizer.pre_tokenize_str(text))


def learn_merges(word_counts: Counter, num_merges: int) -> list[tuple[str, str, int]]:
    """BPE training by hand: the first `num_merges` merges of a byte-level vocabulary (the module docstring).

    Args:
        word_counts: {word of byte symbols: count}, from byte_level_words.
        num_merges: how many merges to learn; fewer come back when no pair is left (every word one symbol).
    Returns:
        [(left symbol, right symbol, count of the pair when it was merged)], in the order learned.
    """
    ids = {token: i for i, token in enumerate(SPECIAL_TOKENS + CONTROL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):  # code point order, as the library's trainer
        ids.setdefault(symbol, len(ids))
    words = [(list(word), count) for word, count in word_counts.items()]  # each word as its byte symbols
    merges = []
    while len(merges) < num_merges:
        pair_counts = Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        # the most frequent pair; among equals, the one with the smaller ids
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], ids[pair[0]], ids[pair[1]]))
        merged = best[0] + best[1]
        ids.setdefault(merged, len(ids))
        merges.append((best[0], best[1], pair_counts[best]))
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:  # left to right, so "aaa" merges as "aa" + "a"
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i:i + 2] = [merged]
                i += 1
    return merges


def library_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """The first merges of the `tokenizers` BPE trainer on `text`, with trainer/train_tokenizer.py's settings.

    The vocabulary asked for is 9 reserved tokens + 256 bytes + num_merges, so the trainer learns num_merges
    merges (fewer if it runs out of pairs).
    """
    size = len(SPECIAL_TOKENS + CONTROL_TOKENS) + 256 + num_merges
    model = json.loads(train_bpe(iter([text]), size).to_str())["model"]
    return [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]


def chars_per_token(tokenizer, texts: list[str]) -> float:
    """Characters of `texts` per token of `tokenizer` (a `tokenizers.Tokenizer`): higher = a tighter code."""
    tokens = sum(len(encoding.ids) for encoding in tokenizer.encode_batch(texts))
    return sum(len(text) for text in texts) / tokens


def compression_table(vocab_sizes: list[int]) -> list[dict]:
    """Characters per token on held-out English and Chinese text, for BPE vocabularies trained on the shipped
    pretraining + SFT files (dataset/data/pretrain.jsonl and sft.jsonl, the shipped tokenizer's own data).

    Returns:
        [{"vocab_size", "english", "chinese"}]: English = dataset/data/pretrain_quick_test.jsonl (stories in
        original casing), Chinese = the Tang poems of dataset/data/pretrain_test.jsonl.
    """
    english = [record["text"] for record in read_jsonl(DATA / "pretrain_quick_test.jsonl", check_pretrain_record)]
    held_out = [record["text"] for record in read_jsonl(DATA / "pretrain_test.jsonl", check_pretrain_record)]
    chinese = [text for text in held_out if any("\u4e00" <= char <= "\u9fff" for char in text)]
    rows = []
    for size in vocab_sizes:
        tokenizer = train_bpe(iter_training_texts([DATA / "pretrain.jsonl", DATA / "sft.jsonl"]), size)
        rows.append({"vocab_size": size, "english": chars_per_token(tokenizer, english),
                     "chinese": chars_per_token(tokenizer, chinese)})
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=None,
                        help="the paragraph to learn merges on (default: the first story of "
                             f"{DEFAULT_TEXT_FILE.relative_to(REPO_ROOT)})")
    parser.add_argument("--num_merges", type=int, default=20, help="merges to learn (default: 20)")
    parser.add_argument("--vocab_sizes", default="",
                        help="comma-separated vocabulary sizes for the characters-per-token table, e.g. "
                             "512,1024,2048,6400 (each trains a tokenizer, seconds each; default: no table)")
    args = parser.parse_args(argv)
    if args.num_merges < 1:
        parser.error(f"--num_merges must be at least 1, got {args.num_merges}")
    try:
        args.vocab_sizes = [int(size) for size in args.vocab_sizes.split(",") if size.strip()]
    except ValueError:
        parser.error(f"--vocab_sizes {args.vocab_sizes!r}: expected integers separated by commas, e.g. 512,2048")
    if any(size < 265 for size in args.vocab_sizes):
        parser.error("--vocab_sizes: each size must be at least 265 (9 reserved tokens + 256 bytes)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    text = args.text
    if text is None:
        text = read_jsonl(DEFAULT_TEXT_FILE, check_pretrain_record)[0]["text"].split("\n\n")[0]
    print(f"text ({len(text)} characters, {len(text.encode())} bytes): {text[:200]}{'...' if len(text) > 200 else ''}")
    words = byte_level_words(text)
    print(f"{sum(words.values())} words, {len(words)} distinct; the most frequent: "
          + ", ".join(f"{word!r} x{count}" for word, count in words.most_common(5)) + "\n")

    by_hand = learn_merges(words, args.num_merges)
    library = library_merges(text, args.num_merges)
    print(f"{'#':>3}  {'by hand (count)':<28}{'tokenizers trainer':<24}")
    for i in range(max(len(by_hand), len(library))):
        left = f"{by_hand[i][0]} + {by_hand[i][1]} ({by_hand[i][2]})" if i < len(by_hand) else "-"
        right = f"{library[i][0]} + {library[i][1]}" if i < len(library) else "-"
        same = i < len(by_hand) and i < len(library) and by_hand[i][:2] == library[i]
        print(f"{i + 1:>3}  {left:<28}{right:<24}{'' if same else 'DIFFERENT'}")
    agree = [merge[:2] for merge in by_hand] == library
    print(f"\nthe {len(by_hand)} hand merges {'equal' if agree else 'differ from'} the library's")
    result = {"text": text, "by_hand": by_hand, "library": library, "agree": agree}

    if args.vocab_sizes:
        result["chars_per_token"] = compression_table(args.vocab_sizes)
        print("\ncharacters per token (held out: English stories, Tang poems), tokenizers trained on "
              "dataset/data/pretrain.jsonl + sft.jsonl")
        print(f"{'vocab size':>10}  {'English':>8}  {'Chinese':>8}")
        for row in result["chars_per_token"]:
            print(f"{row['vocab_size']:>10,}  {row['english']:>8.2f}  {row['chinese']:>8.2f}")
    return result


if __name__ == "__main__":
    main()
