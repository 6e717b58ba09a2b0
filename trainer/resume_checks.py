"""What a resume state is checked for before a run continues from it, and who may write it.

Three guards around the resume states of `trainer/checkpoint.py`:

- intact: every state ends with `manifest.json`, the size and sha256 of each of its files, written last; a state
  whose files differ from it (truncated by a full disk, overwritten) is reported and the one before it is used.
- the same run: a state keeps the settings that define its run (run_settings); `--from_resume 1` under other
  ones would continue from a position that means something else, so it is refused in one sentence.
- one writer: the run writing a resume dir holds an exclusive lock on its `lock` file (run_lock).
"""

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from trainer.distributed import log, rank_and_world_size

try:
    import fcntl  # POSIX file locks (Linux, macOS); Windows runs without the lock
except ImportError:
    fcntl = None

MANIFEST_FILE = "manifest.json"  # size and sha256 of every other file of a resume state; written last
LOCK_FILE = "lock"  # in a resume dir: flock-ed by the run that writes it, holds its pid
MIB = 1 << 20
RUN_FLAGS = ("batch_size", "max_seq_len", "epochs", "seed")  # must be equal to resume (accumulation: see below)
MODEL_SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "use_moe", "num_experts", "num_experts_per_tok",
               "moe_intermediate_size")
SHAPE_FLAGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "use_moe",
               "num_experts", "num_experts_per_tok")  # the MODEL_SHAPE keys that are flags of the same name


def file_digest(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(directory: Path) -> None:
    """Write `directory/manifest.json`: the size and sha256 of every file under `directory` (relative paths).

    Written last, just before the state is renamed into place, so it describes the files as they were saved.
    """
    files = {path.relative_to(directory).as_posix(): file_digest(path)
             for path in sorted(Path(directory).rglob("*")) if path.is_file()}
    (Path(directory) / MANIFEST_FILE).write_text(json.dumps(files, indent=1) + "\n")


def damage(directory: Path) -> str | None:
    """What is wrong with the files of a resume state, by its manifest: None when they are as they were saved.

    A state without a manifest was saved before manifests existed: it is taken as it is (and the log says so).
    """
    manifest = Path(directory) / MANIFEST_FILE
    if not manifest.is_file():
        log(f"{directory} has no {MANIFEST_FILE} (saved by an older version): its files are not checked")
        return None
    try:
        files = {name: (int(entry["bytes"]), str(entry["sha256"]))
                 for name, entry in json.loads(manifest.read_text()).items()}
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST_FILE} is unreadable"
    for name, (expected_bytes, expected_sha256) in files.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected_bytes:
            return f"{name} has {size:,} bytes instead of {expected_bytes:,}"
        if file_digest(path)["sha256"] != expected_sha256:
            return f"{name} does not match its sha256 checksum"
    return None


def newest_intact_state(resume_dir: Path, states: list[Path]) -> Path:
    """The newest of `states` whose files match their manifest; each damaged newer one is reported in the log.

    Raises:
        SystemExit: when none is intact, naming each state and what is wrong with it.
    """
    problems = []
    for directory in reversed(states):
        problem = damage(directory)
        if problem is None:
            return directory
        log(f"--from_resume 1: {directory} is damaged ({problem}); trying the state before it")
        problems.append(f"{directory.name}: {problem}")
    raise SystemExit(f"--from_resume 1: no intact resume state in {resume_dir} ({'; '.join(problems)}); restore "
                     "it from a copy or start over with --from_resume 0")


def data_fingerprint(path: str | Path) -> dict | None:
    """{"path", "bytes", "sha256_ends"}: a data file's size and the sha256 of its first and last MiB.

    Cheap for a corpus of many GB, and it changes when the file is replaced, edited at either end, or cut.
    None when `path` is not a file.
    """
    path = Path(path)
    if not path.is_file():
        return None
    digest, size = hashlib.sha256(), path.stat().st_size
    with open(path, "rb") as f:
        digest.update(f.read(MIB))
        if size > MIB:
            f.seek(max(MIB, size - MIB))
            digest.update(f.read(MIB))
    return {"path": str(path), "bytes": size, "sha256_ends": digest.hexdigest()}


