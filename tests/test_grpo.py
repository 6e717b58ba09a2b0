"""GRPO (trainer/train_grpo.py, trainer/rewards.py, dataset/rl_dataset.py), as specifications.

The advantage and the loss are checked against DeepSeekMath's formulas (Shao et al. 2024, eq. 3 and 4, section
4.1.2) written out token by token; the batched rollout against one prompt at a time; the rewards on hand examples;
the stage end to end through the real script, where a tiny random model learns what a reward function defined in
this module prefers, and where a second iteration on a group (--num_iterations 2) clips. The loss variants
(--loss_type dr_grpo, dapo, cispo) are checked against their papers' formulas written out here. Every run writes under pytest's tmp_path.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from conftest import tiny_model, write_jsonl
from dataset.lm_dataset import DataFormatError, SFTDataset
from dataset.rl_dataset import PromptDataset
from model.model_minimind import IGNORE_INDEX
from trainer import rewards, train_grpo
from trainer.checkpoint import save_weights
from trainer.distributed import batch_to_device
from trainer.train_grpo import (completion_logprobs, completion_mask, group_advantages, grpo_loss,
                                sample_completions)

REPO = Path(__file__).resolve().parents[1]
GRPO_DATA = REPO / "dataset" / "data" / "grpo"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}


def prefers_letter_e(prompts: list[str], completions: list[str], **_) -> list[float]:
    """The test reward, passed to the script by import path: the share of a completion's characters that are "e"."""
    return [text.count("e") / max(1, len(text)) for text in completions]


# ----------------------------------------------------------------------------------------------------------
# Advantages and loss against the paper


def test_advantages_normalize_rewards_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0])
    ours = group_advantages(rewards, num_generations=4)
    for group in range(3):  # section 4.1.2: A_i = (r_i - mean(r)) / std(r), std over the G rewards of the group
        r = rewards[4 * group:4 * group + 4].tolist()
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 4)
        expected = [(x - mean) / (std + 1e-4) for x in r]
        assert ours[4 * group:4 * group + 4].tolist() == pytest.approx(expected, rel=1e-6)
    assert ours[4:8].tolist() == [0.0] * 4  # equal rewards: nothing to learn from that group
    assert ours[:4].tolist() == pytest.approx([1, -1, -1, 1], abs=1e-3)


def paper_objective(logps, old_logps, ref_logps, advantages, lengths, epsilon, beta):
    """J of eq. 3, token by token, with the KL of eq. 4 written on probabilities."""
    total = 0.0
    for i, length in enumerate(lengths):
        per_completion = 0.0
        for t in range(length):
            ratio = torch.exp(logps[i, t]) / torch.exp(old_logps[i, t])  # pi_theta / pi_old
            clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
            surrogate = torch.minimum(ratio * advantages[i], clipped_ratio * advantages[i])
            ref_over_policy = torch.exp(ref_logps[i, t]) / torch.exp(logps[i, t])  # pi_ref / pi_theta
            kl = ref_over_policy - torch.log(ref_over_policy) - 1
            per_completion = per_completion + surrogate - beta * kl
        total = total + per_completion / length  # 1/|o_i| sum_t
    return total / len(lengths)  # 1/G sum_i


