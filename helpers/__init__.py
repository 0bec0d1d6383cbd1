"""Helpers promoted from the notebooks of the LLMs-from-scratch series.

Each submodule holds what one notebook built (see DESIGN.md); import them directly, e.g.
``from helpers.model import GPTModel``. This package prints nothing and imports nothing heavy.
"""

from __future__ import annotations

from helpers.runtime import device, project_root, quick_mode, record_results, seed_everything

__all__ = ["device", "project_root", "quick_mode", "record_results", "seed_everything"]
__version__ = "0.1.0"
