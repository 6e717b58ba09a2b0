"""LoRA fine-tuning: teach a chat model something new by training small low-rank adapters, base weights frozen.

The data and the objective are SFT's (conversations, cross-entropy on the assistant's tokens only); what
changes is which weights learn. Every targeted linear layer W gets an update (alpha / r) * B A of rank r
(Hu et al. 2021, eq. 3; model/model_lora.py): only A and B are in the optimizer, a few percent of the model.
The saved adapter is a few hundred kB, and several of them can share one base model.

Defaults: dataset/data/lora_identity.jsonl (91 "who are you?" conversations in English and Chinese: the
model learns to answer as MiniMind), starting from out/full_sft_<hidden_size>, adapters of rank 8 with
alpha 16 on every attention and MLP projection, 20 epochs at peak learning rate 2e-3 (adapters start at zero
and have few parameters, so LoRA takes a higher rate than full fine-tuning), no weight decay.

    python trainer/train_lora.py                                            # after train_full_sft.py
    python trainer/train_lora.py --lora_rank 16 --target_modules q_proj,v_proj --data_path my_domain.jsonl
    python trainer/train_lora.py --merge 1      # also write base + adapter merged into one ordinary model
    python scripts/chat.py --model_path out/lora_identity_256 --prompt "Who are you?"

Writes out/<save_weight>_<hidden_size>/ as a PEFT adapter directory (adapter_config.json,
adapter_model.safetensors, tokenizer files) that `peft.PeftModel.from_pretrained(base, dir)` also opens,
and with --merge 1 out/<save_weight>_merged_<hidden_size>/ (a full checkpoint, no LoRA needed to load it).
"""

from pathlib import Path

from dataset.lm_dataset import SFTDataset
from model.model_lora import DEFAULT_TARGET_MODULES, apply_lora, merge_lora, save_lora
from trainer.checkpoint import checkpoint_name, save_weights, write_dir_atomically
from trainer.distributed import log, rank_and_world_size
from trainer.trainer_utils import (REPO_ROOT, causal_lm_loss, fraction, load_model, log_parameter_counts,
                                   parse_args, positive_float, positive_int, run_main, setup_run, train)


def add_flags(parser):
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_rank", type=positive_int, default=8, help="r: inner dimension of each adapter")
    lora.add_argument("--lora_alpha", type=positive_float, default=16.0,
                      help="the update is scaled by lora_alpha / lora_rank")
    lora.add_argument("--lora_dropout", type=fraction, default=0.0, help="dropout on the adapters' input")
    lora.add_argument("--target_modules", default=",".join(DEFAULT_TARGET_MODULES),
                      help="comma-separated names of the linear layers that get adapters")
    lora.add_argument("--merge", type=int, choices=(0, 1), default=0,
                      help="1: after training also save base + adapter merged as <save_weight>_merged_<hidden_size>")


def save_adapter(model, tokenizer, directory: Path) -> None:
    """The weights writer for the shared loop: the adapter and the tokenizer, atomically (no base weights)."""

    def write(tmp: Path) -> None:
        save_lora(model, tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomically(directory, write)


def main(argv: list[str] | None = None) -> dict:
    # 1. Flags: the shared ones with this stage's defaults, plus the LoRA settings
    args = parse_args("lora_identity", __doc__, add_flags, argv=argv, defaults={
        "data_path": str(REPO_ROOT / "dataset" / "data" / "lora_identity.jsonl"),
        "from_weight": "full_sft",
        "learning_rate": 2e-3,
        "weight_decay": 0.0,
        "epochs": 20,
    })
    setup_run(args)  # device, dtype, torchrun's process group, seeds
    model, tokenizer = load_model(args)

    # 2. Adapters: freeze the base, wrap the targeted layers; only the adapters reach the optimizer
    target_modules = tuple(name.strip() for name in args.target_modules.split(",") if name.strip())
    try:
        wrapped = apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, target_modules)
    except ValueError as error:
        raise SystemExit(f"--target_modules / --lora_rank: {error}") from None
    log(f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha} on {len(wrapped)} layers ({', '.join(target_modules)})")
    log_parameter_counts(model)

    # 3. Dataset and loss: SFT's (assistant tokens only)
    train_dataset = SFTDataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
    eval_dataset = (SFTDataset(args.eval_data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
                    if args.eval_data_path else None)

    # 4. The shared loop, saving the adapter instead of the whole model
    result = train(args, model, tokenizer, train_dataset, causal_lm_loss, eval_dataset=eval_dataset,
                   save_weights_fn=save_adapter)

    if args.merge and not result["stopped"] and rank_and_world_size()[0] == 0:
        merged_dir = Path(args.save_dir) / checkpoint_name(f"{args.save_weight}_merged", model.config.hidden_size,
                                                           model.config.use_moe)
        save_weights(merge_lora(model), tokenizer, merged_dir)
        log(f"merged model in {merged_dir}")
        result["merged_dir"] = str(merged_dir)
    return result


if __name__ == "__main__":
    run_main(main)
