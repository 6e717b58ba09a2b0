"""scripts/convert_model.py against the real consumers: stock transformers (Qwen3 / Qwen3-MoE), peft (LoRA),
the gguf package's reader and llama-cpp-python (llama.cpp itself).

Tiny models on CPU in float32, files under pytest's tmp_path. The llama.cpp tests skip where llama-cpp-python is
not installed (`pip install -e ".[export]"`; it builds llama.cpp from source, several minutes).
"""

import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeForCausalLM

from model.hf_config import qwen3_config_of
from model.loading import load_pretrained
from model.model_lora import apply_lora, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from scripts import convert_model
from scripts.convert_model import GENERATION_TAG, export_hf, import_hf, write_gguf
from scripts.generation import generation_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO_ROOT / "model" / "tokenizer"
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
MOE = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
VARIANTS = pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])


def tiny_checkpoint(directory: Path, use_moe: bool = False, seed: int = 0, **overrides) -> Path:
    """A random MiniMind with the shipped tokenizer, saved as a training stage saves it."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = MiniMindConfig(vocab_size=len(tokenizer), **TINY, **(MOE if use_moe else {}), **overrides)
    MiniMindForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids).logits


def random_ids(vocab_size: int = 6400) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------
# to_hf / from_hf


@VARIANTS
def test_hf_export_opens_in_stock_transformers_with_the_same_logits(tmp_path, use_moe):
    checkpoint = tiny_checkpoint(tmp_path / "minimind", use_moe)
    exported = export_hf(checkpoint, tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())["model_type"] == ("qwen3_moe" if use_moe else "qwen3")
    assert (exported / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    assert (exported / "chat_template.jinja").read_text() == (TOKENIZER_DIR / "chat_template.jinja").read_text()
    reference = AutoModelForCausalLM.from_pretrained(exported)  # plain transformers: no trust_remote_code
    assert type(reference) is (Qwen3MoeForCausalLM if use_moe else Qwen3ForCausalLM)
    model = MiniMindForCausalLM.from_pretrained(checkpoint)
    assert (logits(model, random_ids()) - logits(reference, random_ids())).abs().max().item() < 1e-4


@VARIANTS
def test_hf_import_of_an_export_gives_back_the_checkpoint_byte_for_byte(tmp_path, use_moe):
    checkpoint = tiny_checkpoint(tmp_path / "minimind", use_moe)
    back = import_hf(export_hf(checkpoint, tmp_path / "hf"), tmp_path / "back")
    assert sorted(path.name for path in back.iterdir()) == sorted(path.name for path in checkpoint.iterdir())
    for path in checkpoint.iterdir():
        assert (back / path.name).read_bytes() == path.read_bytes(), path.name


@VARIANTS
def test_hf_import_opens_a_qwen3_saved_by_transformers_with_untied_embeddings(tmp_path, use_moe):
    torch.manual_seed(0)
    qwen3 = qwen3_config_of(MiniMindConfig(**TINY, **(MOE if use_moe else {}), tie_word_embeddings=False))
    reference = AutoModelForCausalLM.from_config(qwen3)
    reference.save_pretrained(tmp_path / "qwen3")
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path / "qwen3")

    imported = import_hf(tmp_path / "qwen3", tmp_path / "minimind")
    model = MiniMindForCausalLM.from_pretrained(imported)
    assert not model.config.tie_word_embeddings and model.config.use_moe == use_moe
    assert (logits(model, random_ids()) - logits(reference, random_ids())).abs().max().item() < 1e-4


def test_hf_import_refuses_a_qwen3_option_minimind_lacks(tmp_path):
    Qwen3ForCausalLM(Qwen3Config(**TINY, vocab_size=64, attention_bias=True)).save_pretrained(
        tmp_path / "qwen3")
    with pytest.raises(SystemExit, match="attention_bias"):
        import_hf(tmp_path / "qwen3", tmp_path / "minimind")


def test_to_hf_command_checks_the_logits_and_names_the_result(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "minimind")
    convert_model.main(["to_hf", "--model_path", str(checkpoint), "--device", "cpu"])
    assert "minimind_hf (Qwen3ForCausalLM); its logits equal the original's" in capsys.readouterr().out
    assert (tmp_path / "minimind_hf" / "config.json").is_file()


def test_to_hf_of_a_directory_without_config_says_what_to_pass(tmp_path):
    with pytest.raises(SystemExit, match="merge it first with the merge_lora subcommand"):
        convert_model.main(["to_hf", "--model_path", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------------------
# from_minimind: upstream MiniMind's .pth state dicts


def upstream_names(num_layers: int, num_experts: int = 0) -> list[str]:
    """The parameter names of upstream MiniMind-3 (jingyaogong/minimind, model/model_minimind.py: MiniMindBlock's
    self_attn, input_layernorm, post_attention_layernorm and mlp; MOEFeedForward's gate and experts)."""
    names = ["model.embed_tokens.weight"]
    for n in range(num_layers):
        layer = f"model.layers.{n}."
        names += [f"{layer}self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"{layer}self_attn.q_norm.weight", f"{layer}self_attn.k_norm.weight",
                  f"{layer}input_layernorm.weight", f"{layer}post_attention_layernorm.weight"]
        if num_experts:
            names += [f"{layer}mlp.gate.weight"] + [f"{layer}mlp.experts.{e}.{p}_proj.weight"
                                                     for e in range(num_experts) for p in ("gate", "up", "down")]
        else:
            names += [f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    return names + ["model.norm.weight", "lm_head.weight"]


def upstream_pth(model: MiniMindForCausalLM, path: Path) -> Path:
    """Save `model`'s weights as upstream's trainers do: torch.save of the state dict in float16, under upstream's
    names (ours are the same: nothing to rename), the tied lm_head as its own key."""
    ours, config = model.state_dict(), model.config
    names = upstream_names(config.num_hidden_layers, config.num_experts if config.use_moe else 0)
    assert sorted(names) == sorted(ours)
    torch.save({name: ours[name].half() for name in names}, path)
    return path


UPSTREAM_VARIANTS = {"dense": {}, "moe": MOE, "untied": dict(tie_word_embeddings=False)}


@pytest.mark.parametrize("variant", list(UPSTREAM_VARIANTS))
def test_minimind_pth_becomes_a_checkpoint_that_loads_strictly_with_its_logits(tmp_path, variant, capsys):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY, **UPSTREAM_VARIANTS[variant])).eval()
    pth = upstream_pth(model, tmp_path / "full_sft_64.pth")
    experts = ["--num_experts_per_tok", "2"] if model.config.use_moe else []
    convert_model.main(["from_minimind", "--input", str(pth), "--tokenizer", str(TOKENIZER_DIR), "--device", "cpu",
                        *experts])
    assert "full_sft_64 (MiniMindForCausalLM); its logits equal the original's" in capsys.readouterr().out
    converted = load_pretrained(tmp_path / "full_sft_64", "--model_path")  # strict
    shape = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "tie_word_embeddings", "use_moe") + (
        ("num_experts", "num_experts_per_tok", "moe_intermediate_size") if model.config.use_moe else
        ("intermediate_size",))
    assert {f: getattr(converted.config, f) for f in shape} == {f: getattr(model.config, f) for f in shape}
    rounded = MiniMindForCausalLM(model.config).eval()  # our model with its weights rounded to float16, as saved
    rounded.load_state_dict({name: tensor.half().float() for name, tensor in model.state_dict().items()})
    assert torch.equal(logits(converted, random_ids()), logits(rounded, random_ids()))
    assert (logits(converted, random_ids()) - logits(model, random_ids())).abs().max().item() < 1e-3
    assert AutoTokenizer.from_pretrained(tmp_path / "full_sft_64").get_vocab() == \
        AutoTokenizer.from_pretrained(TOKENIZER_DIR).get_vocab()


