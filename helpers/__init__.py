"""Helpers promoted from the notebooks of the LLMs-from-scratch series.

Each submodule holds what one notebook built (the table in README.md); import them directly, e.g.
``from helpers.model import GPTModel``. This package prints nothing and imports nothing heavy.
"""

from __future__ import annotations

from helpers.runtime import device, eval_mode, project_root, quick_mode, record_results, unwrap_model

__all__ = ["device", "eval_mode", "project_root", "quick_mode", "record_results", "unwrap_model"]
__version__ = "0.1.0"