def run_settings(args, config) -> dict:
    """The settings that define a run, kept in its resume states and checked by `--from_resume 1`.

    The saved data position counts batches of --batch_size in the order --seed gives to the blocks of
    --max_seq_len tokens of one data file, and the schedule spans --epochs of steps of --accumulation_steps
    micro-batches: under other values the same position points elsewhere and the schedule shifts. The model's
    shape must fit the saved tensors. Everything else (--max_steps, the intervals, --device, ...) may change.
    """
    return {**{flag: getattr(args, flag) for flag in RUN_FLAGS}, "accumulation_steps": args.accumulation_steps,
            "data": data_fingerprint(args.data_path) if args.data_path else None,
            "model": {key: getattr(config, key, None) for key in MODEL_SHAPE}, "from_weight": args.from_weight}


def check_same_run(saved: dict, run: dict, saved_world_size: int, world_size: int, directory: Path) -> None:
    """Refuse to resume the state in `directory` under other settings than its run's (run_settings).

    The number of processes may change (DDP, FSDP): the position is converted, as long as each step still reads
    as many micro-batches in all (--accumulation_steps x processes), so the step and its schedule stay the same.
    Raises:
        SystemExit: one sentence naming the first setting that differs, both values and what to pass.
    """

    def refuse(what: str, now, before, fix: str) -> SystemExit:
        return SystemExit(f"{what} {now} differs from the resumed run's {before} ({directory}); resume with {fix} "
                          "or start a new run with another --save_weight")

    for flag in RUN_FLAGS:
        if flag in saved and saved[flag] != run[flag]:
            raise refuse(f"--{flag}", run[flag], saved[flag], f"--{flag} {saved[flag]}")
    if "accumulation_steps" in saved:
        before, now = saved["accumulation_steps"], run["accumulation_steps"]
        if saved_world_size == world_size and before != now:
            raise refuse("--accumulation_steps", now, before, f"--accumulation_steps {before}")
        if before * saved_world_size != now * world_size:
            per_process, remainder = divmod(before * saved_world_size, world_size)
            fix = f"--accumulation_steps {per_process}" if per_process and not remainder else (
                f"{saved_world_size} processes")
            raise refuse("--accumulation_steps x processes", f"{now} x {world_size}",
                         f"{before} x {saved_world_size}", fix)
    data_before, data_now = saved.get("data"), run["data"]
    if data_before and data_now and (data_before["bytes"], data_before["sha256_ends"]) != (
            data_now["bytes"], data_now["sha256_ends"]):
        raise refuse("--data_path", f"{data_now['path']} ({data_now['bytes']:,} bytes)",
                     f"{data_before['path']} ({data_before['bytes']:,} bytes)", "that run's data file")
    for key, before in saved.get("model", {}).items():
        now = run["model"].get(key)
        if now != before:
            before, now = (int(before), int(now)) if isinstance(before, bool) else (before, now)
            if key in SHAPE_FLAGS and run["from_weight"] == "none":
                raise refuse(f"--{key}", now, before, f"--{key} {before}")
            raise refuse(f"the model's {key}", now, before, "that run's model (--from_weight and shape flags)")


@contextmanager
def run_lock(resume_dir: Path):
    """While inside, hold an exclusive lock on `<resume_dir>/lock` (rank 0), so two runs never write one name.

    The lock (flock) ends with the process, however it ends, so a killed run leaves no stale lock behind.
    Raises:
        SystemExit: when another process holds it, naming its pid.
    """
    if fcntl is None or rank_and_world_size()[0] != 0:
        yield
        return
    resume_dir = Path(resume_dir)
    resume_dir.mkdir(parents=True, exist_ok=True)
    with open(resume_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise SystemExit(f"another run (pid {holder}) is writing {resume_dir}; wait for it to end or stop it, "
                             "or give this run another --save_weight") from None
        f.truncate(0)  # "a+" appends, so the pid is the whole content
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
