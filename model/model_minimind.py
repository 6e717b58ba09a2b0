"""MiniMind: a small GPT-style decoder-only language model, dense or Mixture-of-Experts, in one file.

Read top to bottom: config -> RMSNorm -> rotary embeddings (RoPE, optional YaRN) -> attention masks ->
grouped-query attention -> SwiGLU MLP -> MoE feed-forward -> decoder block -> model -> causal-LM head.

The architecture and every parameter name follow Qwen3 / Qwen3-MoE (Hugging Face `modeling_qwen3.py`,
`modeling_qwen3_moe.py`), so a checkpoint opens in stock `transformers`, vLLM and llama.cpp by changing
`config.json` only. `tests/test_model.py` checks that the logits equal `Qwen3ForCausalLM`'s for the same weights.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

IGNORE_INDEX = -100  # label value that carries no loss (padding, prompt tokens)


class MiniMindConfig(PretrainedConfig):
    """Hyperparameters of a MiniMind model; one config for the dense and the MoE variant.

    Defaults are the MiniMind family: hidden_size 768, 8 layers, 8 query heads sharing 4 key/value heads,
    a 6400-token vocabulary, tied input/output embeddings. `use_moe=True` replaces every feed-forward by
    `num_experts` SwiGLU experts of which `num_experts_per_tok` run per token.

    Args:
        intermediate_size: width of the SwiGLU hidden layer; default 8/3 * hidden_size rounded up to a
            multiple of 64 (the LLaMA rule that keeps the MLP's parameter count near a 4x GELU MLP).
        head_dim: width of one attention head; default hidden_size // num_attention_heads.
        rope_theta: RoPE base wavelength (Su et al. 2021); 1e6 as in Qwen3.
        rope_scaling: None, or YaRN context extension (Peng et al. 2023), e.g.
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}.
        rope_parameters: the form transformers 5 saves both in: {"rope_type", "rope_theta", ...yarn keys}.
            When given (as when loading a config.json) it wins over rope_theta and rope_scaling.
        router_aux_loss_coef: weight of the load-balancing loss added to the LM loss (Switch Transformer).
        norm_topk_prob: renormalize the selected experts' router probabilities to sum to 1.
    """

    model_type = "minimind"

    def __init__(
        self,
        vocab_size: int = 6400,
        hidden_size: int = 768,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 4,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1e6,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        use_moe: bool = False,
        num_experts: int = 4,
        num_experts_per_tok: int = 1,
        moe_intermediate_size: int | None = None,
        norm_topk_prob: bool = True,
        router_aux_loss_coef: float = 0.01,
        tie_word_embeddings: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        **kwargs,
    ):
        if hidden_size % num_attention_heads != 0 and head_dim is None:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
        if num_attention_heads % num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads {num_attention_heads} must be a multiple of num_key_value_heads {num_key_value_heads}"
            )
        if use_moe and not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok {num_experts_per_tok} must be between 1 and num_experts {num_experts}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or 64 * math.ceil(hidden_size * 8 / 3 / 64)
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        if rope_parameters is None:
            rope_parameters = {**(rope_scaling or {"rope_type": "default"}), "rope_theta": rope_theta}
            rope_parameters["rope_type"] = rope_parameters.pop("type", rope_parameters.get("rope_type"))
        self.rope_parameters = rope_parameters
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_moe = use_moe
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size or self.intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.router_aux_loss_coef = router_aux_loss_coef
        super().__init__(  # also fills rope_parameters' defaults (transformers' standardize_rope_params)
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight.

    Computed in float32 whatever the input dtype, as in Qwen3. Input (..., dim) -> output (..., dim).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_inverse_frequencies(config: MiniMindConfig) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies of RoPE, optionally stretched by YaRN.

    RoPE (Su et al. 2021, eq. 15) rotates the i-th pair of a head's channels by angle position * theta^(-2i/d).
    YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension", eqs. 17-20) divides the slow
    (long-wavelength) frequencies by `factor`, keeps the fast ones, blends the band between with a linear ramp,
    and scales attention by 0.1 * ln(factor) + 1. Matches transformers' `_compute_yarn_parameters`.

    Returns:
        inv_freq: (head_dim // 2,) float32, radians per position.
        attention_scaling: multiplier applied to cos and sin (1.0 without YaRN).
    Raises:
        ValueError: for a rope_type other than "default" and "yarn".
    """
    dim = config.head_dim
    scaling = config.rope_parameters
    base = scaling["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope_type {rope_type!r} is not supported; use 'default' or 'yarn'")

    factor = scaling["factor"]
    original_max = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def channel_of(num_rotations):  # the channel pair that turns `num_rotations` times over the original context
        return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(channel_of(beta_fast)), 0)
    high = min(math.ceil(channel_of(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: fast channel, keep its frequency (extrapolate); 0: slow channel, interpolate
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    attention_scaling = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, attention_scaling


class RotaryEmbedding(nn.Module):
    """Turns position ids into the cos and sin tables RoPE multiplies queries and keys by.

    forward(position_ids (batch, seq)) -> cos, sin, each (batch, seq, head_dim), in float32.
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)  # (batch, seq, head_dim/2)
        angles = torch.cat((angles, angles), dim=-1)  # (batch, seq, head_dim): pairs are (i, i + head_dim/2)
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: a 90-degree turn of each channel pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, seq, head_dim) by the angles of cos/sin (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------------------
# Attention


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    query_length: int,
    past_length: int,
    device: torch.device,
) -> torch.Tensor | None:
    """The boolean mask of which keys each query may attend to, or None when plain causal masking suffices.

    Three rules are combined: causal (a query at absolute position p sees keys 0..p), padding (keys whose
    `attention_mask` is 0 are hidden), and packed documents (when `position_ids` restart at 0 inside a row
    with no cache, a token only sees earlier tokens of its own document: the block-diagonal mask used for
    packed pretraining, as in transformers' flattening collator; Krell et al. 2021, "Efficient Sequence Packing
    without Cross-contamination"). Every query may also see itself, so rows of left padding never become all -inf
    (their outputs are ignored anyway). For a query at position q and a key at position k:

        mask[q, k] = (k <= q) and attention_mask[k] = 1 and doc(k) = doc(q),   or k = q
        doc(t) = the number of position_ids equal to 0 at or before t (the document t belongs to)

    Args:
        attention_mask: (batch, past_length + query_length) with 1 for real tokens and 0 for padding, or None.
        position_ids: (batch, query_length) positions of the new tokens, or None when they are consecutive
            (nothing packed: no host-side check, which also keeps torch.compile's graph whole in pretraining).
        device: where the mask is made (the hidden states').
    Returns:
        None (use `is_causal`: no padding, no packing, and either no cache or one new token), or a bool tensor
        (batch or 1, 1, query_length, past_length + query_length), True where the query may attend.
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    packed = (position_ids is not None and past_length == 0 and query_length > 1
              and bool((position_ids[:, 1:] == 0).any()))
    # several new queries after a cache (a prompt prefilled in chunks): SDPA's is_causal would align the
    # triangle to the top-left corner, letting query 0 see only key 0, so the offset triangle is built here
    chunked = past_length > 0 and query_length > 1
    if not padded and not packed and not chunked:
        return None
    key_length = past_length + query_length
    query_index = torch.arange(past_length, key_length, device=device)[:, None]  # (q, 1)
    key_index = torch.arange(key_length, device=device)[None, :]  # (1, k)
    mask = (key_index <= query_index)[None, None]  # (1, 1, q, k)
    if padded:
        mask = mask & attention_mask[:, None, None, :key_length].bool()
    if packed:
        document = (position_ids == 0).cumsum(-1)  # (batch, q): document number of each token
        mask = mask & (document[:, None, :, None] == document[:, None, None, :])
    return mask | (key_index == query_index)[None, None]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                    is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention written out: softmax(Q K^T / sqrt(d) + M) V (Vaswani et al. 2017, eq. 1).

    M is 0 where a query may attend and -inf elsewhere, so those keys get weight exactly 0. This is what
    `F.scaled_dot_product_attention` computes (tests/test_inference.py: equal in float32 within 1e-5). Written
    this way it holds the whole (batch, num_heads, q_len, kv_len) score matrix, and the softmax of it, in
    memory: quadratic in the sequence length. Flash attention (Dao et al. 2022) gives the same output without
    ever holding it: it walks the keys block by block, keeping per query a running maximum and a running sum
    of exp(score - maximum) (the online softmax, Milakov & Gimelshein 2018) and rescaling the partial output
    when the maximum grows, so only one block of scores exists at a time (scripts/xray/attention_memory.py
    measures both). Selected with `attn_implementation="eager"`, transformers' name for it.

    Args:
        q: (batch, num_heads, q_len, head_dim).
        k, v: (batch, num_kv_heads, kv_len, head_dim); query head h reads key/value head
            h // (num_heads // num_kv_heads) (grouped-query attention).
        mask: bool, broadcastable to (batch, 1, q_len, kv_len), True where the query may attend; or None.
        is_causal: with no mask, query i sees keys 0..i (q_len == kv_len), SDPA's `is_causal`.
        dropout_p: probability of zeroing an attention weight (training only; the survivors are scaled by
            1 / (1 - p)). The same distribution as SDPA's dropout, not the same random draws.
    Returns:
        (batch, num_heads, q_len, head_dim) in the dtype of q; the softmax runs in float32, as in Qwen3's eager path.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (batch, num_heads, kv_len, head_dim)
    v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (batch, num_heads, q_len, kv_len)
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()  # key <= query
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # each row sums to 1 over the keys
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    return weights @ v  # (batch, num_heads, q_len, head_dim)


class Attention(nn.Module):
    """Grouped-query self-attention (Ainslie et al. 2023) with q/k RMSNorm (as in Qwen3) and RoPE.

    `num_attention_heads` query heads share `num_key_value_heads` key/value heads, which shrinks the KV cache.
    The product itself runs in `F.scaled_dot_product_attention` (flash / memory-efficient kernels where the
    device has them), or, with `attn_implementation="eager"` in the config (or `from_pretrained(...,
    attn_implementation="eager")`), in `eager_attention`, the same formula written out. Input and output
    (batch, seq, hidden_size). `cache` is a transformers `Cache` or `model.inference.KVCache`: anything with
    `update(k, v, layer_idx) -> (all keys, all values)`.
    """

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.dropout = config.attention_dropout
        self.config = config  # read at each call: config._attn_implementation, "sdpa" (default) or "eager"
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: Cache | None = None):
        batch, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (batch, heads, seq, head_dim)
        if cache is not None:  # append this step's keys/values; get back all of them
            k, v = cache.update(k, v, self.layer_idx)
        is_causal = mask is None and seq > 1 and k.shape[2] == seq  # one new token sees every cached key anyway
        dropout_p = self.dropout if self.training else 0.0
        if self.config._attn_implementation == "eager":  # the formula written out, for reading and checking
            out = eager_attention(q, k, v, mask, is_causal, dropout_p)
            return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
        # Each group of num_heads / num_kv_heads query heads shares one key/value head. SDPA reads the shared heads in
        # place (enable_gqa) where its kernel can: always on CPU; on CUDA/MPS only the flash kernel takes grouped
        # heads, and it needs float16/bfloat16 and no mask (transformers' use_gqa_in_sdpa checks the mask). Elsewhere
        # the heads are repeated, which keeps SDPA off its slow math kernel. In place, the KV cache is not copied every
        # decode step and training skips two copies per layer (measured on CPU: bench/bench_train.py,
        # bench/bench_generate.py).
        grouped = x.device.type == "cpu" or (mask is None and q.dtype in (torch.float16, torch.bfloat16))
        if not grouped:
            groups = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(groups, dim=1)  # (batch, num_heads, kv_len, head_dim)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            enable_gqa=grouped,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


# ----------------------------------------------------------------------------------------------------------------
# Feed-forward: dense SwiGLU and Mixture of Experts


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)). (..., hidden) -> (..., hidden)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Sparse Mixture-of-Experts feed-forward with a softmax top-k router (Shazeer et al. 2017; Qwen3-MoE).

    Each token's router probabilities p = softmax(gate(x)) pick its `num_experts_per_tok` best experts; the
    output is the sum of those experts' outputs weighted by their (renormalized) probabilities. Experts are
    separate `MLP`s, so on disk they are `mlp.experts.E.gate_proj.weight`, exactly as Qwen3-MoE stores them.

    forward(x (batch, seq, hidden)) -> (output (batch, seq, hidden), router_logits (batch * seq, num_experts)).
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )

    def forward(self, x):
        batch, seq, hidden = x.shape
        tokens = x.reshape(-1, hidden)  # (n_tokens, hidden)
        router_logits = self.gate(tokens)  # (n_tokens, num_experts)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (n_tokens, top_k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(chosen == e)  # the tokens routed to expert e, and in which top-k slot
            if token_idx.numel() == 0:
                continue
            out.index_add_(0, token_idx, expert(tokens[token_idx]) * weights[token_idx, slot, None])
        return out.view(batch, seq, hidden), router_logits


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Auxiliary load-balancing loss of the router (Switch Transformer, Fedus et al. 2022, eqs. 4-6).

    loss = num_experts * sum_e f_e * P_e, where f_e is the fraction of routing slots sent to expert e and P_e
    the mean router probability of e, both over all layers and all real (non-padding) tokens. It is minimal
    (= top_k) when routing is uniform. Matches transformers' `load_balancing_loss_func` (Qwen3-MoE).

    Args:
        router_logits: one (batch * seq, num_experts) tensor per MoE layer.
        attention_mask: (batch, seq), 1 for tokens that count; None counts every token.
    Returns:
        A scalar float32 tensor.
    """
    logits = torch.cat(router_logits, dim=0).float()  # (layers * batch * seq, num_experts)
    probs = F.softmax(logits, dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices  # (rows, top_k)
    slots = F.one_hot(chosen, num_experts).sum(dim=1).float()  # (rows, num_experts): 1 where chosen
    if attention_mask is None:
        weight = torch.ones(logits.shape[0], 1, device=logits.device)
    else:
        weight = attention_mask.reshape(-1, 1).float().repeat(len(router_logits), 1).to(logits.device)
    tokens_per_expert = (slots * weight).sum(0) / weight.sum()  # f_e (times top_k)
    prob_per_expert = (probs * weight).sum(0) / weight.sum()  # P_e
    return num_experts * (tokens_per_expert * prob_per_expert).sum()


# ----------------------------------------------------------------------------------------------------------------
# The network


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        out = self.mlp(self.post_attention_layernorm(x))
        if isinstance(out, tuple):  # MoE also returns its router logits
            out, router_logits = out
            return x + out, router_logits
        return x + out, None


class MiniMindPreTrainedModel(PreTrainedModel):
    """Hooks MiniMind into transformers: config class, weight init (normal(0, 0.02), norms at 1), save/load."""

    config_class = MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True  # model.activation_checkpointing_enable(): see MiniMindModel.forward

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):  # a computed buffer, not in checkpoints: refill it after loading
            init.copy_(module.inv_freq, rope_inverse_frequencies(module.config)[0])


class MiniMindModel(MiniMindPreTrainedModel):
    """Token embeddings -> decoder layers -> final norm. Output hidden states (batch, seq, hidden_size)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False  # set by activation_checkpointing_enable() (transformers)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        past_length = cache.get_seq_length() if cache is not None else 0
        mask = build_attention_mask(attention_mask, position_ids, x.shape[1], past_length, x.device)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + x.shape[1], device=x.device).expand(x.shape[0], -1)
        cos, sin = self.rotary_emb(position_ids)
        router_logits = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # activation checkpointing (Chen et al. 2016): keep only each layer's input for backward and
                # recompute the layer there, trading one more forward for the memory of its activations
                x, layer_router_logits = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, mask, cache)
            else:
                x, layer_router_logits = layer(x, cos, sin, mask, cache)
            if layer_router_logits is not None:
                router_logits.append(layer_router_logits)
        return self.norm(x), tuple(router_logits)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t + 1]; labels of -100 carry no loss.

        loss = -1/N * sum_{t: labels[t+1] != -100} log softmax(logits[t])[labels[t+1]]

    The labels are shifted left (the last position gets -100) rather than the logits cut, so the (batch, seq,
    vocab) logits, the largest activation of a small-vocabulary model, are not copied in forward and backward
    (as transformers' ForCausalLMLoss does). Computed in float32 whatever the logits' dtype.

    Args:
        logits: (batch, seq, vocab).
        labels: (batch, seq) token ids, -100 where there is no loss.
    Returns:
        A scalar tensor (NaN when no label counts, as F.cross_entropy gives).
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (batch, seq): targets[t] = labels[t + 1]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


LOSS_CHUNK_TOKENS = 1024  # positions per chunk of chunked_next_token_loss: a (1024, vocab) float32 block at a time


class ChunkedNextTokenLoss(torch.autograd.Function):
    """next_token_loss of `hidden @ weight.T` computed `chunk` positions at a time, never holding all the logits.

    The output head and the cross-entropy are the largest activation of a small-vocabulary model: at batch 16,
    seq 256, vocab 6400 the float32 logits, their log-softmax and its gradient are 105 MB each. Here each chunk's
    logits are made, turned into its loss and, when a gradient is wanted, straight into its gradients, then
    freed (the fused linear cross-entropy of Liger Kernel, Hsu et al. 2024; Cut Cross-Entropy, Wijmans et al.
    2024). With z = h W^T and p = softmax(z), d(-log p[y]) / dz = p - onehot(y), so

        dL/dh = (p - onehot(y)) W / N,    dL/dW = (p - onehot(y))^T h / N     (N: positions with a label)

    Forward therefore computes the gradients too (only when autograd will ask for them) and backward only
    scales them by the incoming gradient.

    forward(hidden (N_all, hidden_size), weight (vocab, hidden_size), targets (N_all,) with IGNORE_INDEX where
    no loss, compute_dtype, chunk, need_grad) -> the scalar float32 mean loss (NaN when no target counts).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, chunk, need_grad):
        h_all, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        count = (targets != IGNORE_INDEX).sum()
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, target = h_all[start:start + chunk], targets[start:start + chunk]  # (c, hidden), (c,)
            logits = (h @ w.T).float()  # (c, vocab)
            counted = target != IGNORE_INDEX
            index = target.clamp(min=0)[:, None]  # ignored rows read class 0, then count nothing
            log_norm = logits.logsumexp(dim=-1)  # (c,)
            loss_sum += ((log_norm - logits.gather(1, index).squeeze(1)) * counted).sum()
            if need_grad:
                grad_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax p, in place of the logits
                grad_logits.scatter_add_(1, index, torch.full_like(logits[:, :1], -1.0))
                grad_logits = (grad_logits * counted[:, None]).to(compute_dtype)  # (c, vocab)
                grad_hidden[start:start + chunk] = grad_logits @ w
                grad_weight += (grad_logits.T @ h).float()
        if need_grad:
            ctx.save_for_backward(grad_hidden / count, (grad_weight / count).to(weight.dtype))
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


def chunked_next_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            chunk: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """next_token_loss(hidden @ weight.T, labels), computed in chunks of positions (ChunkedNextTokenLoss).

    The head's product runs in the autocast dtype when autocast is on (as `lm_head` would), the softmax in float32.
    Equal to next_token_loss of the full logits up to float rounding (tests/test_model.py).

    Args:
        hidden: (batch, seq, hidden_size), the final norm's output.
        weight: (vocab, hidden_size), the output head's weight.
        labels: (batch, seq) token ids, -100 where there is no loss; shifted here as in next_token_loss.
    Returns:
        A scalar float32 tensor.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # targets[t] = labels[t + 1]
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else hidden.dtype)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):  # the dtypes are chosen above, explicitly
        return ChunkedNextTokenLoss.apply(hidden.flatten(0, 1), weight, targets, compute_dtype, chunk, need_grad)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token: position t scores labels[t + 1]; 0 where that label is -100.

        logprobs[b, t] = log softmax(logits[b, t])[labels[b, t + 1]]   (the last position scores nothing: 0)

    The per-token form of next_token_loss, shifted the same way: next_token_loss(logits, labels) equals
    -token_logprobs(logits, labels).sum() / (labels[:, 1:] != -100).sum(). Stages that weigh tokens their own way
    (DPO sums a reply's, GRPO weighs each by its advantage, evaluation sums a document's) start from it.

    Args:
        logits: (batch, seq, vocab).
        labels: (batch, seq) token ids, -100 where nothing is scored.
    Returns:
        (batch, seq) float32 natural-log probabilities, whatever the logits' dtype.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (batch, seq): targets[t] = labels[t + 1]
    # the cross-entropy of a token is -log p(token), and 0 where its label is ignored
    token_nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="none")
    return -token_nll.view(targets.shape)


