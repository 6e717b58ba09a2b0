"""Regenerate the small default datasets shipped in dataset/data/ from the staged public corpora.

Every subset is deterministic: the first N records of a source file (no sampling), so running this script
twice gives byte-identical files. The default files' lines are copied verbatim from the sources; the quick
path's files (pretrain_quick_*, heldout_book, sft_stories*) are cut from raw text by the rules of
dataset/quick_corpus.py. Provenance and licenses of every source are in dataset/data/ATTRIBUTION.md.

    python dataset/make_shipped_data.py                      # reads <repo>/../shared/data
    python dataset/make_shipped_data.py --shared_dir /path/to/data --out_dir /tmp/data
"""

import argparse
import gzip
import json
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path

from dataset.quick_corpus import (book_documents, book_paragraphs, casing_table, opens_on_subject, proper_names,
                                  recover_stories, repair_text, story_request, story_subject, truecase)

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
# The quick path's sources (raw text).
TINYSTORIES_CASED = ["pretrain/tinystories_original_case/tinystories_train_head.txt",  # one newline ends a story
                     "pretrain/tinystories_original_case/tinystories_validation_head.txt"]  # a blank line does
TINYSTORIES_LOWERCASED_RAW = "pretrain/tinystories/tinystories_lowercased_train_head.txt.gz"
# (file, the line the text starts at (its last occurrence: the earlier ones are in the contents), the line it
# ends before (None: the Project Gutenberg end marker)); the matter outside is title pages, notes, biography
BOOKS = [("pretrain/childrens_literature/grimms_fairy_tales.txt", "THE GOLDEN BIRD", "*****"),
         ("pretrain/childrens_literature/wonderful_wizard_of_oz.txt", "Chapter I", None),
         ("pretrain/childrens_literature/boys_of_columbia_high.txt", "CHAPTER I", "THE END")]
GUTENBERG_RAW = "pretrain/gutenberg_en/gutenberg_en_raw.tar.gz"
HELDOUT_BOOK = ("alice_in_wonderland.txt", "CHAPTER I.", "THE END")  # in no training file

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
TEST_EVERY = 50  # the quick path's held-out split: document index % 50 == 49, as in the staged corpora
BOOK_DOCUMENT_CHARS = 1500
# An SFT story: 60 words or more (a reply of >= 50 words is the target) and at most 720 characters (about 195
# tokens, so request, story and chat template fit --max_seq_len 256).
MIN_STORY_WORDS, MAX_STORY_CHARS = 60, 720
# At most this many SFT stories a subject, in corpus order. Without a cap girls and boys were 51% of the requests
# and a model fine-tuned for 500 steps answered every request, cat or dog, with "a little boy named Tim".
STORIES_PER_SUBJECT = 40
IDENTITY_COPIES = 2  # each English identity conversation, in 3 spellings of its prompt, twice: ~20% of the set
NUM_POEMS_SFT, NUM_POEMS_SFT_TEST = 50, 10
# a quatrain: title, author, then two couplets of 5 or 7 characters a verse
QUATRAIN = re.compile(r"[^\n]+\n[^\n]+\n(?:[\u4e00-\u9fff]{5}，[\u4e00-\u9fff]{5}。\n?){2}|"
                      r"[^\n]+\n[^\n]+\n(?:[\u4e00-\u9fff]{7}，[\u4e00-\u9fff]{7}。\n?){2}")
POEM_REQUESTS = ("写一首诗。", "请写一首唐诗。", "背一首唐诗给我听。")


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


def text_lines(documents: list[str]) -> list[str]:
    """Documents as pretraining jsonl lines, {"text": ...}."""
    return [json.dumps({"text": document}, ensure_ascii=False) + "\n" for document in documents]


def conversation_line(user: str, assistant: str) -> str:
    """One single-turn SFT jsonl line."""
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return json.dumps({"conversations": messages}, ensure_ascii=False) + "\n"


def split_test(documents: list[str]) -> tuple[list[str], list[str]]:
    """(train, test): the documents numbered in order, every TEST_EVERY-th (index % 50 == 49) held out."""
    held_out = [index % TEST_EVERY == TEST_EVERY - 1 for index in range(len(documents))]
    return ([d for d, out in zip(documents, held_out) if not out], [d for d, out in zip(documents, held_out) if out])


def normalized(text: str) -> str:
    """Lower case, runs of whitespace as one space: the same story in two casings compares equal."""
    return " ".join(text.lower().split())


