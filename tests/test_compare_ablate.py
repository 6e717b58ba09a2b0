"""Comparing checkpoints and running ablations: eval/compare_checkpoints.py's greedy replies against transformers'
`generate`, eval/ablate.py's table against the runs' own metrics.jsonl, and eval/eval_bench.py's --per_question
rows against its summary. Tiny random models on CPU; the ablation runs the real trainer/train_pretrain.py."""

import json
import re
import statistics
from pathlib import Path

import matplotlib.image
import pytest
import torch

from conftest import tiny_model
from dataset.qa_format import extract_answer, normalize_number
from eval import ablate, compare_checkpoints, eval_bench
from model.loading import load_pretrained
from model.model_lora import apply_lora, merge_lora, save_lora
from trainer.checkpoint import save_weights

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time", "Who are you?"]
MAX_NEW_TOKENS = 8


def varied_model(tokenizer, seed: int):
    """A tiny random MiniMind whose greedy replies vary with the text (tiny_model's small initialization only
    repeats the last token): its decoder matrices redrawn with a larger spread."""
    model = tiny_model(len(tokenizer), seed=seed, hidden_size=32).eval()
    with torch.no_grad():
        for parameter in model.model.layers.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    return model


def reference_reply(model, tokenizer, prompt: str, chat: bool) -> list[int]:
    """transformers' greedy generate on the prompt as a user turn of the tokenizer's own chat template (or raw)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True) if chat else prompt
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id])
    return out[0, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------------------------------------------
# compare_checkpoints.py


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tokenizer):
    """<save_dir> with pretrain_32, full_sft_32 (other weights), lora_identity_32 (an adapter on full_sft_32) and
    a reward model's directory; returns (save_dir, {name: the in-memory model its replies must come from})."""
    save_dir = tmp_path_factory.mktemp("compare") / "out"
    pretrain, sft = varied_model(tokenizer, 0), varied_model(tokenizer, 1)
    save_weights(pretrain, tokenizer, save_dir / "pretrain_32")
    save_weights(sft, tokenizer, save_dir / "full_sft_32")
    lora = apply_lora_to(load_pretrained(save_dir / "full_sft_32"), save_dir / "lora_identity_32")
    reward = save_dir / "reward_32"
    save_weights(varied_model(tokenizer, 3), tokenizer, reward)
    config = json.loads((reward / "config.json").read_text())
    (reward / "config.json").write_text(json.dumps({**config, "architectures": ["MiniMindRewardModel"]}))
    return save_dir, {"pretrain_32": pretrain, "full_sft_32": sft, "lora_identity_32": lora}


def apply_lora_to(base, directory: Path):
    """Put a rank-4 adapter with random B on `base`, save it to `directory`, and return base + adapter merged."""
    apply_lora(base, rank=4, alpha=8.0)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    save_lora(base, directory)
    return merge_lora(base).eval()


