"""Rollouts for online reinforcement learning (trainer/train_grpo.py, trainer/train_ppo.py), and the pieces of
their objectives that both share.

A rollout is what the policy writes for a batch of prompts, with what the loss needs to learn from it: the
sampled sequences (prompt + completion), the mask of the completion tokens, the rewards and whatever the method
computes from them once (GRPO: group advantages and the reference's log-probabilities; PPO: values, per-token
rewards, GAE advantages and returns). Read top to bottom:

- sampling: `sample_completions` (the model's KV-cached `generate`), `completion_mask`, `completion_logprobs`;
- scoring: `score_completions` (the reward functions of trainer/rewards.py) and `score_rollout` (decode, then
  score), with the flags and checks that set the rewards up;
- the objective both methods share: `clipped_surrogate` (PPO's clipped ratio objective, Schulman et al. 2017,
  eq. 7, which GRPO's eq. 3 reuses with group advantages), `kl_k3` and `masked_mean`;
- GRPO's objective, `group_advantages` and `grpo_loss` (its --loss_type variants), here because the tool-use
  agent (trainer/train_agent.py) runs it too and stage scripts do not import each other;
- reuse: `RolloutBuffer`, which lets one rollout serve several optimizer steps of the shared loop.

Reusing a rollout. A rollout costs a generation; the updates that learn from it are cheap next to it, so PPO takes
--ppo_epochs passes over --num_mini_batches minibatches of each rollout and GRPO takes mu (--num_iterations)
updates (DeepSeekMath, Algorithm 1). The shared loop makes one optimizer step per batch of the data; given a
RolloutBuffer as its `reuse` argument (trainer_utils.train), it runs the next step on the same micro-batches of
prompts while the buffer's again() says so, and the stage's loss_fn takes its rollout from the buffer: made on
the first update, kept for the others together with the log-probabilities of the policy that sampled it
(pi_old), so the ratio pi_theta / pi_old is 1 at the first update and leaves 1 afterwards, where the clip acts.
"""

import argparse
from collections.abc import Callable

import torch
from transformers import GenerationConfig

from model.model_minimind import token_logprobs
from trainer.flags import fraction, positive_float, positive_int
from trainer.rewards import check_reward_fields, load_reward_function, reward_model_function

