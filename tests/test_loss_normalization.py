"""A step's loss is the mean over all its loss tokens, however the step is split (issue: the core, correct).

One optimizer step on 8 real SFT conversations of very different lengths (29 to 486 tokens), taken three ways:
one batch of 8, 8 accumulated micro-batches of 1, and 2 torchrun processes with a batch of 4 each. Each way must
log the same loss, the per-token mean over every assistant token of the 8, and leave the same weights. Under the
mean of micro-batch means (the defect this guards against) a 20-token reply weighs as much as a 400-token one
and the three ways disagree. All runs are subprocesses with the same thread settings (ENV), float32.
"""

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from conftest import DATA, tiny_model, write_jsonl
from dataset.lm_dataset import SFTDataset
from model.model_minimind import IGNORE_INDEX, next_token_loss
from test_trainer import ENV, REPO, TINY, train_losses
from trainer.checkpoint import save_weights

SFT_LINES = [109, 46, 12, 149, 134, 110, 30, 94]  # 0-based lines of dataset/data/sft.jsonl: 29 ... 486 tokens


@pytest.fixture(scope="module")
def start(tmp_path_factory, tokenizer):
    """(the start checkpoint directory, the 8 conversations' jsonl file)."""
    directory = tmp_path_factory.mktemp("norm")
    save_weights(tiny_model(len(tokenizer)), tokenizer, directory / "start")
    lines = (DATA / "sft.jsonl").read_text().splitlines()
    data = write_jsonl(directory / "sft8.jsonl", [json.loads(lines[i]) for i in SFT_LINES])
    return directory / "start", data


def sft_step(start, save_dir, *flags, nproc: int = 1) -> None:
    checkpoint, data = start
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    argv = [*TINY, "--from_weight", str(checkpoint), "--data_path", str(data), "--eval_data_path", "",
            "--save_dir", str(save_dir / "out"), "--checkpoint_dir", str(save_dir / "checkpoints"),
            "--max_seq_len", "512", "--max_steps", "1", "--log_interval", "1", "--learning_rate", "1e-3", *flags]
    result = subprocess.run([*launcher, "trainer/train_full_sft.py", *argv], capture_output=True, text=True,
                            env=ENV, cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def test_one_step_is_the_per_token_mean_however_it_is_split(start, tmp_path, tokenizer):
    sft_step(start, tmp_path / "batch8", "--batch_size", "8")
    sft_step(start, tmp_path / "accumulated", "--batch_size", "1", "--accumulation_steps", "8")
    sft_step(start, tmp_path / "ranks", "--batch_size", "4", nproc=2)

    # the reference: every assistant token of the 8 conversations, summed, over their count, at the start weights
    dataset = SFTDataset(start[1], tokenizer, 512)
    model = tiny_model(len(tokenizer)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset.collate([dataset[i]])
            n = int((sample["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(next_token_loss(model(sample["input_ids"]).logits, sample["labels"])) * n
            count += n
    assert count > 400  # real replies of very unequal lengths

    runs = {name: tmp_path / name / "out" for name in ("batch8", "accumulated", "ranks")}
    for name, save_dir in runs.items():
        assert train_losses(save_dir, "full_sft_64")[1] == pytest.approx(total / count, rel=1e-5), name
    weights = {name: safetensors.torch.load_file(save_dir / "full_sft_64" / "model.safetensors")
               for name, save_dir in runs.items()}
    for name in ("accumulated", "ranks"):
        for key, expected in weights["batch8"].items():
            torch.testing.assert_close(weights[name][key], expected, rtol=0, atol=1e-5, msg=f"{name}: {key}")
