"""eval/eval_ppl.py: perplexity and bits per byte, checked against hand computations and a uniform model."""

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import tiny_model
from dataset.lm_dataset import DataFormatError, build_assistant_labels
from eval import eval_ppl
from eval.eval_ppl import evaluate_file, negative_log_likelihood, scored_sequences, sliding_windows, summarize
from model.model_minimind import IGNORE_INDEX
from trainer.checkpoint import save_weights

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dataset" / "data"


def head(source: Path, target: Path, lines: int) -> Path:
    target.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]), encoding="utf-8")
    return target


class UniformModel(nn.Module):
    """Predicts every token of a `vocab_size` vocabulary with probability 1 / vocab_size."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


@pytest.mark.parametrize("name", ["pretrain_test", "sft_test"])
def test_uniform_model_has_perplexity_equal_to_the_vocabulary_size(tokenizer, tmp_path, name):
    data = head(DATA / f"{name}.jsonl", tmp_path / f"{name}.jsonl", 6)
    result = evaluate_file(UniformModel(len(tokenizer)), tokenizer, data, max_seq_len=64, stride=32, progress=False)
    assert result["perplexity"] == pytest.approx(len(tokenizer), rel=1e-5)
    # every scored token costs log2(V) bits
    assert result["bits_per_byte"] == pytest.approx(result["tokens"] * math.log2(len(tokenizer)) / result["bytes"])


def test_bits_per_byte_and_perplexity_by_hand():
    # three tokens predicted with probabilities 1/2, 1/4, 1/8: 1 + 2 + 3 = 6 bits over 4 bytes
    total_nll = -(math.log(1 / 2) + math.log(1 / 4) + math.log(1 / 8))
    result = summarize(total_nll, num_tokens=3, num_bytes=4)
    assert result["bits_per_byte"] == pytest.approx(6 / 4)
    assert result["perplexity"] == pytest.approx(4.0)  # geometric mean of 2, 4, 8
    assert result["mean_nll"] == pytest.approx(2 * math.log(2))


def test_pretrain_records_score_every_document_token_and_count_utf8_bytes(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = ["the cat sat.", "床前明月光"]  # 5 Chinese characters are 15 UTF-8 bytes
    path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts), encoding="utf-8")
    sequences = scored_sequences(path, tokenizer, "pretrain")
    for (ids, targets, num_bytes), text in zip(sequences, texts):
        document = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids("<|endoftext|>"), *document]
        assert targets[1:] == document and targets[0] == IGNORE_INDEX
        assert num_bytes == len(text.encode("utf-8"))
    assert [num_bytes for _, _, num_bytes in sequences] == [12, 15]


def test_sft_records_score_the_assistant_tokens_only(tokenizer, tmp_path):
    data = head(DATA / "sft_test.jsonl", tmp_path / "sft.jsonl", 3)
    for (ids, targets, num_bytes), line in zip(scored_sequences(data, tokenizer, "sft"), data.read_text().splitlines()):
        expected_ids, labels = build_assistant_labels(tokenizer, json.loads(line)["conversations"])
        assert ids == expected_ids and targets == labels
        reply = json.loads(line)["conversations"][-1]["content"]
        assert num_bytes == len((reply + "<|im_end|>").encode("utf-8"))  # one assistant turn: its text + <|im_end|>


@pytest.mark.parametrize("max_seq_len,stride", [(8, 8), (8, 3), (8, 1), (2, 1), (64, 32)])
def test_sliding_windows_score_every_token_exactly_once_within_the_window_length(max_seq_len, stride):
    rng = random.Random(max_seq_len * 100 + stride)
    for _ in range(20):
        n = rng.randint(1, 40)
        ids = list(range(100, 100 + n))
        targets = [IGNORE_INDEX] + [t if rng.random() < 0.8 else IGNORE_INDEX for t in ids[1:]]
        scored = []
        for window_ids, window_targets in sliding_windows(ids, targets, max_seq_len, stride):
            assert len(window_ids) == len(window_targets) <= max_seq_len and window_targets[0] == IGNORE_INDEX
            scored += [t for t in window_targets if t != IGNORE_INDEX]
        assert scored == [t for t in targets if t != IGNORE_INDEX]


def test_window_scores_equal_the_full_sequence_scores_when_the_window_covers_it(tokenizer, tmp_path):
    model = tiny_model(len(tokenizer), hidden_size=32).eval()
    data = head(DATA / "pretrain_test.jsonl", tmp_path / "p.jsonl", 3)
    sequences = scored_sequences(data, tokenizer, "pretrain")
    # direct: each document in one forward pass
    direct = 0.0
    for ids, targets, _ in sequences:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        direct += torch.nn.functional.cross_entropy(logits, torch.tensor(targets[1:]), ignore_index=IGNORE_INDEX,
                                                    reduction="sum").item()
    longest = max(len(ids) for ids, _, _ in sequences)
    one_window, count = negative_log_likelihood(model, sequences, longest, longest, batch_size=2, progress=False)
    assert one_window == pytest.approx(direct, rel=1e-5)
    assert count == sum(sum(t != IGNORE_INDEX for t in targets) for _, targets, _ in sequences)
    # shorter windows: the same tokens, each with less context; batching does not change the sums
    windowed, windowed_count = negative_log_likelihood(model, sequences, 16, 8, batch_size=1, progress=False)
    batched, _ = negative_log_likelihood(model, sequences, 16, 8, batch_size=7, progress=False)
    assert windowed_count == count and windowed != pytest.approx(direct, rel=1e-6)
    assert batched == pytest.approx(windowed, rel=1e-5)


def test_bad_line_names_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: \"text\" must be a string"):
        evaluate_file(UniformModel(len(tokenizer)), tokenizer, path, 64, 32, progress=False)
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: expected a \"text\""):
        evaluate_file(UniformModel(len(tokenizer)), tokenizer, path, 64, 32, progress=False)


def test_command_line_on_a_saved_checkpoint_writes_the_figures(tokenizer, tmp_path, capsys):
    save_weights(tiny_model(len(tokenizer), hidden_size=32).eval(), tokenizer, tmp_path / "ckpt")
    data = head(DATA / "pretrain_test.jsonl", tmp_path / "p.jsonl", 4)
    result = eval_ppl.main(["--model_path", str(tmp_path / "ckpt"), "--data_path", str(data), "--max_seq_len", "32",
                            "--device", "cpu", "--output", str(tmp_path / "ppl.json")])
    written = json.loads((tmp_path / "ppl.json").read_text())
    assert written["perplexity"] == pytest.approx(result["perplexity"]) and written["stride"] == 16
    assert 1 < written["perplexity"] < 10 * len(tokenizer)  # an untrained model: near the vocabulary size
    assert f"perplexity {result['perplexity']:.2f}" in capsys.readouterr().out
