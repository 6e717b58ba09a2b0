"""Supervised fine-tuning (SFT): teach a pretrained model to answer in the chat format, all weights trained.

Each conversation is rendered with the tokenizer's ChatML template (<|im_start|>role ... <|im_end|>) and the
loss covers only what the assistant writes, its closing <|im_end|> included (that is what teaches the model
to stop); system, user and tool tokens have label -100. The objective is the next-token cross-entropy over
the N assistant positions of an optimizer step (InstructGPT, Ouyang et al. 2022, step 1), however the step is
split into micro-batches and processes, so a long reply weighs by its tokens (trainer_utils.optimizer_step):

    L = -1/N * sum_{t: x_{t+1} is assistant} log p(x_{t+1} | x_1 .. x_t)

Samples keep their own length; the loop batches samples of similar length together and pads each batch to its
longest sample. Defaults: dataset/data/sft_stories.jsonl (story requests answered by real TinyStories stories,
the MiniMind identity conversations, a few Tang poems; held out: sft_stories_test.jsonl), starting from
out/pretrain_<hidden_size>, 5 epochs (230 steps of the 730 conversations), peak learning rate 1e-3 (half of pretraining's: the model already knows
the language; large models use far lower rates), 16 conversations per step. Alpaca's instructions
(dataset/data/sft.jsonl) are beyond a model of a few million parameters; they are for larger models.

    python trainer/train_full_sft.py                         # after trainer/train_pretrain.py
    python trainer/train_full_sft.py --data_path dataset/data/sft.jsonl --eval_data_path dataset/data/sft_test.jsonl
    torchrun --nproc_per_node 2 trainer/train_full_sft.py    # two processes (two GPUs, or CPU with gloo)

With --unlikelihood_alpha A > 0 the loss adds token-level unlikelihood training (Welleck et al. 2020, "Neural
Text Generation with Unlikelihood Training", section 5.1): at every assistant position the model is also taught that
the tokens the reply has already written, other than the true next one, are unlikely next,

    L = 1/N * sum_t [ -log p(x_{t+1} | x_1 .. x_t)  -  A * sum_{c in C_t} log(1 - p(c | x_1 .. x_t)) ]
    C_t = {the assistant tokens before x_{t+1}} minus {x_{t+1}}

which lowers the probability of a small model's greedy loops ("Ben was very happy." again and again) while the
cross-entropy term still fits the data.

Writes out/full_sft_<hidden_size>/ (chat with it: scripts/chat.py) and out/runs/full_sft_<hidden_size>/metrics.jsonl.
"""

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from dataset.lm_dataset import SFTDataset
from model.model_minimind import IGNORE_INDEX
from trainer.trainer_utils import (REPO_ROOT, causal_lm_loss, load_model, non_negative_float, parse_args, run_main,
                                   setup_run, train, unlikelihood, with_router_loss)


def unlikelihood_candidates(targets: torch.Tensor) -> torch.Tensor:
    """Which earlier targets are unlikelihood candidates at each position (C_t of Welleck et al. 2020, section 5.1).

        candidates[b, t, s] = s < t, targets[b, s] is the first occurrence of its token in the row,
                              targets[b, s] != targets[b, t], and both are scored (not -100)

    A token counts once however often the reply has written it (C_t is a set); the true next token is never a
    candidate.

    Args:
        targets: (batch, seq) next-token ids, targets[t] = labels[t + 1], -100 where nothing is scored.
    Returns:
        (batch, seq, seq) bool: position t (dim 1) penalizes the token targets[s] of position s (dim 2).
    """
    scored = targets != IGNORE_INDEX
    same = targets[:, :, None] == targets[:, None, :]  # (batch, seq, seq): same[b, t, s] = targets equal
    earlier = torch.ones_like(same[0]).tril(-1)  # earlier[t, s] = s < t
    repeated = (same & earlier & scored[:, None, :]).any(-1)  # (batch, seq): written before at a scored position
    first = scored & ~repeated
    return earlier & first[:, None, :] & ~same & scored[:, :, None]


def unlikelihood_sft_loss(model, batch: dict, alpha: float) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy plus alpha times the token-level unlikelihood (the module docstring's L), per token.

    Args:
        model: MiniMindForCausalLM, possibly wrapped (DDP).
        batch: input_ids and labels (batch, seq), optional attention_mask (SFTDataset.collate).
        alpha: the unlikelihood weight A (Welleck et al. use 1.0).
    Returns:
        (scalar loss, {"lm_loss": the cross-entropy alone, "unlikelihood_loss": sum over C_t per token}); both
        are means over the N positions whose next token is labelled, as causal_lm_loss's loss is.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (batch, seq): targets[t] = labels[t+1]
    scored = targets != IGNORE_INDEX
    logprobs = out.logits.float().log_softmax(-1)  # (batch, seq, vocab)
    index = targets.clamp(min=0)
    n = scored.sum()
    lm_loss = -(logprobs.gather(-1, index[..., None]).squeeze(-1) * scored).sum() / n
    # log p(targets[s] | x_1 .. x_t) for every pair (t, s): (batch, seq, seq)
    candidate_logprobs = logprobs.gather(-1, index[:, None, :].expand(-1, targets.shape[1], -1))
    unlikelihood_loss = unlikelihood(candidate_logprobs, unlikelihood_candidates(targets)) / n
    metrics = {"lm_loss": lm_loss.detach(), "unlikelihood_loss": unlikelihood_loss.detach()}
    return with_router_loss(model, lm_loss + alpha * unlikelihood_loss, out.aux_loss, metrics, "sft_loss")


def add_sft_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SFT")
    group.add_argument("--unlikelihood_alpha", type=non_negative_float, default=0.0,
                       help="weight of token-level unlikelihood training against repeating the reply's own tokens "
                            "(Welleck et al. 2020 use 1.0); 0 trains on the cross-entropy alone")


def main(argv: list[str] | None = None) -> dict:
    # 1. Flags: the shared ones with this stage's defaults, plus --unlikelihood_alpha
    args = parse_args("full_sft", __doc__, add_flags=add_sft_flags, argv=argv, defaults={
        "data_path": str(REPO_ROOT / "dataset" / "data" / "sft_stories.jsonl"),
        "eval_data_path": str(REPO_ROOT / "dataset" / "data" / "sft_stories_test.jsonl"),
        "from_weight": "pretrain",
        "learning_rate": 1e-3,
        "epochs": 5,
    })
    setup_run(args)  # device, dtype, torchrun's process group, seeds
    model, tokenizer = load_model(args)

    # 2. Dataset: conversations through the chat template, labels -100 outside the assistant's replies
    train_dataset = SFTDataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
    eval_dataset = (SFTDataset(args.eval_data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
                    if args.eval_data_path else None)

    # 3. Loss: next-token cross-entropy on the labelled tokens (causal_lm_loss; with --unlikelihood_alpha, plus the
    #    unlikelihood term), in the shared loop: accumulation, clipping, schedule, logging, eval, checkpoints, resume
    loss_fn = (partial(unlikelihood_sft_loss, alpha=args.unlikelihood_alpha) if args.unlikelihood_alpha > 0
               else causal_lm_loss)
    return train(args, model, tokenizer, train_dataset, loss_fn, eval_dataset=eval_dataset)


if __name__ == "__main__":
    run_main(main)
