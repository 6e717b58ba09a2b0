"""PPO (trainer/train_ppo.py) and the rollout buffer it shares with GRPO (trainer/rollouts.py), as specifications.

The math is checked token by token on hand-built tensors: GAE against values computed by hand and against its
definition as a discounted sum of TD errors (Schulman et al. 2016, eq. 16), the per-token KL-penalized reward
(Ziegler et al. 2019, eq. 2), the clipped surrogate (Schulman et al. 2017, eq. 7) and PPO2's clipped value loss.
Through the real script: the first update of a rollout has ratio 1 (also in bfloat16: jingyaogong/minimind#813),
the second leaves 1 and clips, --target_kl ends a rollout's updates early, a resumed run starts a fresh rollout,
and a tiny random model's mean reward rises on a reward defined in this module. Every run writes under tmp_path.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from model.loading import load_pretrained
from model.model_reward import MiniMindRewardModel
from trainer import train_ppo, trainer_utils
from trainer.checkpoint import save_weights
from trainer.rollouts import RolloutBuffer
from trainer.train_ppo import (PolicyAndValue, gae, per_token_rewards, ppo_policy_loss, ppo_value_loss,
                               value_model_of, whiten)

REPO = Path(__file__).resolve().parents[1]
GRPO_DATA = REPO / "dataset" / "data" / "grpo"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}


def count_letter_e(prompts: list[str], completions: list[str], **_) -> list[float]:
    """The test reward, passed to the script by import path: how many "e" a completion holds."""
    return [float(text.count("e")) for text in completions]


# ----------------------------------------------------------------------------------------------------------
# GAE and the rewards, by hand


def test_gae_matches_a_hand_computed_sequence_with_done_and_padding():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 7.0]])  # row 2 ends after 2 tokens: 7.0 is padding
    values = torch.tensor([[0.5, 1.0, 1.5], [0.2, 0.4, 9.0]])  # 9.0 is padding too: never bootstrapped from
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # row 1, done after its last token: delta_2 = 2 - 1.5 = 0.5, delta_1 = 0 + 0.9 * 1.5 - 1 = 0.35,
    # delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4; A_2 = 0.5, A_1 = 0.35 + 0.72 * 0.5 = 0.71, A_0 = 1.4 + 0.72 * 0.71
    # row 2, done after token 1: delta_1 = 1 - 0.4 = 0.6, delta_0 = 0.5 + 0.9 * 0.4 - 0.2 = 0.66; A_0 = 0.66 + 0.72 * 0.6
    expected = [[1.4 + 0.72 * 0.71, 0.71, 0.5], [0.66 + 0.72 * 0.6, 0.6, 0.0]]
    assert advantages.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    # R_t = A_t + V_t on the completion's tokens, 0 on padding
    assert returns[0].tolist() == pytest.approx([expected[0][0] + 0.5, 1.71, 2.0], abs=1e-6)
    assert returns[1].tolist() == pytest.approx([expected[1][0] + 0.2, 1.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.7, 0.0)])
def test_gae_is_the_discounted_sum_of_td_errors(gamma, lam):
    """eq. 16 written forward: A_t = sum_l (gamma lam)^l delta_t+l, delta_t = r_t + gamma V_t+1 - V_t, V = 0 after
    the last token; with lam = 1 and gamma = 1 that is the return to go minus V_t."""
    generator = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 7, generator=generator, dtype=torch.float64), torch.randn(4, 7, generator=generator,
                                                                                             dtype=torch.float64)
    lengths = [7, 4, 1, 6]
    mask = (torch.arange(7) < torch.tensor(lengths)[:, None]).long()
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row, length in enumerate(lengths):
        value = [values[row, t].item() for t in range(length)] + [0.0]  # the episode is done after the last token
        delta = [rewards[row, t].item() + gamma * value[t + 1] - value[t] for t in range(length)]
        for t in range(7):
            expected = sum((gamma * lam) ** l * delta[t + l] for l in range(length - t)) if t < length else 0.0
            assert advantages[row, t].item() == pytest.approx(expected, abs=1e-12)
            assert returns[row, t].item() == pytest.approx(expected + value[t] if t < length else 0.0, abs=1e-12)
        if gamma == lam == 1.0:
            to_go = [sum(rewards[row, t:length].tolist()) for t in range(length)]
            assert advantages[row, :length].tolist() == pytest.approx([g - v for g, v in zip(to_go, value)], abs=1e-12)


def test_each_token_pays_the_kl_penalty_and_the_last_gets_the_score():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, -4.0]])
    ref_logps = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -0.4, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = per_token_rewards(torch.tensor([3.0, -2.0]), logps, ref_logps, mask, beta=0.1)
    # -0.1 * (log pi_old - log pi_ref) on every token, + the score on the last real one, 0 on padding
    assert rewards.tolist() == [pytest.approx([-0.05, 0.1, 0.0 + 3.0]), pytest.approx([0.01, -0.03 - 2.0, 0.0])]


def test_whitened_advantages_have_mean_0_and_std_1_over_the_completion_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = whiten(values, mask)
    real = out[mask.bool()]
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(1.25)
    assert real.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert out[~mask.bool()].tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------------------
# The clipped losses, token by token


def test_clipped_surrogate_matches_equation_7_and_clipped_tokens_get_no_gradient():
    epsilon = 0.2
    logps = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64,
                         requires_grad=True)
    # ratios 1.5, 0.5, 1.1, 0.7 in row 1 and the same in row 2, with advantages of both signs
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.7], [1.5, 0.5, 1.1, 0.7]], dtype=torch.float64)
    old_logps = logps.detach() - torch.log(ratios)
    advantages = torch.tensor([[1.0, 1.0, -2.0, -2.0], [-1.0, -1.0, 3.0, 0.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logps, old_logps, advantages, mask, epsilon)

    total, clipped, count = 0.0, 0, 0
    for i in range(2):
        for t in range(4):
            if not mask[i, t]:
                continue
            rho, a = ratios[i, t].item(), advantages[i, t].item()
            unclipped, clip_term = rho * a, min(max(rho, 1 - epsilon), 1 + epsilon) * a
            total += min(unclipped, clip_term)
            clipped += clip_term < unclipped
            count += 1
    assert loss.item() == pytest.approx(-total / count)
    assert stats["clip_fraction"].item() == pytest.approx(clipped / count)
    assert stats["approx_kl"].item() == pytest.approx(
        sum(r - 1 - math.log(r) for r in ratios[mask.bool()].tolist()) / count)
    grad, = torch.autograd.grad(loss, logps)
    # d/dlogp of -rho * A / count where the unclipped term is taken, 0 where the clip took over or on padding
    assert grad.tolist() == [pytest.approx([0.0, -0.5 / 7, 2.2 / 7, 0.0]), pytest.approx([1.5 / 7, 0.0, -3.3 / 7, 0.0])]


def test_clipped_value_loss_matches_ppo2():
    value_clip = 0.2
    values = torch.tensor([[1.0, 0.5, 2.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.4, 1.0]])
    returns = torch.tensor([[0.0, 1.0, 3.0]])
    mask = torch.tensor([[1, 1, 1]])
    loss, stats = ppo_value_loss(values, old_values, returns, mask, value_clip)
    # V_clip = [0.7, 0.5, 1.2]; errors (V - R)^2 = [1, 0.25, 1], (V_clip - R)^2 = [0.49, 0.25, 3.24]
    assert loss.item() == pytest.approx(0.5 * (1 + 0.25 + 3.24) / 3)
    assert stats["value_clip_fraction"].item() == pytest.approx(1 / 3)
    grad, = torch.autograd.grad(loss, values)
    # token 3 takes the clipped error: V moved 1.0 from V_old, beyond the 0.2 allowed, so it gets no gradient
    assert grad.tolist() == [pytest.approx([1.0 / 3, -0.5 / 3, 0.0])]


# ----------------------------------------------------------------------------------------------------------
# The rollout buffer


def test_rollout_buffer_serves_each_rollout_for_epochs_of_minibatches():
    buffer = RolloutBuffer(epochs=2, num_minibatches=3)
    made = []

    def make(offset):
        made.append(offset)
        return {"sequences": torch.arange(6)[:, None] + offset, "num_tokens": 1, "metrics": {}}

    seen, again = [], True
    while again:  # one optimizer step of two micro-batches per iteration
        first, second = buffer.rollout(lambda: make(0)), buffer.rollout(lambda: make(100))
        seen.append([buffer.minibatch(first)["sequences"][:, 0].tolist(),
                     buffer.minibatch(second)["sequences"][:, 0].tolist()])
        again = buffer.again({})
    assert made == [0, 100] and len(seen) == 6  # made once each, then reused for 2 x 3 updates
    for epoch in seen[:3], seen[3:]:
        rows = sorted(row for update in epoch for row in update[0])
        assert rows == list(range(6))  # each pass covers every row once, in minibatches of 2
        assert all(len(update[0]) == 2 for update in epoch)
        assert sorted(row for update in epoch for row in update[1]) == list(range(100, 106))  # the second's rollout
    assert [u[0] for u in seen[:3]] != [u[0] for u in seen[3:]]  # a fresh order each pass
    assert buffer.rollout(lambda: make(7))["sequences"][0, 0].item() == 7  # after the last update: a fresh one


def test_rollout_buffer_stops_early_past_target_kl():
    buffer = RolloutBuffer(epochs=4, target_kl=0.01)
    buffer.rollout(lambda: {"sequences": torch.zeros(2, 1)})
    assert buffer.again({"approx_kl": 0.0}) and buffer.again({"approx_kl": 0.005})
    assert not buffer.again({"approx_kl": 0.02})  # the rest of the rollout's updates are skipped
    assert buffer.update == 0 and buffer.rollouts == []


# ----------------------------------------------------------------------------------------------------------
# The value model


def test_value_model_starts_from_the_policy_trunk_with_values_0(tokenizer):
    policy = tiny_model(len(tokenizer))
    value_model = value_model_of(policy)
    assert isinstance(value_model, MiniMindRewardModel)
    for name, tensor in policy.model.state_dict().items():
        assert torch.equal(value_model.model.state_dict()[name], tensor)
    ids = torch.randint(0, len(tokenizer), (2, 9))
    assert value_model(ids).abs().max().item() == 0  # V = 0 at every token
    value_model.model.layers[0].mlp.gate_proj.weight.data.add_(1.0)
    assert not torch.equal(value_model.model.layers[0].mlp.gate_proj.weight, policy.model.layers[0].mlp.gate_proj.weight)


def test_optimizer_trains_the_value_model_at_its_own_rate(tokenizer):
    policy = tiny_model(len(tokenizer))
    model = PolicyAndValue(policy, value_model_of(policy), value_lr_ratio=0.1)
    args = type("Args", (), {"weight_decay": 0.1, "learning_rate": 1e-3, "device": "cpu"})()
    optimizer = trainer_utils.build_optimizer(model, args)
    value_params = {id(p) for p in model.value_model.parameters()}
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter once
    for group in optimizer.param_groups:
        in_value = {id(p) in value_params for p in group["params"]}
        assert in_value in ({True}, {False}, set())
        assert group["lr_ratio"] == (0.1 if in_value == {True} else 1.0) or not group["params"]
        assert group["weight_decay"] == (0.1 if all(p.dim() >= 2 for p in group["params"]) else 0.0)


# ----------------------------------------------------------------------------------------------------------
# The stage, through the real script


def ppo_argv(tmp_path: Path, *flags: str, prompts: int = 8) -> list[str]:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((GRPO_DATA / "gsm8k_train.jsonl").read_text().splitlines(keepends=True)[:prompts]))
    return ["--data_path", str(path), "--eval_data_path", "", "--save_dir", str(tmp_path / "out"),
            "--checkpoint_dir", str(tmp_path / "checkpoints"), "--hidden_size", "64", "--device", "cpu",
            "--dtype", "float32", "--log_interval", "1", "--warmup_steps", "1", "--min_lr_ratio", "1",
            "--reward_funcs", "test_ppo:count_letter_e", *flags]


@pytest.fixture
def sft_checkpoint(tokenizer, tmp_path) -> Path:
    """A tiny full_sft_64 checkpoint with random weights under tmp_path/out."""
    save_weights(tiny_model(len(tokenizer)), tokenizer, tmp_path / "out" / "full_sft_64")
    return tmp_path / "out" / "full_sft_64"


def step_records(tmp_path: Path, name: str = "ppo_64") -> list[dict]:
    lines = (tmp_path / "out" / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


@pytest.fixture
def ratios(monkeypatch) -> list[torch.Tensor]:
    """The ratios pi_theta / pi_old of every update of the run (recorded around train_ppo's clipped_surrogate)."""
    seen, surrogate = [], train_ppo.clipped_surrogate

    def recording(logps, old_logps, *rest):
        objective, ratio, clipped = surrogate(logps, old_logps, *rest)
        seen.append(ratio.detach().clone())
        return objective, ratio, clipped

    monkeypatch.setattr(train_ppo, "clipped_surrogate", recording)
    return seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_update_has_ratio_1_and_the_second_clips(tmp_path, sft_checkpoint, ratios, dtype):
    train_ppo.main(ppo_argv(tmp_path, "--dtype", dtype, "--batch_size", "4", "--max_new_tokens", "8",
                            "--ppo_epochs", "2", "--num_mini_batches", "1", "--max_steps", "2", "--learning_rate",
                            "5e-2", "--epsilon", "0.05"))
    first, second = ratios
    # pi_old and pi_theta by the same code, in the same precision: exactly 1 (upstream MiniMind #813: not so)
    assert torch.equal(first, torch.ones_like(first))
    assert (second - 1).abs().max() > 0.05
    records = step_records(tmp_path)
    assert records[0]["approx_kl"] == 0 and records[0]["clip_fraction"] == 0
    assert records[1]["approx_kl"] > 0 and records[1]["clip_fraction"] > 0
    assert records[0]["reward"] == records[1]["reward"]  # the same rollout, learned from twice


def test_target_kl_ends_a_rollout_early_and_the_run_ends_with_the_data(tmp_path, sft_checkpoint, monkeypatch):
    captured = []
    build = trainer_utils.build_optimizer
    monkeypatch.setattr(trainer_utils, "build_optimizer", lambda model, args: captured.append(build(model, args))
                        or captured[-1])
    result = train_ppo.main(ppo_argv(tmp_path, "--batch_size", "4", "--max_new_tokens", "8", "--ppo_epochs", "4",
                                     "--num_mini_batches", "1", "--learning_rate", "5e-2", "--target_kl", "1e-9",
                                     "--critic_learning_rate", "5e-3"))
    records = step_records(tmp_path)
    # 8 prompts, 2 rollouts of 4 updates planned; the second update of each passes the KL, the rest are skipped
    assert [record["approx_kl"] > 0 for record in records] == [False, True, False, True]
    assert records[1]["reward"] == records[0]["reward"] != records[2]["reward"]
    assert result["step"] == 4 and not result["stopped"]
    assert not (tmp_path / "out" / "ppo_64" / "PARTIAL.json").exists()  # the run finished: saved as done
    policy = load_pretrained(tmp_path / "out" / "ppo_64")  # the weights dir is the policy, a chat model
    assert policy.config.hidden_size == 64
    optimizer, = captured  # the value model ran at --critic_learning_rate, on the policy's schedule
    rates = sorted((group["lr_ratio"], group["lr"]) for group in optimizer.param_groups if group["params"])
    assert rates == [pytest.approx((0.1, 5e-3))] * 2 + [pytest.approx((1.0, 5e-2))] * 2  # matrices, norms


def test_a_run_resumed_mid_rollout_starts_a_fresh_rollout(tmp_path, sft_checkpoint):
    flags = ["--batch_size", "4", "--max_new_tokens", "8", "--ppo_epochs", "3", "--num_mini_batches", "1",
             "--learning_rate", "5e-2", "--critic_learning_rate", "5e-3", "--save_interval", "2"]
    train_ppo.main(ppo_argv(tmp_path, *flags, "--max_steps", "2"))  # stops after update 2 of rollout 1's 3
    assert [record["approx_kl"] > 0 for record in step_records(tmp_path)] == [False, True]
    train_ppo.main(ppo_argv(tmp_path, *flags, "--max_steps", "4", "--from_resume", "1"))
    records = step_records(tmp_path)
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert [record["approx_kl"] > 0 for record in records] == [False, True, False, True]  # step 3: a new rollout
    assert records[2]["reward"] != records[1]["reward"]


def test_mean_reward_rises_with_a_reward_given_by_import_path(tmp_path, sft_checkpoint):
    argv = ppo_argv(tmp_path, "--max_steps", "40", "--epochs", "10", "--batch_size", "32", "--max_new_tokens", "16",
                    "--ppo_epochs", "2", "--num_mini_batches", "2", "--learning_rate", "2e-2",
                    "--critic_learning_rate", "1e-3", "--lam", "1", prompts=32)
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "train_ppo.py"), *argv], capture_output=True,
                            text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = step_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 41))
    assert {"reward_count_letter_e", "kl", "approx_kl", "clip_fraction", "value_loss", "policy_loss",
            "value_clip_fraction", "completion_length"} <= set(records[0])
    rollouts = [r["reward"] for r in records[::4]]  # one rollout per 4 updates (2 epochs x 2 minibatches)
    first, last = sum(rollouts[:3]) / 3, sum(rollouts[-3:]) / 3
    assert last > 1.5 * first, rollouts  # a random model writes about 6 "e" in 16 tokens
    assert records[-1]["kl"] > 0
    assert (tmp_path / "out" / "ppo_64" / "model.safetensors").is_file()


