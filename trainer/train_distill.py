"""Knowledge distillation: train a small student to match a larger teacher's next-token distribution.

White-box distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"): the
student sees the teacher's full probability over the vocabulary at every supervised position, not only the
one token the data holds. Which wrong tokens the teacher finds plausible, and how plausible, is information a
one-hot label lacks ("dark knowledge"), so the student learns more per example than from the labels alone.
Both models read the same tokens, so they must share the tokenizer; they may differ in width, depth and
dense/MoE feed-forward.

The data are SFT conversations (loss on the assistant's tokens only, as in trainer/train_full_sft.py). Over the
N supervised positions t of a batch (those whose next label is not -100), with the student's logits s_t, the
teacher's z_t, and their distributions at temperature T, q = softmax(s_t / T) and p = softmax(z_t / T):

    L  = alpha * CE + (1 - alpha) * T^2 * KL
    CE = -1/N * sum_t log softmax(s_t)[x_{t+1}]                 (the SFT loss, at temperature 1)
    KL =  1/N * sum_t sum_v p(v) * (log p(v) - log q(v))        (KL(p || q): teacher to student)

The gradient of the KL with respect to a student logit is (q - p) / T, and at high temperature q - p itself
shrinks as 1/T, so the soft term's gradients shrink as 1/T^2 (Hinton et al. 2015, sec. 2.1); multiplying by T^2
keeps its weight against the CE term about the same whatever the temperature. T > 1 softens both
distributions so the teacher's small probabilities, the ones that carry its knowledge, weigh in the KL instead
of vanishing next to its top token. Too high a T makes the student match even the teacher's most negative
logits, which carry little and which a much smaller student cannot afford to fit: Hinton et al. found
intermediate temperatures best for small students.
The defaults T = 2 and alpha = 0.5 are those of DistilBERT's training script (Sanh et al. 2019). --alpha 1 is
plain SFT: the teacher is not even loaded, so the cross-entropy-only baseline is the same command with one flag
changed (compare eval_ppl).

The teacher runs in eval mode without gradients and is never saved; the student is what the loop trains,
evaluates (eval_ppl is the student's cross-entropy perplexity, eval_kl_loss its distance to the teacher),
checkpoints and resumes. Defaults: teacher out/full_sft_256 (--teacher_weight, --teacher_hidden_size), a
fresh student half as wide (--hidden_size 128, 4 layers, 4 query and 2 key/value heads), dataset/data/sft.jsonl,
2 epochs, peak learning rate 1e-3.

    python trainer/train_distill.py                                  # after trainer/train_full_sft.py
    python trainer/train_distill.py --alpha 1                        # the same student, cross-entropy only
    python trainer/train_distill.py --teacher_weight full_sft --teacher_hidden_size 512 --teacher_use_moe 1
    python trainer/train_distill.py --from_weight pretrain           # a pretrained student (out/pretrain_128)
    torchrun --nproc_per_node 2 trainer/train_distill.py             # two processes (two GPUs, or CPU with gloo)

Writes out/distill_<hidden_size>/ (chat with it: scripts/chat.py) and out/runs/distill_<hidden_size>/metrics.jsonl.
"""

import argparse

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from dataset.lm_dataset import SFTDataset
from model.model_minimind import IGNORE_INDEX, token_logprobs
from trainer.distributed import log
from trainer.trainer_utils import (REPO_ROOT, causal_lm_loss, fraction, load_frozen, load_model, parse_args,
                                   positive_float, positive_int, resolve_weight_dir, run_main, setup_run, train,
                                   with_router_loss)

# ----------------------------------------------------------------------------------------------------------------
# Flags


