"""Greedy replies of a chat checkpoint to a few prompts, each checked against the quick path's targets.

    python eval/check_replies.py --model_path out/full_sft_256
    python eval/check_replies.py --model_path out/full_sft_256 --prompt "Tell me a story about a frog." --json

For every prompt the model answers greedily (temperature 0, repetition penalty 1.0: what chat prints with those
settings), and the script prints the reply and its figures. Words are the lower-cased alphabetic tokens of a
text ("Tom's cat." -> tom, s, cat).

    words             how many words the reply has
    corpus words      the share of them that are words of the training corpus (--corpus)
    mentions          a story request ("... a story about a cat."): whether the reply names the subject (cat, cats)
    max 4-gram        the most times any sequence of 4 words occurs in the reply

A story request PASSES with at least 50 words, at least 95% corpus words, the subject mentioned and no 4-gram three
times; an identity question ("Who are you?") when the reply names the model as the identity set does (MiniMind);
any other prompt on the corpus words and the 4-grams alone. These are the targets of the quick-path recipe,
figures of a trained model rather than tests: the script exits 0 whatever the verdicts.
"""

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from dataset.lm_dataset import DataFormatError, read_jsonl
from dataset.quick_corpus import PLURALS
from eval.eval_ppl import evaluate_file
from model.loading import load_checkpoint
from scripts.generation import ReplyStream, prompt_ids

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = ["Write a short story about a cat.", "Write a short story about a dog.", "Who are you?"]
DEFAULT_CORPUS = REPO_ROOT / "dataset" / "data" / "pretrain_quick_stories_books_truecased.jsonl"
# --pretrain_path is scored on the quick path's held-out split and on a book in no training file
HELD_OUT = [REPO_ROOT / "dataset" / "data" / "pretrain_quick_test.jsonl", REPO_ROOT / "dataset" / "data" /
            "heldout_book.jsonl"]
MIN_WORDS = 50
MIN_CORPUS_SHARE = 0.95
NGRAM = 4
MAX_NGRAM_COUNT = 2  # "repeats no 4-word sequence three times"
# The identity set (dataset/data/lora_identity.jsonl) answers "I am MiniMind, an AI assistant developed by ..."
IDENTITY_NAME = "minimind"
IDENTITY_QUESTION = re.compile(r"\bwho are you\b|\byour name\b|\byourself\b|你是谁|你叫什么|名字",
                               re.IGNORECASE)
STORY_REQUEST = re.compile(r"\bstory about (?:(?:a|an|the|some)\s+)?([a-z]+)", re.IGNORECASE)


def reply_words(text: str) -> list[str]:
    """The lower-cased alphabetic tokens of a text: "Tom's cat sat." -> ["tom", "s", "cat", "sat"]."""
    return re.findall(r"[a-z]+", text.lower())


def corpus_share(words: list[str], vocabulary: set[str]) -> float:
    """The fraction of `words` that are in `vocabulary` (0.0 for no words)."""
    return sum(word in vocabulary for word in words) / len(words) if words else 0.0


def max_ngram_count(words: list[str], n: int = NGRAM) -> int:
    """The most times any sequence of `n` consecutive words occurs (overlaps counted); 0 for fewer than n words."""
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return max(counts.values(), default=0)


def requested_subject(prompt: str) -> str | None:
    """The subject of a story request ("Write a short story about a cat." -> "cat"), else None."""
    match = STORY_REQUEST.search(prompt)
    return match.group(1).lower() if match else None


def mentions(words: list[str], subject: str) -> bool:
    """Whether the words name `subject`, in the singular or a plural (-s, -es, y -> -ies, or irregular: mice)."""
    forms = {subject, subject + "s", subject + "es", subject[:-1] + "ies" if subject.endswith("y") else subject}
    return any(word in forms or PLURALS.get(word) == subject for word in words)


