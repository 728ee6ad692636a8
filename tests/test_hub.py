"""Repo ids, end to end: the real huggingface_hub client (whichever version this environment
has: requests-based 0.x or httpx-based 1.x+) talks to tests/hub_server.py on 127.0.0.1 and
builds the real cache, whose snapshot files are symlinks into `blobs/`. The tools run as
subprocesses with the environment a user would set (HF_ENDPOINT, HF_HOME, HF_TOKEN,
HF_HUB_OFFLINE), because huggingface_hub reads it once, when it is imported."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import factories
from factories import BYTE_SPECIALS
from hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
CHAT = ["<|im_start|>", "<|im_end|>"]
NOT_NEEDED = ("pytorch_model.bin", "consolidated.safetensors", "original/consolidated.00.pth", "model.gguf", "README.md")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory, byte_tok: dict) -> dict[str, Path]:
    """Folders served as repos: a sharded model with every other weight format beside it,
    an older commit of it, a chat fine-tune, a tokenizer-only repo."""
    root = tmp_path_factory.mktemp("repos")
    model = factories.write_model(root / "model", byte_tok, shard_size="20KB", seed=1, **BYTE_SPECIALS)
    for name in NOT_NEEDED:
        (model / name).parent.mkdir(exist_ok=True)
        (model / name).write_bytes(b"a format or file the tools must not download\n" * 100)
    chat_json = factories.permuted(factories.with_tokens(byte_tok, added=CHAT), seed=3, keep=BYTE_SPECIALS.values())
    base = factories.write_tokenizer(root / "base", factories.permuted(byte_tok, 4), **BYTE_SPECIALS)
    (base / "model.safetensors").write_bytes(b"weights of the base: not needed for its tokenizer")
    return {
        "model": model,
        "model_old": factories.write_model(root / "model_old", chat_json, shard_size="20KB", seed=2, **BYTE_SPECIALS),
        "chat": factories.write_model(root / "chat", chat_json, shard_size="20KB", seed=4, bos=BYTE_SPECIALS["bos"], eos="<|im_end|>"),
        "base": base,
        # shards larger than the 100 kB the client reads first of each, to tell headers from whole files
        "wide": factories.write_model(root / "wide", byte_tok, hidden=128, shard_size="1MB", **BYTE_SPECIALS),
        "thinker": factories.write_model(
            root / "thinker", factories.with_tokens(byte_tok, added=["<think>", "</think>"]), seed=9, **BYTE_SPECIALS
        ),
    }


@pytest.fixture
def hub(repos: dict[str, Path]) -> Iterator[HubServer]:
    server = HubServer()
    server.old_commit = server.add_commit("org/model", repos["model_old"], ref="v1")  # type: ignore[attr-defined]
    server.add_commit("org/model", repos["model"], ref="main")
    server.add_commit("org/chat", repos["chat"])
    server.add_commit("org/base", repos["base"])
    server.add_commit("org/wide", repos["wide"])
    server.add_commit("org/thinker", repos["thinker"])
    server.add_commit("org/gated", repos["base"], gated=True)
    with server:
        yield server


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf_home"


def cli(
    tool: str,
    *args: object,
    hub: HubServer | None,
    hf_home: Path,
    offline: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_TELEMETRY="1")
    env["HF_ENDPOINT"] = endpoint or (hub.url if hub is not None else "http://127.0.0.1:9")
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, str(ROOT / tool), *map(str, args)], env=env, capture_output=True, text=True, timeout=120)


def ok(result: subprocess.CompletedProcess[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    return result


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """A failed run prints exactly one line, `error: ...`, and exits 2."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    return result.stderr.strip()


def fetched_files(hub: HubServer, repo: str) -> set[str]:
    prefix = f"/{repo}/resolve/"
    return {path.split("/", 5)[5] for path in hub.fetched() if path.startswith(prefix)}


