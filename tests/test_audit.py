"""compare_tokenizers.py --audit / --plot: what each model of a merge contributes, from its
weights. Models are built with task vectors of known scale (per model and per layer, one a
near-copy of another), and every figure is checked against the value computed directly
from the whole tensors (within 1 %)."""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import compare_tokenizers as ct
import factories
from merge_tools.gate.audit import TensorSums, layer_of, summarize_audit
from merge_tools.gate.audit_reading import audit_plan, stored_tensors

gate = functools.partial(factories.call_main, ct.main)
LAYERS = 4
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def variant(base: Path, out: Path, scales: list[float], seed: int, dtype: torch.dtype = torch.float32, start: dict | None = None) -> dict:
    """`base` (or `start`) plus Gaussian noise of scale `scales[layer]` in each decoder
    layer and scales[0] elsewhere, saved as one safetensors file beside base's configs."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in (start or factories.tensors(base)).items():
        layer = layer_of(name)
        scale = scales[layer] if layer is not None else scales[0]
        tensors[name] = (tensor.double() + torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
    out.mkdir(parents=True)
    for file in base.iterdir():
        if file.suffix == ".json" and "safetensors" not in file.name:
            shutil.copy(file, out / file.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return tensors


@pytest.fixture(scope="module")
def merge(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """base; a (layer 3 moved 10x its others); c (a near-copy of a); d (hardly moved)."""
    root = tmp_path_factory.mktemp("audit")
    base = factories.write_model(
        root / "base", factories.byte_level_bpe(), seed=1, config_overrides={"num_hidden_layers": LAYERS}, **factories.BYTE_SPECIALS
    )
    tensors = {"base": factories.tensors(base)}
    tensors["a"] = variant(base, root / "a", [0.01, 0.01, 0.01, 0.1], seed=2)
    tensors["c"] = variant(base, root / "c", [1e-4] * LAYERS, seed=3, start=tensors["a"])
    tensors["d"] = variant(base, root / "d", [1e-4] * LAYERS, seed=4)
    return {"root": root, "tensors": tensors, "weights": {"a": 0.4, "c": 0.3, "d": 0.3}}


def write_yaml(root: Path, path: Path, weights: dict[str, float], base: str | None = "base") -> Path:
    config = {"merge_method": "linear" if base is None else "task_arithmetic", "dtype": "float32"}
    if base is not None:
        config["base_model"] = str(root / base)
    config["models"] = [{"model": str(root / name), "parameters": {"weight": weight}} for name, weight in weights.items()]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def expected(tensors: dict[str, dict], weights: dict[str, float], base: str | None) -> dict:
    """The audit's figures, computed directly from the whole tensors (float64)."""
    names = ([base] if base else []) + list(weights)
    body = [t for t in tensors[names[0]] if t not in VOCAB]
    reference = {t: tensors[base][t].double() if base else torch.stack([tensors[n][t].double() for n in names]).mean(0) for t in body}
    delta = {n: {t: tensors[n][t].double() - reference[t] for t in body} for n in names}
    norm = {n: math.sqrt(sum(float((d**2).sum()) for d in delta[n].values())) for n in names}
    reference_norm = math.sqrt(sum(float((r**2).sum()) for r in reference.values()))
    voiced = [n for n in names if n != base]
    total = sum(weights[n] * norm[n] for n in voiced)
    layers = {
        n: [math.sqrt(sum(float((d**2).sum()) for t, d in delta[n].items() if layer_of(t) == i)) for i in range(LAYERS)] for n in names
    }
    cosine = {
        (a, b): sum(float((delta[a][t] * delta[b][t]).sum()) for t in body) / (norm[a] * norm[b])
        for a, b in itertools.combinations(voiced, 2)
    }
    share = {n: weights[n] * norm[n] / total for n in voiced}
    return {"norm": norm, "relative": {n: norm[n] / reference_norm for n in names}, "share": share, "layers": layers, "cosine": cosine}


