"""Where the local store lives: $MINILM_EDGE_HOME, else ~/.cache/minilm_edge.

In the formats layer so that loading (runtime) can find the store's policy and manifests without
importing the store itself (app)."""
from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    """$MINILM_EDGE_HOME if set, else ~/.cache/minilm_edge."""
    env = os.environ.get("MINILM_EDGE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minilm_edge"
