"""Cleaning records of any stage: text repairs, then filters that each say how many records they removed and why;
and the statistics of a file, which count what the filters would judge (corpus_stats).

The steps run in this order (clean_records), cheap ones first and deduplication last, so that duplicates are
looked for only among the records every other filter kept:

    normalize       Unicode normalization (NFKC by default: full-width forms, ligatures, compatibility characters)
    control chars   C0/C1 control characters, byte-order marks and zero-width spaces removed; \\r\\n -> \\n
    pii             optional: e-mail addresses -> [EMAIL], phone numbers -> [PHONE]
    empty           records with no text left
    chars / tokens  length filters, in characters and in tokens of our tokenizer (chat template included)
    language        keep only the languages asked for (py3langid, a maintained langid.py with its model inside)
    exact dup       the same text as an earlier record (SHA-256 of the text)
    near dup        MinHash LSH (datasketch) on character n-grams: estimated Jaccard similarity >= threshold to
                    an earlier record (Broder 1997; Leskovec et al., Mining of Massive Datasets, ch. 3)

A step works on the texts of a record (dataset/convert.py's record_texts): a document, or every message of a
conversation; filters judge the record by all its texts joined (joined_text).
"""

import hashlib
import re
import statistics
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import py3langid
from datasketch import MinHash, MinHashLSH

from dataset.convert import CHECKS, count_tokens, joined_text, map_texts, stage_of
from dataset.lm_dataset import DataFormatError

# \r\n and lone \r end lines as \n; these characters are removed: C0 controls but tab and newline, DEL, C1
# controls, lone surrogates (unencodable), zero-width space and byte-order mark.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u200b\ufeff]")
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A phone number: optional +country code, then an area code (bare or in parentheses) and two groups of 3-4
# digits split by a space, dot or dash; or a mainland-China mobile number (11 digits starting 13-19). Digits
# may not touch letters, digits, or a sign or point before them, so years, dates, prices, sums and ids
# (978-3-16-148410-0, -16666579378, 1,234.56) are left alone. A heuristic: "12 345 678" is masked too.
PHONE = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w.-]?\d)"
                   r"|(?<![\w+.-])(?:\+86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?![\w.-]?\d)", re.ASCII)
EMAIL_MASK, PHONE_MASK = "[EMAIL]", "[PHONE]"
BAR_WIDTH = 40  # characters of the longest bar of the terminal histogram (stats_text)


@dataclass
class CleanConfig:
    """What clean_records does; the defaults are the CLI's (dataset/prepare.py clean --help)."""
    normalize: str = "NFKC"           # NFKC | NFC | none
    mask_pii: bool = False
    min_chars: int = 0
    max_chars: int | None = None
    min_tokens: int = 0
    max_tokens: int | None = None
    keep_languages: list[str] = field(default_factory=list)  # ISO 639-1 codes; empty: keep every language
    dedup: bool = True
    near_dedup: bool = True
    near_dup_threshold: float = 0.8   # estimated Jaccard similarity of character n-gram sets
    num_perm: int = 128               # MinHash permutations: the estimate's standard error is ~1/sqrt(num_perm)
    shingle_size: int = 5             # characters per n-gram (works for scripts with and without spaces)
    seed: int = 1                     # of the MinHash permutations


@dataclass
class StepReport:
    """One row of the cleaning report."""
    step: str
    removed: int
    changed: int
    remaining: int
    reason: str


# ----------------------------------------------------------------------------------------------------------
# Text repairs


def normalize_unicode(text: str, form: str) -> str:
    """Unicode normalization form "NFKC", "NFC", ... (unicodedata); "none" leaves the text as it is.

    NFKC folds compatibility characters: full-width Latin and digits, ligatures, superscripts; note that it
    also turns Chinese full-width punctuation (，：！？) into ASCII (,:!?). Use "NFC" to keep it.
    """
    return text if form == "none" else unicodedata.normalize(form, text)


def remove_control_characters(text: str) -> str:
    """Line ends made "\\n", then CONTROL_CHARACTERS deleted (tab and newline stay)."""
    return CONTROL_CHARACTERS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def mask_pii(text: str) -> str:
    """E-mail addresses -> [EMAIL], then phone numbers -> [PHONE] (regular expressions EMAIL and PHONE: a
    heuristic that finds the common written forms, not a guarantee)."""
    return PHONE.sub(PHONE_MASK, EMAIL.sub(EMAIL_MASK, text))


# ----------------------------------------------------------------------------------------------------------
# Record-level judgements


