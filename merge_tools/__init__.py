"""Find and fix tokenizer mismatches before merging language models with mergekit."""

from __future__ import annotations

__version__ = "0.2.0"
