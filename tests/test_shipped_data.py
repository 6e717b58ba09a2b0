"""dataset/quick_corpus.py's text rules on hand-written texts, and the quick path's shipped files: valid, held-out
text in no training file, SFT samples that fit the default context and name their subject; rebuilt byte for byte
by dataset/make_shipped_data.py when the staged corpora are here."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from dataset.lm_dataset import check_pretrain_record, check_sft_record, read_jsonl
from dataset.make_shipped_data import IDENTITY_COPIES, MAX_STORY_CHARS, MIN_STORY_WORDS, STORIES_PER_SUBJECT
from dataset.make_shipped_data import main as make_shipped_data
from dataset.quick_corpus import (book_documents, book_paragraphs, casing_table, heading_case, opens_on_subject,
                                  proper_names, recover_stories, repair_text, story_request, story_subject, truecase)
from eval.check_replies import mentions, reply_words, requested_subject

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "dataset" / "data"
SHARED = REPO_ROOT.parent / "shared" / "data"
MIXES = ["pretrain_quick_stories", "pretrain_quick_stories_books", "pretrain_quick_stories_books_truecased"]
HELD_OUT = ["pretrain_quick_test", "heldout_book"]


def texts(name: str) -> list[str]:
    return [record["text"] for record in read_jsonl(DATA / f"{name}.jsonl", check_pretrain_record)]


def conversations(name: str) -> list[list[dict]]:
    return [record["conversations"] for record in read_jsonl(DATA / f"{name}.jsonl", check_sft_record)]


def paragraphs(documents: list[str]) -> set[str]:
    """Lower-cased, whitespace-normalized paragraphs of 60 characters or more (shorter ones recur: "The end.", a
    tale's refrain "Rapunzel, Rapunzel, let down your hair to me.")."""
    found = (" ".join(p.lower().split()) for document in documents for p in re.split(r"\n+", document))
    return {p for p in found if len(p) >= 60}


def test_repair_text_undoes_mojibake_and_typography():
    assert (repair_text('She said, â€œHi!â€\nHe didnâ€™t â€“ he ranâ€¦')
            == 'She said, "Hi!"\nHe didn\'t - he ran...')
    assert repair_text("“Yes,” said Alice—‘no’.") == "\"Yes,\" said Alice - 'no'."


def test_proper_names_are_words_capitalized_inside_sentences():
    text = "Then Lily saw Ben. Lily and Ben played. The dog ran to Ben and Lily. The end. Mom said the end."
    assert proper_names([text]) == {"ben", "lily"}  # "The" and "Mom" only start sentences


NAMES = {"lily", "ben", "tom", "sue"}


def test_a_newline_ends_a_story_unless_it_breaks_a_line_inside_it():
    first = 'Once upon a time, Lily had a ball.\n\nShe played. \nIt was fun.\n"Yay!" she said.'
    second = "Tom and Sue liked the park.\n\nThey ran.\nSo they were happy."
    text = first + "\n" + second + "\nBen was a big dog."
    assert recover_stories(text, NAMES, newline_separates=True, min_chars=10) == [
        'Once upon a time, Lily had a ball.\n\nShe played.\nIt was fun.\n"Yay!" she said.',
        "Tom and Sue liked the park.\n\nThey ran.\nSo they were happy.", "Ben was a big dog."]


def test_blank_line_separated_stories_are_cut_where_a_paragraph_opens_a_story():
    text = "\n\n".join(["Once upon a time, Lily had a ball.", "One day, Lily lost it.", "Lily cried.",
                      "Tom and Sue are friends.", "Tom liked Sue.", "Ben found a hat.", "Once there was a cat."])
    assert recover_stories(text, NAMES, newline_separates=False, min_chars=10) == [
        "Once upon a time, Lily had a ball.\n\nOne day, Lily lost it.\n\nLily cried.",  # "One day" is no opener
        "Tom and Sue are friends.\n\nTom liked Sue.",  # introduces its characters; then an old name
        "Ben found a hat.",  # a name the story so far never mentions
        "Once there was a cat."]
    assert len(recover_stories(text, NAMES, newline_separates=False, min_chars=100)) == 2  # never cut before 100


def test_truecase_restores_names_and_sentence_starts():
    table = casing_table(['Then Lily and I saw Tom with the TV. Lily said, "Hi!"'])
    assert table == {"lily": "Lily", "i": "I", "tom": "Tom", "tv": "TV"}
    lowered = 'lily and tom saw the tv. "hi!" said lily. "where?" asked tom. "there," i said. the end.'
    assert (truecase(lowered, table)
            == 'Lily and Tom saw the TV. "Hi!" said Lily. "Where?" asked Tom. "There," I said. The end.')


BOOK = """\ufeffThe Project Gutenberg eBook of A Test\r
\r
*** START OF THE PROJECT GUTENBERG EBOOK A TEST ***\r
Contents\r
\r
 CHAPTER I.\r
\r
CHAPTER I.\r
Down the Hole\r
\r
\r
Alice was “tired” of sitting\r
by her sister.\r
\r
[Illustration]\r
\r
She ran _very_ fast--and fell.\r
\r
CHAPTER II\r
\r
THE POOL OF TEARS\r
\r
“Curiouser!” cried Alice.\r
\r
THE END\r
\r
*** END OF THE PROJECT GUTENBERG EBOOK A TEST ***\r
License text.\r
"""


def test_book_is_cut_between_its_markers_into_chapter_documents():
    body = book_paragraphs(BOOK, "CHAPTER I.", "THE END")  # the contents' " CHAPTER I." is not the start
    assert body == ["CHAPTER I.", "Down the Hole", 'Alice was "tired" of sitting by her sister.',
                    "She ran very fast - and fell.", "CHAPTER II", "THE POOL OF TEARS", '"Curiouser!" cried Alice.']
    assert book_documents(body) == [
        'Chapter I. Down the Hole\n\nAlice was "tired" of sitting by her sister.\n\nShe ran very fast - and fell.',
        'Chapter II. The Pool of Tears\n\n"Curiouser!" cried Alice.']
    assert book_documents(body, max_chars=60) == [
        'Chapter I. Down the Hole\n\nAlice was "tired" of sitting by her sister.',
        "She ran very fast - and fell.", 'Chapter II. The Pool of Tears\n\n"Curiouser!" cried Alice.']
    assert len(book_paragraphs(BOOK, "CHAPTER I.", None)) == 8  # to the end marker: "THE END" too
    with pytest.raises(ValueError, match="no line 'CHAPTER IX'"):
        book_paragraphs(BOOK, "CHAPTER IX", None)


def test_heading_case():
    assert heading_case("THE STRAW, THE COAL, AND THE BEAN") == "The Straw, the Coal, and the Bean"
    assert heading_case("CHAPTER XIV") == "Chapter XIV" and heading_case("THE FROG-PRINCE") == "The Frog-Prince"


@pytest.mark.parametrize("story, subject", [
    ("Once upon a time, there was a little girl named Lily. She had a cat named Tom. The cat was fat.", ("cat", "Tom")),
    ("One day, a girl named Sue went out. She ran. She saw a frog.", ("girl", "Sue")),  # frog: third sentence
    ("Two dogs and a bird met. The dogs barked at the bird, and the dogs ran.", ("dog", None)),  # plurals counted
    ("A bird and a dog met. They sang.", ("bird", None)),  # a tie: the earlier word
    ("A bird and a dog met. The dog sang.", ("dog", None)),  # the word the whole story uses most
    ("Tim and Sam ran home. They were glad.", None),
])
def test_story_subject_is_the_most_used_subject_word_of_the_first_two_sentences(story, subject):
    assert story_subject(story) == subject


@pytest.mark.parametrize("story, subject, opens", [
    ("Once upon a time, there was a cat named Tom. Tom was fat.", "cat", True),
    ("Two little cats played in the sun. They were happy.", "cat", True),  # the plural names it too
    ("Once upon a time, there was a girl named Lily. She had a cat.", "cat", False),  # the cat comes second
    ("Lily saw a catfish. The cat ran.", "cat", False),  # a word that starts with the subject is not it
])
def test_opens_on_subject_looks_at_the_first_sentence_only(story, subject, opens):
    assert opens_on_subject(story, subject) is opens


def test_story_request_phrasings():
    assert story_request("cat", None, 0) == "Write a short story about a cat."
    assert story_request("owl", None, 1) == "Tell me a story about an owl."
    assert story_request("girl", "Lily", 3) == "Can you write a short story about a girl named Lily?"


# --- the shipped files ---------------------------------------------------------------------------------------

def test_mixes_are_nested_and_no_held_out_paragraph_is_in_a_training_file():
    a, b, c = (set(texts(name)) for name in MIXES)
    assert a < b < c
    training = paragraphs(list(c)) | paragraphs([turn["content"] for conv in conversations("sft_stories")
                                                 for turn in conv])
    for name in HELD_OUT:
        held_out = paragraphs(texts(name))
        assert held_out and not held_out & training, name


def test_sft_stories_fit_the_default_context_and_name_their_subject(tokenizer):
    stories = 0
    for conversation in conversations("sft_stories") + conversations("sft_stories_test"):
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) <= 256
        prompt, reply = conversation[0]["content"], conversation[1]["content"]
        if subject := requested_subject(prompt):
            stories += 1
            assert mentions(reply_words(reply), subject), prompt
            assert len(reply.split()) >= MIN_STORY_WORDS and len(reply) <= MAX_STORY_CHARS
            assert opens_on_subject(reply, subject), prompt
    assert stories > 400


