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

Where this script departs from the paper (as nanochat's chat_rl.py lists its own departures):

1. One update per rollout, so no clipping. Each group gets one gradient step and is then dropped (as in the
   paper's own experiments, "the policy model only has a single update following each exploration stage",
   section 4.2, though eq. 3 is written for mu > 1 updates). So pi_old = pi_theta at that step, rho = 1, no token
   is clipped and --epsilon has no effect (the logged clip_fraction is 0): the gradient is that of
   A_i * log pi_theta, REINFORCE with group-normalized rewards, plus the KL term. grpo_loss keeps the clip for
   when several updates reuse a group.
2. One iteration of the paper's iterative GRPO (Algorithm 1): the reference pi_ref is the --from_weight checkpoint
   for the whole run, never reset to the current policy.
3. Rule-based rewards (trainer/rewards.py: exact match of the final number, DeepSeek-R1's format reward, DAPO's
   overlong penalty) instead of a learned reward model, so there is no reward model to keep training; outcome
   supervision only (section 4.1.2), no process supervision (4.1.3).
4. Log-probabilities are taken at the sampling temperature (the logits divided by it, as trl's GRPOTrainer does).

Rollouts happen inside the loss: each batch is a batch of prompts (dataset/rl_dataset.py); the loss samples G
completions per prompt with the model's KV-cached `generate`, scores them (trainer/rewards.py), then runs one
forward pass of the policy (with gradients) and one of the reference over prompt + completion. Logged: reward (the
weighted sum) and reward_<function> for each reward function, reward_std, kl, completion_length (tokens, end of turn
included), clip_fraction; the eval (--eval_data_path) reports the same on held-out prompts. Here --batch_size counts
prompts and --max_seq_len caps a prompt's tokens (longer prompts are dropped).

Defaults: the prompts of dataset/data/grpo/gsm8k_train.jsonl (400 GSM8K training questions; reward: exact match of
the final number, the <think> format and DAPO's overlong penalty; held-out: the 100 prompts of gsm8k_test.jsonl,
sampled as in training, 10 of them every 25 steps), starting from out/full_sft_<hidden_size>, 8 completions of at
most 128 tokens per prompt, 2 prompts per step, beta 0.04 (the paper's), epsilon 0.2 (inactive: see 1.), learning rate
1e-4 (DPO's here; the paper's 1e-6 is for a 7B model), no weight decay (the KL term is the regularizer, as in DPO).

A model that has never written <think> gets no format reward, so there is nothing to learn from (log p(<think>) is
about -14.5 for the quick-path SFT model). DeepSeek-R1's "cold start" first shows the format with a little SFT on
replies that reason (dataset/data/grpo/gsm8k_reasoning_sft.jsonl):

    python trainer/train_full_sft.py --from_weight full_sft --save_weight reason_sft --epochs 4 --warmup_steps 5 \
        --data_path dataset/data/grpo/gsm8k_reasoning_sft.jsonl --eval_data_path ""
    python trainer/train_grpo.py --from_weight reason_sft --max_steps 150
    python trainer/train_grpo.py --reward_funcs think_format my_rewards:brevity --reward_weights 1 0.5
    torchrun --nproc_per_node 2 trainer/train_grpo.py                 # two processes (two GPUs, or CPU with gloo)

Writes out/grpo_<hidden_size>/ and out/runs/grpo_<hidden_size>/metrics.jsonl.
"""

import argparse

import torch
from transformers import GenerationConfig

from dataset.rl_dataset import PromptDataset
from model.model_minimind import token_logprobs
from trainer.rewards import check_reward_fields, load_reward_function
from trainer.trainer_utils import (REPO_ROOT, count_rows, fraction, load_model, load_reference, parse_args,
                                   positive_float, positive_int, require_trained_start, run_main, setup_run, train,
                                   unwrap, with_router_loss)

ADVANTAGE_EPS = 1e-4  # keeps A finite for a group whose rewards are all equal (then A = 0)
GRPO_DATA = REPO_ROOT / "dataset" / "data" / "grpo"


def group_advantages(rewards: torch.Tensor, num_generations: int, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """Outcome-supervision advantages (DeepSeekMath section 4.1.2): each reward normalized within its group.

    Args:
        rewards: (groups * num_generations,) rewards, the G completions of a prompt next to each other.
    Returns:
        (groups * num_generations,) (r_i - mean of the group) / (population std of the group + eps).
    """
    grouped = rewards.view(-1, num_generations)  # (groups, G)
    mean, std = grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + eps)).flatten()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, epsilon: float, beta: float) -> tuple[torch.Tensor, dict]:
    """-J of DeepSeekMath eq. 3 (clipped ratio objective, k3 KL of eq. 4 to the reference), per-completion token
    means averaged over the completions.

    Args:
        logps, old_logps, ref_logps: (N, T) log-probabilities of each completion token under the policy being
            trained (with gradients), the policy that sampled it, and the reference.
        advantages: (N,) one advantage per completion (group_advantages).
        mask: (N, T) 1 on the completion's tokens (its end-of-turn included), 0 on the padding after it.
        epsilon: clip range of the ratio; beta: weight of the KL penalty.
    Returns:
        (scalar loss, {"kl": mean per-token KL, "clip_fraction": fraction of tokens whose clipped term was the
        smaller one, i.e. that get no gradient}), both means over the completion tokens.
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages[:, None]
    log_ratio_ref = ref_logps - logps
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1  # (N, T), k3 estimator of KL(pi_theta || pi_ref)
    per_token = -(torch.min(unclipped, clipped) - beta * kl)
    mask = mask.to(per_token.dtype)
    loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()  # 1/|o_i| sum_t, then 1/G sum_i
    tokens = mask.sum().clamp(min=1)
    stats = {"kl": (kl.detach() * mask).sum() / tokens,
             "clip_fraction": ((clipped < unclipped).to(mask.dtype) * mask).sum() / tokens}
    return loss, stats


def completion_mask(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """(N, T) LongTensor: 1 up to and including each row's first end token, 0 after it (generate's padding); all 1
    for a row that ran out of budget without one."""
    is_end = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    ended_before = is_end.cumsum(dim=1) - is_end.long()  # end tokens strictly before each position
    return (ended_before == 0).long()


def completion_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, num_completion_tokens: int,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the last `num_completion_tokens` tokens of each row, each given the tokens before it.

    The logits are divided by the sampling temperature, so these are the probabilities the tokens were sampled
    with (as in trl's GRPOTrainer). Only the completion's logits are computed (logits_to_keep).
    Args:
        sequences: (N, P + T) left-padded prompts followed by their completions; attention_mask: (N, P + T).
    Returns:
        ((N, T) float32 log-probabilities, the MoE load-balancing loss or None).
    """
    out = model(input_ids=sequences, attention_mask=attention_mask, logits_to_keep=num_completion_tokens + 1)
    # (N, T + 1): the token before the completion, then the completion; position t scores token t + 1
    labels = sequences[:, -(num_completion_tokens + 1):]
    token_logps = token_logprobs(out.logits.float() / temperature, labels)  # (N, T + 1), the last position 0
    return token_logps[:, :-1], out.aux_loss


@torch.no_grad()
def sample_completions(model, batch: dict, generation: GenerationConfig, num_generations: int):
    """G sampled completions per prompt, with the model in eval mode and the KV cache.

    Args:
        model: MiniMindForCausalLM (unwrapped); batch: left-padded prompts {"input_ids", "attention_mask"} (B, P).
    Returns:
        (sequences (B*G, P + T): each prompt G times, rows of one prompt next to each other, then its completions;
         attention_mask (B*G, P + T): the prompt's mask, then completion_mask; T: completion tokens).
    """
    was_training = model.training
    model.eval()
    prompt_ids = batch["input_ids"].repeat_interleave(num_generations, dim=0)  # (B*G, P)
    prompt_mask = batch["attention_mask"].repeat_interleave(num_generations, dim=0)
    sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation)
    model.train(was_training)
    completion_ids = sequences[:, prompt_ids.shape[1]:]  # (B*G, T)
    mask = completion_mask(completion_ids, generation.eos_token_id)
    return sequences, torch.cat([prompt_mask, mask], dim=1), completion_ids.shape[1]


def score_completions(rewards: list[tuple], prompts: list[str], completions: list[str], fields: dict[str, list],
                      device) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the reward functions' scores.

    Args:
        rewards: (name, function, weight) triples; prompts, completions, fields: see trainer/rewards.py.
    Returns:
        ((N,) float32 rewards, {"reward_<name>": mean score of that function}).
    """
    total, means = torch.zeros(len(completions), device=device), {}
    for name, function, weight in rewards:
        scores = torch.tensor(function(prompts, completions, **fields), dtype=torch.float32, device=device)
        if scores.shape != total.shape:
            raise SystemExit(f"--reward_funcs {name}: returned {scores.numel()} rewards for {len(completions)} "
                             "completions; a reward function returns one float per completion")
        total += weight * scores
        means[f"reward_{name}"] = scores.mean()
    return total, means


def grpo_batch_loss(model, reference, tokenizer, batch: dict, rewards: list[tuple], generation: GenerationConfig,
                    args) -> tuple[torch.Tensor, dict]:
    """Sample a group per prompt, score it, and return the GRPO loss of the batch (+ MoE balance loss) and the figures.

    Args:
        model: the policy, possibly DDP-wrapped; reference: the frozen reference model, same device.
        batch: PromptDataset.collate output, its tensors on the device: input_ids, attention_mask (B, P), and
            fields, one dict of the record's extra fields per prompt (a Python list).
        rewards: (name, function, weight) triples; generation: the sampling settings (max_new_tokens, temperature,
            end tokens ...); args: the flags num_generations, beta, epsilon.
    Returns:
        (scalar loss, {"reward", "reward_<name>", "reward_std", "kl", "clip_fraction", "completion_length"}; for MoE
        also "grpo_loss" and "aux_loss").
    """
    group = args.num_generations
    sequences, attention_mask, num_tokens = sample_completions(unwrap(model), batch, generation, group)
    completion_ids, mask = sequences[:, -num_tokens:], attention_mask[:, -num_tokens:]

    prompts = [tokenizer.decode(ids[keep.bool()]) for ids, keep in zip(batch["input_ids"], batch["attention_mask"])]
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)  # drops end token and padding
    records = batch["fields"]
    shared = set.intersection(*(set(record) for record in records))  # PromptDataset.field_names is a subset
    fields = {key: [record[key] for record in records for _ in range(group)] for key in shared}
    fields.update(completion_tokens=mask.sum(dim=1).tolist(), max_new_tokens=[generation.max_new_tokens] * len(mask))
    scores, reward_means = score_completions(rewards, [p for p in prompts for _ in range(group)], completions, fields,
                                             sequences.device)
    advantages = group_advantages(scores, group)

    logps, aux_loss = completion_logprobs(model, sequences, attention_mask, num_tokens, generation.temperature)
    with torch.no_grad():
        ref_logps, _ = completion_logprobs(reference, sequences, attention_mask, num_tokens, generation.temperature)
    # one update per group: the policy that sampled it is the current one (see the module docstring)
    loss, stats = grpo_loss(logps, logps.detach(), ref_logps, advantages, mask, args.epsilon, args.beta)
    metrics = {"reward": scores.mean(), **reward_means,
               "reward_std": scores.view(-1, group).std(dim=1, unbiased=False).mean(), **stats,
               "completion_length": mask.sum(dim=1).float().mean()}
    return with_router_loss(model, loss, aux_loss, metrics, "grpo_loss")


def add_grpo_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("GRPO")
    group.add_argument("--num_generations", type=positive_int, default=8,
                       help="completions sampled per prompt (the group size G, >= 2); the step's batch is "
                            "--batch_size x G completions")
    group.add_argument("--max_new_tokens", type=positive_int, default=128, help="most tokens of a completion")
    group.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    group.add_argument("--top_p", type=fraction, default=1.0, help="nucleus sampling: smallest set of tokens with "
                                                                   "this probability mass (1: the full distribution)")
    group.add_argument("--beta", type=float, default=0.04, help="weight of the KL penalty to the reference (the "
                                                                "--from_weight model); 0: no penalty")
    group.add_argument("--epsilon", type=positive_float, default=0.2,
                       help="clip range of the probability ratio (eq. 3); no effect yet: with one update per "
                            "rollout the ratio is 1 and nothing is clipped (see the module docstring)")
    group.add_argument("--reward_funcs", nargs="+", default=["gsm8k_accuracy", "think_format", "length_penalty"],
                       help="reward functions: names in trainer/rewards.py or import paths package.module:function")
    group.add_argument("--reward_weights", nargs="+", type=float,
                       help="one weight per reward function (default: 1 each)")


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
    if args.beta < 0 or args.top_p == 0:
        raise SystemExit("--beta must be >= 0 and --top_p > 0")
    weights = args.reward_weights or [1.0] * len(args.reward_funcs)
    if len(weights) != len(args.reward_funcs):
        raise SystemExit(f"--reward_weights: {len(weights)} weights for {len(args.reward_funcs)} --reward_funcs; "
                         "give one weight per reward function")
    # logged as reward_<name>: a shipped reward's name, or the function name of an import path
    rewards = [(name.rpartition(":")[2], load_reward_function(name), weight)
               for name, weight in zip(args.reward_funcs, weights)]
    model, tokenizer = load_model(args)

    # 2. The reference: the --from_weight checkpoint again, frozen (it stays the start even under --from_resume 1)
    reference = load_reference(args)
    end_ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # <|im_end|> ends a turn, <|endoftext|> a text
    generation = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                                  max_new_tokens=args.max_new_tokens, eos_token_id=end_ids,
                                  pad_token_id=tokenizer.pad_token_id)

    # 3. Dataset: prompts through the chat template, left-padded, with the fields the rewards read
    train_dataset = PromptDataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
    eval_dataset = (PromptDataset(args.eval_data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
                    if args.eval_data_path else None)
    sample_fields = {"completion_tokens", "max_new_tokens"}
    for dataset in filter(None, (train_dataset, eval_dataset)):
        for name, (_, function, _) in zip(args.reward_funcs, rewards):
            check_reward_fields(name, function, dataset.field_names | sample_fields)

    # 4. Loss: rollouts, rewards, group advantages and eq. 3 (grpo_batch_loss), in the shared loop: accumulation,
    #    clipping, schedule, logging, eval, checkpoints, resume. The loss is no cross-entropy: no perplexity.
    def loss_fn(model, batch):
        return grpo_batch_loss(model, reference, tokenizer, batch, rewards, generation, args)

    return train(args, model, tokenizer, train_dataset, loss_fn, eval_dataset=eval_dataset, eval_perplexity=False,
                 count_items=count_rows)  # the loss averages over sequences, so a step weighs its micro-batches by rows


if __name__ == "__main__":
    run_main(main)