def quick_pretraining(shared: Path) -> dict[str, list[str]]:
    """The quick path's documents, by source: original-case stories (boundaries recovered), the children's
    books, the true-cased lower-cased stories that are not copies of original-case ones, the held-out book."""
    heads = [repair_text((shared / path).read_text(encoding="utf-8")) for path in TINYSTORIES_CASED]
    names = proper_names(heads)
    per_head = [recover_stories(head, names, newline_separates)
                for head, newline_separates in zip(heads, (True, False))]
    stories = per_head[0] + per_head[1]
    stories_train, stories_test = split_test(stories)

    # The lower-cased file is the first ~5.5k stories of the same TinyStories split as the train head: true-case
    # it with a table learned from the training stories only, recover its stories with the train head's rule, and
    # drop every story that shares a line with an original-case one (train or held-out) or keeps mojibake.
    cased_lines = {normalized(line) for head in heads for line in head.split("\n") if line.strip()}
    with gzip.open(shared / TINYSTORIES_LOWERCASED_RAW, "rt", encoding="utf-8") as f:
        lowercased = truecase(repair_text(f.read()), casing_table(stories_train))
    truecased = [story for story in recover_stories(lowercased, names, newline_separates=True)
                 if story.isascii() and not any(normalized(line) in cased_lines for line in story.split("\n"))]
    truecased_train, truecased_test = split_test(truecased)  # the test part only for the SFT test file

    books = [document for path, first_line, last_line in BOOKS
             for document in book_documents(book_paragraphs((shared / path).read_text(encoding="utf-8-sig"),
                                                            first_line, last_line), BOOK_DOCUMENT_CHARS)]
    books_train, books_test = split_test(books)
    name, first_line, last_line = HELDOUT_BOOK
    with tarfile.open(shared / GUTENBERG_RAW) as tar:
        raw = tar.extractfile(name).read().decode("utf-8-sig")
    heldout = book_documents(book_paragraphs(raw, first_line, last_line), BOOK_DOCUMENT_CHARS)
    logging.info("stories: %d recovered (%d + %d), %d held out; lower-cased stories kept and true-cased: %d; "
                 "book documents: %d, %d held out; held-out book: %d documents", len(stories),
                 *map(len, per_head), len(stories_test), len(truecased), len(books), len(books_test), len(heldout))
    return dict(stories_train=stories_train, stories_test=stories_test, books_train=books_train,
                books_test=books_test, truecased_train=truecased_train, truecased_test=truecased_test,
                heldout=heldout)


def story_conversations(stories: list[str]) -> list[str]:
    """SFT lines: a request for a story about its subject (story_subject), answered by the story, for the
    stories of MIN_STORY_WORDS words to MAX_STORY_CHARS characters whose first sentence names that subject
    (opens_on_subject), the first STORIES_PER_SUBJECT of each subject; phrasings in turn."""
    lines, per_subject = [], Counter()
    for story in stories:
        subject = story_subject(story)
        if (subject and len(story.split()) >= MIN_STORY_WORDS and len(story) <= MAX_STORY_CHARS
                and opens_on_subject(story, subject[0]) and per_subject[subject[0]] < STORIES_PER_SUBJECT):
            per_subject[subject[0]] += 1
            lines.append(conversation_line(story_request(*subject, len(lines)), story))
    return lines


def identity_conversations(lines: list[str]) -> list[str]:
    """The MiniMind identity set: each English conversation with its prompt as written, lower-cased and without
    its final punctuation, IDENTITY_COPIES times; each Chinese one once. Replies verbatim."""
    english, chinese = [], []
    for line in lines:
        prompt, reply = (m["content"] for m in json.loads(line)["conversations"])
        if prompt.isascii():
            spellings = dict.fromkeys([prompt, prompt.lower(), prompt.rstrip("?.!")])
            english += [conversation_line(spelling, reply) for spelling in spellings]
        else:
            chinese.append(line)
    return english * IDENTITY_COPIES + chinese


def poem_conversations(lines: list[str], count: int) -> list[str]:
    """SFT lines: a request for a poem (POEM_REQUESTS in turn) answered by one of the first `count` quatrains
    (title, author, two couplets of 5 or 7 characters a verse) of a chinese-poetry file."""
    poems = [json.loads(line)["text"] for line in lines]
    poems = [poem for poem in poems if QUATRAIN.fullmatch(poem)][:count]
    return [conversation_line(POEM_REQUESTS[index % len(POEM_REQUESTS)], poem) for index, poem in enumerate(poems)]


def write_quick_path(shared: Path, out_dir: Path) -> None:
    """The quick path's files: three candidate pretraining mixes, their held-out split, the held-out book, and
    the SFT set of story requests, identity and poems with its held-out file."""
    docs = quick_pretraining(shared)
    stories, books, truecased = docs["stories_train"], docs["books_train"], docs["truecased_train"]
    write_jsonl(out_dir / "pretrain_quick_stories.jsonl", text_lines(stories))
    write_jsonl(out_dir / "pretrain_quick_stories_books.jsonl", text_lines(interleave(stories, books)))
    write_jsonl(out_dir / "pretrain_quick_stories_books_truecased.jsonl",
                text_lines(interleave(stories, books, truecased)))
    write_jsonl(out_dir / "pretrain_quick_test.jsonl", text_lines(interleave(docs["stories_test"], docs["books_test"])))
    write_jsonl(out_dir / "heldout_book.jsonl", text_lines(docs["heldout"]))

    # SFT stories come from the pretraining train split (the true-cased ones too: 4x the cats and dogs), the
    # test file's from the held-out splits only.
    story_sft = story_conversations(interleave(stories, truecased))
    identity = identity_conversations(read_lines(shared / LORA_IDENTITY))
    poems = poem_conversations(read_lines(shared / POETRY), NUM_POEMS_SFT)
    write_jsonl(out_dir / "sft_stories.jsonl", interleave(story_sft, identity, poems))
    poems_test = poem_conversations(read_lines(shared / POETRY_TEST), NUM_POEMS_SFT_TEST)
    story_sft_test = story_conversations(interleave(docs["stories_test"], docs["truecased_test"]))
    write_jsonl(out_dir / "sft_stories_test.jsonl", interleave(story_sft_test, poems_test))


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

    write_quick_path(shared, args.out_dir)


if __name__ == "__main__":
    main()