def close(value: float, wanted: float) -> bool:
    return math.isclose(value, wanted, rel_tol=0.01, abs_tol=1e-9)


def check_figures(audit: dict, want: dict, root: Path) -> None:
    by_name = {Path(m["model"]).name: m for m in audit["models"]}
    for name, model in by_name.items():
        assert close(model["task_vector_norm"], want["norm"][name]), name
        assert close(model["relative_norm"], want["relative"][name]), name
        assert all(close(a, b) for a, b in zip(model["layers"], want["layers"][name])) and len(model["layers"]) == LAYERS
        if name in want["share"]:
            assert close(model["share"], want["share"][name]), name
    for pair in audit["pairs"]:
        key = (Path(pair["a"]).name, Path(pair["b"]).name)
        assert close(pair["cosine"], want["cosine"][key]), key


def test_every_figure_matches_the_direct_computation(merge: dict, tmp_path: Path, capsys) -> None:
    config = write_yaml(merge["root"], tmp_path / "merge.yaml", merge["weights"])
    code, out, err = gate(capsys, "--mergekit-config", config, "--audit", "--json")
    assert code == 0, err
    audit = json.loads(out)["audit"]
    assert audit["reference"] == str(merge["root"] / "base") and audit["skipped"] == []
    check_figures(audit, expected(merge["tensors"], merge["weights"], "base"), merge["root"])
    # the base takes no share; the tensors that moved most are named; vocabulary tensors apart
    models = {Path(m["model"]).name: m for m in audit["models"]}
    assert models["base"]["share"] is None and models["base"]["task_vector_norm"] == 0
    assert models["a"]["top_tensors"][0]["tensor"].startswith("model.layers.3.")
    vocabulary = {(Path(v["model"]).name, v["tensor"]): v["norm"] for v in audit["vocabulary_tensors"]}
    delta = merge["tensors"]["a"]["lm_head.weight"].double() - merge["tensors"]["base"]["lm_head.weight"].double()
    assert close(vocabulary[("a", "lm_head.weight")], float(delta.norm()))
    flags = audit["flags"]
    assert any("a" in f and "c" in f and "near-duplicates" in f for f in flags)
    assert any(f.startswith(str(merge["root"] / "d")) and "hardly contributes" in f for f in flags)
    assert any(f.startswith(str(merge["root"] / "a") + ": layer 3 moved") for f in flags)
    code, text, _ = gate(capsys, "--mergekit-config", config, "--audit")
    assert code == 0 and "audit  against" in text and "near-duplicates" in text and "hardly contributes" in text


def test_bf16_and_the_mean_as_reference(merge: dict, tmp_path: Path, capsys) -> None:
    """bf16 weights are read by widening their bits; without base_model the reference is
    the mean of the models, and every model takes a share."""
    root, base = tmp_path / "bf16", merge["root"] / "base"
    still = [0.0] * LAYERS
    tensors = {
        name: variant(base, root / name, still, seed=0, dtype=torch.bfloat16, start=merge["tensors"][name]) for name in ("a", "c", "d")
    }
    weights = {"a": 1.0, "c": 1.0, "d": 2.0}
    config = write_yaml(root, tmp_path / "merge.yaml", weights, base=None)
    code, out, err = gate(capsys, "--mergekit-config", config, "--audit", "--json")
    assert code == 0, err
    audit = json.loads(out)["audit"]
    assert audit["reference"] == "mean of the models"
    check_figures(audit, expected(tensors, weights, None), root)
    assert all(m["share"] is not None for m in audit["models"])