def distill_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of this stage: the teacher, and the weights and temperature of the loss."""
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher_weight", default="full_sft",
                       help="teacher: a stage name under --save_dir (its directory picked by --teacher_hidden_size "
                            "and --teacher_use_moe) | a directory")
    group.add_argument("--teacher_hidden_size", type=positive_int, default=256,
                       help="picks the teacher's stage directory, <teacher_weight>_<teacher_hidden_size>[_moe]")
    group.add_argument("--teacher_use_moe", type=int, choices=(0, 1), default=0,
                       help="1: the teacher's stage directory is the MoE one (_moe suffix)")
    group.add_argument("--alpha", type=fraction, default=0.5,
                       help="weight of the cross-entropy with the labels, in [0, 1]; 1 - alpha weighs the KL to the "
                            "teacher (1: cross-entropy only, the teacher is not loaded)")
    group.add_argument("--temperature", type=positive_float, default=2.0,
                       help="softmax temperature T > 0 of teacher and student in the KL term (1: the models' own "
                            "distributions; higher: softer)")


# ----------------------------------------------------------------------------------------------------------------
# The teacher


def load_teacher(args, student: torch.nn.Module, tokenizer) -> torch.nn.Module:
    """Load the frozen teacher --teacher_weight names, on --device, after checking it reads the student's tokens.

    Args:
        student: the student model (its config.vocab_size must equal the teacher's).
        tokenizer: the student's tokenizer (from load_model); the teacher directory's own must have the same vocab.
    Returns:
        the teacher (float32 master weights, like the student; the loop's autocast applies to it too), in eval
        mode, with requires_grad False on every parameter.
    Raises:
        SystemExit: no teacher checkpoint, weights that do not fit its config, no tokenizer in its directory,
            a tokenizer whose vocabulary differs from the student's, or a different vocab_size.
    """
    directory = resolve_weight_dir(args.teacher_weight, args.save_dir, args.teacher_hidden_size,
                                   bool(args.teacher_use_moe), flag="--teacher_weight")
    if not (directory / "tokenizer_config.json").is_file():
        raise SystemExit(f"--teacher_weight {args.teacher_weight}: {directory} has no tokenizer files "
                         "(tokenizer_config.json), so it cannot be checked against the student's tokenizer")
    # token v of the teacher's logits must be token v of the student's: same strings at the same ids
    if AutoTokenizer.from_pretrained(directory).get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"--teacher_weight {args.teacher_weight}: the teacher's tokenizer in {directory} differs "
                         f"from the student's in {tokenizer.name_or_path}; distillation compares the two models "
                         f"token by token, so give the student the teacher's tokenizer (--tokenizer_path {directory})")
    teacher = load_frozen(directory, args.device, flag="--teacher_weight")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise SystemExit(f"--teacher_weight {args.teacher_weight}: the teacher in {directory} has vocab_size "
                         f"{teacher.config.vocab_size} but the student has {student.config.vocab_size}; their "
                         "logits must cover the same vocabulary")
    log(f"teacher {directory}: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters, frozen")
    return teacher


# ----------------------------------------------------------------------------------------------------------------
# The loss


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinton et al. (2015) distillation loss over the supervised positions: alpha * CE + (1 - alpha) * T^2 * KL.

        CE = -1/N * sum_t log softmax(s_t)[labels[t + 1]]
        KL =  1/N * sum_t sum_v p(v) * (log p(v) - log q(v)),   p = softmax(z_t / T), q = softmax(s_t / T)

    over the N positions t whose next label labels[t + 1] is not -100 (s: student logits, z: teacher logits).
    KL(p || q) is the forward KL: the student is pulled to cover every token the teacher finds likely.
    Computed in float32 whatever the logits' dtype.

    Args:
        student_logits, teacher_logits: (batch, seq, vocab); position t scores the token at t + 1. The teacher's
            should carry no gradient (computed under torch.no_grad).
        labels: (batch, seq) LongTensor, IGNORE_INDEX (-100) where there is no loss.
        alpha: weight of the CE in [0, 1]; temperature: T > 0.
    Returns:
        (loss, ce, kl): scalar tensors in nats per supervised position; nan when no position is supervised.
    """
    supervised = labels[:, 1:] != IGNORE_INDEX  # (batch, seq - 1): position t predicts token t + 1
    ce = -token_logprobs(student_logits, labels).sum() / supervised.sum()
    student = student_logits[:, :-1][supervised].float()  # (N, vocab)
    teacher = teacher_logits[:, :-1][supervised].float()  # (N, vocab)
    # kl_div(input=log q, target=log p, log_target=True) is sum p * (log p - log q); batchmean divides by N
    kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                  reduction="batchmean", log_target=True)
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl, ce, kl


def student_teacher_loss(model, teacher, batch: dict, alpha: float, temperature: float) -> tuple[torch.Tensor, dict]:
    """Run student and teacher on a batch and return the distillation loss (+ the MoE router loss of the student).

    Args:
        model: the student (possibly DDP-wrapped); teacher: the frozen teacher, run under torch.no_grad.
        batch: input_ids and labels (batch, seq) LongTensors, optional attention_mask / position_ids.
    Returns:
        (loss, {"lm_loss": CE, "kl_loss": KL}) as in distillation_loss; for a MoE student the loss also holds
        router_aux_loss_coef * aux_loss (Switch Transformer, Fedus et al. 2022), and the metrics "distill_loss"
        (the loss without it) and "aux_loss".
        lm_loss makes the loop's eval perplexity the student's cross-entropy perplexity.
    """
    inputs = {key: batch.get(key) for key in ("input_ids", "attention_mask", "position_ids")}
    out = model(**inputs)
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    loss, ce, kl = distillation_loss(out.logits, teacher_logits, batch["labels"], alpha, temperature)
    metrics = {"lm_loss": ce.detach(), "kl_loss": kl.detach()}
    return with_router_loss(model, loss, out.aux_loss, metrics, "distill_loss")


# ----------------------------------------------------------------------------------------------------------------
# The stage


def main(argv: list[str] | None = None) -> dict:
    # 1. Flags (the shared ones, with a fresh student half the teacher's width by default, and the teacher's);
    #    the student (--from_weight, none by default) and the frozen teacher
    args = parse_args("distill", __doc__, add_flags=distill_flags, argv=argv, defaults={
        "data_path": str(REPO_ROOT / "dataset" / "data" / "sft.jsonl"),
        "eval_data_path": str(REPO_ROOT / "dataset" / "data" / "sft_test.jsonl"),
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "learning_rate": 1e-3,
        "epochs": 2,
    })
    setup_run(args)  # device, dtype, torchrun's process group, seeds
    model, tokenizer = load_model(args)
    teacher = None
    if args.alpha < 1.0:
        teacher = load_teacher(args, model, tokenizer)
    else:
        log("--alpha 1: cross-entropy only; the teacher is not loaded")

    # 2. Dataset: conversations through the chat template, labels -100 outside the assistant's replies
    train_dataset = SFTDataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
    eval_dataset = (SFTDataset(args.eval_data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
                    if args.eval_data_path else None)

    # 3. Loss: alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) on the assistant's tokens
    def loss_fn(model, batch):
        return student_teacher_loss(model, teacher, batch, args.alpha, args.temperature)

    # 4. The shared loop: accumulation, clipping, schedule, logging, eval, checkpoints, resume
    return train(args, model, tokenizer, train_dataset, loss_fn if teacher is not None else causal_lm_loss,
                 eval_dataset=eval_dataset)


if __name__ == "__main__":
    run_main(main)
