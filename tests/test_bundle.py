"""tools/bundle.py writes the two self-contained scripts from the merge_tools package: they
are fresh, and the build refuses what would make a script differ from the package."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bundle

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_scripts_are_a_fresh_build() -> None:
    result = subprocess.run([sys.executable, "tools/bundle.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the package and the scripts that the bundler builds instead of the real ones."""
    shutil.copytree(ROOT / "merge_tools", tmp_path / "merge_tools")
    for script in bundle.SCRIPTS:
        shutil.copyfile(ROOT / script, tmp_path / script)
    monkeypatch.setattr(bundle, "ROOT", tmp_path)  # the bundler's root: the package and scripts it reads and writes
    monkeypatch.setattr(bundle, "PACKAGE", tmp_path / "merge_tools")
    return tmp_path


def test_an_edited_package_makes_the_scripts_stale_until_rebuilt(package: Path, capsys) -> None:
    with (package / "merge_tools" / "common" / "logs.py").open("a", encoding="utf-8") as handle:
        handle.write("\n\nEDITED = True\n")
    assert bundle.main(["--check"]) == 1
    assert "compare_tokenizers.py differs from a fresh build" in capsys.readouterr().err
    assert bundle.main([]) == 0 and bundle.main(["--check"]) == 0
    assert "EDITED = True" in (package / "remap_tokenizer.py").read_text()


@pytest.mark.parametrize(
    ("module", "code", "message"),
    [
        (
            "gate/report.py",
            "\n\ndef quoted(token: str) -> str:\n    return token\n",
            "the name quoted is defined in merge_tools/common/cli.py",
        ),
        ("common/spellings.py", "from merge_tools.common.cli import quoted\n", "imports merge_tools.common.cli at run time"),
        ("common/spellings.py", "\nimport json  # noqa: E402\n", "common/spellings.py:92: an import after the code"),
        ("gate/extra.py", '"""A module nobody listed."""\n', "modules not listed in tools/bundle.py: gate/extra"),
    ],
)
def test_the_build_refuses(package: Path, capsys, module: str, code: str, message: str) -> None:
    path = package / "merge_tools" / module
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if code.startswith("from merge_tools"):  # into the import block
        text = text.replace("from __future__ import annotations\n", "from __future__ import annotations\n\n" + code, 1)
    else:
        text += code
    path.write_text(text, encoding="utf-8")
    assert bundle.main([]) == 2
    assert message in capsys.readouterr().err


def test_scripts_have_one_import_block_and_numpy_after_the_signal_handlers() -> None:
    for script in bundle.SCRIPTS:
        text = (ROOT / script).read_text(encoding="utf-8")
        tree = ast.parse(text)
        assert "do not edit it by hand" in text.split('"""')[2]
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert not [node for node in imports if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("merge_tools")]
        handlers = text.index("signal.signal(_signum, _signal_outside_main)")
        numpy = [node.lineno for node in imports if any(alias.name == "numpy" for alias in node.names)]
        top = max(node.lineno for node in imports if node.lineno < text[:handlers].count("\n"))
        assert all(line > text[:handlers].count("\n") for line in numpy)  # remap: after the handlers; the gate: never at import
        assert top < 80 and all(node.lineno <= top or node.lineno in numpy for node in imports)
        assert "# merge_tools/common/errors.py" in text and f"# merge_tools/{bundle.SCRIPTS[script][0]}/cli.py" in text