def test_moe_policy_and_value_add_their_router_losses(tokenizer, tmp_path):
    model = tiny_model(len(tokenizer), use_moe=True)
    save_weights(model, tokenizer, tmp_path / "out" / "full_sft_64_moe")
    train_ppo.main(ppo_argv(tmp_path, "--use_moe", "1", "--max_steps", "2", "--max_new_tokens", "8", "--batch_size",
                            "2", "--ppo_epochs", "2", "--num_mini_batches", "1"))
    coef = model.config.router_aux_loss_coef
    records = step_records(tmp_path, "ppo_64_moe")
    assert len(records) == 2
    for record in records:
        assert record["aux_loss"] > 0
        assert record["loss"] == pytest.approx(record["ppo_loss"] + coef * record["aux_loss"], rel=1e-6)
        assert record["ppo_loss"] == pytest.approx(record["policy_loss"] + 0.1 * record["value_loss"], rel=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--from_weight", "none"], "--from_weight none: PPO starts from a trained chat model"),
    (["--batch_size", "2", "--num_mini_batches", "3"], "--num_mini_batches 3 exceeds --batch_size 2"),
    (["--parallel", "fsdp"], "--parallel fsdp: PPO trains a policy and a value model as one module"),
    (["--reward_funcs", "think_format", "length_penalty", "--reward_weights", "1"], "2 --reward_funcs"),
    (["--reward_funcs", "nope"], "--reward_funcs nope: unknown reward"),
    (["--reward_funcs", "gsm8k_accuracy", "--reward_model", "nowhere"], "--reward_model nowhere: no reward model"),
])
def test_user_mistakes_stop_the_run_with_a_message(tmp_path, sft_checkpoint, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_ppo.main(ppo_argv(tmp_path, *flags))
