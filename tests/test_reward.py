"""The reward model (model/model_reward.py, trainer/train_reward.py, its use in GRPO), as specifications.

The loss and its gradient are checked against InstructGPT's eq. 1 (Ouyang et al. 2022) computed by hand; the
model against transformers' Qwen3ForSequenceClassification, which has the same parameter names; loading against
the strict rule of model/loading.py; the stage end to end through the real script on pairs a tiny model can learn
in seconds; GRPO with --reward_model for a step. Every run writes under pytest's tmp_path.
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import Qwen3ForSequenceClassification

from conftest import tiny_model, write_jsonl
from dataset.chat_format import render_prompt, reply_ids
from model.hf_config import qwen3_config_of
from model.loading import load_pretrained
from model.model_reward import MiniMindRewardModel, load_reward_model, sequence_scores
from trainer import train_grpo, train_reward
from trainer.checkpoint import save_weights
from trainer.rewards import reward_model_function
from trainer.train_reward import bradley_terry_loss, reward_batch_loss

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
TINY = ["--hidden_size", "64", "--max_seq_len", "64", "--device", "cpu", "--dtype", "float32"]


def tiny_reward_model(vocab_size: int = 6400, seed: int = 0) -> MiniMindRewardModel:
    """The reward model of conftest's tiny chat model (2 layers, hidden_size 64), its head seeded too."""
    torch.manual_seed(seed + 1)
    return MiniMindRewardModel.from_causal_lm(tiny_model(vocab_size, seed)).eval()


def pair(question: str, chosen: str, rejected: str) -> dict:
    prompt = [{"role": "user", "content": question}]
    return {"chosen": prompt + [{"role": "assistant", "content": chosen}],
            "rejected": prompt + [{"role": "assistant", "content": rejected}]}


# ----------------------------------------------------------------------------------------------------------
# The loss