def test_models_of_another_shape_are_refused(merge: dict, tmp_path: Path, capsys) -> None:
    other = factories.write_model(
        tmp_path / "wide",
        factories.byte_level_bpe(),
        seed=5,
        config_overrides={"num_hidden_layers": LAYERS, "intermediate_size": 48},
        **factories.BYTE_SPECIALS,
    )
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": str(merge["root"] / "base"),
                                      "models": [{"model": str(other), "parameters": {"weight": 1.0}}]}))  # fmt: skip
    code, out, err = gate(capsys, "--mergekit-config", config, "--audit")
    assert code == 2 and out == "" and "the architecture check" in err and "intermediate_size" in err


def test_plot(merge: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    config = write_yaml(merge["root"], tmp_path / "merge.yaml", merge["weights"])
    code, _, err = gate(capsys, "--mergekit-config", config, "--plot", tmp_path / "audit.png")
    assert code == 0, err
    assert (tmp_path / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "audit.png").stat().st_size > 10_000
    # stands for an environment without matplotlib installed: refused before anything is read
    real = ct.importlib.util.find_spec
    monkeypatch.setattr(ct.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, out, err = gate(capsys, "--mergekit-config", config, "--plot", tmp_path / "again.png")
    assert code == 2 and out == "" and "--plot needs matplotlib: pip install 'merge_tools[plot]'" in err
    assert not (tmp_path / "again.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["REF", "OTHER", "--audit"], "--audit needs --mergekit-config"),
        (["--mergekit-config", "CONFIG", "--audit", "--no-weights"], "--audit reads the weights"),
        (["--mergekit-config", "CONFIG", "--plot", "MISSING/x.png"], "--plot MISSING/x.png: not a file in an existing directory"),
        (["--mergekit-config", "CONFIG", "--plot", "OTHER/audit.png"], "inside the model directory"),
    ],
)
def test_audit_usage_errors(merge: dict, tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    config = write_yaml(merge["root"], tmp_path / "merge.yaml", merge["weights"])
    swap = {"REF": str(merge["root"] / "base"), "OTHER": str(merge["root"] / "a"), "CONFIG": str(config), "MISSING": str(tmp_path / "no")}
    code, out, err = gate(capsys, *[functools.reduce(lambda text, key: text.replace(key, swap[key]), swap, a) for a in argv])
    assert code == 2 and out == "" and message.replace("MISSING", str(tmp_path / "no")) in err


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.integers(1, 4), st.booleans(), st.randoms(use_true_random=False))
def test_summarize_audit_from_sums(models: int, tensors: int, with_base: bool, rng) -> None:
    """The pure summary against numpy on the deltas themselves."""
    generator = np.random.default_rng(rng.randint(0, 2**31))
    names = [f"m{i}" for i in range(models)]
    weights = {n: float(generator.uniform(0.1, 2)) for n in names}
    deltas = {
        f"model.layers.{t}.w": generator.normal(size=(models, 7)) * generator.uniform(0.1, 3, size=(models, 1)) for t in range(tensors)
    }
    if with_base:
        for d in deltas.values():
            d[0] = 0
    sums = [TensorSums(name, d @ d.T, float(generator.uniform(1, 5))) for name, d in deltas.items()]
    audit = summarize_audit(names, weights, sums, "m0" if with_base else None)
    flat = np.concatenate(list(deltas.values()), axis=1)
    norms = np.linalg.norm(flat, axis=1)
    voiced = names[1:] if with_base else names
    total = sum(weights[n] * norms[names.index(n)] for n in voiced)
    for i, m in enumerate(audit.models):
        assert math.isclose(m.task_vector_norm, norms[i], rel_tol=1e-9, abs_tol=1e-12)
        assert (m.share is None) == (with_base and i == 0)
        if m.share is not None:
            assert math.isclose(m.share, weights[m.model] * norms[i] / total, rel_tol=1e-9)
        assert math.isclose(m.relative_norm, norms[i] / math.sqrt(sum(s.reference_square for s in sums)), rel_tol=1e-9, abs_tol=1e-12)
    for a, b, cosine in audit.pairs:
        i, j = names.index(a), names.index(b)
        assert math.isclose(cosine, float(flat[i] @ flat[j]) / (norms[i] * norms[j]), rel_tol=1e-9, abs_tol=1e-12)


def test_the_audit_never_imports_torch(merge: dict, tmp_path: Path) -> None:
    """compare_tokenizers.py stays free of torch: the audit is numpy (bf16 widened by its bits)."""
    config = write_yaml(merge["root"], tmp_path / "merge.yaml", merge["weights"])
    probe = (
        f"import sys, compare_tokenizers as ct; code = ct.main(['--mergekit-config', {str(config)!r}, '--audit', '--json']); "
        "print('torch' in sys.modules, code, file=sys.stderr)"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)), timeout=120
    )
    assert result.stderr.strip().splitlines()[-1] == "False 0", result.stderr[-2000:]
    assert json.loads(result.stdout)["audit"]["models"]


