"""Files that readers see whole or not at all: written beside their target, then renamed over it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that no reader (another rank, a resumed run) ever sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     suffix=".tmp", delete=False) as f:
        try:
            f.write(text)
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    # mkstemp creates the file private (0600); a plain write would honour the umask (manifests, a shared
    # feature cache, run configs are read by other users too).
    os.chmod(f.name, 0o666 & ~_umask())
    os.replace(f.name, path)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask
