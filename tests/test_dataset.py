"""dataset/lm_dataset.py: packed pretraining blocks, assistant-only SFT labels, padding, and file validation."""

import itertools
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from conftest import write_jsonl
from dataset.lm_dataset import (IGNORE_INDEX, DataFormatError, DPODataset, PretrainDataset, SFTDataset,
                                check_pretrain_record, check_sft_record, document_position_ids, read_jsonl)
from dataset.rl_dataset import PromptDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SEP = 0  # <|endoftext|>
STORIES = ["once upon a time there was a cat.", "床前明月光，疑是地上霜。", "the dog ran to the park.",
           "a bird sang.", "举头望明月，低头思故乡。", "tom and lily built a big red boat together."] * 4


def chat(*turns: str, system: str | None = None) -> list[dict]:
    """Alternating user/assistant messages from plain strings."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def labelled_runs(tokenizer, item) -> list[str]:
    """Decode each run of consecutive positions whose label is not IGNORE_INDEX."""
    runs, previous = [], IGNORE_INDEX
    for token_id, label in zip(item["input_ids"].tolist(), item["labels"].tolist()):
        if label != IGNORE_INDEX:
            assert label == token_id  # labels are aligned with input_ids; the model shifts them
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token_id)
        previous = label
    return [tokenizer.decode(run) for run in runs]


# ----------------------------------------------------------------------------------------------------------
# Pretraining


def test_packed_blocks_are_full_and_reproduce_the_token_stream(tokenizer, tmp_path):
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in STORIES]), tokenizer, 16)
    stream = [t for text in STORIES for t in tokenizer.encode(text) + [SEP]]
    assert len(ds) == len(stream) // 16 and ds.lengths == [16] * len(ds)
    blocks = torch.cat([ds[i]["input_ids"] for i in range(len(ds))])
    assert all(ds[i]["input_ids"].shape == (16,) for i in range(len(ds)))
    assert blocks.tolist() == stream[: len(ds) * 16]  # in order, nothing added; only the short tail dropped
    # no padding: the <|endoftext|> tokens are exactly the document ends
    document_ends = {end - 1 for end in itertools.accumulate(len(tokenizer.encode(t)) + 1 for t in STORIES)}
    assert {i for i, t in enumerate(blocks.tolist()) if t == SEP} == {i for i in document_ends if i < len(blocks)}
    assert all(torch.equal(ds[i]["labels"], ds[i]["input_ids"]) for i in range(len(ds)))


def test_labels_equal_input_ids_give_next_token_loss(tokenizer, tmp_path):
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in STORIES]), tokenizer, 16)
    batch = ds.collate([ds[0], ds[1]])
    assert set(batch) == {"input_ids", "labels"}  # full blocks: no padding, no attention_mask
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    out = model(**batch)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 6400),
                                                 batch["input_ids"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)  # the Hugging Face shift turns labels into next tokens


def test_doc_mask_position_ids_restart_after_each_separator(tokenizer, tmp_path):
    assert document_position_ids(torch.tensor([7, 8, SEP, 9, SEP, SEP, 5]), SEP).tolist() == [0, 1, 2, 0, 1, 0, 0]
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in STORIES]), tokenizer, 16,
                         doc_mask=True)
    for i in range(len(ds)):
        ids, positions = ds[i]["input_ids"], ds[i]["position_ids"]
        for t in range(16):
            starts = t == 0 or ids[t - 1] == SEP
            assert positions[t] == (0 if starts else positions[t - 1] + 1)
    assert any((ds[i]["position_ids"][1:] == 0).any() for i in range(len(ds)))  # restarts inside rows happen


def test_pretrain_file_shorter_than_one_block_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": "too short"}])
    with pytest.raises(DataFormatError, match=f"^{path}: .*fewer than one block of max_seq_len=512"):
        PretrainDataset(path, tokenizer, 512)


# ----------------------------------------------------------------------------------------------------------
# SFT


def test_sft_labels_only_the_assistant_replies(tokenizer, tmp_path):
    messages = chat("Hi!", "Hello, how can I help?", "讲个笑话", "好的：小猫说喵。", system="You are helpful.")
    ds = SFTDataset(write_jsonl(tmp_path / "s.jsonl", [{"conversations": messages}]), tokenizer, 512)
    item = ds[0]
    assert tokenizer.decode(item["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert labelled_runs(tokenizer, item) == ["Hello, how can I help?<|im_end|>", "好的：小猫说喵。<|im_end|>"]
    assert ds.lengths == [len(item["input_ids"])] and item["input_ids"].dtype == torch.long


def test_sft_labels_reasoning_and_tool_calls_but_not_tool_results(tokenizer, tmp_path):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "reasoning_content": "Use the tool.",
                 "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
                {"role": "tool", "content": "18C"},
                {"role": "assistant", "content": "18C in Paris."}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    ds = SFTDataset(write_jsonl(tmp_path / "s.jsonl", [{"conversations": messages, "tools": tools}]), tokenizer, 512)
    assert labelled_runs(tokenizer, ds[0]) == [
        '<think>\nUse the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call><|im_end|>",
        "18C in Paris.<|im_end|>"]
    assert tokenizer.decode(ds[0]["input_ids"]) == tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)


def test_sft_truncation_keeps_prefixes_and_reports_the_cut_samples(tokenizer, tmp_path, caplog):
    records = [{"conversations": chat("short question", "short answer")},
               {"conversations": chat("q", "a long answer that will be cut somewhere in the middle " * 5)}]
    path = write_jsonl(tmp_path / "s.jsonl", records)
    full = SFTDataset(path, tokenizer, 4096)
    with caplog.at_level(logging.WARNING, logger="dataset.lm_dataset"):
        cut = SFTDataset(path, tokenizer, 40)
    assert f"{path}: 1 of 2 samples cut to --max_seq_len 40 tokens (first: line 2), 0 dropped\n" in caplog.text
    assert len(cut) == 2 and all(length <= 40 for length in cut.lengths)
    for kept, original in zip([cut[0], cut[1]], [full[0], full[1]]):
        n = len(kept["input_ids"])
        assert torch.equal(kept["input_ids"], original["input_ids"][:n])
        assert torch.equal(kept["labels"], original["labels"][:n])
        assert (kept["labels"] != IGNORE_INDEX).any()
    assert cut.lengths == [len(full[0]["input_ids"]), 40]


LONG_PROMPT = "a very long question " * 20  # 80 tokens: no reply fits in 40


def test_sft_sample_without_reply_within_max_seq_len_is_dropped_and_reported(tokenizer, tmp_path, caplog):
    records = [{"conversations": chat("short question", "short answer")},
               {"conversations": chat(LONG_PROMPT, "never seen")},
               {"conversations": chat("q", "a long answer that will be cut somewhere in the middle " * 5)}]
    path = write_jsonl(tmp_path / "s.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="dataset.lm_dataset"):
        kept = SFTDataset(path, tokenizer, 40)  # the default: no --skip_bad_lines needed
    full = SFTDataset(path, tokenizer, 4096)
    assert len(kept) == 2 and torch.equal(kept[0]["input_ids"], full[0]["input_ids"])
    assert torch.equal(kept[1]["input_ids"], full[2]["input_ids"][:40])
    assert (f"{path}: 1 of 3 samples cut to --max_seq_len 40 tokens (first: line 3), 1 dropped (no assistant "
            f"token within the limit):\n  {path}:2\n") in caplog.text
    with pytest.raises(DataFormatError, match=f"^{path}: no conversation has an assistant token within the first "
                                              "--max_seq_len 8 tokens"):
        SFTDataset(path, tokenizer, 8)


def test_long_samples_are_reported_by_their_first_five_lines_and_bad_lines_still_stop(tokenizer, tmp_path, caplog):
    """SFT conversations and GRPO prompts that cannot fit are dropped and counted; a malformed line in the same
    file still stops the run, unless skip_bad_lines."""
    sft = write_jsonl(tmp_path / "s.jsonl", [{"conversations": chat("q", "a")}]
                      + [{"conversations": chat(LONG_PROMPT, "a")}] * 7)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}] + [{"prompt": LONG_PROMPT}] * 7)
    with caplog.at_level(logging.WARNING, logger="dataset.lm_dataset"):
        assert len(SFTDataset(sft, tokenizer, 40)) == len(PromptDataset(prompts, tokenizer, 40)) == 1
    for path, why in ((sft, "no assistant token within the limit"), (prompts, "a prompt is dropped, not cut")):
        first_five = "".join(f"\n  {path}:{line}" for line in range(2, 7))
        assert (f"{path}: 0 of 8 samples cut to --max_seq_len 40 tokens, 7 dropped ({why}):{first_five}\n"
                "  ... and 2 more") in caplog.text
    with sft.open("a") as f:
        f.write("not json\n")
    with pytest.raises(DataFormatError, match=f"^{sft}:9: invalid JSON"):
        SFTDataset(sft, tokenizer, 40)
    assert len(SFTDataset(sft, tokenizer, 40, skip_bad_lines=True)) == 1


def test_a_dpo_pair_with_a_long_prompt_is_cut_not_dropped(tokenizer, tmp_path, caplog):
    """The prompt yields to the replies, so a pair's reply always starts within max_seq_len."""
    pair = {"chosen": chat(LONG_PROMPT, "good"), "rejected": chat(LONG_PROMPT, "bad")}
    path = write_jsonl(tmp_path / "d.jsonl", [pair])
    with caplog.at_level(logging.WARNING, logger="dataset.lm_dataset"):
        pairs = DPODataset(path, tokenizer, 40)
    assert len(pairs) == 1 and pairs.lengths == [40]
    assert f"{path}: 1 of 1 samples cut to --max_seq_len 40 tokens (first: line 1), 0 dropped\n" in caplog.text


