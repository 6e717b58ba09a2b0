"""Proximal Policy Optimization (PPO) for a chat model, by the textbook: a value model, per-token rewards with a KL
penalty, GAE advantages, and several clipped updates per rollout.

RLHF with PPO (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al. 2022,
InstructGPT): the policy pi_theta, the chat model, writes a completion o for each prompt q (a rollout); a reward
R(q, o) scores it, from rule rewards (trainer/rewards.py, --reward_funcs) and/or a reward model (--reward_model).
Each token is an action; the episode ends with the completion. Every token pays for its distance to the frozen
reference pi_ref (the --from_weight model), and the last one also gets the score (Ziegler et al. eq. 2, per token):

    r_t = -beta * (log pi_old(o_t | q, o_<t) - log pi_ref(o_t | q, o_<t))  +  [t = last token] * R(q, o)

pi_old is the policy that sampled the rollout. A value model V estimates the return of the state before each token
(q, o_<t). Generalized advantage estimation (Schulman et al. 2016, eq. 16) turns rewards and values into advantages,
and the value model's targets are the returns:

    delta_t = r_t + gamma * V(s_t+1) - V(s_t)       (V(s_t+1) = 0 after the last token: the episode is done)
    A_t = sum_l (gamma * lam)^l * delta_t+l,        R_t = A_t + V(s_t)

The advantages are whitened over the rollout's tokens (mean 0, std 1). Then each rollout gets --ppo_epochs passes,
each over --num_mini_batches minibatches in a fresh random order, one optimizer step per minibatch, minimizing
(Schulman et al. 2017, eq. 7, and the value clip of OpenAI Baselines' PPO2):

    L = -mean_t min(rho_t * A_t, clip(rho_t, 1 - epsilon, 1 + epsilon) * A_t)
        + vf_coef * 1/2 * mean_t max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -value_clip, value_clip) - R_t)^2)
    rho_t = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t)

with means over the minibatch's completion tokens. The passes over a rollout stop early once the approximate KL
between pi_old and pi_theta (the k3 estimate, logged as approx_kl) passes --target_kl. The KL to the reference is
in the reward, not in the loss; the ratio rho is 1 at a rollout's first update and leaves 1 from the second on,
where the clip acts (clip_fraction). pi_old's log-probabilities are computed by the same code, in the same precision
(the loop's autocast) and the same training mode as pi_theta's (policy_and_values), so that first ratio is 1 up to
float rounding: upstream MiniMind's PPO computed them in different precisions, so its ratio was never 1
(jingyaogong/minimind#813), and it also used one advantage per sequence, the KL in the loss and one epoch (#564).

The value model does not share the policy's trunk: it is a MiniMindRewardModel (model/model_reward.py: the MiniMind
trunk and a scalar head, read at every token), a second network initialised from the same --from_weight
checkpoint, with a head of zeros (value_model_of). A shared trunk would halve the memory but let the value regression pull on the
features the policy samples from, with vf_coef trading one objective against the other; apart, the value loss never
moves the policy and the two start from the same knowledge of the text (InstructGPT also trains a separate value
function, initialised from its reward model, appendix C.3). The price is a second forward and backward pass.
Policy and value model train as one module (PolicyAndValue) in the shared loop, with one AdamW and one global
--grad_clip over both; the weights directory holds the policy alone, the resume state both.

Where this script departs from the papers:

1. The value model starts from the --from_weight chat model, not from a reward model (InstructGPT's), so that rule
   rewards need none; its head starts at 0 (V = 0 everywhere).
2. A fixed KL coefficient --beta, not Ziegler et al.'s adaptive KL controller; no pretraining-data term (PPO-ptx)
   and no entropy bonus (neither has InstructGPT's PPO).
3. One completion per prompt, --batch_size prompts per micro-batch; whitening over each micro-batch's rollout.
4. The early stop reads the approximate KL measured at the start of each update (before its step), so the update
   that crosses --target_kl is the last one taken (Stable-Baselines3 stops before it).
5. Log-probabilities are taken at the sampling temperature (the logits divided by it, as in GRPO).
6. A completion cut off at --max_new_tokens is an ended episode (no bootstrap from V), as in RLHF practice.

Rollouts happen inside the loss (trainer/rollouts.py): on a rollout's first update, the policy samples a completion
per prompt with its KV-cached `generate`, the rewards score them, one forward pass (without gradients) gives pi_old
and V_old, one of the reference gives pi_ref; every update then runs policy and value model (with gradients) on its
minibatch. The loop reuses the prompts of a step for the rollout's updates (RolloutBuffer). Logged: reward and
reward_<function>, kl (per-token log pi_old - log pi_ref, the penalty's estimate), completion_length, policy_loss,
value_loss, approx_kl, clip_fraction, value_clip_fraction; the eval (--eval_data_path) reports the same on held-out
prompts. --max_steps counts optimizer steps (--ppo_epochs x --num_mini_batches per rollout).

Defaults: the GSM8K prompts and rule rewards of train_grpo.py (dataset/data/grpo/), from out/full_sft_<hidden_size>,
16 prompts per rollout, completions of at most 128 tokens, beta 0.02 (InstructGPT's), gamma 1 and lam 0.95 (trl's
PPO for language models), epsilon 0.2 and value_clip 0.2 (PPO2's), vf_coef 0.1, 4 epochs of 2 minibatches per
rollout, no target_kl, learning rate 1e-4 as GRPO's for both networks (--critic_learning_rate sets the value
model's), no weight decay. Under torchrun, --parallel ddp only (FSDP and DeepSpeed wrap a single model).

    python trainer/train_ppo.py --from_weight reason_sft --max_steps 400     # after the cold start of train_grpo.py
    python trainer/train_ppo.py --reward_model out/reward_256 --reward_funcs length_penalty
    python trainer/train_ppo.py --ppo_epochs 8 --target_kl 0.02              # more passes, stopped by the KL

Writes out/ppo_<hidden_size>/ (the policy) and out/runs/ppo_<hidden_size>/metrics.jsonl.
"""

