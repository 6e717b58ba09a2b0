"""One strict checkpoint loader (model/loading.py load_pretrained) behind every tool, as specifications.

A checkpoint with one tensor removed from its model.safetensors must be refused, naming that tensor, wherever it is
opened: chat, the server, the web demo and eval (load_checkpoint), scripts/convert_model.py, and the trainer's
--from_weight; never loaded with a random tensor in its place. The frozen reference of DPO and GRPO comes from the
same loader. Tiny models on CPU under pytest's tmp_path.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from eval.lm_eval.run_lm_eval import check_checkpoint
from model.loading import load_checkpoint, load_pretrained
from model.model_lora import apply_lora, save_lora
from scripts import convert_model
from trainer.checkpoint import save_weights
from trainer.trainer_utils import load_reference

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
REMOVED = "model.layers.1.self_attn.q_proj.weight"  # the tensor the broken checkpoint lacks


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """{"good": a tiny checkpoint, "broken": the same with REMOVED deleted from its model.safetensors,
    "adapter": a LoRA adapter made on the good one}."""
    root = tmp_path_factory.mktemp("checkpoints")
    model = tiny_model(len(tokenizer))
    save_weights(model, tokenizer, root / "good")
    save_weights(model, tokenizer, root / "broken")
    weights = load_file(root / "broken" / "model.safetensors")
    del weights[REMOVED]
    save_file(weights, root / "broken" / "model.safetensors", metadata={"format": "pt"})
    apply_lora(model, rank=4, target_modules=("q_proj",))
    save_lora(model, root / "adapter")
    return {"good": root / "good", "broken": root / "broken", "adapter": root / "adapter"}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def assert_refused(result: subprocess.CompletedProcess, directory: Path) -> None:
    """A non-zero exit whose last line names the directory and the missing tensor, without a traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert str(directory) in last_line and f"missing: {REMOVED}" in last_line


def test_load_pretrained_refuses_a_missing_tensor_naming_it_and_the_directory(checkpoints):
    with pytest.raises(SystemExit, match=f"--model_path: the weights in {checkpoints['broken']} .*missing: {REMOVED}"):
        load_pretrained(checkpoints["broken"], "--model_path")


def test_chat_server_web_demo_and_eval_refuse_a_missing_tensor(checkpoints):
    # scripts/chat.py, serve_openai_api.py, web_demo.py and eval/*.py all open checkpoints with load_checkpoint
    with pytest.raises(SystemExit, match=f"missing: {REMOVED}"):
        load_checkpoint(checkpoints["broken"], "cpu")
    model, _ = load_checkpoint(checkpoints["good"], "cpu")
    assert not model.training


def test_lm_eval_runner_refuses_a_missing_tensor_before_the_harness_scores_it(checkpoints):
    with pytest.raises(SystemExit, match=f"--model_args pretrained: .*missing: {REMOVED}"):
        check_checkpoint(["--model_args", f"pretrained={checkpoints['broken']},dtype=float32", "--tasks", "arc"])
    check_checkpoint([f"--model_args=pretrained={checkpoints['good']}"])


def test_merge_lora_onto_a_base_missing_a_tensor_exits_with_its_name(checkpoints, tmp_path):
    result = run("scripts/convert_model.py", "merge_lora", "--model_path", str(checkpoints["adapter"]),
                 "--base_model_path", str(checkpoints["broken"]), "--output_dir", str(tmp_path / "merged"),
                 "--device", "cpu")
    assert_refused(result, checkpoints["broken"])
    assert not (tmp_path / "merged").exists()


def test_to_gguf_of_a_checkpoint_missing_a_tensor_exits_with_its_name(checkpoints, tmp_path):
    result = run("scripts/convert_model.py", "to_gguf", "--model_path", str(checkpoints["broken"]),
                 "--outfile", str(tmp_path / "model.gguf"))
    assert_refused(result, checkpoints["broken"])
    assert not (tmp_path / "model.gguf").exists()


def test_to_hf_of_a_checkpoint_missing_a_tensor_writes_nothing(checkpoints, tmp_path):
    with pytest.raises(SystemExit, match=f"missing: {REMOVED}"):
        convert_model.main(["to_hf", "--model_path", str(checkpoints["broken"]), "--output_dir",
                            str(tmp_path / "hf"), "--device", "cpu"])
    assert not (tmp_path / "hf").exists()


def test_trainer_from_weight_missing_a_tensor_exits_with_its_name(checkpoints, data, tmp_path):
    result = run("trainer/train_full_sft.py", "--from_weight", str(checkpoints["broken"]), "--data_path",
                 str(data["sft"]), "--eval_data_path", "", "--save_dir", str(tmp_path / "out"), "--checkpoint_dir",
                 str(tmp_path / "checkpoints"), "--device", "cpu", "--dtype", "float32", "--max_steps", "1")
    assert_refused(result, checkpoints["broken"])
    assert "--from_weight" in result.stderr


def test_reference_model_is_the_from_weight_checkpoint_frozen(checkpoints):
    args = SimpleNamespace(from_weight=str(checkpoints["good"]), save_dir=str(checkpoints["good"].parent),
                           hidden_size=64, use_moe=0, device="cpu")
    reference = load_reference(args)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    saved = load_file(checkpoints["good"] / "model.safetensors")
    assert all(torch.equal(reference.state_dict()[name], tensor) for name, tensor in saved.items())
