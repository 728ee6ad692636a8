"""--init auto: the choice (pure, property-tested) and the calibration on tiny transplants:
M's body run one layer at a time must score exactly what transformers' own forward of the
written model gives; the written rows are the blend it reports; a damped output unties a
tied model, which then loads in transformers and passes the gate."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compare_tokenizers as ct
import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS, SP_SPECIALS, report_of, tensors
from merge_tools.remap import calibration_run
from merge_tools.remap import cli as package_cli
from merge_tools.remap.body_forward import BodyUnavailable
from merge_tools.remap.calibration import (
    FVT_SHARES,
    OUTPUT_SCALES,
    UNTIE_MIN_GAIN,
    CalibrationPoint,
    auto_method,
    calibration_windows,
    choose_point,
    median_cosine,
)
from merge_tools.remap.calibration_text import CALIBRATION_TEXT

remap = functools.partial(factories.call_main, rt.main)
points_strategy = st.lists(
    st.builds(
        CalibrationPoint,
        st.sampled_from(FVT_SHARES),
        st.sampled_from(OUTPUT_SCALES),
        st.floats(0.1, 10, allow_nan=False),
        st.floats(0, 1, allow_nan=False),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(points_strategy)
def test_the_choice_unties_only_for_a_real_gain(points: list[CalibrationPoint]) -> None:
    chosen = choose_point(points)
    assert chosen in points
    best = min(p.bits_per_byte for p in points)
    unscaled = [p.bits_per_byte for p in points if p.output_scale == 1.0]
    if chosen.output_scale != 1.0:
        assert chosen.bits_per_byte == best
        assert not unscaled or chosen.bits_per_byte < min(unscaled) * (1 - UNTIE_MIN_GAIN)
    else:
        assert chosen.bits_per_byte == min(unscaled)
        assert best >= chosen.bits_per_byte * (1 - UNTIE_MIN_GAIN)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 999), max_size=900), st.sampled_from([None, 1000]), st.integers(3, 300))
def test_calibration_windows_hold_every_token_once_in_order(ids: list[int], bos: int | None, window: int) -> None:
    windows, lengths = calibration_windows(ids, bos, window)
    skip = 0 if bos is None else 1
    rebuilt = [int(t) for row, n in zip(windows, lengths) for t in row[skip:n]]
    # without bos, a last window of one token predicts nothing and is left out
    assert rebuilt == ids[: len(rebuilt)] and len(ids) - len(rebuilt) <= (1 if bos is None else 0)
    assert (lengths >= 2).all() and (lengths <= window).all()
    assert all((row[n:] == 0).all() for row, n in zip(windows, lengths))
    if bos is not None:
        assert (windows[:, 0] == bos).all()


def test_the_method_auto_picks() -> None:
    assert auto_method(True, 0, True, 0.9)[0] == "fvt"
    assert auto_method(False, 5, False, None) == ("fvt", "no donor with weights (T has none; --donor-model names one)")
    assert auto_method(True, 5, True, 0.97)[0] == "donor"
    assert auto_method(True, 5, True, 0.02)[0] == "auto"
    assert auto_method(True, 5, False, None)[0] == "auto"


def test_median_cosine() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16)).astype(np.float32)
    assert median_cosine(a, 3 * a) == pytest.approx(1.0)
    assert median_cosine(a, -a) == pytest.approx(-1.0)
    assert abs(median_cosine(a, rng.normal(size=(200, 16)))) < 0.2


def evaluate_bits_per_byte(directory: Path, text: str) -> float:
    """transformers' own forward of a written model over the calibration windows (T's
    tokens, windows of 256 starting with bos): what --init auto must have measured."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    bos = json.loads((directory / "config.json").read_text()).get("bos_token_id")
    windows, lengths = calibration_windows(tokenizer.encode(text, add_special_tokens=False).ids, bos)
    nll = 0.0
    with torch.no_grad():
        for row, n in zip(windows, lengths):
            ids = torch.from_numpy(row[None, :n].copy())
            logits = model(ids).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    return nll / math.log(2) / len(text.encode())


