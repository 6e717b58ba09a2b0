"""model/inference.py (the KV cache and decoding loop written out) and eager_attention (attention written out),
checked against transformers' `generate`, its logits processors, F.scaled_dot_product_attention and a forward
without cache; scripts/chat.py decodes with the loop; the two scripts/xray measurements run."""

import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from conftest import tiny_model
from model.inference import (KVCache, apply_repetition_penalty, decode_step, generate_tokens, keep_top_k, keep_top_p,
                             prefill)
from model.loading import load_checkpoint
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, build_attention_mask, eager_attention
from scripts import chat
from scripts.generation import ReplyStream, prompt_ids
from scripts.xray import attention_memory, kv_cache
from serving_helpers import random_checkpoint

STOP = [2, 0]  # <|im_end|>, <|endoftext|>: what the chat front ends stop on
ATTENTION_TOLERANCE = 1e-5  # float32, written-out attention against SDPA: the same sums in another order
# float32 logits (of size about 10), cached against uncached: the same sums blocked differently (one query row
# against a cache, or all rows at once); observed up to 1.1e-5
CACHE_TOLERANCE = 1e-4


def varied_model(use_moe: bool = False) -> MiniMindForCausalLM:
    """tiny_model with its matrices drawn at std 0.3, so greedy replies vary (at 0.02 it repeats one token)."""
    model = tiny_model(use_moe=use_moe).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    return model


def reference_tokens(model, input_ids, attention_mask, max_new_tokens, stop, temperature=0.0, top_k=0, top_p=1.0,
                     repetition_penalty=1.0):
    """transformers' generate with the same settings: the new tokens, (batch, steps)."""
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p} if temperature else {
        "do_sample": False}
    output = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            repetition_penalty=repetition_penalty, eos_token_id=stop, pad_token_id=0, **sampling)
    return output[:, input_ids.shape[1]:]


def written_out_tokens(model, input_ids, attention_mask, max_new_tokens, stop, **settings):
    steps = generate_tokens(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, stop_token_ids=stop,
                            pad_token_id=0, **settings)
    return torch.stack(list(steps), dim=1)


def left_padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with 0: input_ids and attention_mask (batch, max length)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = torch.randint(3, 6400, (length,), generator=generator)
        attention_mask[row, width - length:] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------------------------
# Attention written out equals SDPA

def sdpa(q, k, v, mask, is_causal):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)


@pytest.mark.parametrize("case", ["causal", "padding", "packed documents", "one token after a cache",
                                  "chunk after a cache"])
def test_eager_attention_equals_sdpa(case):
    torch.manual_seed(0)
    batch, heads, kv_heads, head_dim = 2, 4, 2, 16
    past, new = {"causal": (0, 9), "padding": (0, 9), "packed documents": (0, 9), "one token after a cache": (8, 1),
                 "chunk after a cache": (6, 3)}[case]
    attention_mask = torch.ones(batch, past + new, dtype=torch.long)
    position_ids = None
    if case == "padding":
        attention_mask[0, :4] = 0  # row 0 is left-padded
    if case == "packed documents":
        position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    mask = build_attention_mask(attention_mask, position_ids, new, past, torch.device("cpu"))
    assert (mask is None) == (case in ("causal", "one token after a cache"))
    is_causal = mask is None and new > 1
    q = torch.randn(batch, heads, new, head_dim)
    k, v = torch.randn(batch, kv_heads, past + new, head_dim), torch.randn(batch, kv_heads, past + new, head_dim)
    written_out, reference = eager_attention(q, k, v, mask, is_causal), sdpa(q, k, v, mask, is_causal)
    assert (written_out - reference).abs().max() < ATTENTION_TOLERANCE
    assert (written_out - sdpa(q, k, v, None, False)).abs().max() > 1e-2 or case == "one token after a cache"


def test_eager_attention_by_hand():
    # one query, two keys: weights softmax([1, 0] / sqrt(2)), the output their mix of the values
    q, k = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    weight = torch.tensor(1 / 2 ** 0.5).exp() / (torch.tensor(1 / 2 ** 0.5).exp() + 1)
    expected = weight * v[0, 0, 0] + (1 - weight) * v[0, 0, 1]
    assert torch.allclose(eager_attention(q, k, v)[0, 0, 0], expected, atol=1e-6)
    assert torch.equal(eager_attention(q, k, v, torch.tensor([[[[True, False]]]]))[0, 0, 0], v[0, 0, 0])


@pytest.mark.parametrize("use_moe", [False, True])
def test_model_with_eager_attention_gives_the_sdpa_logits(use_moe):
    sdpa_model = varied_model(use_moe)
    eager_model = MiniMindForCausalLM(MiniMindConfig(**{**sdpa_model.config.to_dict(), "attn_implementation": "eager"}))
    eager_model.load_state_dict(sdpa_model.state_dict())
    eager_model.eval()
    assert eager_model.config._attn_implementation == "eager" and sdpa_model.config._attn_implementation == "sdpa"
    input_ids, attention_mask = left_padded_batch([5, 9, 7])
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 3)
    with torch.no_grad():
        for kwargs in [{}, {"attention_mask": attention_mask}, {"position_ids": packed}]:
            difference = eager_model(input_ids, **kwargs).logits - sdpa_model(input_ids, **kwargs).logits
            assert difference.abs().max() < ATTENTION_TOLERANCE * 10  # through two layers and the head
    assert torch.equal(written_out_tokens(eager_model, input_ids, attention_mask, 12, STOP),
                       written_out_tokens(sdpa_model, input_ids, attention_mask, 12, STOP))