@dataclass
class CausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE causal-LM output (loss, aux_loss, logits, cache) plus lm_loss: the next-token loss
    alone, before the router's load-balancing term is added (the same as loss for a dense model)."""

    lm_loss: torch.FloatTensor | None = None


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    """MiniMind with a language-model head (tied to the input embeddings): next-token logits and loss.

    forward(input_ids (batch, seq), attention_mask (batch, past + seq) or None, position_ids (batch, seq) or
    None, cache (a transformers `Cache`) or None, labels (batch, seq) or None) -> CausalLMOutput with
    logits (batch, seq, vocab), lm_loss (mean next-token cross-entropy over labels != -100, shifted here as in
    Hugging Face), loss (lm_loss, plus router_aux_loss_coef * aux_loss for MoE, Hugging Face's convention),
    aux_loss (MoE only) and the updated cache.
    With labels and return_logits=False (what training asks for) the loss is computed in chunks from the hidden
    states and logits is None: the full (batch, seq, vocab) logits are never held (chunked_next_token_loss).
    Works with `model.generate(...)` (greedy, sampling, streamers) through `GenerationMixin`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        **kwargs,
    ) -> CausalLMOutput:
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden, router_logits = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)

        loss = lm_loss = aux_loss = logits = None
        if return_logits:
            logits = self.lm_head(hidden[:, -logits_to_keep:])  # logits_to_keep=0 keeps every position
        if labels is not None and return_logits:
            loss = lm_loss = next_token_loss(logits, labels)
        elif labels is not None:  # training: the loss without the full logits (chunked_next_token_loss)
            loss = lm_loss = chunked_next_token_loss(hidden, self.lm_head.weight, labels)
        if router_logits and cache is None:  # balance is a training objective; skip it while generating
            aux_loss = load_balancing_loss(
                router_logits, self.config.num_experts, self.config.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return CausalLMOutput(
            loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, logits=logits, cache=cache if use_cache else None
        )


# Let the Auto classes open a MiniMind directory (AutoConfig, AutoModelForCausalLM, and AutoTokenizer, which reads
# config.json to learn the model type), as they open any transformers model.
AutoConfig.register(MiniMindConfig.model_type, MiniMindConfig)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM)