import argparse

import torch
from transformers import GenerationConfig

from dataset.rl_dataset import PromptDataset
from model.model_reward import MiniMindRewardModel
from trainer.checkpoint import save_weights
from trainer.rollouts import (RolloutBuffer, add_reward_flags, add_sampling_flags, check_rewards, clipped_surrogate,
                              completion_logprobs, completion_token_logprobs, generation_config, kl_k3, load_rewards,
                              masked_mean, sample_completions, score_rollout)
from trainer.trainer_utils import (REPO_ROOT, count_rows, fraction, load_model, load_reference, non_negative_float,
                                   parse_args, positive_float, positive_int, require_trained_start, run_main,
                                   setup_run, train, unwrap, with_router_loss)

GRPO_DATA = REPO_ROOT / "dataset" / "data" / "grpo"
WHITEN_EPS = 1e-8  # keeps the whitening finite for a rollout whose advantages are all equal


class PolicyAndValue(torch.nn.Module):
    """PPO's two trained networks as one module, so the shared loop steps, clips, saves and resumes them together.

    forward(input_ids (N, L), attention_mask (N, L), logits_to_keep) -> (the policy's output (logits of the last
    logits_to_keep positions, aux_loss), values (N, L) float32 from the value model, the MoE load-balancing loss
    of both networks or None). One forward for both, so DistributedDataParallel sees (and syncs) every parameter.
    `config` is the policy's: the run is named and resumed by the policy's shape. `value_lr_ratio`: the value
    model's learning rate over the policy's (--critic_learning_rate / --learning_rate; the optimizer reads
    `lr_ratios`, trainer_utils.build_optimizer).
    """

    def __init__(self, policy: torch.nn.Module, value_model: MiniMindRewardModel, value_lr_ratio: float = 1.0):
        super().__init__()
        self.policy, self.value_model = policy, value_model
        self.config = policy.config
        self.lr_ratios = {"value_model": value_lr_ratio}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)
        values, value_aux_loss = self.value_model(input_ids, attention_mask, return_aux_loss=True)
        aux_loss = None if out.aux_loss is None else out.aux_loss + value_aux_loss
        return out, values, aux_loss

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """--gradient_checkpointing: recompute the activations of both networks in backward."""
        self.policy.activation_checkpointing_enable(**kwargs)
        self.value_model.activation_checkpointing_enable(**kwargs)


def value_model_of(policy: torch.nn.Module) -> MiniMindRewardModel:
    """PPO's value model at the start: the policy's trunk (its weights copied) and a score head of zeros, so
    V = 0 at every token. A random head would start at values of order 1 that differ from token to token, noise
    that GAE would pass into the first advantages (and that --value_clip lets the value loss remove only
    value_clip at a time); with V = 0 the first advantages are the discounted rewards themselves."""
    value_model = MiniMindRewardModel.from_causal_lm(policy)
    torch.nn.init.zeros_(value_model.score.weight)
    return value_model


