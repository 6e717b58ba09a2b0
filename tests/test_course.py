"""The course in docs/learn/ runs as written: every page has its five steps and its completion criteria, and every
command of its "## 1. Run" and "## 4. Break it" blocks runs from the repository root with the page's tiny flags.

    python -m pytest -q tests/test_course.py                        # every page, in page order (a few minutes)
    python -m pytest -q tests/test_course.py -k "05_pretraining"    # one page: the earlier pages' commands run first

A page is docs/learn/NN_slug.md (pages in the order of NN, then debugging.md). Under "## 1. Run" and
"## 4. Break it", each ```bash block holds one command per line (lines starting with # are comments) and is
followed by exactly one line

    <!-- tiny: FLAGS -->                  run each command with FLAGS appended (argparse keeps a repeated flag's
                                          last value, so FLAGS override the page's); may be empty
    <!-- tiny: expect-fail FLAGS -->      the same, and the command must exit non-zero with a message, not a
                                          traceback (a "Break it" that shows a refusal)
    <!-- tiny: skip (reason) -->          not run, for the reason given (rare)

`{tmp}` in FLAGS (and `out/learn` anywhere in a command, which the pages write to) is one temporary directory
shared by the whole course run: the tiny runs never touch the repository's out/, and a later page finds there the
checkpoints an earlier page's tiny run saved (05's out/learn/pretrain_256, 06's out/learn/full_sft_256). `python`
is the Python running the tests; every command gets OMP_NUM_THREADS=1 and a timeout.

The layout test of each page checks its title (`# NN. Title`), the six headings in order, a command under
"## 1. Run", a bullet under "## Completion criteria", that every repository .py file it names exists, and that
each command line needs no shell (no &&, pipes, redirections, continuations or variables).
"""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LEARN = REPO_ROOT / "docs" / "learn"
SECTIONS = ("## 1. Run", "## 2. Expected output", "## 3. Read", "## 4. Break it", "## 5. Check",
            "## Completion criteria")
RUN_SECTIONS = ("## 1. Run", "## 4. Break it")  # the sections whose bash blocks the test runs
COURSE_OUTPUT = "out/learn"  # where the pages' commands write; replaced by the session's temporary directory
TIMEOUT_S = 300  # per tiny command: far above what any takes (seconds), so only a hang ends one
TINY = re.compile(r"<!--\s*tiny:(.*?)-->")
PAGE_NAME = re.compile(r"(\d\d)_[a-z0-9_]+\.md")
SHELL_OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>", "2>&1"}
REPO_PY_PATH = re.compile(r"`((?:model|dataset|trainer|scripts|eval|bench|tests)/[\w/.-]+\.py)")


@dataclass
class Command:
    """One command line of a page's Run or Break it block, with its block's tiny line."""
    page: str       # the file's stem, e.g. "05_pretraining"
    section: str    # "run" or "break"
    number: int     # 1-based, per page and section
    line: str       # the command as the page writes it
    flags: str      # the tiny FLAGS ("" when none)
    expect_fail: bool
    skip: str | None  # the reason, for a "skip (reason)" tiny line

    @property
    def id(self) -> str:
        return f"{self.page}:{self.section}:{self.number}"


def course_pages() -> list[Path]:
    """docs/learn/NN_*.md in the order of NN, then debugging.md (when there)."""
    pages = sorted((p for p in LEARN.glob("*.md") if PAGE_NAME.fullmatch(p.name)), key=lambda p: p.name)
    debugging = LEARN / "debugging.md"
    return pages + ([debugging] if debugging.is_file() else [])


def parse_page(name: str, text: str) -> tuple[list[Command], list[str]]:
    """The commands of a page's Run and Break it blocks, and what is wrong with the page's layout.

    Returns:
        (commands in page order, problems: one sentence each naming the page and the line; empty when the page
        follows the course format).
    """
    lines = text.splitlines()
    problems, commands, headings = [], [], []
    counters = {"run": 0, "break": 0}
    section, i = None, 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("## "):
            section = line
            headings.append(line)
        if not line.startswith("```"):
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            problems.append(f"{name}:{i + 1}: code block never closed")
            break
        if line == "```bash" and section in RUN_SECTIONS:
            kind = "run" if section == "## 1. Run" else "break"
            commands += parse_block(name, lines, i, end, kind, counters, problems)
        elif line in ("```sh", "```shell", "```console", "```zsh") and section in RUN_SECTIONS:
            problems.append(f"{name}:{i + 1}: commands under {section} go in ```bash blocks (this one would not run)")
        i = end + 1

    missing = [s for s in SECTIONS if s not in headings]
    if missing:
        problems.append(f"{name}: missing section(s) {missing}")
    elif [h for h in headings if h in SECTIONS] != list(SECTIONS):
        problems.append(f"{name}: sections out of order; expected {list(SECTIONS)}")
    number = PAGE_NAME.fullmatch(name)
    if number and not (lines and re.match(rf"# {number.group(1)}\. \S", lines[0])):
        problems.append(f"{name}:1: the title must read '# {number.group(1)}. Title'")
    if "## 1. Run" in headings and not counters["run"]:
        problems.append(f"{name}: '## 1. Run' has no command in a ```bash block")
    criteria = text.split("## Completion criteria", 1)[1] if "## Completion criteria" in headings else ""
    if not re.search(r"^\s*[-*] \S", criteria, re.MULTILINE):
        problems.append(f"{name}: '## Completion criteria' has no bullet")
    for path in REPO_PY_PATH.findall(text):
        if not (REPO_ROOT / path).is_file():
            problems.append(f"{name}: names {path}, which does not exist")
    return commands, problems


