"""Atomic writes: whole or nothing, and the permissions a plain write would give."""

from __future__ import annotations

import os
import stat

import pytest

from lmlab.fileio import atomic_directory, atomic_write_text


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_folders_get_the_umask_permissions_not_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.json") == 0o644
    assert mode(tmp_path / "out") == 0o755


def test_a_failure_leaves_the_old_content_and_no_temporary_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(FileExistsError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "v2").write_text("2")
    with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "v3").write_text("3")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]
    assert (tmp_path / "a.txt").read_text() == "old"


def test_a_failed_atomic_directory_leaves_no_parent_folders(tmp_path):
    target = tmp_path / "new" / "sub" / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("failed while building")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # folders that existed before stay
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "kept" / "a" / "out"):
        raise RuntimeError("failed")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any(
        (tmp_path / "kept").iterdir()
    )