def save_policy(model: PolicyAndValue, tokenizer, directory) -> None:
    """The weights directory of PPO: the policy alone, a chat model like every stage's (the value model is a
    by-product, kept in the resume state)."""
    save_weights(model.policy, tokenizer, directory)


# ----------------------------------------------------------------------------------------------------------------
# The math of PPO, on tensors of the completion tokens: (N, T), N completions of at most T tokens


def per_token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      beta: float) -> torch.Tensor:
    """The reward of each token: the KL penalty on every token, the completion's score on its last (Ziegler et al.
    2019, eq. 2, spread over the tokens as in their code, lm-human-preferences):

        r_t = -beta * (logps_t - ref_logps_t) + [t = last token of the completion] * score

    Args:
        scores: (N,) the reward of each completion; logps, ref_logps: (N, T) log-probabilities of its tokens under
            the sampling policy and the reference; mask: (N, T) 1 on the completion's tokens (a prefix of each row,
            at least one), 0 on the padding after them; beta: >= 0.
    Returns:
        (N, T) float32, 0 on the padding.
    """
    mask = mask.to(logps.dtype)
    rewards = -beta * (logps - ref_logps) * mask
    last = mask.sum(dim=1).long() - 1  # (N,) the position of each completion's last token
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) along each completion, and the returns.

        delta_t = r_t + gamma * V_t+1 - V_t          V_t+1 = 0 after a completion's last token (the episode is done)
        A_t = delta_t + gamma * lam * A_t+1          A = 0 after the last token
        R_t = A_t + V_t                              the value model's targets (the TD(lambda) returns)

    Args:
        rewards, values: (N, T) per-token rewards (per_token_rewards) and value estimates V_t of the state before
            token t; mask: (N, T) 1 on each completion's tokens (a prefix of the row), 0 on the padding after it.
        gamma: discount per token (0..1); lam: GAE's lambda (0: one-step TD errors, 1: Monte-Carlo returns - V).
    Returns:
        (advantages, returns), each (N, T), 0 on the padding.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])  # (N,) A_t+1
    next_value = torch.zeros_like(values[:, 0])  # (N,) V_t+1, 0 past the end of each completion
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(values - mean) / std over the positions where mask is 1 (population std), 0 elsewhere: the advantage
    normalization of PPO implementations (OpenAI Baselines, trl)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + WHITEN_EPS) * mask.to(values.dtype)


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    epsilon: float) -> tuple[torch.Tensor, dict]:
    """-L^CLIP of Schulman et al. 2017, eq. 7, as a mean over the completion tokens:

        -mean_t min(rho_t * A_t, clip(rho_t, 1 - epsilon, 1 + epsilon) * A_t),   rho_t = exp(logps_t - old_logps_t)

    Args:
        logps: (N, T) log-probabilities under the policy being trained (with gradients); old_logps: under the
            policy that sampled the tokens; advantages: (N, T) whitened GAE advantages; mask: (N, T) completion
            tokens; epsilon: the clip range.
    Returns:
        (scalar loss, {"approx_kl": mean k3 estimate of KL(pi_old || pi_theta), "clip_fraction": fraction of the
        tokens whose clipped term was the smaller, which get no gradient}).
    """
    objective, _, clipped = clipped_surrogate(logps, old_logps, advantages, epsilon, epsilon)
    stats = {"approx_kl": masked_mean(kl_k3(logps - old_logps).detach(), mask),
             "clip_fraction": masked_mean(clipped.float(), mask)}
    return -masked_mean(objective, mask), stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   value_clip: float) -> tuple[torch.Tensor, dict]:
    """The clipped value loss of OpenAI Baselines' PPO2, as a mean over the completion tokens:

        V_clip = V_old + clip(V - V_old, -value_clip, value_clip)
        1/2 * mean_t max((V_t - R_t)^2, (V_clip,t - R_t)^2)

    The max keeps the larger error, so moving V more than value_clip away from V_old earns nothing.
    Args:
        values: (N, T) the value model's estimates (with gradients); old_values: at the rollout; returns: (N, T)
            GAE returns; mask: (N, T) completion tokens.
    Returns:
        (scalar loss, {"value_clip_fraction": fraction of the tokens where the clipped error was the larger}).
    """
    clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    stats = {"value_clip_fraction": masked_mean((clipped_error > error).float(), mask)}
    return 0.5 * masked_mean(torch.max(error, clipped_error), mask), stats


# ----------------------------------------------------------------------------------------------------------------
# Rollouts and the loss of an update


