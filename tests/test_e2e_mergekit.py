"""End to end with the real mergekit (requirements-e2e.txt; transformers 5 only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import compare_tokenizers as ct
import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS
from merge_fixtures import build_models, build_union_models, linear_yaml, mergekit_linear, tensors, union_yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MERGEKIT_YAML = Path(sys.executable).with_name("mergekit-yaml")


@pytest.fixture(scope="module", autouse=True)
def _mergekit() -> None:
    try:
        import mergekit  # noqa: F401
    except ImportError:
        if os.environ.get("MERGE_TOOLS_CI"):  # .ci/run sets it: there a missing mergekit is a failure
            raise
        pytest.skip("the e2e tests need requirements-e2e.txt (mergekit 0.1.5)")
    assert MERGEKIT_YAML.exists(), f"mergekit is installed but {MERGEKIT_YAML} is missing"


def mergekit(config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [str(MERGEKIT_YAML), str(config), str(out), "--copy-tokenizer"], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("models"), factories.byte_level_bpe())


WEIGHTS = {"base": 0.5, "padded": 0.25, "chat": 0.25}


def test_remap_then_merge_with_mergekit(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models[n], w) for n, w in WEIGHTS.items()])
    # 1. the gate names the models that differ
    assert ct.main(["--mergekit-config", str(config), "--weights"]) == 1
    summary = [line for line in capsys.readouterr().out.splitlines() if "MISMATCH" in line]
    assert any(str(models["padded"]) in line for line in summary) and any(str(models["chat"]) in line for line in summary)
    # 2. the odd models are remapped onto the base's tokenizer
    remapped = {"base": models["base"]}
    for name in ("padded", "chat"):
        remapped[name] = tmp_path / f"{name}-remapped"
        assert (
            rt.main(
                [
                    "--src_model",
                    str(models[name]),
                    "--base_tokenizer",
                    str(models["base"]),
                    "--out_dir",
                    str(remapped[name]),
                    "--drop-extra",
                ]
            )
            == 0
        )
    aligned = linear_yaml(tmp_path / "aligned.yaml", models["base"], [(remapped[n], w) for n, w in WEIGHTS.items()])
    # 3. the gate passes
    capsys.readouterr()
    assert ct.main(["--mergekit-config", str(aligned), "--weights"]) == 0
    # 4. mergekit merges them
    out = tmp_path / "merged"
    result = mergekit(aligned, out)
    assert result.returncode == 0, result.stderr[-3000:]
    # 5. the merged model loads, has the base's tokenizer, and its vocabulary rows are the
    #    weighted average of the remapped inputs' rows, exactly in fp32
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(models["base"]).get_vocab()
    merged = tensors(out)
    inputs = [tensors(remapped[n]) for n in WEIGHTS]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        expected = mergekit_linear([t[name] for t in inputs], list(WEIGHTS.values()))
        assert torch.equal(merged[name], expected), name
    assert model.get_input_embeddings().weight.shape[0] == 400
    assert compare_tokenizers_ok(models["base"], out)


def compare_tokenizers_ok(reference: Path, other: Path) -> bool:
    return ct.main([str(reference), str(other), "--weights"]) == 0


def test_merging_without_the_remap_fails_or_is_wrong(tmp_path: Path, models: dict[str, Path]) -> None:
    """Why the tools exist: mergekit refuses vocabularies of different sizes, and merges
    same-size vocabularies in different orders without a word, averaging the rows of
    different tokens."""
    padded = linear_yaml(tmp_path / "padded.yaml", models["base"], [(models["base"], 0.5), (models["padded"], 0.5)])
    result = mergekit(padded, tmp_path / "padded-merge")
    assert result.returncode != 0 and "Tensor size mismatch" in result.stderr
    permuted = linear_yaml(tmp_path / "permuted.yaml", models["base"], [(models["base"], 0.5), (models["permuted"], 0.5)])
    result = mergekit(permuted, tmp_path / "permuted-merge")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = tensors(tmp_path / "permuted-merge")["model.embed_tokens.weight"]
    base_vocab = factories.vocab_of(json.loads((models["base"] / "tokenizer.json").read_text()))
    permuted_vocab = factories.vocab_of(json.loads((models["permuted"] / "tokenizer.json").read_text()))
    base_rows, permuted_rows = (
        tensors(models["base"])["model.embed_tokens.weight"],
        tensors(models["permuted"])["model.embed_tokens.weight"],
    )
    wrong = 0
    for token, base_id in base_vocab.items():
        right = mergekit_linear(
            [base_rows[base_id : base_id + 1], permuted_rows[permuted_vocab[token] : permuted_vocab[token] + 1]], [0.5, 0.5]
        )[0]
        wrong += not torch.equal(merged[base_id], right)
    assert wrong > 390  # nearly every token's row mixes two different tokens
    # after the remap the same merge is right
    remapped = tmp_path / "permuted-remapped"
    assert (
        rt.main(
            ["--src_model", str(models["permuted"]), "--base_tokenizer", str(models["base"]), "--out_dir", str(remapped), "--drop-extra"]
        )
        == 0
    )
    fixed = linear_yaml(tmp_path / "fixed.yaml", models["base"], [(models["base"], 0.5), (remapped, 0.5)])
    assert mergekit(fixed, tmp_path / "fixed-merge").returncode == 0
    merged = tensors(tmp_path / "fixed-merge")["model.embed_tokens.weight"]
    assert torch.equal(merged, mergekit_linear([base_rows, tensors(remapped)["model.embed_tokens.weight"]], [0.5, 0.5]))
    for token, base_id in list(base_vocab.items())[:50]:
        assert torch.equal(
            merged[base_id],
            mergekit_linear(
                [base_rows[base_id : base_id + 1], permuted_rows[permuted_vocab[token] : permuted_vocab[token] + 1]], [0.5, 0.5]
            )[0],
        )


def test_align_command_then_mergekit(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = linear_yaml(
        tmp_path / "merge.yaml",
        models["base"],
        [(models["base"], 0.5), (models["same"], 0.25), (models["padded"], 0.125), (models["chat"], 0.125)],
    )
    aligned = tmp_path / "aligned"
    assert rt.main(["--mergekit-config", str(config), "--out_dir", str(aligned)]) == 0
    capsys.readouterr()
    out = tmp_path / "merged"
    result = mergekit(aligned / "merge.yaml", out)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = tensors(out)
    inputs = [tensors(models["base"]), tensors(models["same"]), tensors(aligned / "padded"), tensors(aligned / "chat")]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(merged[name], mergekit_linear([t[name] for t in inputs], [0.5, 0.25, 0.125, 0.125])), name


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_aligned_merges_keep_the_bases_rows_of_its_own_tokens(tmp_path: Path, capsys, method: str) -> None:
    """A base with <think> / </think> and a sibling without them: aligned (default init:
    donor, the base's own rows) and merged by mergekit, the base-only tokens keep exactly
    the base's rows: a linear merge averages equal rows, task arithmetic adds zero."""
    byte_tok = factories.byte_level_bpe()
    think = ["<think>", "</think>"]
    base_json = factories.with_tokens(byte_tok, added=think)
    base = factories.write_model(tmp_path / "base", base_json, seed=1, **BYTE_SPECIALS)
    sibling = factories.write_model(tmp_path / "sibling", byte_tok, seed=2, **BYTE_SPECIALS)
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": method,
                "base_model": str(base),
                "dtype": "float32",
                "models": [
                    {"model": str(base), "parameters": {"weight": 0.5}},
                    {"model": str(sibling), "parameters": {"weight": 0.5 if method == "linear" else 1.0}},
                ],
            }
        )
    )
    aligned = tmp_path / "aligned"
    assert rt.main(["--mergekit-config", str(config), "--out_dir", str(aligned), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    sibling_entry = next(m for m in summary["models"] if m["status"] == "remapped")
    assert sibling_entry["init"] == "donor" and sibling_entry["init_rules"] == {"donor": 2}
    result = mergekit(aligned / "merge.yaml", tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-3000:]
    merged, base_rows = tensors(tmp_path / "merged"), tensors(base)
    think_ids = [factories.vocab_of(base_json)[token] for token in think]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.allclose(merged[name][think_ids], base_rows[name][think_ids], rtol=0, atol=1e-6), name


def test_two_spellings_of_one_model_stay_two_inputs_mergekit_runs(tmp_path: Path, models: dict[str, Path], monkeypatch, capsys) -> None:
    """`./models/chat` and `models/chat/` are two inputs to mergekit; the aligned YAML must
    not collapse them into one path listed twice, which mergekit refuses."""
    (tmp_path / "models").mkdir()
    for name in ("base", "chat"):
        (tmp_path / "models" / name).symlink_to(models[name])
    monkeypatch.chdir(tmp_path)  # mergekit resolves relative model paths against the working directory
    weighted = [("./models/base", 0.5), ("./models/chat", 0.25), ("models/chat/", 0.25)]
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "base_model": "./models/base",
                "dtype": "float32",
                "models": [{"model": path, "parameters": {"weight": weight}} for path, weight in weighted],
            }
        )
    )
    aligned = tmp_path / "aligned"
    code, _, err = factories.call_main(rt.main, capsys, "--mergekit-config", config, "--out_dir", aligned)
    assert code == 0, err
    paths = [entry["model"] for entry in yaml.safe_load((aligned / "merge.yaml").read_text())["models"]]
    assert len(set(paths)) == 3 and Path(paths[1]).resolve() == Path(paths[2]).resolve(), paths
    merged = mergekit(aligned / "merge.yaml", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr[-2000:]


def test_a_model_path_only_next_to_the_yaml_is_refused_as_mergekit_would(
    tmp_path: Path, models: dict[str, Path], monkeypatch, capsys
) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "base").symlink_to(models["base"])
    (tmp_path / "cfg" / "chat").symlink_to(models["chat"])
    config = linear_yaml(tmp_path / "cfg" / "merge.yaml", Path("base"), [(Path("base"), 0.5), (Path("chat"), 0.5)])
    monkeypatch.chdir(tmp_path)
    assert mergekit(config, tmp_path / "merged").returncode != 0  # mergekit, run from here, does not find them
    for main, extra in ((ct.main, []), (rt.main, ["--out_dir", str(tmp_path / "aligned")])):
        code, _, err = factories.call_main(main, capsys, "--mergekit-config", config, *extra)
        assert code == 2 and "only next to the YAML" in err and f"run from {tmp_path / 'cfg'}" in err, err


