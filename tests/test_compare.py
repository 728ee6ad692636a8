"""compare_tokenizers.py: the pre-merge gate."""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import compare_tokenizers as ct
import factories
from factories import BYTE_SPECIALS, SP_SPECIALS
from merge_tools.common.errors import CliError
from merge_tools.common.mergekit_config import ModelRef, mergekit_references, parse_model_reference
from merge_tools.common.spellings import bytes_to_unicode, token_bytes
from merge_tools.common.tokenizer_files import detect_convention, library_added_token_ids, read_vocabulary, vocab_from_json
from merge_tools.gate import fingerprint
from merge_tools.gate.comparison import dedupe
from merge_tools.gate.fingerprint import FINGERPRINT_SAMPLE, build_library_tokenizer, encode_fingerprint
from merge_tools.gate.reading import TokenizerInfo, normalized_merges
from merge_tools.gate.report import JSON_SCHEMA_ID
from merge_tools.gate.vocab_check import diff_vocab, in_byte_level_alphabet, show_token, tokens_as_bytes

run = functools.partial(factories.call_main, ct.main)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------ verdicts and exit codes


def test_identical_tokenizers_exit_0(tmp_path: Path, tok_dir: Path, byte_tok: dict, capsys) -> None:
    other = factories.write_tokenizer(tmp_path / "other", byte_tok, **BYTE_SPECIALS)
    code, out, err = run(capsys, tok_dir, other)
    assert code == 0, out + err
    assert "verdict  tokenizers identical (weights not checked: REF and OTHER have no safetensors)" in out
    assert "safe to merge" not in out and "Traceback" not in err


def test_weights_are_checked_by_default_and_never_called_safe_unchecked(tmp_path: Path, byte_tok: dict, capsys) -> None:
    model = factories.write_model(tmp_path / "model", byte_tok, seed=1, **BYTE_SPECIALS)
    copy_ = factories.write_model(tmp_path / "copy", byte_tok, seed=2, **BYTE_SPECIALS)
    padded = factories.write_model(tmp_path / "padded", byte_tok, rows=448, seed=3, **BYTE_SPECIALS)
    binary = factories.write_model(tmp_path / "binary", byte_tok, seed=4, **BYTE_SPECIALS)
    factories.to_pytorch_bin(binary)
    tokenizer_only = factories.write_tokenizer(tmp_path / "tokenizer", byte_tok, **BYTE_SPECIALS)
    code, out, _ = run(capsys, model, copy_)
    assert code == 0 and "verdict  identical: safe to merge linearly" in out
    code, out, _ = run(capsys, model, padded)  # the padded copy: mergekit would fail on the embedding's size
    assert code == 1 and "embedding rows differ: 400 vs 448" in out
    code, out, _ = run(capsys, model, tokenizer_only)
    assert code == 0 and "verdict  tokenizers identical (weights not checked: OTHER has no safetensors)" in out
    code, out, _ = run(capsys, model, binary)
    assert code == 0 and "verdict  tokenizers identical (weights not checked: OTHER has no safetensors)" in out
    assert "OTHER: not checked (no safetensors)" in out and "None" not in out
    code, out, _ = run(capsys, model, padded, "--no-weights")
    assert code == 0 and "verdict  tokenizers identical (weights not checked: --no-weights)" in out
    code, out, _ = run(capsys, model, padded, "--json")
    comparison = json.loads(out)["comparisons"][0]
    assert comparison["weights_checked"] is True and comparison["verdict"] == "mismatch"


def test_two_ids_swapped_at_equal_size_is_a_mismatch(tmp_path: Path, tok_dir: Path, byte_tok: dict, capsys) -> None:
    swapped = copy.deepcopy(byte_tok)
    vocab = swapped["model"]["vocab"]
    vocab["th"], vocab["Ġthe"] = vocab["Ġthe"], vocab["th"]
    other = factories.write_tokenizer(tmp_path / "other", swapped, **BYTE_SPECIALS)
    code, out, _ = run(capsys, tok_dir, other)
    assert code == 1
    assert "400 vs 400 tokens; 2 moved" in out
    assert re.search(r"\d+ -> \d+\s+'Ġthe' \(\" the\"\)", out)


