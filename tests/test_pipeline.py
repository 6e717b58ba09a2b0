"""The whole path a user walks, through the real scripts and the real shipped data, on tiny settings:
train a tokenizer -> pretrain -> SFT from the pretrain weights (--from_weight pretrain) -> chat, then from the
SFT weights (--from_weight full_sft): LoRA -> chat with the adapter, DPO, and distillation into a smaller student."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "dataset" / "data"
TINY_MODEL = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
              "--num_key_value_heads", "2"]


def head(source: Path, target: Path, lines: int) -> Path:
    """Write the first `lines` lines of a shipped jsonl file to `target`."""
    with source.open(encoding="utf-8") as f:
        target.write_text("".join(next(f) for _ in range(lines)), encoding="utf-8")
    return target


def run(*args: str, cwd: Path) -> str:
    """Run a repository script as a user would; fail the test with its output if it exits non-zero."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tokenizer_pretrain_sft_chat_through_the_real_scripts(tmp_path):
    pretrain = head(DATA / "pretrain.jsonl", tmp_path / "pretrain.jsonl", 300)
    pretrain_test = head(DATA / "pretrain_test.jsonl", tmp_path / "pretrain_test.jsonl", 20)
    sft = head(DATA / "sft.jsonl", tmp_path / "sft.jsonl", 200)
    sft_test = head(DATA / "sft_test.jsonl", tmp_path / "sft_test.jsonl", 20)
    tokenizer, out, checkpoints = tmp_path / "tokenizer", tmp_path / "out", tmp_path / "checkpoints"
    common = [*TINY_MODEL, "--tokenizer_path", str(tokenizer), "--save_dir", str(out),
              "--checkpoint_dir", str(checkpoints), "--device", "cpu", "--max_seq_len", "64",
              "--batch_size", "8", "--warmup_steps", "2", "--learning_rate", "3e-3", "--eval_interval", "10",
              "--log_interval", "1",
              # at 64 tokens (with a 600-token vocabulary) a few prompts leave no room for the reply: skip them
              "--skip_bad_lines", "1"]
    # run from another directory: no script may depend on the current directory
    elsewhere = tmp_path

    run(str(REPO_ROOT / "trainer" / "train_tokenizer.py"), "--data_path", str(pretrain), "--data_path", str(sft),
        "--vocab_size", "600", "--save_dir", str(tokenizer), cwd=elsewhere)
    assert (tokenizer / "tokenizer.json").is_file()

    run(str(REPO_ROOT / "trainer" / "train_pretrain.py"), *common, "--data_path", str(pretrain),
        "--eval_data_path", str(pretrain_test), "--max_steps", "30", cwd=elsewhere)
    assert (out / "pretrain_64" / "model.safetensors").is_file()
    evals = [m["eval_loss"] for m in read_metrics(out / "runs" / "pretrain_64" / "metrics.jsonl") if "eval_loss" in m]
    assert len(evals) >= 2 and evals[-1] < evals[0] < math.log(600) + 1  # held-out loss falls from ~ln(vocab)

    run(str(REPO_ROOT / "trainer" / "train_full_sft.py"), *common, "--from_weight", "pretrain",
        "--data_path", str(sft), "--eval_data_path", str(sft_test), "--max_steps", "10", cwd=elsewhere)
    sft_dir = out / "full_sft_64"
    assert (sft_dir / "model.safetensors").is_file() and (sft_dir / "tokenizer.json").is_file()
    sft_losses = [m["loss"] for m in read_metrics(out / "runs" / "full_sft_64" / "metrics.jsonl") if "loss" in m]
    assert all(math.isfinite(loss) for loss in sft_losses)

    reply = run(str(REPO_ROOT / "scripts" / "chat.py"), "--model_path", str(sft_dir), "--prompt", "Hello!",
                "--prompt", "Tell me more.", "--max_new_tokens", "12", "--seed", "0", "--device", "cpu",
                cwd=elsewhere)
    assert reply.count("assistant: ") == 2  # two turns of one conversation
    answers = [line.split("assistant: ", 1)[1] for line in reply.splitlines() if line.startswith("assistant: ")]
    assert all(answer.strip() for answer in answers)

    # post-training, each stage from the SFT checkpoint
    run(str(REPO_ROOT / "trainer" / "train_unlikelihood.py"), *common, "--from_weight", "full_sft",
        "--data_path", str(sft), "--eval_data_path", str(sft_test), "--max_steps", "2", "--eval_interval", "2",
        "--max_new_tokens", "16", cwd=elsewhere)
    assert (out / "unlikelihood_64" / "model.safetensors").is_file()
    assert any("eval_repeat_fraction" in m for m in read_metrics(out / "runs" / "unlikelihood_64" / "metrics.jsonl"))

    lora = head(DATA / "lora_identity.jsonl", tmp_path / "lora_identity.jsonl", 24)
    dpo = head(DATA / "dpo.jsonl", tmp_path / "dpo.jsonl", 24)
    dpo_test = head(DATA / "dpo_test.jsonl", tmp_path / "dpo_test.jsonl", 8)
    run(str(REPO_ROOT / "trainer" / "train_lora.py"), *common, "--from_weight", "full_sft", "--data_path", str(lora),
        "--max_steps", "4", "--merge", "1", cwd=elsewhere)
    adapter = out / "lora_identity_64"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    assert (out / "lora_identity_merged_64" / "model.safetensors").is_file()
    reply = run(str(REPO_ROOT / "scripts" / "chat.py"), "--model_path", str(adapter), "--prompt", "Who are you?",
                "--max_new_tokens", "8", "--seed", "0", "--device", "cpu", cwd=elsewhere)
    assert reply.count("assistant: ") == 1

    run(str(REPO_ROOT / "trainer" / "train_dpo.py"), *common, "--from_weight", "full_sft", "--data_path", str(dpo),
        "--eval_data_path", str(dpo_test), "--max_steps", "4", "--eval_interval", "4", cwd=elsewhere)
    dpo_metrics = read_metrics(out / "runs" / "dpo_64" / "metrics.jsonl")
    assert [m for m in dpo_metrics if "loss" in m][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 1: policy = reference
    assert any("eval_reward_accuracy" in m for m in dpo_metrics)
    assert (out / "dpo_64" / "model.safetensors").is_file()

    run(str(REPO_ROOT / "trainer" / "train_distill.py"), *common, "--teacher_weight", "full_sft",
        "--teacher_hidden_size", "64", "--hidden_size", "32", "--data_path", str(sft), "--eval_data_path",
        str(sft_test), "--max_steps", "4", cwd=elsewhere)
    student = json.loads((out / "distill_32" / "config.json").read_text())
    assert student["hidden_size"] == 32
    assert all(m["kl_loss"] >= 0 for m in read_metrics(out / "runs" / "distill_32" / "metrics.jsonl") if "kl_loss" in m)
