"""Tool-use RL (trainer/train_agent.py) and its evaluation (eval/eval_toolcall.py), as specifications.

A small model trained to hold given tool conversations (serving_helpers.scripted_checkpoint) rolls out, greedily, a
real multi-turn conversation: its tokens must be those of the chat template, and its loss mask 1 exactly on the
tokens the model sampled (0 on the prompt, on the tool results, on the glue between turns). A call the calculator
refuses comes back to the model as the tool message and the rollout goes on. The stage runs end to end through the
real script from a tiny model given a few steps of SFT on tool-call demonstrations: its tool-call format reward
rises. The evaluation gives the same figures from the checkpoint and from the OpenAI-compatible server started in
a subprocess. Every run writes under pytest's tmp_path.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from conftest import write_jsonl
from dataset.chat_format import build_assistant_labels, tool_call_text
from dataset.data.agent import make_agent_data
from dataset.rl_dataset import PromptDataset
from dataset.tools import TOOLS
from eval import eval_toolcall
from model.loading import load_checkpoint
from model.model_minimind import IGNORE_INDEX
from scripts.generation import prompt_ids
from serving_helpers import REPO, free_port, scripted_checkpoint, shipped_tokenizer, start_server, stop_server
from trainer import rewards, train_agent, train_full_sft
from trainer.rollouts import completion_logprobs
from trainer.train_agent import roll_out, rollout_tensors, turn_end_ids

AGENT_DATA = REPO / "dataset" / "data" / "agent"
STAGED = REPO.parent / "shared" / "data"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CALCULATOR = [TOOLS["calculator"][1]]
REFUSAL = ("error: a function call is not arithmetic; the calculator takes only numbers, + - * / ** %, parentheses "
           "and unary minus")


def user(question: str) -> dict:
    return {"role": "user", "content": f"Question: {question}\nAnswer:"}


def call(expression: str) -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": expression}}]}


# Two tasks the scripted model holds a conversation about: a call, its result, the answer; and a call the calculator
# refuses, whose error the model reads before it answers. Without tools it answers at once (and wrongly).
HALVE = [user("What is 48 / 2?"), call("48/2"), {"role": "tool", "content": "24"}, {"role": "assistant",
                                                                                    "content": "24"}]
SNOOP = [user("What is in the current directory?"), call("__import__('os').getcwd()"),
         {"role": "tool", "content": REFUSAL}, {"role": "assistant", "content": "I cannot tell."}]
WITHOUT_TOOLS = {"What is 48 / 2?": "20", "What is in the current directory?": "Files."}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> Path:
    """A checkpoint that answers HALVE and SNOOP turn by turn (greedy), and their questions without tools."""
    tokenizer = shipped_tokenizer()
    examples = []
    for conversation in (HALVE, SNOOP):
        for turn in (1, 3):  # the reply after the question, and the reply after the tool result
            examples.append((prompt_ids(tokenizer, conversation[:turn], CALCULATOR),
                             reply_text(conversation[turn]) + "<|im_end|>"))
        question = conversation[0]["content"].removeprefix("Question: ").removesuffix("\nAnswer:")
        examples.append((prompt_ids(tokenizer, conversation[:1]), WITHOUT_TOOLS[question] + "<|im_end|>"))
    return scripted_checkpoint(tmp_path_factory.mktemp("agent") / "scripted", examples, max_steps=600)


def reply_text(message: dict) -> str:
    """What the assistant writes in `message`, as the chat template writes it: its content or its one call."""
    return tool_call_text(message["tool_calls"][0]) if message.get("tool_calls") else message["content"]


def task_records(*conversations, answers=("24", "7")) -> list[dict]:
    return [{"id": f"task-{i}", "conversations": [conversation[0]], "tools": CALCULATOR, "answer": answer}
            for i, (conversation, answer) in enumerate(zip(conversations, answers))]


# ----------------------------------------------------------------------------------------------------------
# Multi-turn rollouts


def greedy_rollouts(directory: Path, tmp_path: Path, num_generations: int = 1, max_turns: int = 5):
    model, tokenizer = load_checkpoint(directory, "cpu", dtype="float32")
    dataset = PromptDataset(write_jsonl(tmp_path / "tasks.jsonl", task_records(HALVE, SNOOP)), tokenizer, 1024)
    batch = dataset.collate([dataset[0], dataset[1]])
    greedy = GenerationConfig(do_sample=False, max_new_tokens=96, eos_token_id=turn_end_ids(tokenizer),
                              pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer, roll_out(model, tokenizer, batch, greedy, num_generations, max_turns)


def test_rollout_is_the_chat_template_and_its_loss_mask_is_the_models_tokens_only(scripted, tmp_path):
    model, tokenizer, rollouts = greedy_rollouts(scripted, tmp_path)
    im_end, tool_call_close = tokenizer.convert_tokens_to_ids(["<|im_end|>", "</tool_call>"])
    for rollout, conversation in zip(rollouts, (HALVE, SNOOP)):
        # the reference: the conversation through dataset/chat_format.py, the SFT labels of its assistant turns
        input_ids, labels = build_assistant_labels(tokenizer, conversation, CALCULATOR)
        prompt = len(rollout.prompt)
        assert rollout.prompt == prompt_ids(tokenizer, conversation[:1], CALCULATOR)
        assert rollout.prompt + rollout.ids == input_ids[:-1]  # all but the "\n" after the last <|im_end|>
        _, _, loss_mask, _ = rollout_tensors([rollout], tokenizer.pad_token_id, "cpu")
        assert loss_mask[0].tolist() == rollout.learned
        for position, (token, learned) in enumerate(zip(rollout.ids, rollout.learned)):
            sft_learns = labels[prompt + position] != IGNORE_INDEX
            after_call = position > 0 and rollout.ids[position - 1] == tool_call_close
            if token == im_end and after_call:  # the rollout closes a call's turn itself: the model did not sample it
                assert (learned, sft_learns) == (0, True)
            else:
                assert learned == sft_learns, (position, tokenizer.decode([token]))
        # token by token: the tool result and the turn headers are never learned
        text_learned = tokenizer.decode([t for t, keep in zip(rollout.ids, rollout.learned) if keep])
        text_read = tokenizer.decode([t for t, keep in zip(rollout.ids, rollout.learned) if not keep])
        result = conversation[2]["content"]
        assert f"<tool_response>\n{result}\n</tool_response>" in text_read and "tool_response" not in text_learned
        assert text_read.count("<|im_start|>") == 2  # the tool result's turn and the next assistant header
        assert (rollout.turns, rollout.answered, rollout.reply) == (2, True, conversation[3]["content"])
    halve, snoop = rollouts
    assert [(c.well_formed, c.error, c.result) for c in halve.calls] == [(True, None, "24")]
    # the refused call: well-formed, its error returned to the model as the tool message, and the rollout went on
    assert [(c.well_formed, c.result) for c in snoop.calls] == [(True, REFUSAL)]


def test_logprobs_of_the_rollout_batch_equal_each_conversation_alone(scripted, tmp_path):
    """One forward pass over the padded batch (prompts left-padded, turns right-padded) scores each learned token as
    the model does on the unpadded conversation."""
    model, tokenizer, rollouts = greedy_rollouts(scripted, tmp_path, num_generations=2)
    sequences, attention_mask, loss_mask, width = rollout_tensors(rollouts, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        ours, _ = completion_logprobs(model, sequences, attention_mask, width, temperature=0.7)
        for row, rollout in enumerate(rollouts):
            alone = torch.tensor([rollout.prompt + rollout.ids])
            logits = model(input_ids=alone).logits[0, :-1].float() / 0.7
            expected = F.log_softmax(logits, dim=-1).gather(1, alone[0, 1:, None])[:, 0][-len(rollout.ids):]
            learned = loss_mask[row, :len(rollout.ids)].bool()
            assert torch.allclose(ours[row, :len(rollout.ids)][learned], expected[learned], atol=1e-4)


def test_a_malformed_call_and_the_turn_limit_end_a_rollout_without_crashing(tokenizer):
    rollout = train_agent.Rollout(prompt=[1, 2])
    broken = tokenizer('<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 +', add_special_tokens=False,
                       )["input_ids"] + tokenizer.convert_tokens_to_ids(["</tool_call>"])
    train_agent.read_turn(tokenizer, rollout, broken, last_turn=False)
    assert not rollout.done and rollout.calls[0].well_formed is False
    assert "error: the tool call is not valid JSON" in tokenizer.decode(rollout.ids)  # the model reads why
    train_agent.read_turn(tokenizer, rollout, broken, last_turn=True)
    assert rollout.done and not rollout.answered and rollout.reply == "" and len(rollout.calls) == 2
    unclosed = train_agent.Rollout(prompt=[1, 2])
    train_agent.read_turn(tokenizer, unclosed, broken[:-1] + [tokenizer.eos_token_id], last_turn=False)
    assert unclosed.done and not unclosed.answered and unclosed.calls[0].well_formed is False


# ----------------------------------------------------------------------------------------------------------
# Rewards


def calls(*outcomes: tuple[bool, str | None, str]) -> list[dict]:
    return [{"name": "calculator", "arguments": {"expression": expression}, "well_formed": well_formed,
             "error": error, "result": ""} for well_formed, error, expression in outcomes]


def test_tool_rewards_on_hand_examples():
    good, refused, bad = (True, None, "48/2"), (True, "division by zero", "1/0"), (False, "not JSON", "?")
    rollouts = [calls(good), calls(good, refused), calls(bad, good, good), [], calls(good, good)]
    answered = [True, True, True, True, False]
    assert rewards.tool_call_format([], [""] * 5, tool_calls=rollouts) == pytest.approx([1, 1, 2 / 3, 0, 1])
    # wasted: refused or malformed calls, repeats of an earlier call, and no answer at the end; per max_turns (5)
    assert rewards.wasted_turns([], [""] * 5, tool_calls=rollouts, answered=answered, max_turns=[5] * 5) == \
        pytest.approx([0, -1 / 5, -2 / 5, 0, -2 / 5])
    assert rewards.wasted_turns([], [""], tool_calls=[calls(*[bad] * 9)], answered=[False], max_turns=[5]) == [-1]
    # the completion of a rollout is its final reply: gsm8k_accuracy reads its number
    assert rewards.gsm8k_accuracy([], ["24", ""], answer=["24", "24"]) == [1, 0]


# ----------------------------------------------------------------------------------------------------------
# The stage, through the real script


# Four arithmetic tasks, each demonstrated twice: answered with a calculator call, and answered directly
ARITHMETIC = [("3 + 4", "7"), ("12 * 5", "60"), ("90 - 18", "72"), ("48 / 2", "24")]


@pytest.fixture
def warm_start(tmp_path) -> tuple[Path, Path]:
    """(save dir holding tool_sft_64, tasks file): a tiny model given a few SFT steps (the real script) on
    conversations that answer each task with a calculator call half of the time, directly the other half."""
    demos = []
    for expression, value in ARITHMETIC:
        question = user(f"What is {expression}?")
        demos.append({"conversations": [question, call(expression), {"role": "tool", "content": value},
                                        {"role": "assistant", "content": value}], "tools": CALCULATOR})
        demos.append({"conversations": [question, {"role": "assistant", "content": value}], "tools": CALCULATOR})
    save_dir = tmp_path / "out"
    train_full_sft.main([
        "--from_weight", "none", "--data_path", str(write_jsonl(tmp_path / "demos.jsonl", demos)),
        "--eval_data_path", "",
        "--save_dir", str(save_dir), "--checkpoint_dir", str(tmp_path / "checkpoints"), "--save_weight", "tool_sft",
        "--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4", "--num_key_value_heads", "2",
        "--max_seq_len", "512", "--batch_size", "8", "--epochs", "80", "--max_steps", "80", "--learning_rate", "1e-2",
        "--warmup_steps", "0", "--min_lr_ratio", "1", "--weight_decay", "0", "--device", "cpu", "--dtype", "float32",
        "--log_interval", "80", "--compile", "0"])
    tasks = [{"conversations": [user(f"What is {expression}?")], "tools": CALCULATOR, "answer": value}
             for expression, value in ARITHMETIC]
    return save_dir, write_jsonl(tmp_path / "tasks.jsonl", tasks)


def test_tool_call_format_reward_rises_through_the_real_script(tmp_path, warm_start):
    save_dir, tasks = warm_start
    argv = ["--from_weight", "tool_sft", "--data_path", str(tasks), "--eval_data_path", "", "--save_dir",
            str(save_dir), "--checkpoint_dir", str(tmp_path / "checkpoints"), "--hidden_size", "64", "--device",
            "cpu", "--dtype", "float32", "--log_interval", "1", "--reward_funcs", "tool_call_format",
            "--max_steps", "16", "--epochs", "20", "--batch_size", "2", "--num_generations", "8", "--max_turns", "1",
            "--max_new_tokens", "48", "--learning_rate", "3e-4", "--min_lr_ratio", "1", "--warmup_steps", "1",
            "--compile", "0"]
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "train_agent.py"), *argv], capture_output=True,
                            text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (save_dir / "runs" / "agent_64" / "metrics.jsonl").open()]
    records = [record for record in records if "loss" in record]
    assert [record["step"] for record in records] == list(range(1, 17))
    assert {"reward_tool_call_format", "reward_std", "kl", "turns", "tool_calls", "answered"} <= set(records[0])
    assert records[0]["kl"] == pytest.approx(0, abs=1e-6)  # the first rollouts are scored by the reference itself
    # the warm start's own rollouts (step 1, and step 2 after one update) against the last four steps
    first = sum(r["reward_tool_call_format"] for r in records[:2]) / 2
    last = sum(r["reward_tool_call_format"] for r in records[-4:]) / 4
    assert last > first + 0.2, (first, last)  # the policy learns to call the calculator, and to call it right
    assert records[-1]["tool_calls"] > records[0]["tool_calls"]
    assert (save_dir / "agent_64" / "model.safetensors").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--from_weight", "none"], "--from_weight none: Tool-use RL starts from a trained chat model"),
    (["--num_generations", "1"], "--num_generations must be >= 2"),
    (["--reward_funcs", "wasted_turns", "--reward_weights", "1", "2"], "2 weights for 1 --reward_funcs"),
])
def test_user_mistakes_stop_the_run_with_a_message(tmp_path, scripted, flags, message):
    argv = ["--from_weight", str(scripted), "--save_dir", str(tmp_path / "out"), "--checkpoint_dir",
            str(tmp_path / "checkpoints"), "--device", "cpu", "--dtype", "float32", *flags]
    with pytest.raises(SystemExit, match=message):
        train_agent.main(argv)


def test_a_reward_needing_a_field_tool_rollouts_lack_stops_before_training(tmp_path, scripted):
    argv = ["--from_weight", str(scripted), "--save_dir", str(tmp_path / "out"), "--checkpoint_dir",
            str(tmp_path / "checkpoints"), "--device", "cpu", "--dtype", "float32", "--reward_funcs", "think_format",
            "gsm8k_accuracy", "--data_path", str(write_jsonl(tmp_path / "t.jsonl", [
                {"conversations": [user("2 + 2?")], "tools": CALCULATOR}]))]
    with pytest.raises(SystemExit, match="--reward_funcs gsm8k_accuracy: .*'answer'"):
        train_agent.main(argv)


# ----------------------------------------------------------------------------------------------------------
# Shipped data


def test_shipped_demonstrations_call_the_calculator_right_and_end_with_the_answer(tokenizer):
    tasks = {name: [json.loads(line) for line in (AGENT_DATA / name).open()]
             for name in ("tasks_train.jsonl", "tasks_test.jsonl", "tool_sft.jsonl")}
    assert [len(rows) for rows in tasks.values()] == [400, 100, 300]
    for record in tasks["tool_sft.jsonl"]:
        messages = record["conversations"]
        for assistant, tool in zip(messages[1:-1:2], messages[2:-1:2]):
            [made] = assistant["tool_calls"]
            assert TOOLS["calculator"][0](**made["arguments"]) == tool["content"]  # the calculator's own result
        assert messages[-1]["content"] == tool["content"] or float(messages[-1]["content"]) == float(tool["content"])
        input_ids, labels = build_assistant_labels(tokenizer, messages, record["tools"])
        assert len(input_ids) <= 768  # fits the documented SFT --max_seq_len
    test_questions = [json.loads(line)["question"] for line in (REPO / "eval" / "data" / "gsm8k_test.jsonl").open()]
    assert [r["conversations"][0]["content"] for r in tasks["tasks_test.jsonl"]] == [
        f"Question: {q}\nAnswer:" for q in test_questions]
    demo_ids = {r["id"] for r in tasks["tool_sft.jsonl"]}
    assert not demo_ids & {r["id"] for r in tasks["tasks_train.jsonl"]}  # demonstrations are other problems


@pytest.mark.skipif(not (STAGED / "eval" / "gsm8k" / "gsm8k_train.jsonl").is_file(), reason="the staged GSM8K copy "
                    "(shared/data) is not here")
def test_the_build_script_regenerates_the_shipped_files_byte_for_byte(tmp_path):
    make_agent_data.main(["--shared_dir", str(STAGED), "--out_dir", str(tmp_path)])
    attribution = (AGENT_DATA / "ATTRIBUTION.md").read_text()
    for name in ("tasks_train.jsonl", "tasks_test.jsonl", "tool_sft.jsonl"):
        assert (tmp_path / name).read_bytes() == (AGENT_DATA / name).read_bytes()
        assert hashlib.sha256((AGENT_DATA / name).read_bytes()).hexdigest() in attribution


# ----------------------------------------------------------------------------------------------------------
# The evaluation, from the checkpoint and through the server


EXPECTED = {"tasks": 2, "accuracy_with_tools": 0.5, "accuracy_without_tools": 0.0, "well_formed_calls": 1.0,
            "refused_calls": 0.5, "tasks_with_a_call": 1.0, "calls_per_task": 1.0, "answered": 1.0}


def test_eval_toolcall_reports_accuracy_with_and_without_tools_and_the_same_through_the_server(scripted, tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", task_records(HALVE, SNOOP))
    local = eval_toolcall.main(["--model_path", str(scripted), "--data_path", str(tasks), "--device", "cpu",
                                "--dtype", "float32", "--output", str(tmp_path / "local.json")])
    assert {key: local[key] for key in EXPECTED} == EXPECTED

    port = free_port()
    server = start_server([sys.executable, str(REPO / "scripts" / "serve_openai_api.py"), "--model_path",
                           str(scripted), "--port", str(port), "--device", "cpu", "--dtype", "float32"],
                          f"http://127.0.0.1:{port}/v1/models", tmp_path / "server.log")
    try:
        served = subprocess.run([sys.executable, str(REPO / "eval" / "eval_toolcall.py"), "--base_url",
                                 f"http://127.0.0.1:{port}/v1", "--data_path", str(tasks), "--output",
                                 str(tmp_path / "served.json")], capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        stop_server(server)
    assert served.returncode == 0, served.stderr[-2000:]
    by_server, here = (json.loads((tmp_path / name).read_text()) for name in ("served.json", "local.json"))
    assert by_server["results"] == here["results"]  # every reply and call, the same
    assert {key: by_server[key] for key in EXPECTED} == EXPECTED
    assert by_server["results"][1]["with_tools"]["calls"][0]["result"] == REFUSAL


def test_eval_toolcall_without_a_server_says_so_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "eval" / "eval_toolcall.py"), "--base_url",
                             f"http://127.0.0.1:{free_port()}/v1", "--limit", "1"], capture_output=True, text=True,
                            env=ENV, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no server answers at" in result.stderr.strip().splitlines()[-1]