def test_one_extra_token_is_a_mismatch(tmp_path: Path, tok_dir: Path, byte_tok: dict, capsys) -> None:
    other = factories.write_tokenizer(tmp_path / "other", factories.with_tokens(byte_tok, added=["<|im_start|>"]), **BYTE_SPECIALS)
    code, out, _ = run(capsys, tok_dir, other)
    assert code == 1
    assert "only in OTHER, 1 of 1" in out and "'<|im_start|>'" in out


def test_added_token_flag_warns_and_fails_only_with_strict(tmp_path: Path, tok_dir: Path, byte_tok: dict, capsys) -> None:
    flagged = copy.deepcopy(byte_tok)
    flagged["added_tokens"][1]["lstrip"] = True
    other = factories.write_tokenizer(tmp_path / "other", flagged, **BYTE_SPECIALS)
    code, out, _ = run(capsys, tok_dir, other)
    assert code == 0
    assert "WARN" in out and "lstrip False->True" in out
    code, out, _ = run(capsys, tok_dir, other, "--strict")
    assert code == 1
    assert "FAIL" in out


def test_same_vocab_different_merges_changes_the_fingerprint(tmp_path: Path, tok_dir: Path, byte_tok: dict, capsys) -> None:
    reordered = copy.deepcopy(byte_tok)
    reordered["model"]["merges"] = list(reversed(reordered["model"]["merges"]))
    other = factories.write_tokenizer(tmp_path / "other", reordered, **BYTE_SPECIALS)
    code, out, _ = run(capsys, tok_dir, other, "--json")
    report = json.loads(out)
    encoding = report["comparisons"][0]["checks"]["encoding"]
    assert code == 0 and report["comparisons"][0]["equal"] is True
    assert encoding["status"] == "warn"
    assert encoding["merges_equal"] is False and encoding["merges_first_difference_rank"] == 0
    assert encoding["fingerprint"]["identical"] is False
    assert encoding["fingerprint"]["ref_sha256"] != encoding["fingerprint"]["other_sha256"]
    assert run(capsys, tok_dir, other, "--strict")[0] == 1


def test_sentencepiece_and_byte_level_share_tokens_by_bytes(tmp_path: Path, tok_dir: Path, sp_tok: dict, capsys) -> None:
    other = factories.write_tokenizer(tmp_path / "sp", sp_tok, **SP_SPECIALS)
    code, out, _ = run(capsys, tok_dir, other, "--json")
    assert code == 1
    vocab = json.loads(out)["comparisons"][0]["checks"]["vocab"]
    assert vocab["counts"]["shared_by_bytes"] > 2 * vocab["counts"]["shared_exact"]
    code, human, _ = run(capsys, tok_dir, other)
    assert f"shared tokens: exact {vocab['counts']['shared_exact']}, by bytes {vocab['counts']['shared_by_bytes']}" in human
    assert "byte_fallback   False / True" in human


def test_special_token_roles_and_chat_template(tmp_path: Path, byte_tok: dict, capsys) -> None:
    ref = factories.write_tokenizer(tmp_path / "ref", byte_tok, **BYTE_SPECIALS, chat_template="{{ messages }}")
    other = factories.write_tokenizer(
        tmp_path / "other", byte_tok, bos="<|begin_of_text|>", eos="<|begin_of_text|>", chat_template="{{ messages }}!"
    )
    code, out, _ = run(capsys, ref, other)
    assert code == 0
    assert "roles differ: eos" in out
    assert "-{{ messages }}" in out and "+{{ messages }}!" in out
    assert run(capsys, ref, other, "--strict")[0] == 1


