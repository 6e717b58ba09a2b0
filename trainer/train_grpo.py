"""Group Relative Policy Optimization (GRPO): a chat model improves from rewards on its own sampled answers.

For each prompt q the model samples a group of G completions o_1..o_G, reward functions score them (r_1..r_G), and
each completion's advantage is its reward measured against its own group, so no value network is needed
(Shao et al. 2024, "DeepSeekMath", section 4.1, outcome supervision, 4.1.2):

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)           the same A_i for every token t of o_i

The policy pi_theta then maximizes the clipped objective of eq. 3 with a KL penalty to a frozen reference pi_ref:

    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it * A_i, clip(rho_it, 1 - epsilon, 1 + epsilon) * A_i) - beta * KL_it ]
    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    KL_it  = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1                           (eq. 4, per token, >= 0)

and the loss is -J, averaged over the groups of a batch. pi_old is the policy that sampled the group. The KL term
keeps the policy near the reference; the k3 estimator of eq. 4 is unbiased and never negative. std is the
population standard deviation of the group, eps = 1e-4; a group whose completions all get the same reward has
advantage 0 and teaches nothing (reward_std shows how many do not).

Each group serves --num_iterations (mu) optimizer steps (the inner loop of the paper's Algorithm 1): the first
update samples it and keeps the sampling policy's log-probabilities (pi_old); the next ones reuse the group
(trainer/rollouts.py RolloutBuffer), so rho leaves 1 and the clip acts. --loss_type picks the objective:

    grpo     DeepSeekMath eq. 3 above: each completion's token mean, then the mean over the completions
    dr_grpo  Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): no 1/|o_i| and no std: A_i =
             r_i - mean(r), and the token sum divided by a constant, G * --max_new_tokens, so long wrong answers
             are not penalized less per token than short ones
    dapo     DAPO (Yu et al. 2025): token-level mean, 1/sum_i |o_i| sum_i sum_t, so every token weighs alike; with
             --epsilon_high its decoupled clip, clip(rho, 1 - epsilon, 1 + epsilon_high) (the paper: 0.2, 0.28)
    cispo    CISPO (MiniMax-M1, MiniMax 2025): the clip moves from the objective to the importance weight, which
             is truncated and carries no gradient: sg(min(rho, 1 + epsilon_high)) * A_i * log pi_theta, token-level
             mean as DAPO's; no token loses its gradient

(all with the same -beta * KL_it, aggregated as the rest; DAPO and CISPO drop the KL term: --beta 0).

Where this script departs from the paper (as nanochat's chat_rl.py lists its own departures):

1. With --num_iterations 1 (the default, as the paper's own experiments: "the policy model only has a single
   update following each exploration stage", section 4.2) each group gets one gradient step and is dropped, so
   pi_old = pi_theta at that step, rho = 1, no token is clipped and --epsilon has no effect (clip_fraction is 0):
   the gradient is that of A_i * log pi_theta, REINFORCE with group-normalized rewards, plus the KL term. With
   --num_iterations mu > 1 the ratio leaves 1 from the second update on and the clip acts (clip_fraction > 0;
   approx_kl, the k3 estimate of KL(pi_old || pi_theta), shows how far the policy moved from the sampling one).
2. One iteration of the paper's iterative GRPO (Algorithm 1): the reference pi_ref is the --from_weight checkpoint
   for the whole run, never reset to the current policy.
3. Rule-based rewards (trainer/rewards.py: exact match of the final number, DeepSeek-R1's format reward, DAPO's
   overlong penalty) by default; a learned reward model (--reward_model) is frozen, never trained further; outcome
   supervision only (section 4.1.2), no process supervision (4.1.3).
4. Log-probabilities are taken at the sampling temperature (the logits divided by it, as trl's GRPOTrainer does).
5. DAPO's dynamic sampling (resampling until no group has equal rewards) is not done; such groups stay, with
   advantage 0. The token-level means of dapo and cispo run over each micro-batch's tokens, and the loop weighs
   micro-batches by their rows: with --accumulation_steps 1 on one process, exactly the paper's mean.

Rollouts happen inside the loss: each batch is a batch of prompts (dataset/rl_dataset.py); on a group's first
update the loss samples G completions per prompt with the model's KV-cached `generate`, scores them
(trainer/rewards.py) and runs the reference over prompt + completion; every update runs one forward pass of the
policy (with gradients). Logged: reward (the weighted sum) and reward_<function> for each reward function,
reward_std, kl, approx_kl, completion_length (tokens, end of turn included), clip_fraction; the eval
(--eval_data_path) reports the same on held-out prompts. Here --batch_size counts prompts and --max_seq_len caps a
prompt's tokens (longer prompts are dropped).

Defaults: the prompts of dataset/data/grpo/gsm8k_train.jsonl (400 GSM8K training questions; reward: exact match of
the final number, the <think> format and DAPO's overlong penalty; held-out: the 100 prompts of gsm8k_test.jsonl,
sampled as in training, 10 of them every 25 steps), starting from out/full_sft_<hidden_size>, 8 completions of at
most 128 tokens per prompt, 2 prompts per step, one update per group, loss_type grpo, beta 0.04 (the paper's),
epsilon 0.2 (active from the second update of a group), learning rate 1e-4 (DPO's here; the paper's 1e-6 is for a
7B model), no weight decay (the KL term is the regularizer, as in DPO).

A model that has never written <think> gets no format reward, so there is nothing to learn from (log p(<think>) is
about -14.5 for the quick-path SFT model). DeepSeek-R1's "cold start" first shows the format with a little SFT on
replies that reason (dataset/data/grpo/gsm8k_reasoning_sft.jsonl):

    python trainer/train_full_sft.py --from_weight full_sft --save_weight reason_sft --epochs 4 --warmup_steps 5 \
        --data_path dataset/data/grpo/gsm8k_reasoning_sft.jsonl --eval_data_path ""
    python trainer/train_grpo.py --from_weight reason_sft --max_steps 150
    python trainer/train_grpo.py --num_iterations 2 --loss_type dapo --epsilon_high 0.28 --beta 0
    python trainer/train_grpo.py --reward_funcs think_format my_rewards:brevity --reward_weights 1 0.5
    torchrun --nproc_per_node 2 trainer/train_grpo.py                 # two processes (two GPUs, or CPU with gloo)

Writes out/grpo_<hidden_size>/ and out/runs/grpo_<hidden_size>/metrics.jsonl.
"""

