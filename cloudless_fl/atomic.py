"""Write-then-rename, so a reader never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(file: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write` on a temporary file beside `file`, then rename it into place."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; results are ordinary files
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_writable(folder: str | Path, what: str = "run folder") -> Path:
    """Create `folder` if needed and check a file can be written there; a `CloudlessError` naming it if not."""
    from .errors import CloudlessError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise CloudlessError(f"the {what} {folder} is not writable ({exc.strerror or exc}); "
                             "choose another (hydra.run.dir=... or resume=...) or fix its permissions") from None
    return folder


def atomic_write_text(file: str | Path, text: str) -> None:
    atomic_write(file, lambda fh: fh.write(text.encode()))