def detect_language(text: str) -> str:
    """ISO 639-1 code of the text's language by py3langid (Lui & Baldwin 2012, langid.py; 97 languages, model
    shipped with the package, runs offline)."""
    return py3langid.classify(text)[0]


def text_hash(text: str) -> str:
    """SHA-256 of the text's UTF-8 bytes, hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def exact_duplicates(texts: list[str]) -> list[bool]:
    """For each text, whether an earlier text is identical (compared by SHA-256)."""
    seen, duplicate = set(), []
    for text in texts:
        digest = text_hash(text)
        duplicate.append(digest in seen)
        seen.add(digest)
    return duplicate


def minhash(text: str, num_perm: int, shingle_size: int, seed: int) -> MinHash:
    """MinHash signature of the set of character n-grams of the text (lower-cased, whitespace collapsed).

    For a random hash function h, the smallest hash over a set A equals the smallest over B exactly when the
    element of A | B with the smallest hash lies in A & B, so (Broder 1997, "On the resemblance and containment
    of documents")

        P[min h(A) = min h(B)] = |A & B| / |A | B| = J(A, B)

    and the share of the num_perm hash functions on which two signatures agree estimates J(A, B).
    """
    text = " ".join(text.lower().split())
    shingles = {text[i:i + shingle_size] for i in range(max(1, len(text) - shingle_size + 1))}
    signature = MinHash(num_perm=num_perm, seed=seed)
    signature.update_batch([s.encode("utf-8") for s in shingles])
    return signature


def near_duplicates(texts: list[str], threshold: float = 0.8, num_perm: int = 128, shingle_size: int = 5,
                    seed: int = 1) -> list[bool]:
    """For each text, whether an earlier kept text has estimated Jaccard similarity >= threshold.

    Locality-sensitive hashing over MinHash bands (datasketch.MinHashLSH) proposes candidates; each candidate's
    estimated Jaccard similarity is then checked against the threshold, so LSH's false positives are not dropped.
    The first text of a group of near duplicates is kept and indexed; the later ones are not indexed.
    """
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept, duplicate = {}, []
    for index, text in enumerate(texts):
        signature = minhash(text, num_perm, shingle_size, seed)
        is_duplicate = any(signature.jaccard(kept[key]) >= threshold for key in lsh.query(signature))
        if not is_duplicate:
            lsh.insert(index, signature)
            kept[index] = signature
        duplicate.append(is_duplicate)
    return duplicate


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def clean_records(records: list[dict], config: CleanConfig, tokenizer) -> tuple[list[dict], list[StepReport]]:
    """Run the cleaning steps of the module docstring over records of one stage.

    Args:
        records: pretrain, sft or dpo records (dataset/convert.py).
        config: which steps run and their thresholds.
        tokenizer: counts tokens for the token-length filter (only used when min_tokens / max_tokens are set).
    Returns:
        (kept records in their original order, one StepReport per step that ran).
    """
    report = [StepReport("read", 0, 0, len(records), "records in the input")]

    def repair(name: str, function, reason: str) -> None:
        nonlocal records
        repaired = [map_texts(record, function) for record in records]
        changed = sum(a != b for a, b in zip(records, repaired))
        records = repaired
        report.append(StepReport(name, 0, changed, len(records), reason))

    def keep(name: str, flags: list[bool], reason: str) -> None:
        nonlocal records
        records = [record for record, kept in zip(records, flags) if kept]
        report.append(StepReport(name, len(flags) - len(records), 0, len(records), reason))

    if config.normalize != "none":
        repair("normalize", lambda text: normalize_unicode(text, config.normalize),
               f"Unicode {config.normalize} normalization (changes text, removes no record)")
    repair("control chars", remove_control_characters, "control characters, BOM, zero-width spaces removed")
    if config.mask_pii:
        repair("pii", mask_pii, f"e-mail addresses -> {EMAIL_MASK}, phone numbers -> {PHONE_MASK}")
    keep("empty", [still_valid(record) for record in records], "a document or message left empty")

    if config.min_chars > 0 or config.max_chars is not None:
        lengths = [len(joined_text(record)) for record in records]
        keep("chars", [within(n, config.min_chars, config.max_chars) for n in lengths],
             f"length outside [{config.min_chars}, {config.max_chars or 'inf'}] characters")
    if config.min_tokens > 0 or config.max_tokens is not None:
        lengths = [count_tokens(record, tokenizer) for record in records]
        keep("tokens", [within(n, config.min_tokens, config.max_tokens) for n in lengths],
             f"length outside [{config.min_tokens}, {config.max_tokens or 'inf'}] tokens")
    if config.keep_languages:
        languages = [detect_language(joined_text(record)) for record in records]
        keep("language", [language in config.keep_languages for language in languages],
             f"language not in {','.join(config.keep_languages)} (py3langid)")
    if config.dedup:
        keep("exact dup", [not d for d in exact_duplicates([joined_text(r) for r in records])],
             "same text as an earlier record (SHA-256)")
    if config.near_dedup:
        flags = near_duplicates([joined_text(r) for r in records], config.near_dup_threshold, config.num_perm,
                                config.shingle_size, config.seed)
        keep("near dup", [not d for d in flags],
             f"MinHash Jaccard >= {config.near_dup_threshold} to an earlier record "
             f"({config.shingle_size}-char shingles, {config.num_perm} permutations)")
    return records, report


def still_valid(record: dict) -> bool:
    """Whether the stage dataset still accepts the record (no document or message left empty by cleaning)."""
    try:
        CHECKS[stage_of(record)](record)
    except DataFormatError:
        return False
    return True


def within(value: int, low: int, high: int | None) -> bool:
    """low <= value <= high, with no upper bound when high is None."""
    return value >= low and (high is None or value <= high)


def report_table(report: list[StepReport]) -> str:
    """The report as an aligned text table."""
    lines = [f"{'step':<14} {'removed':>8} {'changed':>8} {'remaining':>10}  reason"]
    lines += [f"{r.step:<14} {r.removed:>8,} {r.changed:>8,} {r.remaining:>10,}  {r.reason}" for r in report]
    return "\n".join(lines)


def report_dicts(report: list[StepReport]) -> list[dict]:
    """The report as plain dicts, for JSON."""
    return [asdict(row) for row in report]


# ----------------------------------------------------------------------------------------------------------
# Statistics of a file: the same measures, counted instead of filtered


def corpus_stats(records: list[dict], tokenizer, bins: int = 20, near_dup_threshold: float = 0.8) -> dict:
    """Record and token counts, the token-length histogram, language mix and duplicate rates of a file.

    Token counts are dataset/convert.py's count_tokens (chat template included); languages are py3langid's
    guess for each record's joined text; duplicates as in dataset/cleaning.py (the near-duplicate rate counts
    exact duplicates too).
    """
    tokens = [count_tokens(record, tokenizer) for record in records]
    texts = [joined_text(record) for record in records]
    counts, edges = np.histogram(tokens, bins=bins)
    languages = Counter(detect_language(text) for text in texts)
    return {
        "records": len(records),
        "tokens": sum(tokens),
        "characters": sum(len(text) for text in texts),
        "tokens_per_record": {"min": min(tokens), "mean": statistics.fmean(tokens),
                              "median": statistics.median(tokens), "p95": float(np.percentile(tokens, 95)),
                              "max": max(tokens)},
        "languages": {language: n / len(records) for language, n in languages.most_common()},
        "exact_duplicate_rate": sum(exact_duplicates(texts)) / len(records),
        "near_duplicate_rate": sum(near_duplicates(texts, near_dup_threshold)) / len(records),
        "near_duplicate_threshold": near_dup_threshold,
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def stats_text(stats: dict) -> str:
    """The statistics as lines for the terminal, the histogram drawn with bars."""
    per = stats["tokens_per_record"]
    languages = "  ".join(f"{language} {share:.1%}" for language, share in list(stats["languages"].items())[:8])
    lines = [f"records           {stats['records']:,}",
             f"tokens            {stats['tokens']:,} (per record: min {per['min']}, mean {per['mean']:.1f}, "
             f"median {per['median']:.0f}, p95 {per['p95']:.0f}, max {per['max']})",
             f"characters        {stats['characters']:,}",
             f"languages         {languages}",
             f"exact duplicates  {stats['exact_duplicate_rate']:.2%}",
             f"near duplicates   {stats['near_duplicate_rate']:.2%} (MinHash Jaccard >= "
             f"{stats['near_duplicate_threshold']}, exact ones included)",
             "tokens per record (histogram)"]
    edges, counts = stats["histogram"]["edges"], stats["histogram"]["counts"]
    for low, high, count in zip(edges, edges[1:], counts):
        bar = "#" * round(BAR_WIDTH * count / max(counts))
        lines.append(f"  {low:8.0f} - {high:8.0f} | {bar:<{BAR_WIDTH}} {count:,}")
    return "\n".join(lines)
