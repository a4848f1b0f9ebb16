"""Where fastskip keeps converted models and tokenizer files."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$FASTSKIP_CACHE``, else ``$XDG_CACHE_HOME/fastskip``, else ``~/.cache/fastskip``."""
    if os.environ.get("FASTSKIP_CACHE"):
        return Path(os.environ["FASTSKIP_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fastskip"
    return Path.home() / ".cache" / "fastskip"