def transplant(tmp_path: Path, byte_tok: dict, sp_tok: dict, arch: str) -> tuple[Path, Path]:
    """M on a byte-level BPE, T a model of the same architecture on a SentencePiece-style one."""
    src = factories.write_model(tmp_path / "src", byte_tok, arch=arch, **BYTE_SPECIALS)
    base = factories.write_model(tmp_path / "base", sp_tok, arch=arch, seed=1, **SP_SPECIALS)
    return src, base


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gemma"])
def test_auto_writes_the_blend_it_measured(tmp_path: Path, byte_tok: dict, sp_tok: dict, arch: str, capsys) -> None:
    """Across families (T has weights): the rows written are lambda * FVT + (1 - lambda) *
    OMP of the --init fvt and --init omp outputs, and the bits per byte the report gives for
    them is what transformers computes on the written model (gemma: an embedding that scales
    its rows inside the module)."""
    src, base = transplant(tmp_path, byte_tok, sp_tok, arch)
    outputs, said = {}, {}
    for init in ("auto", "fvt", "omp"):
        outputs[init] = tmp_path / init
        code, stdout, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", outputs[init], "--drop-extra",
                                  *(["--init", init] if init != "auto" else []))  # fmt: skip
        assert code == 0, err
        said[init] = stdout + err
    auto = report_of(outputs["auto"])["init_auto"]
    assert auto["chose"] == "calibrated" and auto["lambda"] in FVT_SHARES and auto["alpha"] == 1.0  # tiny models: no gain in scaling
    assert auto["bits_per_byte_after"] <= auto["bits_per_byte_before"] and 0 < auto["natural_mass"] < 1
    assert f"init auto: calibrated on built-in text ({auto['lambda']:g} FVT" in said["auto"]
    assert evaluate_bits_per_byte(outputs["auto"], CALIBRATION_TEXT) == pytest.approx(auto["bits_per_byte_after"], abs=2e-4)
    rules = {item["id"]: item["rule"] for item in report_of(outputs["auto"])["plan"]["initialised"]}
    blended = sorted(i for i, rule in rules.items() if rule == "auto")
    fvt_rules = {item["id"]: item["rule"] for item in report_of(outputs["fvt"])["plan"]["initialised"]}
    both = [i for i in blended if fvt_rules.get(i) == "fvt"]
    assert len(both) > 20
    embed = "model.embed_tokens.weight"
    got, fvt, omp = (tensors(outputs[k])[embed][both] for k in ("auto", "fvt", "omp"))
    assert torch.allclose(got, auto["lambda"] * fvt + (1 - auto["lambda"]) * omp, atol=1e-5)
    copied = [i for i in range(len(rules) + 300) if i not in rules][:200]
    assert torch.equal(tensors(outputs["auto"])[embed][copied], tensors(outputs["fvt"])[embed][copied])


def pick_the_most_damped(points: list[CalibrationPoint]) -> CalibrationPoint:
    """Stands for a transplant whose leakage damping cures (real SmolLM2 -> Gemma-3: alpha
    0.9): the smallest alpha, among the points offered."""
    return min(points, key=lambda p: (p.output_scale, -p.fvt_share))


def test_damped_output_rows_untie_a_tied_model(tmp_path: Path, byte_tok: dict, sp_tok: dict, monkeypatch, capsys) -> None:
    """alpha < 1 on a tied model: an lm_head whose blended rows are alpha times the input
    rows (the others equal), tie_word_embeddings false; transformers loads it untied and
    computes the bits per byte the report gives; the gate accepts it next to T's model."""
    src, base = transplant(tmp_path, byte_tok, sp_tok, "llama_tied")
    # the tiny models gain nothing from damping; forcing the choice exercises the real untie path (rows, config, loaders)
    monkeypatch.setattr(calibration_run, "choose_point", pick_the_most_damped)
    out = tmp_path / "out"
    code, _, err = factories.call_main(
        package_cli.main, capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra"
    )
    assert code == 0, err
    auto = report_of(out)["init_auto"]
    alpha = min(OUTPUT_SCALES)
    assert auto["alpha"] == alpha and auto["untied"] and "untied" in err
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    written = tensors(out)
    embed, head = written["model.embed_tokens.weight"], written["lm_head.weight"]
    blended = [item["id"] for item in report_of(out)["plan"]["initialised"] if item["rule"] == "auto"]
    others = sorted(set(range(len(embed))) - set(blended))
    assert torch.allclose(head[blended], alpha * embed[blended], atol=1e-6) and torch.equal(head[others], embed[others])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    assert evaluate_bits_per_byte(out, CALIBRATION_TEXT) == pytest.approx(auto["bits_per_byte_after"], abs=2e-4)
    assert ct.main([str(base), str(out)]) == 0, capsys.readouterr().out
    other = os.environ.get("MERGE_TOOLS_OTHER_PYTHON")
    if other:
        from test_versions import load_in

        here, there = load_in(sys.executable, out), load_in(other, out)
        assert torch.allclose(torch.tensor(here["logits"]), torch.tensor(there["logits"]), atol=1e-5)


