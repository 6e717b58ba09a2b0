"""DPO (trainer/train_dpo.py, DPODataset in dataset/lm_dataset.py), as specifications.

The loss is checked against eq. 7 of Rafailov et al. 2023 written out directly, and against trl's DPOTrainer when
trl is installed; the dataset against the chat template; the stage end to end on a few shipped pairs with a tiny
model on CPU. Every run writes under pytest's tmp_path.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import tiny_model, write_jsonl
from dataset.lm_dataset import DataFormatError, DPODataset, check_dpo_record, read_jsonl
from model.model_minimind import IGNORE_INDEX
from trainer import train_dpo
from trainer.checkpoint import save_weights
from trainer.train_dpo import dpo_batch_loss, dpo_loss, sequence_logprobs
from trainer.trainer_utils import load_pretrained, load_reference, run_main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dataset" / "data"
TINY = ["--hidden_size", "64", "--max_seq_len", "64", "--device", "cpu", "--dtype", "float32", "--warmup_steps", "2"]


def shipped_pairs(tmp_path: Path, name: str, lines: int) -> Path:
    """The first `lines` pairs of a shipped DPO file."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join((DATA / f"{name}.jsonl").read_text().splitlines(keepends=True)[:lines]))
    return path


def chat(*turns: str, system: str | None = None) -> list[dict]:
    """Alternating user/assistant messages from plain strings."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def pair(prompt: list[dict], chosen: str, rejected: str) -> dict:
    return {"chosen": prompt + [{"role": "assistant", "content": chosen}],
            "rejected": prompt + [{"role": "assistant", "content": rejected}]}


# ----------------------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_and_gradient_match_equation_7(beta):
    generator = torch.Generator().manual_seed(0)
    logps = [(-50 * torch.rand(6, generator=generator, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = logps

    losses, chosen_rewards, rejected_rewards = dpo_loss(*logps, beta)
    ours = losses.mean()
    ours_grad = torch.autograd.grad(ours, logps)
    # eq. 7, written as in the paper
    z = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    paper = -torch.log(torch.sigmoid(z)).mean()
    paper_grad = torch.autograd.grad(paper, logps)

    torch.testing.assert_close(ours, paper)
    for got, expected in zip(ours_grad, paper_grad):
        torch.testing.assert_close(got, expected)
    # eq. 8: the gradient weighs each pair by sigmoid(reward_rejected - reward_chosen) = sigmoid(-z)
    torch.testing.assert_close(ours_grad[0], -beta * torch.sigmoid(-z.detach()) / 6)
    torch.testing.assert_close(chosen_rewards, beta * (policy_chosen - reference_chosen))
    torch.testing.assert_close(rejected_rewards, beta * (policy_rejected - reference_rejected))


def test_sequence_logprobs_sums_the_labelled_next_token_logprobs():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.0, -1.0], [3.0, 1.0, 2.0], [0.0, 0.0, 0.0]],
                           [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 4.0, 0.0], [1.0, 2.0, 3.0]]])  # (2, 4, 3)
    labels = torch.tensor([[IGNORE_INDEX, 2, 0, IGNORE_INDEX],  # row 0 scores: logits[0, 0] -> 2, logits[0, 1] -> 0
                           [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])  # nothing

    def log_softmax(values, index):
        return values[index] - math.log(sum(math.exp(v) for v in values))

    expected = log_softmax([1.0, 2.0, 0.0], 2) + log_softmax([0.5, 0.0, -1.0], 0)
    got = sequence_logprobs(logits, labels)
    assert got.shape == (2,) and got.dtype == torch.float32
    assert got.tolist() == pytest.approx([expected, 0.0], abs=1e-6)


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards(tokenizer, tmp_path):
    dataset = DPODataset(shipped_pairs(tmp_path, "dpo", 4), tokenizer, 96)
    batch = dataset.collate([dataset[i] for i in range(4)])
    model = tiny_model(len(tokenizer))
    loss, metrics = dpo_batch_loss(model, copy.deepcopy(model).requires_grad_(False), batch, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert {key: value.item() for key, value in metrics.items()} == {
        "rewards_chosen": 0.0, "rewards_rejected": 0.0, "reward_margin": 0.0, "reward_accuracy": 0.0}
    loss.backward()  # at the start the gradient still pushes the chosen replies up and the rejected ones down
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_one_padded_forward_scores_each_reply_as_alone(tokenizer, tmp_path):
    dataset = DPODataset(shipped_pairs(tmp_path, "dpo", 3), tokenizer, 96)
    batch = dataset.collate([dataset[i] for i in range(3)])
    assert "attention_mask" in batch  # the sides have different lengths: padding is in play
    policy, reference = tiny_model(len(tokenizer), seed=0), tiny_model(len(tokenizer), seed=1)
    _, metrics = dpo_batch_loss(policy, reference, batch, beta=0.5)

    def alone(model, side):  # (pairs,) log-probabilities from one unpadded forward per sequence
        return torch.stack([sequence_logprobs(model(dataset[i][f"{side}_input_ids"][None]).logits,
                                              dataset[i][f"{side}_labels"][None])[0] for i in range(3)])

    with torch.no_grad():
        chosen = 0.5 * (alone(policy, "chosen") - alone(reference, "chosen"))
        rejected = 0.5 * (alone(policy, "rejected") - alone(reference, "rejected"))
    assert metrics["rewards_chosen"].item() == pytest.approx(chosen.mean().item(), abs=1e-4)
    assert metrics["rewards_rejected"].item() == pytest.approx(rejected.mean().item(), abs=1e-4)
    assert metrics["reward_accuracy"].item() == pytest.approx((chosen > rejected).float().mean().item())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecations, raised inside trl
def test_loss_matches_trl_dpo_trainer_on_the_same_batch(tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # trl 1.x has no standalone loss function: the sigmoid loss lives in DPOTrainer._compute_loss, so build a trainer
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    policy, reference = Qwen3ForCausalLM(config), Qwen3ForCausalLM(config)
    records = [json.loads(line) for line in (DATA / "dpo.jsonl").read_text().splitlines()[:4]]
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4, max_length=None,
                         beta=0.1, use_cpu=True, bf16=False)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])  # 4 chosen rows, then 4 rejected
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grad = policy.lm_head.weight.grad.clone()
    policy.zero_grad()

    # ours on trl's tokens: labels are the completion tokens (trl scores the newline after <|im_end|> too)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    policy_chosen, policy_rejected = sequence_logprobs(policy(**inputs).logits, labels).chunk(2)
    with torch.no_grad():
        reference_chosen, reference_rejected = sequence_logprobs(reference(**inputs).logits, labels).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                        reference_rejected, beta=0.1)
    losses.mean().backward()

    trl_metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], rel=1e-4, abs=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], rel=1e-4, abs=1e-6)
    assert (chosen_rewards > rejected_rewards).float().mean().item() == trl_metrics["rewards/accuracies"]
    # trl's fused head sums its float32 products in another order: close, not bitwise equal
    torch.testing.assert_close(policy.lm_head.weight.grad, trl_grad, rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The dataset


def labelled_tokens(item, side: str) -> list[int]:
    labels, input_ids = item[f"{side}_labels"], item[f"{side}_input_ids"]
    assert torch.equal(labels[labels != IGNORE_INDEX], input_ids[labels != IGNORE_INDEX])  # aligned, shifted later
    return labels[labels != IGNORE_INDEX].tolist()


def prompt_tokens(item, side: str) -> list[int]:
    labels = item[f"{side}_labels"]
    first_reply_token = int((labels != IGNORE_INDEX).nonzero()[0])
    assert (labels[first_reply_token:] != IGNORE_INDEX).all()  # the reply is one run at the end
    return item[f"{side}_input_ids"][:first_reply_token].tolist()


def test_labels_cover_exactly_the_final_reply_and_its_im_end(tokenizer, tmp_path):
    prompt = chat("Hi!", "Hello, how can I help?", "讲个笑话", system="You are helpful.")
    path = write_jsonl(tmp_path / "d.jsonl", [pair(prompt, "好的：小猫说喵。", "不要。")])
    dataset = DPODataset(path, tokenizer, 512)
    item = dataset[0]
    assert tokenizer.decode(labelled_tokens(item, "chosen")) == "好的：小猫说喵。<|im_end|>"
    assert tokenizer.decode(labelled_tokens(item, "rejected")) == "不要。<|im_end|>"
    # the earlier assistant reply is context here, not a target
    assert tokenizer.decode(prompt_tokens(item, "chosen")) == tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True)
    assert prompt_tokens(item, "chosen") == prompt_tokens(item, "rejected")
    assert dataset.lengths == [len(item["chosen_input_ids"])] and item["chosen_input_ids"].dtype == torch.long


def test_prompt_tokens_are_shared_even_where_a_reply_would_merge_with_the_header(tokenizer, tmp_path):
    # "\n" + "  x": tokenized as one text, the header's newline and the spaces merge into one token
    dataset = DPODataset(write_jsonl(tmp_path / "d.jsonl", [pair(chat("q"), "  x", "y")]), tokenizer, 512)
    item = dataset[0]
    assert prompt_tokens(item, "chosen") == prompt_tokens(item, "rejected")
    assert tokenizer.decode(labelled_tokens(item, "chosen")) == "  x<|im_end|>"


def test_truncation_keeps_the_replies_and_cuts_the_shared_prompt_from_the_left(tokenizer, tmp_path):
    records = [pair(chat("a long question " * 30), "short reply", "a somewhat longer reply than the other"),
               pair(chat("q"), "a reply far too long to fit " * 20, "ok")]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    full, cut = DPODataset(path, tokenizer, 4096), DPODataset(path, tokenizer, 40)

    # pair 0: the replies fit whole; the longer one fills max_seq_len, the prompt keeps its last tokens
    assert len(cut[0]["rejected_input_ids"]) == 40 and cut.lengths[0] == 40
    for side in ("chosen", "rejected"):
        assert labelled_tokens(cut[0], side) == labelled_tokens(full[0], side)
        kept = prompt_tokens(cut[0], side)
        assert kept == prompt_tokens(full[0], side)[-len(kept):]
    assert prompt_tokens(cut[0], "chosen") == prompt_tokens(cut[0], "rejected")

    # pair 1: a reply longer than max_seq_len is cut on the right; one prompt token is left to predict its start
    assert labelled_tokens(cut[1], "chosen") == labelled_tokens(full[1], "chosen")[:39]
    assert prompt_tokens(cut[1], "chosen") == prompt_tokens(cut[1], "rejected") == prompt_tokens(full[1], "chosen")[-1:]
    assert labelled_tokens(cut[1], "rejected") == labelled_tokens(full[1], "rejected")


def test_collate_puts_chosen_rows_then_rejected_rows_in_one_padded_batch(tokenizer, tmp_path):
    records = [pair(chat("hi"), "hello", "go away"), pair(chat("how are you today?"), "fine, thanks a lot!", "bad")]
    dataset = DPODataset(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, 512)
    batch = dataset.collate([dataset[0], dataset[1]])
    rows = [dataset[0]["chosen_input_ids"], dataset[1]["chosen_input_ids"],
            dataset[0]["rejected_input_ids"], dataset[1]["rejected_input_ids"]]
    width = max(len(row) for row in rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(tensor.shape == (4, width) for tensor in batch.values())
    for i, row in enumerate(rows):
        assert torch.equal(batch["input_ids"][i, :len(row)], row)
        assert batch["attention_mask"][i].tolist() == [1] * len(row) + [0] * (width - len(row))
        assert (batch["labels"][i, len(row):] == IGNORE_INDEX).all()


CHOSEN_AND_REJECTED = pair(chat("q"), "a", "b")
BAD_LINES = {  # name: (record, words of the message)
    "different prompts": ({"chosen": chat("q", "a"), "rejected": chat("other q", "b")},
                          "chosen and rejected prompts differ (first difference at message 0)"),
    "an extra turn": ({"chosen": chat("q", "a"), "rejected": chat("q0", "a0", "q", "b")},
                      "chosen and rejected prompts differ (first difference at message 0)"),
    "a different system message": ({"chosen": chat("q", "a", system="s"), "rejected": chat("q", "b")},
                                   "chosen and rejected prompts differ (first difference at message 0)"),
    "a later difference": ({"chosen": chat("q", "a", "q2", "c"), "rejected": chat("q", "b", "q2", "d")},
                           "chosen and rejected prompts differ (first difference at message 1)"),
    "missing rejected": ({"chosen": chat("q", "a")}, 'missing key "rejected"'),
    "chosen not a list": ({"chosen": "a", "rejected": chat("q", "b")}, '"chosen" must be a non-empty list'),
    "rejected ends with a user message": ({"chosen": chat("q", "a"), "rejected": chat("q")},
                                          "rejected must end with an assistant message"),
    "message without content": ({"chosen": chat("q") + [{"role": "assistant"}], "rejected": chat("q", "b")},
                                'chosen[1]: "content" must be a string'),
}


@pytest.mark.parametrize("name", BAD_LINES)
def test_bad_pair_error_names_file_and_line(tokenizer, tmp_path, name):
    record, words = BAD_LINES[name]
    path = write_jsonl(tmp_path / "d.jsonl", [CHOSEN_AND_REJECTED, record])
    with pytest.raises(DataFormatError) as error:
        DPODataset(path, tokenizer, 64)
    assert str(error.value).startswith(f"{path}:2: ") and words in str(error.value)


def test_shipped_pairs_validate_and_load(tokenizer):
    assert len(read_jsonl(DATA / "dpo.jsonl", check_dpo_record)) == 1000
    test_pairs = DPODataset(DATA / "dpo_test.jsonl", tokenizer, 256)
    assert len(test_pairs) == 200 and max(test_pairs.lengths) <= 256
    assert tokenizer.decode(labelled_tokens(test_pairs[0], "chosen")).endswith("<|im_end|>")


# ----------------------------------------------------------------------------------------------------------
# The stage


@pytest.fixture
def sft_save_dir(tokenizer, tmp_path) -> Path:
    """A --save_dir holding a tiny full_sft_64 checkpoint (random weights: DPO only needs a starting point)."""
    save_weights(tiny_model(len(tokenizer)), tokenizer, tmp_path / "out" / "full_sft_64")
    return tmp_path / "out"


def dpo_argv(tmp_path, save_dir, *extra) -> list[str]:
    return ["--data_path", str(shipped_pairs(tmp_path, "dpo", 12)),
            "--eval_data_path", str(shipped_pairs(tmp_path, "dpo_test", 4)),
            "--save_dir", str(save_dir), "--checkpoint_dir", str(tmp_path / "checkpoints"),
            "--batch_size", "4", "--log_interval", "1", "--eval_interval", "3", *TINY, *extra]


def test_dpo_trains_from_full_sft_and_keeps_the_reference_frozen(tmp_path, sft_save_dir, monkeypatch):
    loaded = []

    def recording_load_reference(args):
        loaded.append(load_reference(args))
        return loaded[-1]

    monkeypatch.setattr(train_dpo, "load_reference", recording_load_reference)
    summary = train_dpo.main(dpo_argv(tmp_path, sft_save_dir, "--max_steps", "3", "--learning_rate", "1e-3"))

    assert summary["step"] == 3 and summary["weights_dir"] == str(sft_save_dir / "dpo_64")
    metrics_file = sft_save_dir / "runs" / "dpo_64" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    assert [record["step"] for record in steps] == [1, 2, 3]
    first = steps[0]  # scored before the first update, when the policy is the reference
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [first[key] for key in ("rewards_chosen", "rewards_rejected", "reward_margin")] == pytest.approx(
        [0, 0, 0], abs=1e-6)
    assert steps[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # ... and then it moves
    evals = [record for record in records if "eval_loss" in record]
    assert len(evals) == 1 and {"eval_reward_accuracy", "eval_reward_margin"} <= set(evals[0])
    assert "eval_ppl" not in evals[0]  # the DPO loss is no cross-entropy

    sft_weights = safetensors.torch.load_file(sft_save_dir / "full_sft_64" / "model.safetensors")
    (reference,) = loaded
    assert not any(p.requires_grad for p in reference.parameters())
    for name, tensor in reference.state_dict().items():
        if name in sft_weights:  # the tied lm_head is stored once
            assert torch.equal(tensor, sft_weights[name]), name
    trained = load_pretrained(sft_save_dir / "dpo_64")
    assert not torch.equal(trained.model.norm.weight, reference.model.norm.weight)
    assert trained.config.num_hidden_layers == 2  # the shape came from the checkpoint


def test_moe_policy_adds_the_router_loss(tokenizer, tmp_path):
    save_weights(tiny_model(len(tokenizer), use_moe=True), tokenizer, tmp_path / "out" / "full_sft_64_moe")
    train_dpo.main(dpo_argv(tmp_path, tmp_path / "out", "--use_moe", "1", "--max_steps", "2", "--eval_data_path", ""))
    config = json.loads((tmp_path / "out" / "full_sft_64_moe" / "config.json").read_text())
    lines = (tmp_path / "out" / "runs" / "dpo_64_moe" / "metrics.jsonl").read_text().splitlines()
    records = [record for record in map(json.loads, lines) if "loss" in record]  # the steps' records
    assert len(records) == 2
    for record in records:
        assert record["loss"] == pytest.approx(record["dpo_loss"] + config["router_aux_loss_coef"] * record["aux_loss"],
                                               rel=1e-6)
    assert records[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_mismatched_prompts_end_the_run_with_one_line_naming_file_and_line(tmp_path, sft_save_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [CHOSEN_AND_REJECTED, BAD_LINES["different prompts"][0]])
    with pytest.raises(SystemExit) as error:
        run_main(lambda: train_dpo.main([*dpo_argv(tmp_path, sft_save_dir), "--data_path", str(path)]))
    assert str(error.value.code).startswith(f"{path}:2: chosen and rejected prompts differ")


@pytest.mark.parametrize("flags, message", [
    (["--from_weight", "none"], "--from_weight none: DPO starts from a trained chat model"),
    (["--from_weight", "pretrain"], "--from_weight pretrain: no checkpoint at"),
])
def test_dpo_needs_a_checkpoint_to_start_from(tmp_path, sft_save_dir, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_dpo.main([*dpo_argv(tmp_path, sft_save_dir), *flags])


def test_beta_must_be_positive(tmp_path, sft_save_dir, capsys):
    with pytest.raises(SystemExit):
        train_dpo.main([*dpo_argv(tmp_path, sft_save_dir), "--beta", "0"])
    assert "--beta: must be a finite number > 0" in capsys.readouterr().err
