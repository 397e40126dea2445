"""Output directories that appear only when complete.

A run works in `OUT.partial/` (checkpoints, metrics) and renames it to `OUT` at the very end,
after the model, tokenizer, resolved config and model card are written, so a directory named
OUT is always a finished, loadable result and a Makefile target can depend on it.

The output path is checked before any slow work (`check_output`), and the run then holds an
exclusive lock on `OUT.lock` until it ends, so two runs on one OUT cannot interleave their
files; the kernel drops the lock of a killed run, so a stale lock file is simply taken over.
Replacing an old OUT (--overwrite) moves it aside to `OUT.rlkit-old` before the new one is renamed
in, so a kill at any moment leaves either result whole, and the next run puts a stranded
`OUT.rlkit-old` back.

A write the disk refuses (full, over quota, read-only, failing) ends the run through `writing`:
one line naming what could not be written, why, and what to do, with `--resume` and the newest
complete checkpoint when one exists; OUT.partial is never renamed to OUT after such a failure.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from rlkit import __version__
from rlkit.console import is_main_process, warn
from rlkit.errors import InputError, RlkitError, RunError
from rlkit.performance import switches

CONFIG_FILE = "rlkit_config.yaml"
METRICS_FILE = "metrics.jsonl"


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def aside_dir(output: Path) -> Path:
    """Where --overwrite moves the old OUT while the new one is renamed in (a name no user picks,
    since a run that finds it without OUT moves it back)."""
    return output.with_name(output.name + ".rlkit-old")


# output (absolute) -> (fd of its held lock file, dirs this process created to hold it)
_held: dict[Path, tuple[int, list[Path]]] = {}


def check_creatable(out: Path, flag: str = "-o") -> None:
    """`out` must be (or become) a directory: not a file, not under one, in a place that can be written."""
    if out.exists() and not out.is_dir():
        raise InputError(
            f"{flag} {out}: is a file, not a directory; give a directory path (--overwrite replaces only a directory)"
        )
    ancestor = out.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(
            f"{flag} {out}: {ancestor} is a file, so no directory can be created under it; choose another path"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {out}: cannot be created, {ancestor} is not writable; choose another path")


def _make_parents(out: Path) -> list[Path]:
    """Create OUT's missing parents (the lock file lives beside OUT); return them, deepest first."""
    created: list[Path] = []
    parent = out.absolute().parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for directory in reversed(created):
        directory.mkdir()
    return created


