"""Putting a finished output in place: written under a temporary name beside it, then renamed.

Without overwrite, the rename never replaces what another process put there while this one ran
(two conversions into one name: the second to finish is refused, and the first's output stays);
with it, the old output is replaced in one step. The temporary output is removed either way.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from dgplug.errors import InputError


def _appeared(out: Path) -> InputError:
    return InputError(f"{out}: created by another process while this one ran; not replaced, this result is "
                      f"discarded")


def publish_file(tmp: Path, out: Path, overwrite: bool) -> None:
    """tmp renamed to out; without overwrite, an out that exists now is refused (link, not rename)."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails if out exists, atomically
    except FileExistsError:
        tmp.unlink()
        raise _appeared(out) from None
    tmp.unlink()


def publish_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """tmp (a directory) renamed to out; an empty out directory is taken, a non-empty one only with
    overwrite (the old one is moved aside first and removed after)."""
    try:
        os.rename(tmp, out)  # a non-empty directory at out: refused atomically
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _appeared(out) from None
            raise
    old = out.parent / f".{out.name}.dgplug-old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