def shard_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def cache_snapshot(hf_home: Path, repo: str) -> Path:
    (snapshot,) = (hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir()
    return snapshot


def test_remap_of_repo_ids_downloads_only_what_it_needs(tmp_path: Path, hub: HubServer, hf_home: Path, repos: dict[str, Path]) -> None:
    out = tmp_path / "out"
    ok(cli("remap_tokenizer.py", "--src_model", "org/model", "--base_tokenizer", "org/base", "--out_dir", out, hub=hub, hf_home=hf_home))
    model_files = fetched_files(hub, "org/model")
    shards = set(json.loads((repos["model"] / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert model_files == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        *shards,
    }
    assert fetched_files(hub, "org/base") == {"tokenizer.json", "tokenizer_config.json"}
    # the real cache layout: every snapshot file is a symlink into blobs/
    snapshot = cache_snapshot(hf_home, "org/model")
    assert all((snapshot / name).is_symlink() for name in shards)
    # the same bytes as a remap of the same folders given as local directories
    local = tmp_path / "local"
    ok(
        cli(
            "remap_tokenizer.py",
            "--src_model",
            repos["model"],
            "--base_tokenizer",
            repos["base"],
            "--out_dir",
            local,
            hub=None,
            hf_home=hf_home,
            offline=True,
        )
    )
    assert shard_digests(out) == shard_digests(local)
    report = json.loads((out / "remap_report.json").read_text())
    assert report["inputs"]["src_model"]["source"] == "org/model" and report["inputs"]["src_model"]["path"] == str(snapshot)

    hub.clear_log()
    drop = tmp_path / "drop"
    ok(
        cli(
            "remap_tokenizer.py",
            "--src_model",
            "org/chat",
            "--base_tokenizer",
            "org/base",
            "--out_dir",
            drop,
            "--drop-extra",
            hub=hub,
            hf_home=hf_home,
        )
    )
    assert not any(name in NOT_NEEDED for name in fetched_files(hub, "org/chat"))
    assert json.loads((drop / "config.json").read_text())["vocab_size"] == 400
    ok(cli("compare_tokenizers.py", "org/base", drop, "--weights", hub=hub, hf_home=hf_home))


def test_revisions_pin_a_commit(tmp_path: Path, hub: HubServer, hf_home: Path) -> None:
    old = hub.old_commit  # type: ignore[attr-defined]
    out = tmp_path / "out"
    ok(
        cli(
            "remap_tokenizer.py",
            "--src_model",
            "org/model",
            "--revision",
            old,
            "--base_tokenizer",
            "org/base",
            "--base-revision",
            "main",
            "--out_dir",
            out,
            "--drop-extra",
            "--json",
            hub=hub,
            hf_home=hf_home,
        )
    )
    report = json.loads((out / "remap_report.json").read_text())
    assert report["plan"]["rows"]["source"] == 402  # the old commit has the chat tokens
    assert Path(report["inputs"]["src_model"]["path"]).name == old
    assert all(f"/resolve/{old}/" in path for path in hub.fetched() if path.startswith("/org/model/"))
    by_tag = json.loads(ok(cli("compare_tokenizers.py", "org/model@v1", f"org/model@{old}", "--json", hub=hub, hf_home=hf_home)).stdout)
    assert by_tag["equal"] is True
    moved = ok(cli("compare_tokenizers.py", "org/model", "org/model", "--revision", "v1", hub=hub, hf_home=hf_home))
    assert "identical" in moved.stdout


def test_compare_weights_reads_safetensors_headers_only(hub: HubServer, hf_home: Path, repos: dict[str, Path]) -> None:
    result = ok(cli("compare_tokenizers.py", "org/wide", "org/chat", "--weights", "--json", hub=hub, hf_home=hf_home), code=1)
    weights = json.loads(result.stdout)["comparisons"][0]["checks"]["weights"]
    assert weights["ref"]["embed_rows"] == 400 and weights["other"]["embed_rows"] == 402
    on_disk = sum(p.stat().st_size for p in repos["wide"].glob("model-*.safetensors"))
    served = sum(r.body_bytes for r in hub.log if r.path.startswith("/org/wide/") and r.path.endswith(".safetensors"))
    shards = len(list(repos["wide"].glob("model-*.safetensors")))
    assert 0 < served <= shards * 100_001 and served < on_disk / 4, (served, on_disk)  # the client reads the first 100 kB of each
    assert all(r.range for r in hub.log if r.method == "GET" and r.path.endswith(".safetensors"))
    assert fetched_files(hub, "org/wide") <= {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
    }


def test_a_warm_cache_works_offline_with_the_server_gone(tmp_path: Path, hub: HubServer, hf_home: Path) -> None:
    ok(
        cli(
            "remap_tokenizer.py",
            "--src_model",
            "org/model",
            "--base_tokenizer",
            "org/base",
            "--out_dir",
            tmp_path / "online",
            hub=hub,
            hf_home=hf_home,
        )
    )
    ok(cli("compare_tokenizers.py", "org/model", "org/base", hub=hub, hf_home=hf_home), code=1)
    hub.stop()
    again = tmp_path / "offline"
    ok(
        cli(
            "remap_tokenizer.py",
            "--src_model",
            "org/model",
            "--base_tokenizer",
            "org/base",
            "--out_dir",
            again,
            hub=hub,
            hf_home=hf_home,
            offline=True,
        )
    )
    assert shard_digests(again) == shard_digests(tmp_path / "online")
    # the cached shards are read locally for --weights
    result = ok(
        cli("compare_tokenizers.py", "org/model", "org/base", "--weights", "--json", hub=hub, hf_home=hf_home, offline=True), code=1
    )
    assert json.loads(result.stdout)["comparisons"][0]["checks"]["weights"]["ref"]["embed_rows"] == 400


def test_gated_repos_need_a_token(tmp_path: Path, hub: HubServer, hf_home: Path) -> None:
    out = tmp_path / "out"
    error = one_error(
        cli("remap_tokenizer.py", "--src_model", "org/model", "--base_tokenizer", "org/gated", "--out_dir", out, hub=hub, hf_home=hf_home)
    )
    assert "org/gated: gated repository" in error and "HF_TOKEN" in error and "hf auth login" in error
    error = one_error(cli("compare_tokenizers.py", "org/base", "org/gated", hub=hub, hf_home=hf_home, token="hf_wrong"))
    assert "org/gated: gated repository" in error and "has no access" in error
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf_home"]
    ok(
        cli(
            "remap_tokenizer.py",
            "--src_model",
            "org/model",
            "--base_tokenizer",
            "org/gated",
            "--out_dir",
            out,
            hub=hub,
            hf_home=hf_home,
            token=hub.token,
        )
    )


@pytest.mark.parametrize("case", ["missing repo", "missing revision", "connection refused", "server error"])
def test_hub_failures_are_one_line_and_leave_nothing(tmp_path: Path, hub: HubServer, hf_home: Path, case: str) -> None:
    src, revision, expected = "org/model", [], ""
    if case == "missing repo":
        src, expected = "org/nope", "org/nope: neither a local directory nor a Hub repository"
    elif case == "missing revision":
        revision, expected = ["--revision", "no-such-branch"], "org/model@no-such-branch: the repository has no revision 'no-such-branch'"
    elif case == "connection refused":
        hub.stop()
        expected = "org/model: neither a local directory nor a reachable Hub repo"
    else:
        hub.fail_with = 500
        expected = "org/model: not in the local Hub cache, and"
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    started = time.monotonic()
    error = one_error(
        cli("remap_tokenizer.py", "--src_model", src, *revision, "--base_tokenizer", "org/base", "--out_dir", out, hub=hub, hf_home=hf_home)
    )
    assert expected in error, error
    assert time.monotonic() - started < 30
    assert list(out.parent.iterdir()) == []
    compare_src = f"{src}@no-such-branch" if revision else src
    assert expected.split(":")[0].split("@")[0] in one_error(
        cli("compare_tokenizers.py", compare_src, "org/base", hub=hub, hf_home=hf_home)
    )


def test_mergekit_config_with_repo_ids(tmp_path: Path, hub: HubServer, hf_home: Path) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "base_model": "org/model",
                "dtype": "float32",
                "models": [{"model": "org/model", "parameters": {"weight": 0.5}}, {"model": "org/chat", "parameters": {"weight": 0.5}}],
            }
        )
    )
    aligned = tmp_path / "aligned"
    summary = json.loads(
        ok(cli("remap_tokenizer.py", "--mergekit-config", config, "--out_dir", aligned, "--json", hub=hub, hf_home=hf_home)).stdout
    )
    assert summary["gate"]["ok"] and {m["status"] for m in summary["models"]} == {"identical", "remapped"}
    ok(cli("compare_tokenizers.py", "--mergekit-config", aligned / "merge.yaml", "--weights", hub=hub, hf_home=hf_home))
    # shards without a vocabulary tensor are linked to the blobs the Hub cache's snapshot points at
    output = Path(next(m["output"] for m in summary["models"] if m["status"] == "remapped"))
    linked = json.loads((output / "remap_report.json").read_text())["linked"]
    assert linked and all("/blobs/" in entry["source"] and Path(entry["source"]).is_relative_to(hf_home) for entry in linked.values())
    assert all(os.path.samefile(output / file, entry["source"]) for file, entry in linked.items())