# ----------------------------------------------------------------------------------------------------------------
# The KV cache: cached logits equal a forward over the whole text

@pytest.mark.parametrize("use_moe", [False, True])
def test_cached_logits_equal_uncached_logits_at_every_step(use_moe):
    model = varied_model(use_moe)
    input_ids, attention_mask = left_padded_batch([4, 8])
    cache = KVCache(model.config, 2, 8 + 10)
    position = attention_mask.sum(-1) - 1
    with torch.no_grad():
        logits = prefill(model, input_ids, attention_mask, cache)
        for _ in range(10):
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            uncached = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1]
            assert (logits - uncached).abs().max() < CACHE_TOLERANCE
            tokens = logits.argmax(-1)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=1)
            attention_mask = F.pad(attention_mask, (0, 1), value=1)
            position = position + 1
            logits = decode_step(model, tokens, attention_mask, position, cache)
    assert cache.get_seq_length() == 8 + 10  # the prompt and the 10 tokens fed back


def test_prompt_prefilled_in_two_chunks_gives_the_logits_of_one_forward():
    model = varied_model()
    input_ids = torch.randint(3, 6400, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, 1, 12)
    with torch.no_grad():
        model(input_ids[:, :7], cache=cache)
        second_chunk = model(input_ids[:, 7:], cache=cache).logits  # 5 queries after 7 cached keys
        whole = model(input_ids).logits[:, 7:]
    assert (second_chunk - whole).abs().max() < CACHE_TOLERANCE


def test_kv_cache_holds_max_length_positions_and_refuses_more():
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cache = KVCache(config, batch_size=3, max_length=5)
    assert cache.keys.shape == (2, 3, 2, 5, 16)  # (layers, batch, kv heads, positions, head_dim)
    k = torch.randn(3, 2, 4, 16)
    for layer in range(2):
        keys, values = cache.update(k, k + 1, layer)
    assert torch.equal(keys, k) and torch.equal(values, k + 1) and cache.get_seq_length() == 4
    with pytest.raises(ValueError, match="holds 5 positions; 6"):
        cache.update(torch.randn(3, 2, 2, 16), torch.randn(3, 2, 2, 16), 0)


# ----------------------------------------------------------------------------------------------------------------
# Sampling: the logits processors, and the whole loop against generate

def test_processors_equal_transformers_logits_processors():
    torch.manual_seed(0)
    logits = torch.randn(3, 100) * 3
    input_ids = torch.randint(0, 100, (3, 7))
    seen = torch.zeros(3, 100, dtype=torch.bool).scatter(1, input_ids, True)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.3),
                       RepetitionPenaltyLogitsProcessor(1.3)(input_ids, logits.clone()))
    assert torch.equal(keep_top_k(logits, 10), TopKLogitsWarper(10)(input_ids, logits))
    for top_p in (0.3, 0.9):
        assert torch.equal(keep_top_p(logits, top_p), TopPLogitsWarper(top_p)(input_ids, logits))


def test_top_p_and_penalty_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = keep_top_p(logits, 0.75).isfinite()  # 0.5 alone is short of 0.75; 0.5 + 0.3 reaches it
    assert kept.tolist() == [[True, True, False, False]]
    assert keep_top_k(logits, 3).isfinite().tolist() == [[True, True, True, False]]
    penalized = apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[True, True, False]]), 2.0)
    assert penalized.tolist() == [[1.0, -4.0, 1.0]]  # positive divided, negative multiplied, unseen unchanged


