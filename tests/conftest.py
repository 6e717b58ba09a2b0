"""Fixtures shared by the test files."""

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "dataset" / "data"


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    """The first lines of each shipped jsonl file: real text, few enough for runs of a few seconds."""
    directory = tmp_path_factory.mktemp("data")
    files = {}
    for name, lines in {"pretrain": 12, "pretrain_test": 4, "sft": 24, "sft_test": 8}.items():
        files[name] = directory / f"{name}.jsonl"
        files[name].write_text("".join((DATA / f"{name}.jsonl").read_text().splitlines(keepends=True)[:lines]))
    return files
