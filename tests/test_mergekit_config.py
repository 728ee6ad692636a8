"""The merge configuration as mergekit reads it, from the YAML alone: merge methods and
their parameters, dtypes, duplicates; the project's table against the installed mergekit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import factories
import remap_tokenizer as rt
from merge_tools.common.mergekit_config import MERGEKIT_DTYPES, MERGEKIT_METHODS, installed_mergekit_methods, mergekit_config_problems

ROOT = Path(__file__).resolve().parent.parent


def problems(config: dict) -> list[str]:
    return mergekit_config_problems(config, MERGEKIT_METHODS)


def weighted(*models: str, weight: float = 0.5) -> list[dict]:
    return [{"model": model, "parameters": {"weight": weight}} for model in models]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"merge_method": "dare-ties", "base_model": "a", "models": weighted("a", "b")}, "(did you mean dare_ties?)"),
        ({"merge_method": "Linear", "models": weighted("a", "b")}, "(did you mean linear?)"),
        ({"merge_method": "linear", "models": [{"model": "a"}, *weighted("b")]}, "models[0]: merge_method linear needs parameters"),
        ({"merge_method": "ties", "models": weighted("a", "b")}, "merge_method ties needs a base_model"),
        ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]}, "slerp needs parameters: {t: ...}"),
        ({"merge_method": "linear", "dtype": "bf16", "models": weighted("a", "b")}, "dtype 'bf16' is not one mergekit knows"),
        ({"merge_method": "linear", "out_dtype": "fp32", "models": weighted("a", "b")}, "out_dtype 'fp32'"),
        ({"merge_method": "linear", "models": weighted("a", "b", "a")}, "models[2]: a is listed twice"),
    ],
)  # fmt: skip
def test_what_mergekit_refuses(config: dict, expected: str) -> None:
    found = problems(config)
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize(
    "config",
    [
        {"merge_method": "linear", "dtype": "torch.bfloat16", "models": weighted("a", "b")},
        {"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": "a"}, {"model": "b"}]},
        {"merge_method": "task_arithmetic", "base_model": "a", "models": [{"model": "a"}, *weighted("b")]},  # the base needs no weight
        {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5}, "models": [{"model": "a"}, {"model": "b"}]},
        {"merge_method": "linear", "models": weighted("./m", "m/")},  # two spellings: two inputs to mergekit
        {"merge_method": "model_stock", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}]},
    ],
)
def test_what_mergekit_accepts(config: dict) -> None:
    assert problems(config) == []


def test_a_refused_configuration_fails_before_any_download(tmp_path: Path) -> None:
    """Hub ids behind a port nothing listens on: the YAML alone decides, at once."""
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "dare-ties", "base_model": "org/base", "models": weighted("org/a", "org/b")}))
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "compare_tokenizers.py"), "--mergekit-config", str(config), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["merge"]["problems"] == ["merge_method 'dare-ties' is not a mergekit merge method (did you mean dare_ties?)"]
    assert not (tmp_path / "hf").exists() and time.monotonic() - started < 20
    human = subprocess.run(
        [sys.executable, str(ROOT / "compare_tokenizers.py"), "--mergekit-config", str(config)], env=env, capture_output=True, text=True
    )
    assert human.returncode == 1 and "merge  FAIL merge_method 'dare-ties'" in human.stdout and "no model was read" in human.stdout


def test_the_alignment_refuses_what_mergekit_would(tmp_path: Path, byte_tok: dict, capsys) -> None:
    model = factories.write_model(tmp_path / "m", byte_tok, **factories.BYTE_SPECIALS)
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(model)}, {"model": str(model)}]}))
    code, _, err = factories.call_main(rt.main, capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned")
    assert code == 2 and "mergekit would refuse it" in err and "needs parameters: {weight: ...}" in err and "listed twice" in err, err
    assert not (tmp_path / "aligned").exists()


@pytest.mark.e2e
def test_the_table_is_the_installed_mergekit() -> None:
    pytest.importorskip("mergekit")
    assert installed_mergekit_methods() == MERGEKIT_METHODS
    import torch
    from mergekit.common import dtype_from_name

    assert all(isinstance(dtype_from_name(name), torch.dtype) for name in MERGEKIT_DTYPES)


@pytest.mark.e2e
def test_what_only_mergekits_schema_refuses_is_refused_before_anything_is_published(tmp_path: Path, byte_tok: dict, capsys) -> None:
    """mergekit's verdict comes from a forked worker while the first remap is already at
    work: a refusal still leaves nothing behind (chat_template must be text)."""
    pytest.importorskip("mergekit")
    from merge_fixtures import build_models

    models = build_models(tmp_path / "models", byte_tok)
    config = tmp_path / "merge.yaml"
    entries = [{"model": str(models[name]), "parameters": {"weight": 0.5}} for name in ("base", "chat")]
    config.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": str(models["base"]), "models": entries, "chat_template": 5}))
    code, _, err = factories.call_main(rt.main, capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned")
    assert code == 2 and "mergekit would refuse it: chat_template: Input should be a valid string" in err, err
    assert not (tmp_path / "aligned").exists()