def test_without_a_donor_auto_is_fvt(tmp_path: Path, byte_tok: dict, sp_tok: dict, capsys) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", sp_tok, **SP_SPECIALS)
    for init in ("auto", "fvt"):
        code, stdout, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", tmp_path / init, "--drop-extra",
                                  "--init", init)  # fmt: skip
        assert code == 0, err
    auto = report_of(tmp_path / "auto")["init_auto"]
    assert auto["chose"] == "fvt" and "no donor" in auto["reason"] and auto["lambda"] is None
    assert (tmp_path / "auto" / "model.safetensors").read_bytes() == (tmp_path / "fvt" / "model.safetensors").read_bytes()


def test_a_donor_of_ms_family_gives_its_own_rows(tmp_path: Path, byte_tok: dict, capsys) -> None:
    """T is M's family (its model shares M's rows of shared tokens, plus <think>): auto takes
    the donor's rows, as --init donor does."""
    think = ["<think>", "</think>"]
    base = factories.write_model(tmp_path / "base", factories.with_tokens(byte_tok, added=think), seed=1, **BYTE_SPECIALS)
    shared = {name: value[:400] if value.shape[0] == 402 else value for name, value in tensors(base).items()}
    src = factories.write_model(tmp_path / "src", byte_tok, seed=2, state_dict_overrides=shared, **BYTE_SPECIALS)
    for init in ("auto", "donor"):
        code, stdout, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", tmp_path / init, "--drop-extra",
                                  *(["--init", init] if init != "auto" else []))  # fmt: skip
        assert code == 0, err
    auto = report_of(tmp_path / "auto")["init_auto"]
    assert auto["chose"] == "donor" and "median cosine 1.00" in auto["reason"]
    assert (tmp_path / "auto" / "model.safetensors").read_bytes() == (tmp_path / "donor" / "model.safetensors").read_bytes()


def test_a_body_that_cannot_run_here_gets_fvt_rows(tmp_path: Path, byte_tok: dict, sp_tok: dict, monkeypatch, capsys) -> None:
    src, base = transplant(tmp_path, byte_tok, sp_tok, "llama")

    def cannot_build(*_args: object) -> None:  # stands for an architecture transformers cannot build
        raise BodyUnavailable("transformers cannot build this model class")

    # empty_body raises exactly this for a config transformers cannot instantiate (custom code without --trust-remote-code)
    monkeypatch.setattr(calibration_run, "empty_body", cannot_build)
    code, _, err = factories.call_main(
        package_cli.main, capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", tmp_path / "out", "--drop-extra"
    )
    assert code == 0, err
    auto = report_of(tmp_path / "out")["init_auto"]
    assert auto["chose"] == "fvt" and "cannot build" in auto["reason"] and "not calibrated" in err


def test_calibration_text_flag(tmp_path: Path, byte_tok: dict, sp_tok: dict, capsys) -> None:
    src, base = transplant(tmp_path, byte_tok, sp_tok, "llama")
    text = tmp_path / "mine.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", tmp_path / "out", "--drop-extra",
                         "--calibration-text", text)  # fmt: skip
    assert code == 0, err
    auto = report_of(tmp_path / "out")["init_auto"]
    assert auto["calibration_text"]["source"] == str(text) and auto["calibration_text"]["bytes"] == len(text.read_bytes())
    assert evaluate_bits_per_byte(tmp_path / "out", text.read_text()) == pytest.approx(auto["bits_per_byte_after"], abs=2e-4)
    for argv, message in [
        (["--calibration-text", tmp_path / "missing.txt"], "--calibration-text"),
        (["--calibration-text", text, "--init", "fvt"], "applies to --init auto"),
    ]:
        code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", tmp_path / "again", *argv)
        assert code == 2 and message in err and not (tmp_path / "again").exists()


def test_auto_is_for_a_single_remap(tmp_path: Path, capsys) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text("merge_method: linear\nmodels:\n  - model: a\n")
    code, _, err = remap(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "out", "--init", "auto")
    assert code == 2 and "--init auto applies to a single remap" in err
