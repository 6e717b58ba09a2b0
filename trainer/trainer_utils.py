"""The one training loop every stage script shares, and what it needs around it.

A stage script (train_pretrain.py, train_full_sft.py, ...) reads in four parts and calls this module four times:

    args = parse_args("pretrain", __doc__, add_flags=..., defaults=...)  # flags: parsed and checked, nothing more
    setup_run(args)                                                      # device, dtype, torchrun, seeds
    model, tokenizer = load_model(args)                                  # --from_weight: none | stage | path
    dataset = PretrainDataset(args.data_path, tokenizer, args.max_seq_len)
    def loss_fn(model, batch): ...                                       # the stage's math, in the stage script
    train(args, model, tokenizer, dataset, loss_fn, eval_dataset)        # this loop

(parse_args lives in `trainer/flags.py`, setup_run in `trainer/distributed.py`; both are imported from here.)
Read top to bottom: the entry point -> loading a model -> the order of the data -> the learning-rate schedule and
optimizer -> the loss -> compilation -> the loop: `optimizer_step` (one step over its micro-batches), the small
pieces of a step (plan_steps, wrap_model, learning_rate, step_totals, log_step, evaluate_and_save_if_due), and
`train`, which reads as nanoGPT's loop with its `model` (what the step calls) and `raw_model` (what evaluates and
saves). Around it: `trainer/distributed.py` (device, dtype, torchrun, rank-0 output), `trainer/checkpoint.py`
(files on disk), `trainer/monitor.py` (eval, metrics log, stop signals).
"""

import ctypes
import math
import os
import platform
import re
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoTokenizer

from dataset.lm_dataset import DataFormatError
from model.loading import load_pretrained
from model.model_minimind import IGNORE_INDEX, MiniMindConfig, MiniMindForCausalLM
from trainer.checkpoint import (PARTIAL_FILE, checkpoint_name, refuse_other_shapes, restore_checkpoint,
                                save_checkpoint, save_weights, unfinished_step)
from trainer.distributed import (batch_to_device, deepspeed_engine, full_tensor, gradient_sync, is_deepspeed, log,
                                 parallelize, rank_and_world_size)
from trainer.distributed import setup_run  # noqa: F401 (the stage scripts import it with parse_args from here)
from trainer.flags import (BUDGET_EPOCHS, REPO_ROOT, fraction, int_in_range,  # noqa: F401 (the stage scripts)
                           non_negative_float, non_negative_int, parse_args, positive_float, positive_int)
from trainer.monitor import MetricsLog, evaluate, stop_on_signal
from trainer.resume_checks import run_lock, run_settings

LENGTH_GROUP_BATCHES = 50  # samples are sorted by length within chunks of this many batches


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def run_main(main: Callable[[], object]) -> None:
    """Run a stage's main(): a user mistake ends with one line on stderr and exit status 1, not a traceback.

    A run stopped by SIGINT or SIGTERM (saved; train returns {"stopped": True, "signal": number}) exits with
    128 + the signal's number, 130 or 143, as the shell reports an interrupted command: `train_pretrain.py &&
    train_full_sft.py` does not go on from a half-trained stage, and a scheduler sees the job did not finish.
    """
    try:
        result = main()
    except (DataFormatError, FileNotFoundError) as error:
        sys.exit(str(error))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if isinstance(result, dict) and result.get("stopped"):
        sys.exit(128 + int(result.get("signal") or signal.SIGTERM))


# ----------------------------------------------------------------------------------------------------------------
# Loading a model


def resolve_weight_dir(weight: str, save_dir: str, hidden_size: int, use_moe: bool,
                       flag: str = "--from_weight") -> Path:
    """The checkpoint directory `weight` names: a stage under save_dir (picked by hidden_size, use_moe) or a path.

    Args:
        weight: a stage name such as "pretrain" (-> <save_dir>/pretrain_<hidden_size>[_moe]) or a directory.
        flag: the flag that gave `weight`, for the error message.
    Raises:
        SystemExit: when no checkpoint (config.json) is there.
    """
    stage_dir = Path(save_dir) / checkpoint_name(weight, hidden_size, use_moe)
    directory = stage_dir if stage_dir.is_dir() else Path(weight)
    if not directory.is_dir() and os.sep in weight:
        raise SystemExit(f"{flag} {weight}: no such directory")
    if not directory.is_dir():
        raise SystemExit(missing_checkpoint(weight, stage_dir, flag))
    if not (directory / "config.json").is_file():
        raise SystemExit(f"{flag} {weight}: {directory} has no config.json; not a checkpoint")
    if step := unfinished_step(directory):
        raise SystemExit(f"{flag} {weight}: {directory} holds the weights of an unfinished run (interrupted at step "
                         f"{step}); finish it with --from_resume 1 (the same command it was started with) or "
                         f"delete {directory / PARTIAL_FILE} to use it as it is")
    return directory


MADE_WITH_SAVE_WEIGHT = {  # weights docs/rl.md makes with a stage script under another --save_weight
    "reason_sft": "trainer/train_full_sft.py --from_weight full_sft --save_weight reason_sft",
    "tool_sft": "trainer/train_full_sft.py --from_weight full_sft --save_weight tool_sft "
                "--data_path dataset/data/agent/tool_sft.jsonl",
}


def stage_scripts() -> dict[str, str]:
    """{stage name: the script that makes it}: each trainer/train_*.py names its stage in its parse_args call."""
    scripts = {}
    for script in sorted((REPO_ROOT / "trainer").glob("train_*.py")):
        if found := re.search(r'parse_args\(\s*"(\w+)"', script.read_text()):
            scripts[found[1]] = f"trainer/{script.name}"
    return {**scripts, **MADE_WITH_SAVE_WEIGHT}