def judge(prompt: str, reply: str, vocabulary: set[str]) -> dict:
    """The figures of one reply and its verdict.

    Returns:
        {"prompt", "reply", "kind" ("story", "identity" or "other"), "words", "corpus_share", "subject",
        "mentions_subject", "max_4gram_count", "checks": {name: bool}, "passed": bool}; subject and
        mentions_subject are None for a prompt that is not a story request.
    """
    words = reply_words(reply)
    subject = requested_subject(prompt)
    kind = "story" if subject else "identity" if IDENTITY_QUESTION.search(prompt) else "other"
    share, repeats = corpus_share(words, vocabulary), max_ngram_count(words)
    fluent = {f"corpus words >= {MIN_CORPUS_SHARE:.0%}": share >= MIN_CORPUS_SHARE,
              f"no {NGRAM}-gram {MAX_NGRAM_COUNT + 1} times": repeats <= MAX_NGRAM_COUNT}
    if kind == "story":
        checks = {f"words >= {MIN_WORDS}": len(words) >= MIN_WORDS, **fluent,
                  f"mentions {subject}": mentions(words, subject)}
    elif kind == "identity":
        checks = {"names MiniMind": IDENTITY_NAME in reply.lower()}
    else:
        checks = fluent
    return {"prompt": prompt, "reply": reply, "kind": kind, "words": len(words), "corpus_share": share,
            "subject": subject, "mentions_subject": mentions(words, subject) if subject else None,
            "max_4gram_count": repeats, "checks": checks, "passed": all(checks.values())}


def corpus_vocabulary(paths: list[Path]) -> set[str]:
    """The words (reply_words) of jsonl files: pretraining {"text"} records and SFT conversations.

    Raises:
        DataFormatError naming the file (and line) of a missing or unreadable file.
    """
    vocabulary = set()
    for path in paths:
        for record in read_jsonl(path, check_record=lambda record: None):
            if isinstance(record.get("text"), str):
                vocabulary.update(reply_words(record["text"]))
            for message in record.get("conversations") or []:
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    vocabulary.update(reply_words(message["content"]))
    return vocabulary


def greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's reply to one user message, greedy, by the path chat uses (scripts/generation.py)."""
    ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    reply = ReplyStream(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    return reply.complete().content


def print_verdict(result: dict) -> None:
    subject = ""
    if result["subject"]:
        subject = f" | mentions {result['subject']}: {'yes' if result['mentions_subject'] else 'no'}"
    failed = [name for name, ok in result["checks"].items() if not ok]
    print(f"> {result['prompt']}\n{result['reply']}")
    print(f"[{result['words']} words | corpus words {result['corpus_share']:.1%}{subject} | "
          f"max {NGRAM}-gram count {result['max_4gram_count']} | "
          f"{'PASS' if result['passed'] else 'FAIL: ' + ', '.join(failed)}]\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=str(REPO_ROOT / "out" / "full_sft_256"),
                        help="checkpoint directory of a chat (SFT) model, or a LoRA adapter directory "
                             "(default: out/full_sft_256)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a user message to answer; repeat the flag for several (default: "
                             + "; ".join(DEFAULT_PROMPTS) + ")")
    parser.add_argument("--corpus", action="append", default=None,
                        help="jsonl file(s) whose words count as corpus words, pretraining or SFT format; repeat the "
                             f"flag or separate by commas (default: {DEFAULT_CORPUS.relative_to(REPO_ROOT)})")
    parser.add_argument("--max_new_tokens", type=int, default=300,
                        help="tokens generated at most per reply (default: 300)")
    parser.add_argument("--pretrain_path", default=None,
                        help="also score this pretrained checkpoint in bits per byte (eval/eval_ppl.py: 256-token "
                             "windows, stride 128) on " + " and ".join(p.name for p in HELD_OUT)
                             + " (default: none)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object instead")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    corpus = [Path(p) for value in (args.corpus or [str(DEFAULT_CORPUS)]) for p in value.split(",") if p]
    try:
        vocabulary = corpus_vocabulary(corpus)
    except DataFormatError as error:
        raise SystemExit(f"error: --corpus {error}") from None
    model, tokenizer = load_checkpoint(args.model_path, args.device)
    results = [judge(prompt, greedy_reply(model, tokenizer, prompt, args.max_new_tokens), vocabulary)
               for prompt in (args.prompt or DEFAULT_PROMPTS)]
    summary = {"model_path": args.model_path, "corpus": [str(p) for p in corpus], "replies": results,
               "passed": sum(r["passed"] for r in results), "total": len(results)}
    if args.pretrain_path:
        pretrained, tokenizer = load_checkpoint(args.pretrain_path, args.device)
        summary["held_out_bits_per_byte"] = {
            path.name: evaluate_file(pretrained, tokenizer, path, 256, 128, progress=False)["bits_per_byte"]
            for path in HELD_OUT}
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
        return summary
    for result in results:
        print_verdict(result)
    print(f"{summary['passed']}/{summary['total']} replies pass")
    for name, bpb in summary.get("held_out_bits_per_byte", {}).items():
        print(f"{args.pretrain_path} on {name}: {bpb:.3f} bits per byte")
    return summary


if __name__ == "__main__":
    main()
