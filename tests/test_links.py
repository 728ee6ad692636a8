"""An alignment writes only what changes: the shards that hold a vocabulary tensor are
rewritten, every other shard of the source is linked (reflink, hard link, or a symbolic link
across file systems), and no source file ever changes through a link."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import factories
import remap_tokenizer as rt
from merge_fixtures import build_models, build_union_models, linear_yaml, union_yaml

ROOT = Path(__file__).resolve().parents[1]
align = functools.partial(factories.call_main, rt.main)


@pytest.fixture
def models(tmp_path: Path, byte_tok: dict) -> dict[str, Path]:
    return build_models(tmp_path / "models", byte_tok)


def source_state(*directories: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every source file's bytes, size and mtime: what no alignment may change."""
    state = {}
    for directory in directories:
        for path in sorted(directory.iterdir()):
            stat = path.stat()
            state[str(path)] = (path.read_bytes(), stat.st_size, stat.st_mtime_ns)
    return state


def tensor_files(directory: Path) -> dict[str, list[str]]:
    """tensor name -> the files of `directory` that hold it (from their headers)."""
    held: dict[str, list[str]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        for name in rt.read_safetensors_header(file)[0]:
            held.setdefault(name, []).append(file.name)
    return held


def test_shards_without_a_vocabulary_tensor_are_linked(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)])
    code, out, err = align(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned", "--json")
    assert code == 0, err
    summary, chat = json.loads(out), tmp_path / "aligned" / "chat"
    report = factories.report_of(chat)
    index = json.loads((models["chat"] / "model.safetensors.index.json").read_text())["weight_map"]
    vocabulary = {index["model.embed_tokens.weight"], index["lm_head.weight"]}
    assert set(report["linked"]) == set(index.values()) - vocabulary and vocabulary <= set(report["files"])
    for file in report["linked"]:  # the same bytes, not a copy of them
        assert os.path.samefile(chat / file, models["chat"] / file) and report["linked"][file]["how"] in ("reflink", "hardlink")
    for file in vocabulary:
        assert not os.path.samefile(chat / file, models["chat"] / file)
    # every tensor in exactly one file: loaders that read every *.safetensors see one embedding
    assert all(len(files) == 1 for files in tensor_files(chat).values()) and set(tensor_files(chat)) == set(index)
    linked = sum((chat / f).stat().st_size for f in report["linked"])
    assert report["bytes"]["linked"] == linked and summary["bytes"]["linked"] == linked
    assert summary["bytes"]["written"] == report["bytes"]["written"] < sum(p.stat().st_size for p in chat.iterdir())
    assert f"linked {rt.human_bytes(linked)}" in align(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "again")[1]


def test_copy_writes_full_copies(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)])
    code, out, err = align(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned", "--copy", "--json")
    assert code == 0 and json.loads(out)["bytes"]["linked"] == 0, err
    chat = tmp_path / "aligned" / "chat"
    assert factories.report_of(chat)["linked"] == {}
    assert not any(
        os.path.samefile(path, models["chat"] / path.name) for path in chat.glob("*.safetensors") if (models["chat"] / path.name).exists()
    )
    code, _, err = align(capsys, "--src_model", models["chat"], "--base_tokenizer", models["base"], "--out_dir", tmp_path / "x", "--copy")
    assert code == 2 and "--copy applies to --mergekit-config" in err


def test_across_file_systems_the_link_is_symbolic(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    """/dev/shm is another file system than the tests' tmp_path: no hard link can cross it."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev or not os.access(shm, os.W_OK):
        pytest.skip("no second, writable file system at /dev/shm")
    aligned = shm / f"merge-tools-test-{os.getpid()}"
    config = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)])
    try:
        code, _, err = align(capsys, "--mergekit-config", config, "--out_dir", aligned)
        assert code == 0, err
        report = factories.report_of(aligned / "chat")
        assert report["linked"] and {entry["how"] for entry in report["linked"].values()} == {"symlink"}
        for file in report["linked"]:
            assert (aligned / "chat" / file).is_symlink() and (aligned / "chat" / file).resolve() == (models["chat"] / file).resolve()
    finally:
        import shutil

        shutil.rmtree(aligned, ignore_errors=True)


def test_sources_never_change_through_a_link(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    """Bytes, sizes and mtimes of every source file stay as they were after an alignment, a
    rerun, a rerun that remaps again (over the linked output), and a run killed half way."""
    config = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models["base"], 0.4), (models["chat"], 0.3), (models["padded"], 0.3)])
    before = source_state(models["base"], models["chat"], models["padded"])
    aligned = tmp_path / "aligned"
    for extra in ([], [], ["--init", "mean"], ["--init", "zero"]):  # align, reuse, remap again twice
        code, _, err = align(capsys, "--mergekit-config", config, "--out_dir", aligned, *extra)
        assert code == 0, err
        assert source_state(models["base"], models["chat"], models["padded"]) == before, extra
    for attempt in range(3):  # killed while it writes: whatever it left, no source changed
        argv = [sys.executable, str(ROOT / "remap_tokenizer.py"), "--mergekit-config", str(config), "--out_dir", str(aligned)]
        proc = subprocess.Popen([*argv, "--init", "fvt" if attempt % 2 else "unk"], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None and not any(".tmp-" in p.name for p in aligned.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(attempt * 0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert source_state(models["base"], models["chat"], models["padded"]) == before, attempt
    code, _, err = align(capsys, "--mergekit-config", config, "--out_dir", aligned)
    assert code == 0 and source_state(models["base"], models["chat"], models["padded"]) == before, err


def test_a_union_alignment_links_the_same_way(tmp_path: Path, byte_tok: dict, capsys) -> None:
    union = build_union_models(tmp_path / "models", byte_tok)
    config = union_yaml(tmp_path / "merge.yaml", union, ["base", "sib1", "sib2"])
    code, out, err = align(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned", "--json")
    assert code == 0, err
    for entry in json.loads(out)["models"]:
        report = factories.report_of(Path(entry["output"]))
        assert report["linked"] and all(os.path.samefile(Path(entry["output"]) / f, Path(entry["source"]) / f) for f in report["linked"])


def test_a_model_that_only_carries_the_merged_tokenizer_is_all_links(tmp_path: Path, byte_tok: dict, capsys) -> None:
    """No row of the base moves (only its tokenizer changes): every shard of its copy is linked."""
    union = build_union_models(tmp_path / "models", byte_tok)
    config = union_yaml(tmp_path / "merge.yaml", union, ["regular", "regular_added"], base="regular")
    code, out, err = align(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned", "--json")
    assert code == 0, err
    carrier = next(m for m in json.loads(out)["models"] if m.get("reason") == "carries the merged tokenizer")
    report = factories.report_of(Path(carrier["output"]))
    assert not [f for f in report["files"] if f.endswith(".safetensors")] and report["linked"]


def test_a_rerun_that_reuses_everything_does_not_import_mergekit(tmp_path: Path, models: dict[str, Path]) -> None:
    """mergekit's own validation of the YAML (seconds of imports, done in a forked worker
    while the models are read) is kept for the same YAML and the same installed mergekit; a
    changed YAML is validated again. -X importtime names every module imported, by the
    worker too."""
    if __import__("importlib.util").util.find_spec("mergekit") is None:
        pytest.skip("mergekit is not installed: nothing to validate with")
    config = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)])
    argv = [
        sys.executable,
        "-X",
        "importtime",
        str(ROOT / "remap_tokenizer.py"),
        "--mergekit-config",
        str(config),
        "--out_dir",
        str(tmp_path / "a"),
    ]

    def imports_mergekit() -> bool:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return "| mergekit.config" in result.stderr

    assert imports_mergekit() and not imports_mergekit()
    config.write_text(config.read_text().replace("weight: 0.5", "weight: 0.6", 1))
    assert imports_mergekit()
