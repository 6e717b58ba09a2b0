"""The documentation's links hold: every relative Markdown link points at a file that exists, and every
`#anchor` at a heading of that file, by GitHub's rule. The README stays a front door (under 400 lines) and keeps
the test command that `.ci/run` runs."""

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
README_MAX_LINES = 400
TEST_COMMAND = 'pip install -e ".[dev]" && python -m pytest -q'

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def documentation_files() -> list[Path]:
    """The Markdown files whose links this test holds to: the README, docs/, and the pages they link to."""
    files = [README, *sorted((REPO_ROOT / "docs").rglob("*.md")), REPO_ROOT / "bench" / "README.md",
             REPO_ROOT / "eval" / "REPORT.md", REPO_ROOT / "dataset" / "data" / "ATTRIBUTION.md"]
    return [path for path in files if path.is_file()]


def prose_lines(text: str):
    """(line number, line) of every line outside fenced code blocks."""
    in_fence = False
    for number, line in enumerate(text.split("\n"), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline, image and reference-style link outside code."""
    found = []
    for number, line in prose_lines(text):
        line = CODE_SPAN.sub("", line)
        found += [(number, target) for target in INLINE_LINK.findall(line)]
        reference = REFERENCE_LINK.match(line)
        if reference:
            found.append((number, reference.group(1)))
    return found


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, punctuation dropped (letters, digits, spaces,
    '-' and '_' stay), each space a '-'. Inline code and emphasis marks go; a link keeps its text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "").lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def broken_links(path: Path) -> list[str]:
    """One sentence per relative link of `path` that does not resolve."""
    problems = []
    for number, target in links(path.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO_ROOT)}:{number}: ({target})"
        if not destination.exists():
            problems.append(f"{where} names {file_part}, which does not exist")
        elif anchor:
            if destination.suffix != ".md" or not destination.is_file():
                problems.append(f"{where} has an anchor, but {file_part} is not a Markdown file")
            elif anchor not in anchors(destination):
                problems.append(f"{where}: no heading of {destination.relative_to(REPO_ROOT)} has the anchor #{anchor}")
    return problems


def test_github_anchor_rule_on_hand_worked_headings():
    assert github_anchor("The two commands") == "the-two-commands"
    assert github_anchor("0. Tokenizer (optional: one is shipped)") == "0-tokenizer-optional-one-is-shipped"
    assert github_anchor("8. Export: stock transformers, merged LoRA, GGUF for llama.cpp and ollama; quantization") \
        == "8-export-stock-transformers-merged-lora-gguf-for-llamacpp-and-ollama-quantization"
    assert github_anchor("From a raw `.txt` book to a pretraining run") == "from-a-raw-txt-book-to-a-pretraining-run"
    assert github_anchor("What the defaults give (2026-12-01, 2-vCPU AMD EPYC Zen 4 with AVX512-BF16)") \
        == "what-the-defaults-give-2026-12-01-2-vcpu-amd-epyc-zen-4-with-avx512-bf16"


def test_links_skip_code_and_find_images_and_references():
    text = "\n".join([
        "See [a](docs/a.md#x) and ![b](fig.png), not `[c](c.md)`.",
        "```", "[d](d.md)", "```",
        "[e]: e.md",
        "[f](https://example.com)",
    ])
    assert [target for _, target in links(text)] == ["docs/a.md#x", "fig.png", "e.md", "https://example.com"]


@pytest.mark.parametrize("path", documentation_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(path):
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; reference material belongs in docs/"


def test_readme_holds_the_test_command_that_ci_runs():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    assert TEST_COMMAND in [block.strip() for block in blocks]
    assert "python -m pytest -q" in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
