"""The documents of the `arc_easy_local` lm-evaluation-harness task: ARC questions from a local jsonl file.

lm-evaluation-harness calls `load_arc` through the `custom_dataset: !function arc_data.load_arc` line of
`arc_easy_local.yaml`, with the task's metadata as keyword arguments (the `--metadata` of the lm_eval command
line merged with its `--model_args`), so `--metadata data_file=PATH` picks another file without editing the YAML.
"""

from pathlib import Path

import datasets

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_FILE = REPO_ROOT / "eval" / "data" / "arc_easy_dev.jsonl"


def load_arc(data_file: str | None = None, **metadata) -> datasets.DatasetDict:
    """Read ARC multiple-choice questions from jsonl into a {"test": Dataset} for lm-evaluation-harness.

    Each line is {"question": str, "choices": [str, ...], "answer": index of the right choice (0-based)}, the
    format of the ARC slices under eval/data/ (from AI2's ARC dataset, Clark et al. 2018); other keys are kept
    and ignored.
    Args:
        data_file: the jsonl file; relative paths are relative to the current directory; default
            eval/data/arc_easy_dev.jsonl of this repository.
        metadata: the rest of the task metadata (version, model_args, ...), not used here.
    Raises:
        FileNotFoundError: when data_file does not exist, naming it and the flag that changes it.
    """
    path = Path(data_file) if data_file else DEFAULT_DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"ARC data file {path} not found; pass --metadata data_file=PATH "
                                '(jsonl lines {"question", "choices", "answer"})')
    return datasets.load_dataset("json", data_files={"test": str(path)})
