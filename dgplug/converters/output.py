"""Putting a finished output in place: written under a temporary name beside it, then renamed.

Without overwrite, the rename never replaces what another process put there while this one ran
(two conversions into one name: the second to finish is refused, and the first's output stays);
with it, the old output is replaced in one step. The temporary output is removed either way, and
errors name the output, not the temporary name.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from dgplug.errors import InputError

_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV)  # vfat, SMB, some FUSE


def _appeared(out: Path) -> InputError:
    return InputError(f"{out}: created by another process while this one ran; not replaced, this result is "
                      f"discarded")


def _claim(tmp: Path, out: Path) -> None:
    """out taken for tmp only if nothing is there: a hard link (atomic), or where the file system
    has none, an exclusive create of out then a rename over it (a second dgplug loses the create)."""
    try:
        os.link(tmp, out)
        tmp.unlink()
        return
    except FileExistsError:
        raise _appeared(out) from None
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
    try:
        os.close(os.open(out, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise _appeared(out) from None
    os.replace(tmp, out)


def publish_file(tmp: Path, out: Path, overwrite: bool) -> None:
    """tmp renamed to out; without overwrite, an out that exists now is refused."""
    try:
        os.replace(tmp, out) if overwrite else _claim(tmp, out)
    except OSError as e:
        e.filename, e.filename2 = str(out), None  # the output, not its temporary name
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def publish_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """tmp (a directory) renamed to out; an empty out directory is taken, anything else at out only
    with overwrite (moved aside first, removed after)."""
    try:
        os.rename(tmp, out)  # refused atomically where out is a non-empty directory or a file
        return
    except OSError as e:
        taken = e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR)
        if not (taken and overwrite):
            shutil.rmtree(tmp, ignore_errors=True)
            if taken:
                raise _appeared(out) from None
            e.filename, e.filename2 = str(out), None
            raise
    old = out.parent / f".{out.name}.dgplug-old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
