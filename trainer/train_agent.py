"""Tool-use RL: GRPO on multi-turn rollouts in which the model calls tools and reads their results.

A task is a prompt that offers tools (their JSON schemas in the system turn, as the chat template renders them) and
a reference answer. For each task the model samples a group of G rollouts. A rollout is a conversation the model
holds with the tools (dataset/tools.py: a calculator, a unit converter, a lookup table):

    turn 1  the model writes until </tool_call> or the end of its turn       <tool_call>{"name": "calculator", ...}
            a call is run and its result appended as a tool message:        <|im_end|> user <tool_response>24 ...
    turn 2  the model writes again, after the assistant header ...          <|im_start|>assistant\\n 18<|im_end|>

up to --max_turns assistant turns; a turn without a call is the final reply, which ends the rollout. A call that
cannot be run (not valid JSON, an unknown tool, arguments that do not fit, an expression the calculator refuses)
returns its error as the tool message, as an agent loop shows a tool's error to the model; it never stops the
rollout. Reward functions score each rollout (trainer/rewards.py): by default `gsm8k_accuracy` of the final reply
(the right number), `tool_call_format` (the share of its calls that are well-formed) and `wasted_turns` (a penalty
for calls that failed or repeated one, and for ending without an answer).

The objective is GRPO's (Shao et al. 2024, "DeepSeekMath", eq. 3 and 4, section 4.1.2; see trainer/train_grpo.py):
group-normalized advantages A_i = (r_i - mean(r)) / (std(r) + eps), the same for every token the model wrote in
rollout i, and the per-token KL to the frozen --from_weight model. What the model did not write carries no loss:
the loss mask is 1 on the tokens the model sampled (its calls, its replies, the </tool_call> or <|im_end|> that ends
each turn) and 0 on the prompt, the tool results and the chat format's glue between turns. The log-probabilities
come from one forward pass over the whole multi-turn sequence (prompt, every turn, every tool result), masked, as
in the multi-turn tool RL of Search-R1 (Jin et al. 2025, "loss masking for retrieved tokens") and ReTool (Feng et
al. 2025, the interpreter's output masked out of the loss).

Where this script departs from GRPO as the paper runs it (and from train_grpo.py):

1. One update per rollout, so pi_old = pi_theta, no token is clipped and --epsilon has no effect (the logged
   clip_fraction is 0), as train_grpo.py's departure 1.
2. One tool call per assistant turn: generation stops at </tool_call>, and the rollout closes the turn with the
   chat format's <|im_end|> itself (the model did not sample it, so it carries no loss). The chat template lets a
   turn hold several calls; one per turn is enough for the calculator, whose one call may hold a compound
   expression.
3. Outcome rewards of the final reply plus two rule-based rewards of the calls (format, waste), no process reward.

Each turn is one batched `generate` call (KV-cached) over the rollouts still going, left-padded as GRPO's prompts.
Logged: reward, reward_<function>, reward_std, kl, clip_fraction, completion_length (tokens the model wrote,
summed over its turns), turns (assistant turns per rollout), tool_calls (calls per rollout), answered (the share of
rollouts that ended with a reply rather than a call or the budget); the eval (--eval_data_path) reports the same.
--batch_size counts tasks; --max_seq_len caps a prompt's tokens; --max_new_tokens caps each turn.

Defaults: dataset/data/agent/tasks_train.jsonl (400 GSM8K training questions with the calculator, prompts of at most
--max_seq_len 512 tokens; held-out: the 100 tasks of tasks_test.jsonl, 10 of them every 25 steps), 8 rollouts per
task of at most 5 turns of 64 tokens, 2 tasks per step, beta 0.04, learning rate 1e-4, no weight decay, as
train_grpo.py.

A model that has never written a <tool_call> earns no format reward. As train_grpo.py's <think> needs a cold start,
a little SFT on demonstrations comes first: dataset/data/agent/tool_sft.jsonl holds 300 GSM8K solutions as tool
conversations (each <<48/2=24>> calculator annotation of the solution a calculator call, its result the tool
message, then the final number):

    python trainer/train_full_sft.py --from_weight full_sft --save_weight tool_sft --epochs 2 --batch_size 8 \\
        --learning_rate 2e-3 --warmup_steps 5 --max_seq_len 768 --data_path dataset/data/agent/tool_sft.jsonl \\
        --eval_data_path ""
    python trainer/train_agent.py --from_weight tool_sft --max_steps 150
    python eval/eval_toolcall.py --model_path out/agent_256                  # accuracy with and without tools

The learning rate wants care: each of Adam's first steps moves every weight by about the learning rate, however
small and noisy its gradient. On the quick-path model (4.6M parameters) 5e-4 took the sampled calls from 92% to 8%
well-formed in two steps; 1e-4, the default, moved the policy little in 15 steps (KL 0.014; docs/rl.md, section 6e).

Writes out/agent_<hidden_size>/ and out/runs/agent_<hidden_size>/metrics.jsonl.
"""