def test_config_ids_that_disagree_with_the_tokenizer_are_reported(tmp_path: Path, tok_dir: Path, byte_tok: dict, capsys) -> None:
    other = factories.write_tokenizer(tmp_path / "other", byte_tok, **BYTE_SPECIALS)
    (other / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    code, out, _ = run(capsys, tok_dir, other, "--json")
    inconsistent = json.loads(out)["comparisons"][0]["checks"]["special_tokens"]["inconsistent_ids"]
    assert code == 0
    assert inconsistent["other"] and "eos_token_id=7" in inconsistent["other"][0]


def test_tokenizer_json_file_as_source(tmp_path: Path, tok_dir: Path, capsys) -> None:
    code, out, _ = run(capsys, tok_dir / "tokenizer.json", tok_dir)
    assert code == 0, out


def test_slow_tokenizer_files_are_converted_through_transformers(tmp_path: Path, tok_dir: Path, byte_tok: dict, capsys) -> None:
    slow = tmp_path / "slow"
    slow.mkdir()
    model = byte_tok["model"]
    (slow / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (slow / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # GPT2Tokenizer defaults unk_token to <|endoftext|> and would add it as a new token
    config = {"tokenizer_class": "GPT2Tokenizer", "unk_token": BYTE_SPECIALS["eos"], **{f"{k}_token": v for k, v in BYTE_SPECIALS.items()}}
    (slow / "tokenizer_config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, tok_dir, slow, "--json")
    report = json.loads(out)
    assert report["comparisons"][0]["checks"]["vocab"]["status"] == "ok", err


# ------------------------------------------------------------------ errors


def test_missing_path_is_exit_2_with_one_error_line(tmp_path: Path, tok_dir: Path, capsys) -> None:
    code, out, err = run(capsys, tok_dir, tmp_path / "nope")
    assert code == 2 and out == ""
    assert len(error_lines(err)) == 1 and "nope" in err
    assert "Traceback" not in err


def test_repo_id_offline_and_not_cached_is_a_clear_error(tok_dir: Path, capsys) -> None:
    code, _, err = run(capsys, tok_dir, "some-org/not-cached-model")
    assert code == 2
    assert error_lines(err) == [
        "error: some-org/not-cached-model: not a local directory, and not in the local Hub cache (HF_HUB_OFFLINE is set): "
        "download it once online or pass a local directory"
    ]


def test_usage_errors_are_one_line(capsys) -> None:
    code, _, err = run(capsys, "--head", "x", "a", "b")
    assert code == 2 and len(error_lines(err)) == 1
    code, _, err = run(capsys, "only-one")
    assert code == 2 and "need a reference and at least one other" in err


def test_debug_shows_the_traceback(tmp_path: Path, tok_dir: Path, capsys) -> None:
    code, _, err = run(capsys, tok_dir, tmp_path / "nope", "--debug")
    assert code == 2 and "Traceback" in err


# ------------------------------------------------------------------ --json


def test_json_agrees_with_the_human_report(tmp_path: Path, tok_dir: Path, byte_tok: dict, capsys) -> None:
    tokens = factories.without_tokens(factories.with_tokens(byte_tok, regular=["Ġzzz"], added=["<|im_end|>"]), ["Ġthe"])
    other = factories.write_tokenizer(tmp_path / "other", tokens, **BYTE_SPECIALS)
    code_json, out_json, _ = run(capsys, tok_dir, other, "--json", "--head", "2")
    code_human, out_human, _ = run(capsys, tok_dir, other, "--head", "2")
    report = json.loads(out_json)
    assert code_json == code_human == report["exit_code"] == 1
    assert report["schema"] == JSON_SCHEMA_ID and report["equal"] is False
    vocab = report["comparisons"][0]["checks"]["vocab"]
    counts = vocab["counts"]
    assert counts["only_in_ref"] == 1 and counts["only_in_other"] == 2
    assert len(vocab["moved"]) == 2 and counts["moved"] > 2
    assert f"{counts['moved']} moved, {counts['only_in_ref']} only in REF, {counts['only_in_other']} only in OTHER" in out_human
    for entry in vocab["moved"]:
        assert f"{entry['ref_id']:>8} -> {entry['other_id']:<8}" in out_human
    assert report["comparisons"][0]["verdict"] == "mismatch"


# ------------------------------------------------------------------ --weights


def test_weights_reports_padding_rows_and_ghost_tokens(tmp_path: Path, byte_tok: dict, capsys) -> None:
    padded = factories.write_model(tmp_path / "padded", byte_tok, rows=448, **BYTE_SPECIALS)
    ghosts = factories.write_model(tmp_path / "ghosts", byte_tok, rows=391, **BYTE_SPECIALS)
    code, out, _ = run(capsys, padded, ghosts, "--weights", "--json")
    weights = json.loads(out)["comparisons"][0]["checks"]["weights"]
    assert code == 1 and weights["status"] == "fail"
    assert weights["ref"]["padding_rows"] == 48 and weights["ref"]["ghost_count"] == 0
    assert weights["other"]["ghost_count"] == 9 and weights["other"]["embed_rows"] == 391
    vocab = factories.vocab_of(byte_tok)
    assert [g["id"] for g in weights["other"]["ghost_tokens"]] == list(range(391, 400))
    assert [g["token"] for g in weights["other"]["ghost_tokens"]] == [t for t, i in sorted(vocab.items(), key=lambda x: x[1])][391:]
    assert weights["other"]["lm_head_tensor"] == "lm_head.weight"
    # weights are read by default; with --no-weights the same pair passes as tokenizers only
    assert run(capsys, padded, ghosts)[0] == 1
    assert run(capsys, padded, ghosts, "--no-weights")[0] == 0
    code, human, _ = run(capsys, padded, ghosts, "--weights")
    assert "OTHER ghost: id 391" in human


def test_weights_tied_embeddings(tmp_path: Path, byte_tok: dict, capsys) -> None:
    tied = factories.write_model(tmp_path / "tied", byte_tok, arch="gpt2", **BYTE_SPECIALS)
    code, out, _ = run(capsys, tied, tied, "--weights", "--json")
    side = json.loads(out)["comparisons"][0]["checks"]["weights"]["ref"]
    assert code == 0
    assert side["embed_tensor"] == "transformer.wte.weight" and side["lm_head_tensor"] is None


# ------------------------------------------------------------------ --mergekit-config


def test_mergekit_config_with_three_models(tmp_path: Path, byte_tok: dict, capsys) -> None:
    base = factories.write_tokenizer(tmp_path / "base", byte_tok, **BYTE_SPECIALS)
    same = factories.write_tokenizer(tmp_path / "same", byte_tok, **BYTE_SPECIALS)
    odd = factories.write_tokenizer(tmp_path / "odd", factories.permuted(byte_tok, 3), **BYTE_SPECIALS)
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: linear\nbase_model: {base}\nmodels:\n"
        f"  - model: {same}\n    parameters: {{weight: 0.5}}\n  - model: {odd}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {base}\n    parameters: {{weight: 0.0}}\ndtype: float32\n"
    )
    code, out, _ = run(capsys, "--mergekit-config", config)
    assert code == 1
    summary = [line for line in out.splitlines() if line.startswith(str(tmp_path))]
    assert any(str(odd) in line and "MISMATCH" in line for line in summary)
    assert any(str(same) in line and "identical" in line for line in summary)
    code, out, _ = run(capsys, "--mergekit-config", config, "--json")
    report = json.loads(out)
    assert report["reference"]["source"] == str(base)
    assert [c["other"] for c in report["comparisons"]] == [str(same), str(odd)]


def test_mergekit_config_slices_and_relative_paths(tmp_path: Path, byte_tok: dict, capsys, monkeypatch) -> None:
    factories.write_tokenizer(tmp_path / "a", byte_tok, **BYTE_SPECIALS)
    factories.write_tokenizer(tmp_path / "b", byte_tok, **BYTE_SPECIALS)
    config = tmp_path / "frankenmerge.yaml"
    config.write_text(
        "merge_method: passthrough\nslices:\n"
        "  - sources:\n      - model: a\n        layer_range: [0, 1]\n"
        "  - sources:\n      - model: b\n        layer_range: [1, 2]\n"
    )
    monkeypatch.chdir(tmp_path.parent)  # mergekit, started here, would not find `a`: neither does the gate
    code, _, err = run(capsys, "--mergekit-config", config)
    assert code == 2 and "only next to the YAML" in err and f"run from {tmp_path}" in err, err
    monkeypatch.chdir(tmp_path)  # where mergekit finds them
    code, out, _ = run(capsys, "--mergekit-config", config)
    assert code == 0, out


def test_mergekit_config_errors(tmp_path: Path, capsys) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text("- just\n- a list\n")
    code, _, err = run(capsys, "--mergekit-config", config)
    assert code == 2 and "top level must be a mapping" in err
    config.write_text("merge_method: linear\nmodels: [{model: only, parameters: {weight: 1.0}}]\n")
    assert run(capsys, "--mergekit-config", config)[0] == 2


# ------------------------------------------------------------------ pure functions


@pytest.mark.parametrize(
    ("token", "convention", "byte_fallback", "expected"),
    [
        ("Ġthe", "byte_level", False, b" the"),
        ("▁the", "metaspace", True, b" the"),
        ("<0x20>", "metaspace", True, b" "),
        ("<0x0A>", "metaspace", True, b"\n"),
        ("<0x0A>", "metaspace", False, b"<0x0A>"),
        ("Ċ", "byte_level", False, b"\n"),
        ("æĹ¥", "byte_level", False, "日".encode()),
        ("the", "plain", False, b"the"),
    ],
)
def test_token_bytes(token: str, convention: str, byte_fallback: bool, expected: bytes) -> None:
    assert token_bytes(token, convention, byte_fallback) == expected


@given(st.lists(st.text(alphabet=st.sampled_from(sorted(bytes_to_unicode().values()) + ["x", "é", "\n", "日"]), max_size=6), max_size=30))
@settings(max_examples=200, deadline=None)
def test_tokens_as_bytes_matches_token_by_token(tokens: list[str]) -> None:
    assert tokens_as_bytes(tokens, "byte_level", False) == [token_bytes(t, "byte_level", False) for t in tokens]


@given(st.text(max_size=20))
def test_byte_level_alphabet_check(text: str) -> None:
    alphabet = set(bytes_to_unicode().values())
    assert in_byte_level_alphabet(text) == all(char in alphabet for char in text)


def test_show_token_escapes_control_characters() -> None:
    assert show_token("Ċ", "byte_level") == "'Ċ' (\"\\n\")"
    assert show_token("a\tb\x00") == "'a\\tb\\x00'"
    assert show_token("\u200b") == "'\\u200b'"


def test_detect_convention(byte_tok: dict, sp_tok: dict) -> None:
    assert detect_convention(byte_tok) == "byte_level"
    assert detect_convention(sp_tok) == "metaspace"
    assert detect_convention({"pre_tokenizer": {"type": "Whitespace"}}) == "plain"


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("org/model", ("org/model", None, None)),
        ("org/model@v1", ("org/model", "v1", None)),
        ("org/model+org/lora", ("org/model", None, "org/lora")),
        ({"model": {"path": "m", "revision": "r"}, "lora": {"path": "l"}}, ("m", "r", "l")),
        ({"model": "m@main"}, ("m", "main", None)),
    ],
)
def test_parse_model_reference(reference: object, expected: tuple) -> None:
    assert parse_model_reference(reference) == ModelRef(*expected)


def test_mergekit_models_reads_every_place_a_model_can_be() -> None:
    config = {
        "base_model": "base",
        "models": [{"model": "a"}],
        "slices": [{"sources": [{"model": "b", "layer_range": [0, 1]}], "base_model": "c"}],
        "modules": {"text": {"models": [{"model": "d"}]}},
    }
    assert dedupe(mergekit_references(config)) == ["base", "a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["model"]["vocab"].update({"dup": 5}), "share id 5"),
        (lambda d: d["model"]["vocab"].update({"gap": 10_000}), "first missing id is 400"),
        (lambda d: d["added_tokens"].append({"id": 399, "content": "Ġthe", "special": True}), "declared at id 399"),
    ],
)
def test_vocab_from_json_refuses_ambiguous_vocabularies(byte_tok: dict, mutate, message: str) -> None:
    data = copy.deepcopy(byte_tok)
    mutate(data)
    with pytest.raises(CliError, match=message):
        vocab_from_json(data, Path("tokenizer.json"))


