"""Token-level unlikelihood training in SFT (--unlikelihood_alpha; Welleck et al. 2020, 5.1), against the formula.

The reference is the paper's definition written out with Python sets and loops, position by position:

    L = 1/N * sum_t [ -log p(x_{t+1} | x_<=t)  -  alpha * sum_{c in C_t} log(1 - p(c | x_<=t)) ]
    C_t = {assistant tokens before x_{t+1}} - {x_{t+1}}
"""

import json
import math
import subprocess
import sys

import torch

from conftest import DATA, tiny_model
from dataset.lm_dataset import SFTDataset
from model.model_minimind import IGNORE_INDEX
from test_trainer import ENV, REPO, TINY
from trainer.checkpoint import save_weights
from trainer.train_full_sft import unlikelihood_candidates, unlikelihood_sft_loss
from trainer.trainer_utils import causal_lm_loss


def candidate_sets(targets: torch.Tensor) -> list[list[set]]:
    """C_t of every scored position, by the paper's definition: the earlier scored tokens minus the true one."""
    sets = []
    for row in targets.tolist():
        sets.append([set() if row[t] == IGNORE_INDEX else
                     {token for token in row[:t] if token != IGNORE_INDEX} - {row[t]} for t in range(len(row))])
    return sets


def test_candidates_are_the_earlier_reply_tokens_as_a_set_without_the_true_one():
    torch.manual_seed(0)
    targets = torch.randint(3, 9, (4, 20))  # few distinct ids: many repeats
    targets[:, :5] = IGNORE_INDEX  # a prompt
    targets[1, 12:] = IGNORE_INDEX  # padding
    targets[2, 9] = IGNORE_INDEX  # a gap between two replies
    candidates = unlikelihood_candidates(targets)
    for b, row_sets in enumerate(candidate_sets(targets)):
        for t, expected in enumerate(row_sets):
            chosen = [int(targets[b, s]) for s in range(targets.shape[1]) if candidates[b, t, s]]
            assert len(chosen) == len(set(chosen)), "a token is penalized once however often it was written"
            assert set(chosen) == expected, (b, t)
    assert candidates.sum() > 50  # the test has repeats to find


def test_loss_equals_the_paper_formula_position_by_position(tokenizer):
    dataset = SFTDataset(DATA / "sft_stories.jsonl", tokenizer, 96)
    batch = dataset.collate([dataset[i] for i in (0, 3, 7)])  # padded to the longest of the three
    model = tiny_model(len(tokenizer)).eval()
    alpha = 0.7
    with torch.no_grad():
        loss, metrics = unlikelihood_sft_loss(model, batch, alpha)
        logprobs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logprobs = logprobs.log_softmax(-1).double()
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    cross_entropy, unlikelihood, n = 0.0, 0.0, 0
    for b, row_sets in enumerate(candidate_sets(targets)):
        for t, candidates in enumerate(row_sets):
            if targets[b, t] == IGNORE_INDEX:
                continue
            n += 1
            cross_entropy -= float(logprobs[b, t, targets[b, t]])
            unlikelihood -= sum(math.log(1 - math.exp(float(logprobs[b, t, c]))) for c in candidates)
    assert n > 100
    assert math.isclose(float(metrics["lm_loss"]), cross_entropy / n, rel_tol=1e-5)
    assert math.isclose(float(metrics["unlikelihood_loss"]), unlikelihood / n, rel_tol=1e-5)
    assert math.isclose(float(loss), (cross_entropy + alpha * unlikelihood) / n, rel_tol=1e-5)
    # the cross-entropy part is the stage's usual loss (the chunked one, without logits)
    with torch.no_grad():
        assert math.isclose(float(metrics["lm_loss"]), float(causal_lm_loss(model, batch)[0]), rel_tol=1e-5)


def test_a_step_of_unlikelihood_alone_lowers_the_probability_of_repeating(tokenizer):
    dataset = SFTDataset(DATA / "sft_stories.jsonl", tokenizer, 96)
    batch = dataset.collate([dataset[i] for i in (0, 3, 7)])
    model = tiny_model(len(tokenizer))
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    candidates = unlikelihood_candidates(targets)

    def candidate_probability() -> float:  # sum of p(c | x_<=t) over every (t, c in C_t)
        with torch.no_grad():
            probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
            index = targets.clamp(min=0)[:, None, :].expand(-1, targets.shape[1], -1)
            return float((probs.gather(-1, index) * candidates).sum())

    before = candidate_probability()
    with_term, without = unlikelihood_sft_loss(model, batch, 1.0)[0], unlikelihood_sft_loss(model, batch, 0.0)[0]
    (with_term - without).backward()  # the gradient of the unlikelihood term alone
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert candidate_probability() < before


def test_the_flag_trains_and_logs_both_terms(tmp_path, tokenizer):
    save_weights(tiny_model(len(tokenizer)), tokenizer, tmp_path / "start")
    argv = [*TINY, "--from_weight", str(tmp_path / "start"), "--save_dir", str(tmp_path / "out"),
            "--checkpoint_dir", str(tmp_path / "checkpoints"), "--max_steps", "3", "--log_interval", "1",
            "--eval_interval", "3", "--batch_size", "4", "--unlikelihood_alpha", "1.0"]
    result = subprocess.run([sys.executable, "trainer/train_full_sft.py", *argv], capture_output=True, text=True,
                            env=ENV, cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in
               (tmp_path / "out" / "runs" / "full_sft_64" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3
    for record in steps:  # the logged loss is the cross-entropy plus the (positive) unlikelihood term
        assert record["unlikelihood_loss"] > 0
        assert math.isclose(record["loss"], record["lm_loss"] + record["unlikelihood_loss"], rel_tol=1e-4)
    evaluation = [r for r in records if "eval_loss" in r][-1]
    # perplexity is that of the cross-entropy, not of the sum
    assert math.isclose(evaluation["eval_ppl"], math.exp(evaluation["eval_lm_loss"]), rel_tol=1e-4)