import argparse

import torch
from transformers import GenerationConfig

from dataset.rl_dataset import PromptDataset
from trainer.rollouts import (LOSS_TYPES, RolloutBuffer, add_reward_flags, add_sampling_flags, check_rewards,
                              completion_logprobs, generation_config, group_advantages, grpo_loss, load_rewards,
                              sample_completions, score_rollout)
from trainer.rollouts import completion_mask, score_completions  # noqa: F401 (this script's names before the move)
from trainer.trainer_utils import (REPO_ROOT, count_rows, load_model, load_reference, non_negative_float, parse_args,
                                   positive_float, positive_int, require_trained_start, run_main, setup_run, train,
                                   unwrap, with_router_loss)

GRPO_DATA = REPO_ROOT / "dataset" / "data" / "grpo"


def grpo_rollout(model, reference, tokenizer, batch: dict, rewards: list[tuple], generation: GenerationConfig,
                 args) -> dict:
    """Sample a group per prompt, score it, and compute what every update of the group needs (no gradient).

    Returns:
        {"sequences", "attention_mask": (B*G, P + T), "num_tokens": T, "mask": (B*G, T) completion tokens,
         "ref_logps": (B*G, T), "advantages": (B*G,), "metrics": reward figures of the group}
    """
    group = args.num_generations
    sequences, attention_mask, num_tokens = sample_completions(unwrap(model), batch, generation, group)
    completion_ids, mask = sequences[:, -num_tokens:], attention_mask[:, -num_tokens:]
    scores, reward_means = score_rollout(tokenizer, batch, completion_ids, mask, rewards, generation.max_new_tokens,
                                         group)
    with torch.no_grad():
        ref_logps, _ = completion_logprobs(reference, sequences, attention_mask, num_tokens, generation.temperature)
    metrics = {"reward": scores.mean(), **reward_means,
               "reward_std": scores.view(-1, group).std(dim=1, unbiased=False).mean(),
               "completion_length": mask.sum(dim=1).float().mean()}
    return {"sequences": sequences, "attention_mask": attention_mask, "num_tokens": num_tokens, "mask": mask,
            "ref_logps": ref_logps, "metrics": metrics,
            "advantages": group_advantages(scores, group, scale=args.loss_type != "dr_grpo")}