@pytest.mark.parametrize("epsilon, beta", [(0.2, 0.04), (0.1, 0.5)])
def test_loss_and_gradient_match_equations_3_and_4(epsilon, beta):
    generator = torch.Generator().manual_seed(0)
    shape, lengths = (4, 6), [6, 3, 1, 4]
    logps = (-3 * torch.rand(shape, generator=generator, dtype=torch.float64)).requires_grad_()
    # old and reference policies away from the current one, so that ratios leave [1 - eps, 1 + eps]
    old_logps = logps.detach() + 0.4 * torch.randn(shape, generator=generator, dtype=torch.float64)
    ref_logps = logps.detach() + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5], dtype=torch.float64)
    mask = (torch.arange(shape[1]) < torch.tensor(lengths)[:, None]).long()

    loss, stats = grpo_loss(logps, old_logps, ref_logps, advantages, mask, epsilon, beta)
    expected = -paper_objective(logps, old_logps, ref_logps, advantages, lengths, epsilon, beta)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    ours_grad, = torch.autograd.grad(loss, logps)
    paper_grad, = torch.autograd.grad(expected, logps)
    assert torch.allclose(ours_grad, paper_grad, rtol=1e-9, atol=1e-12)
    assert (ours_grad[mask == 0] == 0).all()  # padding after a completion gets no gradient

    ratio, real = torch.exp(logps - old_logps).detach(), mask.bool()
    log_ratio = (ref_logps - logps).detach()
    assert stats["kl"].item() == pytest.approx((torch.exp(log_ratio) - log_ratio - 1)[real].mean().item())
    # a token is clipped when the clipped term is the smaller: ratio above 1 + eps with A > 0, below 1 - eps with A < 0
    a = advantages[:, None].expand(shape)
    clipped = ((ratio > 1 + epsilon) & (a > 0)) | ((ratio < 1 - epsilon) & (a < 0))
    assert 0 < clipped[real].sum() < real.sum()
    assert stats["clip_fraction"].item() == pytest.approx(clipped[real].double().mean().item())


def test_one_update_per_group_is_the_policy_gradient():
    """pi_old = pi_theta (one update per group): the ratio is 1, nothing is clipped, and with beta = 0 the gradient of
    each token's log-probability is -A_i / (|o_i| G)."""
    logps = torch.log(torch.rand(3, 5, dtype=torch.float64)).requires_grad_()
    advantages = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    lengths = torch.tensor([5, 2, 3])
    mask = (torch.arange(5) < lengths[:, None]).long()
    loss, stats = grpo_loss(logps, logps.detach(), logps.detach(), advantages, mask, 0.2, 0.0)
    grad, = torch.autograd.grad(loss, logps)
    expected = -advantages[:, None] / (lengths[:, None] * 3) * mask
    assert torch.allclose(grad, expected)
    assert loss.item() == pytest.approx(-advantages.mean().item())
    assert stats["clip_fraction"].item() == 0 and stats["kl"].item() == 0


def test_dr_grpo_advantages_are_not_divided_by_the_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, -1.0, 2.0, 0.0])
    ours = group_advantages(rewards, num_generations=4, scale=False)
    assert ours.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 2.0, -2.0, 1.0, -1.0])  # r_i - mean of the group