def missing_checkpoint(weight: str, stage_dir: Path, flag: str) -> str:
    """The message for a stage name without a checkpoint: what makes it, and what the save dir does hold."""
    save_dir = stage_dir.parent
    held = sorted(path.name for path in save_dir.iterdir() if (path / "config.json").is_file()) if (
        save_dir.is_dir()) else []
    prefix = "" if flag == "--from_weight" else flag.removeprefix("--").removesuffix("weight")  # --teacher_weight
    other_shapes = [(name, found) for name in held if (found := re.fullmatch(rf"{re.escape(weight)}_(\d+)(_moe)?",
                                                                             name))]
    if other_shapes:
        choices = ", ".join(f"{name} (--{prefix}hidden_size {found[1]}{f' --{prefix}use_moe 1' if found[2] else ''})"
                            for name, found in other_shapes)
        return (f"{flag} {weight}: no checkpoint at {stage_dir}, but {save_dir} has {choices}; pass that shape or "
                "a directory")
    scripts = stage_scripts()
    made_by = (f"python {scripts[weight]} makes it" if weight in scripts else
               f"no stage is named {weight} (stages: {', '.join(scripts)})")
    return (f"{flag} {weight}: no checkpoint at {stage_dir}; {made_by}; {save_dir} holds "
            f"{', '.join(held) if held else 'no checkpoint yet'}")


def load_model(args) -> tuple[MiniMindForCausalLM, transformers.PreTrainedTokenizerBase]:
    """Build or load the model --from_weight names, with its tokenizer.

    A checkpoint directory brings its own tokenizer files; a fresh model uses --tokenizer_path.
    `--from_weight none` builds a fresh MiniMindForCausalLM from the shape flags, with vocab_size and the
    pad/bos/eos ids taken from the tokenizer. Otherwise the checkpoint's own config.json decides the shape and
    the weights load strictly (load_pretrained). The model stays in float32 (the master weights); `train` runs
    the forward pass under autocast.

    Raises:
        SystemExit: no tokenizer, unknown --from_weight, weights that do not fit, a tokenizer larger than the
            model's vocabulary.
    """
    directory = None
    if args.from_weight != "none":
        directory = resolve_weight_dir(args.from_weight, args.save_dir, args.hidden_size, args.use_moe)
    # a checkpoint carries the tokenizer it was trained with; a fresh model takes --tokenizer_path
    tokenizer_dir = directory if directory and (directory / "tokenizer_config.json").is_file() else args.tokenizer_path
    if not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        raise SystemExit(f"--tokenizer_path {tokenizer_dir}: no tokenizer there (tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if directory is None:
        try:
            config = MiniMindConfig(
                vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
                use_moe=bool(args.use_moe), num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),  # ChatML opens every turn with it
            )
        except ValueError as error:  # e.g. --hidden_size not divisible by --num_attention_heads
            raise SystemExit(f"model shape flags: {error}") from None
        model = MiniMindForCausalLM(config)
    else:
        model = load_pretrained(directory)
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(
            f"--tokenizer_path {args.tokenizer_path} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{model.config.vocab_size}; use the tokenizer the checkpoint was trained with"
        )
    log_parameter_counts(model)
    return model, tokenizer


def require_trained_start(args, method: str) -> None:
    """Refuse --from_weight none for a method (DPO, GRPO) whose frozen reference is the model it starts from.

    Raises:
        SystemExit: naming the method and what to pass instead.
    """
    if args.from_weight == "none":
        raise SystemExit(f"--from_weight none: {method} starts from a trained chat model, which is also its frozen "
                         "reference; pass --from_weight full_sft (after trainer/train_full_sft.py) or a directory")


def load_frozen(directory: Path, device: str, flag: str = "--from_weight") -> MiniMindForCausalLM:
    """A checkpoint loaded strictly (load_pretrained, float32) as a frozen model: eval mode, no parameter
    requiring gradients, on `device`. The loop's autocast applies to it as to the trained model."""
    return load_pretrained(directory, flag).requires_grad_(False).eval().to(device)


def load_reference(args) -> MiniMindForCausalLM:
    """The frozen reference of DPO and GRPO: the --from_weight checkpoint again (load_frozen), on --device.

    Read from the checkpoint directory, not copied from the trained model, so it stays what the run started from
    even when --from_resume 1 loads trained weights into the model.
    """
    return load_frozen(resolve_weight_dir(args.from_weight, args.save_dir, args.hidden_size, args.use_moe),
                       args.device)


