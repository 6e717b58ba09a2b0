"""Direct Preference Optimization (DPO): teach a chat model to prefer one reply over another, without a reward model.

Each training sample is a prompt x with two replies, a chosen y_w and a rejected y_l. DPO (Rafailov et al. 2023,
"Direct Preference Optimization: Your Language Model is Secretly a Reward Model", eq. 7) minimizes

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

where pi is the model being trained (the policy), ref a frozen copy of where it started (the SFT model), and
log p(y|x) the sum of the log-probabilities of the reply's tokens, its closing <|im_end|> included, given the
prompt (no loss on the prompt). beta * (log pi(y|x) - log ref(y|x)) is the reward the policy implicitly assigns
to a reply; the loss raises the chosen reply's reward above the rejected one's, and beta sets how far the policy
may move from the reference to do so (smaller beta: further). The log shows these rewards: rewards_chosen,
rewards_rejected, their difference reward_margin, and reward_accuracy, the fraction of pairs whose chosen reward
is the higher; the eval reports the same figures on held-out pairs (eval_reward_accuracy ...). At the first step
the policy equals the reference: every reward is 0 and the loss is log 2 = 0.693.

One forward pass of the policy scores the chosen and the rejected replies of a batch together (DPODataset puts
them in one batch of 2B rows), and one forward pass of the reference, without gradients, gives their reference
log-probabilities.

Defaults: dataset/data/dpo.jsonl (1,000 HH-RLHF harmless pairs; 200 more held out in dpo_test.jsonl), starting
from out/full_sft_<hidden_size>, beta 0.1 (the paper's), 2 epochs of 8 pairs per step (250 steps), peak learning
rate 1e-4: a tenth of our SFT rate (1e-3). DPO recipes run at 1/10 to 1/40 of their SFT rate (Zephyr-7B: SFT 2e-5,
DPO 5e-7; the DPO paper: 1e-6); we take the upper end because the run is short. No weight decay: the pull toward
the reference is the regularizer, and decay toward 0 would pull away from it.

    python trainer/train_dpo.py                              # after trainer/train_full_sft.py
    python trainer/train_dpo.py --beta 0.3 --epochs 1        # stay closer to the SFT model
    torchrun --nproc_per_node 2 trainer/train_dpo.py         # two processes (two GPUs, or CPU with gloo)

Writes out/dpo_<hidden_size>/ (chat with it: scripts/chat.py --model_path out/dpo_256) and
out/runs/dpo_<hidden_size>/metrics.jsonl.
"""

import argparse

import torch
import torch.nn.functional as F

from dataset.lm_dataset import DPODataset
from model.model_minimind import token_logprobs
from trainer.trainer_utils import (REPO_ROOT, count_rows, load_model, load_reference, parse_args, positive_float,
                                   require_trained_start, run_main, setup_run, train, with_router_loss)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each row's labelled tokens: sum over t with labels[t+1] != -100 of log p(labels[t+1] | ..t).

    Args:
        logits: (rows, seq, vocab) next-token logits; position t predicts token t + 1.
        labels: (rows, seq) token ids, IGNORE_INDEX (-100) where nothing is scored (prompt, padding).
    Returns:
        (rows,) float32 sums of natural-log probabilities (nats; 0 for a row with no label).
    """
    return token_logprobs(logits, labels).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of each pair (Rafailov et al. 2023, eq. 7), and the rewards its replies implicitly get (eq. 5,
    less the beta * log Z(x) term that cancels in their difference).

        reward(y) = beta * (log pi(y|x) - log ref(y|x))
        loss = -log sigmoid(reward(y_chosen) - reward(y_rejected))

    Args:
        policy_chosen, policy_rejected, reference_chosen, reference_rejected: (pairs,) sequence log-probabilities
            (sequence_logprobs) of the chosen and rejected replies under the policy and the reference.
        beta: > 0, the strength of the pull toward the reference.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (pairs,); the rewards carry gradients too.
    """
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)  # logsigmoid: no overflow for large margins
    return losses, chosen_rewards, rejected_rewards


def dpo_batch_loss(model, reference, batch: dict, beta: float) -> tuple[torch.Tensor, dict]:
    """Mean DPO loss of a DPODataset batch (+ the MoE load-balancing loss), and the reward figures to log.

    Args:
        model: the policy, MiniMindForCausalLM, possibly wrapped (DDP).
        reference: the frozen reference model, on the same device.
        batch: input_ids, labels (2B, seq), optional attention_mask: rows 0..B-1 the chosen replies, B..2B-1 the
            rejected ones (DPODataset.collate).
        beta: see dpo_loss.
    Returns:
        (scalar loss, {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"}: means over the
        pairs; for MoE also "dpo_loss" and "aux_loss", the loss being dpo_loss + router_aux_loss_coef * aux_loss)
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    out = model(**inputs)
    policy_chosen, policy_rejected = sequence_logprobs(out.logits, batch["labels"]).chunk(2)  # (B,) each
    with torch.no_grad():
        reference_logps = sequence_logprobs(reference(**inputs).logits, batch["labels"])
    reference_chosen, reference_rejected = reference_logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                        reference_rejected, beta)
    loss = losses.mean()
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {"rewards_chosen": chosen_rewards.mean(), "rewards_rejected": rejected_rewards.mean(),
               "reward_margin": (chosen_rewards - rejected_rewards).mean(),
               "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean()}
    return with_router_loss(model, loss, out.aux_loss, metrics, "dpo_loss")


def add_dpo_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DPO")
    group.add_argument("--beta", type=positive_float, default=0.1,
                       help="strength of the pull toward the reference (--from_weight) model; the paper uses 0.1 "
                            "to 0.5")


def main(argv: list[str] | None = None) -> dict:
    # 1. Flags: the shared ones with this stage's defaults, plus --beta
    args = parse_args("dpo", __doc__, add_flags=add_dpo_flags, argv=argv, defaults={
        "data_path": str(REPO_ROOT / "dataset" / "data" / "dpo.jsonl"),
        "eval_data_path": str(REPO_ROOT / "dataset" / "data" / "dpo_test.jsonl"),
        "from_weight": "full_sft",
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "epochs": 2,
        "batch_size": 8,
    })
    setup_run(args)  # device, dtype, torchrun's process group, seeds
    require_trained_start(args, "DPO")
    model, tokenizer = load_model(args)

    # 2. The reference: the --from_weight checkpoint again, frozen. It stays what the run started from even when
    #    --from_resume 1 loads trained weights into the policy.
    reference = load_reference(args)

    # 3. Dataset: preference pairs through the chat template, labels -100 outside the final replies
    train_dataset = DPODataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
    eval_dataset = (DPODataset(args.eval_data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
                    if args.eval_data_path else None)

    # 4. Loss: eq. 7 of the DPO paper (dpo_batch_loss), in the shared loop: accumulation, clipping, schedule,
    #    logging, eval, checkpoints, resume. The loss is no cross-entropy, so eval reports no perplexity.
    def loss_fn(model, batch):
        return dpo_batch_loss(model, reference, batch, args.beta)

    return train(args, model, tokenizer, train_dataset, loss_fn, eval_dataset=eval_dataset, eval_perplexity=False,
                 count_items=count_rows)  # the loss averages over pairs, so a step weighs its micro-batches by rows


if __name__ == "__main__":
    run_main(main)