def grpo_batch_loss(model, reference, tokenizer, batch: dict, rewards: list[tuple], generation: GenerationConfig,
                    args, buffer: RolloutBuffer | None = None) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of a batch of prompts (+ MoE balance loss) and the figures, on its group's current update.

    Args:
        model: the policy, possibly DDP-wrapped; reference: the frozen reference model, same device.
        batch: PromptDataset.collate output, its tensors on the device: input_ids, attention_mask (B, P), and
            fields, one dict of the record's extra fields per prompt (a Python list).
        rewards: (name, function, weight) triples; generation: the sampling settings (max_new_tokens, temperature,
            end tokens ...); args: the flags num_generations, beta, epsilon, epsilon_high, loss_type.
        buffer: keeps the groups for --num_iterations updates (trainer/rollouts.py); None, and in evaluation (no
            gradient): a fresh group, used once.
    Returns:
        (scalar loss, {"reward", "reward_<name>", "reward_std", "kl", "approx_kl", "clip_fraction",
        "completion_length"}; for MoE also "grpo_loss" and "aux_loss").
    """
    def make() -> dict:
        return grpo_rollout(model, reference, tokenizer, batch, rewards, generation, args)

    rollout = buffer.rollout(make) if buffer is not None and torch.is_grad_enabled() else make()
    logps, aux_loss = completion_logprobs(model, rollout["sequences"], rollout["attention_mask"],
                                          rollout["num_tokens"], generation.temperature)
    if "old_logps" not in rollout:  # the group's first update: the policy being trained is the one that sampled
        rollout["old_logps"] = logps.detach()  # same forward, same precision: rho is exactly 1 now
    loss, stats = grpo_loss(logps, rollout["old_logps"], rollout["ref_logps"], rollout["advantages"],
                            rollout["mask"], args.epsilon, args.beta, args.loss_type, args.epsilon_high,
                            generation.max_new_tokens)
    return with_router_loss(model, loss, aux_loss, {**rollout["metrics"], **stats}, "grpo_loss")


def add_grpo_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("GRPO")
    group.add_argument("--num_generations", type=positive_int, default=8,
                       help="completions sampled per prompt (the group size G, >= 2); the step's batch is "
                            "--batch_size x G completions")
    add_sampling_flags(group)
    group.add_argument("--beta", type=non_negative_float, default=0.04,
                       help="weight of the KL penalty to the reference (the --from_weight model); 0: no penalty")
    group.add_argument("--epsilon", type=positive_float, default=0.2,
                       help="clip range of the probability ratio (eq. 3); acts from the second update of a group "
                            "on (--num_iterations > 1): with one update the ratio is 1 and nothing is clipped")
    group.add_argument("--epsilon_high", type=positive_float,
                       help="upper clip range, clip(rho, 1 - epsilon, 1 + epsilon_high) (DAPO's clip-higher, 0.28 "
                            "in the paper); for cispo the truncation of the importance weight at 1 + epsilon_high "
                            "(default: --epsilon)")
    group.add_argument("--num_iterations", type=positive_int, default=1,
                       help="optimizer steps per group of completions (mu in DeepSeekMath's Algorithm 1): the first "
                            "samples the group, the others reuse it (the ratio leaves 1 and the clip acts); each "
                            "counts as a step of --max_steps")
    group.add_argument("--loss_type", choices=LOSS_TYPES, default="grpo",
                       help="grpo: DeepSeekMath eq. 3 (per-completion token mean); dr_grpo: Dr. GRPO (no length or "
                            "std normalization); dapo: DAPO's token-level mean; cispo: MiniMax-M1's clipped "
                            "importance-sampling weights (formulas in the module docstring)")
    add_reward_flags(group)


def main(argv: list[str] | None = None) -> dict:
    # 1. Flags: the shared ones with this stage's defaults, plus the group, sampling, objective and rewards
    args = parse_args("grpo", __doc__, add_flags=add_grpo_flags, argv=argv, defaults={
        "data_path": str(GRPO_DATA / "gsm8k_train.jsonl"),
        "eval_data_path": str(GRPO_DATA / "gsm8k_test.jsonl"),
        "eval_interval": 25,
        "eval_batches": 5,
        "log_interval": 1,  # each step's figures: the reward of one step's groups is the curve to watch
        "from_weight": "full_sft",
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "batch_size": 2,
        "warmup_steps": 10,
    })
    setup_run(args)  # device, dtype, torchrun's process group, seeds
    require_trained_start(args, "GRPO")
    if args.num_generations < 2:
        raise SystemExit("--num_generations must be >= 2: advantages compare the completions of a group")
    rewards = load_rewards(args)  # (name, function, weight): --reward_funcs, then --reward_model if given
    model, tokenizer = load_model(args)

    # 2. The reference: the --from_weight checkpoint again, frozen (it stays the start even under --from_resume 1)
    reference = load_reference(args)
    generation = generation_config(args, tokenizer)  # sampling; a completion ends at <|im_end|> or <|endoftext|>

    # 3. Dataset: prompts through the chat template, left-padded, with the fields the rewards read
    train_dataset = PromptDataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
    eval_dataset = (PromptDataset(args.eval_data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
                    if args.eval_data_path else None)
    check_rewards(rewards, [train_dataset, eval_dataset])

    # 4. Loss: rollouts, rewards, group advantages and the --loss_type objective (grpo_batch_loss), in the shared
    #    loop: accumulation, clipping, schedule, logging, eval, checkpoints, resume. No cross-entropy: no perplexity.
    #    Each group serves --num_iterations steps: the buffer keeps it, and the loop reuses its prompts meanwhile.
    buffer = RolloutBuffer(epochs=args.num_iterations)

    def loss_fn(model, batch):
        return grpo_batch_loss(model, reference, tokenizer, batch, rewards, generation, args, buffer)

    return train(args, model, tokenizer, train_dataset, loss_fn, eval_dataset=eval_dataset, eval_perplexity=False,
                 count_items=count_rows,  # the loss averages over sequences, so a step weighs its micro-batches by rows
                 reuse=buffer)


if __name__ == "__main__":
    run_main(main)