def parse_block(name: str, lines: list[str], start: int, end: int, kind: str, counters: dict,
                problems: list[str]) -> list[Command]:
    """The commands of the bash block lines[start..end] (its fences) and its tiny line; problems are added."""
    after = next((j for j in range(end + 1, len(lines)) if lines[j].strip()), None)
    tiny = TINY.fullmatch(lines[after].strip()) if after is not None else None
    if tiny is None:
        problems.append(f"{name}:{end + 1}: the bash block ending here has no <!-- tiny: ... --> line right after it")
        return []
    second = next((j for j in range(after + 1, len(lines)) if lines[j].strip()), None)
    if second is not None and TINY.fullmatch(lines[second].strip()):
        problems.append(f"{name}:{second + 1}: a second tiny line; a block takes exactly one")
    flags, expect_fail, skip = parse_tiny(tiny.group(1).strip(), f"{name}:{after + 1}", problems)
    commands = []
    for k in range(start + 1, end):
        line = lines[k].strip()
        if not line or line.startswith("#"):
            continue
        if shell_syntax(line):
            problems.append(f"{name}:{k + 1}: one plain command per line (no &&, pipes, ;, redirections, \\ "
                            f"continuations or shell variables): {line}")
        counters[kind] += 1
        commands.append(Command(name.removesuffix(".md"), kind, counters[kind], line, flags, expect_fail, skip))
    return commands


def shell_syntax(line: str) -> bool:
    """Whether a command line needs a shell: operators outside quotes, a continuation, a variable, backticks."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    try:
        words = list(lexer)
    except ValueError:  # an unclosed quote
        return True
    return bool(SHELL_OPERATORS & set(words)) or line.endswith("\\") or bool(re.search(r"\$[A-Za-z_{(]|`", line))


def parse_tiny(content: str, where: str, problems: list[str]) -> tuple[str, bool, str | None]:
    """(flags, expect_fail, skip reason) of a tiny line's content; a bad one adds to `problems`."""
    if content.startswith("skip"):
        reason = re.fullmatch(r"skip\s*\((.*\S.*)\)", content)
        if reason is None:
            problems.append(f"{where}: 'skip' needs a reason: <!-- tiny: skip (why it cannot run in a test) -->")
            return "", False, "no reason given"
        return "", False, reason.group(1).strip()
    if content.startswith("expect-fail"):
        return content.removeprefix("expect-fail").strip(), True, None
    return content, False, None


def load_course() -> tuple[list[Command], dict[str, list[str]]]:
    """Every page's commands in page order, and each page's problems."""
    commands, problems = [], {}
    for page in course_pages():
        page_commands, problems[page.name] = parse_page(page.name, page.read_text(encoding="utf-8"))
        commands += page_commands
    return commands, problems


COMMANDS, PROBLEMS = load_course()


def argv_of(command: Command, tmp: Path) -> list[str]:
    """The command line as run: the page's words, the tiny flags appended, out/learn and {tmp} made the
    temporary directory, `python` this Python."""
    words = shlex.split(command.line) + shlex.split(command.flags.replace("{tmp}", str(tmp)))
    course_dir = re.compile(rf"(^|=){re.escape(COURSE_OUTPUT)}(?=/|$)")
    words = [course_dir.sub(lambda m: m.group(1) + str(tmp), word.replace("{tmp}", str(tmp))) for word in words]
    if words[0] == "python":
        words[0] = sys.executable
    return words