def policy_and_values(model, sequences: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward of PolicyAndValue over prompt + completion: the completion tokens' log-probabilities (at the
    sampling temperature) and the values of the states before them. pi_old at the rollout and pi_theta at every
    update come from here, so they are computed alike.

    Args:
        model: PolicyAndValue, possibly wrapped (DDP); sequences, attention_mask: (N, P + T).
    Returns:
        ((N, T) float32 log-probabilities, (N, T) float32 values, the MoE load-balancing loss or None).
    """
    out, values, aux_loss = model(sequences, attention_mask, num_tokens + 1)
    logps = completion_token_logprobs(out.logits, sequences, num_tokens, temperature)
    # V(s_t), the state before completion token t, is read where token t is predicted: one position earlier
    return logps, values[:, -(num_tokens + 1):-1], aux_loss


def ppo_rollout(model, reference, tokenizer, batch: dict, rewards: list[tuple], generation: GenerationConfig,
                args) -> dict:
    """Sample one completion per prompt, score it, and compute what every update of the rollout needs (no gradient):
    pi_old, V_old, pi_ref, the per-token rewards, GAE advantages (whitened) and returns.

    Returns:
        {"sequences", "attention_mask": (B, P + T), "num_tokens": T, "mask", "old_logps", "old_values",
         "advantages", "returns": (B, T), "metrics": the rollout's reward, kl and length figures}
    """
    sequences, attention_mask, num_tokens = sample_completions(unwrap(model).policy, batch, generation, 1)
    completion_ids, mask = sequences[:, -num_tokens:], attention_mask[:, -num_tokens:]
    scores, reward_means = score_rollout(tokenizer, batch, completion_ids, mask, rewards, generation.max_new_tokens,
                                         1)
    with torch.no_grad():
        old_logps, old_values, _ = policy_and_values(model, sequences, attention_mask, num_tokens,
                                                     generation.temperature)
        ref_logps, _ = completion_logprobs(reference, sequences, attention_mask, num_tokens, generation.temperature)
    token_rewards = per_token_rewards(scores, old_logps, ref_logps, mask, args.beta)
    advantages, returns = gae(token_rewards, old_values, mask, args.gamma, args.lam)
    metrics = {"reward": scores.mean(), **reward_means, "kl": masked_mean(old_logps - ref_logps, mask),
               "completion_length": mask.sum(dim=1).float().mean()}
    return {"sequences": sequences, "attention_mask": attention_mask, "num_tokens": num_tokens, "mask": mask,
            "old_logps": old_logps, "old_values": old_values, "advantages": whiten(advantages, mask),
            "returns": returns, "metrics": metrics}


def ppo_batch_loss(model, reference, tokenizer, batch: dict, rewards: list[tuple], generation: GenerationConfig,
                   args, buffer: RolloutBuffer | None = None) -> tuple[torch.Tensor, dict]:
    """The PPO loss of the current update of a batch's rollout (+ the MoE balance loss), and the figures.

    Args:
        model: PolicyAndValue, possibly DDP-wrapped; reference: the frozen reference model, same device.
        batch: PromptDataset.collate output, its tensors on the device (input_ids, attention_mask (B, P), fields).
        rewards: (name, function, weight) triples; generation: the sampling settings; args: the flags beta, gamma,
            lam, epsilon, value_clip, vf_coef.
        buffer: keeps the rollout for its --ppo_epochs x --num_mini_batches updates and picks each update's
            minibatch; None, and in evaluation (no gradient): a fresh rollout, all of it, used once.
    Returns:
        (scalar loss = policy_loss + vf_coef * value_loss, {"reward", "reward_<name>", "kl", "completion_length",
        "policy_loss", "value_loss", "approx_kl", "clip_fraction", "value_clip_fraction"}; for MoE also "ppo_loss"
        and "aux_loss").
    """
    def make() -> dict:
        return ppo_rollout(model, reference, tokenizer, batch, rewards, generation, args)

    training = buffer is not None and torch.is_grad_enabled()
    rollout = buffer.rollout(make) if training else make()
    part = buffer.minibatch(rollout) if training else rollout  # this update's rows
    logps, values, aux_loss = policy_and_values(model, part["sequences"], part["attention_mask"],
                                                rollout["num_tokens"], generation.temperature)
    policy_loss, policy_stats = ppo_policy_loss(logps, part["old_logps"], part["advantages"], part["mask"],
                                                args.epsilon)
    value_loss, value_stats = ppo_value_loss(values, part["old_values"], part["returns"], part["mask"],
                                             args.value_clip)
    loss = policy_loss + args.vf_coef * value_loss
    metrics = {**rollout["metrics"], "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
               **policy_stats, **value_stats}
    return with_router_loss(model, loss, aux_loss, metrics, "ppo_loss")


def add_ppo_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("PPO")
    add_sampling_flags(group)
    group.add_argument("--beta", type=non_negative_float, default=0.02,
                       help="KL penalty per token in the reward, beta * (log pi_old - log pi_ref), to the reference "
                            "(the --from_weight model); 0: no penalty")
    group.add_argument("--gamma", type=fraction, default=1.0, help="discount per token (0 to 1)")
    group.add_argument("--lam", type=fraction, default=0.95,
                       help="GAE's lambda (0 to 1): 0 uses one-step TD errors, 1 Monte-Carlo returns")
    group.add_argument("--epsilon", type=positive_float, default=0.2,
                       help="clip range of the probability ratio pi_theta / pi_old (eq. 7)")
    group.add_argument("--value_clip", type=positive_float, default=0.2,
                       help="clip range of the value update, |V - V_old| (PPO2's cliprange_value), in reward units")
    group.add_argument("--vf_coef", type=positive_float, default=0.1, help="weight of the value loss")
    group.add_argument("--critic_learning_rate", type=positive_float,
                       help="peak learning rate of the value model, on the same schedule (default: --learning_rate); "
                            "AdamW's steps do not shrink with --vf_coef, so this is what slows a value model whose "
                            "estimates swing wider than the rewards")
    group.add_argument("--ppo_epochs", type=positive_int, default=4, help="passes over each rollout")
    group.add_argument("--num_mini_batches", type=positive_int, default=2,
                       help="minibatches per pass, one optimizer step each (at most --batch_size)")
    group.add_argument("--target_kl", type=positive_float,
                       help="stop the passes over a rollout once the approximate KL(pi_old || pi_theta) of an "
                            "update exceeds it (default: never)")
    add_reward_flags(group)


def main(argv: list[str] | None = None) -> dict:
    # 1. Flags: the shared ones with this stage's defaults, plus sampling, PPO's and the rewards
    args = parse_args("ppo", __doc__, add_flags=add_ppo_flags, argv=argv, defaults={
        "data_path": str(GRPO_DATA / "gsm8k_train.jsonl"),
        "eval_data_path": str(GRPO_DATA / "gsm8k_test.jsonl"),
        "eval_interval": 40,
        "eval_batches": 5,
        "log_interval": 1,
        "from_weight": "full_sft",
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "batch_size": 16,
        "warmup_steps": 10,
    })
    setup_run(args)  # device, dtype, torchrun's process group, seeds
    require_trained_start(args, "PPO")
    if args.parallel != "ddp":
        raise SystemExit(f"--parallel {args.parallel}: PPO trains a policy and a value model as one module, which "
                         "only --parallel ddp spreads over processes; use --parallel ddp")
    if args.num_mini_batches > args.batch_size:
        raise SystemExit(f"--num_mini_batches {args.num_mini_batches} exceeds --batch_size {args.batch_size}: a "
                         "minibatch needs at least one completion; lower it or raise --batch_size")
    rewards = load_rewards(args)
    policy, tokenizer = load_model(args)

    # 2. The value model (the --from_weight trunk, a head at 0), trained with the policy; the frozen reference
    model = PolicyAndValue(policy, value_model_of(policy),
                           (args.critic_learning_rate or args.learning_rate) / args.learning_rate)
    reference = load_reference(args)
    generation = generation_config(args, tokenizer)

    # 3. Dataset: prompts through the chat template, left-padded, with the fields the rewards read
    train_dataset = PromptDataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
    eval_dataset = (PromptDataset(args.eval_data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
                    if args.eval_data_path else None)
    check_rewards(rewards, [train_dataset, eval_dataset])

    # 4. Loss: rollouts, per-token rewards, GAE and the clipped losses (ppo_batch_loss), in the shared loop; each
    #    rollout serves --ppo_epochs x --num_mini_batches optimizer steps (the buffer), on the same prompts
    buffer = RolloutBuffer(args.ppo_epochs, args.num_mini_batches, args.target_kl)

    def loss_fn(model, batch):
        return ppo_batch_loss(model, reference, tokenizer, batch, rewards, generation, args, buffer)

    return train(args, model, tokenizer, train_dataset, loss_fn, eval_dataset=eval_dataset, eval_perplexity=False,
                 save_weights_fn=save_policy, count_items=count_rows, reuse=buffer)


if __name__ == "__main__":
    run_main(main)
