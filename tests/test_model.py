"""The model against its references: stock transformers Qwen3 / Qwen3-MoE, the Switch Transformer loss, itself."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from model.model_minimind import (IGNORE_INDEX, MiniMindConfig, MiniMindForCausalLM, load_balancing_loss,
                                  next_token_loss, token_logprobs)

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(**{**TINY, **overrides})).eval()


def qwen3_config_of(config: MiniMindConfig, moe: bool):
    """The stock transformers config with the same shapes as a MiniMind config."""
    shared = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters), max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
    )
    if not moe:
        return Qwen3Config(**shared)
    return Qwen3MoeConfig(
        **shared, num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
        router_aux_loss_coef=config.router_aux_loss_coef, output_router_logits=True,
    )


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["rope", "yarn"])
def test_dense_logits_match_transformers_qwen3(tmp_path, rope_scaling):
    model = tiny_model(rope_scaling=rope_scaling)
    model.save_pretrained(tmp_path)
    reference = Qwen3ForCausalLM.from_pretrained(tmp_path, config=qwen3_config_of(model.config, moe=False)).eval()
    input_ids = torch.randint(0, 128, (2, 40))  # 40 > original_max_position_embeddings: YaRN's stretch matters
    with torch.no_grad():
        diff = (model(input_ids).logits - reference(input_ids).logits).abs().max().item()
    assert diff < 1e-4


def test_moe_logits_and_losses_match_transformers_qwen3_moe(tmp_path):
    model = tiny_model(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    model.save_pretrained(tmp_path)  # experts stored one by one; transformers fuses them when it loads
    reference = Qwen3MoeForCausalLM.from_pretrained(tmp_path, config=qwen3_config_of(model.config, moe=True)).eval()
    input_ids = torch.randint(0, 128, (2, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :6] = 0  # left padding: padded tokens must not count in the balance loss
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, 6] = -100  # the first real token would be predicted from a padding position
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask, labels=labels)
        theirs = reference(input_ids, attention_mask=attention_mask, labels=labels)
    real = attention_mask.bool()
    assert (ours.logits - theirs.logits)[real].abs().max().item() < 1e-4
    assert ours.aux_loss.item() == pytest.approx(theirs.aux_loss.item(), rel=1e-5)
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-5)


def test_load_balancing_loss_matches_switch_transformer_formula():
    torch.manual_seed(0)
    router_logits = tuple(torch.randn(10, 4) for _ in range(3))
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    for attention_mask in (None, mask):
        ours = load_balancing_loss(router_logits, num_experts=4, top_k=2, attention_mask=attention_mask)
        theirs = load_balancing_loss_func(router_logits, num_experts=4, top_k=2, attention_mask=attention_mask)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    # by hand, one layer, top-1: f = fraction of tokens per expert, P = mean probability; loss = E * sum f * P
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    probs = logits.softmax(-1)
    f = torch.tensor([2 / 3, 1 / 3])
    expected = 2 * (f * probs.mean(0)).sum()
    assert load_balancing_loss((logits,), num_experts=2, top_k=1).item() == pytest.approx(expected.item())
    # uniform routing is the optimum: loss == top_k
    assert load_balancing_loss((torch.zeros(8, 4),), 4, 1).item() == pytest.approx(1.0)


def test_moe_output_is_the_router_weighted_sum_of_chosen_experts():
    model = tiny_model(use_moe=True, num_experts=4, num_experts_per_tok=2)
    moe = model.model.layers[0].mlp
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        out, router_logits = moe(x)
        probs = router_logits.softmax(-1)
        weights, chosen = probs.topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        expected = torch.stack([
            sum(w * moe.experts[e](token) for w, e in zip(weights[t], chosen[t].tolist()))
            for t, token in enumerate(x[0])
        ])
    assert torch.allclose(out[0], expected, atol=1e-6)


def test_moe_loss_adds_weighted_aux_loss():
    model = tiny_model(use_moe=True)
    input_ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        out = model(input_ids, labels=input_ids)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert out.loss.item() == pytest.approx(ce.item() + model.config.router_aux_loss_coef * out.aux_loss.item(), rel=1e-5)


def test_labels_are_shifted_inside_and_ignore_index_is_skipped():
    model = tiny_model()
    input_ids = torch.randint(0, 128, (1, 10))
    labels = input_ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        out = model(input_ids, labels=labels)
    log_probs = out.logits[0].log_softmax(-1)
    by_hand = -torch.stack([log_probs[t - 1, input_ids[0, t]] for t in range(4, 10)]).mean()
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_token_logprobs_is_the_shifted_log_softmax_and_sums_to_next_token_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, dtype=torch.bfloat16)  # the dtype of autocast: the result is float32 anyway
    labels = torch.randint(0, 11, (2, 7))
    labels[0, :3] = IGNORE_INDEX  # a prompt: positions 0 and 1 score nothing
    labels[1, 5:] = IGNORE_INDEX  # padding: positions 4 and 5 score nothing
    logprobs = token_logprobs(logits, labels)
    assert logprobs.shape == (2, 7) and logprobs.dtype == torch.float32

    scored = labels[:, 1:] != IGNORE_INDEX  # position t scores labels[t + 1]
    by_hand = logits[:, :-1].float().log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(logprobs[:, :-1], by_hand.where(scored, 0.0))
    assert (logprobs[:, -1] == 0).all()  # the last position has no next token
    assert (-logprobs.sum() / scored.sum()).item() == pytest.approx(next_token_loss(logits, labels).item(), rel=1e-6)


def test_tied_embeddings_and_dense_has_no_aux_loss():
    model = tiny_model()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model(torch.randint(0, 128, (1, 4))).aux_loss is None


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_save_then_load_gives_identical_logits(tmp_path, moe):
    model = tiny_model(use_moe=moe, rope_scaling=YARN)
    model.save_pretrained(tmp_path)
    loaded = MiniMindForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)
    assert loaded.config.rope_parameters == model.config.rope_parameters


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_kv_cache_generation_equals_full_recompute(moe):
    model = tiny_model(use_moe=moe)
    prompt = torch.randint(0, 128, (1, 7))
    with_cache = model.generate(prompt, max_new_tokens=12, do_sample=False)
    without_cache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 19)
    assert torch.equal(with_cache, without_cache)


def test_incremental_decoding_logits_equal_full_forward():
    model = tiny_model()
    input_ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = model(input_ids).logits
        step = model(input_ids[:, :8], use_cache=True)
        cache = step.cache
        pieces = [step.logits]
        for t in range(8, 12):
            step = model(input_ids[:, t : t + 1], cache=cache, use_cache=True)
            pieces.append(step.logits)
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = tiny_model(seed=3)
    short, long = torch.randint(3, 128, (1, 4)), torch.randint(3, 128, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1), long])
    attention_mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], dim=1), torch.ones(1, 9)]).long()
    together = model.generate(batch, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone_short = model.generate(short, max_new_tokens=6, do_sample=False)
    alone_long = model.generate(long, max_new_tokens=6, do_sample=False)
    assert torch.equal(together[0, -6:], alone_short[0, -6:])
    assert torch.equal(together[1, -6:], alone_long[0, -6:])


def test_packed_documents_do_not_see_each_other():
    model = tiny_model()
    doc_a, doc_b = torch.randint(3, 128, (1, 5)), torch.randint(3, 128, (1, 7))
    packed = torch.cat([doc_a, doc_b], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)  # restart at 0: a new document
    with torch.no_grad():
        together = model(packed, position_ids=position_ids).logits
        separate = torch.cat([model(doc_a).logits, model(doc_b).logits], dim=1)
        unmasked = model(packed).logits
    assert torch.allclose(together, separate, atol=1e-5)
    assert not torch.allclose(unmasked[:, 5:], separate[:, 5:], atol=1e-3)  # without the mask, b sees a


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    prompt = torch.randint(0, 128, (1, 5))
    torch.manual_seed(7)
    first = model.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.9)
    torch.manual_seed(7)
    second = model.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.9)
    assert torch.equal(first, second)


def test_config_defaults_are_the_minimind_family_and_bad_shapes_raise():
    config = MiniMindConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 8, 8)
    assert (config.num_key_value_heads, config.vocab_size, config.rope_theta) == (4, 6400, 1e6)
    assert (config.num_experts, config.num_experts_per_tok) == (4, 1)
    assert config.intermediate_size == 2048 and config.intermediate_size % 64 == 0
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MiniMindConfig(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MiniMindConfig(use_moe=True, num_experts=2, num_experts_per_tok=3)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(moe):
    model = tiny_model(use_moe=moe)
    input_ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    results, calls = [], []
    layer = model.model.layers[0]
    forward = layer.forward
    layer.forward = lambda *args: calls.append(1) or forward(*args)  # counts recomputations too (hooks do not)
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model.zero_grad()
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert len(calls) == 1 + 2  # with checkpointing the layer's forward runs again in backward
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[name], grads_b[name], atol=1e-6) for name in grads_a)