class CourseRun:
    """Runs the course's commands in page order, each once, keeping their results: a test of a later command
    first runs every command before it (its checkpoints may be needed), so one page can be tested alone."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.results: dict[str, subprocess.CompletedProcess | str] = {}

    def result(self, command: Command) -> subprocess.CompletedProcess | str:
        for earlier in COMMANDS[:COMMANDS.index(command) + 1]:
            if earlier.id not in self.results:
                self.results[earlier.id] = self.run(earlier)
        return self.results[command.id]

    def run(self, command: Command) -> subprocess.CompletedProcess | str:
        if command.skip is not None:
            return f"skipped: {command.skip}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            return subprocess.run(argv_of(command, self.tmp), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                  timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as error:
            return f"timed out after {TIMEOUT_S} s; stderr tail:\n{(error.stderr or b'')[-3000:]!r}"

    def failed_before(self, command: Command) -> list[str]:
        """The ids of earlier commands that did not end as their page says (timed out included)."""
        return [c.id for c in COMMANDS[:COMMANDS.index(command)] if c.skip is None and not ended_as_said(c, self.results[c.id])]


def ended_as_said(command: Command, result: subprocess.CompletedProcess | str) -> bool:
    """Exit 0, or non-zero for an expect-fail command; a timeout never."""
    return isinstance(result, subprocess.CompletedProcess) and (result.returncode != 0) == command.expect_fail


@pytest.fixture(scope="session")
def course(tmp_path_factory) -> CourseRun:
    return CourseRun(tmp_path_factory.mktemp("course"))


# ----------------------------------------------------------------------------------------------------------------
# The pages


def test_the_course_has_its_index_and_numbered_pages():
    assert (LEARN / "README.md").is_file(), "docs/learn/README.md, the course's index, is missing"
    numbers = [int(PAGE_NAME.fullmatch(p.name).group(1)) for p in course_pages() if PAGE_NAME.fullmatch(p.name)]
    assert numbers, "no docs/learn/NN_*.md page"
    assert numbers == list(range(1, len(numbers) + 1)), f"page numbers must run 01, 02, ... without gaps: {numbers}"


def test_the_index_links_every_page():
    index = (LEARN / "README.md").read_text(encoding="utf-8")
    unlinked = [p.name for p in course_pages() if f"({p.name})" not in index]
    assert not unlinked, f"docs/learn/README.md does not link {unlinked}"


@pytest.mark.parametrize("page", list(PROBLEMS), ids=[name.removesuffix(".md") for name in PROBLEMS])
def test_page_follows_the_course_format(page):
    assert not PROBLEMS[page], "\n".join(PROBLEMS[page])


def test_a_bash_block_without_its_tiny_line_is_refused():
    page = "# 01. T\n## 1. Run\n```bash\npython a.py\n```\n\nSome text.\n"
    _, problems = parse_page("01_t.md", page)
    assert any("no <!-- tiny: ... --> line" in p for p in problems), problems


def test_a_skip_without_a_reason_is_refused_and_one_with_a_reason_is_kept():
    page = "# 01. T\n## 1. Run\n```bash\npython a.py\n```\n<!-- tiny: skip -->\n" \
           "## 4. Break it\n```bash\npython b.py\n```\n<!-- tiny: skip (needs a GPU) -->\n"
    commands, problems = parse_page("01_t.md", page)
    assert [p for p in problems if "'skip' needs a reason" in p] == ["01_t.md:6: 'skip' needs a reason: <!-- tiny: "
                                                                    "skip (why it cannot run in a test) -->"]
    assert commands[1].skip == "needs a GPU"


def test_shell_syntax_on_a_command_line_is_refused():
    page = "# 01. T\n## 1. Run\n```bash\npython a.py && python b.py\nOUT=x python c.py --data $OUT\n```\n" \
           "<!-- tiny: -->\n"
    _, problems = parse_page("01_t.md", page)
    assert sum("one plain command per line" in p for p in problems) == 2, problems


def test_tiny_flags_are_appended_and_out_learn_is_the_temporary_directory(tmp_path):
    command = Command("05_x", "run", 1, "python trainer/train_pretrain.py --save_dir out/learn --max_steps 300",
                      "--max_steps 2 --eval_data_path {tmp}/a.jsonl", False, None)
    assert argv_of(command, tmp_path) == [sys.executable, "trainer/train_pretrain.py", "--save_dir", str(tmp_path),
                                          "--max_steps", "300", "--max_steps", "2", "--eval_data_path",
                                          f"{tmp_path}/a.jsonl"]


# ----------------------------------------------------------------------------------------------------------------
# The commands, tiny


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_course_command_runs(course, command):
    result = course.result(command)
    if command.skip is not None:
        pytest.skip(f"{command.id}: {command.skip}")
    shown = shlex.join(argv_of(command, course.tmp))
    earlier = course.failed_before(command)
    note = f"\n(earlier commands that failed: {', '.join(earlier)})" if earlier else ""
    if isinstance(result, str):
        pytest.fail(f"{command.id}: {shown}\n{result}{note}")
    tail = f"--- stderr (last lines) ---\n{result.stderr[-3000:]}\n--- stdout (last lines) ---\n{result.stdout[-1500:]}"
    if command.expect_fail:
        assert result.returncode != 0, f"{command.id} should fail (expect-fail) but exited 0: {shown}\n{tail}"
        assert "Traceback" not in result.stderr, f"{command.id} failed with a traceback, not a message: {shown}\n{tail}"
    else:
        assert result.returncode == 0, f"{command.id} exited {result.returncode}: {shown}\n{tail}{note}"
