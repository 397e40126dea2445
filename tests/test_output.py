"""The output path: checked before any work, locked while a run writes it, replaced without a gap.

In process where possible; the lock holder and the kill during --overwrite are separate
processes, because flock and a kill are about processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlkit.errors import InputError
from rlkit.output import aside_dir, check_output, finalize, lock_path, open_run_dir, partial_dir, release_output_locks

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _refused(output: Path, needle: str, overwrite: bool = False) -> str:
    with pytest.raises(InputError) as err:
        check_output(str(output), overwrite, resume=False)
    assert needle in str(err.value), str(err.value)
    return str(err.value)


def test_a_file_is_refused_as_output_even_with_overwrite(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"weights")
    before = _snapshot(tmp_path)
    for overwrite in (False, True):
        _refused(target, "is a file, not a directory", overwrite)
    assert _snapshot(tmp_path) == before


def test_a_path_under_a_file_or_unwritable_is_refused_and_nothing_is_created(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    before = _snapshot(tmp_path)
    _refused(tmp_path / "notes.txt" / "out", "notes.txt is a file")
    _refused(tmp_path / "notes.txt" / "deeper" / "out", "notes.txt is a file")
    _refused(Path("/proc/rlkit-no-such-dir/out"), "cannot be created")  # refused even as root
    assert _snapshot(tmp_path) == before


def test_missing_parents_are_made_for_the_run_and_removed_when_it_is_refused(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    check_output(str(out), overwrite=False, resume=False)
    assert lock_path(out).is_file() and lock_path(out).read_text().strip() == str(os.getpid())
    release_output_locks()
    assert list(tmp_path.iterdir()) == []


def test_refusal_of_an_existing_output_releases_the_lock(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _refused(out, "--overwrite")
    assert not lock_path(out).exists()
    assert _snapshot(tmp_path) == {"out": None, "out/keep.txt": b"precious"}


HOLDER = """
import sys, time
from rlkit.output import check_output
check_output(sys.argv[1], False, False)
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_a_locked_output_is_refused(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        message = _refused(out, "another run")
        assert f"pid {holder.pid}" in message and str(lock_path(out)) in message
    finally:
        holder.kill()
        holder.wait()
    # killed: the kernel dropped its lock, and its leftover lock file is taken over
    assert lock_path(out).exists()
    assert check_output(str(out), False, False) == out
    assert lock_path(out).read_text().strip() == str(os.getpid())


def test_a_stale_lock_file_is_taken_over_with_a_warning(tmp_path, capsys):
    out = tmp_path / "out"
    lock_path(out).write_text("999999\n")
    check_output(str(out), False, False)
    assert "pid 999999" in capsys.readouterr().err
    assert lock_path(out).read_text().strip() == str(os.getpid())


def _finished(output: Path, marker: str) -> None:
    run_dir = open_run_dir(output, resume=False)
    (run_dir / "weights.bin").write_text(marker)


def test_overwrite_replaces_the_old_output_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_text("old")
    check_output(str(out), overwrite=True, resume=False)
    _finished(out, "new")
    finalize(partial_dir(out), out)
    assert (out / "weights.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILLED_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from rlkit.output import check_output, finalize, open_run_dir, partial_dir
out = Path(sys.argv[1])
check_output(str(out), True, False)
(open_run_dir(out, False) / "weights.bin").write_text("new")
real_rename = Path.rename
def rename_then_die(self, target):
    result = real_rename(self, target)
    os._exit(9)  # killed right after the first rename of finalize (the old OUT moved aside)
Path.rename = rename_then_die
finalize(partial_dir(out), out)
"""


def test_a_kill_between_the_overwrite_renames_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_text("old")
    (out / "README.md").write_text("old card")
    before = _snapshot(out)
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(out)], cwd=REPO)
    assert killed.returncode == 9
    assert not out.exists() and _snapshot(aside_dir(out)) == before  # the old result is whole, aside
    # the next run puts it back before anything else, and refuses to clobber it without --overwrite
    _refused(out, "already exists")
    assert _snapshot(out) == before and not aside_dir(out).exists()


def test_a_stranded_old_output_is_dropped_once_the_new_one_is_in_place(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_text("new")
    aside_dir(out).mkdir()
    (aside_dir(out) / "weights.bin").write_text("old")
    check_output(str(out), overwrite=True, resume=False)
    assert not aside_dir(out).exists() and (out / "weights.bin").read_text() == "new"


def test_the_lock_is_released_when_the_run_finishes(tmp_path):
    out = tmp_path / "out"
    check_output(str(out), False, False)
    _finished(out, "w")
    finalize(partial_dir(out), out)
    assert not lock_path(out).exists()
    holder = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from rlkit.output import check_output as c; c(sys.argv[1], True, False)",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert holder.returncode == 0, holder.stderr  # it would be refused while this process held the lock
