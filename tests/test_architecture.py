"""The gate checks the whole merge from config.json and safetensors headers: architecture,
tensors, layers, inherited config values and the merge method; the alignment refuses what
the gate fails before writing anything. The e2e test holds each verdict against mergekit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import compare_tokenizers as ct
import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS

# case -> (config overrides of the sibling, arch, merge configuration shape, gate status, gate exit code)
CASES = {
    "same": ({}, "llama", "models", "ok", 0),
    "one layer more": ({"num_hidden_layers": 3}, "llama", "models", "fail", 1),
    "intermediate size": ({"intermediate_size": 48}, "llama", "models", "fail", 1),
    "rope_theta": ({"rope_theta": 500000.0}, "llama", "models", "warn", 0),
    "tied": ({"tie_word_embeddings": True}, "llama", "models", "ok", 0),
    "no base_model": ({}, "llama", "task_arithmetic without base", "merge", 1),
    "slice past the layers": ({}, "llama", "slice [0, 3]", "merge", 1),
    "slices of unequal length": ({}, "llama", "slices 2 and 1", "merge", 1),
    "passthrough grows the depth": ({}, "llama", "passthrough", "ok", 0),
    # layer 1 of the sibling lacks a tensor layer 0 has: the layer template alone hides it
    "a tensor missing in one layer": ({"_drop": "model.layers.1.mlp.down_proj.weight"}, "llama", "models", "fail", 1),
    # layer 1 saved as layer 5: the config's 2 layers are not all there
    "a layer renumbered": ({"_renumber": ("model.layers.1.", "model.layers.5.")}, "llama", "models", "fail", 1),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, byte_tok: dict) -> Path:
    return factories.write_model(tmp_path_factory.mktemp("arch") / "base", byte_tok, seed=1, **BYTE_SPECIALS)


def sibling(tmp_path: Path, byte_tok: dict, overrides: dict) -> Path:
    if overrides.get("tie_word_embeddings"):
        return factories.write_model(
            tmp_path / "sibling", byte_tok, seed=2, arch="llama_tied", config_overrides={"num_hidden_layers": 2}, **BYTE_SPECIALS
        )
    edits = {key: overrides[key] for key in ("_drop", "_renumber") if key in overrides}
    overrides = {key: value for key, value in overrides.items() if key not in edits}
    directory = factories.write_model(tmp_path / "sibling", byte_tok, seed=2, config_overrides=overrides, **BYTE_SPECIALS)
    return edit_tensors(directory, **edits) if edits else directory


def edit_tensors(directory: Path, _drop: str | None = None, _renumber: tuple[str, str] | None = None) -> Path:
    """A checkpoint saved with a tensor missing, or a layer's tensors under another number
    (shards and index rewritten with the safetensors library, as a broken export would)."""
    from safetensors.torch import load_file, save_file

    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted({*index["weight_map"].values()}):
        state = load_file(directory / shard)
        state = {(name.replace(*_renumber) if _renumber else name): value for name, value in state.items() if name != _drop}
        save_file(state, directory / shard, metadata={"format": "pt"})
    weight_map = {(name.replace(*_renumber) if _renumber else name): file for name, file in index["weight_map"].items() if name != _drop}
    index_path.write_text(json.dumps({**index, "weight_map": weight_map}))
    return directory


def merge_config(shape: str, base: Path, other: Path) -> dict:
    if shape == "models":
        return {
            "merge_method": "linear",
            "base_model": str(base),
            "dtype": "float32",
            "models": [{"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(other), "parameters": {"weight": 0.5}}],
        }
    if shape == "task_arithmetic without base":
        return {
            "merge_method": "task_arithmetic",
            "dtype": "float32",
            "models": [{"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(other), "parameters": {"weight": 0.5}}],
        }
    if shape == "passthrough":
        return {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(other), "layer_range": [1, 2]}]},
            ],
        }
    ranges = {"slice [0, 3]": ([0, 3], [0, 3]), "slices 2 and 1": ([0, 2], [0, 1])}[shape]
    return {
        "merge_method": "linear",
        "base_model": str(base),
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": str(base), "layer_range": ranges[0], "parameters": {"weight": 0.5}},
                    {"model": str(other), "layer_range": ranges[1], "parameters": {"weight": 0.5}},
                ]
            }
        ],
    }


def gate(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = ct.main(["--mergekit-config", str(config), "--weights", "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("case", list(CASES))
def test_the_gate_checks_the_architecture(tmp_path: Path, base: Path, byte_tok: dict, capsys, case: str) -> None:
    overrides, _, shape, status, code = CASES[case]
    other = sibling(tmp_path, byte_tok, overrides)
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(merge_config(shape, base, other)))
    result, report = gate(capsys, config)
    assert result == code, report
    if status == "merge":
        assert report["merge"]["status"] == "fail" and report["merge"]["problems"]
    else:
        architecture = report["comparisons"][0]["checks"]["architecture"]
        assert architecture["status"] == status, architecture
        assert report["merge"] == {"status": "ok", "problems": []}
    if status == "warn":
        assert gate(capsys, config, "--strict")[0] == 1
    # the alignment runs the same check first: a failing merge is refused before any byte is written
    aligned = tmp_path / "aligned"
    capsys.readouterr()
    align_code = rt.main(["--mergekit-config", str(config), "--out_dir", str(aligned)])
    err = capsys.readouterr().err
    if code == 1:
        assert align_code == 2 and "nothing was remapped" in err, err
        assert not aligned.exists()
    else:
        assert align_code == 0, err


def test_lora_references_are_not_checked(tmp_path: Path, base: Path, byte_tok: dict, capsys) -> None:
    other = sibling(tmp_path, byte_tok, {})
    config = tmp_path / "merge.yaml"
    models = [{"model": str(base), "parameters": {"weight": 1.0}}, {"model": f"{other}+some/lora", "parameters": {"weight": 1.0}}]
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    _, report = gate(capsys, config)
    assert report["comparisons"][0]["checks"]["architecture"]["status"] == "skipped"
    assert "LoRA" in report["comparisons"][0]["checks"]["architecture"]["summary"]


def test_the_human_report_names_the_merge_problems(tmp_path: Path, base: Path, byte_tok: dict, capsys) -> None:
    other = sibling(tmp_path, byte_tok, {"intermediate_size": 48})
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(merge_config("task_arithmetic without base", base, other)))
    capsys.readouterr()
    assert ct.main(["--mergekit-config", str(config), "--weights"]) == 1
    out = capsys.readouterr().out
    assert "merge  FAIL merge_method task_arithmetic needs a base_model" in out and "no model was read" in out
    config.write_text(yaml.safe_dump({**merge_config("task_arithmetic without base", base, other), "base_model": str(base)}))
    assert ct.main(["--mergekit-config", str(config), "--weights"]) == 1
    assert "architecture    FAIL intermediate_size 48, the base has 64" in capsys.readouterr().out


@pytest.mark.e2e
@pytest.mark.slow
def test_the_gate_agrees_with_mergekit(tmp_path: Path, base: Path, byte_tok: dict, capsys) -> None:
    """Every case the gate fails, mergekit fails too; every case it passes (warnings
    included: mergekit then takes the base's value), mergekit merges."""
    pytest.importorskip("mergekit")
    mergekit_yaml = Path(sys.executable).with_name("mergekit-yaml")
    for case, (overrides, _, shape, status, code) in CASES.items():
        work = tmp_path / case.replace(" ", "_")
        work.mkdir()
        config = work / "merge.yaml"
        config.write_text(yaml.safe_dump(merge_config(shape, base, sibling(work, byte_tok, overrides))))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        merged = subprocess.run(
            [str(mergekit_yaml), str(config), str(work / "merged"), "--copy-tokenizer"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert (merged.returncode == 0) == (code == 0), (case, merged.stderr[-2000:])
        if status == "warn":  # the merged model silently has the base's rope_theta
            merged_config = json.loads((work / "merged" / "config.json").read_text())
            theta = merged_config.get("rope_theta", (merged_config.get("rope_parameters") or {}).get("rope_theta"))
            assert theta == 10000.0 != overrides["rope_theta"], merged_config


def test_no_model_is_called_safe_to_merge_under_a_failing_merge(tmp_path: Path, base: Path, byte_tok: dict, capsys) -> None:
    other = sibling(tmp_path, byte_tok, {})
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(merge_config("slice [0, 3]", base, other)))
    capsys.readouterr()
    assert ct.main(["--mergekit-config", str(config), "--weights"]) == 1
    out = capsys.readouterr().out
    assert "merge  FAIL" in out and "safe to merge" not in out and "identical (but the merge fails" in out, out


@pytest.mark.parametrize(
    "base_tied, other_tied, level",
    [(False, False, None), (True, True, None), (False, True, "info"), (True, False, "warn")],
)
def test_a_tied_base_with_an_untied_model_warns_with_the_fix(base_tied: bool, other_tied: bool, level: str | None) -> None:
    """mergekit keeps the base's config: a tied base over an untied model's merged lm_head is
    a config transformers 4 reads differently from 5 (the e2e test merges it for real)."""
    from merge_tools.common.merge_check import ModelFacts, compare_models

    found = compare_models(
        ModelFacts({"tie_word_embeddings": base_tied}, None), ModelFacts({"tie_word_embeddings": other_tied}, None), False, False
    )
    tie = [(found_level, message) for found_level, message in found if "tie_word_embeddings" in message]
    assert [found_level for found_level, _ in tie] == ([level] if level else [])
    if level == "warn":
        assert "set tie_word_embeddings: false in the merged config.json" in tie[0][1]
