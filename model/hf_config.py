"""MiniMind's config as a stock transformers Qwen3 / Qwen3-MoE config, and back.

MiniMind's architecture and parameter names are Qwen3's (model/model_minimind.py), so the configs share their
fields under the same names and map field by field. Used by the export (scripts/convert_model.py to_hf, from_hf)
and by the benchmarks that compare with transformers' Qwen3 (bench/bench_train.py, bench/bench_generate.py).
"""

from transformers import PretrainedConfig, Qwen3Config, Qwen3MoeConfig

from model.model_minimind import MiniMindConfig

SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters",
                 "max_position_embeddings", "attention_dropout", "initializer_range", "tie_word_embeddings",
                 "pad_token_id", "bos_token_id", "eos_token_id", "dtype")
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef")


def fields_of(config: PretrainedConfig, names: tuple[str, ...]) -> dict:
    """{name: config.name} for `names`; rope_parameters copied, not shared."""
    fields = {name: getattr(config, name) for name in names}
    fields["rope_parameters"] = dict(fields["rope_parameters"])
    return fields


def qwen3_config_of(config: MiniMindConfig) -> PretrainedConfig:
    """The stock transformers Qwen3 (dense) or Qwen3-MoE config with the same shapes as a MiniMind config."""
    if not config.use_moe:
        return Qwen3Config(**fields_of(config, SHARED_FIELDS), architectures=["Qwen3ForCausalLM"])
    return Qwen3MoeConfig(**fields_of(config, SHARED_FIELDS + MOE_FIELDS), architectures=["Qwen3MoeForCausalLM"])


def minimind_config_of(config: PretrainedConfig) -> MiniMindConfig:
    """The MiniMind config of a stock Qwen3 / Qwen3-MoE config (the inverse of qwen3_config_of).

    The MoE fields of a dense model, which it does not use, take MiniMind's defaults.
    Raises:
        ValueError: another model type, or a Qwen3 option MiniMind does not implement (attention biases,
            sliding-window attention, dense layers between MoE layers).
    """
    if config.model_type not in ("qwen3", "qwen3_moe"):
        raise ValueError(f"model_type {config.model_type!r}; expected a Qwen3 ('qwen3') or Qwen3-MoE ('qwen3_moe') "
                         "config")
    unsupported = [option for option, used in (
        ("attention_bias", getattr(config, "attention_bias", False)),
        ("use_sliding_window", getattr(config, "use_sliding_window", False)),
        ("mlp_only_layers", getattr(config, "mlp_only_layers", None)),
        ("decoder_sparse_step != 1", getattr(config, "decoder_sparse_step", 1) != 1)) if used]
    if unsupported:
        raise ValueError(f"Qwen3 options MiniMind does not implement: {', '.join(unsupported)}")
    use_moe = config.model_type == "qwen3_moe"
    return MiniMindConfig(**fields_of(config, SHARED_FIELDS + (MOE_FIELDS if use_moe else ())), use_moe=use_moe)