def acquire_output_lock(out: Path) -> None:
    """Hold `OUT.lock` exclusively for the rest of this run (exit 2 if another live run holds it).

    flock belongs to the open file, so the kernel releases a killed run's lock and its leftover
    file is taken over. The file is unlinked on release; a run that opened it just before then
    holds a lock on a file no longer at that path, so it checks the inode and tries again.
    """
    key = out.absolute()
    if key in _held or not is_main_process():  # already ours, or another rank's to hold
        return
    path = lock_path(out)
    try:
        created = _make_parents(out)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise InputError(
                    f"-o {out}: another run (pid {holder}) is writing it and holds {path}; "
                    "wait for it to end or choose another -o"
                )
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
    except OSError as err:
        raise InputError(f"-o {out}: cannot be created ({err.strerror}: {err.filename}); choose another path")
    stale = os.read(fd, 32).decode(errors="replace").strip()
    if stale:
        warn(f"{path}: left by a run (pid {stale}) that no longer runs; taking it over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    if not _held:
        atexit.register(release_output_locks)
    _held[key] = (fd, created)


def release_output_lock(out: Path) -> None:
    """Unlink and release OUT's lock, and remove the parents made for it if the run left them empty."""
    held = _held.pop(out.absolute(), None)
    if held is None:
        return
    fd, created = held
    try:
        os.unlink(lock_path(out))
    except OSError:  # gone already, or on a disk that turned read-only: the lock goes with the fd
        pass
    os.close(fd)
    for directory in created:
        try:
            directory.rmdir()
        except OSError:  # the run wrote OUT (or something else) there
            break


def release_output_locks() -> None:
    """Release every lock this process holds: at the end of a command, whatever its outcome."""
    for out in list(_held):
        release_output_lock(out)


def _recover_aside(out: Path) -> None:
    """Finish a --overwrite replacement a kill interrupted: put the old OUT back, or drop it."""
    aside = aside_dir(out)
    if not aside.is_dir() or not is_main_process():  # one process moves it (the one holding the lock)
        return
    if out.exists():
        shutil.rmtree(aside)  # killed after the new OUT was in place
    else:
        aside.rename(out)
        warn(f"{out}: restored from {aside}, where a run killed while replacing it had moved it")


def check_output(output: str | None, overwrite: bool, resume: bool) -> Path:
    """Refuse a path that cannot become OUT, clobbering a finished result or silently restarting an
    interrupted one (exit 2), before any slow work; then hold OUT's lock for the run."""
    if not output:
        raise InputError("missing -o/--output DIR")
    out = Path(output)
    check_creatable(out)
    acquire_output_lock(out)
    try:
        _recover_aside(out)
        if out.exists() and not overwrite:
            raise InputError(f"{out} already exists; pass --overwrite to replace it")
        partial = partial_dir(out)
        if partial.exists() and not resume and not overwrite and any((partial / "checkpoints").glob("step-*")):
            raise InputError(
                f"{partial} holds an interrupted run; pass --resume to continue it or --overwrite to start over"
            )
    except InputError:
        release_output_lock(out)
        raise
    return out


def open_run_dir(output: Path, resume: bool) -> Path:
    """Create (or reuse, with --resume) the working directory of a run."""
    partial = partial_dir(output)
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def checkpoints_in(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (one being written, `step-N.incomplete`, is not
    among them). Here rather than in the engine so that a failed write can name the newest one
    without loading torch."""
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resume_hint(run_dir: Path | None) -> str:
    """How to go on after a run stopped early: --resume from its newest complete checkpoint, if any."""
    kept = checkpoints_in(run_dir) if run_dir is not None else []
    return f"run again with --resume (the last complete checkpoint is {kept[-1]})" if kept else "run again"


# A disk that refuses a write, and what the user can do about each way it refuses.
_REMEDIES = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space within your disk quota",
    errno.EROFS: "make the file system writable",
    errno.EACCES: "make the directory writable",
    errno.EIO: "check the disk",
}
DISK_ERRNOS = frozenset(_REMEDIES)
_BY_STRERROR = {os.strerror(code): code for code in _REMEDIES}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # safetensors: "... No space left on device (os error 28)"
_TORCH_STRERROR = re.compile(r"strerror: ([^\n]+?)\.?$", re.M)  # torch's writer: "open file failed with strerror: ..."
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")  # torch's writer after a short write: no errno at all
_NEARLY_FULL = 1 << 20


def _errno_in(err: BaseException) -> int | None:
    """The disk errno `err` itself carries, as an OSError's errno or in the words of safetensors or torch."""
    if isinstance(err, OSError):
        return err.errno if err.errno in DISK_ERRNOS else None
    text = str(err)
    rust = _RUST_OS_ERROR.search(text)
    if rust and int(rust.group(1)) in DISK_ERRNOS:
        return int(rust.group(1))
    named = _TORCH_STRERROR.search(text)
    return _BY_STRERROR.get(named.group(1).strip()) if named else None


def _nearly_full(path: Path) -> bool:
    """Whether the file system holding `path` (or its nearest existing ancestor) has under 1 MiB free."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL


def disk_fault(err: BaseException, path: Path | None = None) -> tuple[str, str] | None:
    """(reason, remedy) when `err`, or an exception that caused it, is the disk refusing a write to
    `path`; None for any other failure, which is a bug to show in full.

    A torch writer whose write came up short keeps no errno: that is a full disk when the disk is
    (nearly) full now, since the torn file still holds the space it took; otherwise the cause is
    unknown, and the reason says so.
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        code = _errno_in(cause)
        if code is not None:
            return os.strerror(code), _REMEDIES[code]
        if isinstance(cause, RuntimeError) and any(words in str(cause) for words in _TORCH_SHORT_WRITE):
            if path is not None and _nearly_full(path):
                return os.strerror(errno.ENOSPC), _REMEDIES[errno.ENOSPC]
            return "a write came up short", "check the free space, your disk quota and the disk"
        cause = cause.__cause__ or cause.__context__
    return None


def write_failure(
    err: BaseException, target: str, path: Path | None = None, run_dir: Path | None = None
) -> RunError | None:
    """The one-line error for a refused write of `target` ("the checkpoint runs/x.partial/..."), or
    None when `err` is not the disk refusing it."""
    fault = disk_fault(err, path)
    if fault is None:
        return None
    reason, remedy = fault
    return RunError(f"could not write {target}: {reason}; {remedy} and {resume_hint(run_dir)}")


@contextmanager
def writing(what: str, path: Path, run_dir: Path | None = None) -> Iterator[None]:
    """Around each write of a run: a full, read-only or failing disk ends the command with one line
    naming `what` and `path`, the reason, and what to do (with `--resume` and the newest complete
    checkpoint of `run_dir` when there is one), instead of whatever the writer raised.

    The run then stops before OUT.partial is renamed, so OUT never looks complete; a half-written
    file stays inside OUT.partial. Other exceptions pass through unchanged.
    """
    try:
        yield
    except RlkitError:
        raise
    except Exception as err:
        failure = write_failure(err, f"{what} {path}", path, run_dir)
        if failure is None:
            raise
        raise failure from err


def write_config(run_dir: Path, command: str, config: dict[str, Any]) -> None:
    """The resolved options, and the performance switches the environment set (rlkit.performance),
    so the file describes the run that wrote it. `--config` skips both `command` and `performance`."""
    record, path = {"command": command, **config, "performance": switches().record()}, run_dir / CONFIG_FILE
    with writing("the resolved config", path, run_dir):
        path.write_text(yaml.safe_dump(record, sort_keys=False))


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def write_model_card(
    run_dir: Path, *, command: str, base_model: str, data: list[str], metrics: dict[str, Any], extra: str = ""
) -> None:
    """A README.md naming the base model, the data, the exact command and the final metrics."""
    invocation = " ".join(shlex.quote(a) for a in ["rlkit", *sys.argv[1:]]) if sys.argv else f"rlkit {command}"
    front = {"base_model": base_model, "library_name": "transformers", "tags": ["rlkit", command]}
    card = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {run_dir.name.removesuffix(".partial")}

Trained with `rlkit {command}` (rlkit {__version__}).

- **Base model:** `{base_model}`
- **Data:** {", ".join(f"`{d}`" for d in data)}
- **Command:** `{invocation}`
- **Performance settings:** {", ".join(f"`{k}={int(v) if isinstance(v, bool) else v}`" for k, v in switches().record().items())}

{extra}
## Final metrics

{_metrics_table(metrics)}

The resolved configuration is in `{CONFIG_FILE}` and the per-step metrics in `{METRICS_FILE}`.
"""
    with writing("the model card", run_dir / "README.md", run_dir):
        (run_dir / "README.md").write_text(card)
    with writing("the final metrics", run_dir / "final_metrics.json", run_dir):
        (run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def finalize(run_dir: Path, output: Path, keep_checkpoints: bool = False) -> Path:
    """Drop checkpoints and rename OUT.partial to OUT, then release OUT's lock.

    An old OUT (--overwrite) is renamed aside first and removed only once the new one is in
    place, so no moment exists at which a kill loses both.
    """
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if output.exists():
        aside = aside_dir(output)
        if aside.exists():
            shutil.rmtree(aside)
        output.rename(aside)
        run_dir.rename(output)
        shutil.rmtree(aside)
    else:
        run_dir.rename(output)
    release_output_lock(output)
    return output