def variant_objective(loss_type, logps, old_logps, ref_logps, advantages, lengths, epsilon, epsilon_high, beta,
                      budget):
    """J of each --loss_type, token by token, from the papers' formulas (ratios and KL written on probabilities)."""
    per_completion, tokens = [], 0
    for i, length in enumerate(lengths):
        terms = []
        for t in range(length):
            ratio = torch.exp(logps[i, t]) / torch.exp(old_logps[i, t])  # pi_theta / pi_old
            if loss_type == "cispo":  # MiniMax-M1: sg(truncated ratio) * A * log pi_theta
                weight = torch.clamp(ratio, max=1 + epsilon_high).detach()
                surrogate = weight * advantages[i] * logps[i, t]
            else:  # PPO's clip, with DAPO's decoupled upper end
                clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
                surrogate = torch.minimum(ratio * advantages[i], clipped_ratio * advantages[i])
            ref_over_policy = torch.exp(ref_logps[i, t]) / torch.exp(logps[i, t])
            terms.append(surrogate - beta * (ref_over_policy - torch.log(ref_over_policy) - 1))
        per_completion.append(sum(terms))
        tokens += length
    if loss_type == "grpo":  # 1/G sum_i 1/|o_i| sum_t
        return sum(total / length for total, length in zip(per_completion, lengths)) / len(lengths)
    if loss_type == "dr_grpo":  # 1/(G L_max) sum_i sum_t
        return sum(per_completion) / (len(lengths) * budget)
    return sum(per_completion) / tokens  # dapo, cispo: 1/(sum_i |o_i|) sum_i sum_t


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "cispo"])
def test_each_loss_type_matches_its_formula(loss_type):
    generator = torch.Generator().manual_seed(1)
    shape, lengths, epsilon, epsilon_high, beta, budget = (4, 6), [6, 3, 1, 4], 0.2, 0.28, 0.04, 10
    logps = (-3 * torch.rand(shape, generator=generator, dtype=torch.float64)).requires_grad_()
    old_logps = logps.detach() + 0.4 * torch.randn(shape, generator=generator, dtype=torch.float64)
    ref_logps = logps.detach() + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5], dtype=torch.float64)
    mask = (torch.arange(shape[1]) < torch.tensor(lengths)[:, None]).long()

    loss, stats = grpo_loss(logps, old_logps, ref_logps, advantages, mask, epsilon, beta, loss_type, epsilon_high,
                            budget)
    expected = -variant_objective(loss_type, logps, old_logps, ref_logps, advantages, lengths, epsilon,
                                  epsilon_high, beta, budget)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    ours_grad, = torch.autograd.grad(loss, logps)
    formula_grad, = torch.autograd.grad(expected, logps)
    assert torch.allclose(ours_grad, formula_grad, rtol=1e-9, atol=1e-12)
    ratio, real = torch.exp(logps - old_logps).detach(), mask.bool()
    a = advantages[:, None].expand(shape)
    if loss_type == "cispo":  # the importance weight is truncated
        clipped = ratio > 1 + epsilon_high
    else:  # the clipped term is the smaller: above 1 + epsilon_high with A > 0, below 1 - epsilon with A < 0
        clipped = ((ratio > 1 + epsilon_high) & (a > 0)) | ((ratio < 1 - epsilon) & (a < 0))
    assert 0 < clipped[real].sum() < real.sum()
    assert stats["clip_fraction"].item() == pytest.approx(clipped[real].double().mean().item())
    assert stats["approx_kl"].item() == pytest.approx((ratio - 1 - torch.log(ratio))[real].mean().item())
    without_kl, _ = grpo_loss(logps, old_logps, ref_logps, advantages, mask, epsilon, 0.0, loss_type, epsilon_high,
                              budget)
    grad, = torch.autograd.grad(without_kl, logps)
    # the clip takes the gradient of its tokens away; CISPO's truncated weight keeps every token's
    assert ((grad[clipped & real] != 0) == (loss_type == "cispo")).all()


def test_completion_mask_keeps_tokens_up_to_the_first_end_token():
    end_ids = [2, 0]  # <|im_end|>, <|endoftext|>
    completion_ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [0, 0, 0, 0], [9, 2, 7, 2]])
    assert completion_mask(completion_ids, end_ids).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0],
                                                                 [1, 1, 0, 0]]


# ----------------------------------------------------------------------------------------------------------
# Rollouts: left-padded batches give what one prompt alone gives


def prompt_batch(tokenizer, questions: list[str], tmp_path: Path) -> tuple[PromptDataset, dict]:
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q, "answer": str(i)} for i, q in enumerate(questions)])
    dataset = PromptDataset(path, tokenizer, 256)
    return dataset, dataset.collate([dataset[i] for i in range(len(dataset))])


QUESTIONS = ["Question: 2 + 2?\nAnswer:", "Question: A farmer has 17 sheep and buys 5 more. How many now?\nAnswer:"]


