"""Files that appear whole or not at all: written under a temporary name beside them, then renamed.

A crash, a kill or a full disk mid-write leaves the previous file (or none) under the real name,
never half of the new one. Used for checkpoints' ``latest``, tokenizers, token shards and the
completion marks of data preparation.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def temp_path(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this process and call, to write to before renaming."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8), flushed to disk before it replaces what was there."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