def test_sft_collate_right_pads_with_attention_mask(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": chat("hi", "hello")},
                                              {"conversations": chat("how are you today?", "fine, thanks a lot!")}])
    ds = SFTDataset(path, tokenizer, 512)
    short, long = ds[0], ds[1]
    n, m = len(short["input_ids"]), len(long["input_ids"])
    assert n < m
    batch = ds.collate([short, long])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(tensor.shape == (2, m) for tensor in batch.values())
    assert torch.equal(batch["input_ids"][0, :n], short["input_ids"]) and (batch["input_ids"][0, n:] == 0).all()
    assert torch.equal(batch["labels"][0, :n], short["labels"]) and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"].tolist() == [[1] * n + [0] * (m - n), [1] * m]
    assert torch.equal(batch["input_ids"][1], long["input_ids"])
    assert "attention_mask" not in ds.collate([short, short])  # equal lengths: nothing to mask


# ----------------------------------------------------------------------------------------------------------
# Validation

PRETRAIN_LINE, SFT_LINE = '{"text": "fine"}', json.dumps({"conversations": chat("q", "a")})
BAD_LINES = {  # name: (dataset, file content, line of the error, words of the message)
    "bad JSON": ("pretrain", PRETRAIN_LINE + '\n{"text": "unclosed\n', 2, "invalid JSON"),
    "not an object": ("pretrain", '["text"]\n', 1, "expected a JSON object"),
    "missing key": ("pretrain", PRETRAIN_LINE + '\n{"txt": "typo"}\n', 2, 'missing key "text"'),
    "wrong type": ("pretrain", '{"text": 42}\n', 1, '"text" must be a string'),
    "empty text": ("pretrain", PRETRAIN_LINE + '\n\n{"text": "  \\n "}\n', 3, '"text" is empty'),
    "not UTF-8": ("pretrain", b'{"text": "\xff"}\n', 1, "not UTF-8"),
    "missing conversations": ("sft", '{"messages": []}\n', 1, 'missing key "conversations"'),
    "empty conversation": ("sft", '{"conversations": []}\n', 1, "non-empty list"),
    "message not an object": ("sft", '{"conversations": ["hi"]}\n', 1, "conversations[0] must be an object"),
    "content not a string": ("sft", json.dumps({"conversations": [{"role": "user", "content": ["hi"]}]}), 1,
                             '"content" must be a string'),
    "unknown role": ("sft", json.dumps({"conversations": [{"role": "human", "content": "hi"}]}), 1,
                     "unknown role 'human'"),
    "wrong role order": ("sft", SFT_LINE + "\n" + json.dumps({"conversations": chat("q", "a") + chat("q", "a")[1:]}),
                         2, "a 'assistant' message cannot follow a 'assistant' message"),
    "starts with assistant": ("sft", json.dumps({"conversations": chat("q", "a")[1:]}), 1, "cannot follow the start"),
    "system not first": ("sft", json.dumps({"conversations": chat("q", "a") + [{"role": "system", "content": "s"}]}),
                         1, "a 'system' message cannot follow"),
    "not ending with assistant": ("sft", json.dumps({"conversations": chat("q", "a", "q2")}), 1,
                                  "must end with an assistant message"),
    "empty content": ("sft", json.dumps({"conversations": chat("q", " ")}), 1, 'empty "content"'),
    "tool without tool call": ("sft", json.dumps({"conversations": chat("q", "a") + [
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "b"}]}), 1,
        "a 'tool' message cannot follow a 'assistant' message"),
    "bad tool call": ("sft", json.dumps({"conversations": chat("q") + [
        {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]}), 1, '"tool_calls" must be a list'),
}


