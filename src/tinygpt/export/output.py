"""Writing an export without losing anything: refuse to replace an existing output unless asked, build the new
one beside it under a temporary name, and move it into place only once it is complete, so an interrupted or
failed export leaves the previous output (or nothing) behind, never half a model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tinygpt.errors import TinyGPTError, UsageError
from tinygpt.rundir import atomic_file, atomic_folder


@contextlib.contextmanager
def staged(out: Path, overwrite: bool, folder: bool) -> Iterator[Path]:
    """A temporary path beside `out` (a new empty folder, or a new empty file) to write the export into;
    when the block finishes it replaces `out`, and when it raises it is removed (rundir's atomic helpers)."""
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if out.is_dir() != folder and occupied:
        raise UsageError(f"{out} is a {'file' if folder else 'folder'}; choose another --out")
    with contextlib.ExitStack() as stack:
        try:
            target = stack.enter_context(atomic_folder(out) if folder else atomic_file(out))
        except OSError as e:
            raise TinyGPTError(f"cannot write to {out.parent}: {e.strerror}; "
                               "choose a writable --out") from None
        yield target