import argparse
from dataclasses import asdict, dataclass, field

import torch

from dataset.chat_format import (IM_END, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, assistant_header_ids, text_ids, token_id,
                                 tool_result_ids)
from dataset.rl_dataset import PromptDataset
from dataset.tools import ToolCall, malformed_call, read_tool_call
from trainer.rewards import check_reward_fields
from trainer.rollouts import (SAMPLE_FIELDS, add_reward_flags, add_sampling_flags, completion_logprobs,
                              generation_config, group_advantages, grpo_loss, load_rewards, score_completions)
from trainer.trainer_utils import (REPO_ROOT, count_rows, load_model, load_reference, non_negative_float, parse_args,
                                   positive_float, positive_int, require_trained_start, run_main, setup_run, train,
                                   unwrap, with_router_loss)

AGENT_DATA = REPO_ROOT / "dataset" / "data" / "agent"
AGENT_REWARDS = ["gsm8k_accuracy", "tool_call_format", "wasted_turns"]
ROLLOUT_FIELDS = {"tool_calls", "answered", "max_turns"}  # what a rollout adds to the reward functions' fields


# ----------------------------------------------------------------------------------------------------------------
# Multi-turn rollouts


@dataclass
class Rollout:
    """One conversation of the model with the tools, as token ids after its prompt.

    Attributes:
        prompt: the task's prompt token ids (system turn with the tools, user turn, assistant header).
        ids: every token after the prompt: the model's turns, and between them the closing <|im_end|>, the tool
            result turn and the next assistant header.
        learned: one flag per id: 1 where the model sampled the token, 0 where the rollout wrote it.
        calls: the calls the model made, in order, with their results (dataset/tools.py's ToolCall).
        reply: the text of the final reply (its turn ended without a call), "" when there is none.
        answered: the last turn ended with <|im_end|> and no call: the model gave an answer.
        turns: assistant turns taken; done: the rollout has ended.
    """
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    learned: list[int] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    reply: str = ""
    answered: bool = False
    turns: int = 0
    done: bool = False

    def add(self, ids: list[int], learned: bool) -> None:
        self.ids += ids
        self.learned += [int(learned)] * len(ids)


def turn_end_ids(tokenizer) -> list[int]:
    """The tokens that end a turn of a rollout: </tool_call> (a call to run), <|im_end|>, <|endoftext|>."""
    return [token_id(tokenizer, TOOL_CALL_CLOSE), tokenizer.eos_token_id, tokenizer.pad_token_id]


def cut_at_end(new_ids: list[int], end_ids: list[int]) -> list[int]:
    """The tokens of a turn: up to and including its first end token (generate pads the rows that ended earlier)."""
    ends = [i for i, id_ in enumerate(new_ids) if id_ in end_ids]
    return new_ids[:ends[0] + 1] if ends else new_ids


def tool_result_turn(tokenizer, result: str) -> list[int]:
    """What the rollout writes after a call: <|im_end|> closing the model's turn, the chat format's "\\n", the tool
    result as a user turn holding <tool_response>\\n{result}\\n</tool_response>, and the next assistant header
    (dataset/chat_format.py's pieces, so the rollout is the conversation the template renders)."""
    return ([token_id(tokenizer, IM_END)] + text_ids(tokenizer, "\n") + tool_result_ids(tokenizer, result, True, True)
            + assistant_header_ids(tokenizer))