@pytest.mark.parametrize("change, named", [
    ("missing", "model.layers.1.self_attn.k_norm.weight"),
    ("unexpected", "model.layers.0.mlp.shared_experts.0.up_proj.weight"),  # MiniMind2's shared experts
])
def test_minimind_pth_with_a_tensor_missing_or_extra_is_refused_naming_it(tmp_path, change, named):
    state_dict = torch.load(upstream_pth(MiniMindForCausalLM(MiniMindConfig(**TINY)), tmp_path / "full_sft_64.pth"),
                            weights_only=True)
    if change == "missing":
        del state_dict[named]
    else:
        state_dict[named] = torch.zeros(128, 64, dtype=torch.float16)
    torch.save(state_dict, tmp_path / "full_sft_64.pth")
    result = subprocess.run([sys.executable, "scripts/convert_model.py", "from_minimind", "--input",
                             str(tmp_path / "full_sft_64.pth"), "--tokenizer", str(TOKENIZER_DIR)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{change}: {named}" in result.stderr and not (tmp_path / "full_sft_64").exists()


def test_minimind_pth_that_is_not_weights_is_refused_without_unpickling(tmp_path):
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "hook": print}, tmp_path / "code.pth")
    torch.save({"model": {}, "optimizer": {}, "step": 3}, tmp_path / "full_sft_64_resume.pth")
    (tmp_path / "notes.pth").write_text("not a torch file")
    for name, message in [("code.pth", "not a state dict written by torch.save"),  # weights_only refuses `print`
                          ("full_sft_64_resume.pth", "a resume state"), ("notes.pth", "not a state dict"),
                          ("absent.pth", "no such file")]:
        with pytest.raises(SystemExit, match=message):
            convert_model.main(["from_minimind", "--input", str(tmp_path / name), "--tokenizer", str(TOKENIZER_DIR)])