def test_completion_logprobs_of_a_left_padded_batch_equal_each_sequence_alone(tokenizer, tmp_path):
    model = tiny_model(len(tokenizer)).eval()
    _, batch = prompt_batch(tokenizer, QUESTIONS, tmp_path)
    completions = torch.tensor([[11, 12, 13, 2], [21, 22, 2, 0]])  # the second ended early: padding after <|im_end|>
    sequences = torch.cat([batch["input_ids"], completions], dim=1)
    attention_mask = torch.cat([batch["attention_mask"], completion_mask(completions, [2, 0])], dim=1)
    with torch.no_grad():
        ours, _ = completion_logprobs(model, sequences, attention_mask, 4, temperature=0.7)
        for row in range(2):
            alone = sequences[row][attention_mask[row].bool()][None]  # no padding at all
            logits = model(input_ids=alone).logits[0, :-1] / 0.7
            expected = F.log_softmax(logits, dim=-1).gather(1, alone[0, 1:, None])[:, 0]
            length = int(attention_mask[row, -4:].sum())
            assert torch.allclose(ours[row, :length], expected[-length:], atol=1e-5)


def test_batched_sampling_continues_each_prompt_as_alone(tokenizer, tmp_path):
    model = tiny_model(len(tokenizer))
    _, batch = prompt_batch(tokenizer, QUESTIONS, tmp_path)
    greedy = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=[2, 0], pad_token_id=0)
    sequences, attention_mask, num_tokens = sample_completions(model, batch, greedy, num_generations=3)
    assert model.training  # back in training mode afterwards
    assert sequences.shape == (6, batch["input_ids"].shape[1] + num_tokens)
    for row in range(2):
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()][None]
        alone = model.eval().generate(input_ids=prompt, generation_config=greedy)[0, prompt.shape[1]:]
        for copy in range(3):  # rows of one prompt are next to each other
            assert sequences[3 * row + copy, -num_tokens:][:len(alone)].tolist() == alone.tolist()
        assert torch.equal(attention_mask[3 * row, :-num_tokens], batch["attention_mask"][row])


# ----------------------------------------------------------------------------------------------------------
# Rewards


def test_gsm8k_accuracy_compares_the_final_number():
    completions = ["<think>3 + 4 = 7, and 7 * 2 = 14</think> The answer is 14.", "So she pays $1,200.00 in all.",
                   "#### 72 (not 73)", "<think>the answer is 5</think> 6", "I do not know."]
    assert rewards.gsm8k_accuracy([""] * 5, completions, answer=["14", "1200", "72", "5", "0"]) == [1, 1, 1, 0, 0]
    assert rewards.final_answer("<think>5</think>6") == "6"


@pytest.mark.parametrize("completion, reward", [
    ("<think>\n3 + 4 = 7\n</think>\n\n7", 1.0),
    ("<think>a</think>b", 1.0),
    ("7", 0.0),                                  # no reasoning
    ("<think>3 + 4 = 7</think>", 0.0),           # no answer after it
    ("<think> </think>7", 0.0),                  # empty reasoning
    ("7 <think>a</think>b", 0.0),                # reasoning not first
    ("<think>a</think>b</think>c", 0.0),         # a second closing tag
    ("<think>a<think>b</think>c", 0.0),          # nested
])
def test_think_format(completion, reward):
    assert rewards.think_format([""], [completion]) == [reward]


def test_length_penalty_is_dapo_soft_overlong_punishment():
    # L_max = 128, L_cache = 32: 0 up to 96 tokens, then linear down to -1 at 128
    lengths = [1, 96, 97, 112, 128]
    assert rewards.length_penalty([""] * 5, [""] * 5, completion_tokens=lengths, max_new_tokens=[128] * 5) == \
        pytest.approx([0, 0, -1 / 32, -0.5, -1])


def test_reward_functions_load_by_name_or_import_path():
    assert rewards.load_reward_function("think_format") is rewards.think_format
    assert rewards.load_reward_function("trainer.rewards:length_penalty") is rewards.length_penalty
    for name, message in [("accuracy", "unknown reward"), ("no_such_module:f", "cannot import no_such_module"),
                          ("trainer.rewards:nothing", "trainer.rewards has no function nothing")]:
        with pytest.raises(SystemExit, match=message):
            rewards.load_reward_function(name)


