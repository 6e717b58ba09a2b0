"""Reward model: learn to score replies the way people ranked them, for PPO and GRPO to optimize against.

Each training sample is a prompt x with two replies, a chosen y_w and a rejected y_l (the DPO pair format). The
reward model r(x, y) is the SFT chat model with its language-model head replaced by a linear head that gives one
number at the reply's last token (model/model_reward.py). It is trained as InstructGPT's reward model (Ouyang et
al. 2022, section 3.5, eq. 1, with K = 2 replies per prompt), the Bradley-Terry model of a preference
(Bradley & Terry 1952): the probability that y_w is preferred is sigmoid(r(x, y_w) - r(x, y_l)), and

    L = -log sigmoid( r(x, y_w) - r(x, y_l) )

averaged over the pairs. Only differences of rewards enter the loss, so the reward's zero is arbitrary (the head
has no bias). The log shows rewards_chosen, rewards_rejected, their difference reward_margin, and reward_accuracy,
the fraction of pairs whose chosen reply scores higher; the eval reports the same on held-out pairs
(eval_reward_accuracy, eval_reward_margin ...): held-out accuracy is the figure of a reward model (0.5 is chance).
The head starts small and random (model/model_reward.py): the first rewards are of order 1, and the first loss is
near log 2 = 0.693, its value when the two rewards are equal.

Where this script departs from InstructGPT:

1. Two replies per prompt (K = 2), not 4 to 9 ranked ones: each pair is its own comparison, and a batch holds the
   two replies of each of its pairs (DPODataset puts them in one batch of 2B rows, one forward pass).
2. No reward normalization after training (InstructGPT shifts the rewards so the SFT demonstrations score 0 on
   average); GRPO normalizes rewards within each group anyway.

Defaults: dataset/data/dpo.jsonl (1,000 HH-RLHF harmless pairs; 200 more held out in dpo_test.jsonl), starting
from out/full_sft_<hidden_size>, 1 epoch of 8 pairs per step (InstructGPT trains its reward model for one epoch:
more overfits), peak learning rate 1e-4 (DPO's here), no weight decay.

    python trainer/train_reward.py                              # after trainer/train_full_sft.py
    python trainer/train_grpo.py --reward_model out/reward_256 --reward_funcs length_penalty ...
    torchrun --nproc_per_node 2 trainer/train_reward.py         # two processes (two GPUs, or CPU with gloo)

Writes out/reward_<hidden_size>/ (a MiniMindRewardModel; open it with model.model_reward.load_reward_model) and
out/runs/reward_<hidden_size>/metrics.jsonl.
"""

import torch
import torch.nn.functional as F

from dataset.lm_dataset import DPODataset
from model.model_reward import MiniMindRewardModel, sequence_scores
from trainer.trainer_utils import (REPO_ROOT, count_rows, load_model, parse_args, run_main, setup_run, train,
                                   with_router_loss)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """The reward-model loss of each pair: InstructGPT's eq. 1 (Ouyang et al. 2022) for K = 2,

        loss = -log sigmoid(r_chosen - r_rejected),   d loss / d r_chosen = -(1 - sigmoid(r_chosen - r_rejected))

    Args:
        chosen_rewards, rejected_rewards: (pairs,) rewards of the chosen and the rejected reply of each pair.
    Returns:
        (pairs,) losses, in nats (log 2 when the two rewards are equal).
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards)  # logsigmoid: no overflow for large margins


def reward_batch_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean Bradley-Terry loss of a DPODataset batch (+ the MoE load-balancing loss), and the figures to log.

    Args:
        model: MiniMindRewardModel, possibly wrapped (DDP).
        batch: input_ids (2B, seq), optional attention_mask (right padding): rows 0..B-1 the chosen replies,
            B..2B-1 the rejected ones (DPODataset.collate). Its labels are not used: the reward is read at the
            last real token, the reply's closing <|im_end|>.
    Returns:
        (scalar loss, {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"}: means over the
        pairs, ties counting as wrong; for MoE also "reward_loss" and "aux_loss")
    """
    attention_mask = batch.get("attention_mask")
    per_token, aux_loss = model(input_ids=batch["input_ids"], attention_mask=attention_mask, return_aux_loss=True)
    chosen_rewards, rejected_rewards = sequence_scores(per_token, attention_mask).chunk(2)  # (B,) each
    loss = bradley_terry_loss(chosen_rewards, rejected_rewards).mean()
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {"rewards_chosen": chosen_rewards.mean(), "rewards_rejected": rejected_rewards.mean(),
               "reward_margin": (chosen_rewards - rejected_rewards).mean(),
               "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean()}
    return with_router_loss(model, loss, aux_loss, metrics, "reward_loss")


def main(argv: list[str] | None = None) -> dict:
    # 1. Flags: the shared ones with this stage's defaults
    args = parse_args("reward", __doc__, argv=argv, defaults={
        "data_path": str(REPO_ROOT / "dataset" / "data" / "dpo.jsonl"),
        "eval_data_path": str(REPO_ROOT / "dataset" / "data" / "dpo_test.jsonl"),
        "from_weight": "full_sft",
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "batch_size": 8,
    })
    setup_run(args)  # device, dtype, torchrun's process group, seeds
    if args.from_weight == "none":
        raise SystemExit("--from_weight none: a reward model starts from a trained chat model (InstructGPT's from "
                         "its SFT model); pass --from_weight full_sft (after trainer/train_full_sft.py) or a directory")

    # 2. Model: the --from_weight chat model (strictly loaded, with its tokenizer), its language-model head
    #    replaced by a fresh scalar head
    chat_model, tokenizer = load_model(args)
    model = MiniMindRewardModel.from_causal_lm(chat_model)
    del chat_model

    # 3. Dataset: preference pairs through the chat template, the two replies of a pair in one batch
    train_dataset = DPODataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
    eval_dataset = (DPODataset(args.eval_data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
                    if args.eval_data_path else None)

    # 4. Loss: eq. 1 of InstructGPT (reward_batch_loss), in the shared loop: accumulation, clipping, schedule,
    #    logging, eval, checkpoints, resume. The loss is no cross-entropy, so eval reports no perplexity.
    return train(args, model, tokenizer, train_dataset, reward_batch_loss, eval_dataset=eval_dataset,
                 eval_perplexity=False, count_items=count_rows)  # the loss averages over pairs: weigh by rows


if __name__ == "__main__":
    run_main(main)