# ----------------------------------------------------------------------------------------------------------------
# merge_lora


def test_merged_lora_checkpoint_computes_the_logits_of_base_plus_adapter_in_peft(tmp_path):
    from peft import PeftModel

    base_dir = tiny_checkpoint(tmp_path / "base")
    model = MiniMindForCausalLM.from_pretrained(base_dir)
    apply_lora(model, rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # trained adapters are not zero; a zero B would merge to the base itself
            torch.nn.init.normal_(parameter, std=0.1)
    save_lora(model, tmp_path / "adapter")

    convert_model.main(["merge_lora", "--model_path", str(tmp_path / "adapter"), "--output_dir",
                        str(tmp_path / "merged"), "--device", "cpu"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged) is MiniMindForCausalLM
    assert not any("lora" in key for key in load_file(tmp_path / "merged" / "model.safetensors"))
    reference = PeftModel.from_pretrained(MiniMindForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    base = MiniMindForCausalLM.from_pretrained(base_dir)
    assert (logits(merged, random_ids()) - logits(base, random_ids())).abs().max().item() > 1e-2  # it changed
    assert (logits(merged, random_ids()) - logits(reference, random_ids())).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# GGUF: what the file holds (the gguf package's reader)


@pytest.fixture(scope="module")
def gguf():
    return pytest.importorskip("gguf", reason="writing GGUF needs the gguf package (the export extra)")


@VARIANTS
def test_gguf_holds_the_tokenizer_chat_template_and_qwen3_shapes(tmp_path, gguf, use_moe):
    checkpoint = tiny_checkpoint(tmp_path / "minimind", use_moe)
    model, tokenizer = MiniMindForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    reader = gguf.GGUFReader(write_gguf(model, tokenizer, tmp_path / "model.gguf", "f16"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    arch = "qwen3moe" if use_moe else "qwen3"
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"])
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert GENERATION_TAG.search(tokenizer.chat_template)
    assert fields["tokenizer.chat_template"] == GENERATION_TAG.sub("", tokenizer.chat_template)
    names = {tensor.name for tensor in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reads token_embd as the output layer
    assert ("blk.1.ffn_gate_exps.weight" in names) == use_moe and ("blk.1.ffn_gate.weight" in names) != use_moe


def test_gguf_chat_template_renders_in_plain_jinja_as_in_transformers(gguf):
    import jinja2.sandbox

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    # the environment llama-cpp-python renders GGUF chat templates in (llama_chat_format.Jinja2ChatFormatter)
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = environment.from_string(GENERATION_TAG.sub("", tokenizer.chat_template))
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
                    {"role": "user", "content": "2+2?"}]
    assert template.render(messages=conversation, add_generation_prompt=True) == tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=False)


def test_gguf_q8_0_weights_are_within_half_a_quantization_step_of_the_originals(tmp_path, gguf):
    checkpoint = tiny_checkpoint(tmp_path / "minimind")
    model, tokenizer = MiniMindForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    reader = gguf.GGUFReader(write_gguf(model, tokenizer, tmp_path / "model.gguf", "q8_0"))
    [tensor] = [tensor for tensor in reader.tensors if tensor.name == "blk.0.attn_q.weight"]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
    restored = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type))  # (out, in)
    original = model.model.layers[0].self_attn.q_proj.weight.detach()
    # q8_0 (ggml's quantize_row_q8_0): a block of 32 weights x is stored as q = round(x / d), |q| <= 127, with
    # d = max|x| / 127 rounded to f16 (relative error <= 2^-11), so |x - q * f16(d)| <= d / 2 + 127 * d * 2^-11
    step = original.view(-1, 32).abs().amax(-1, keepdim=True) / 127
    assert ((restored.view(-1, 32) - original.view(-1, 32)).abs() <= step * (0.5 + 127 * 2**-11)).all()
    assert not torch.equal(restored, original)


def test_to_gguf_command_writes_the_outtype_next_to_the_checkpoint(tmp_path, gguf, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "minimind")
    convert_model.main(["to_gguf", "--model_path", str(checkpoint), "--outtype", "q8_0"])
    outfile = tmp_path / "minimind-q8_0.gguf"
    assert f"wrote {outfile}" in capsys.readouterr().out
    file_type = gguf.GGUFReader(outfile).fields["general.file_type"].contents()
    assert file_type == gguf.LlamaFileType.MOSTLY_Q8_0


# ----------------------------------------------------------------------------------------------------------------
# GGUF in llama.cpp (llama-cpp-python)

PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Tell me a short story about a cat."}]
# Random weights with a wide initialization (std 0.3) and these seeds: a greedy continuation of 24 tokens with
# 15+ different tokens whose top-1 margins stay clear of float16 rounding (at std 0.02 a random model repeats one
# token; a few training steps give "a a a ..."), so an equal continuation means equal computations.
GREEDY_MODELS = {"dense": dict(use_moe=False, seed=2), "moe": dict(use_moe=True, seed=1)}
GREEDY_24 = generation_config(temperature=0, max_new_tokens=24)  # the front ends' greedy: llama.cpp's temp 0


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the export extra; it "
                                                   "compiles llama.cpp, several minutes)")


@pytest.fixture(scope="module", params=list(GREEDY_MODELS))
def greedy_model(request, tmp_path_factory, gguf):
    """(MiniMind model, tokenizer, {outtype: GGUF path}) for a random model with a varied greedy continuation."""
    directory = tmp_path_factory.mktemp(request.param)
    checkpoint = tiny_checkpoint(directory / "minimind", initializer_range=0.3, **GREEDY_MODELS[request.param])
    model, tokenizer = MiniMindForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)
    files = {outtype: write_gguf(model, tokenizer, directory / f"model-{outtype}.gguf", outtype)
             for outtype in ("f16", "q8_0")}
    return model, tokenizer, files


