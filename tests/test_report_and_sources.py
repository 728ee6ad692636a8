"""Inputs and outputs around a remap: where --report may go, `org/name@rev` sources, shards
that change under a running remap, WordPiece continuation pieces."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS
from merge_tools.remap.remap import REPORT_SCHEMA_ID

remap = functools.partial(factories.call_main, rt.main)


@pytest.fixture
def pair(tmp_path: Path, byte_tok: dict) -> tuple[Path, Path]:
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", factories.permuted(byte_tok), **BYTE_SPECIALS)
    return src, base


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("src/model-00001-of-00002.safetensors", "inside the input"),
        ("base", "is a directory"),
        ("base/report.json", "inside the input"),
        ("out/report.json", "inside --out_dir"),
        ("missing/report.json", "does not exist"),
    ],
)
def test_a_bad_report_path_is_refused_before_anything_is_written(
    tmp_path: Path, pair: tuple[Path, Path], where: str, message: str, capsys
) -> None:
    src, base = pair
    before = factories.tree_digest(src)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    report = tmp_path / where.replace("model-00001-of-00002.safetensors", shards[0])
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", tmp_path / "out", "--report", report)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1  # one line, nothing before it
    assert factories.tree_digest(src) == before and not (tmp_path / "out").exists()


def test_a_good_report_path_gets_the_report(tmp_path: Path, pair: tuple[Path, Path], capsys) -> None:
    src, base = pair
    code, _, err = remap(
        capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", tmp_path / "out", "--report", tmp_path / "r.json"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["schema"] == REPORT_SCHEMA_ID


def test_a_report_inside_a_model_of_the_yaml_is_refused(tmp_path: Path, pair: tuple[Path, Path], capsys) -> None:
    src, base = pair
    other = factories.write_model(tmp_path / "other", json.loads((base / "tokenizer.json").read_text()), **BYTE_SPECIALS)
    config = tmp_path / "merge.yaml"
    models = "".join(f"  - model: {path}\n    parameters: {{weight: 0.5}}\n" for path in (other, src))
    config.write_text(f"merge_method: linear\nmodels:\n{models}")
    code, _, err = remap(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned", "--report", other / "r.json")
    assert code == 2 and "inside the input" in err, err
    code, _, err = remap(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned", "--report", config)
    assert code == 2 and "is the input" in err, err