def test_an_out_dir_mergekit_would_misread_is_refused_before_writing(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)])
    for marker in "@+":
        aligned = tmp_path / f"aligned{marker}v2"
        code, _, err = factories.call_main(rt.main, capsys, "--mergekit-config", config, "--out_dir", aligned)
        assert code == 2 and f"contains '{marker}'" in err and not aligned.exists(), err


@pytest.fixture(scope="module")
def union_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_union_models(tmp_path_factory.mktemp("union"), factories.byte_level_bpe())


UNION_TEXT = "Call <tool_call>get(x)</tool_call> then <think>plan</think><both> the quick brown fox, a<think>b"


def same_model_by_token(theirs: Path, ours: Path) -> None:
    """Two merged models hold the same tokens, the same row for each (float32 rounding:
    a mean of three rows may be summed in another order), the same padding rows, tokenize
    text alike, and have the same chat template, special tokens and tying."""
    their_tok, our_tok = (transformers.AutoTokenizer.from_pretrained(p) for p in (theirs, ours))
    their_vocab, our_vocab = their_tok.get_vocab(), our_tok.get_vocab()
    assert set(their_vocab) == set(our_vocab)
    their_rows, our_rows = tensors(theirs), tensors(ours)
    assert set(their_rows) == set(our_rows)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name not in their_rows:
            continue
        order = sorted(their_vocab)
        a = their_rows[name][[their_vocab[t] for t in order]]
        b = our_rows[name][[our_vocab[t] for t in order]]
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (name, (a - b).abs().max())
        padding = len(their_vocab)
        assert torch.allclose(their_rows[name][padding:], our_rows[name][padding:], rtol=1e-5, atol=1e-6), (name, "padding rows")
    for text in (UNION_TEXT, "plain text, no new tokens at all"):
        assert their_tok.tokenize(text) == our_tok.tokenize(text)
    assert their_tok.chat_template == our_tok.chat_template
    assert (their_tok.bos_token, their_tok.eos_token) == (our_tok.bos_token, our_tok.eos_token)
    their_config, our_config = (json.loads((p / "config.json").read_text()) for p in (theirs, ours))
    assert their_config.get("tie_word_embeddings") == our_config.get("tie_word_embeddings")


