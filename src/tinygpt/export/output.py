"""Writing an export without losing anything: refuse to replace an existing output unless asked, build the new
one beside it under a temporary name, and move it into place only once it is complete, so an interrupted or
failed export leaves the previous output (or nothing) behind, never half a model."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tinygpt.errors import TinyGPTError, UsageError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def staged(out: Path, overwrite: bool, folder: bool) -> Iterator[Path]:
    """A temporary path beside `out` (a new empty folder, or a file path not yet created) to write the export
    into; when the block finishes it replaces `out`, and when it raises it is removed."""
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if out.is_dir() != folder and occupied:
        raise UsageError(f"{out} is a {'file' if folder else 'folder'}; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    except OSError as e:
        raise TinyGPTError(f"cannot write to {out.parent}: {e.strerror}; choose a writable --out") from None
    tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be read by others
    target = tmp if folder else tmp / out.name
    try:
        yield target
        old = out.parent / f".old-{out.name}"
        _remove(old)
        if out.exists():
            out.rename(old)
        target.rename(out)
        _remove(old)
    finally:
        _remove(tmp)
