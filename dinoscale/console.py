"""The one terminal console every stage prints through (a leaf: sweep and analysis both use it)."""

from __future__ import annotations

import sys

from rich.console import Console

# Logs and CI are not terminals: give tables room instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
