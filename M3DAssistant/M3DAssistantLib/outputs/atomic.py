"""Atomic, no-overwrite file writing: the one way every writer in :mod:`M3DAssistantLib.outputs` (and the training's
dataset, evaluation and checkpoint writers) puts a file on disk.

Every write goes to a temporary file in the target folder, is flushed and fsync'ed, and only then takes the target's
name (``os.link`` when the target must not exist, so a file that appears meanwhile is not replaced; ``os.replace``
with ``overwrite=True``). A failure part-way (disk full, interrupt) leaves neither a partial target nor the temporary
file, and an existing file stays as it was. :func:`unique_path` gives a fresh name (``liver (2).seg.nrrd``) for
callers that prefer that to an error.

Standard library only.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Union

from ..errors import InputError, M3DError, OutputWriteError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_COMPOUND_SUFFIXES = (".seg.nrrd", ".seg.nhdr", ".seg.vtm", ".mrk.json", ".nii.gz", ".sr.dcm", ".tar.gz")


def unique_path(path: PathLike, *, other_than_path: bool = False) -> Path:
    """``path`` if nothing is there yet, else the first free ``name (2).ext``, ``name (3).ext``, ...

    Compound extensions stay together: ``liver.seg.nrrd`` -> ``liver (2).seg.nrrd``. ``other_than_path``: never
    ``path`` itself (a second name beside a target that could not be written).
    """
    p = Path(path)
    if not _lexists(p) and not other_than_path:
        return p
    name = p.name
    suffix = next((s for s in _COMPOUND_SUFFIXES if name.lower().endswith(s) and len(name) > len(s)), None)
    if suffix is None:
        suffix = p.suffix if p.stem else ""
    stem = name[: len(name) - len(suffix)]
    n = 2
    while True:
        candidate = p.with_name(f"{stem} ({n}){name[len(stem):]}")
        if not _lexists(candidate):
            return candidate
        n += 1


def _lexists(p: Path) -> bool:
    return os.path.lexists(p)


def _check_target(path: PathLike, overwrite: bool, overwrite_hint: str = "pass overwrite=True") -> Path:
    p = Path(path)
    if p.name in ("", ".", ".."):
        raise InputError(f"{str(path)!r} is not a file name; give a file path such as result.seg.nrrd")
    if not p.parent.is_dir():
        raise InputError(f"cannot write {p}: the folder {p.parent} does not exist; create it or choose another folder")
    if p.is_dir():
        raise InputError(f"cannot write {p}: it is a folder; give a file name inside it")
    if p.is_symlink() and not p.exists():
        raise InputError(f"cannot write {p}: it is a link to {os.readlink(p)}, which does not exist; remove the link "
                         f"or choose another name")
    if not overwrite and _lexists(p):
        raise InputError(f"{p} already exists and was left unchanged; choose another name or {overwrite_hint}")
    return p


def check_output_path(path: PathLike, *, overwrite: bool = False, overwrite_hint: str = "pass overwrite=True") -> Path:
    """Whether ``path`` can be written, found out before any work is done: a file name in an existing folder we may
    write to (probed by creating and removing a temporary file there: permissions, read-only file systems, quotas
    on inodes), not a folder, not a dangling link, and not an existing file unless ``overwrite``.

    :param overwrite_hint: how the caller's user allows overwriting (the CLI: ``"pass --overwrite"``).
    :raises InputError: naming the problem and the fix; :class:`OutputWriteError` when the probe fails.
    """
    p = _check_target(path, overwrite, overwrite_hint)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=p.parent)
    except OSError as exc:
        raise _write_error(p, exc, probing=True) from exc
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        log.warning("could not remove the probe file %s; delete it by hand", probe)
    return p


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide and not thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_permissions(path: PathLike) -> None:
    """Give ``path`` (a file, or every file below a folder) the permissions an ordinary ``open()`` would
    (``0o666 & ~umask``).

    safetensors and ``tempfile.mkstemp`` create files readable by their owner only, which breaks a model folder that
    a lab shares between users. For files we just wrote (before they are published under their final name)."""
    mode = 0o666 & ~_umask()
    path = Path(path)
    for file in [path] if path.is_file() else path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, chunks: Union[bytes, Iterable[bytes]], *, overwrite: bool = False) -> Path:
    """Write ``chunks`` to ``path`` atomically: all of it under the final name, or nothing and no temporary file.

    Refuses an existing ``path`` (:class:`InputError`) unless ``overwrite``; file-system failures raise
    :class:`OutputWriteError` naming the file and what to do. Returns the path written.
    """
    p = _check_target(path, overwrite)
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = (bytes(chunks),)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part", dir=p.parent)
    except OSError as exc:
        raise _write_error(p, exc) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        try:  # mkstemp makes 0600; give the file the permissions an ordinary open() would (or the replaced file's)
            mode = (p.stat().st_mode & 0o7777) if overwrite and p.exists() else (0o666 & ~_umask())
            os.chmod(tmp, mode)
        except OSError:
            pass
        if overwrite:
            os.replace(tmp, p)
        else:
            _publish_exclusive(tmp, p)
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("could not remove the temporary file %s; delete it by hand", tmp)
        if isinstance(exc, OSError) and not isinstance(exc, M3DError):
            raise _write_error(p, exc) from exc
        raise
    _fsync_dir(p.parent)
    log.debug("wrote %s", p)
    return p


def _publish_exclusive(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the name ``target`` only if ``target`` does not exist at that moment."""
    try:
        os.link(tmp, target)  # atomic and fails if target exists: a file created since the check is never replaced
    except FileExistsError:
        raise InputError(f"{target} already exists and was left unchanged; choose another name or pass "
                         f"overwrite=True") from None
    except OSError as exc:
        # File systems without hard links (FAT, some network shares): fall back to check-then-rename.
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS,
                             errno.EACCES):
            raise
        if _lexists(target):
            raise InputError(f"{target} already exists and was left unchanged; choose another name or pass "
                             f"overwrite=True") from None
        os.replace(tmp, target)
        return
    try:
        tmp.unlink()
    except OSError:
        log.warning("could not remove the temporary file %s; delete it by hand", tmp)


def _write_error(p: Path, exc: OSError, probing: bool = False) -> OutputWriteError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some disk space or choose a folder on another disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a folder you can write to"
    else:
        fix = "check the folder and try again"
    what = f"cannot write {p}: {reason} (in {p.parent})" if probing else \
        f"could not write {p}: {reason}; nothing was written"
    err = OutputWriteError(exc.errno, f"{what} -- {fix}")
    err.filename = str(p)
    return err


__all__ = ["PathLike", "OutputWriteError", "atomic_write_bytes", "check_output_path", "ordinary_permissions",
           "unique_path"]