UNEVALUATED = {"kind": "model_token", "model": "SIB1", "token": "<think>"}  # SIB1 lacks <think>: mergekit never reads it
UNION_CASES = {
    "union-linear": (["base", "sib1", "sib2"], "linear", {}),
    "tokens-and-padding-task-arithmetic": (
        ["sib1", "sib2"],
        "task_arithmetic",
        {
            "tokenizer_source": None,
            "tokenizer": {"source": "union", "pad_to_multiple_of": 64, "tokens": {"<both>": {"source": {"kind": "zero"}}}},
        },
    ),
    "a-model": (["base", "sib1", "sib2"], "linear", {"tokenizer_source": "SIB2"}),
    # the base's regular <think> becomes an added token in mergekit's union (transformers' add_tokens)
    "regular-then-added": (["regular", "sib2"], "linear", {"base": "regular"}),
    # ... also where no row moves: the merge still gets the merged tokenizer
    "regular-then-added-same-rows": (["regular", "regular_added"], "linear", {"base": "regular"}),
    "a-model-with-its-own-template": (["base", "templated"], "linear", {"tokenizer_source": "TEMPLATED"}),
    # no base_model: a token several models hold takes the mean of their rows
    "no-base": (["sib1", "sib2", "base"], "linear", {"base": None}),
    # tied and untied models: a tied model's output rows come from the holder's lm_head
    "tied-base": (["tied", "sib1"], "linear", {"base": "tied"}),
    "tied-sibling": (["sib2", "tied"], "linear", {"base": "sib2"}),
    # passthrough slices: each vocabulary tensor from its own slice's model, zero where it lacks a token
    "passthrough-slices": (["base", "sib1"], "passthrough", {"base": None, "slices": [["base", [0, 1]], ["sib1", [1, 2]]]}),
    # what mergekit merges although the gate used to refuse it
    "source-outside-the-merge": (["base", "sib1"], "linear", {"tokenizer_source": "SIB2"}),
    "ghosts-in-the-base": (["ghost", "sib1"], "linear", {"base": "ghost"}),
    "an-unevaluated-tokens-entry": (
        ["base", "sib1"],
        "linear",
        {"tokenizer_source": None, "tokenizer": {"tokens": {"<|begin_of_text|>": {"source": UNEVALUATED}}}},
    ),
    # a regular token without a merge: both split "brown" anew (the gate warns)
    "split": (["base", "split"], "linear", {}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(UNION_CASES))
def test_aligned_then_plain_merge_equals_mergekits_tokenizer_merge(
    tmp_path: Path, union_models: dict[str, Path], capsys, case: str
) -> None:
    names, method, extra = UNION_CASES[case]
    paths = {"SIB1": union_models["sib1"], "SIB2": union_models["sib2"], "TEMPLATED": union_models["templated"]}
    text = json.dumps(extra)
    for key, path in paths.items():
        text = text.replace(key, str(path))
    config = union_yaml(tmp_path / "merge.yaml", union_models, names, method, **json.loads(text))
    code, out, err = factories.call_main(ct.main, capsys, "--mergekit-config", config, "--json")
    assert code == 0, out + err
    theirs = mergekit(config, tmp_path / "theirs")
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    if method in ("linear", "passthrough"):  # the gate's fill table predicts every row mergekit writes
        predicted_rows_are_mergekits(json.loads(out)["merge"], yaml.safe_load(config.read_text()), tmp_path / "theirs")
    code, out, err = factories.call_main(rt.main, capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned")
    assert code == 0, err
    ours = mergekit(tmp_path / "aligned" / "merge.yaml", tmp_path / "ours")
    assert ours.returncode == 0, ours.stderr[-3000:]
    same_model_by_token(tmp_path / "theirs", tmp_path / "ours")


def predicted_rows_are_mergekits(gate: dict, config: dict, merged: Path) -> None:
    """Every model's row of every token as the gate's fill table says (its own, or `mean of
    A, B`, `A`, `A (its row of 'x')`, `zero`), merged as mergekit's linear method (or taken
    from the slice's model by passthrough), equals the row mergekit wrote."""
    merged_vocab = transformers.AutoTokenizer.from_pretrained(merged).get_vocab()
    out = tensors(merged)
    names = [m["model"] for m in config.get("models") or []]
    names = names or [s["sources"][0]["model"] for s in config["slices"]]
    vocabs = {n: factories.vocab_of(json.loads((Path(n) / "tokenizer.json").read_text())) for n in names}
    weights = {n: tensors(Path(n)) for n in names}

    def row(model: str, token: str, tensor: str, fills: dict) -> torch.Tensor:
        own = weights[model]
        width = own["model.embed_tokens.weight"].shape[1]
        described = fills.get(model, {}).get(token)
        if described is None:
            return (own.get(tensor, own["model.embed_tokens.weight"]))[vocabs[model][token]]
        if described == "zero":
            return torch.zeros(width)
        sources = described.removeprefix("mean of ").split(" (its row")[0].split(", ")
        of = described.split("(its row of '")[1][:-2] if "(its row of '" in described else token
        rows = [weights[s].get(tensor, weights[s]["model.embed_tokens.weight"])[vocabs[s][of]] for s in sources]
        return sum(rows[1:], rows[0]) / len(rows)

    output_fills = {**gate["fills"], **gate["tokenizer"]["output_fills"]}
    for tensor, fills in (("model.embed_tokens.weight", gate["fills"]), ("lm_head.weight", output_fills)):
        if tensor not in out:
            continue
        for token, token_id in merged_vocab.items():
            if config.get("slices"):
                source = config["slices"][0 if tensor.startswith("model.") else -1]["sources"][0]["model"]
                expected = row(source, token, tensor, fills)
            else:
                weight = [m["parameters"]["weight"] for m in config["models"]]
                expected = mergekit_linear([row(n, token, tensor, fills)[None] for n in names], weight)[0]
            assert torch.allclose(out[tensor][token_id], expected, rtol=1e-5, atol=1e-6), (tensor, token)


@pytest.mark.parametrize("case", ["linear", "union"])
def test_a_linked_alignment_merges_like_a_full_copy(
    tmp_path: Path, models: dict[str, Path], union_models: dict[str, Path], case: str
) -> None:
    """mergekit merges the linked ALIGNED/merge.yaml to the same bytes as the --copy one;
    the gate passes the linked models."""
    if case == "linear":
        config = linear_yaml(
            tmp_path / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.25), (models["padded"], 0.25)]
        )
    else:
        config = union_yaml(tmp_path / "merge.yaml", union_models, ["base", "sib1", "sib2"])
    merged = {}
    for mode in ("linked", "copy"):
        aligned = tmp_path / mode
        assert rt.main(["--mergekit-config", str(config), "--out_dir", str(aligned)] + (["--copy"] if mode == "copy" else [])) == 0
        assert ct.main(["--mergekit-config", str(aligned / "merge.yaml")]) == 0
        result = mergekit(aligned / "merge.yaml", tmp_path / f"merged-{mode}")
        assert result.returncode == 0, result.stderr[-3000:]
        merged[mode] = tensors(tmp_path / f"merged-{mode}")
    assert merged["linked"].keys() == merged["copy"].keys()
    for name, tensor in merged["linked"].items():
        assert torch.equal(tensor, merged["copy"][name]), name
    report = json.loads(next((tmp_path / "linked").glob("*/remap_report.json")).read_text())
    assert report["linked"]


