"""`pip install .` provides the commands; the scripts keep working when run directly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_console_scripts_point_at_main() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"compare-tokenizers": "compare_tokenizers:main", "remap-tokenizer": "remap_tokenizer:main"}


@pytest.mark.parametrize("script", ["compare_tokenizers.py", "remap_tokenizer.py"])
def test_scripts_run_directly_and_alone(tmp_path: Path, script: str) -> None:
    """Each script works when copied alone next to the installed requirements."""
    shutil.copyfile(ROOT / script, tmp_path / script)
    result = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "exit codes:" in result.stdout


@pytest.mark.parametrize("command", ["compare-tokenizers", "remap-tokenizer"])
def test_installed_commands(command: str) -> None:
    path = shutil.which(command, path=str(Path(sys.executable).parent))
    if path is None:
        if os.environ.get("MERGE_TOOLS_CI"):
            pytest.fail(f"{command} is not installed (.ci/run installs the project with pip)")
        pytest.skip(f"{command} is not installed here (pip install .)")
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "exit codes:" in result.stdout


def test_examples_are_made_by_the_committed_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "examples/make_examples.py", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("base-model", "chat-finetune"):
        for file in ("tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"):
            assert (tmp_path / name / file).read_bytes() == (ROOT / "examples" / name / file).read_bytes(), (name, file)
    assert (tmp_path / "merge.yaml").read_text() == (ROOT / "examples" / "merge.yaml").read_text()