def test_bradley_terry_loss_and_gradient_match_hand_computed_values():
    chosen = torch.tensor([2.0, 0.0, -1.0, 30.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([1.0, 0.0, 3.0, -30.0], dtype=torch.float64, requires_grad=True)
    losses = bradley_terry_loss(chosen, rejected)
    # -log sigmoid(m) = log(1 + exp(-m)) for the margins m = 1, 0, -4, 60
    assert losses.tolist() == pytest.approx([0.31326168751822286, math.log(2), 4.0181499279178094, 8.75e-27],
                                            rel=1e-12)
    losses.sum().backward()
    # d/dr_chosen = -(1 - sigmoid(m)) = -1 / (1 + exp(m)); d/dr_rejected is its opposite
    expected = [-0.2689414213699951, -0.5, -0.9820137900379085, -8.75e-27]
    assert chosen.grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert rejected.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-12)


def test_batch_loss_reads_each_reply_at_its_last_token(tokenizer, tmp_path):
    from dataset.lm_dataset import DPODataset

    records = [pair("hi", "hello there, how can I help?", "no"), pair("how are you?", "fine", "go away now")]
    dataset = DPODataset(write_jsonl(tmp_path / "pairs.jsonl", records), tokenizer, 64)
    batch = dataset.collate([dataset[0], dataset[1]])
    model = tiny_reward_model(len(tokenizer))
    with torch.no_grad():
        loss, metrics = reward_batch_loss(model, batch)
        alone = [model(item[f"{side}_input_ids"][None])[0, -1] for side in ("chosen", "rejected")
                 for item in (dataset[0], dataset[1])]  # each reply unpadded, scored at its <|im_end|>
    chosen, rejected = torch.stack(alone).chunk(2)
    assert loss.item() == pytest.approx(bradley_terry_loss(chosen, rejected).mean().item(), abs=1e-5)
    assert metrics["reward_margin"].item() == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert metrics["reward_accuracy"].item() == (chosen > rejected).float().mean().item()


# ----------------------------------------------------------------------------------------------------------
# The model


def test_sequence_scores_pick_the_last_attended_token_for_left_and_right_padding():
    per_token = torch.arange(12, dtype=torch.float32).view(3, 4)  # row r, position t: 4r + t
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert sequence_scores(per_token, right).tolist() == [1.0, 7.0, 8.0]
    assert sequence_scores(per_token, left).tolist() == [3.0, 7.0, 11.0]
    assert sequence_scores(per_token, None).tolist() == [3.0, 7.0, 11.0]


def test_scores_match_transformers_qwen3_sequence_classifier(tmp_path):
    model = tiny_reward_model(vocab_size=128)
    model.save_pretrained(tmp_path)
    config = qwen3_config_of(model.config)
    config.num_labels, config.pad_token_id = 1, 0
    reference = Qwen3ForSequenceClassification.from_pretrained(tmp_path, config=config).eval()
    input_ids = torch.randint(1, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:], attention_mask[2, 3:] = 0, 0  # right padding, with the pad id 0 where the mask is 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    with torch.no_grad():
        ours = sequence_scores(model(input_ids, attention_mask), attention_mask)
        theirs = reference(input_ids, attention_mask=attention_mask).logits.squeeze(-1)
    assert (ours - theirs).abs().max().item() < 1e-5


def test_padding_does_not_change_a_sequence_score():
    model = tiny_reward_model(vocab_size=128)
    ids = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        alone = model(ids)[0, -1]
        right = sequence_scores(model(torch.cat([ids, pad], 1), torch.tensor([[1] * 7 + [0] * 3])),
                                torch.tensor([[1] * 7 + [0] * 3]))
    assert right.item() == pytest.approx(alone.item(), abs=1e-5)


def test_full_sft_checkpoint_loads_into_the_trunk_tensor_for_tensor(tokenizer, tmp_path):
    chat_model = tiny_model(len(tokenizer))
    save_weights(chat_model, tokenizer, tmp_path / "full_sft_64")
    reward_model = MiniMindRewardModel.from_causal_lm(load_pretrained(tmp_path / "full_sft_64"))
    trunk = chat_model.model.state_dict()
    names = set(reward_model.state_dict())
    assert names == {f"model.{name}" for name in trunk} | {"score.weight"}
    for name, tensor in reward_model.model.state_dict().items():
        assert torch.equal(tensor, trunk[name]), name
    # the head: InstructGPT's scalar on the last hidden state, normal(0, 1 / sqrt(hidden_size + 1)) at the start
    assert reward_model.score.weight.shape == (1, 64)
    assert 0.5 / math.sqrt(65) < reward_model.score.weight.std().item() < 1.5 / math.sqrt(65)


def test_a_missing_tensor_of_the_start_checkpoint_is_named(tokenizer, tmp_path):
    save_weights(tiny_model(len(tokenizer)), tokenizer, tmp_path / "out" / "full_sft_64")
    weights = tmp_path / "out" / "full_sft_64" / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        train_reward.main(["--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ck"), *TINY])


def test_save_and_load_round_trip_is_exact(tokenizer, tmp_path):
    model = tiny_reward_model(len(tokenizer))
    save_weights(model, tokenizer, tmp_path / "reward_64")
    config = json.loads((tmp_path / "reward_64" / "config.json").read_text())
    assert config["architectures"] == ["MiniMindRewardModel"]
    loaded = load_reward_model(tmp_path / "reward_64")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # equal weights; the last bit may differ (the loaded head's memory is aligned otherwise)
        assert (loaded(ids) - model(ids)).abs().max().item() < 1e-6