def test_library_renumbering_of_added_tokens_is_refused(tmp_path: Path, tok_dir: Path, byte_tok: dict, capsys) -> None:
    # Contiguous declared ids, but neither token is in the model vocabulary and they are
    # listed out of order: the tokenizers library numbers them 400, 401 in list order.
    data = copy.deepcopy(byte_tok)
    flags = {"special": True, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False}
    data["added_tokens"].append({"id": 401, "content": "<|b|>", **flags})
    data["added_tokens"].append({"id": 400, "content": "<|a|>", **flags})
    other = factories.write_tokenizer(tmp_path / "other", data, **BYTE_SPECIALS)
    code, _, err = run(capsys, tok_dir, other)
    assert code == 2
    assert error_lines(err) == [
        f"error: {other / 'tokenizer.json'}: added token '<|b|>' is declared at id 401 but the tokenizers library loads "
        "it at id 400 (not in the model vocabulary and not numbered right after it); fix tokenizer.json"
    ]


# ------------------------------------------------------------------ fast paths agree with the slow truth


def info_of(vocab: dict[str, int]) -> TokenizerInfo:
    return TokenizerInfo(
        source="t",
        path="t",
        vocab=vocab,
        added_tokens=(),
        model_type="BPE",
        merges=None,
        normalizer=None,
        pre_tokenizer=None,
        decoder=None,
        byte_fallback=False,
        convention="plain",
        special_tokens={},
        config_ids={},
        generation_ids={},
        chat_template=None,
        fingerprint_ids=(),
    )