@pytest.mark.parametrize("name", BAD_LINES)
def test_bad_line_error_names_file_and_line(tokenizer, tmp_path, name):
    kind, content, line, words = BAD_LINES[name]
    path = tmp_path / "data.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        PretrainDataset(path, tokenizer, 8) if kind == "pretrain" else SFTDataset(path, tokenizer, 64)
    assert str(error.value).startswith(f"{path}:{line}: ") and words in str(error.value)


@pytest.mark.parametrize("kind", ["empty file", "directory", "missing file"])
def test_unusable_path_is_a_clear_error(tokenizer, tmp_path, kind):
    path = tmp_path / "data.jsonl"
    if kind == "empty file":
        path.write_text("\n  \n")
    elif kind == "directory":
        path.mkdir()
    words = {"empty file": "the file is empty", "directory": "is a directory", "missing file": "no such file"}[kind]
    for make in (lambda: PretrainDataset(path, tokenizer, 8), lambda: SFTDataset(path, tokenizer, 64)):
        with pytest.raises(DataFormatError, match=f"^{path}: {words}"):
            make()


@pytest.mark.parametrize("name", BAD_LINES)
def test_skip_bad_lines_keeps_the_good_lines_and_reports_each_bad_one(tokenizer, tmp_path, caplog, name):
    kind, content, line, words = BAD_LINES[name]
    good = PRETRAIN_LINE if kind == "pretrain" else SFT_LINE
    path = tmp_path / "data.jsonl"
    content = content.encode() if isinstance(content, str) else content
    path.write_bytes(content.rstrip(b"\n") + b"\n" + "\n".join([good] * 8).encode() + b"\n")
    valid_before = sum(1 for raw in content.splitlines()[:line - 1] if raw.strip())  # good lines above the bad one
    with caplog.at_level(logging.WARNING, logger="dataset.lm_dataset"):
        records = read_jsonl(path, check_pretrain_record if kind == "pretrain" else check_sft_record,
                             skip_bad_lines=True)
        dataset = (PretrainDataset(path, tokenizer, 2, skip_bad_lines=True) if kind == "pretrain"
                   else SFTDataset(path, tokenizer, 64, skip_bad_lines=True))
    assert len(records) == valid_before + 8 and len(dataset) > 0
    assert f"{path}: skipped 1 of {valid_before + 9} bad lines" in caplog.text
    assert f"{path}:{line}: " in caplog.text and words in caplog.text