def test_reward_model_loading_is_strict_and_names_what_is_wrong(tokenizer, tmp_path):
    save_weights(tiny_reward_model(len(tokenizer)), tokenizer, tmp_path / "reward_64")
    save_weights(tiny_model(len(tokenizer)), tokenizer, tmp_path / "full_sft_64")
    with pytest.raises(SystemExit, match="is a MiniMindForCausalLM, not a reward model"):
        load_reward_model(tmp_path / "full_sft_64")
    with pytest.raises(SystemExit, match="--from_weight: .* holds a reward model"):
        load_pretrained(tmp_path / "reward_64")  # a chat tool given the reward model
    with pytest.raises(SystemExit, match="--reward_model .*nowhere: no reward model there"):
        load_reward_model(tmp_path / "nowhere")
    weights = tmp_path / "reward_64" / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    del tensors["score.weight"]
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"missing: score\.weight"):
        load_reward_model(tmp_path / "reward_64")


# ----------------------------------------------------------------------------------------------------------
# The stage, through the real script

QUESTIONS = ["Can you help me?", "What time is it?", "Tell me about cats.", "Where is the station?",
             "How do I cook rice?", "What is your name?", "Is it going to rain?", "Can I borrow a pen?"]
OPENINGS = ["Well", "So", "Okay", "Look", "Right", "Hmm", "Sure", "Listen"]
ENDINGS = ["the answer is here", "this is what I think", "that is all I know", "here it comes",
           "you asked about it", "it depends on the day", "let me explain", "that is my reply"]
KIND = ["please", "thanks", "kindly", "gladly", "sincerely", "warmly", "respectfully", "gratefully"]
RUDE = ["idiot", "stupid", "moron", "loser", "fool", "dumb", "useless", "pathetic"]


