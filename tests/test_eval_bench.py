"""eval/eval_bench.py: multiple choice by log-likelihood, GSM8K exact match, data checks, the command line.

The scorer is checked against a constructed bigram "model" whose log-probabilities have a closed form, and
against unbatched forward passes of a tiny MiniMind; everything runs on CPU in float32 under pytest's tmp_path.
"""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_model
from dataset.lm_dataset import DataFormatError, read_jsonl
from dataset.qa_format import build_prompt, extract_answer, normalize_number
from eval import eval_bench
from eval.eval_bench import (TASKS, check_choice_record, check_math_example, check_math_record,
                             continuation_log_likelihoods, evaluate_gsm8k, evaluate_multiple_choice, fewshot_examples,
                             summarize)
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.checkpoint import save_weights

REPO = Path(__file__).resolve().parents[1]
EVAL_DATA = REPO / "eval" / "data"


class BigramModel(torch.nn.Module):
    """A causal LM whose next-token logits depend on the current token only: 0 for every token, except
    `strength` for the one token `rules[current]` names. So log p(b | a) has a closed form (hand_log_prob).
    It records the unpadded rows it reads."""

    def __init__(self, vocab_size: int, rules: dict[int, int], strength: float = 12.0):
        super().__init__()
        self.vocab_size, self.rules, self.strength = vocab_size, rules, strength
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the scorer a device to read
        self.rows_read = []

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)  # (batch, seq, vocab)
        for b, row in enumerate(input_ids.tolist()):
            length = len(row) if attention_mask is None else int(attention_mask[b].sum())
            self.rows_read.append(row[:length])
            for t, token in enumerate(row):
                if token in self.rules:
                    logits[b, t, self.rules[token]] = self.strength
        return SimpleNamespace(logits=logits + self.anchor)


def hand_log_prob(model: BigramModel, previous: int, token: int) -> float:
    """log softmax of the bigram logits, written out: logit(token) - log(sum over the vocabulary of e^logit)."""
    if previous not in model.rules:
        return -math.log(model.vocab_size)
    boost = model.strength if model.rules[previous] == token else 0.0
    return boost - math.log(model.vocab_size - 1 + math.exp(model.strength))


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice


QUESTION = {"id": "q0", "subject": "geography", "question": "What is the capital of Italy?",
            "choices": ["Paris", "London", "the city of Rome", "Berlin"], "answer": 2}


def test_scorer_picks_the_choice_the_model_predicts_and_scores_it_by_the_hand_sum(tokenizer):
    context = tokenizer(build_prompt([], QUESTION["question"]), add_special_tokens=False)["input_ids"]
    correct = tokenizer(" the city of Rome", add_special_tokens=False)["input_ids"]
    chain = [context[-1], *correct]  # the model predicts each token of the right answer from the one before
    model = BigramModel(len(tokenizer), rules=dict(zip(chain[:-1], chain[1:])))

    [result] = evaluate_multiple_choice(model, tokenizer, [QUESTION], [], num_fewshot=0, max_len=128, batch_size=3)

    assert result["prediction"] == result["prediction_norm"] == 2 and result["correct"] and result["correct_norm"]
    for choice, score in zip(QUESTION["choices"], result["scores"]):
        continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        tokens = context + continuation
        expected = sum(hand_log_prob(model, tokens[t - 1], tokens[t]) for t in range(len(context), len(tokens)))
        # float32 log-softmax over 6400 logits is good to ~4e-5 nats per token; one token too many or too few
        # would move the sum by at least 0.038 nats (a near-certain token)
        assert score == pytest.approx(expected, abs=1e-3)
    assert result["scores"][2] > -0.05 * len(correct)  # near-certain tokens: about -0.04 nats each
    assert result["chance"] == 0.25


def test_model_reads_context_then_exactly_the_choice_tokens(tokenizer):
    model = BigramModel(len(tokenizer), rules={})
    evaluate_multiple_choice(model, tokenizer, [QUESTION], [], num_fewshot=0, max_len=128, batch_size=4)
    context = tokenizer("Question: What is the capital of Italy?\nAnswer:", add_special_tokens=False)["input_ids"]
    expected_rows = []
    for choice in QUESTION["choices"]:
        continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(continuation) == " " + choice
        expected_rows.append(context + continuation)
    assert sorted(model.rows_read) == sorted(expected_rows)


def test_chat_template_puts_the_question_in_a_user_turn_and_the_choice_right_after_the_assistant_prompt(tokenizer):
    model = BigramModel(len(tokenizer), rules={})
    evaluate_multiple_choice(model, tokenizer, [QUESTION], [], num_fewshot=0, max_len=128, chat_template=True)
    prompt = "<|im_start|>user\nQuestion: What is the capital of Italy?\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected_rows = [context + tokenizer(c, add_special_tokens=False)["input_ids"] for c in QUESTION["choices"]]
    assert sorted(model.rows_read) == sorted(expected_rows)