def test_a_reward_needing_a_field_the_data_lacks_stops_before_training():
    rewards.check_reward_fields("gsm8k_accuracy", rewards.gsm8k_accuracy, {"answer", "completion_tokens"})
    with pytest.raises(SystemExit, match="--reward_funcs gsm8k_accuracy: .*'answer'"):
        rewards.check_reward_fields("gsm8k_accuracy", rewards.gsm8k_accuracy, {"id", "completion_tokens"})


# ----------------------------------------------------------------------------------------------------------
# Prompt data


def test_prompts_are_rendered_for_generation_and_left_padded(tokenizer, tmp_path):
    records = [{"prompt": "Hi", "answer": "1", "id": "a"},
               {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                "answer": "4"}]
    dataset = PromptDataset(write_jsonl(tmp_path / "p.jsonl", records), tokenizer, 64)
    assert tokenizer.decode(dataset[0]["input_ids"]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert dataset.field_names == {"answer"}  # "id" is not in every record
    batch = dataset.collate([dataset[0], dataset[1]])
    short, long = len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])
    assert batch["input_ids"].shape == (2, long)
    assert batch["attention_mask"][0].tolist() == [0] * (long - short) + [1] * short
    assert (batch["input_ids"][0, :long - short] == tokenizer.pad_token_id).all()
    assert torch.equal(batch["input_ids"][0, long - short:], dataset[0]["input_ids"])
    assert batch["fields"] == [{"answer": "1", "id": "a"}, {"answer": "4"}]  # as they are, not packed in a tensor
    moved = batch_to_device(batch, torch.device("cpu"))  # as optimizer_step and evaluate move a batch
    assert moved["fields"] is batch["fields"] and torch.equal(moved["input_ids"], batch["input_ids"])


def test_prompt_tools_render_in_either_layout(tokenizer, tmp_path):
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    ours = {"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}], "tools": tools}
    upstream = {"conversations": [{"role": "system", "content": "s", "tools": json.dumps(tools)},
                                  {"role": "user", "content": "2+2?"}]}  # upstream MiniMind's layout
    dataset = PromptDataset(write_jsonl(tmp_path / "p.jsonl", [ours, upstream]), tokenizer, 256)
    expected = tokenizer.apply_chat_template(ours["conversations"], tools=tools, add_generation_prompt=True,
                                             tokenize=False)
    assert "# Tools" in expected
    assert [tokenizer.decode(dataset[i]["input_ids"]) for i in range(2)] == [expected, expected]


def test_prompts_longer_than_max_seq_len_are_dropped_not_cut(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "word " * 200}])
    dataset = PromptDataset(path, tokenizer, 32)
    assert len(dataset) == 1 and dataset.lengths == [len(dataset[0]["input_ids"])]


