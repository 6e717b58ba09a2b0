"""Inference written out: a KV cache and the decoding loop (prefill the prompt, then one token at a time).

    ids = torch.tensor([prompt_ids])                                  # (batch, prompt_len)
    for token in generate_tokens(model, ids, max_new_tokens=64, temperature=0.8, top_p=0.9, stop_token_ids=[2]):
        print(tokenizer.decode(token), end="")                         # token: (batch,), as it comes

Why a cache. A decoder predicts token t+1 from tokens 0..t. Its attention is causal, so the keys and values of
tokens 0..t-1 do not change when token t arrives: computed once and kept (the KV cache), each new token costs a
forward over one position plus one row of attention against the cache, instead of a forward over the whole
sequence (scripts/xray/kv_cache.py measures both against sequence length). The price is memory,
2 * layers * batch * num_key_value_heads * length * head_dim numbers, which grouped-query attention divides by
num_attention_heads / num_key_value_heads.

The loop gives, token for token, what transformers' `model.generate` gives with the same settings
(tests/test_inference.py: greedy and seeded sampling, repetition penalty, top-k, top-p, dense and MoE, left-padded
batches), because it does the same arithmetic in the same order:
  - prefill with position ids cumsum(attention_mask) - 1 (0 on padding), then position + 1 per new token;
  - logits of the last position only (`logits_to_keep=1`), cast to float32;
  - the logits processors of `generate` in its order: repetition penalty (prompt included, padding not), then,
    when sampling, temperature, top-k, top-p;
  - greedy: argmax; sampling: one `torch.multinomial(softmax(scores), 1)` call on the whole (batch, vocab) matrix
    per step, so a seeded generator is consumed exactly as `generate` consumes it;
  - a row that has produced a stop token gets `pad_token_id` from then on; the loop ends when every row has
    stopped, or after max_new_tokens.
What it does not take: the checkpoint's generation_config.json (generate reads fields such as suppress_tokens
or a default top_k=50 from it; here every setting is an argument, and top_k=0 means off), beam search, stop
strings (scripts/generation.py's ReplyStream cuts those from the text).
"""

from typing import Iterator

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for the positions seen so far, in two tensors allocated once.

    keys, values: (num_hidden_layers, batch, num_key_value_heads, max_length, head_dim); the first `length`
    positions are filled. The model calls `update` in each attention layer and `get_seq_length` once per forward
    (transformers' `Cache` interface, which MiniMind's forward takes), so the same model runs on this cache, on
    transformers' DynamicCache (what `generate` uses) or on none. Its size, keys and values:

        2 * num_hidden_layers * batch_size * num_key_value_heads * max_length * head_dim numbers

    Args:
        config: a MiniMindConfig (num_hidden_layers, num_key_value_heads, head_dim).
        batch_size, max_length: rows, and positions (prompt + new tokens) the cache can hold.
        dtype, device: those of the model's activations.
    """

    def __init__(self, config, batch_size: int, max_length: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions already in the cache: where the next forward's tokens go."""
        return self.length

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys and values k, v (batch, num_key_value_heads, new, head_dim) of layer
        `layer_idx` after the cached ones; return all of them, (batch, num_key_value_heads, length + new, head_dim)
        views into the cache (no copy). The length grows once the last layer has written.

        Raises:
            ValueError: when the new positions do not fit in max_length.
        """
        start, end = self.length, self.length + k.shape[2]
        if end > self.keys.shape[3]:
            raise ValueError(f"KVCache holds {self.keys.shape[3]} positions; {end} were asked for")
        self.keys[layer_idx, :, :, start:end] = k
        self.values[layer_idx, :, :, start:end] = v
        if layer_idx == self.keys.shape[0] - 1:
            self.length = end
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the whole prompt through the model once, filling `cache`; return the next-token logits.

    Args:
        input_ids, attention_mask: (batch, prompt_len), left-padded (0 in the mask on padding).
    Returns:
        (batch, vocab) float32 logits of the last position.
    """
    # each row counts from its first real token, as generate does (RoPE sees only differences of positions, so
    # this changes the rounding, not the math)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                   logits_to_keep=1)
    return output.logits[:, -1].float()