@st.composite
def vocab_pairs(draw: st.DrawFn) -> tuple[dict[str, int], dict[str, int]]:
    pool = [f"t{i}" for i in range(40)]
    ref_tokens = draw(st.lists(st.sampled_from(pool), unique=True, max_size=30))
    other_tokens = draw(st.lists(st.sampled_from(pool), unique=True, max_size=30))
    if draw(st.booleans()):
        other_tokens = list(ref_tokens)
    ref_ids, other_ids = draw(st.permutations(range(len(ref_tokens)))), draw(st.permutations(range(len(other_tokens))))
    return dict(zip(ref_tokens, ref_ids)), dict(zip(other_tokens, other_ids))


@given(vocab_pairs(), st.integers(0, 8))
@settings(max_examples=300, deadline=None)
def test_diff_vocab_agrees_with_a_plain_reading_of_the_definition(pair: tuple[dict[str, int], dict[str, int]], head: int) -> None:
    ref, other = pair
    moved = sorted((ref[t], t, other[t]) for t in ref if t in other and ref[t] != other[t])
    only_ref = sorted((ref[t], t) for t in ref if t not in other)
    only_other = sorted((other[t], t) for t in other if t not in ref)
    diff = diff_vocab(info_of(ref), info_of(other), head)
    assert (diff.moved_count, diff.only_in_ref_count, diff.only_in_other_count) == (len(moved), len(only_ref), len(only_other))
    assert diff.moved == tuple((t, a, b) for a, t, b in moved[:head])
    assert diff.only_in_ref == tuple((t, i) for i, t in only_ref[:head])
    assert diff.only_in_other == tuple((t, i) for i, t in only_other[:head])
    assert diff.shared_exact == len(ref) - len(only_ref)
    assert diff.equal == (ref == other)


