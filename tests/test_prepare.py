"""dataset/prepare.py, convert.py, cleaning.py: raw formats -> stage jsonl, cleaning, mixing, splitting, stats, show.

Everything runs on the real samples shipped in dataset/data/raw/ (see its ATTRIBUTION.md); the references are the
raw files read with the standard library, the stage datasets of dataset/lm_dataset.py, and hand-computed values.
"""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dataset.cleaning import (CleanConfig, clean_records, corpus_stats, detect_language, mask_pii, minhash,
                              near_duplicates, normalize_unicode, remove_control_characters)
from dataset.convert import convert_files, read_records, write_records
from dataset.lm_dataset import (IGNORE_INDEX, DataFormatError, DPODataset, PretrainDataset, SFTDataset,
                                build_assistant_labels)
from dataset.prepare import hash_fraction, main, mix_sources, model_view, render_with_loss, split_records

REPO_ROOT = Path(__file__).resolve().parents[1]
RAW = REPO_ROOT / "dataset" / "data" / "raw"
BOOK = RAW / "alice_in_wonderland.txt"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ONLY_DEDUP = dict(normalize="none", dedup=True, near_dedup=True)  # a CleanConfig with no filter but deduplication


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """The book's blank-line blocks of at least 300 characters, the reference read without our code."""
    blocks = [block.strip("\n") for block in BOOK.read_text(encoding="utf-8").split("\n\n")]
    return [block for block in blocks if len(block) >= 300]


def alpaca_user(record: dict) -> str:
    return record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")


def convert(tmp_path: Path, name: str, **options) -> tuple[str, list[dict], Path]:
    stage, records, _ = convert_files([RAW / name], **options)
    out = tmp_path / (Path(name).stem + ".jsonl")
    write_records(out, records)
    return stage, records, out


def labelled_text(tokenizer, input_ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(input_ids, labels) if label != IGNORE_INDEX])


# ----------------------------------------------------------------------------------------------------------
# Converters: each raw format -> a file its stage dataset loads


def test_txt_book_gives_one_document_per_blank_line_block(tmp_path, tokenizer):
    stage, records, out = convert(tmp_path, BOOK.name)
    blocks = [b.strip("\n") for b in BOOK.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    assert stage == "pretrain" and records == [{"text": block} for block in blocks]
    dataset = PretrainDataset(out, tokenizer, 64)
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    first = tokenizer(blocks[0], add_special_tokens=False)["input_ids"] + [separator]
    assert dataset[0]["input_ids"].tolist()[:len(first)] == first
    assert len(dataset) == sum(len(tokenizer(b)["input_ids"]) + 1 for b in blocks) // 64


def test_join_lines_unwraps_a_hard_wrapped_paragraph(tmp_path, paragraphs):
    _, records, _ = convert(tmp_path, BOOK.name, join_lines=True)
    unwrapped = " ".join(line.strip() for line in paragraphs[0].splitlines())
    assert {"text": unwrapped} in records and all("\n" not in r["text"] for r in records)


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "alpaca_zh_demo.csv"])
def test_alpaca_json_and_csv_become_conversations_the_sft_dataset_loads(tmp_path, tokenizer, name):
    if name.endswith(".json"):
        raw = json.loads((RAW / name).read_text(encoding="utf-8"))
    else:
        with open(RAW / name, encoding="utf-8", newline="") as f:
            raw = list(csv.DictReader(f))
    stage, records, out = convert(tmp_path, name)
    assert stage == "sft" and records == [{"conversations": [{"role": "user", "content": alpaca_user(r)},
                                                            {"role": "assistant", "content": r["output"]}]}
                                          for r in raw]
    dataset = SFTDataset(out, tokenizer, max_seq_len=4096)
    assert len(dataset) == len(raw)
    item = dataset[0]  # the loss covers the reply and its <|im_end|>, nothing else
    reply = labelled_text(tokenizer, item["input_ids"].tolist(), item["labels"].tolist())
    assert reply == raw[0]["output"] + "<|im_end|>"