def test_local_shards_may_be_symlinks_to_another_disk(tmp_path: Path, repos: dict[str, Path], hf_home: Path) -> None:
    other_disk = tmp_path / "other-disk"
    shutil.copytree(repos["model"], other_disk)
    model = tmp_path / "model"
    model.mkdir()
    for path in other_disk.iterdir():
        if path.is_file() and path.name not in NOT_NEEDED:
            (model / path.name).symlink_to(path)
    out = tmp_path / "out"
    ok(
        cli(
            "remap_tokenizer.py",
            "--src_model",
            model,
            "--base_tokenizer",
            repos["base"],
            "--out_dir",
            out,
            hub=None,
            hf_home=hf_home,
            offline=True,
        )
    )
    ok(cli("compare_tokenizers.py", model, repos["model"], "--weights", hub=None, hf_home=hf_home, offline=True))
    index = json.loads((other_disk / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    for escape in ("../other-disk/model-00001-of-00007.safetensors", str(other_disk / "model-00001-of-00007.safetensors")):
        index["weight_map"][first] = escape
        (model / "model.safetensors.index.json").unlink()
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
        for tool, args in (
            ("remap_tokenizer.py", ["--src_model", model, "--base_tokenizer", repos["base"], "--out_dir", tmp_path / "out2"]),
            ("compare_tokenizers.py", [model, repos["model"], "--weights"]),
        ):
            error = one_error(cli(tool, *args, hub=None, hf_home=hf_home, offline=True))
            assert repr(escape) in error and "not a plain file name inside the model directory" in error
        assert not (tmp_path / "out2").exists()


def test_donor_rows_come_from_a_hub_repo_by_range_requests(tmp_path: Path, hub: HubServer, hf_home: Path, repos: dict[str, Path]) -> None:
    """--init donor with a Hub repo as T: its tokenizer files are downloaded, its rows are
    read by HTTP range requests (headers, then just the rows), never whole shards."""
    from merge_fixtures import tensors

    out = tmp_path / "out"
    ok(
        cli(
            "remap_tokenizer.py",
            "--src_model",
            "org/model",
            "--base_tokenizer",
            "org/thinker",
            "--out_dir",
            out,
            "--drop-extra",
            "--init",
            "donor",
            hub=hub,
            hf_home=hf_home,
        )
    )
    assert fetched_files(hub, "org/thinker") == {
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    }
    gets = [r for r in hub.log if r.method == "GET" and r.path.startswith("/org/thinker/") and r.path.endswith(".safetensors")]
    assert gets and all(r.range for r in gets)
    row_reads = [r for r in gets if not r.range.startswith("bytes=0-")]
    assert sum(r.body_bytes for r in row_reads) == 2 * 2 * 32 * 4  # two rows of embed_tokens and of lm_head, float32
    written, donor = tensors(out), tensors(repos["thinker"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(written[name][400:], donor[name][400:]), name


def test_src_and_base_take_a_revision_after_an_at(tmp_path: Path, hub: HubServer, hf_home: Path) -> None:
    out = tmp_path / "out"
    args = ("--src_model", "org/model@v1", "--base_tokenizer", "org/base@main", "--out_dir", out, "--drop-extra")
    ok(cli("remap_tokenizer.py", *args, hub=hub, hf_home=hf_home))
    report = json.loads((out / "remap_report.json").read_text())
    assert report["plan"]["rows"]["source"] == 402  # v1 is the old commit, which has the chat tokens
    assert (report["inputs"]["src_model"]["source"], report["inputs"]["src_model"]["revision"]) == ("org/model", "v1")
    clash = cli("remap_tokenizer.py", *args[:-3], "--revision", "main", "--out_dir", tmp_path / "o2", hub=hub, hf_home=hf_home)
    assert "pins revision 'v1' but --revision says 'main'" in one_error(clash)


@pytest.mark.parametrize("offline_second", [False, True])
def test_a_second_gate_run_with_the_same_cache_passes(hub: HubServer, hf_home: Path, offline_second: bool) -> None:
    """A CI gate keeps HF_HOME between runs: the first run caches the index but only the
    headers of the shards; the second must not look for shards it never downloaded."""
    first = ok(cli("compare_tokenizers.py", "org/model", "org/model", "--json", hub=hub, hf_home=hf_home))
    second = ok(cli("compare_tokenizers.py", "org/model", "org/model", "--json", hub=hub, hf_home=hf_home, offline=offline_second))
    assert json.loads(first.stdout)["exit_code"] == json.loads(second.stdout)["exit_code"] == 0
    for run in (first, second):  # offline too, the rows were checked (from the headers the first run read)
        assert json.loads(run.stdout)["comparisons"][0]["checks"]["weights"]["status"] == "ok", run.stderr


def test_the_audit_downloads_the_shards_and_nothing_else(tmp_path: Path, hub: HubServer, hf_home: Path, repos: dict[str, Path]) -> None:
    config = tmp_path / "merge.yaml"
    models = [{"model": "org/thinker", "parameters": {"weight": 1.0}}]
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "org/model", "dtype": "float32", "models": models}))
    result = ok(cli("compare_tokenizers.py", "--mergekit-config", config, "--audit", "--json", hub=hub, hf_home=hf_home), code=1)
    audit = json.loads(result.stdout)["audit"]  # the gate fails (the vocabularies differ); the audit is there all the same
    assert [m["model"] for m in audit["models"]] == ["org/model", "org/thinker"] and audit["models"][1]["task_vector_norm"] > 0
    assert any("shapes differ" in s for s in audit["skipped"])  # thinker's embedding has two more rows
    fetched = fetched_files(hub, "org/model")
    shards = set(json.loads((repos["model"] / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert {f for f in fetched if f.endswith(".safetensors")} == shards
    assert not fetched & set(NOT_NEEDED)
    # offline, from the cache, the same figures
    again = ok(
        cli("compare_tokenizers.py", "--mergekit-config", config, "--audit", "--json", hub=None, hf_home=hf_home, offline=True), code=1
    )
    assert json.loads(again.stdout)["audit"] == audit