def log_parameter_counts(model: torch.nn.Module) -> None:
    """Print the total and the trainable parameter counts (rank 0)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"model: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable ({100 * trainable / total:.2f}%)")


# ----------------------------------------------------------------------------------------------------------------
# The order of the data


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The batches (lists of sample indices) this rank reads in `epoch`: the same for the same arguments.

    A random permutation from (seed, epoch) is cut into batches. When samples have different `lengths`, the
    permutation is first sorted by length within chunks of LENGTH_GROUP_BATCHES batches and the batches are then
    shuffled: each batch holds samples of similar length (little padding) and the order stays random.
    Rank r takes batches r, r + world_size, ...; the batch count is cut to a multiple of world_size so every
    rank runs the same number of steps (DDP waits for all of them at each step).

    Raises:
        SystemExit: when the data has fewer batches than there are processes.
    """
    generator = torch.Generator().manual_seed(seed * 10_000 + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    grouped = lengths is not None and len(set(lengths)) > 1
    if grouped:
        chunk = batch_size * LENGTH_GROUP_BATCHES
        chunks = [sorted(order[start:start + chunk], key=lengths.__getitem__) for start in range(0, num_samples, chunk)]
        order = [i for sorted_chunk in chunks for i in sorted_chunk]
    batches = [order[start:start + batch_size] for start in range(0, num_samples, batch_size)]
    if grouped:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    usable = len(batches) - len(batches) % world_size
    if usable == 0:
        raise SystemExit(f"{num_samples} samples make fewer batches of --batch_size {batch_size} than the "
                         f"{world_size} processes; lower --batch_size or use more data")
    return batches[rank:usable:world_size]


def count_tokens(batch: dict) -> int:
    """Non-padding input tokens of a batch (before it moves to the device, so no GPU sync)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule and optimizer


def cosine_lr(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr_ratio * max_lr.

        warmup (step < W):   lr = max_lr * (step + 1) / W
        decay:               p = (step - W) / (T - 1 - W),  lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2

    with W = warmup_steps, T = total_steps, min_lr = min_lr_ratio * max_lr, so the first step after warmup runs at
    max_lr and the last step (T - 1) at min_lr. SGDR (Loshchilov & Hutter 2017); the warmup of Goyal et al. 2017.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    return cosine_decay((step - warmup_steps) / max(1, total_steps - 1 - warmup_steps), max_lr, min_lr_ratio)


def time_budget_lr(step: int, elapsed_s: float, budget_s: float, max_lr: float, warmup_steps: int,
                   min_lr_ratio: float) -> float:
    """Learning rate of a --time_budget run: cosine_lr's warmup over the first steps, then its cosine over the
    fraction of the budget spent, p = elapsed_s / budget_s, so the rate reaches min_lr_ratio * max_lr when the
    time is up however fast the host is. (At the end of the warmup p is already a little above 0: the rate
    starts its decay a hair below max_lr.)"""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    return cosine_decay(elapsed_s / budget_s, max_lr, min_lr_ratio)


def cosine_decay(progress: float, max_lr: float, min_lr_ratio: float) -> float:
    """min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2 at progress p (clipped to [0, 1])."""
    min_lr = min_lr_ratio * max_lr
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over the trainable parameters; weight decay on matrices only.

    Norm weights and biases (1-D) are not decayed, as in GPT-2/nanoGPT: shrinking them toward 0 has no
    regularizing meaning. Betas (0.9, 0.95) as in GPT-3 and LLaMA. A model may train some submodules at another
    rate: `model.lr_ratios`, {submodule name: its rate / the schedule's} (PPO's value model); each parameter
    group keeps its `lr_ratio` (1 for the rest), which the loop multiplies the scheduled rate by.

    Memory: AdamW keeps two float32 states per trainable parameter (exp_avg, exp_avg_sq), so with the float32
    weights (autocast casts copies for the matrix products) and their float32 gradients a run holds

        weights + gradients + AdamW states = (4 + 4 + 8) bytes x parameters      before any activation

    (ZeRO, Rajbhandari et al. 2020, section 3.1, counts the same 16 bytes for fp16 mixed precision: 2 + 2 + 12).
    """
    ratios = getattr(model, "lr_ratios", {})
    by_ratio: dict[float, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:  # grouped by the rate of the submodule the name starts with
            by_ratio.setdefault(ratios.get(name.partition(".")[0], 1.0), []).append(param)
    groups = [group for ratio, params in by_ratio.items() for group in (
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay, "lr_ratio": ratio},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_ratio": ratio})]
    # fused: one kernel for all parameters instead of a loop over them; on CPU too (at the 26.9M reference shape
    # 8.6 vs 38 ms a step, bench/README.md); MPS and others keep the default loop
    fused = torch.device(args.device).type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), fused=fused)


# ----------------------------------------------------------------------------------------------------------------
# The language-modeling loss


def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy over the positions whose label is not -100 (+ the MoE load-balancing loss).

        L = -1/N * sum_{t: labels[t+1] != -100} log p(labels[t+1] | input_ids[..t])

    The objective of pretraining (labels = input_ids) and of supervised fine-tuning (labels only on the
    assistant's tokens): the stages differ in their data, not in this formula. For MoE the router's
    load-balancing loss is added with weight config.router_aux_loss_coef (Switch Transformer, Fedus et al. 2022).

    Args:
        model: MiniMindForCausalLM, possibly wrapped (DDP); called with input_ids and, when the batch has them,
            attention_mask (padding) and position_ids (packed documents).
        batch: input_ids and labels (batch, seq) LongTensors, optional attention_mask / position_ids.
    Returns:
        (scalar loss, {}) for a dense model; for MoE (lm_loss + coef * aux_loss, {"lm_loss", "aux_loss"}).
    """
    # labels without logits: the model computes the loss from its hidden states in chunks, never holding the
    # (batch, seq, vocab) logits (chunked_next_token_loss); position t predicts token t + 1
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"), labels=batch["labels"], return_logits=False)
    return with_router_loss(model, out.lm_loss, out.aux_loss, {}, "lm_loss")


def unlikelihood(logprobs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The unlikelihood of the candidate tokens: -sum log(1 - p(c)) over the entries where `candidates` is set.

    The term of Welleck et al. 2020 ("Neural Text Generation with Unlikelihood Training", ICLR, sections 5.1
    and 5.2) that pushes down tokens that should not come next: repeats of the reply's own tokens
    (train_full_sft.py --unlikelihood_alpha) or the tokens of the model's own repeated n-grams
    (train_unlikelihood.py). 1 - p is clamped at 1e-5, as in the paper's code, so a certain token gives no log(0).

    Args:
        logprobs: natural-log probabilities of the candidate tokens, any shape (float32).
        candidates: the same shape, bool or 0/1: which entries count.
    Returns:
        A scalar: the sum over the counted entries (the caller divides by its token count).
    """
    one_minus_p = (1 - logprobs.exp()).clamp(min=1e-5)
    return -(one_minus_p.log() * candidates).sum()


def with_router_loss(model, loss: torch.Tensor, aux_loss: torch.Tensor | None, metrics: dict,
                     name: str) -> tuple[torch.Tensor, dict]:
    """Add a MoE router's load-balancing loss to a stage's loss: loss + router_aux_loss_coef * aux_loss.

    The one place a stage's objective gets the balance term (Switch Transformer, Fedus et al. 2022); without it
    the router would send most tokens to a few experts. The model's forward also adds it to its `loss` when given
    `labels` (Hugging Face's convention, for users of the model outside this loop); the stages take the parts
    they need from the forward (logits, lm_loss, aux_loss) and add the term here.

    Args:
        model: the model, possibly wrapped (DDP), whose config holds router_aux_loss_coef.
        loss: the stage's scalar loss; aux_loss: the forward's `aux_loss` (None for a dense model).
        metrics: the stage's figures; name: the key under which the loss without the balance term is logged.
    Returns:
        (loss, metrics) unchanged for a dense model; for MoE (loss + coef * aux_loss, metrics with `name` and
        "aux_loss" added).
    """
    if aux_loss is None:
        return loss, metrics
    metrics = {**metrics, name: loss.detach(), "aux_loss": aux_loss.detach()}
    return loss + unwrap(model).config.router_aux_loss_coef * aux_loss, metrics


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile, DistributedDataParallel or DeepSpeed wrappers (FSDP shards it in place)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, DistributedDataParallel) or is_deepspeed(model) else model


def keep_freed_memory() -> bool:
    """Make the C allocator keep freed memory for reuse instead of handing it back to the OS (Linux, glibc).

    glibc serves every allocation above its mmap threshold (at most 32 MiB: a batch's logits and activations)
    with fresh pages from the kernel and unmaps them on free, so each CPU training step page-faults all its
    activations back in, zero-filled (120,000-145,000 faults, about 0.5 GB a step at the 26M reference shape).
    Setting M_MMAP_MAX to 0 serves them from the heap and M_TRIM_THRESHOLD to -1 never shrinks it (mallopt(3)):
    freed blocks are reused by the next step. The heap keeps its high-water mark, which holes left between
    differently sized blocks (evaluation batches, tokenization) raise. Measured on CPU: about 10% more tokens/s;
    peak RSS +2% in bench/bench_train.py's steady steps, +26% over a whole quick-path pretraining run with
    evaluation (1.48 -> 1.86 GB, flat after the first evaluation); `--keep_freed_memory 0` leaves glibc as is.

    Returns:
        True when applied; False where the C library is not glibc (macOS, Windows, musl), which is left as is.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


# ----------------------------------------------------------------------------------------------------------------
# Compilation: --compile 0 | 1 | auto

# Seconds the first compiled step takes beyond an eager one, and eager / compiled step time afterwards, per device
# type. CPU: `bench/bench_train.py --modes pretrain --impls ours --dtype bfloat16 --compile 1` with an empty
# TORCHINDUCTOR_CACHE_DIR on a 2-vCPU AMD EPYC (Zen 4), 2026-12-01: first step 35-37 s at the quick and the 26.9M
# reference shapes; 1.35x (quick) and 1.17x (reference) after it; the smaller figure is kept. CUDA: not measured
# here (no GPU was lent), a cautious guess.
COMPILE_COST_S = {"cpu": 35.0, "cuda": 60.0}
COMPILE_SPEEDUP = {"cpu": 1.17, "cuda": 1.3}
AUTO_COMPILE_AFTER_STEPS = 3  # --compile auto times this many eager steps (the first is warm-up) before deciding


def compile_pays(remaining_eager_s: float, device_type: str) -> bool:
    """Whether compiling now saves time: the eager time left times the fraction compilation saves must exceed
    twice its measured start-up cost (the margin covers hosts slower to compile than the one measured)."""
    if device_type not in COMPILE_COST_S:  # mps: torch.compile's support is partial
        return False
    saved = remaining_eager_s * (1 - 1 / COMPILE_SPEEDUP[device_type])
    return saved > 2 * COMPILE_COST_S[device_type]


class Compiler:
    """The module the loop calls: eager, compiled from the start (--compile 1), or compiled once the first steps
    show the run is long enough to earn the compilation back (--compile auto, compile_pays) and its batches all
    have one shape (pretraining's packed blocks; SFT's length-grouped batches would recompile).

    torch.compile (TorchInductor) fuses the elementwise work between the matrix products (RMSNorm, RoPE, SwiGLU,
    the casts of autocast) into generated kernels; it compiles lazily, inside the first step it runs. If that
    step fails to compile (no C++ compiler, an unsupported op), the run warns once and continues eagerly with the
    same micro-batches. The compiled wrapper goes around DDP's, as PyTorch recommends (DDPOptimizer splits graphs
    at the gradient buckets); DeepSpeed's engine is not compiled here (its config has its own compile option).
    """

    def __init__(self, eager: torch.nn.Module, setting, device_type: str, fixed_shapes: bool = True):
        self.eager, self.module, self.device_type, self.fixed_shapes = eager, eager, device_type, fixed_shapes
        self.setting, self.proven, self.step_times = setting, False, []
        if setting == 1 and is_deepspeed(eager):
            raise SystemExit("--compile 1 with --parallel deepspeed: set DeepSpeed's own compile in its config")
        if setting == 1:
            self.module = torch.compile(eager)

    def consider(self, step_seconds: float, remaining_steps: int, remaining_budget_s: float = math.inf) -> None:
        """--compile auto: after AUTO_COMPILE_AFTER_STEPS eager steps, compile if compile_pays for the rest (the
        remaining steps at the fastest timed step's pace, or the time budget left, whichever is shorter)."""
        if self.setting != "auto" or len(self.step_times) >= AUTO_COMPILE_AFTER_STEPS:
            return
        self.step_times.append(step_seconds)
        if len(self.step_times) < AUTO_COMPILE_AFTER_STEPS:
            return
        remaining_s = min(remaining_steps * min(self.step_times[1:]), remaining_budget_s)
        if not self.fixed_shapes:  # measured: SFT batches of new lengths recompiled step after step (3-4 s a step)
            log("--compile auto: eager (batches of varying length would recompile the graph; --compile 1 forces it)")
            return
        if is_deepspeed(self.eager) or not compile_pays(remaining_s, self.device_type):
            log(f"--compile auto: eager (about {remaining_s:.0f} s of eager steps left; compiling costs about "
                f"{COMPILE_COST_S.get(self.device_type, 0):.0f} s on {self.device_type})")
            return
        log(f"--compile auto: compiling (about {remaining_s:.0f} s of eager steps left; compiling costs about "
            f"{COMPILE_COST_S[self.device_type]:.0f} s and then saves "
            f"{1 - 1 / COMPILE_SPEEDUP[self.device_type]:.0%} of each step)")
        self.module = torch.compile(self.eager)

    def run(self, step_fn: Callable, reset: Callable):
        """step_fn(module): the first compiled call falls back to eager (after reset()) if compilation fails."""
        if self.module is self.eager or self.proven:
            return step_fn(self.module)
        try:
            result = step_fn(self.module)
        except Exception as error:  # noqa: BLE001 (any compiler failure; the eager retry re-raises real errors)
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            log(f"warning: torch.compile failed ({type(error).__name__}: {first_line}); continuing eagerly")
            self.module = self.eager
            reset()
            return step_fn(self.eager)
        self.proven = True
        return result


# ----------------------------------------------------------------------------------------------------------------
# The loop


def count_loss_tokens(batch: dict) -> int:
    """Positions of a batch that carry a loss: labels[t + 1] != -100 (next_token_loss's N). Read on the host."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_rows(batch: dict) -> int:
    """Rows of a batch: the unit of losses that average over sequences or pairs (DPO, GRPO)."""
    return len(batch["input_ids"])


def optimizer_step(model, micro_batches: list[dict], loss_fn, optimizer, scaler, autocast, args,
                   count_items: Callable[[dict], int] = count_loss_tokens):
    """One optimizer step over `micro_batches` (this rank's share of the step): accumulate, clip, update.

    The step minimizes the mean over all its items (loss tokens by default; pairs or sequences for losses that
    average over those), whatever the split into micro-batches and ranks. `loss_fn` returns the mean over its
    micro-batch's n_i items; that mean is weighted by n_i / N, N the items of the whole step on every rank (one
    all-reduce of a count before the forward passes), so the summed gradients are those of sum(losses) / N,
    the per-token mean, not the mean of the micro-batches' means (torchtitan's rescaling by the global token
    count; Hugging Face Trainer's `num_items_in_batch`). DDP, FSDP and DeepSpeed average gradients over the
    ranks, so each rank's loss is also multiplied by the world size. Gradients are synchronized across ranks
    only on the last micro-batch's backward. A gradient norm that is NaN or inf (a NaN loss, an overflow) skips
    the update, so the weights stay the last good ones; the norm is the same on every rank (the gradients are
    synchronized), so all ranks agree.

    Args:
        micro_batches: collated batches (on the host; their tensors move to the device here, other values pass
            as they are); count_items(batch) -> items its loss averages over.
    Returns:
        (this rank's sum of n_i * micro-batch loss, {metric: sum of n_i * value}, N (a float tensor: the step's
         items on all ranks), non-padding input tokens, gradient norm before clipping, whether the update was
         applied). The step's loss is the all-ranks sum of the first over N.
    """
    device = torch.device(args.device)
    world_size = rank_and_world_size()[1]
    counts = [count_items(batch) for batch in micro_batches]
    total = torch.tensor(float(sum(counts)), device=device)  # N: the step's items on all ranks
    if world_size > 1:
        dist.all_reduce(total)
    loss_sum, metric_sums = torch.zeros((), device=device), {}
    tokens = sum(count_tokens(batch) for batch in micro_batches)
    for i, batch in enumerate(micro_batches):
        batch = batch_to_device(batch, device, non_blocking=True)  # tensors; other fields as they are
        weight = counts[i] * world_size / total  # n_i / N, times the world size the gradient average divides by
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):
            with autocast:
                loss, metrics = loss_fn(model, batch)
            if is_deepspeed(model):  # the engine scales float16 losses itself
                model.backward(loss * weight, scale_wrt_gas=False)
            else:
                scaler.scale(loss * weight).backward()
        loss_sum += loss.detach().float() * counts[i]
        for key, value in metrics.items():
            value = torch.as_tensor(value, device=device).detach().float() * counts[i]
            metric_sums[key] = metric_sums.get(key, 0.0) + value
    if is_deepspeed(model):
        grad_norm, applied = deepspeed_update(model, loss_sum)
        return loss_sum, metric_sums, total, tokens, grad_norm, applied
    scaler.unscale_(optimizer)  # clip the true gradients, not the float16-scaled ones
    max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    # float16: the scaler skips overflowed steps and lowers its scale, as designed; otherwise a non-finite norm
    # is a diverged run (one host sync per step, as the loss check already costs)
    applied = scaler.is_enabled() or bool(torch.isfinite(grad_norm))
    if applied:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, metric_sums, total, tokens, grad_norm, applied


def deepspeed_update(engine, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """optimizer_step's ending for a DeepSpeed engine: its `step()` reduces, clips (--grad_clip) and updates.

    A non-finite loss on any rank skips the update, as in optimizer_step (the engine computes the gradient norm
    only inside `step()`, too late to keep a NaN out of the weights).
    Returns:
        (gradient norm before clipping, NaN when skipped; whether the update was applied)
    """
    finite = torch.isfinite(loss).float()
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        return torch.tensor(math.nan), False
    engine.step()
    return torch.tensor(engine.get_global_grad_norm() or 0.0), True


def plan_steps(args, num_samples: int, lengths: list[int] | None, rank: int, world_size: int,
               updates_per_batch: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps of the run): --epochs of them, capped at --max_steps; each
    step's micro-batches serve at most `updates_per_batch` steps (train's `reuse`)."""
    batches_per_epoch = len(epoch_batches(num_samples, args.batch_size, args.seed, 0, lengths, rank, world_size))
    steps_per_epoch = math.ceil(batches_per_epoch / args.accumulation_steps) * updates_per_batch
    return steps_per_epoch, min(args.epochs * steps_per_epoch, args.max_steps or math.inf)


