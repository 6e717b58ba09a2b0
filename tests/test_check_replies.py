"""eval/check_replies.py: the figures of a reply (words, corpus words, subject, repeated 4-grams) on hand-written
replies, and the command line on a tiny random checkpoint, against transformers' greedy generate."""

import json

import pytest
import torch

from conftest import tiny_model, write_jsonl
from eval import check_replies
from eval.check_replies import (corpus_share, corpus_vocabulary, judge, max_ngram_count, mentions, reply_words,
                                requested_subject)
from eval.eval_ppl import evaluate_file
from model.loading import load_checkpoint
from trainer.checkpoint import save_weights

# 63 words, every one of them in STORY's own vocabulary, "cat" twice, no 4-gram twice
STORY = ("Once upon a time, there was a little cat named Tom. Tom liked to play in the sun with his red ball. "
         "One day, the ball rolled into the garden and Tom ran after it. He found a big dog sleeping under a tree. "
         "The dog woke up and smiled at the cat. They played together all day and became best friends forever.")


def test_words_are_lower_cased_alphabetic_tokens():
    assert reply_words("Tom's cat sat, 3 times!") == ["tom", "s", "cat", "sat", "times"]


def test_corpus_share_counts_words_in_the_vocabulary():
    assert corpus_share(["the", "cat", "zorp", "sat"], {"the", "cat", "sat"}) == 0.75
    assert corpus_share([], {"the"}) == 0.0


def test_max_ngram_count_counts_overlapping_occurrences():
    words = reply_words("the cat sat on the cat sat on the cat sat on the mat")
    assert max_ngram_count(words) == 3  # "the cat sat on" at words 0, 4 and 8
    assert max_ngram_count(reply_words("one two three four five")) == 1
    assert max_ngram_count(reply_words("too short")) == 0


@pytest.mark.parametrize("prompt, subject", [("Write a short story about a cat.", "cat"),
                                             ("Tell me a story about an owl named Hoot.", "owl"),
                                             ("Write a story about dogs.", "dogs"),
                                             ("Who are you?", None)])
def test_requested_subject(prompt, subject):
    assert requested_subject(prompt) == subject


def test_mentions_accepts_the_plural():
    assert mentions(["two", "cats"], "cat") and mentions(["foxes"], "fox") and not mentions(["category"], "cat")
    assert mentions(["butterflies"], "butterfly") and mentions(["mice"], "mouse") and not mentions(["fly"], "butterfly")


def test_a_good_story_passes_every_check():
    result = judge("Write a short story about a cat.", STORY, set(reply_words(STORY)))
    assert (result["kind"], result["words"], result["corpus_share"]) == ("story", 63, 1.0)
    assert (result["subject"], result["mentions_subject"], result["max_4gram_count"]) == ("cat", True, 1)
    assert result["passed"] and len(result["checks"]) == 4


def test_each_target_fails_alone():
    vocabulary = set(reply_words(STORY))
    short = " ".join(STORY.split()[:49])
    assert judge("Write a short story about a cat.", short, vocabulary)["checks"] == {
        "words >= 50": False, "corpus words >= 95%": True, "no 4-gram 3 times": True, "mentions cat": True}
    unknown = STORY.replace("Tom.", "Xqzt Vrub Plok.")  # 65 words, 3 not in the corpus: 62/65 = 95.4%; then 62/66
    assert judge("Write a short story about a cat.", unknown, vocabulary)["passed"]
    result = judge("Write a short story about a cat.", unknown + " Zzyx.", vocabulary)
    assert not result["checks"]["corpus words >= 95%"]
    assert judge("Write a short story about a dog.", STORY, vocabulary)["passed"]  # the dog is in the story
    assert not judge("Write a short story about a frog.", STORY, vocabulary)["checks"]["mentions frog"]
    looping = STORY + " They played together all day. They played together all day."
    result = judge("Write a short story about a cat.", looping, vocabulary)
    assert result["max_4gram_count"] == 3 and not result["checks"]["no 4-gram 3 times"]


def test_identity_reply_must_name_minimind():
    assert judge("Who are you?", "I am MiniMind, an AI assistant.", set())["passed"]
    result = judge("Who are you?", "I am a cat.", {"i", "am", "a", "cat"})
    assert result["kind"] == "identity" and not result["passed"]


def test_corpus_vocabulary_reads_pretraining_and_sft_files(tmp_path):
    pretrain = write_jsonl(tmp_path / "p.jsonl", [{"text": "The Cat sat."}])
    sft = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"role": "user", "content": "Hi dog"},
                                                                 {"role": "assistant", "content": "Woof!"}]}])
    assert corpus_vocabulary([pretrain, sft]) == {"the", "cat", "sat", "hi", "dog", "woof"}


def test_command_line_reports_the_greedy_reply_of_a_checkpoint(tokenizer, tmp_path, capsys):
    save_weights(tiny_model(len(tokenizer), hidden_size=32).eval(), tokenizer, tmp_path / "ckpt")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": STORY}])
    summary = check_replies.main(["--model_path", str(tmp_path / "ckpt"), "--corpus", str(corpus),
                                  "--max_new_tokens", "12", "--device", "cpu", "--json"])
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{\n"):]) == json.loads(json.dumps(summary))  # after any library's log line
    assert [r["prompt"] for r in summary["replies"]] == check_replies.DEFAULT_PROMPTS

    model, tok = load_checkpoint(tmp_path / "ckpt", "cpu")
    vocabulary = set(reply_words(STORY))
    for result in summary["replies"]:
        ids = tok.apply_chat_template([{"role": "user", "content": result["prompt"]}], tokenize=False,
                                      add_generation_prompt=True)
        ids = torch.tensor([tok(ids, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.0,
                                 eos_token_id=[tok.eos_token_id, tok.pad_token_id], pad_token_id=tok.pad_token_id)
        assert result["reply"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert result == judge(result["prompt"], result["reply"], vocabulary)
    assert summary["passed"] == sum(r["passed"] for r in summary["replies"])


def test_missing_corpus_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        check_replies.main(["--corpus", str(tmp_path / "missing.jsonl")])


def test_pretrain_path_reports_eval_ppl_bits_per_byte_on_both_held_out_files(tokenizer, tmp_path, capsys):
    save_weights(tiny_model(len(tokenizer), hidden_size=32).eval(), tokenizer, tmp_path / "ckpt")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": STORY}])
    summary = check_replies.main(["--model_path", str(tmp_path / "ckpt"), "--corpus", str(corpus),
                                  "--max_new_tokens", "4", "--device", "cpu", "--pretrain_path", str(tmp_path / "ckpt")])
    out = capsys.readouterr().out
    model, tok = load_checkpoint(tmp_path / "ckpt", "cpu")
    assert list(summary["held_out_bits_per_byte"]) == [path.name for path in check_replies.HELD_OUT]
    for path in check_replies.HELD_OUT:
        expected = evaluate_file(model, tok, path, 256, 128, progress=False)["bits_per_byte"]
        assert summary["held_out_bits_per_byte"][path.name] == pytest.approx(expected, rel=1e-6)
        assert f"on {path.name}: {expected:.3f} bits per byte" in out