def read_turn(tokenizer, rollout: Rollout, turn_ids: list[int], last_turn: bool) -> None:
    """Take a sampled turn into the rollout: run its call and append the result, or end the rollout.

    A turn ending in </tool_call> holds a call: the text after its last <tool_call> is read and run
    (dataset/tools.py's read_tool_call, which never raises). Unless this was the last turn, the result is
    appended for the next turn to read. A turn that opens a <tool_call> it does not close counts as a malformed call.
    Any other turn is the final reply.
    """
    rollout.add(turn_ids, learned=True)
    rollout.turns += 1
    open_id, close_id = token_id(tokenizer, TOOL_CALL_OPEN), token_id(tokenizer, TOOL_CALL_CLOSE)
    text = tokenizer.decode(turn_ids, skip_special_tokens=True)
    if turn_ids and turn_ids[-1] == close_id:
        opens = [i for i, id_ in enumerate(turn_ids) if id_ == open_id]
        block = tokenizer.decode(turn_ids[opens[-1] + 1:-1]).strip() if opens else ""
        call = read_tool_call(block) if opens else malformed_call(None, None, "</tool_call> without <tool_call>")
        rollout.calls.append(call)
        if last_turn:
            rollout.done = True
        else:
            rollout.add(tool_result_turn(tokenizer, call.result), learned=False)
        return
    rollout.done = True
    rollout.reply = text.split(TOOL_CALL_OPEN)[0].strip()
    if TOOL_CALL_OPEN in text:
        rollout.calls.append(malformed_call(None, None, "a <tool_call> not closed by </tool_call>"))
    rollout.answered = bool(turn_ids) and turn_ids[-1] == tokenizer.eos_token_id and TOOL_CALL_OPEN not in text


@torch.no_grad()
def sample_turn(model, rollouts: list[Rollout], generation, pad_id: int) -> list[list[int]]:
    """One batched `generate` call continuing each rollout (its prompt and ids so far, left-padded); the new
    tokens of each, cut after its first end token (generation.eos_token_id)."""
    prefixes = [rollout.prompt + rollout.ids for rollout in rollouts]
    width = max(map(len, prefixes))
    input_ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prefix in enumerate(prefixes):
        input_ids[row, width - len(prefix):] = torch.tensor(prefix)
        attention_mask[row, width - len(prefix):] = 1
    device = next(model.parameters()).device
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         generation_config=generation)
    return [cut_at_end(row.tolist(), generation.eos_token_id) for row in out[:, width:].cpu()]


def roll_out(model, tokenizer, batch: dict, generation, num_generations: int, max_turns: int) -> list[Rollout]:
    """G multi-turn rollouts per task, turn by turn, in eval mode (sampling as `generation` says).

    Args:
        model: MiniMindForCausalLM (unwrapped); batch: left-padded prompts {"input_ids", "attention_mask"} (B, P).
        generation: its eos_token_id must hold turn_end_ids. max_turns: the most assistant turns of a rollout.
    Returns:
        B * G Rollouts, the G of one task next to each other.
    """
    was_training = model.training
    model.eval()
    prompts = [ids[keep.bool()].tolist() for ids, keep in zip(batch["input_ids"].cpu(),
                                                                batch["attention_mask"].cpu())]
    rollouts = [Rollout(prompt) for prompt in prompts for _ in range(num_generations)]
    for turn in range(max_turns):
        going = [rollout for rollout in rollouts if not rollout.done]
        if not going:
            break
        for rollout, turn_ids in zip(going, sample_turn(model, going, generation, tokenizer.pad_token_id)):
            read_turn(tokenizer, rollout, turn_ids, last_turn=turn == max_turns - 1)
    model.train(was_training)
    return rollouts