def decode_step(model, tokens: torch.Tensor, attention_mask: torch.Tensor, position: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
    """Run one new token per row through the model against the cache, appending its keys and values.

    Args:
        tokens: (batch,) the tokens just chosen.
        attention_mask: (batch, cache length + 1), the prompt's mask followed by ones.
        position: (batch,) their positions (one more than the row's previous token).
    Returns:
        (batch, vocab) float32 logits for the token after them.
    """
    output = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position[:, None],
                   cache=cache, logits_to_keep=1)
    return output.logits[:, -1].float()


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, eq. 2 with a sign rule): the logit of every token already in
    the row is divided by `penalty` when positive and multiplied by it when negative, so it always gets less
    likely (penalty > 1). logits (batch, vocab), seen (batch, vocab) bool -> (batch, vocab)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def keep_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k sampling (Fan et al. 2018): -inf for every token scored below the k-th best of its row (ties with
    the k-th are kept). scores (batch, vocab) -> (batch, vocab)."""
    kth_best = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]  # (batch, 1)
    return scores.masked_fill(scores < kth_best, float("-inf"))


def keep_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019, eq. 2): keep the smallest set of most probable tokens whose
    probability adds up to at least top_p; -inf for the rest. Sorted from least to most probable, the tail to
    drop is every token whose cumulative probability is still <= 1 - top_p; the most probable token always
    stays. scores (batch, vocab) -> (batch, vocab)."""
    ascending, order = scores.sort(dim=-1)  # (batch, vocab), least probable first
    tail = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    tail[:, -1] = False
    drop = tail.scatter(1, order, tail)  # back from sorted order to vocabulary order
    return scores.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, seen: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, repetition_penalty: float = 1.0) -> torch.Tensor:
    """Choose each row's next token from its logits, in the order `generate` applies its logits processors.

    scores = repetition penalty (when != 1) of the logits; temperature 0: the argmax (greedy decoding; top_k and
    top_p do not apply). Otherwise scores / temperature (Ackley et al. 1985, the Boltzmann distribution), then top-k
    (when top_k > 0), then top-p (when top_p < 1), and one draw from softmax(scores) with `torch.multinomial`,
    which uses torch's default generator (seed it with torch.manual_seed for reproducible samples).

    Args:
        logits: (batch, vocab) float32.
        seen: (batch, vocab) bool, True for the tokens already in each row (for the repetition penalty).
    Returns:
        (batch,) int64 token ids.
    """
    scores = logits
    if repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, seen, repetition_penalty)
    if temperature == 0:
        return scores.argmax(dim=-1)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        scores = keep_top_k(scores, top_k)
    if top_p < 1.0:
        scores = keep_top_p(scores, top_p)
    return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def check_settings(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   repetition_penalty: float) -> None:
    """Raise ValueError naming the first setting of generate_tokens out of its range."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1: off), got {repetition_penalty}")


@torch.no_grad()
def generate_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0, stop_token_ids: tuple[int, ...] | list[int] = (),
                    pad_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """Generate up to max_new_tokens tokens after each row of input_ids, yielding each step's tokens as they come.

    Prefill once, then per step: choose the next tokens (sample_next_token), yield them, feed them back
    (decode_step). A row stops after its first token in `stop_token_ids` (that token is yielded); from then on
    it yields pad_token_id. The loop ends when every row has stopped or max_new_tokens steps have run.
    Equal to `model.generate(input_ids, attention_mask=..., do_sample=temperature > 0, temperature=..., top_k=...,
    top_p=..., repetition_penalty=..., eos_token_id=stop_token_ids, pad_token_id=..., max_new_tokens=...)[:, T:]`
    token for token (see the module docstring for why, and for what generate does that this does not).

    Args:
        model: a MiniMindForCausalLM (anything whose forward takes input_ids, attention_mask, position_ids,
            cache, logits_to_keep and returns .logits); its mode (train/eval) is left as it is, as generate does.
        input_ids: (batch, prompt_len) int64.
        attention_mask: (batch, prompt_len), 1 for real tokens, 0 for left padding; None: all ones.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k: keep the k most probable tokens (0: off). top_p: nucleus mass (1.0: off).
        repetition_penalty: CTRL's penalty on tokens already in the row, prompt included (1.0: off).
        pad_token_id: what a stopped row yields (default: the model config's pad_token_id).
    Yields:
        (batch,) int64 tensors, one per step.
    Raises:
        ValueError: a setting out of range (check_settings), or an attention_mask that is not left padding.
    """
    check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if max_new_tokens == 0:
        return
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask.diff(dim=-1) < 0).any()):
        raise ValueError("attention_mask must be left padding (zeros, then ones, in every row)")
    pad_token_id = model.config.pad_token_id if pad_token_id is None else pad_token_id
    batch, prompt_len = input_ids.shape
    vocab_size = model.config.vocab_size
    # the tokens each row has used so far, for the repetition penalty; padding is not part of the text
    seen = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    seen = seen.scatter(1, input_ids.masked_fill(attention_mask == 0, vocab_size), True)[:, :vocab_size]
    stop_ids = torch.tensor(list(stop_token_ids), dtype=torch.long, device=input_ids.device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    position = attention_mask.sum(-1) - 1  # (batch,) position of each row's last token
    cache = KVCache(model.config, batch, prompt_len + max_new_tokens, model.dtype, input_ids.device)

    logits = prefill(model, input_ids, attention_mask, cache)
    for step in range(max_new_tokens):
        tokens = sample_next_token(logits, seen, temperature, top_k, top_p, repetition_penalty)
        tokens = tokens.masked_fill(stopped, pad_token_id)
        yield tokens
        seen[torch.arange(batch), tokens] = True
        stopped |= torch.isin(tokens, stop_ids)
        if bool(stopped.all()) or step == max_new_tokens - 1:
            return
        attention_mask = F.pad(attention_mask, (0, 1), value=1)
        position = position + 1
        logits = decode_step(model, tokens, attention_mask, position, cache)