def test_a_damped_transplant_merges_and_the_gate_names_the_tied_config(tmp_path: Path, monkeypatch, capsys) -> None:
    """--init auto with damped output rows unties a tied model; mergekit merges it with its
    tied target model, writing the merged lm_head under the base's tied config, which
    transformers 5 follows and 4 ignores: the gate warns with the fix, and the fix works."""
    from test_calibration import pick_the_most_damped
    from test_versions import OTHER_PYTHON

    from merge_tools.remap import calibration_run
    from merge_tools.remap import cli as package_cli

    src = factories.write_model(tmp_path / "src", factories.byte_level_bpe(), arch="llama_tied", **factories.BYTE_SPECIALS)
    base = factories.write_model(tmp_path / "base", factories.metaspace_bpe(), arch="llama_tied", seed=1, **factories.SP_SPECIALS)
    # tiny models gain nothing from damping; the forced choice writes the real untied output mergekit then merges
    monkeypatch.setattr(calibration_run, "choose_point", pick_the_most_damped)
    out = tmp_path / "out"
    code, _, err = factories.call_main(
        package_cli.main, capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra"
    )
    assert code == 0 and factories.report_of(out)["init_auto"]["untied"], err
    config = linear_yaml(tmp_path / "merge.yaml", base, [(base, 0.5), (out, 0.5)])
    code, stdout, _ = factories.call_main(ct.main, capsys, "--mergekit-config", config)
    assert code == 0 and "WARN" in stdout and "set tie_word_embeddings: false in the merged config.json" in stdout
    merged = tmp_path / "merged"
    result = mergekit(config, merged)
    assert result.returncode == 0, result.stderr[-3000:]
    written = tensors(merged)
    head = 0.5 * tensors(base)["model.embed_tokens.weight"] + 0.5 * tensors(out)["lm_head.weight"]
    assert torch.allclose(written["lm_head.weight"], head, atol=1e-6)
    loaders = [sys.executable] + ([OTHER_PYTHON] if OTHER_PYTHON else [])
    assert output_rows_loaded(sys.executable, merged) == (int(transformers.__version__.split(".")[0]) >= 5)
    if OTHER_PYTHON:
        assert output_rows_loaded(OTHER_PYTHON, merged) == (int(transformers.__version__.split(".")[0]) < 5)
    merged_config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**merged_config, "tie_word_embeddings": False}))
    assert all(output_rows_loaded(python, merged) for python in loaders)


def output_rows_loaded(python: str, directory: Path) -> bool:
    """Whether a transformers install uses the file's lm_head as the output layer."""
    script = (
        "import sys, torch, transformers\nfrom safetensors.torch import load_file\nimport glob\n"
        "t = {}\n[t.update(load_file(f)) for f in glob.glob(sys.argv[1] + '/*.safetensors')]\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print(torch.equal(m.get_output_embeddings().weight.float(), t['lm_head.weight'].float()))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([python, "-c", script, str(directory)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1] == "True"
