"""Atomic writes: every output and cache file or folder of the project goes through here.

`staged(target)` yields a hidden staging path next to `target` (a file with the target's suffix,
so encoders pick the same format, or a folder); when the block succeeds the staging path
replaces `target` in one rename, and on any error it is removed. So a crash, a full disk or bad
input leaves either what was there before or nothing, never half a video or half a checkpoint.
`write_files_atomic` makes several files appear together, or none of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


def _plain_permissions(path: Path) -> None:
    # Staging files are made private (like mkstemp's 0600); give the result the permissions a
    # plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _staging_path(target: Path, kind: str) -> Path:
    return target.parent / f".{target.stem}.{kind}-{uuid.uuid4().hex}{target.suffix}"


@contextlib.contextmanager
def staged(target: str | Path, *, folder: bool = False, overwrite: bool = True,
           complete: Callable[[Path], bool] | None = None,
           keep_complete: bool = False) -> Iterator[Path]:
    """A staging file (or folder) that replaces `target` when the block succeeds.

    `overwrite=False` refuses an existing target up front (FileExistsError). `complete`: a
    check that a target written by someone else is whole; when it holds after our rename
    failed, a concurrent writer published the same thing first and theirs is kept. With
    `keep_complete` a complete target is never replaced (a cache entry another process
    finished while we worked on the same one): ours is dropped.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists")
    if target.exists() and target.is_dir() != folder:
        raise FileExistsError(f"{target}: exists and is not a {'folder' if folder else 'file'}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging, trash = _staging_path(target, "staging"), _staging_path(target, "old")
    if folder:
        staging.mkdir()
    try:
        yield staging
        if keep_complete and complete is not None and complete(target):
            return  # someone else's finished copy of the same thing: theirs stays
        if not folder:
            _plain_permissions(staging)
        elif target.exists():  # a rename cannot replace a non-empty folder: move it aside
            os.replace(target, trash)
        try:
            os.replace(staging, target)
        except OSError:
            if complete is not None and complete(target):
                return  # a concurrent writer won with a whole copy: keep theirs
            if trash.exists() and not target.exists():
                os.replace(trash, target)  # put back what was there
            raise
    finally:
        for leftover in (staging, trash):
            if leftover.exists() or leftover.is_symlink():
                _remove(leftover)


def write_files_atomic(writes: Sequence[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write several files as one: each `write(tmp)` fills a staging file next to its
    destination, then all are renamed into place. On any failure every staging file and every
    file this call already renamed are removed, so callers get all of the files or none."""
    staged_files: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for path, write in writes:
            path = Path(path)
            tmp = _staging_path(path, "staging")
            tmp.touch(mode=0o600)
            staged_files.append((tmp, path))
            write(tmp)
            _plain_permissions(tmp)
        for tmp, path in staged_files:
            os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for tmp, _ in staged_files:
            tmp.unlink(missing_ok=True)
        for path in placed:
            path.unlink(missing_ok=True)
        raise
