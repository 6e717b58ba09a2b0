"""Sequence-level unlikelihood fine-tuning: a chat model unlearns the loops of its own greedy replies.

A small model trained by maximum likelihood alone answers greedily with loops: "Ben was very happy." comes back
three times in one story, "I will help you." four. The data has few of them (2% of the SFT stories repeat a
4-word sequence three times); the loops come from decoding the model's own most likely token again and again.
Sequence-level unlikelihood training (Welleck et al. 2020, "Neural Text Generation with Unlikelihood Training",
section 5.2) fine-tunes on exactly those loops. For each step's batch of conversations:

1. the model continues each conversation's first user message greedily, with its KV cache, as chat would
   (--max_new_tokens tokens at most);
2. every token of the continuation that belongs to an n-gram (--ngram, 4 as in the paper) the continuation has
   already written is a candidate: C_t = {x_t} when x_t lies in such a repeated n-gram, else the empty set;
3. the loss pushes those tokens down, and keeps the cross-entropy of the batch's own replies so the model stays
   fluent (the paper alternates the two; here each step takes both, on the same conversations):

    L = L_MLE + alpha * L_UL,    L_UL = -1/T * sum_t sum_{c in C_t} log(1 - p(c | prompt, x_<t))

   L_MLE the next-token cross-entropy over the assistant tokens of the batch (as train_full_sft.py), T the tokens
   of the greedy continuations (end of turn included), alpha --unlikelihood_alpha. With --accumulation_steps > 1
   or several processes the loop weighs each micro-batch's L (its L_UL a mean over its own continuations) by its
   assistant tokens, as it weighs L_MLE.

Logged: lm_loss, unlikelihood_loss, repeat_fraction (the share of continuation tokens in a repeated n-gram: the
figure to watch fall; the paper's seq-rep-n is the share of repeated n-grams) and completion_length. Generation
costs most of a step, so the stage is short: a minute or two after SFT (the quick path gives it --time_budget 1.5).

    python trainer/train_unlikelihood.py                     # after trainer/train_full_sft.py
    python trainer/train_unlikelihood.py --time_budget 1.5   # the quick path's last training command

Defaults: dataset/data/sft_stories.jsonl (its first user messages are the prompts; held out:
sft_stories_test.jsonl), from out/full_sft_<hidden_size>, one epoch (46 steps of 16 conversations), peak learning
rate 1e-4 (a fine-tune of a trained model), 200 new tokens. Writes out/unlikelihood_<hidden_size>/ (chat with it:
scripts/chat.py --weight unlikelihood) and out/runs/unlikelihood_<hidden_size>/metrics.jsonl. The forward pass runs
the conversations and the continuations as one batch, so DDP sees one forward per backward under torchrun.
"""

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from dataset.lm_dataset import SFTDataset
from model.model_minimind import IGNORE_INDEX, next_token_loss
from trainer.rollouts import completion_mask
from trainer.trainer_utils import (REPO_ROOT, int_in_range, load_model, parse_args, positive_float, positive_int,
                                   require_trained_start, run_main, setup_run, train, unlikelihood, unwrap,
                                   with_router_loss)


