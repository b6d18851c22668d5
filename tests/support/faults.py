"""Real storage faults for tests: a small tmpfs that fills up, a file made immutable (unwritable even by root).

Both need root (mount, chattr); tests using them are skipped elsewhere, with the reason printed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a tmpfs / sets the immutable attribute")


@contextlib.contextmanager
def small_tmpfs(size: str = "256k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on a fresh directory; unmounted (and removed) when the block ends."""
    require_root()
    directory = Path(tempfile.mkdtemp(prefix="gw-tmpfs-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        directory.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        # Lazy: a process of a failed test may still hold a file open; the mount goes once it closes it.
        subprocess.run(["umount", "-l", str(directory)], check=False)
        directory.rmdir()


def fill_up(directory: Path) -> Path:
    """Write a filler file in ``directory`` until the file system says ENOSPC; returns it (delete it to
    free the space). tmpfs allocates whole pages: a file with a partly used last page can still grow
    within it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        block = b"\0" * 4096
        while True:
            try:
                if out.write(block) < len(block):
                    break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler


def set_immutable(path: Path, immutable: bool) -> None:
    """``chattr +i``: nobody, root included, can open the file for writing (descriptors already open keep
    writing); ``-i`` lifts it."""
    require_root()
    subprocess.run(["chattr", "+i" if immutable else "-i", str(path)], check=True, capture_output=True)


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    set_immutable(path, True)
    try:
        yield
    finally:
        set_immutable(path, False)