def open_llama(llama_cpp, path: Path, **options):
    return contextlib.closing(llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, verbose=False, **options))


def held_out_text(index: int = 0) -> str:
    with open(REPO_ROOT / "dataset" / "data" / "pretrain_test.jsonl", encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines][index]


def test_llama_cpp_tokenizes_the_shipped_texts_as_our_tokenizer(llama_cpp, greedy_model):
    _, tokenizer, files = greedy_model
    with open(REPO_ROOT / "dataset" / "data" / "sft_test.jsonl", encoding="utf-8") as lines:
        chats = [tokenizer.apply_chat_template(json.loads(line)["conversations"], tokenize=False)
                 for line, _ in zip(lines, range(10))]
    texts = [held_out_text(i) for i in range(10)] + chats + [
        "数字 12345 和 emoji 🎉🐱", "don't  I'll\t\twe're\r\n", "<think>\nhmm\n</think>\n\nok<|im_end|>"]
    with open_llama(llama_cpp, files["f16"], vocab_only=True) as llm:
        for text in texts:
            ids = tokenizer(text).input_ids
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text[:60]
            assert llm.detokenize(ids, special=True).decode() == tokenizer.decode(ids)


def test_gguf_f16_in_llama_cpp_continues_a_prompt_with_our_greedy_tokens(llama_cpp, greedy_model):
    model, tokenizer, files = greedy_model
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        ours = model.generate(torch.tensor([prompt]), generation_config=GREEDY_24)[0, len(prompt):].tolist()
    assert len(ours) == 24 and len(set(ours)) >= 15  # a varied continuation, not one token repeated
    with open_llama(llama_cpp, files["f16"]) as llm:
        theirs = [token for token, _ in zip(llm.generate(prompt, temp=0.0), range(24))]
    assert theirs == ours