def test_no_subject_outweighs_the_others_in_the_sft_stories():
    subjects = Counter(requested_subject(conv[0]["content"]) for conv in conversations("sft_stories"))
    del subjects[None]  # identity and poems
    assert max(subjects.values()) == STORIES_PER_SUBJECT
    assert {"cat", "dog", "bear", "girl", "boy"} <= {s for s, n in subjects.items() if n == STORIES_PER_SUBJECT}


def test_sft_test_stories_are_not_training_answers_and_identity_is_repeated():
    train = conversations("sft_stories")
    answers = {conv[1]["content"] for conv in train}
    assert not any(conv[1]["content"] in answers for conv in conversations("sft_stories_test"))
    assert sum(conv[0]["content"] == "Who are you?" for conv in train) == IDENTITY_COPIES
    for prompt in ("Write a short story about a cat.", "Write a short story about a dog."):
        assert any(conv[0]["content"] == prompt for conv in train)


@pytest.mark.skipif(not (SHARED / "README.md").is_file(), reason="the staged corpora (../shared/data) are not here")
def test_make_shipped_data_rebuilds_every_file_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["make_shipped_data.py", "--shared_dir", str(SHARED), "--out_dir", str(tmp_path)])
    make_shipped_data()
    built = sorted(path.name for path in tmp_path.iterdir())
    assert len(built) == 14 and set(MIXES + HELD_OUT) <= {name.removesuffix(".jsonl") for name in built}
    for name in built:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
