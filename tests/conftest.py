"""Shared fixtures: every test runs offline, against tokenizers and models it builds."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import factories  # noqa: E402

BYTE_SPECIALS, SP_SPECIALS = factories.BYTE_SPECIALS, factories.SP_SPECIALS


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture(scope="session")
def byte_tok() -> dict:
    return factories.byte_level_bpe()


@pytest.fixture(scope="session")
def sp_tok() -> dict:
    return factories.metaspace_bpe()


@pytest.fixture
def tok_dir(tmp_path: Path, byte_tok: dict) -> Path:
    return factories.write_tokenizer(tmp_path / "ref", byte_tok, **BYTE_SPECIALS)
