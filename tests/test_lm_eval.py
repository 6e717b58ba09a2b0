"""lm-evaluation-harness on MiniMind checkpoints: eval/lm_eval/run_lm_eval.py scores the offline ARC task with
MiniMind's own log-likelihoods. (The Qwen3 export that plain lm_eval opens is tested in tests/test_convert_model.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
QUESTIONS = [  # the format of eval/data/arc_easy_dev.jsonl: {"question", "choices", "answer": index}
    {"question": "Which is a source of light?", "choices": ["the Sun", "a rock", "water", "soil"], "answer": 0},
    {"question": "What do plants need to make food?", "choices": ["sand", "sunlight", "metal"], "answer": 1},
    {"question": "Which state of matter has a fixed shape?", "choices": ["gas", "liquid", "solid", "plasma"],
     "answer": 2},
    {"question": "What pulls objects toward Earth?", "choices": ["magnetism", "friction", "gravity", "light"],
     "answer": 2},
    {"question": "Which animal is a mammal?", "choices": ["shark", "frog", "eagle", "whale"], "answer": 3},
]


def tiny_checkpoint(directory: Path) -> Path:
    """A random MiniMind with the shipped tokenizer, saved as a training stage saves it."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT / "model" / "tokenizer")
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=len(tokenizer), **TINY))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, question: dict) -> list[float]:
    """log p(" " + choice | "Question: ...\\nAnswer:") summed over the choice's tokens, for every choice.

    The score of lm-evaluation-harness's multiple_choice tasks (context and continuation split as in its
    `HFLM._encode_pair`), computed directly with MiniMind.
    """
    context = f"Question: {question['question']}\nAnswer:"
    context_ids = tokenizer(context).input_ids
    scores = []
    for choice in question["choices"]:
        whole = tokenizer(context + " " + choice).input_ids
        continuation = torch.tensor(whole[len(context_ids):])
        logprobs = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)  # position t predicts token t+1
        scores.append(logprobs[len(context_ids) - 1:].gather(-1, continuation[:, None]).sum().item())
    return scores


def test_runner_scores_local_arc_task_with_minimind_loglikelihoods(tmp_path):
    pytest.importorskip("lm_eval")
    checkpoint = tiny_checkpoint(tmp_path / "tiny_minimind")
    data = tmp_path / "arc.jsonl"
    data.write_text("".join(json.dumps(question) + "\n" for question in QUESTIONS))
    command = [sys.executable, "eval/lm_eval/run_lm_eval.py", "--model_args", f"pretrained={checkpoint}",
               "--tasks", "arc_easy_local", "--limit", "5", "--device", "cpu",
               "--metadata", f"data_file={data}", "--output_path", str(tmp_path / "results"), "--log_samples"]
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}  # keep the shared cache clean
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    [results_file] = (tmp_path / "results").rglob("results_*.json")
    accuracy = json.loads(results_file.read_text())["results"]["arc_easy_local"]["acc,none"]
    assert 0 <= accuracy <= 1
    [samples_file] = (tmp_path / "results").rglob("samples_arc_easy_local_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()),
                     key=lambda sample: sample["doc_id"])
    model, tokenizer = MiniMindForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)
    expected = [choice_loglikelihoods(model, tokenizer, question) for question in QUESTIONS]
    for sample, scores in zip(samples, expected, strict=True):
        harness_scores = [float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"]]  # saved as strings
        assert harness_scores == pytest.approx(scores, abs=1e-4)
    correct = [max(range(len(scores)), key=scores.__getitem__) == q["answer"] for scores, q in zip(expected, QUESTIONS)]
    assert accuracy == pytest.approx(sum(correct) / len(QUESTIONS))