# ---- what the audit may conclude, and broken models (issue 28) -----------------------------


def strict_loads(text: str) -> dict:
    """JSON as strict readers take it: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in --json output")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinite_weights_fail_the_merge_check(merge: dict, tmp_path: Path, capsys) -> None:
    root, base = tmp_path / "broken", merge["root"] / "base"
    start = {name: tensor.clone() for name, tensor in merge["tensors"]["d"].items()}
    start["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    start["model.layers.2.mlp.up_proj.weight"][3, 1] = float("inf")
    variant(base, root / "d", [0.0] * LAYERS, seed=0, start=start)
    shutil.copytree(merge["root"] / "a", root / "a")
    shutil.copytree(base, root / "base")
    config = write_yaml(root, tmp_path / "merge.yaml", {"a": 0.5, "d": 0.5})
    code, out, err = gate(capsys, "--mergekit-config", config, "--audit", "--json")
    report = strict_loads(out)
    assert code == 1 and report["merge"]["status"] == "fail" and "RuntimeWarning" not in err, err
    named = [p for p in report["merge"]["problems"] if str(root / "d") in p]
    assert any("model.layers.1.mlp.up_proj.weight holds NaN or infinite values" in p for p in named), named
    assert any("model.layers.2.mlp.up_proj.weight" in p for p in named)
    figures = [m["share"] for m in report["audit"]["models"]] + [m["task_vector_norm"] for m in report["audit"]["models"]]
    assert all(f is None or math.isfinite(f) for f in figures)
    code, text, _ = gate(capsys, "--mergekit-config", config, "--audit")
    assert code == 1 and "nan%" not in text and " nan " not in text and "FAIL  " in text


def test_a_reference_of_zeros_has_no_relative_change(merge: dict, tmp_path: Path, capsys) -> None:
    root, base = tmp_path / "zeros", merge["root"] / "base"
    zeroed = {name: tensor.clone() for name, tensor in merge["tensors"]["base"].items()}
    zeroed["model.layers.0.mlp.up_proj.weight"].zero_()
    variant(base, root / "base", [0.0] * LAYERS, seed=0, start=zeroed)
    shutil.copytree(merge["root"] / "a", root / "a")
    config = write_yaml(root, tmp_path / "merge.yaml", {"a": 1.0})
    code, out, _ = gate(capsys, "--mergekit-config", config, "--audit", "--json")
    audit = strict_loads(out)["audit"]
    relative = [t["relative"] for m in audit["models"] for t in m["top_tensors"] if t["tensor"] == "model.layers.0.mlp.up_proj.weight"]
    assert code == 0 and relative == [None] and any("no relative change (null)" in f for f in audit["flags"])


def test_without_a_base_no_conclusion_is_drawn_from_the_mean(merge: dict, tmp_path: Path, capsys) -> None:
    """Against the mean of two models every cosine is -1: no 'conflict' from that; with
    --audit-base the figures are the base case's."""
    weights = {"a": 0.5, "d": 0.5}
    config = write_yaml(merge["root"], tmp_path / "merge.yaml", weights, base=None)
    code, out, _ = gate(capsys, "--mergekit-config", config, "--audit", "--json")
    audit = json.loads(out)["audit"]
    assert code == 0 and audit["pairs"][0]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert not any(word in f for f in audit["flags"] for word in ("conflict", "near-duplicates", "contributes", "dominates"))
    assert any("no base_model: task vectors are measured from the mean" in n for n in audit["notes"])
    code, out, _ = gate(capsys, "--mergekit-config", config, "--audit-base", merge["root"] / "base", "--json")
    audit = json.loads(out)["audit"]
    assert code == 0 and audit["reference"] == str(merge["root"] / "base") and audit["notes"] == []
    want = expected(merge["tensors"], weights, "base")
    for model in audit["models"]:
        name = Path(model["model"]).name
        assert close(model["task_vector_norm"], want["norm"][name]) and (model["share"] is None) == (name == "base")


