"""Repo ids go through huggingface_hub: only the needed files, with the revision asked for."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest

import compare_tokenizers as ct
import factories
import remap_tokenizer as rt
from conftest import BYTE_SPECIALS


class FakeHub:
    """snapshot_download / list_repo_files / get_safetensors_metadata over local folders."""

    def __init__(self, root: Path) -> None:
        self.root, self.calls = root, []

    def repo(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id

    def files(self, repo_id: str) -> list[str]:
        return sorted(str(p.relative_to(self.repo(repo_id))) for p in self.repo(repo_id).rglob("*") if p.is_file())

    def snapshot_download(self, repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None, **kwargs: object) -> str:
        self.calls.append(("snapshot_download", repo_id, revision, list(allow_patterns or [])))
        if not self.repo(repo_id).exists():
            response = SimpleNamespace(headers={}, request=None, status_code=404)
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found", response=response)
        target = self.root / "cache" / repo_id.replace("/", "--") / (revision or "main")
        for name in self.files(repo_id):
            if allow_patterns is None or any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.repo(repo_id) / name, target / name)
        target.mkdir(parents=True, exist_ok=True)
        return str(target)

    def list_repo_files(self, repo_id: str, revision: str | None = None, **kwargs: object) -> list[str]:
        self.calls.append(("list_repo_files", repo_id, revision))
        return self.files(repo_id)

    def get_safetensors_metadata(self, repo_id: str, revision: str | None = None, **kwargs: object) -> SimpleNamespace:
        self.calls.append(("get_safetensors_metadata", repo_id, revision))
        files = {}
        for name in self.files(repo_id):
            if name.endswith(".safetensors") and "/" not in name:
                header, _ = rt.read_safetensors_header(self.repo(repo_id) / name)
                files[name] = SimpleNamespace(tensors={k: SimpleNamespace(shape=v["shape"]) for k, v in header.items()})
        return SimpleNamespace(files_metadata=files)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, byte_tok: dict) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    model = factories.write_model(fake.repo("org/model"), byte_tok, shard_size="20KB", **BYTE_SPECIALS)
    (model / "pytorch_model.bin").write_bytes(b"not needed")  # a second weight format
    (model / "original").mkdir()
    (model / "original" / "consolidated.00.pth").write_bytes(b"not needed either")
    (model / "README.md").write_text("# model card")
    factories.write_tokenizer(fake.repo("org/base"), factories.permuted(byte_tok, 4), **BYTE_SPECIALS)
    (fake.repo("org/base") / "model.safetensors").write_bytes(b"weights of the base: not needed for its tokenizer")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda api, repo_id, revision=None, **kw: fake.list_repo_files(repo_id, revision))
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake.get_safetensors_metadata)
    return fake


def test_remap_downloads_only_what_it_needs_at_the_revision(tmp_path: Path, hub: FakeHub, capsys) -> None:
    out = tmp_path / "out"
    code = rt.main(["--src_model", "org/model", "--revision", "abc123", "--base_tokenizer", "org/base", "--base-revision", "v2", "--out_dir", str(out)])
    assert code == 0, capsys.readouterr().err
    snapshots = {call[1]: call for call in hub.calls if call[0] == "snapshot_download"}
    _, _, revision, patterns = snapshots["org/model"]
    assert revision == "abc123" and ("list_repo_files", "org/model", "abc123") in hub.calls
    assert "model.safetensors.index.json" in patterns and "model-*.safetensors" in patterns
    assert not any(fnmatch.fnmatch("pytorch_model.bin", p) or fnmatch.fnmatch("original/consolidated.00.pth", p) for p in patterns)
    assert not any(fnmatch.fnmatch("README.md", p) for p in patterns)
    _, _, base_revision, base_patterns = snapshots["org/base"]
    assert base_revision == "v2"
    assert not any(fnmatch.fnmatch("model.safetensors", p) for p in base_patterns)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(base_patterns)
    report = json.loads((out / rt.REPORT_NAME).read_text())
    assert report["inputs"]["src_model"]["source"] == "org/model" and report["inputs"]["src_model"]["revision"] == "abc123"
    assert report["inputs"]["base_tokenizer"]["revision"] == "v2"


def test_compare_downloads_tokenizer_files_and_reads_headers_remotely(hub: FakeHub, capsys) -> None:
    code = ct.main(["org/base", "org/model@abc123", "--weights", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1  # ids permuted
    snapshots = {call[1]: call for call in hub.calls if call[0] == "snapshot_download"}
    assert snapshots["org/model"][2] == "abc123"
    assert not any(p.endswith(".safetensors") or p.endswith(".bin") for p in snapshots["org/model"][3])
    assert ("get_safetensors_metadata", "org/model", "abc123") in hub.calls
    assert report["comparisons"][0]["checks"]["weights"]["other"]["embed_rows"] == 400


def test_revision_flag_applies_to_ids_without_their_own(hub: FakeHub, capsys) -> None:
    ct.main(["org/base", "org/model", "--revision", "r1"])
    assert {call[1]: call[2] for call in hub.calls if call[0] == "snapshot_download"} == {"org/base": "r1", "org/model": "r1"}


def test_unknown_repo_is_a_clear_error(tmp_path: Path, hub: FakeHub, capsys) -> None:
    code = rt.main(["--src_model", "org/nope", "--base_tokenizer", "org/base", "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "error: org/nope: no such local path or Hub repository (private? set HF_TOKEN)" in err
