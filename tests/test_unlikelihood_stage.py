"""Sequence-level unlikelihood fine-tuning (trainer/train_unlikelihood.py; Welleck et al. 2020, section 5.2).

The candidates are checked against the paper's definition written out by hand, the loss against its formula
from an independent forward pass, and the stage through its script, as a user runs it.
"""

import json
import math
import subprocess
import sys

import torch
from transformers import GenerationConfig

from conftest import DATA, tiny_model
from dataset.lm_dataset import SFTDataset
from model.model_minimind import IGNORE_INDEX
from test_trainer import ENV, REPO, TINY
from trainer.checkpoint import save_weights
from trainer.trainer_utils import causal_lm_loss
from trainer.train_unlikelihood import prompts_of, repeated_ngram_mask, unlikelihood_batch_loss


def test_repeated_ngram_tokens_by_the_papers_definition():
    # a b c d a b c d e a b: "a b c d" is repeated (positions 4-7); with n=2 also "a b" at 9-10
    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 5, 1, 2, 0, 0]])
    mask = torch.tensor([[1] * 11 + [0, 0]])
    assert repeated_ngram_mask(ids, mask, 4).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]]
    assert repeated_ngram_mask(ids, mask, 2).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0, 0]]
    # the padding after the end is never a candidate, even when it repeats
    pad = torch.tensor([[7, 8, 0, 0, 0, 0, 0, 0]])
    assert repeated_ngram_mask(pad, torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]]), 2).sum() == 0

    torch.manual_seed(0)  # random rows against a brute-force reading of the definition
    ids = torch.randint(0, 3, (5, 30))
    mask = torch.ones_like(ids)
    mask[2, 20:] = 0
    for n in (2, 3, 4):
        got = repeated_ngram_mask(ids, mask, n)
        for b in range(5):
            row, length = ids[b].tolist(), int(mask[b].sum())
            for t in range(30):
                expected = any(tuple(row[i:i + n]) in {tuple(row[j:j + n]) for j in range(i)}
                               for i in range(max(0, t - n + 1), min(t, length - n) + 1))
                assert bool(got[b, t]) == expected, (n, b, t)


def test_prompts_are_the_tokens_before_the_first_reply_left_padded(tokenizer):
    dataset = SFTDataset(DATA / "sft_stories.jsonl", tokenizer, 256)
    batch = dataset.collate([dataset[i] for i in (0, 1, 2)])
    prompt_ids, prompt_mask = prompts_of(batch, tokenizer.pad_token_id)
    for row in range(3):
        start = int((batch["labels"][row] != IGNORE_INDEX).nonzero()[0])
        kept = prompt_ids[row][prompt_mask[row].bool()]
        assert kept.tolist() == batch["input_ids"][row, :start].tolist()
        assert tokenizer.decode(kept).endswith("<|im_start|>assistant\n")
        assert prompt_mask[row, -1] == 1  # every prompt ends at the last column: generation continues it


def test_loss_is_the_cross_entropy_plus_alpha_times_the_unlikelihood_of_the_repeats(tokenizer):
    dataset = SFTDataset(DATA / "sft_stories.jsonl", tokenizer, 128)
    batch = dataset.collate([dataset[i] for i in (0, 5)])
    model = tiny_model(len(tokenizer), seed=3).eval()  # an untrained model's greedy text repeats a lot
    generation = GenerationConfig(do_sample=False, max_new_tokens=40, eos_token_id=[tokenizer.eos_token_id],
                                  pad_token_id=tokenizer.pad_token_id)
    alpha = 0.5
    with torch.no_grad():
        loss, metrics = unlikelihood_batch_loss(model, batch, generation, alpha, 4)
        # the reference: generate again, one row at a time with no padding, and score each row by itself
        prompt_ids, prompt_mask = prompts_of(batch, tokenizer.pad_token_id)
        total, count, repeats = 0.0, 0, 0
        for row in range(2):
            prompt = prompt_ids[row][prompt_mask[row].bool()][None]
            sequence = model.generate(input_ids=prompt, generation_config=generation)
            continuation = sequence[0, prompt.shape[1]:].tolist()
            if tokenizer.eos_token_id in continuation:
                continuation = continuation[:continuation.index(tokenizer.eos_token_id) + 1]
            logprobs = model(input_ids=sequence).logits[0].float().log_softmax(-1)
            repeated = repeated_ngram_mask(torch.tensor([continuation]), torch.ones(1, len(continuation),
                                                                                   dtype=torch.long), 4)[0]
            for t, token in enumerate(continuation):
                p = math.exp(float(logprobs[prompt.shape[1] - 1 + t, token]))
                total -= math.log(max(1 - p, 1e-5)) * int(repeated[t])
            count += len(continuation)
            repeats += int(repeated.sum())
        lm_loss = float(causal_lm_loss(model, batch)[0])
    assert repeats > 0, "the test needs repeats to push down"
    assert math.isclose(float(metrics["repeat_fraction"]), repeats / count, rel_tol=1e-6)
    assert math.isclose(float(metrics["unlikelihood_loss"]), total / count, rel_tol=1e-4)
    assert math.isclose(float(metrics["lm_loss"]), lm_loss, rel_tol=1e-5)
    assert math.isclose(float(loss), lm_loss + alpha * total / count, rel_tol=1e-4)


def test_the_stage_fine_tunes_a_checkpoint_and_logs_the_repeats(tmp_path, tokenizer):
    save_weights(tiny_model(len(tokenizer), seed=3), tokenizer, tmp_path / "start")
    argv = [*TINY, "--from_weight", str(tmp_path / "start"), "--save_dir", str(tmp_path / "out"),
            "--checkpoint_dir", str(tmp_path / "checkpoints"), "--max_steps", "2", "--log_interval", "1",
            "--eval_interval", "2", "--batch_size", "2", "--max_new_tokens", "24", "--max_seq_len", "128"]
    result = subprocess.run([sys.executable, "trainer/train_unlikelihood.py", *argv], capture_output=True,
                            text=True, env=ENV, cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "unlikelihood_64" / "model.safetensors").is_file()
    records = [json.loads(line) for line in
               (tmp_path / "out" / "runs" / "unlikelihood_64" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2
    for record in steps:
        assert 0 < record["repeat_fraction"] <= 1 and record["completion_length"] > 0
        assert math.isclose(record["loss"], record["lm_loss"] + record["unlikelihood_loss"], rel_tol=1e-4)
    assert any("eval_repeat_fraction" in r for r in records)  # the held-out prompts' continuations too


def test_a_fresh_start_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "trainer/train_unlikelihood.py", *TINY, "--from_weight", "none",
                             "--save_dir", str(tmp_path)], capture_output=True, text=True, env=ENV, cwd=REPO,
                            timeout=120)
    assert result.returncode != 0
    assert "--from_weight" in result.stderr and "Traceback" not in result.stderr