def test_sharegpt_and_openai_chats_keep_every_turn(tmp_path, tokenizer):
    raw = json.loads((RAW / "sharegpt_en.json").read_text(encoding="utf-8"))
    _, records, out = convert(tmp_path, "sharegpt_en.json")
    assert records == [{"conversations": [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]}
                                          for t in r["conversations"]]} for r in raw]
    assert any(r["conversations"][0]["role"] == "system" for r in records)
    assert len(SFTDataset(out, tokenizer, max_seq_len=4096)) == len(raw)

    raw = [json.loads(line) for line in (RAW / "openai_messages_zh.jsonl").read_text(encoding="utf-8").splitlines()]
    _, records, out = convert(tmp_path, "openai_messages_zh.jsonl")
    assert records == [{"conversations": r["messages"]} for r in raw]
    assert len(SFTDataset(out, tokenizer, max_seq_len=4096)) == len(raw)


def test_preference_pairs_become_dpo_records(tmp_path, tokenizer):
    raw = [json.loads(line) for line in (RAW / "preference_en.jsonl").read_text(encoding="utf-8").splitlines()]
    stage, records, out = convert(tmp_path, "preference_en.jsonl")
    user = [{"role": "user", "content": r["prompt"]} for r in raw]
    assert stage == "dpo" and records == [{"chosen": [u, {"role": "assistant", "content": r["chosen"]}],
                                           "rejected": [u, {"role": "assistant", "content": r["rejected"]}]}
                                          for u, r in zip(user, raw)]
    assert len(DPODataset(out, tokenizer, max_seq_len=4096)) == len(raw)

    raw = json.loads((RAW / "dpo_zh_demo.json").read_text(encoding="utf-8"))  # LLaMA-Factory's ShareGPT pairs
    _, records, out = convert(tmp_path, "dpo_zh_demo.json")
    for record, r in zip(records, raw):
        prompt = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]]
        assert record == {side: prompt + [{"role": "assistant", "content": r[side]["value"]}]
                          for side in ("chosen", "rejected")}
    dataset = DPODataset(out, tokenizer, max_seq_len=4096)
    pair = dataset[0]
    assert labelled_text(tokenizer, pair["chosen_input_ids"].tolist(), pair["chosen_labels"].tolist()) == \
        raw[0]["chosen"]["value"] + "<|im_end|>"


def test_parquet_text_column_becomes_pretraining_documents(tmp_path, tokenizer):
    texts = pq.read_table(RAW / "c4_demo.parquet").column("text").to_pylist()
    stage, records, out = convert(tmp_path, "c4_demo.parquet")
    assert stage == "pretrain" and [r["text"] for r in records] == [t.strip("\n") for t in texts]
    assert len(PretrainDataset(out, tokenizer, 256)) > 0


# ----------------------------------------------------------------------------------------------------------
# Errors: one message naming the file and line (or record) and what was expected


def test_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "answer": "d"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf'^{path}:3: missing field "output" \(the reply, a string\)'):
        convert_files([path])


@pytest.mark.parametrize("content, name, message", [
    ("instruction,answer\nx,y\n", "a.csv", r'a\.csv: record 1: missing field "output"'),
    ('{"foo": 1}\n', "b.jsonl", r"b\.jsonl:1: cannot tell the format from the fields \['foo'\]; expected"),
    ("<doc/>", "c.xml", r"c\.xml: unknown file type '\.xml'; expected one of \.jsonl, \.txt"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}\n', "d.jsonl",
     r"d\.jsonl:1: \"conversations\"\[0\]: unknown speaker 'alien'"),
    ('{"text": "a"}\n{"a": 1\n', "e.jsonl", r"e\.jsonl:2: invalid JSON"),
])
def test_unknown_formats_and_bad_records_are_located(tmp_path, content, name, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        convert_files([tmp_path / name])


def test_cli_error_is_one_line_with_file_and_line_and_no_traceback(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "dataset" / "prepare.py"), "convert", "--data_path",
                             str(path), "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"{path}:2: conversations must end with an assistant message, not a 'user' "
                                     "message (reading it as openai)")


