"""Where pdtui keeps its state on this machine (run folders with the logs, control sockets)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """$PDTUI_HOME/state, else $XDG_STATE_HOME/pdtui, else ~/.local/state/pdtui."""
    if os.environ.get("PDTUI_HOME"):
        return Path(os.environ["PDTUI_HOME"]) / "state"
    base = os.environ.get("XDG_STATE_HOME")
    return (Path(base) if base else Path.home() / ".local" / "state") / "pdtui"