SETTINGS = {
    "greedy": {},
    "greedy, repetition penalty": {"repetition_penalty": 1.3},
    "sampling": {"temperature": 0.9},
    "sampling, top-k": {"temperature": 0.7, "top_k": 20},
    "sampling, top-p": {"temperature": 1.0, "top_p": 0.8},
    "sampling, all": {"temperature": 0.8, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.2},
}


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("name", SETTINGS)
def test_decoding_equals_generate_token_for_token(name, use_moe):
    model = varied_model(use_moe)
    # a prompt after which both models' greedy replies meet a token already seen, so the penalty shows
    input_ids = torch.randint(3, 6400, (1, 10), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    torch.manual_seed(5)
    mine = written_out_tokens(model, input_ids, attention_mask, 32, STOP, **SETTINGS[name])
    torch.manual_seed(5)
    reference = reference_tokens(model, input_ids, attention_mask, 32, STOP, **SETTINGS[name])
    assert torch.equal(mine, reference)
    greedy = reference_tokens(model, input_ids, attention_mask, 32, STOP)
    assert len(set(mine[0].tolist())) > 8  # a varied reply, so the comparison means something
    if "temperature" in SETTINGS[name] or "repetition_penalty" in SETTINGS[name]:
        assert not torch.equal(mine, greedy)  # the setting changed the reply: the test can tell it was applied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("name", ["greedy, repetition penalty", "sampling, all"])
def test_left_padded_batch_equals_generate_with_rows_stopping_at_different_steps(name, use_moe, dtype):
    model = varied_model(use_moe).to(dtype)  # bfloat16: what chat runs in on CPUs with native bfloat16
    input_ids, attention_mask = left_padded_batch([5, 11, 8])
    torch.manual_seed(5)
    free_run = written_out_tokens(model, input_ids, attention_mask, 24, [], **SETTINGS[name])
    stop = [int(free_run[1, 6])]  # a token row 1 produces at step 6: it stops early, the others later or never
    torch.manual_seed(5)
    mine = written_out_tokens(model, input_ids, attention_mask, 24, stop, **SETTINGS[name])
    torch.manual_seed(5)
    reference = reference_tokens(model, input_ids, attention_mask, 24, stop, **SETTINGS[name])
    assert torch.equal(mine, reference)
    stopped_at = [(row == stop[0]).nonzero()[0].item() if (row == stop[0]).any() else None for row in mine]
    assert stopped_at[1] <= 6 and len(set(stopped_at)) > 1  # rows end at different steps
    assert (mine[1, stopped_at[1] + 1:] == 0).all()  # a stopped row yields padding


def test_bad_settings_and_right_padding_are_refused():
    model = varied_model()
    input_ids = torch.ones(1, 4, dtype=torch.long)
    for settings, message in [({"temperature": -1}, "temperature must be >= 0"), ({"top_p": 0}, r"top_p must be in"),
                              ({"top_k": -2}, "top_k must be >= 0"), ({"repetition_penalty": 0}, "repetition_penalty")]:
        with pytest.raises(ValueError, match=message):
            next(generate_tokens(model, input_ids, max_new_tokens=4, **settings))
    with pytest.raises(ValueError, match="left padding"):
        next(generate_tokens(model, input_ids, torch.tensor([[1, 1, 0, 0]]), max_new_tokens=4))


# ----------------------------------------------------------------------------------------------------------------
# scripts/chat.py decodes with the loop; the measurements run

def test_chat_samples_with_the_written_out_loop_what_generate_samples(tmp_path, capsys, monkeypatch):
    directory = random_checkpoint(tmp_path / "tiny_random")
    flags = ["--model_path", str(directory), "--prompt", "Hi", "--temperature", "0.9", "--top_p", "0.9",
             "--max_new_tokens", "20", "--device", "cpu", "--dtype", "float32", "--seed", "3"]
    torch.manual_seed(3)  # what chat does, in the same order: seed, load, reply
    model, tokenizer = load_checkpoint(directory, "cpu", dtype="float32")
    prompt = prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    sampled = ReplyStream(model, tokenizer, prompt, max_new_tokens=20, temperature=0.9, top_p=0.9).complete()
    greedy = ReplyStream(model, tokenizer, prompt, max_new_tokens=20).complete()
    assert sampled.content != greedy.content

    def no_generate(*args, **kwargs):
        raise AssertionError("chat called model.generate")

    monkeypatch.setattr(MiniMindForCausalLM, "generate", no_generate)
    chat.main(flags)
    assert capsys.readouterr().out.endswith(f"user: Hi\nassistant: {sampled.content}\n")


def test_reply_stream_written_out_gives_generate_s_reply_and_stops_on_a_stop_string(tmp_path):
    model, tokenizer = load_checkpoint(random_checkpoint(tmp_path / "tiny_random"), "cpu", dtype="float32")
    prompt = prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    settings = {"max_new_tokens": 30, "temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.2, "seed": 7}
    by_generate = ReplyStream(model, tokenizer, prompt, **settings).complete()
    written_out = ReplyStream(model, tokenizer, prompt, written_out=True, **settings).complete()
    assert written_out.token_ids == by_generate.token_ids and written_out.content == by_generate.content
    stop = by_generate.content[10:13]
    cut = ReplyStream(model, tokenizer, prompt, written_out=True, stop=[stop], **settings).complete()
    assert cut.content == by_generate.content[:by_generate.content.index(stop)] and cut.finish_reason == "stop"


def test_chat_refuses_a_sampling_flag_out_of_range(capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--top_p", "0", "--prompt", "Hi"])
    assert exit_info.value.code == 2 and "--top_p must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("script, flags", [
    (kv_cache, ["--lengths", "8", "16", "--steps", "2", "--hidden_size", "32", "--num_hidden_layers", "1"]),
    (attention_memory, ["--lengths", "64", "256"]),
])
def test_xray_scripts_print_their_table(script, flags, capsys):
    assert script.main([*flags, "--device", "cpu", "--dtype", "float32"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == ([8, 16] if script is kv_cache else [64, 256])
    if script is attention_memory:  # written out grows as T^2 (16x for 4x T), SDPA far less
        written_out, sdpa = [float(row[2]) for row in rows], [float(row[3]) for row in rows]
        assert written_out[1] / written_out[0] > 10 and written_out[1] > 10 * sdpa[1]