ADDED_POOL = ["a", "b", "ab", "<x>", "<y>", "<z>", ""]


@given(
    model_tokens=st.lists(st.sampled_from(["a", "b", "ab", "c", "<x>"]), unique=True, min_size=0, max_size=5),
    gap=st.booleans(),
    added=st.lists(st.tuples(st.sampled_from(ADDED_POOL), st.booleans(), st.integers(0, 9)), max_size=6),
)
@settings(max_examples=400, deadline=None)
def test_added_token_ids_are_the_ones_the_tokenizers_library_gives(
    model_tokens: list[str], gap: bool, added: list[tuple[str, bool, int]]
) -> None:
    from tokenizers import Tokenizer

    model_vocab = {token: i + (1 if gap and i else 0) for i, token in enumerate(model_tokens)}
    entries = [
        {
            "id": declared,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": not special,
            "special": special,
        }
        for content, special, declared in added
    ]
    document = {"version": "1.0", "added_tokens": entries, "model": {"type": "BPE", "vocab": model_vocab, "merges": []}}
    library = {token.content: token_id for token_id, token in Tokenizer.from_str(json.dumps(document)).get_added_tokens_decoder().items()}
    predicted = library_added_token_ids(model_vocab, len(model_vocab), entries)
    assert library_added_token_ids(model_vocab, len(model_vocab), entries) == predicted  # the two scripts' copies
    if set(model_vocab.values()) == set(range(len(model_vocab))):
        assert predicted == library
    else:  # tokenizers versions number added tokens differently here (0.22 and 0.23 do): both tools refuse such a file
        with pytest.raises(CliError):
            read_vocabulary(document, Path("tokenizer.json"))


def full_library_ids(tokenizer_json: dict, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(tokenizer_json)).encode(text, add_special_tokens=False).ids