def kind_word_pairs(seed: int, count: int) -> list[dict]:
    """Pairs whose two replies differ in one word: a kind one in the chosen reply, an insult in the rejected one,
    the rest (question, opening, ending) drawn at random and shared. A random model ranks them at about chance
    (held-out accuracy 0.38-0.70 and loss 0.66-0.75 over six seeds of tiny_model and its head)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        question, opening, ending = rng.choice(QUESTIONS), rng.choice(OPENINGS), rng.choice(ENDINGS)
        records.append(pair(question, f"{opening} {rng.choice(KIND)}, {ending}.",
                            f"{opening} {rng.choice(RUDE)}, {ending}."))
    return records


def test_reward_model_learns_held_out_preferences(tokenizer, tmp_path):
    save_weights(tiny_model(len(tokenizer)), tokenizer, tmp_path / "out" / "full_sft_64")
    train = write_jsonl(tmp_path / "train.jsonl", kind_word_pairs(0, 64))
    held_out = write_jsonl(tmp_path / "test.jsonl", kind_word_pairs(1, 64))  # new combinations of the words
    argv = ["--data_path", str(train), "--eval_data_path", str(held_out), "--save_dir", str(tmp_path / "out"),
            "--checkpoint_dir", str(tmp_path / "ck"), "--batch_size", "8", "--learning_rate",
            "1e-3", "--warmup_steps", "2", "--log_interval", "1", *TINY]
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "train_reward.py"), *argv], capture_output=True,
                            text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "runs" / "reward_64" / "metrics.jsonl").open()]
    steps = [record for record in records if "loss" in record]
    assert [record["step"] for record in steps] == list(range(1, 9))  # 1 epoch of 8 batches of 8 pairs
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= set(steps[0])
    final = [record for record in records if "eval_loss" in record][-1]
    assert final["eval_reward_accuracy"] > 0.9, final  # chance: 0.5
    assert final["eval_reward_margin"] > 1 and final["eval_loss"] < 0.3, final
    # the saved directory is a reward model that ranks a held-out pair as the run's eval did
    model = load_reward_model(tmp_path / "out" / "reward_64")
    score = reward_model_function(str(tmp_path / "out" / "reward_64"), "cpu")
    prompt = tokenizer.decode(render_prompt(tokenizer, [{"role": "user", "content": "Can I borrow a pen?"}]))
    kind, rude = score([prompt] * 2, ["Sure gladly, let me explain.", "Sure moron, let me explain."])
    assert kind > rude
    assert not any(p.requires_grad for p in model.parameters())


def test_moe_reward_model_adds_the_router_loss(tokenizer, tmp_path):
    model = tiny_model(len(tokenizer), use_moe=True)
    save_weights(model, tokenizer, tmp_path / "out" / "full_sft_64_moe")
    train = write_jsonl(tmp_path / "train.jsonl", kind_word_pairs(0, 8))
    train_reward.main(["--data_path", str(train), "--eval_data_path", "", "--save_dir", str(tmp_path / "out"),
                       "--checkpoint_dir", str(tmp_path / "ck"), "--use_moe", "1", "--batch_size", "4",
                       "--log_interval", "1", *TINY])
    coef = model.config.router_aux_loss_coef
    lines = (tmp_path / "out" / "runs" / "reward_64_moe" / "metrics.jsonl").read_text().splitlines()
    records = [record for record in map(json.loads, lines) if "loss" in record]
    assert len(records) == 2
    for record in records:
        assert record["aux_loss"] > 0
        assert record["loss"] == pytest.approx(record["reward_loss"] + coef * record["aux_loss"], rel=1e-6)
    assert load_reward_model(tmp_path / "out" / "reward_64_moe").config.use_moe


def test_reward_needs_a_trained_start(tmp_path):
    with pytest.raises(SystemExit, match="--from_weight none: a reward model starts from a trained chat model"):
        train_reward.main(["--from_weight", "none", "--save_dir", str(tmp_path / "out"), *TINY])


# ----------------------------------------------------------------------------------------------------------
# The reward in GRPO


def test_reward_function_scores_what_the_reward_model_was_trained_on(tokenizer, tmp_path):
    model = tiny_reward_model(len(tokenizer))
    save_weights(model, tokenizer, tmp_path / "reward_64")
    messages = [{"role": "user", "content": "Tell me a joke."}]
    replies = ["Why did the chicken cross the road?", "No.", "<think>\nshort\n</think>\n\nA pun."]
    prompt = tokenizer.decode(render_prompt(tokenizer, messages))  # as GRPO decodes its prompts
    scores = reward_model_function(str(tmp_path / "reward_64"), "cpu")([prompt] * 3, replies)
    with torch.no_grad():  # the tokens DPODataset gives the reward model in training: prompt, reply, <|im_end|>
        expected = [model(torch.tensor([render_prompt(tokenizer, messages)
                                        + reply_ids(tokenizer, {"role": "assistant", "content": reply})]))[0, -1]
                    for reply in replies]
    assert scores == pytest.approx([value.item() for value in expected], abs=1e-5)


def test_grpo_adds_the_reward_model_score_to_the_rewards(tokenizer, tmp_path):
    save_weights(tiny_model(len(tokenizer)), tokenizer, tmp_path / "out" / "full_sft_64")
    save_weights(tiny_reward_model(len(tokenizer)), tokenizer, tmp_path / "reward_64")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((REPO / "dataset" / "data" / "grpo" / "gsm8k_train.jsonl").read_text()
                               .splitlines(keepends=True)[:4]))
    train_grpo.main(["--data_path", str(prompts), "--eval_data_path", "", "--save_dir", str(tmp_path / "out"),
                     "--checkpoint_dir", str(tmp_path / "ck"), "--max_steps", "1", "--num_generations", "2",
                     "--max_new_tokens", "8", "--log_interval", "1", "--reward_funcs", "length_penalty",
                     "--reward_model", str(tmp_path / "reward_64"), *TINY])
    records = [json.loads(line) for line in (tmp_path / "out" / "runs" / "grpo_64" / "metrics.jsonl").open()]
    step = [record for record in records if "loss" in record][0]
    assert step["reward_model"] != 0
    assert step["reward"] == pytest.approx(step["reward_model"] + step["reward_length_penalty"], rel=1e-5, abs=1e-6)
    with pytest.raises(SystemExit, match="--reward_model .*: this checkpoint is a MiniMindForCausalLM"):
        train_grpo.main(["--save_dir", str(tmp_path / "out"), "--reward_model", str(tmp_path / "out" / "full_sft_64"),
                         *TINY])