def held_out_batches(args, eval_dataset, rank: int, world_size: int) -> list[list[int]]:
    """This rank's share of --eval_batches held-out batches: a fixed random sample, so evals at different steps
    are comparable.

    Raises:
        SystemExit: when the held-out data makes fewer batches than there are processes.
    """
    batches = epoch_batches(len(eval_dataset), args.batch_size, args.seed, 0,
                            getattr(eval_dataset, "lengths", None))[:args.eval_batches]
    # every rank evaluates as many batches (FSDP's forward is collective), so the count is cut to a multiple
    batches = batches[:len(batches) - len(batches) % world_size][rank::world_size]
    if not batches:
        raise SystemExit(f"{args.eval_data_path}: fewer held-out batches of --batch_size {args.batch_size} "
                         f"than the {world_size} processes; lower --batch_size or use more held-out data")
    return batches


def wrap_model(raw_model: torch.nn.Module, args, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(the model the step calls, its optimizer) for `raw_model`, the unwrapped model on its device.

    --gradient_checkpointing is switched on, the model is spread over the processes (parallelize: DDP wraps it,
    FSDP shards it in place), AdamW is built over this rank's parameters, and for --parallel deepspeed both go
    into DeepSpeed's engine. Under plain `python` the model the step calls is raw_model itself.
    """
    if args.gradient_checkpointing:
        raw_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = parallelize(raw_model, args.parallel, device)
    optimizer = build_optimizer(raw_model, args)  # after sharding: FSDP's optimizer holds only this rank's shards
    if args.parallel == "deepspeed":
        model, optimizer = deepspeed_engine(raw_model, optimizer, args)
    return model, optimizer


def resume_if_asked(args, raw_model, optimizer, scaler, state: dict, resume_dir: Path, name: str) -> bool:
    """--from_resume 1: load the newest resume state into raw_model, optimizer, scaler and `state`; True when
    one was there (a first run with --from_resume 1 starts at step 0, unless states of another shape exist)."""
    if not args.from_resume:
        return False
    restored = restore_checkpoint(resume_dir, raw_model, optimizer, scaler, state["run"])
    if restored is None:
        refuse_other_shapes(args.checkpoint_dir, args.save_weight, name)
        log(f"--from_resume 1: no resume state in {resume_dir} yet, starting at step 0")
        return False
    state.update(restored)
    return True


def progress_bar(state: dict, total_steps: int, budget_s: float | None, rank: int) -> tqdm:
    """Rank 0's bar: in steps, or under --time_budget in seconds (so its ETA is the time left of the budget)."""
    if budget_s:
        return tqdm(total=round(budget_s), initial=min(round(state["elapsed_s"]), round(budget_s)),
                    disable=rank != 0, unit="s", dynamic_ncols=True)
    return tqdm(total=total_steps, initial=state["step"], disable=rank != 0, unit="step", dynamic_ncols=True)


def learning_rate(args, step: int, elapsed_s: float, budget_s: float | None, total_steps: int) -> float:
    """The rate of optimizer step `step`: cosine_lr over the steps, or time_budget_lr over the budget spent."""
    if budget_s:
        return time_budget_lr(step, elapsed_s, budget_s, args.learning_rate, args.warmup_steps, args.min_lr_ratio)
    return cosine_lr(step, args.learning_rate, args.warmup_steps, total_steps, args.min_lr_ratio)


def step_totals(args, step: int, loss_sum: torch.Tensor, metric_sums: dict, items: torch.Tensor, tokens: int,
                stop: bool, device: torch.device) -> tuple[float, dict, float, bool]:
    """The step's figures over all ranks, in one all-reduce: its loss and metrics (optimizer_step's item-weighted
    sums over N, the step's items on all ranks), its non-padding input tokens, and whether a rank must stop.

    Raises:
        SystemExit: when no position of the step's batches carries a loss.
    """
    totals = torch.stack([loss_sum, *metric_sums.values(), torch.tensor(float(tokens), device=device),
                          torch.tensor(float(stop), device=device)])
    if rank_and_world_size()[1] > 1:
        dist.all_reduce(totals)
    *sums, step_tokens, stops = totals.tolist()
    if not float(items):
        raise SystemExit(f"step {step}: no position of this step's batches carries a loss (are all replies beyond "
                         f"--max_seq_len {args.max_seq_len}?); check the data")
    metrics = {key: value / float(items) for key, value in zip(metric_sums, sums[1:])}
    return sums[0] / float(items), metrics, step_tokens, stops > 0


def log_step(metrics_log: MetricsLog, bar: tqdm, state: dict, loss: float, metrics: dict, lr: float,
             grad_norm: float, tokens_per_s: float) -> None:
    """The step's figures on the progress bar and in metrics.jsonl (and wandb)."""
    bar.set_postfix(step=state["step"], loss=f"{loss:.4f}", lr=f"{lr:.2e}", grad_norm=f"{grad_norm:.2f}",
                    tok_s=f"{tokens_per_s:,.0f}")
    metrics_log.write({"step": state["step"], "epoch": state["epoch"], "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tokens_per_s, "tokens_seen": state["tokens_seen"],
                       "elapsed_s": state["elapsed_s"], **metrics})


def evaluate_and_save_if_due(args, step: int, total_steps: int, stopped: bool, evaluate_held_out: Callable | None,
                             save: Callable, metrics_log: MetricsLog, summary: dict) -> None:
    """Evaluate every --eval_interval steps and at the last one (when there is held-out data); save every
    --save_interval steps, at the last one, and when a signal stops the run (every rank takes part in both)."""
    if evaluate_held_out is not None and (step % args.eval_interval == 0 or step == total_steps):
        result = evaluate_held_out()
        summary["eval_loss"], summary["eval"] = result["eval_loss"], result
        log(f"step {step}: " + ", ".join(f"{key.removeprefix('eval_')} {value:.4f}" for key, value in result.items()))
        metrics_log.write({"step": step, **result})
    if step % args.save_interval == 0 or step == total_steps or stopped:
        save(total_steps=total_steps)


def stop_on_divergence(args, save: Callable, state: dict, resume_dir: Path, loss: float, grad_norm: float,
                       total_steps: int, applied: bool = False) -> None:
    """End the run with advice when a step's gradient norm or loss is not finite.

    A non-finite gradient norm skipped the update, so the model is still the last good one: it is saved first
    (`save`, the weights dir marked unfinished). A non-finite loss with a finite gradient (`applied`: e.g. a batch
    without a single labelled position) has changed the weights already, so nothing is saved: the newest resume
    state is the one to continue from.
    Raises:
        SystemExit: always, naming the step, the loss and the gradient norm.
    """
    step = state["step"] + 1
    if applied:
        raise SystemExit(
            f"step {step}: the loss is {loss} (gradient norm {grad_norm}), so nothing after step {state['step']} "
            f"is saved; the newest state in {resume_dir} is the one to continue from. Usual causes: a batch without "
            f"a labelled position (samples cut short by --max_seq_len {args.max_seq_len}?), a learning rate too high "
            f"(--learning_rate {args.learning_rate}) or float16 overflow; fix it and continue with --from_resume 1")
    save(total_steps=total_steps)
    raise SystemExit(
        f"step {step}: the loss is {loss} and the gradient norm {grad_norm}; the update was not applied and the "
        f"last good state (step {state['step']}) is saved in {resume_dir}. Usual causes: a learning rate too high "
        f"(--learning_rate {args.learning_rate}), float16 overflow (try --dtype bfloat16 or float32), or a bad "
        "batch; fix it and continue with --from_resume 1")


def train(args, model, tokenizer, train_dataset, loss_fn, eval_dataset=None, eval_perplexity: bool = True,
          save_weights_fn: Callable = save_weights, count_items: Callable[[dict], int] = count_loss_tokens,
          reuse=None) -> dict:
    """Train `model` by minimizing `loss_fn` over `train_dataset`; log, evaluate, save, and resume with --from_resume.

    Reads as nanoGPT's train.py: the setup (device, the step plan, the model wrapped for the processes, the
    optimizer, resume), then one iteration per optimizer step: its learning rate, optimizer_step, the step's
    figures over all ranks (step_totals), log_step, evaluate_and_save_if_due. The network has two names, as in
    nanoGPT: `model` is what the step calls (under torchrun wrapped in DDP, sharded by FSDP or inside DeepSpeed's
    engine; compiled when --compile says so), `raw_model` the module that evaluates, saves and restores (the model
    itself; under DeepSpeed its engine, which gathers ZeRO-3's shards).

    Args:
        model: the unwrapped model (float32 master weights); moved to --device and wrapped for the processes here.
        train_dataset, eval_dataset: datasets with `collate(items) -> dict of batched tensors` (other values, such
            as lists, pass to loss_fn as they are) and optionally `lengths` (token count per sample, used to batch
            samples of similar length together).
        loss_fn: function(model, batch) -> (scalar loss tensor, {metric name: scalar}); `batch` is the collated dict
            with its tensors on the device. Metrics are averaged like the loss and logged; an `lm_loss` metric feeds
            the perplexity.
        count_items: function(batch) -> the number of items loss_fn's mean runs over: loss tokens
            (count_loss_tokens, the default), or rows (count_rows) for losses that average over pairs or sequences.
            A step's loss is the mean over all its items (optimizer_step).
        eval_perplexity: report exp(eval loss) as perplexity when loss_fn has no `lm_loss` metric (False for
            losses that are not a cross-entropy, such as DPO's).
        save_weights_fn: function(model, tokenizer, directory) writing the weights directory atomically;
            LoRA passes one that writes only the adapter.
        reuse: None (each step reads new micro-batches), or an object that lets the micro-batches of one step
            serve several: the RL stages' trainer/rollouts.py RolloutBuffer, whose loss_fn makes a rollout of its
            prompts on the first of those steps and learns from it again on the others. `reuse.max_updates` is
            the most steps they serve (the plan counts that many); `reuse.again(metrics)`, called after each step
            with its figures (means over all ranks, so every rank agrees), says whether the next step runs on the
            same micro-batches. When fewer steps are taken (an early stop), the last epoch's data ends the run
            before the planned step count. A resume starts on fresh micro-batches (the saved position is past
            the ones in use).
    Returns:
        {"step": final optimizer step, "loss": last logged loss, "eval_loss": last eval loss or None,
         "eval": the last eval's figures or None, "weights_dir": where the weights were saved,
         "stopped": True when a signal ended the run before its last step (saved; the weights dir is marked
         unfinished), "signal": the number of that signal (SIGINT, SIGTERM) or None; run_main exits with 128 + it}
    """
    # Setup: device, the plan of steps, the model wrapped for the processes and its optimizer
    rank, world_size = rank_and_world_size()
    device = torch.device(args.device)
    if device.type == "cpu" and args.keep_freed_memory:
        keep_freed_memory()
    raw_model = model.to(device)
    name = checkpoint_name(args.save_weight, raw_model.config.hidden_size, raw_model.config.use_moe)
    weights_dir, resume_dir = Path(args.save_dir) / name, Path(args.checkpoint_dir) / f"{name}_resume"
    autocast = nullcontext() if args.dtype == "float32" else torch.autocast(device.type, getattr(torch, args.dtype))
    lengths = getattr(train_dataset, "lengths", None)
    steps_per_epoch, total_steps = plan_steps(args, len(train_dataset), lengths, rank, world_size,
                                              reuse.max_updates if reuse is not None else 1)
    eval_batches = held_out_batches(args, eval_dataset, rank, world_size) if eval_dataset is not None else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")  # float16 needs loss scaling
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens_seen": 0, "elapsed_s": 0.0, "wandb_id": None,
             "run": run_settings(args, raw_model.config)}  # what a resume must match (check_same_run)
    if args.parallel == "fsdp" and save_weights_fn is not save_weights:
        raise SystemExit("--parallel fsdp saves whole models only; train adapters with --parallel ddp")
    model, optimizer = wrap_model(raw_model, args, device)
    lr_ratios = [group.get("lr_ratio", 1.0) for group in optimizer.param_groups]  # as built (a resume overwrites)
    if is_deepspeed(model):
        raw_model = model  # ZeRO-3 shards the weights over the ranks: the engine gathers them to evaluate and save
    fixed_shapes = lengths is None or len(set(lengths)) == 1  # packed pretraining blocks; not SFT's batches
    compiler = Compiler(model, args.compile, device.type, fixed_shapes)  # the step calls `model`, or it compiled
    # the two things the loop does besides stepping, bound to this run's model, optimizer and directories
    save = partial(save_checkpoint, raw_model, tokenizer, optimizer, scaler, state, weights_dir, resume_dir,
                   save_weights_fn, args.keep_last)  # the weights dir and a resume state (every rank)
    evaluate_held_out = None if eval_dataset is None else partial(
        evaluate, raw_model, eval_dataset, eval_batches, loss_fn, device, autocast, eval_perplexity, count_items)

    # from here on a signal stops the run after its step (saved), and no other run may write these checkpoints
    with stop_on_signal() as signals, run_lock(resume_dir):
        resumed = resume_if_asked(args, raw_model, optimizer, scaler, state, resume_dir, name)
        metrics_log = MetricsLog(Path(args.save_dir) / "runs" / name / "metrics.jsonl", args,
                                 state["step"] if resumed else None, state["wandb_id"])
        state["wandb_id"] = metrics_log.wandb_id
        log(f"dtype: {args.dtype_reason}")
        if not resumed:  # the header: what this machine chose, and why
            metrics_log.write({"step": 0, "dtype": args.dtype, "dtype_reason": args.dtype_reason})
        budget_ends_it = args.time_budget and total_steps == BUDGET_EPOCHS * steps_per_epoch
        count, until = ("", f" until --time_budget {args.time_budget:g} min is spent") if budget_ends_it else (
            f"{total_steps} ", "")
        log(f"{name}: {len(train_dataset)} samples, {steps_per_epoch} steps per epoch, {count}steps of "
            f"{args.batch_size * args.accumulation_steps * world_size} samples{until} (effective batch = --batch_size "
            f"{args.batch_size} x --accumulation_steps {args.accumulation_steps} x {world_size} process(es)"
            f"{', ' + args.parallel if world_size > 1 else ''}), {device}, {args.dtype}")
        step, summary = state["step"], {"loss": None, "eval_loss": None, "eval": None, "stopped": False}
        clock = time.time() - state["elapsed_s"]  # elapsed_s continues across resumes (and so does the budget)
        budget_s = 60 * args.time_budget if args.time_budget else None
        bar = progress_bar(state, total_steps, budget_s, rank)
        log_tokens, log_time = 0, time.time()
        reusing = False  # the next step runs again on the micro-batches in hand (reuse.again)

        # The loop: one iteration per optimizer step
        for epoch in range(state["epoch"], args.epochs):
            batches = epoch_batches(len(train_dataset), args.batch_size, args.seed, epoch, lengths, rank, world_size)
            position = state["batch_in_epoch"] if epoch == state["epoch"] else 0
            data = iter(DataLoader(train_dataset, batch_sampler=batches[position:], collate_fn=train_dataset.collate,
                                   num_workers=args.num_workers, pin_memory=device.type == "cuda"))
            while (position < len(batches) or reusing) and step < total_steps and not summary["stopped"]:
                lr = learning_rate(args, step, time.time() - clock, budget_s, total_steps)
                for group, ratio in zip(optimizer.param_groups, lr_ratios):
                    group["lr"] = lr * ratio
                if not reusing:
                    micro_batches = [next(data) for _ in range(min(args.accumulation_steps, len(batches) - position))]
                    position += len(micro_batches)
                step_start = time.perf_counter()
                loss_sum, metric_sums, items, tokens, grad_norm, applied = compiler.run(
                    lambda model: optimizer_step(model, micro_batches, loss_fn, optimizer, scaler, autocast, args,
                                                 count_items),
                    reset=lambda: optimizer.zero_grad(set_to_none=True))
                if not applied:
                    stop_on_divergence(args, save, state, resume_dir, float(loss_sum / items), float(grad_norm),
                                       total_steps)
                step += 1
                compiler.consider(time.perf_counter() - step_start, total_steps - step,
                                  budget_s - (time.time() - clock) if budget_s else math.inf)
                loss, metrics, step_tokens, summary["stopped"] = step_totals(
                    args, step, loss_sum, metric_sums, items, tokens, signals["stop"], device)
                reusing = reuse is not None and reuse.again(metrics)
                if reuse is not None and not reusing and position == len(batches) and epoch == args.epochs - 1:
                    total_steps = step  # the data is used up before the planned count (early stops): the last step
                if not math.isfinite(loss):  # a NaN loss whose gradient is finite (no labelled position)
                    stop_on_divergence(args, save, state, resume_dir, loss, float(grad_norm), total_steps,
                                       applied=True)
                log_tokens += step_tokens
                state.update(step=step, epoch=epoch, batch_in_epoch=position, elapsed_s=time.time() - clock,
                             tokens_seen=state["tokens_seen"] + int(step_tokens))
                if budget_s and time.time() - clock >= budget_s:
                    total_steps = step  # the budget is spent: this step is the last (eval, save, done)
                bar.update(min(round(state["elapsed_s"]), bar.total) - bar.n if budget_s else 1)

                if step % args.log_interval == 0 or step == total_steps:
                    tokens_per_s, log_tokens, log_time = log_tokens / (time.time() - log_time), 0, time.time()
                    summary["loss"] = loss
                    log_step(metrics_log, bar, state, loss, metrics, lr, float(grad_norm), tokens_per_s)
                pause = time.time()  # eval and saving do not count against tokens/s
                evaluate_and_save_if_due(args, step, total_steps, summary["stopped"], evaluate_held_out, save,
                                         metrics_log, summary)
                log_time += time.time() - pause
            if step >= total_steps or summary["stopped"]:
                break
    bar.close()
    metrics_log.close()
    summary["stopped"] = summary["stopped"] and step < total_steps  # a signal in the last step: the run is done
    stop_signal = int(signals["signal"] or signal.SIGTERM) if summary["stopped"] else None  # other ranks: SIGTERM
    if summary["stopped"]:
        log(f"stopped at step {step} of {total_steps} by {signal.Signals(stop_signal).name}; saved to {resume_dir} "
            f"(the weights in {weights_dir} are marked unfinished); continue with --from_resume 1")
    else:
        log(f"done: step {step}, weights in {weights_dir}")
    return {"step": step, **summary, "signal": stop_signal, "weights_dir": str(weights_dir)}