# ----------------------------------------------------------------------------------------------------------
# Cleaning


def test_normalization_and_control_characters_by_hand():
    assert normalize_unicode("ｆｕｌｌ－ｗｉｄｔｈ １２３ ﬁne x²", "NFKC") == "full-width 123 fine x2"
    assert normalize_unicode("e\u0301", "NFC") == "\u00e9" and normalize_unicode("ｆ", "none") == "ｆ"
    assert remove_control_characters("\ufeffa\r\nb\rc\x07d\u200be\x85f\tg\n") == "a\nb\ncdef\tg\n"


def test_exact_and_near_duplicates_are_removed_and_distinct_texts_kept(paragraphs):
    originals = paragraphs[:40]
    near = originals[7].replace("Alice", "the girl", 1) + " And so on."  # a few characters edited
    shingles = [{t[i:i + 5] for i in range(len(t) - 4)} for t in (" ".join(originals[7].lower().split()),
                                                                  " ".join(near.lower().split()))]
    assert len(shingles[0] & shingles[1]) / len(shingles[0] | shingles[1]) > 0.85  # truly near, by hand
    records = [{"text": t} for t in originals[:20] + [originals[3]] + originals[20:] + [near]]
    kept, report = clean_records(records, CleanConfig(**ONLY_DEDUP), tokenizer=None)
    assert [r["text"] for r in kept] == originals
    assert {row.step: row.removed for row in report}["exact dup"] == 1
    assert {row.step: row.removed for row in report}["near dup"] == 1


