"""scripts/xray/: BPE merges by hand against the tokenizers trainer, the packed block and SFT batch printout, and
int8 / 4-bit quantization by hand (error bounds, a tiny checkpoint's perplexity)."""

import json
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from conftest import tiny_model, write_jsonl
from scripts.xray import batches, bpe_merges, quantize
from scripts.xray.bpe_merges import byte_level_words, chars_per_token, learn_merges, library_merges
from scripts.xray.quantize import dequantize, quantize_4bit_blocks, quantize_int8_rows
from trainer.checkpoint import save_weights
from trainer.train_tokenizer import REPO_ROOT, train_bpe


def test_learn_merges_by_hand_on_a_tiny_example():
    # "Ġab" x3 and "ab" x1: (a, b) occurs 4 times, (Ġ, a) 3 times; after merging ab, (Ġ, ab) 3 times
    merges = learn_merges(Counter({"Ġab": 3, "ab": 1}), 5)
    assert merges == [("a", "b", 4), ("Ġ", "ab", 3)]  # then every word is one symbol: no more pairs


def test_ties_go_to_the_pair_with_the_smaller_ids():
    # (c, d) and (a, b) both occur twice: a has the smaller code point, so (a, b) comes first
    assert [merge[:2] for merge in learn_merges(Counter({"cd": 2, "ab": 2}), 2)] == [("a", "b"), ("c", "d")]


def test_overlapping_pairs_merge_left_to_right():
    assert learn_merges(Counter({"aaa": 1}), 2) == [("a", "a", 2), ("aa", "a", 1)]


def test_hand_merges_equal_the_tokenizers_trainer_on_real_text():
    lines = (REPO_ROOT / "dataset" / "data" / "pretrain_test.jsonl").read_text(encoding="utf-8").splitlines()
    text = "\n".join(json.loads(line)["text"] for line in lines[:8])  # English stories and Tang poems
    assert [merge[:2] for merge in learn_merges(byte_level_words(text), 150)] == library_merges(text, 150)


def test_bpe_merges_cli_prints_the_comparison(capsys):
    result = bpe_merges.main(["--text", "the cat sat on the mat, the cat", "--num_merges", "4"])
    assert result["agree"] and len(result["by_hand"]) == 4
    assert "the 4 hand merges equal the library's" in capsys.readouterr().out


def test_chars_per_token_counts_characters_over_tokens():
    tokenizer = train_bpe(iter(["aaaa bbbb"] * 10), 9 + 256 + 1)  # one merge
    assert chars_per_token(tokenizer, ["a"]) == 1.0
    assert chars_per_token(tokenizer, ["aaaa"]) > 1.0  # the merge packs two characters into one token


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return AutoTokenizer.from_pretrained(REPO_ROOT / "model" / "tokenizer")


def test_packed_block_restarts_positions_after_the_separator(shipped_tokenizer, capsys):
    index, item = batches.packed_block(shipped_tokenizer, batches.DATA / "pretrain_quick_test.jsonl", 48, None)
    separator = shipped_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    where = (item["input_ids"] == separator).nonzero().flatten().tolist()
    assert where and where[0] + 1 < 48 and item["position_ids"][where[0] + 1] == 0
    batches.print_block(shipped_tokenizer, item)
    out = capsys.readouterr().out
    first = where[0] + 1 - max(0, where[0] + 1 - batches.MASK_WINDOW)  # column of the new document's first token
    row = next(line for line in out.splitlines() if line.startswith(f"{where[0] + 1:>4} ") and "#" in line)
    assert row.split()[1] == "." * first + "#" + "." * (len(row.split()[1]) - first - 1)  # sees only itself


def test_sft_batch_shows_no_loss_outside_the_reply(shipped_tokenizer, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", [
        {"conversations": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "MiniMind."}]},
        {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there, friend."}]}])
    batches.print_sft_batch(shipped_tokenizer, data, 512, 2)
    out = capsys.readouterr().out
    assert "tokens: 'MiniMind.<|im_end|>'" in out  # what the loss covers: the reply and its end of turn
    assert "'Hello there, friend.<|im_end|>'" in out
    pad_row = [line for line in out.splitlines() if "<|endoftext|>" in line]
    assert pad_row and all(line.split()[-2:] == ["-100", "0"] for line in pad_row)  # padding: no loss, masked


def test_int8_rows_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    q, scale = quantize_int8_rows(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (16, 1)
    error = (weight - dequantize(q, scale, weight.shape)).abs()
    assert (error <= scale / 2 + 1e-7).all()
    assert (q.abs().amax(dim=1) == 127).all()  # the largest weight of each row uses the whole range


def test_4bit_blocks_range_and_error():
    torch.manual_seed(0)
    weight = torch.randn(4, 64)
    weight[0, 3] = 20.0  # an outlier: only its own block's scale grows
    q, scale = quantize_4bit_blocks(weight)
    assert q.shape == (4, 2, 32) and q.min() >= -8 and q.max() <= 7
    error = (weight - dequantize(q, scale, weight.shape)).abs().reshape(4, 2, 32)
    assert (error <= scale.float() / 2 + 1e-3).all()
    assert scale[0, 0] > 5 * scale[0, 1]
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_4bit_blocks(torch.randn(2, 40))


def test_quantize_cli_on_a_tiny_checkpoint(shipped_tokenizer, tmp_path):
    torch.manual_seed(0)
    save_weights(tiny_model(len(shipped_tokenizer), hidden_size=64).eval(), shipped_tokenizer, tmp_path / "ckpt")
    result = quantize.main(["--model_path", str(tmp_path / "ckpt"), "--limit", "2"])
    perplexity = result["perplexity"]
    assert set(perplexity) == {"float32", *quantize.SCHEMES}
    assert perplexity["int8 absmax per row"] == pytest.approx(perplexity["float32"], rel=0.01)
    assert result["schemes"]["int8 absmax per row"]["relative"] < result["schemes"]["4-bit blocks of 32"]["relative"]
    with pytest.raises(SystemExit, match="no such weight matrix"):
        quantize.main(["--model_path", str(tmp_path / "ckpt"), "--weight", "model.norm.weight"])
