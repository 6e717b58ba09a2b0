r"""Copy a MiniMind checkpoint so that stock transformers opens it as Qwen3ForCausalLM (Qwen3MoeForCausalLM for MoE).

    python eval/lm_eval/export_qwen3.py --model_path out/full_sft_256 --output_dir out/full_sft_256_qwen3
    lm_eval --model hf --model_args pretrained=out/full_sft_256_qwen3,dtype=float32 \
        --include_path eval/lm_eval --tasks arc_easy_local --device cpu

MiniMind's parameter names and architecture are Qwen3's (see model/model_minimind.py), so the weights, tokenizer
and generation config are copied byte for byte and only config.json is rewritten, as a Qwen3 config with the same
shapes. The copy then needs nothing of this repository: `lm_eval --model hf`, vLLM or any transformers tool opens
it, which is the way to score a MiniMind model with the same harness and settings as a published one. After
writing, the script checks that the copy's logits equal MiniMind's on a random sequence (float32 on CPU).
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, Qwen3Config, Qwen3MoeConfig

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
LOGIT_TOLERANCE = 1e-4  # max |logit difference| accepted in float32: rounding, not a different computation
CHECK_TOKENS = 32  # length of the random sequence the logits are compared on


def qwen3_config_of(config: MiniMindConfig) -> PretrainedConfig:
    """The stock transformers Qwen3 (dense) or Qwen3-MoE config with the same shapes as a MiniMind config."""
    shared = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        rms_norm_eps=config.rms_norm_eps, rope_parameters=dict(config.rope_parameters),
        max_position_embeddings=config.max_position_embeddings, attention_dropout=config.attention_dropout,
        initializer_range=config.initializer_range, tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        dtype=config.dtype,
    )
    if not config.use_moe:
        return Qwen3Config(**shared, architectures=["Qwen3ForCausalLM"])
    return Qwen3MoeConfig(
        **shared, architectures=["Qwen3MoeForCausalLM"], num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok, moe_intermediate_size=config.moe_intermediate_size,
        norm_topk_prob=config.norm_topk_prob, router_aux_loss_coef=config.router_aux_loss_coef,
    )


def export_qwen3(model_path: str | Path, output_dir: str | Path) -> Path:
    """Write a Qwen3 copy of the checkpoint directory `model_path` to `output_dir` (created; files overwritten).

    Every file but config.json is copied as it is; config.json becomes `qwen3_config_of` the checkpoint's config.
    Returns:
        the output directory
    Raises:
        SystemExit: when model_path is not a weights directory (no config.json, e.g. a LoRA adapter: merge it
            first) or output_dir is model_path itself.
    """
    source, target = Path(model_path), Path(output_dir)
    if not (source / "config.json").is_file():
        raise SystemExit(f"error: --model_path {source}: no config.json there; pass a weights directory "
                         "(a LoRA adapter must be merged into its base model first)")
    if target.resolve() == source.resolve():
        raise SystemExit(f"error: --output_dir {target} is the checkpoint itself; choose a new directory")
    config = MiniMindConfig.from_pretrained(source)
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.name != "config.json":
            shutil.copy2(file, target / file.name)
    qwen3_config_of(config).save_pretrained(target)
    return target


@torch.no_grad()
def max_logit_difference(model_path: str | Path, exported_dir: str | Path, seed: int = 0) -> float:
    """Largest |logit| difference between MiniMind on `model_path` and transformers' Auto model on `exported_dir`.

    Both run in float32 on CPU over one random sequence of CHECK_TOKENS token ids; the MoE variant is compared
    through `from_pretrained`, which fuses the per-expert weights as transformers 5 does.
    """
    ours = MiniMindForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(exported_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, ours.config.vocab_size, (1, CHECK_TOKENS), generator=generator)
    return (ours(input_ids).logits - theirs(input_ids).logits).abs().max().item()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(REPO_ROOT / "out" / "full_sft_256"),
                        help="MiniMind checkpoint directory written by a training stage (default: %(default)s)")
    parser.add_argument("--output_dir", default=None,
                        help="where the Qwen3 copy goes (default: <model_path>_qwen3)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    output_dir = args.output_dir or args.model_path.rstrip("/") + "_qwen3"
    export_qwen3(args.model_path, output_dir)
    difference = max_logit_difference(args.model_path, output_dir)
    if difference > LOGIT_TOLERANCE:
        sys.exit(f"error: the copy in {output_dir} computes different logits (max |difference| {difference:.2e} "
                 f"> {LOGIT_TOLERANCE:.0e}); do not use it")
    architecture = AutoConfig.from_pretrained(output_dir).architectures[0]
    print(f"wrote {output_dir}: opens as transformers' {architecture}, logits equal MiniMind's "
          f"(max |difference| {difference:.2e})")


if __name__ == "__main__":
    main()