def test_dpo_skip_bad_lines_reports_the_bad_pair(tokenizer, tmp_path, caplog):
    pair = {"chosen": chat("q", "good"), "rejected": chat("q", "bad")}
    path = write_jsonl(tmp_path / "d.jsonl", [pair, {"chosen": chat("q", "good"), "rejected": chat("other", "bad")},
                                              pair])
    with pytest.raises(DataFormatError, match=rf"^{path}:2: chosen and rejected prompts differ"):
        DPODataset(path, tokenizer, 64)
    with caplog.at_level(logging.WARNING, logger="dataset.lm_dataset"):
        assert len(DPODataset(path, tokenizer, 64, skip_bad_lines=True)) == 2
    assert f"{path}: skipped 1 of 3 bad lines" in caplog.text and f"{path}:2: chosen and rejected" in caplog.text


def test_a_file_with_only_bad_lines_is_an_error_even_when_skipping(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"txt": 1}\nnot json\n')
    with pytest.raises(DataFormatError, match=f"^{path}: no valid line"):
        PretrainDataset(path, tokenizer, 8, skip_bad_lines=True)


def test_shipped_data_validates_and_loads(tokenizer):
    data = REPO_ROOT / "dataset" / "data"
    assert len(read_jsonl(data / "pretrain.jsonl", check_pretrain_record)) == 5600
    assert len(read_jsonl(data / "sft.jsonl", check_sft_record)) == 4000
    pretrain_test = PretrainDataset(data / "pretrain_test.jsonl", tokenizer, 256, doc_mask=True)
    sft_test = SFTDataset(data / "sft_test.jsonl", tokenizer, 512)
    assert len(pretrain_test) > 50 and len(sft_test) == 200
    assert all(length <= 512 for length in sft_test.lengths)
    assert labelled_runs(tokenizer, sft_test[0])[-1].endswith("<|im_end|>")