@pytest.mark.parametrize("line, message", [
    ("not json", "invalid JSON"),
    (json.dumps({"answer": "1"}), 'expected one of "prompt" or "conversations"'),
    (json.dumps({"prompt": "a", "conversations": []}), 'expected one of "prompt" or "conversations"'),
    (json.dumps({"prompt": " "}), '"prompt" must be a non-empty string'),
    (json.dumps({"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     "must end before the reply"),
    (json.dumps({"conversations": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}),
     "cannot follow the start"),
    (json.dumps({"conversations": [{"role": "user", "content": "a"}], "tools": {"f": 1}}), '"tools" must be a list'),
    (json.dumps({"conversations": [{"role": "system", "content": "s", "tools": "[{"},
                                   {"role": "user", "content": "a"}]}), "conversations.0..tools: invalid JSON"),
])
def test_bad_prompt_line_names_file_and_line(tokenizer, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n\n" + line + "\n")
    with pytest.raises(DataFormatError, match=f"^{path}:3: .*{message}"):
        PromptDataset(path, tokenizer, 64)


def test_skip_bad_lines_keeps_the_valid_prompts(tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\nnot json\n" + json.dumps({"answer": "2"}) + "\n")
    dataset = PromptDataset(path, tokenizer, 64, skip_bad_lines=True)
    assert [record["answer"] for record in dataset.records] == ["1"]


def test_shipped_prompts_load_and_their_answers_score_1(tokenizer):
    for name, count in [("gsm8k_train.jsonl", 400), ("gsm8k_test.jsonl", 100)]:
        dataset = PromptDataset(GRPO_DATA / name, tokenizer, 1024)
        assert len(dataset) == count and {"answer", "id"} <= dataset.field_names
        answers = [record["answer"] for record in dataset.records]
        assert rewards.gsm8k_accuracy([], [f"The answer is {a}." for a in answers], answer=answers) == [1.0] * count
    test_questions = [json.loads(line)["question"] for line in
                      (REPO / "eval" / "data" / "gsm8k_test.jsonl").read_text().splitlines()]
    shipped = [json.loads(line)["prompt"] for line in (GRPO_DATA / "gsm8k_test.jsonl").read_text().splitlines()]
    assert shipped == [f"Question: {q}\nAnswer:" for q in test_questions]  # eval_bench's zero-shot GSM8K prompt


def test_shipped_reasoning_replies_earn_the_format_and_accuracy_rewards(tokenizer):
    """The cold-start SFT file: every reply, as the chat template renders it, is in the <think> format and right."""
    dataset = SFTDataset(GRPO_DATA / "gsm8k_reasoning_sft.jsonl", tokenizer, 1024)
    records = [json.loads(line) for line in (GRPO_DATA / "gsm8k_reasoning_sft.jsonl").read_text().splitlines()]
    assert len(dataset) == len(records) == 200
    replies = [tokenizer.decode(item["input_ids"][item["labels"] != IGNORE_INDEX], skip_special_tokens=True)
               for item in dataset]
    answers = [record["conversations"][-1]["content"] for record in records]
    assert rewards.think_format([], replies) == [1.0] * 200
    assert rewards.gsm8k_accuracy([], replies, answer=answers) == [1.0] * 200


# ----------------------------------------------------------------------------------------------------------
# The stage, through the real script


def grpo_argv(tmp_path: Path, *flags: str) -> list[str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((GRPO_DATA / "gsm8k_train.jsonl").read_text().splitlines(keepends=True)[:32]))
    return ["--data_path", str(prompts), "--eval_data_path", "", "--save_dir", str(tmp_path / "out"),
            "--checkpoint_dir", str(tmp_path / "checkpoints"), "--hidden_size", "64", "--device", "cpu",
            "--dtype", "float32", "--log_interval", "1", *flags]


@pytest.fixture
def sft_checkpoint(tokenizer, tmp_path) -> Path:
    """A tiny full_sft_64 checkpoint with random weights under tmp_path/out."""
    save_weights(tiny_model(len(tokenizer)), tokenizer, tmp_path / "out" / "full_sft_64")
    return tmp_path / "out" / "full_sft_64"


def test_mean_reward_rises_with_a_reward_given_by_import_path(tmp_path, sft_checkpoint):
    argv = grpo_argv(tmp_path, "--reward_funcs", "test_grpo:prefers_letter_e", "--max_steps", "16", "--epochs", "10",
                     "--batch_size", "4", "--num_generations", "8", "--max_new_tokens", "16", "--learning_rate", "2e-2",
                     "--min_lr_ratio", "1", "--warmup_steps", "1")
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "train_grpo.py"), *argv], capture_output=True,
                            text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "runs" / "grpo_64" / "metrics.jsonl").open()]
    records = [record for record in records if "loss" in record]  # the steps' records
    assert [r["step"] for r in records] == list(range(1, 17))
    assert {"reward_prefers_letter_e", "reward_std", "kl", "clip_fraction", "completion_length"} <= set(records[0])
    assert records[0]["kl"] == pytest.approx(0, abs=1e-6)  # the first group is scored by the reference itself
    first, last = (sum(r["reward"] for r in part) / 5 for part in (records[:5], records[-5:]))
    assert last > 1.5 * first, (first, last)  # a random model writes about 1 "e" in 10 characters
    assert records[-1]["kl"] > 0
    assert (tmp_path / "out" / "grpo_64" / "model.safetensors").is_file()


def test_second_iteration_on_a_group_moves_the_ratio_and_clips(tmp_path, sft_checkpoint, monkeypatch):
    """--num_iterations 2 through the real code path: the first update of a group has rho = 1 exactly (the same
    forward gives pi_old), the second, after a step on the same group, has rho != 1 and clips tokens."""
    ratios, loss = [], train_grpo.grpo_loss

    def recording(logps, old_logps, *rest):
        ratios.append(torch.exp(logps - old_logps).detach())
        return loss(logps, old_logps, *rest)

    monkeypatch.setattr(train_grpo, "grpo_loss", recording)
    train_grpo.main(grpo_argv(tmp_path, "--reward_funcs", "test_grpo:prefers_letter_e", "--num_iterations", "2",
                              "--max_steps", "4", "--batch_size", "2", "--num_generations", "4", "--max_new_tokens",
                              "8", "--learning_rate", "5e-2", "--epsilon", "0.05", "--warmup_steps", "1"))
    records = [json.loads(line) for line in (tmp_path / "out" / "runs" / "grpo_64" / "metrics.jsonl").open()]
    records = [record for record in records if "loss" in record]
    assert len(ratios) == len(records) == 4  # 2 groups x 2 iterations
    for first, second in (ratios[0], ratios[1]), (ratios[2], ratios[3]):
        assert torch.equal(first, torch.ones_like(first))
        assert (second - 1).abs().max() > 0.05
    assert [r["clip_fraction"] > 0 for r in records] == [False, True, False, True]
    assert [r["approx_kl"] > 0 for r in records] == [False, True, False, True]
    assert records[0]["reward"] == records[1]["reward"] != records[2]["reward"] == records[3]["reward"]


def test_moe_policy_adds_the_router_loss(tokenizer, tmp_path):
    model = tiny_model(len(tokenizer), use_moe=True)
    save_weights(model, tokenizer, tmp_path / "out" / "full_sft_64_moe")
    train_grpo.main(grpo_argv(tmp_path, "--use_moe", "1", "--max_steps", "2", "--max_new_tokens", "8",
                              "--num_generations", "2", "--reward_funcs", "test_grpo:prefers_letter_e"))
    coef = model.config.router_aux_loss_coef
    lines = (tmp_path / "out" / "runs" / "grpo_64_moe" / "metrics.jsonl").read_text().splitlines()
    records = [record for record in map(json.loads, lines) if "loss" in record]  # the steps' records
    assert len(records) == 2
    for record in records:
        assert record["aux_loss"] > 0
        assert record["loss"] == pytest.approx(record["grpo_loss"] + coef * record["aux_loss"], rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--from_weight", "none"], "--from_weight none: GRPO starts from a trained chat model"),
    (["--num_generations", "1"], "--num_generations must be >= 2"),
    (["--reward_funcs", "think_format", "length_penalty", "--reward_weights", "1"], "2 --reward_funcs"),
    (["--reward_funcs", "nope"], "--reward_funcs nope: unknown reward"),
])
def test_user_mistakes_stop_the_run_with_a_message(tmp_path, sft_checkpoint, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_grpo.main(grpo_argv(tmp_path, *flags))


def test_a_negative_beta_is_refused_by_its_flag(tmp_path, sft_checkpoint, capsys):
    with pytest.raises(SystemExit):
        train_grpo.main(grpo_argv(tmp_path, "--beta", "-0.1"))
    assert "argument --beta: must be a finite number >= 0, got -0.1" in capsys.readouterr().err


def test_no_reward_at_all_is_refused(tmp_path, sft_checkpoint):
    with pytest.raises(SystemExit, match="no --reward_model: give at least one"):
        train_grpo.main(grpo_argv(tmp_path, "--reward_funcs"))