def rollout_tensors(rollouts: list[Rollout], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor, int]:
    """The rollouts as one batch for the forward pass: prompts left-padded to P, what follows right-padded to T.

    Returns:
        (sequences (N, P + T), attention_mask (N, P + T): 1 on every real token, loss_mask (N, T): 1 where the model
         sampled the token, T), the layout completion_logprobs reads (its last T positions).
    """
    width_p, width_t = max(len(r.prompt) for r in rollouts), max(max(len(r.ids) for r in rollouts), 1)
    sequences = torch.full((len(rollouts), width_p + width_t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(sequences)
    loss_mask = torch.zeros((len(rollouts), width_t), dtype=torch.long)
    for row, rollout in enumerate(rollouts):
        start, end = width_p - len(rollout.prompt), width_p + len(rollout.ids)
        sequences[row, start:end] = torch.tensor(rollout.prompt + rollout.ids)
        attention_mask[row, start:end] = 1
        loss_mask[row, :len(rollout.ids)] = torch.tensor(rollout.learned, dtype=torch.long)
    return sequences.to(device), attention_mask.to(device), loss_mask.to(device), width_t


# ----------------------------------------------------------------------------------------------------------------
# The loss


def score_rollouts(tokenizer, batch: dict, rollouts: list[Rollout], rewards: list[tuple], args, device):
    """The reward functions' weighted sum for each rollout (rollouts.score_completions).

    A function reads the final reply as its completion, the record's fields (e.g. `answer`), and what the rollout
    adds: tool_calls (per rollout, a list of {"name", "arguments", "well_formed", "error", "result"}), answered,
    max_turns, completion_tokens (the tokens the model wrote) and max_new_tokens (the whole budget, --max_turns x
    --max_new_tokens).
    Returns:
        ((N,) float32 rewards, {"reward_<name>": mean score of each function}).
    """
    group = args.num_generations
    records = batch["fields"]
    shared = set.intersection(*(set(record) for record in records))
    fields = {key: [record[key] for record in records for _ in range(group)] for key in shared}
    fields.update(tool_calls=[[asdict(call) for call in r.calls] for r in rollouts],
                  answered=[r.answered for r in rollouts], max_turns=[args.max_turns] * len(rollouts),
                  completion_tokens=[sum(r.learned) for r in rollouts],
                  max_new_tokens=[args.max_turns * args.max_new_tokens] * len(rollouts))
    prompts = [tokenizer.decode(r.prompt) for r in rollouts]
    return score_completions(rewards, prompts, [r.reply for r in rollouts], fields, device)


def agent_batch_loss(model, reference, tokenizer, batch: dict, rewards: list[tuple], generation,
                     args) -> tuple[torch.Tensor, dict]:
    """Roll out G conversations per task, score them, and return the GRPO loss of the batch and its figures.

    Args:
        model: the policy, possibly DDP-wrapped; reference: the frozen reference model, same device.
        batch: PromptDataset.collate output on the device: input_ids, attention_mask (B, P), fields.
        rewards: (name, function, weight) triples; generation: the sampling settings, ending a turn at
            turn_end_ids; args: num_generations, max_turns, max_new_tokens, beta, epsilon.
    Returns:
        (scalar loss, {"reward", "reward_<name>", "reward_std", "kl", "clip_fraction", "completion_length", "turns",
        "tool_calls", "answered"}; for MoE also "agent_loss" and "aux_loss").
    """
    group, device = args.num_generations, batch["input_ids"].device
    rollouts = roll_out(unwrap(model), tokenizer, batch, generation, group, args.max_turns)
    scores, reward_means = score_rollouts(tokenizer, batch, rollouts, rewards, args, device)
    advantages = group_advantages(scores, group)

    sequences, attention_mask, loss_mask, width = rollout_tensors(rollouts, tokenizer.pad_token_id, device)
    logps, aux_loss = completion_logprobs(model, sequences, attention_mask, width, generation.temperature)
    with torch.no_grad():
        ref_logps, _ = completion_logprobs(reference, sequences, attention_mask, width, generation.temperature)
    # one update per rollout: the policy that sampled it is the current one (departure 1)
    loss, stats = grpo_loss(logps, logps.detach(), ref_logps, advantages, loss_mask, args.epsilon, args.beta)
    metrics = {"reward": scores.mean(), **reward_means,
               "reward_std": scores.view(-1, group).std(dim=1, unbiased=False).mean(), **stats,
               "completion_length": loss_mask.sum(dim=1).float().mean(),
               "turns": torch.tensor([float(r.turns) for r in rollouts]).mean(),
               "tool_calls": torch.tensor([float(len(r.calls)) for r in rollouts]).mean(),
               "answered": torch.tensor([float(r.answered) for r in rollouts]).mean()}
    return with_router_loss(model, loss, aux_loss, metrics, "agent_loss")


# ----------------------------------------------------------------------------------------------------------------
# The stage


def add_agent_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tool-use RL")
    group.add_argument("--num_generations", type=positive_int, default=8,
                       help="rollouts sampled per task (the group size G, >= 2); the step's batch is --batch_size x "
                            "G rollouts")
    group.add_argument("--max_turns", type=positive_int, default=5,
                       help="most assistant turns of a rollout (each a tool call or the final reply)")
    add_sampling_flags(group)  # --max_new_tokens, --temperature, --top_p; here a completion is one turn:
    parser._option_string_actions["--max_new_tokens"].help = "most tokens of each assistant turn"
    group.add_argument("--beta", type=non_negative_float, default=0.04,
                       help="weight of the KL penalty to the reference (the --from_weight model); 0: no penalty")
    group.add_argument("--epsilon", type=positive_float, default=0.2,
                       help="clip range of the probability ratio (eq. 3); no effect: with one update per rollout "
                            "the ratio is 1 and nothing is clipped (see the module docstring)")
    add_reward_flags(group)


def main(argv: list[str] | None = None) -> dict:
    # 1. Flags: the shared ones with this stage's defaults, plus the group, the turns, sampling, objective, rewards
    args = parse_args("agent", __doc__, add_flags=add_agent_flags, argv=argv, defaults={
        "data_path": str(AGENT_DATA / "tasks_train.jsonl"),
        "eval_data_path": str(AGENT_DATA / "tasks_test.jsonl"),
        "eval_interval": 25,
        "eval_batches": 5,
        "log_interval": 1,
        "from_weight": "full_sft",
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "batch_size": 2,
        "warmup_steps": 10,
        "max_seq_len": 512,  # a prompt: the system turn with the calculator's schema and a GSM8K question
        "max_new_tokens": 64,
        "reward_funcs": AGENT_REWARDS,
    })
    setup_run(args)  # device, dtype, torchrun's process group, seeds
    require_trained_start(args, "Tool-use RL")
    if args.num_generations < 2:
        raise SystemExit("--num_generations must be >= 2: advantages compare the rollouts of a group")
    rewards = load_rewards(args)
    model, tokenizer = load_model(args)

    # 2. The reference (the --from_weight checkpoint, frozen) and the sampling: a turn ends at a call or its end
    reference = load_reference(args)
    generation = generation_config(args, tokenizer)
    generation.eos_token_id = turn_end_ids(tokenizer)

    # 3. Dataset: the tasks through the chat template (tools in the system turn), with the fields the rewards read
    train_dataset = PromptDataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
    eval_dataset = (PromptDataset(args.eval_data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
                    if args.eval_data_path else None)
    for dataset in filter(None, (train_dataset, eval_dataset)):
        for name, function, _ in rewards:
            check_reward_fields(name, function, dataset.field_names | SAMPLE_FIELDS | ROLLOUT_FIELDS)

    # 4. Loss: multi-turn rollouts with the tools, rewards, group advantages and GRPO's eq. 3 on the tokens the model
    #    wrote (agent_batch_loss), in the shared loop. The loss is no cross-entropy: no perplexity.
    def loss_fn(model, batch):
        return agent_batch_loss(model, reference, tokenizer, batch, rewards, generation, args)

    return train(args, model, tokenizer, train_dataset, loss_fn, eval_dataset=eval_dataset, eval_perplexity=False,
                 count_items=count_rows)  # the loss averages over rollouts, so a step weighs micro-batches by rows


if __name__ == "__main__":
    run_main(main)