def test_llama_cpp_chat_completion_renders_the_gguf_chat_template_and_replies_as_minimind(llama_cpp, greedy_model):
    model, tokenizer, files = greedy_model
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        ours = model.generate(torch.tensor([prompt]), generation_config=GREEDY_24)[0, len(prompt):].tolist()
    with open_llama(llama_cpp, files["f16"]) as llm:
        reply = llm.create_chat_completion(PROMPT, temperature=0.0, max_tokens=24, repeat_penalty=1.0)
    assert reply["usage"]["prompt_tokens"] == len(prompt)  # the same prompt, rendered from the GGUF's template
    # llama-cpp-python drops the bytes of an unfinished UTF-8 character where transformers writes U+FFFD
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(ours).replace("\ufffd", "")


def test_gguf_q8_0_in_llama_cpp_stays_close_to_minimind(llama_cpp, greedy_model):
    model, tokenizer, files = greedy_model
    ids = tokenizer(held_out_text()).input_ids[:128]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]  # (128, vocab)
    with open_llama(llama_cpp, files["q8_0"], logits_all=True) as llm:
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[:len(ids)]))
    top1_agreement = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    kl = F.kl_div(theirs.log_softmax(-1), ours.log_softmax(-1), log_target=True, reduction="batchmean").item()
    assert top1_agreement >= 0.85 and kl < 0.05  # KL(ours || q8_0) in nats per token


def test_gguf_q4_k_m_comes_from_llama_cpp_quantizer_smaller_than_q8_0(llama_cpp, greedy_model, tmp_path):
    model, tokenizer, files = greedy_model
    q4_k_m = write_gguf(model, tokenizer, tmp_path / "model-q4_k_m.gguf", "q4_k_m")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model-q4_k_m.gguf"]  # no f16 file left behind
    assert q4_k_m.stat().st_size < files["q8_0"].stat().st_size
    with open_llama(llama_cpp, q4_k_m, vocab_only=True) as llm:
        assert llm.metadata["general.file_type"] == str(int(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M))


# ----------------------------------------------------------------------------------------------------------------
# bench/bench_quantize.py


def test_quantization_bench_scores_the_same_tokens_and_llama_cpp_f32_matches_pytorch(tmp_path):
    pytest.importorskip("gguf", reason="the GGUF rows need the gguf package (the export extra)")
    checkpoint = tiny_checkpoint(tmp_path / "minimind", initializer_range=0.3, seed=2)
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    variants = ["torch_f32", "torch_int8"] + (["gguf_f32", "gguf_q8_0"] if has_llama_cpp else [])
    command = [sys.executable, "bench/bench_quantize.py", "--model_path", str(checkpoint), "--limit", "3",
               "--variants", ",".join(variants), "--prefill_tokens", "32", "--decode_tokens", "8", "--repeats", "1",
               "--threads", "1", "--output", str(tmp_path / "bench.json")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert list(rows) == variants and "| torch_int8 |" in result.stdout
    assert len({row["tokens"] for row in rows.values()}) == 1  # every variant scored the same tokens
    assert all(row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 for row in rows.values())
    assert rows["torch_f32"]["greedy_agreement"] == 1 and all(0 <= row["greedy_agreement"] <= 1 for row in rows.values())
    assert rows["torch_int8"]["perplexity"] == pytest.approx(rows["torch_f32"]["perplexity"], rel=0.05)
    if has_llama_cpp:  # two implementations of the same float32 computation
        assert rows["gguf_f32"]["perplexity"] == pytest.approx(rows["torch_f32"]["perplexity"], rel=1e-3)