def test_minhash_estimates_the_jaccard_similarity_of_shingle_sets(paragraphs):
    a = " ".join(paragraphs[0].lower().split())
    b = a[: len(a) // 2] + " ".join(paragraphs[1].lower().split())[len(a) // 2:]  # shares its first half
    sets = [{t[i:i + 5] for i in range(len(t) - 4)} for t in (a, b)]
    exact = len(sets[0] & sets[1]) / len(sets[0] | sets[1])
    estimate = minhash(a, 256, 5, seed=1).jaccard(minhash(b, 256, 5, seed=1))
    assert 0.2 < exact < 0.8 and abs(estimate - exact) < 4 * (exact * (1 - exact) / 256) ** 0.5  # 4 std errors
    assert near_duplicates([a, b], threshold=0.9) == [False, False]


def test_language_filter_keeps_english_and_drops_chinese(paragraphs):
    with open(RAW / "alpaca_zh_demo.csv", encoding="utf-8", newline="") as f:
        chinese = [row["output"] for row in csv.DictReader(f)][:5]
    english = paragraphs[:5]
    assert [detect_language(t) for t in english + chinese] == ["en"] * 5 + ["zh"] * 5
    records = [{"text": t} for t in english + chinese]
    for keep, expected in (("en", english), ("zh", chinese)):
        kept, report = clean_records(records, CleanConfig(normalize="none", keep_languages=[keep], dedup=False,
                                                          near_dedup=False), tokenizer=None)
        assert [r["text"] for r in kept] == expected and report[-1].step == "language" and report[-1].removed == 5


def test_pii_masking_on_real_web_text_and_no_false_alarms():
    c4 = pq.read_table(RAW / "c4_demo.parquet").column("text").to_pylist()
    with_email = next(t for t in c4 if "vdwarren@education.wisc.edu" in t)
    with_phone = next(t for t in c4 if "910.538.0115" in t)
    assert mask_pii(with_email) == with_email.replace("vdwarren@education.wisc.edu", "[EMAIL]")
    assert mask_pii(with_phone) == with_phone.replace("910.538.0115", "[PHONE]")
    assert mask_pii("call +1 (555) 123-4567 or 13800138000, mail a.b@x.org") == \
        "call [PHONE] or [PHONE], mail [EMAIL]"
    untouched = "In 1839, on 2023-10-05, ISBN 978-3-16-148410-0 cost $1,234.56; 84834150134 - 6778576 = -16666579378"
    assert mask_pii(untouched) == untouched


def test_token_filter_uses_the_length_the_sft_dataset_sees(tmp_path, tokenizer):
    _, records, _ = convert(tmp_path, "alpaca_en_demo.json")
    lengths = [len(build_assistant_labels(tokenizer, r["conversations"])[0]) for r in records]
    kept, report = clean_records(records, CleanConfig(normalize="none", max_tokens=200, dedup=False,
                                                      near_dedup=False), tokenizer)
    assert kept == [r for r, n in zip(records, lengths) if n <= 200]
    assert report[-1].step == "tokens" and report[-1].removed == sum(n > 200 for n in lengths) > 0


# ----------------------------------------------------------------------------------------------------------
# Mixing and splitting


def test_mix_gives_each_source_its_weight_within_one_record():
    sizes = [[100 + i % 7 for i in range(300)], [40 + i % 5 for i in range(90)]]
    picks, per_source = mix_sources(sizes, [3, 1], seed=0)
    taken = [sum(sizes[s][i] for s, i in picks if s == source) for source in (0, 1)]
    assert len({(s, i) for s, i in picks}) == len(picks)  # no record twice: the largest mix with no repeat
    assert per_source[1]["records"] == 90 and abs(taken[0] - 3 * taken[1]) <= max(sizes[0])  # source 1 limits
    picks, per_source = mix_sources(sizes, [1, 1], total=40_000, seed=0)
    taken = [sum(sizes[s][i] for s, i in picks if s == source) for source in (0, 1)]
    assert abs(taken[0] - 20_000) <= 53 and abs(taken[1] - 20_000) <= 22  # half a record of each budget
    assert per_source[1]["passes"] > 4  # the small source is repeated
    assert mix_sources(sizes, [1, 1], total=40_000, seed=0)[0] == picks  # deterministic


def test_split_is_stable_disjoint_and_never_moves_a_test_record(tmp_path):
    _, records, _ = convert(tmp_path, BOOK.name)
    train, test = split_records(records, 0.1)
    assert (train, test) == split_records(records, 0.1)  # the same on every run
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert sorted(map(json.dumps, train + test)) == sorted(map(json.dumps, records))
    assert 0.06 < len(test) / len(records) < 0.14
    _, first_test = split_records(records[:300], 0.1)  # a file that later grows keeps its test records
    assert first_test == [r for r in test if r in records[:300]]
    digest = hashlib.sha256(records[0]["text"].encode("utf-8")).digest()
    assert hash_fraction(records[0]["text"]) == int.from_bytes(digest[:8], "big") / 2 ** 64
    question = [{"role": "user", "content": "Name a color."}]
    chats = [{"conversations": question + [{"role": "assistant", "content": a}]} for a in ("Red.", "Blue.", "Green.")]
    sides = split_records(chats, 0.5, salt="x")
    assert sorted(map(len, sides)) == [0, 3]  # answers to one question stay together


# ----------------------------------------------------------------------------------------------------------
# Stats and show


def test_stats_count_tokens_with_the_chat_template_and_duplicates(tmp_path, tokenizer):
    _, records, _ = convert(tmp_path, "alpaca_en_demo.json")
    records = records[:30] + [records[5]]
    stats = corpus_stats(records, tokenizer, bins=5)
    expected = [len(tokenizer.apply_chat_template(r["conversations"], tokenize=True)["input_ids"]) for r in records]
    assert stats["records"] == 31 and stats["tokens"] == sum(expected)
    assert stats["tokens_per_record"]["max"] == max(expected) and sum(stats["histogram"]["counts"]) == 31
    assert stats["exact_duplicate_rate"] == 1 / 31 and stats["near_duplicate_rate"] >= 1 / 31
    assert stats["languages"] == {"en": 1.0}


def test_show_marks_exactly_the_tokens_that_carry_loss(tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Goodbye."}]
    input_ids, labels = build_assistant_labels(tokenizer, conversation)
    shown = render_with_loss(tokenizer, input_ids, labels, color=False)
    assert shown == tokenizer.decode(input_ids).replace("Hello!<|im_end|>", "[[Hello!<|im_end|>]]").replace(
        "Goodbye.<|im_end|>", "[[Goodbye.<|im_end|>]]")
    colored = render_with_loss(tokenizer, input_ids, labels, color=True)
    assert "\033[1;32mHello!<|im_end|>\033[0m" in colored


def test_model_view_is_what_the_stage_datasets_train_on(tmp_path, tokenizer):
    _, pairs, out = convert(tmp_path, "preference_en.jsonl")
    dataset = DPODataset(out, tokenizer, max_seq_len=4096)
    for (side, input_ids, labels), key in zip(model_view(pairs[0], tokenizer), ("chosen", "rejected")):
        assert side == key and input_ids == dataset[0][f"{key}_input_ids"].tolist()
        assert labels == dataset[0][f"{key}_labels"].tolist()
    _, documents, out = convert(tmp_path, "c4_demo.parquet")
    [(_, input_ids, labels)] = model_view(documents[0], tokenizer)
    stream = PretrainDataset(out, tokenizer, 16).blocks.flatten().tolist()
    assert input_ids == labels == stream[:len(input_ids)] and input_ids[-1] == 0  # ends with <|endoftext|>


def test_cli_runs_the_whole_path_with_real_flags(tmp_path, capsys):
    out = tmp_path / "work"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "dataset" / "prepare.py"), "convert", "--data_path",
                             str(RAW / "alpaca_en_demo.json"), "--output", str(out / "sft.jsonl")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"sft: wrote 100 records to {out / 'sft.jsonl'}; left out: none"
    main(["clean", "--data_path", str(out / "sft.jsonl"), "--output", str(out / "clean.jsonl"), "--max_tokens", "300",
          "--keep_languages", "en", "--mask_pii", "1", "--report", str(out / "clean.json")])
    steps = json.loads((out / "clean.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["read", "normalize", "control chars", "pii", "empty", "tokens", "language",
                                          "exact dup", "near dup"]
    assert steps[-1]["remaining"] == len(read_records(out / "clean.jsonl")[1]) == 100 - steps[5]["removed"]
    main(["split", "--data_path", str(out / "clean.jsonl"), "--test_fraction", "0.2"])
    main(["stats", "--data_path", str(out / "clean_train.jsonl"), "--png", str(out / "lengths.png"),
          "--report", str(out / "stats.json")])
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["show", "--data_path", str(out / "clean_test.jsonl"), "--num_samples", "1", "--no_color"])
    printed = capsys.readouterr().out
    assert "records           " in printed and "=== record 1 of" in printed and "[[" in printed
    train, test = read_records(out / "clean_train.jsonl")[1], read_records(out / "clean_test.jsonl")[1]
    assert len(train) + len(test) == steps[-1]["remaining"]
    main(["mix", "--data_path", str(out / "clean_train.jsonl"), "--data_path", str(out / "sft.jsonl"),
          "--by", "records", "--weights", "1", "2", "--total", "30", "--output", str(out / "mix.jsonl"),
          "--report", str(out / "mix.json")])
    sources = json.loads((out / "mix.json").read_text())["sources"]
    assert [s["records"] for s in sources] == [10, 20] and len(read_records(out / "mix.jsonl")[1]) == 30