def unbatched_score(model, context: list[int], continuation: list[int]) -> float:
    """One forward pass of context + continuation, no padding, summing the continuation's log-probabilities."""
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = model(input_ids=tokens).logits[0, :-1].float().log_softmax(-1)  # position t predicts t + 1
    return sum(log_probs[t - 1, tokens[0, t]].item() for t in range(len(context), tokens.shape[1]))


def test_batched_right_padded_scores_equal_one_at_a_time_forward_passes():
    model = tiny_model(96, hidden_size=32).eval()
    generator = torch.Generator().manual_seed(1)
    requests = [(torch.randint(3, 96, (n_context,), generator=generator).tolist(),
                 torch.randint(3, 96, (n_continuation,), generator=generator).tolist())
                for n_context, n_continuation in [(5, 1), (12, 3), (2, 6), (9, 2), (20, 4)]]
    batched = continuation_log_likelihoods(model, requests, max_len=64, batch_size=4)
    one_at_a_time = continuation_log_likelihoods(model, requests, max_len=64, batch_size=1)
    by_hand = [unbatched_score(model, context, continuation) for context, continuation in requests]
    assert batched == pytest.approx(by_hand, abs=1e-4)
    assert one_at_a_time == pytest.approx(by_hand, abs=1e-4)


def test_long_context_loses_its_beginning_and_the_continuation_is_still_scored_whole():
    model = tiny_model(96, hidden_size=32).eval()
    context, continuation = list(range(3, 40)), [50, 51, 52]
    [score] = continuation_log_likelihoods(model, [(context, continuation)], max_len=10)
    assert score == pytest.approx(unbatched_score(model, context[-7:], continuation), abs=1e-4)
    with pytest.raises(ValueError, match="max_seq_len"):
        continuation_log_likelihoods(model, [(context, continuation)], max_len=3)


def test_fewshot_examples_come_from_the_same_subject_first_and_never_repeat_the_question():
    pool = [{"subject": "a", "question": "a1"}, {"subject": "b", "question": "b1"},
            {"subject": "b", "question": "b2"}, {"subject": "a", "question": "a2"}]
    by_subject = {"a": [pool[0], pool[3]], "b": [pool[1], pool[2]]}
    questions = lambda examples: [e["question"] for e in examples]  # noqa: E731
    assert questions(fewshot_examples(pool, by_subject, {"subject": "b", "question": "new"}, 3)) == ["b1", "b2", "a1"]
    assert questions(fewshot_examples(pool, by_subject, {"subject": "a", "question": "a1"}, 2)) == ["a2", "b1"]
    assert build_prompt([("1+1?", "2")], "2+2?") == "Question: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer:"


def test_summary_reports_per_subject_and_overall_accuracy_with_the_chance_baseline():
    rows = [{"subject": "x", "correct": True, "correct_norm": False, "chance": 1 / 4},
            {"subject": "x", "correct": False, "correct_norm": False, "chance": 1 / 4},
            {"subject": "y", "correct": True, "correct_norm": True, "chance": 1 / 2}]
    summary = summarize(rows)
    assert summary["n"] == 3 and summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["acc_norm"] == pytest.approx(1 / 3) and summary["chance"] == pytest.approx(1 / 3)
    assert summary["subjects"]["x"] == {"n": 2, "accuracy": 0.5, "acc_norm": 0.0, "chance": 0.25}


# ----------------------------------------------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize("reply, expected", [
    ("She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18"),
    ("The total is 2 + 3 = 5.\n#### 1,234\n\n#### 7", "1234"),
    ("So she earned $5.00.", "5"),
    ("Each costs 3.50 dollars", "3.5"),
    ("It drops 12 degrees, to -4.", "-4"),
    ("He has 12 apples and 30 pears, 42 fruits in all", "42"),
    ("I do not know.", None),
    ("#### none", None),
])
def test_final_answer_is_the_number_after_the_mark_else_the_last_number(reply, expected):
    assert extract_answer(reply) == expected


def test_normalize_number_drops_commas_dollars_and_trailing_zeros():
    assert [normalize_number(s) for s in ["1,200", "$18", "18.0", "0.50", "18.", "-3"]] == \
           ["1200", "18", "18", "0.5", "18", "-3"]