def repeated_ngram_mask(token_ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Which tokens of each row lie in an n-gram that occurred earlier in the row (Welleck et al. 2020, 5.2).

        repeated[b, t] = 1 when some window token_ids[b, i:i + n] with i <= t < i + n equals an earlier window
                         token_ids[b, j:j + n], j < i, all of whose tokens are inside `mask`

    Args:
        token_ids: (batch, T) continuations; mask: (batch, T) 1 on their tokens, 0 on the padding after the end.
        n: the n-gram length.
    Returns:
        (batch, T) LongTensor of 0/1, 0 wherever mask is 0.
    """
    repeated = torch.zeros_like(token_ids)
    for b, (row, length) in enumerate(zip(token_ids.tolist(), mask.sum(dim=1).tolist())):
        seen = set()
        for i in range(length - n + 1):
            window = tuple(row[i:i + n])
            if window in seen:
                repeated[b, i:i + n] = 1
            seen.add(window)
    return repeated


def prompts_of(batch: dict, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt of each conversation of an SFT batch: its tokens before the first assistant token, left-padded.

    The prompt ends with the assistant header (<|im_start|>assistant\\n), so generation starts the first reply.
    Args:
        batch: SFTDataset.collate output: input_ids, labels (batch, seq), -100 outside the assistant's tokens.
    Returns:
        (input_ids, attention_mask), both (batch, longest prompt), 0 / pad_token_id on the padding at the left.
    """
    starts = (batch["labels"] != IGNORE_INDEX).int().argmax(dim=1).tolist()  # the first labelled column
    width = max(starts)
    input_ids = torch.full((len(starts), width), pad_token_id, dtype=torch.long, device=batch["input_ids"].device)
    attention_mask = torch.zeros_like(input_ids)
    for row, start in enumerate(starts):
        input_ids[row, width - start:] = batch["input_ids"][row, :start]
        attention_mask[row, width - start:] = 1
    return input_ids, attention_mask


@torch.no_grad()
def greedy_continuations(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         generation: GenerationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's greedy continuations of left-padded prompts, in eval mode with the KV cache.

    Returns:
        (sequences (batch, P + T): prompts then continuations, their attention mask (batch, P + T): the prompts'
         mask, then 1 up to and including each continuation's end token).
    """
    was_training = model.training
    model.eval()
    sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation)
    model.train(was_training)
    continuation_mask = completion_mask(sequences[:, prompt_ids.shape[1]:], generation.eos_token_id)
    return sequences, torch.cat([prompt_mask, continuation_mask], dim=1)


def pad_right(rows: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """(batch, L) -> (batch, width), `value` in the new columns at the right."""
    return F.pad(rows, (0, width - rows.shape[1]), value=value)


def unlikelihood_batch_loss(model, batch: dict, generation: GenerationConfig, alpha: float,
                            ngram: int) -> tuple[torch.Tensor, dict]:
    """L = L_MLE + alpha * L_UL of one batch of conversations (the module docstring), with its figures.

    Args:
        model: MiniMindForCausalLM, possibly wrapped (DDP).
        batch: SFTDataset.collate output on the device: input_ids, labels (B, S), optional attention_mask.
        generation: greedy settings: max_new_tokens, the end tokens, pad_token_id.
        alpha: the weight of L_UL; ngram: n of the repeated n-grams.
    Returns:
        (scalar loss, {"lm_loss", "unlikelihood_loss", "repeat_fraction", "completion_length"}; for MoE also
        "aux_loss"). lm_loss is the mean over the assistant tokens, unlikelihood_loss over the continuations'.
    """
    prompt_ids, prompt_mask = prompts_of(batch, generation.pad_token_id)
    sequences, sequence_mask = greedy_continuations(unwrap(model), prompt_ids, prompt_mask, generation)
    num_prompt = prompt_ids.shape[1]
    continuation = sequences[:, num_prompt:]  # (B, T)
    continuation_mask = sequence_mask[:, num_prompt:]
    repeated = repeated_ngram_mask(continuation, continuation_mask, ngram)  # (B, T): the candidates C_t

    # one forward over the conversations and the continuations (one batch: DDP sees one forward per backward)
    rows = len(batch["input_ids"])
    width = max(batch["input_ids"].shape[1], sequences.shape[1])
    conversation_mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    input_ids = torch.cat([pad_right(batch["input_ids"], width, generation.pad_token_id),
                           pad_right(sequences, width, generation.pad_token_id)])
    attention_mask = torch.cat([pad_right(conversation_mask, width, 0), pad_right(sequence_mask, width, 0)])
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    lm_loss = next_token_loss(out.logits[:rows], pad_right(batch["labels"], width, IGNORE_INDEX))

    # log p(x_t | prompt, x_<t) of each continuation token: the logits one column to its left
    logits = out.logits[rows:, num_prompt - 1:num_prompt - 1 + continuation.shape[1]].float()
    logprobs = logits.log_softmax(-1).gather(-1, continuation[..., None]).squeeze(-1)  # (B, T)
    num_tokens = continuation_mask.sum().clamp(min=1)
    unlikelihood_loss = unlikelihood(logprobs, repeated) / num_tokens
    metrics = {"lm_loss": lm_loss.detach(), "unlikelihood_loss": unlikelihood_loss.detach(),
               "repeat_fraction": repeated.sum() / num_tokens,
               "completion_length": continuation_mask.sum(dim=1).float().mean()}
    return with_router_loss(model, lm_loss + alpha * unlikelihood_loss, out.aux_loss, metrics, "unlikelihood_total")


def add_unlikelihood_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("unlikelihood")
    group.add_argument("--unlikelihood_alpha", type=positive_float, default=1.0,
                       help="weight of the unlikelihood term against the cross-entropy (the paper: 1.0)")
    group.add_argument("--ngram", type=int_in_range(1, 16), default=4,
                       help="a token is pushed down when it lies in a repeated n-gram of this length (the paper: 4)")
    group.add_argument("--max_new_tokens", type=positive_int, default=200,
                       help="most tokens of a greedy continuation (loops show after the first sentences)")


def main(argv: list[str] | None = None) -> dict:
    # 1. Flags: the shared ones with this stage's defaults, plus alpha, n and the continuation length
    args = parse_args("unlikelihood", __doc__, add_flags=add_unlikelihood_flags, argv=argv, defaults={
        "data_path": str(REPO_ROOT / "dataset" / "data" / "sft_stories.jsonl"),
        "eval_data_path": str(REPO_ROOT / "dataset" / "data" / "sft_stories_test.jsonl"),
        "eval_batches": 2,  # each eval batch generates: keep the eval short
        "from_weight": "full_sft",
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "warmup_steps": 5,
        "log_interval": 5,
    })
    setup_run(args)  # device, dtype, torchrun's process group, seeds
    require_trained_start(args, "Unlikelihood fine-tuning")
    model, tokenizer = load_model(args)

    # 2. Dataset: the conversations through the chat template (their first user messages are the prompts)
    train_dataset = SFTDataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
    eval_dataset = (SFTDataset(args.eval_data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
                    if args.eval_data_path else None)

    # 3. Loss: greedy continuations, their repeated n-grams pushed down, plus the cross-entropy of the replies
    #    (unlikelihood_batch_loss), in the shared loop: accumulation, clipping, schedule, logging, eval, checkpoints
    generation = GenerationConfig(do_sample=False, max_new_tokens=args.max_new_tokens,
                                  eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
                                  pad_token_id=tokenizer.pad_token_id)
    loss_fn = partial(unlikelihood_batch_loss, generation=generation, alpha=args.unlikelihood_alpha,
                      ngram=args.ngram)
    return train(args, model, tokenizer, train_dataset, loss_fn, eval_dataset=eval_dataset)


if __name__ == "__main__":
    run_main(main)