def test_passthrough_draws_no_averaging_conclusion(merge: dict, tmp_path: Path, capsys) -> None:
    config = tmp_path / "merge.yaml"
    slices = [{"sources": [{"model": str(merge["root"] / n), "layer_range": r}]} for n, r in (("base", [0, 2]), ("a", [2, 4]))]
    config.write_text(yaml.safe_dump({"merge_method": "passthrough", "base_model": str(merge["root"] / "base"), "slices": slices}))
    code, out, _ = gate(capsys, "--mergekit-config", config, "--audit", "--json")
    audit = json.loads(out)["audit"]
    assert code == 0 and not any("contributes" in f or "dominates" in f for f in audit["flags"])
    assert any("passthrough stacks layers and averages nothing" in n for n in audit["notes"])


def test_models_with_a_lora_are_not_audited(merge: dict, tmp_path: Path, capsys) -> None:
    root = merge["root"]
    config = tmp_path / "merge.yaml"
    models = [
        {"model": f"{root / 'a'}+some/adapter", "parameters": {"weight": 0.5}},
        {"model": str(root / "d"), "parameters": {"weight": 0.5}},
    ]
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(root / "base"), "models": models}))
    code, out, _ = gate(capsys, "--mergekit-config", config, "--audit", "--json")
    audit = json.loads(out)["audit"]
    assert code == 0 and [Path(m["model"]).name for m in audit["models"]] == ["base", "d"]
    assert any("is not audited: the LoRA some/adapter is applied to it" in n for n in audit["notes"])
    config.write_text(
        yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": f"{root / 'base'}+some/adapter", "models": models[1:]})
    )
    audit = json.loads(gate(capsys, "--mergekit-config", config, "--audit", "--json")[1])["audit"]
    assert audit["reference"] == "mean of the models" and any("the base_model applies a LoRA" in n for n in audit["notes"])


def test_tensors_the_first_model_lacks_are_named(merge: dict, tmp_path: Path, capsys) -> None:
    root = tmp_path / "extra"
    start = {**merge["tensors"]["d"], "model.extra_head.weight": torch.ones(3, 3)}
    variant(merge["root"] / "base", root / "d", [0.0] * LAYERS, seed=0, start=start)
    stored = [stored_tensors(merge["root"] / "base"), stored_tensors(root / "d")]
    assert audit_plan(stored, set())[1] == ["model.extra_head.weight: not in every model"]


@pytest.mark.parametrize(("plot", "message"), [("chart.unknown", "matplotlib writes no .unknown files"), ("/dev/full", "")])
def test_plot_paths_are_checked_or_written_for_real(merge: dict, tmp_path: Path, capsys, plot: str, message: str) -> None:
    pytest.importorskip("matplotlib")
    config = write_yaml(merge["root"], tmp_path / "merge.yaml", merge["weights"])
    target = tmp_path / plot if not plot.startswith("/") else Path(plot)
    code, out, err = gate(capsys, "--mergekit-config", config, "--plot", target)
    assert code == 2 and out == "" and (message or "exists and is not a regular file") in err, err