def test_gsm8k_scores_exact_match_of_the_extracted_answer(tokenizer, monkeypatch):
    pool = [{"question": "What is 1 + 1?", "answer": "2", "solution": "1 + 1 = 2\n#### 2"}]
    records = [{"id": "t0", "question": "What is 9 * 2?", "answer": "18"},
               {"id": "t1", "question": "What is 1,000 + 200?", "answer": "1,200"},
               {"id": "t2", "question": "What is 3 - 1?", "answer": "2"}]
    canned = {"What is 9 * 2?": " 9 * 2 = 18\n#### 18", "What is 1,000 + 200?": " It is $1,200.00",
              "What is 3 - 1?": " 3 - 1 = 4\n#### 4"}
    seen_prompts = []

    def fake_generate(model, tokenizer, prompts, *args, **kwargs):
        seen_prompts.extend(prompts)
        return [canned[p.rsplit("Question: ", 1)[1].split("\nAnswer:")[0]] for p in prompts]

    monkeypatch.setattr(eval_bench, "generate_replies", fake_generate)
    results = evaluate_gsm8k(None, tokenizer, records, pool, num_fewshot=1, max_len=512)
    assert [r["correct"] for r in results] == [True, True, False]
    assert [r["prediction"] for r in results] == ["18", "1200", "4"]
    assert seen_prompts[0] == "Question: What is 1 + 1?\nAnswer: 1 + 1 = 2\n#### 2\n\nQuestion: What is 9 * 2?\nAnswer:"
    assert summarize(results, "gsm8k")["subjects"]["gsm8k"]["chance"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Data files


GOOD = {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1}


@pytest.mark.parametrize("bad, message", [
    ({"choices": ["3", "4"], "answer": 1}, '"question"'),
    ({**GOOD, "choices": ["4"]}, '"choices"'),
    ({**GOOD, "choices": ["3", 4]}, '"choices"'),
    ({**GOOD, "choices": "3 4"}, '"choices"'),
    ({**GOOD, "answer": "B"}, '"answer"'),
    ({**GOOD, "answer": 2}, '"answer"'),
    ({**GOOD, "answer": True}, '"answer"'),
    ({**GOOD, "subject": 7}, '"subject"'),
])
def test_bad_multiple_choice_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError, match=f"^{path}:3: {message}"):
        read_jsonl(path, check_choice_record)


def test_bad_gsm8k_lines_name_file_and_line(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n" + json.dumps({"question": "2?"}) + "\n")
    with pytest.raises(DataFormatError, match=f'^{path}:2: "answer"'):
        read_jsonl(path, check_math_record)
    with pytest.raises(DataFormatError, match=f'^{path}:1: missing key "solution"'):
        read_jsonl(path, check_math_example)


def test_command_line_reports_a_bad_line_in_one_sentence(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "{not json\n")
    with pytest.raises(SystemExit, match=f"^error: {path}:2: invalid JSON"):
        eval_bench.main(["--task", "mmlu", "--data_path", str(path), "--model_path", str(tmp_path)])


def test_shipped_slices_are_valid_and_few_shot_files_cover_every_subject():
    for task, (data_file, fewshot_file) in TASKS.items():
        check = check_math_record if task == "gsm8k" else check_choice_record
        records = read_jsonl(EVAL_DATA / data_file, check)
        if fewshot_file:
            pool = read_jsonl(EVAL_DATA / fewshot_file, check_math_example if task == "gsm8k" else check)
            assert {r.get("subject") for r in records} <= {e.get("subject") for e in pool}, task


# ----------------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("bench") / "full_sft_32"
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=256))
    save_weights(model, tokenizer, directory)
    return directory


def test_command_line_prints_and_writes_accuracy_beside_the_chance_baseline(checkpoint, tmp_path, capsys):
    output = tmp_path / "arc.json"
    summary = eval_bench.main(["--model_path", str(checkpoint), "--task", "arc_challenge", "--num_fewshot", "1",
                               "--limit", "6", "--batch_size", "8", "--device", "cpu", "--output", str(output)])
    written = json.loads(output.read_text())
    assert written == summary
    records = [json.loads(line) for line in (EVAL_DATA / "arc_challenge_dev.jsonl").read_text().splitlines()[:6]]
    assert written["n"] == 6 and written["num_fewshot"] == 1 and written["max_seq_len"] == 256
    assert written["chance"] == pytest.approx(sum(1 / len(r["choices"]) for r in records) / 6)
    assert 0 <= written["accuracy"] <= 1 and 0 <= written["acc_norm"] <= 1
    assert written["subjects"]["challenge"]["n"] == 6
    printed = capsys.readouterr().out
    assert "acc_norm" in printed and "chance" in printed
    overall = next(line for line in printed.splitlines() if line.startswith("overall")).split()
    assert overall == ["overall", "6", *(f"{written[key]:.3f}" for key in ("accuracy", "acc_norm", "chance"))]


def test_gsm8k_runs_as_a_script_with_chance_zero(checkpoint, tmp_path):
    output = tmp_path / "gsm8k.json"
    run = subprocess.run([sys.executable, str(REPO / "eval" / "eval_bench.py"), "--model_path", str(checkpoint),
                          "--task", "gsm8k", "--num_fewshot", "1", "--limit", "2", "--max_new_tokens", "4",
                          "--device", "cpu", "--output", str(output)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = json.loads(output.read_text())
    assert summary["n"] == 2 and summary["chance"] == 0.0 and "acc_norm" not in summary
    assert list(summary["subjects"]) == ["gsm8k"] and summary["accuracy"] in (0.0, 0.5, 1.0)
    assert "overall" in run.stdout


def test_truthfulqa_has_no_few_shot_split(capsys):
    with pytest.raises(SystemExit):
        eval_bench.main(["--task", "truthfulqa", "--num_fewshot", "2"])
    assert "--fewshot_path" in capsys.readouterr().err