DEFAULT_REWARDS = ["gsm8k_accuracy", "think_format", "length_penalty"]  # the rule rewards of the GSM8K prompts
SAMPLE_FIELDS = {"completion_tokens", "max_new_tokens"}  # what score_rollout adds to a record's fields


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def completion_mask(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """(N, T) LongTensor: 1 up to and including each row's first end token, 0 after it (generate's padding); all 1
    for a row that ran out of budget without one."""
    is_end = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    ended_before = is_end.cumsum(dim=1) - is_end.long()  # end tokens strictly before each position
    return (ended_before == 0).long()


def completion_token_logprobs(logits: torch.Tensor, sequences: torch.Tensor, num_completion_tokens: int,
                              temperature: float) -> torch.Tensor:
    """Log-probabilities of the last `num_completion_tokens` tokens of each row from the logits that predict them.

    Args:
        logits: (N, T + 1, vocab): the logits of the position before the completion and of the completion's
            positions (a forward with logits_to_keep = T + 1); position t scores token t + 1.
        sequences: (N, P + T) prompts followed by their completions.
        temperature: the sampling temperature; the logits are divided by it, so these are the probabilities the
            tokens were sampled with (as in trl's GRPOTrainer).
    Returns:
        (N, T) float32 log-probabilities, whatever the logits' dtype.
    """
    labels = sequences[:, -(num_completion_tokens + 1):]  # (N, T + 1): the token before the completion, then it
    return token_logprobs(logits.float() / temperature, labels)[:, :-1]  # the last position scores nothing


def completion_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, num_completion_tokens: int,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the last `num_completion_tokens` tokens of each row, each given the tokens before it.

    One forward pass computing only the completion's logits (logits_to_keep), then completion_token_logprobs: the
    logits divided by the sampling temperature.
    Args:
        model: MiniMindForCausalLM, possibly wrapped (DDP).
        sequences: (N, P + T) left-padded prompts followed by their completions; attention_mask: (N, P + T).
    Returns:
        ((N, T) float32 log-probabilities, the MoE load-balancing loss or None).
    """
    out = model(input_ids=sequences, attention_mask=attention_mask, logits_to_keep=num_completion_tokens + 1)
    return completion_token_logprobs(out.logits, sequences, num_completion_tokens, temperature), out.aux_loss


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


def add_sampling_flags(group: argparse._ArgumentGroup) -> None:
    """--max_new_tokens, --temperature, --top_p: how the policy samples its completions."""
    group.add_argument("--max_new_tokens", type=positive_int, default=128, help="most tokens of a completion")
    group.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    group.add_argument("--top_p", type=fraction, default=1.0, help="nucleus sampling: smallest set of tokens with "
                                                                   "this probability mass (1: the full distribution)")


def generation_config(args, tokenizer) -> GenerationConfig:
    """The sampling settings of the rollouts: --temperature, --top_p, --max_new_tokens, no top-k; a completion ends
    at <|im_end|> (end of turn) or <|endoftext|> (end of text).

    Raises:
        SystemExit: for --top_p 0 (no token left to sample).
    """
    if args.top_p == 0:
        raise SystemExit("--top_p must be > 0")
    return GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                            max_new_tokens=args.max_new_tokens, eos_token_id=[tokenizer.eos_token_id,
                                                                              tokenizer.pad_token_id],
                            pad_token_id=tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def score_completions(rewards: list[tuple], prompts: list[str], completions: list[str], fields: dict[str, list],
                      device) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the reward functions' scores.

    Args:
        rewards: (name, function, weight) triples; prompts, completions, fields: see trainer/rewards.py.
    Returns:
        ((N,) float32 rewards, {"reward_<name>": mean score of that function}).
    Raises:
        SystemExit: when a function returns another number of rewards than there are completions.
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


def score_rollout(tokenizer, batch: dict, completion_ids: torch.Tensor, mask: torch.Tensor, rewards: list[tuple],
                  max_new_tokens: int, num_generations: int) -> tuple[torch.Tensor, dict]:
    """Decode a rollout's prompts and completions and score them with the reward functions (score_completions).

    Args:
        batch: the prompts (PromptDataset.collate): input_ids, attention_mask (B, P) and `fields`, one dict of the
            record's extra fields per prompt.
        completion_ids, mask: (B*G, T) the completions (G per prompt, next to each other) and completion_mask.
        rewards: (name, function, weight) triples; max_new_tokens: the generation budget.
    Returns:
        ((B*G,) float32 rewards, {"reward_<name>": mean score of each function}). Each function gets the fields
        every record of the batch has, plus completion_tokens (the mask's length of each row) and max_new_tokens.
    """
    group = num_generations
    prompts = [tokenizer.decode(ids[keep.bool()]) for ids, keep in zip(batch["input_ids"], batch["attention_mask"])]
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)  # drops end token and padding
    records = batch["fields"]
    shared = set.intersection(*(set(record) for record in records))  # PromptDataset.field_names is a subset
    fields = {key: [record[key] for record in records for _ in range(group)] for key in shared}
    fields.update(completion_tokens=mask.sum(dim=1).tolist(), max_new_tokens=[max_new_tokens] * len(mask))
    return score_completions(rewards, [p for p in prompts for _ in range(group)], completions, fields,
                             completion_ids.device)


def add_reward_flags(group: argparse._ArgumentGroup) -> None:
    """--reward_funcs, --reward_weights, --reward_model: what scores a completion (load_rewards)."""
    group.add_argument("--reward_funcs", nargs="*", default=DEFAULT_REWARDS,
                       help="reward functions: names in trainer/rewards.py or import paths package.module:function; "
                            "none (the flag alone) with --reward_model scores by the reward model only")
    group.add_argument("--reward_weights", nargs="+", type=float,
                       help="one weight per reward function (default: 1 each)")
    group.add_argument("--reward_model",
                       help="a reward model directory (trainer/train_reward.py, e.g. out/reward_256): its score of "
                            "prompt + completion is added to the weighted sum of --reward_funcs with weight 1 and "
                            "logged as reward_model (default: none)")


def load_rewards(args) -> list[tuple[str, Callable, float]]:
    """(name, function, weight) for each --reward_funcs (by its --reward_weights), then the --reward_model, if
    any, with weight 1. The name is what the reward is logged under (reward_<name>): a shipped reward's name, the
    function name of an import path, "model" for the reward model.

    Raises:
        SystemExit: no reward at all, a count of weights that is not the count of functions, an unknown function,
            no reward model at --reward_model.
    """
    if not args.reward_funcs and not args.reward_model:
        raise SystemExit("--reward_funcs names no reward function and there is no --reward_model: give at least one")
    weights = args.reward_weights or [1.0] * len(args.reward_funcs)
    if len(weights) != len(args.reward_funcs):
        raise SystemExit(f"--reward_weights: {len(weights)} weights for {len(args.reward_funcs)} --reward_funcs; "
                         "give one weight per reward function")
    rewards = [(name.rpartition(":")[2], load_reward_function(name), weight)
               for name, weight in zip(args.reward_funcs, weights)]
    if args.reward_model:
        rewards.append(("model", reward_model_function(args.reward_model, args.device), 1.0))
    return rewards


def check_rewards(rewards: list[tuple], datasets: list) -> None:
    """Check, before any generation, that every reward function can be called with the fields of every dataset
    (PromptDataset.field_names) and those score_rollout adds.

    Raises:
        SystemExit naming the reward and the field it needs that the data lacks (rewards.check_reward_fields).
    """
    for dataset in filter(None, datasets):
        for name, function, _ in rewards:
            check_reward_fields(name, function, dataset.field_names | SAMPLE_FIELDS)


# ----------------------------------------------------------------------------------------------------------------
# The objective PPO and GRPO share


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is 1 (0 when there is none).

    Args:
        values, mask: tensors of one shape, e.g. (N, T) per-token figures and the completion mask.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of a KL divergence, per sample: exp(x) - x - 1 with x = log q(o) - log p(o).

    For o drawn from p its mean is KL(p || q), and every term is >= 0 (J. Schulman, "Approximating KL
    divergence", 2020; DeepSeekMath eq. 4 writes it with q = pi_ref and p = pi_theta).
    Args:
        log_ratio: any shape, log q - log p at the sampled tokens.
    Returns:
        a tensor of that shape.
    """
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                      epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective per token (Schulman et al. 2017, eq. 7; the decoupled range of DAPO):

        rho_t = pi_theta(o_t) / pi_old(o_t) = exp(logps - old_logps)
        L_t = min(rho_t * A_t, clip(rho_t, 1 - epsilon_low, 1 + epsilon_high) * A_t)

    The min takes the clipped term where the update would move rho beyond the range in the direction A favours
    (rho > 1 + epsilon_high with A > 0, rho < 1 - epsilon_low with A < 0): there the gradient is 0.
    Args:
        logps, old_logps: (N, T) log-probabilities of the sampled tokens under the policy being trained (with
            gradients) and under the policy that sampled them.
        advantages: (N, T), or (N, 1) for one advantage per sequence (GRPO).
    Returns:
        (L (N, T) to maximize, rho (N, T), clipped (N, T) bool: where the clipped term is the smaller one).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages
    return torch.min(unclipped, clipped), ratio, clipped < unclipped


# ----------------------------------------------------------------------------------------------------------------
# GRPO's objective (trainer/train_grpo.py; trainer/train_agent.py runs it on multi-turn rollouts)


ADVANTAGE_EPS = 1e-4  # keeps A finite for a group whose rewards are all equal (then A = 0)
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "cispo")


def group_advantages(rewards: torch.Tensor, num_generations: int, eps: float = ADVANTAGE_EPS,
                     scale: bool = True) -> torch.Tensor:
    """Outcome-supervision advantages (DeepSeekMath section 4.1.2): each reward measured against its group.

    Args:
        rewards: (groups * num_generations,) rewards, the G completions of a prompt next to each other.
        scale: divide by the group's std (GRPO); False: Dr. GRPO's r_i - mean, without it (Liu et al. 2025).
    Returns:
        (groups * num_generations,) (r_i - mean of the group) / (population std of the group + eps), or
        r_i - mean of the group when not `scale`.
    """
    grouped = rewards.view(-1, num_generations)  # (groups, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if not scale:
        return centered.flatten()
    return (centered / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)).flatten()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, epsilon: float, beta: float, loss_type: str = "grpo",
              epsilon_high: float | None = None, max_completion_length: int | None = None) -> tuple[torch.Tensor, dict]:
    """-J of the GRPO objective `loss_type` (trainer/train_grpo.py's docstring), with the k3 KL of DeepSeekMath
    eq. 4 to the reference weighted by beta.

    Per token, with rho = exp(logps - old_logps), A_i the completion's advantage, KL = kl_k3(ref_logps - logps):

        grpo, dr_grpo, dapo:  l_it = -[ min(rho * A_i, clip(rho, 1 - epsilon, 1 + epsilon_high) * A_i) - beta * KL ]
        cispo:                l_it = -[ sg(min(rho, 1 + epsilon_high)) * A_i * logps - beta * KL ]   (sg: no grad)

    over the N completions of |o_i| tokens each:

        grpo:     1/N sum_i 1/|o_i| sum_t l_it          (DeepSeekMath eq. 3)
        dr_grpo:  1/(N * L) sum_i sum_t l_it            (Dr. GRPO; L = max_completion_length)
        dapo:     1/(sum_i |o_i|) sum_i sum_t l_it      (DAPO's token-level policy-gradient loss)
        cispo:    1/(sum_i |o_i|) sum_i sum_t l_it      (MiniMax-M1's CISPO)

    Args:
        logps, old_logps, ref_logps: (N, T) log-probabilities of each completion token under the policy being
            trained (with gradients), the policy that sampled it, and the reference.
        advantages: (N,) one advantage per completion (group_advantages).
        mask: (N, T) 1 on the completion's tokens (its end-of-turn included), 0 on the padding after it.
        epsilon: lower clip range of the ratio, and the upper one unless epsilon_high is given; beta: weight of the
            KL penalty; loss_type: one of LOSS_TYPES; max_completion_length: Dr. GRPO's constant L, the generation
            budget (default: T).
    Returns:
        (scalar loss, {"kl": mean per-token KL to the reference, "approx_kl": mean k3 estimate of
        KL(pi_old || pi_theta), "clip_fraction": fraction of tokens whose clipped term was the smaller (no
        gradient; for cispo: whose importance weight was truncated)}), each a mean over the completion tokens.
    Raises:
        ValueError: an unknown loss_type.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    advantages = advantages[:, None]  # (N, 1): the same A_i on every token of completion i
    kl = kl_k3(ref_logps - logps)  # (N, T), k3 estimator of KL(pi_theta || pi_ref)
    if loss_type == "cispo":
        ratio = torch.exp(logps - old_logps)
        weight = torch.clamp(ratio, max=1 + epsilon_high).detach()  # truncated importance weight, no gradient
        objective, clipped = weight * advantages * logps, ratio > 1 + epsilon_high
    else:
        objective, ratio, clipped = clipped_surrogate(logps, old_logps, advantages, epsilon, epsilon_high)
    per_token = -(objective - beta * kl)
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()  # 1/|o_i| sum_t, 1/G sum_i
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (len(mask) * (max_completion_length or mask.shape[1]))
    else:  # dapo, cispo: every token of the batch weighs alike
        loss = masked_mean(per_token, mask)
    stats = {"kl": masked_mean(kl.detach(), mask), "approx_kl": masked_mean(kl_k3(logps - old_logps).detach(), mask),
             "clip_fraction": masked_mean(clipped.to(mask.dtype), mask)}
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# Reusing a rollout for several optimizer steps


class RolloutBuffer:
    """Keeps the rollouts of a step's micro-batches and serves them to `epochs` x `num_minibatches` optimizer steps.

    PPO: --ppo_epochs passes, each over --num_mini_batches minibatches in a fresh random order (Schulman et al.
    2017, Algorithm 1: "optimize surrogate L wrt theta, with K epochs and minibatch size M"), stopping early when
    the approximate KL to the sampling policy passes --target_kl (as Stable-Baselines3's PPO). GRPO: mu passes over
    the whole rollout (DeepSeekMath, Algorithm 1, "for GRPO iteration = 1, ..., mu").

    The shared loop (trainer_utils.train, argument `reuse`) reads `max_updates` to plan its steps and calls
    again(metrics) after every optimizer step; while it returns True, the next step runs on the same micro-batches
    of prompts. In the stage's loss_fn, rollout(make) returns the rollout of the micro-batch at hand (the loss_fn's
    n-th call of a step gets the n-th rollout) and minibatch(rollout) the rows this update trains on. A resumed run
    starts on fresh prompts (the saved data position is past the ones in use), so a rollout cut by the stop is
    not finished. Evaluation (no gradient) makes its own rollouts and keeps none.

    Args:
        epochs: passes over each rollout (>= 1); num_minibatches: minibatches per pass (>= 1).
        target_kl: stop the passes over a rollout after an update whose `approx_kl` metric exceeds it (None: never).
    """

    def __init__(self, epochs: int, num_minibatches: int = 1, target_kl: float | None = None):
        self.epochs, self.num_minibatches, self.target_kl = epochs, num_minibatches, target_kl
        self.max_updates = epochs * num_minibatches
        self.update = 0  # which update of the current rollouts this step is (0: they are made in it)
        self.rollouts: list[dict] = []  # one per micro-batch of the step, in the order loss_fn is called
        self.calls = 0  # loss_fn calls in this step

    def rollout(self, make: Callable[[], dict]) -> dict:
        """The rollout of the current micro-batch: make() on the first update (kept), the kept one afterwards.

        make() returns a dict of the rollout; its tensors whose first dimension is the number of rows of
        `sequences` are the ones minibatch() picks rows of. With several minibatches, the buffer adds the row
        order of each pass under "row_orders".
        """
        if self.update == 0:  # a fresh micro-batch (a retried first step appends; its first rollouts stay valid)
            made = make()
            if self.num_minibatches > 1:
                rows = len(made["sequences"])
                made["row_orders"] = [torch.randperm(rows) for _ in range(self.epochs)]
            self.rollouts.append(made)
        rollout = self.rollouts[self.calls % len(self.rollouts)]
        self.calls += 1
        return rollout

    def minibatch(self, rollout: dict) -> dict:
        """The rows of `rollout` the current update trains on: minibatch (update % num_minibatches) of pass
        (update // num_minibatches), in that pass's random order; the whole rollout when there is one minibatch.

        A rollout of fewer rows than minibatches (an epoch's short last batch) is split into as many parts as it
        has rows, taken in turn.
        """
        if self.num_minibatches == 1:
            return rollout
        rows = len(rollout["sequences"])
        order = rollout["row_orders"][self.update // self.num_minibatches]
        parts = order.tensor_split(min(self.num_minibatches, rows))
        index = parts[(self.update % self.num_minibatches) % len(parts)].to(rollout["sequences"].device)
        return {key: value[index] if torch.is_tensor(value) and value.dim() and len(value) == rows else value
                for key, value in rollout.items() if key != "row_orders"}

    def again(self, metrics: dict[str, float]) -> bool:
        """Called by the loop after each optimizer step with the step's figures (means over all ranks, so every
        rank decides alike): True when the next step reuses the rollouts, False when it starts fresh ones (the
        last update of the rollouts was made, or their approximate KL passed target_kl)."""
        self.update, self.calls = self.update + 1, 0
        too_far = self.target_kl is not None and metrics["approx_kl"] > self.target_kl
        if self.update < self.max_updates and not too_far:
            return True
        self.update, self.rollouts = 0, []
        return False