def test_every_stage_replies_greedily_as_transformers_generate(stages, tokenizer, capsys):
    save_dir, models = stages
    result = compare_checkpoints.main(["--save_dir", str(save_dir), "--hidden_size", "32", "--device", "cpu",
                                       "--dtype", "float32", "--max_new_tokens", str(MAX_NEW_TOKENS),
                                       *(flag for prompt in PROMPTS for flag in ("--prompt", prompt)), "--json"])
    # stage order; the reward model (no replies) is left out
    assert [c["name"] for c in result["checkpoints"]] == ["pretrain_32", "full_sft_32", "lora_identity_32"]
    assert [c["format"] for c in result["checkpoints"]] == ["raw", "chat", "chat"]
    assert result["checkpoints"][2]["base"] == str(save_dir / "full_sft_32")
    assert [row["prompt"] for row in result["replies"]] == PROMPTS
    for row in result["replies"]:
        for reply in row["replies"]:
            model, chat = models[reply["checkpoint"]], reply["format"] == "chat"
            expected = reference_reply(model, tokenizer, row["prompt"], chat)
            assert reply["reply"] == tokenizer.decode(expected, skip_special_tokens=True)
            assert reply["tokens"] == len(expected)
            if not chat:  # the pretrained model continued the raw text: the chat prompt would give another reply
                assert expected != reference_reply(model, tokenizer, row["prompt"], chat=True)
        assert len({reply["reply"] for reply in row["replies"]}) == 3  # three different models
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{\n"):]) == json.loads(json.dumps(result))


def test_text_output_has_a_block_per_prompt_and_says_which_model_continued_raw_text(stages, capsys):
    save_dir, _ = stages
    result = compare_checkpoints.main(["pretrain", str(save_dir / "full_sft_32"), "--save_dir", str(save_dir),
                                       "--hidden_size", "32", "--device", "cpu", "--dtype", "float32",
                                       "--max_new_tokens", "4", "--prompt", PROMPTS[0]])
    out = capsys.readouterr().out
    assert [c["name"] for c in result["checkpoints"]] == ["pretrain_32", "full_sft_32"]
    assert "pretrain_32 (pretrained only: raw text continuation, no chat template)" in out
    assert out.count("=== Prompt") == 1 and "=== Prompt 1/1: Once upon a time" in out
    rows = [line for line in out.splitlines() if line.startswith(("pretrain_32 (raw)", "full_sft_32 "))]
    assert len(rows) == 2
    for row, reply in zip(rows, result["replies"][0]["replies"]):
        assert reply["reply"].strip().split()[0] in row  # the reply starts beside its checkpoint's name


def test_missing_checkpoint_names_it_and_the_script_that_makes_it(stages):
    save_dir, _ = stages
    with pytest.raises(SystemExit, match=r"^error: checkpoint dpo: nothing at .*dpo_32 .*; python "
                                         r"trainer/train_dpo\.py makes it$"):
        compare_checkpoints.main(["full_sft", "dpo", "--save_dir", str(save_dir), "--hidden_size", "32"])
    with pytest.raises(SystemExit, match="holds no checkpoint at --hidden_size 64"):
        compare_checkpoints.main(["--save_dir", str(save_dir), "--hidden_size", "64"])


# ----------------------------------------------------------------------------------------------------------------
# ablate.py


TINY_RUN = ["--hidden_size", "32", "--num_hidden_layers", "1", "--max_seq_len", "32", "--batch_size", "4",
            "--compile", "0", "--dtype", "float32", "--device", "cpu", "--eval_batches", "2"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, data):
    """ablate.py over --doc_mask 0 1 with seeds 1 2, three steps each, of the real train_pretrain.py."""
    output_dir = tmp_path_factory.mktemp("ablation") / "doc_mask"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the runs' subprocesses inherit it
        result = ablate.main(["--script", "trainer/train_pretrain.py", "--flag", "doc_mask", "--values", "0", "1",
                              "--seeds", "1", "2", "--max_steps", "3", "--output_dir", str(output_dir), "--",
                              "--data_path", str(data["pretrain"]), "--eval_data_path", str(data["pretrain_test"]),
                              *TINY_RUN])
    return output_dir, result


def final_eval_loss(run_dir: Path) -> float:
    """The last eval_loss in the run's metrics.jsonl, read here without eval/ablate.py."""
    [path] = (run_dir / "out" / "runs").glob("*/metrics.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [record["eval_loss"] for record in records if "eval_loss" in record][-1]


def test_table_means_are_the_means_of_the_runs_own_final_eval_losses(ablation):
    output_dir, result = ablation
    assert [row["value"] for row in result["table"]] == ["0", "1"]
    for row in result["table"]:
        finals = [final_eval_loss(output_dir / f"doc_mask_{row['value']}_seed{seed}") for seed in (1, 2)]
        assert row["seeds"] == [1, 2] and row["n"] == 2
        assert row["mean"] == pytest.approx(sum(finals) / 2, rel=1e-12)
        assert row["std"] == pytest.approx(statistics.stdev(finals), rel=1e-9)
        assert (row["min"], row["max"]) == (min(finals), max(finals))
        assert row["steps"] == 3 and row["tokens_seen"] == 3 * 4 * 32  # steps x batch x block
    finals = {(run["value"], run["seed"]): run["final"] for run in result["runs"]}
    assert len(set(finals.values())) == 4  # the flag and the seed reached the runs: four different models


def test_runs_go_seed_by_seed_each_with_its_flags_and_directories(ablation):
    output_dir, result = ablation
    assert [(run["value"], run["seed"]) for run in result["runs"]] == [("0", 1), ("1", 1), ("0", 2), ("1", 2)]
    for run in result["runs"]:
        command = Path(run["run_dir"], "train.log").read_text().splitlines()[0]
        assert f"--doc_mask={run['value']} --seed={run['seed']}" in command and "--max_steps=3" in command
        assert f"--save_dir={run['run_dir']}/out" in command
        assert Path(run["run_dir"], "out", "pretrain_32", "model.safetensors").is_file()


def test_writes_the_plot_and_the_json(ablation):
    output_dir, result = ablation
    assert matplotlib.image.imread(output_dir / "ablation.png").shape[:2] == (600, 900)  # 9 x 6 in at 100 dpi
    assert json.loads((output_dir / "ablation.json").read_text()) == json.loads(json.dumps(result))


@pytest.mark.parametrize("argv, message", [
    (["--flag", "seed", "--values", "1", "2", "--max_steps", "3"], "--flag seed: eval/ablate.py sets --seed itself"),
    (["--flag", "doc_mask", "--values", "0", "1"], "give --time_budget MINUTES"),
    (["--flag", "doc_mask", "--values", "0", "0", "--max_steps", "3"], "must not repeat a value"),
])
def test_flags_that_would_undo_the_comparison_are_refused_before_any_run(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablate.main(["--script", "trainer/train_pretrain.py", "--output_dir", str(tmp_path / "abl"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "abl").exists()


@pytest.mark.parametrize("extra, message", [
    (["--seed", "4"], "error: --seed after `--`: eval/ablate.py sets it on every run; drop it there"),
    (["--doc_mask=1"], "error: --doc_mask after `--`: eval/ablate.py sets it on every run (from --flag"),
    (["--from_weight", "full_sft"], "each run has its own --save_dir, where no stage name resolves; pass the "
                                    "checkpoint directory"),
])
def test_extra_flags_that_would_undo_the_comparison_are_refused_before_any_run(extra, message, tmp_path):
    with pytest.raises(SystemExit, match=re.escape(message)):
        ablate.main(["--script", "trainer/train_pretrain.py", "--flag", "doc_mask", "--values", "0", "1",
                     "--max_steps", "3", "--output_dir", str(tmp_path / "abl"), "--", *extra])
    assert not (tmp_path / "abl").exists()


def test_old_runs_are_not_overwritten(ablation):
    output_dir, _ = ablation
    with pytest.raises(SystemExit, match="already holds doc_mask_0_seed1"):
        ablate.main(["--script", "trainer/train_pretrain.py", "--flag", "doc_mask", "--values", "0", "--seeds", "1",
                     "--max_steps", "3", "--output_dir", str(output_dir)])


def test_packing_has_no_flag_and_the_message_says_so(tmp_path, data, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(SystemExit, match=r"^error: --flag packing: train_pretrain\.py has no --packing .*packing vs "
                                         r"padding has no flag yet"):
        ablate.main(["--script", str(REPO / "trainer" / "train_pretrain.py"), "--flag", "packing", "--values", "0",
                     "1", "--seeds", "1", "--max_steps", "1", "--output_dir", str(tmp_path / "abl"), "--",
                     "--data_path", str(data["pretrain"]), *TINY_RUN])


# ----------------------------------------------------------------------------------------------------------------
# eval_bench.py --per_question


@pytest.fixture(scope="module")
def bench_checkpoint(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("bench") / "full_sft_32"
    save_weights(varied_model(tokenizer, 4), tokenizer, directory)
    return directory


def test_per_question_rows_add_up_to_the_multiple_choice_accuracy(bench_checkpoint, tmp_path):
    path = tmp_path / "rows" / "arc.jsonl"
    summary = eval_bench.main(["--model_path", str(bench_checkpoint), "--task", "arc_easy", "--limit", "8",
                               "--device", "cpu", "--per_question", str(path)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    records = [json.loads(line) for line in (REPO / "eval" / "data" / "arc_easy_dev.jsonl").open()][:8]
    assert len(rows) == summary["n"] == 8
    assert sum(row["correct"] for row in rows) / 8 == summary["accuracy"]
    assert sum(row["correct_norm"] for row in rows) / 8 == summary["acc_norm"]
    assert 0 < summary["accuracy"] < 1 or 0 < summary["acc_norm"] < 1  # a mix of right and wrong: the sum counts
    for index, (row, record) in enumerate(zip(rows, records)):
        assert (row["index"], row["id"], row["question"], row["choices"], row["answer"]) == (
            index, record["id"], record["question"], record["choices"], record["answer"])
        scores = row["log_likelihoods"]
        assert len(scores) == len(record["choices"]) and all(score < 0 for score in scores)
        assert row["prediction"] == max(range(len(scores)), key=scores.__getitem__)
        assert row["log_likelihoods_norm"] == pytest.approx([s / len(c) for s, c in zip(scores, record["choices"])])
        assert row["prediction_norm"] == max(range(len(scores)), key=row["log_likelihoods_norm"].__getitem__)
        assert row["correct"] == (row["prediction"] == record["answer"])


def test_per_question_rows_of_gsm8k_hold_the_reply_and_both_answers(bench_checkpoint, tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    summary = eval_bench.main(["--model_path", str(bench_checkpoint), "--task", "gsm8k", "--limit", "3",
                               "--max_new_tokens", "6", "--device", "cpu", "--per_question", str(path)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    records = [json.loads(line) for line in (REPO / "eval" / "data" / "gsm8k_test.jsonl").open()][:3]
    assert len(rows) == summary["n"] == 3
    assert sum(row["correct"] for row in rows) / 3 == summary["accuracy"]
    for row, record in zip(rows, records):
        assert row["question"] == record["question"] and row["answer"] == normalize_number(record["answer"])
        assert row["reply"] and row["prediction"] == extract_answer(row["reply"])
        assert row["correct"] == (row["prediction"] == row["answer"])