def fingerprint_of(tokenizer_json: dict, text: str, monkeypatch: pytest.MonkeyPatch) -> tuple[tuple[int, ...], list[int]]:
    """(ids, sizes of the tokenizer.json texts the library was asked to build)."""
    built: list[int] = []
    build = build_library_tokenizer

    def recording(document: str, where: Path) -> object:
        built.append(len(document))
        return build(document, where)

    monkeypatch.setattr(fingerprint, "build_library_tokenizer", recording)  # encode_fingerprint reads it there
    raw = json.dumps(tokenizer_json).encode()
    ids = encode_fingerprint(tokenizer_json, normalized_merges(tokenizer_json["model"]), raw, Path("tokenizer.json"), sample=text)
    monkeypatch.undo()
    return ids, built


def whitespace_nfkc_bpe() -> dict:
    data = factories.byte_level_bpe(ignore_merges=True)
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        ],
    }
    return data


def legacy_merges(data: dict) -> dict:
    """merges as "left right" strings, as tokenizers before 0.20 wrote them."""
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    return data


FINGERPRINT_TOKENIZERS = {
    "byte-level": lambda: factories.byte_level_bpe(),
    "byte-level, merges as strings": lambda: legacy_merges(factories.byte_level_bpe()),
    "byte-level, ignore_merges": lambda: factories.byte_level_bpe(ignore_merges=True),
    "SentencePiece-style, byte fallback": lambda: factories.metaspace_bpe(),
    "NFKC + lowercase, digits, prefix space": whitespace_nfkc_bpe,
}
# Words the tokenizers were trained on (so that long tokens and merge chains occur), glued
# to arbitrary characters.
TEXTS = st.lists(
    st.one_of(
        st.sampled_from([piece for line in factories.CORPUS for piece in re.split(r"(?=\s)", line)]),
        st.text(alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from(list("the  ▁Ġ\n\t日本🦙é\u0301２0"))), max_size=4),
    ),
    max_size=12,
).map("".join)


@pytest.mark.parametrize("kind", FINGERPRINT_TOKENIZERS)
def test_fingerprint_builds_only_what_the_sample_reaches_and_encodes_it_the_same(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer_json = FINGERPRINT_TOKENIZERS[kind]()
    ids, built = fingerprint_of(tokenizer_json, FINGERPRINT_SAMPLE, monkeypatch)
    assert list(ids) == full_library_ids(tokenizer_json, FINGERPRINT_SAMPLE)
    assert len(built) == 2 and max(built) < len(json.dumps(tokenizer_json)), "the whole tokenizer was built"

    @given(TEXTS)
    @settings(max_examples=150, deadline=None)
    def same_ids_for_any_text(text: str) -> None:
        with pytest.MonkeyPatch.context() as patch:
            assert list(fingerprint_of(tokenizer_json, text, patch)[0]) == full_library_ids(tokenizer_json, text)

    same_ids_for_any_text()


def test_fingerprint_of_a_sample_holding_an_added_token_builds_the_whole_tokenizer(byte_tok: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # Added tokens split the text before the normalizer and pre-tokenizer see it, so the
    # sample's words are no longer known in advance.
    tokenizer_json = factories.with_tokens(byte_tok, added=["quick brown"], special=False)
    ids, built = fingerprint_of(tokenizer_json, FINGERPRINT_SAMPLE, monkeypatch)
    assert list(ids) == full_library_ids(tokenizer_json, FINGERPRINT_SAMPLE)
    assert tokenizer_json["added_tokens"][-1]["id"] in ids
    assert built[-1] == len(json.dumps(tokenizer_json))


def test_a_merge_of_an_unknown_token_is_refused(tmp_path: Path, tok_dir: Path, byte_tok: dict, capsys) -> None:
    broken = copy.deepcopy(byte_tok)
    broken["model"]["merges"].append(["Ġzz", "q"])
    other = factories.write_tokenizer(tmp_path / "other", broken, **BYTE_SPECIALS)
    code, _, err = run(capsys, tok_dir, other)
    assert code == 2
    assert error_lines(err) == [
        f"error: {other / 'tokenizer.json'}: not a valid tokenizer.json (a merge names a token that is not in the model vocabulary)"
    ]


def test_nfc_and_nfd_look_alikes_are_told_apart() -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"  # both print as café
    assert show_token(composed) == "'café'"
    assert show_token(decomposed).endswith("[not NFC: U+0063 U+0061 U+0066 U+0065 U+0301]")
