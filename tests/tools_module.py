"""Import a script of tools/ as a module, for tests of its pure-Python parts."""

import importlib
import sys
from pathlib import Path

TOOLS = str(Path(__file__).resolve().parents[1] / "tools")


def load_tool(name: str):
    """``tools/<name>.py`` as a module; tools/ is on the path only while it imports (its own imports included)."""
    sys.path.insert(0, TOOLS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(TOOLS)
