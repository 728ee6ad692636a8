"""`pip install .` provides the commands; the scripts keep working when run directly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_console_scripts_point_at_the_package() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"compare-tokenizers": "merge_tools.gate.cli:main", "remap-tokenizer": "merge_tools.remap.cli:main"}


def run_on_the_examples(gate: list[str], remap: list[str], cwd: Path, out: Path) -> list[subprocess.CompletedProcess[str]]:
    """The gate on the two example models (--json), and a remap of the chat model onto the base."""
    examples = ROOT / "examples"
    pair = [str(examples / "base-model"), str(examples / "chat-finetune")]
    onto = ["--src_model", pair[1], "--base_tokenizer", pair[0], "--out_dir", str(out), "--drop-extra", "--json"]
    return [
        subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300) for argv in ([*gate, *pair, "--json"], [*remap, *onto])
    ]


def test_scripts_run_alone_on_the_examples(tmp_path: Path) -> None:
    """Each generated script works when copied alone into an empty folder, next to the installed requirements."""
    alone = tmp_path / "alone"
    alone.mkdir()
    for script in ("compare_tokenizers.py", "remap_tokenizer.py"):
        shutil.copyfile(ROOT / script, alone / script)
    gate, remap = run_on_the_examples(
        [sys.executable, "compare_tokenizers.py"], [sys.executable, "remap_tokenizer.py"], alone, tmp_path / "out"
    )
    assert gate.returncode == 1 and json.loads(gate.stdout)["comparisons"][0]["verdict"] == "mismatch", gate.stderr[-2000:]
    assert remap.returncode == 0 and (tmp_path / "out" / "model.safetensors").is_file(), remap.stderr[-2000:]
    assert sorted(p.name for p in alone.iterdir()) == ["compare_tokenizers.py", "remap_tokenizer.py"]


def installed(command: str) -> str:
    path = shutil.which(command, path=str(Path(sys.executable).parent))
    if path is None:
        if os.environ.get("MERGE_TOOLS_CI"):
            pytest.fail(f"{command} is not installed (.ci/run installs the project with pip)")
        pytest.skip(f"{command} is not installed here (pip install .)")
    return path


def test_installed_commands_are_the_package_and_agree_with_the_scripts(tmp_path: Path) -> None:
    """`pip install .` gives the package form: the same reports and the same files as the scripts."""
    package = run_on_the_examples([installed("compare-tokenizers")], [installed("remap-tokenizer")], tmp_path, tmp_path / "package")
    flat = [[sys.executable, str(ROOT / script)] for script in ("compare_tokenizers.py", "remap_tokenizer.py")]
    scripts = run_on_the_examples(*flat, tmp_path, tmp_path / "script")
    assert package[0].stdout == scripts[0].stdout and package[0].returncode == scripts[0].returncode == 1
    reports = [json.loads(result.stdout) for result in (package[1], scripts[1])]
    assert all(result.returncode == 0 for result in (package[1], scripts[1]))
    assert reports[0]["files"] == reports[1]["files"]  # every output file, by its sha256
    head = [Path(installed(name)).read_text(encoding="utf-8", errors="replace") for name in ("compare-tokenizers", "remap-tokenizer")]
    assert "merge_tools.gate.cli" in head[0] and "merge_tools.remap.cli" in head[1]


def test_examples_are_made_by_the_committed_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "examples/make_examples.py", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("base-model", "chat-finetune"):
        for file in ("tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"):
            assert (tmp_path / name / file).read_bytes() == (ROOT / "examples" / name / file).read_bytes(), (name, file)
    assert (tmp_path / "merge.yaml").read_text() == (ROOT / "examples" / "merge.yaml").read_text()
