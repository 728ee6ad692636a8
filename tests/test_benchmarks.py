"""The benchmarks run (at a tiny size): they are measurements, not tests of speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*argv: str) -> str:
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_remap_tiny(tmp_path: Path) -> None:
    out = run("benchmarks/bench_remap.py", "--tiny", "--repeat", "1", "--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "r.json"))
    for contender in ("cp -r", "remap append", "remap drop", "naive"):
        assert f"| {contender} |" in out
    assert "budgets: RssAnon" in out


def test_bench_compare_tiny(tmp_path: Path) -> None:
    out = run("benchmarks/bench_compare.py", "--tokens", "1500", "--runs", "1", "--workdir", str(tmp_path))
    assert "| identical (two copies of one tokenizer.json) |" in out and "| 5% missing, 1% new, ids shuffled |" in out


def test_bench_fvt_tiny(tmp_path: Path) -> None:
    out = run("benchmarks/bench_fvt.py", "--tokens", "3000", "--missing", "500", "--hidden", "64", "--workdir", str(tmp_path))
    assert "500 missing tokens" in out and "total:" in out


def test_init_quality_demo_tiny(tmp_path: Path) -> None:
    out = run(
        "benchmarks/init_quality.py", "--demo", "--steps", "3", "--init", "fvt", "mean", "--match", "exact", "--workdir", str(tmp_path)
    )
    lines = [line for line in out.splitlines() if line.startswith("| remapped")]
    assert len(lines) == 2 and "| original (own tokenizer) |" in out


def test_bench_omp_tiny() -> None:
    out = run("benchmarks/bench_omp.py", "--missing", "50", "--shared", "400", "--hidden", "32", "--model-hidden", "16", "--k", "8")
    assert "50 missing x 400 shared rows, width 32, k 8" in out and "OMP " in out


def test_bench_gate_tiny(tmp_path: Path) -> None:
    out = run(
        "benchmarks/bench_gate.py",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--intermediate",
        "128",
        "--vocab",
        "2000",
        "--runs",
        "1",
        "--workdir",
        str(tmp_path),
    )
    assert "tokenizer-only gate" in out and "x (median of 1)" in out


@pytest.mark.e2e
def test_merge_fidelity_demo_tiny(tmp_path: Path) -> None:
    pytest.importorskip("mergekit")
    out = run("benchmarks/merge_fidelity.py", "--demo", "--steps", "3", "--init", "fvt", "donor", "--workdir", str(tmp_path))
    rows = [line for line in out.splitlines() if line.startswith("| donor")]
    assert len(rows) == 2 and all("| 0.0 % |" in row for row in rows)


@pytest.mark.e2e
def test_union_fidelity_tiny(tmp_path: Path) -> None:
    pytest.importorskip("mergekit")
    sys.path.insert(0, str(ROOT / "tests"))
    import factories

    base = factories.write_model(
        tmp_path / "base", factories.byte_level_bpe(), arch="llama_tied", shard_size="1GB", **factories.BYTE_SPECIALS
    )
    out = run("benchmarks/union_fidelity.py", "--model", str(base), "--workdir", str(tmp_path / "w"), "--dtypes", "float32", "--seeds")
    lines = {line.split(" | ")[0]: line for line in out.splitlines() if line.startswith("| base + 3")}
    assert "| yes |" in lines["| base + 3 siblings, float32"]
    assert (
        "exit 1 (KeyError" in lines["| base + 3 siblings + ghost, float32"]
        and "exit 0 + exit 0" in lines["| base + 3 siblings + ghost, float32"]
    )


def test_bench_audit_tiny(tmp_path: Path) -> None:
    argv = ["--layers", "1", "2", "--hidden", "64", "--intermediate", "128", "--vocab", "1000", "--workdir", str(tmp_path), "--repeat", "1"]
    out = run("benchmarks/bench_audit.py", *argv)
    rows = [line for line in out.splitlines() if line.startswith("| 3 × ")]
    assert len(rows) == 2 and "warm page cache" in out


def test_bench_align_tiny(tmp_path: Path) -> None:
    argv = ["--tiny", "--repeat", "1", "--workdir", str(tmp_path / "w"), "--before", str(ROOT / "remap_tokenizer.py")]
    out = run("benchmarks/bench_align.py", *argv)
    assert "| align --copy |" in out and "| align linked |" in out and "linked: wrote" in out
    assert "| before: align linked |" in out and "before: linked" in out
    assert "| cp: what linked writes |" in out and "× its cp" in out
    if (Path(sys.executable).with_name("mergekit-yaml")).exists():
        assert "| mergekit union |" in out and "× mergekit's own" in out
