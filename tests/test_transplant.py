"""Transplants across tokenizer families: which token keeps a match when several spell the
same bytes, added tokens that are text, and rows for tokens the target never produces."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS, SP_SPECIALS, report_of, tensors
from merge_tools.common.spellings import token_bytes
from merge_tools.remap.matching import match_tokens
from merge_tools.remap.tokenizers_in import BaseTokenizerCheck, VocabSpec, check_base_tokenizer, read_tokenizer

remap = functools.partial(factories.call_main, rt.main)
FLAGS = {"special": False, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False}


def spec(tokens: list[str], convention: str, byte_fallback: bool = False, text_added: tuple[str, ...] = ()) -> VocabSpec:
    return VocabSpec({t: i for i, t in enumerate(tokens)}, {a: FLAGS for a in text_added}, {}, convention, byte_fallback)


def test_a_regular_token_keeps_the_match_over_a_lower_byte_fallback_token() -> None:
    # SentencePiece vocabularies list <0x00>..<0xFF> before every regular character
    src = spec(["<0x41>", "<0x0A>", "▁", "A", "\n"], "metaspace", byte_fallback=True, text_added=("\n",))
    base = spec(["A", "Ċ", "Ġ"], "byte_level")
    matches = match_tokens(base, src, "bytes")
    assert matches.src_of_base == {0: 3, 1: 4, 2: 2}
    kept = {(c["kept_id"], c["dropped_id"]) for c in matches.collisions}
    assert kept == {(3, 0), (4, 1)}
    # what the tokenizer produces decides first: were `A` never produced, `<0x41>` would be
    assert match_tokens(base, src, "bytes", src_unreachable=frozenset({3})).src_of_base == {0: 0, 1: 4, 2: 2}


def test_unreachable_tokens_neither_give_nor_take_a_match() -> None:
    base = spec(["<0x41>", "A", "B"], "metaspace", byte_fallback=True)
    src = spec(["A", "B"], "byte_level")
    matches = match_tokens(base, src, "bytes", base_unreachable=frozenset({0, 2}))
    assert matches.src_of_base == {1: 0}


def test_sentencepiece_source_gives_its_regular_rows_not_its_byte_fallback_rows(
    tmp_path: Path, sp_tok: dict, byte_tok: dict, capsys
) -> None:
    src = factories.write_model(tmp_path / "src", sp_tok, **SP_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", byte_tok, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, stdout, err = remap(
        capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra", "--init-report", "300"
    )
    assert code == 0, err
    src_t, out_t = tensors(src), tensors(out)
    src_vocab, base_vocab = sp_tok["model"]["vocab"], byte_tok["model"]["vocab"]
    assert f"source: 'e' ({src_vocab['e']}) over '<0x65>' ({src_vocab['<0x65>']})" in stdout + err
    assert src_vocab["<0x65>"] < src_vocab["e"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out_t[name][base_vocab["e"]], src_t[name][src_vocab["e"]])
    collisions = report_of(out)["plan"]["match"]["collision_examples"]
    expected = {
        "side": "source",
        "bytes": "e",
        "kept": "e",
        "kept_id": src_vocab["e"],
        "dropped": "<0x65>",
        "dropped_id": src_vocab["<0x65>"],
    }
    assert expected in collisions


def text_added(tokenizer_json: dict, tokens: list[str]) -> dict:
    """Gemma's way: "\n", "\t" and runs of newlines are added tokens with special: false
    (at their vocabulary id when the model has them, appended otherwise)."""
    present = [t for t in tokens if t in tokenizer_json["model"]["vocab"]]
    data = factories.with_tokens(tokenizer_json, added=[t for t in tokens if t not in present], special=False)
    vocab = data["model"]["vocab"]
    data["added_tokens"] += [{"id": vocab[t], "content": t, **FLAGS} for t in present]
    data["added_tokens"].sort(key=lambda entry: entry["id"])
    return data


def test_non_special_added_tokens_match_by_their_text(tmp_path: Path, sp_tok: dict, byte_tok: dict, capsys) -> None:
    src_json = text_added(sp_tok, ["\n", "\t"])
    src = factories.write_model(tmp_path / "src", src_json, **SP_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", byte_tok, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")
    assert code == 0, err
    src_vocab, base_vocab = factories.vocab_of(src_json), byte_tok["model"]["vocab"]
    src_t, out_t = tensors(src), tensors(out)
    for base_token, src_token in (("Ċ", "\n"), ("ĉ", "\t")):
        assert torch.equal(out_t["lm_head.weight"][base_vocab[base_token]], src_t["lm_head.weight"][src_vocab[src_token]])


def test_a_non_special_added_target_token_gets_a_decomposition(tmp_path: Path, sp_tok: dict, byte_tok: dict, capsys) -> None:
    base_json = text_added(sp_tok, ["\n\n", "<table>"])
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", base_json, **SP_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra", "--init-report", "600")
    assert code == 0, err
    by_token = {item["token"]: item for item in report_of(out)["plan"]["initialised"]}
    assert by_token["\n\n"]["rule"] == "fvt" and by_token["\n\n"]["from"] == ["Ċ", "Ċ"]
    assert by_token["<table>"]["rule"] == "fvt"
    assert b"".join(token_bytes(t, "byte_level", False) for t in by_token["<table>"]["from"]) == b"<table>"


def lm_head_inputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states entering the output layer, logits) of one forward pass."""
    captured: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    try:
        with torch.no_grad():
            logits = model(ids).logits[0]
    finally:
        handle.remove()
    return captured[0][0], logits


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_a_token_the_target_never_produces_takes_no_probability_mass(
    tmp_path: Path, sp_tok: dict, byte_tok: dict, arch: str, capsys
) -> None:
    """Onto a byte-fallback tokenizer, `<0x65>` is never produced (`e` is): it gets the mean
    row, whose probability is at most the mean of exp(logit) over M's rows (Jensen), where a
    copy of `e`'s row would take as much as `e` itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = factories.write_model(tmp_path / "src", byte_tok, arch=arch, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", sp_tok, **SP_SPECIALS)
    out = tmp_path / "out"
    code, stdout, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra", "--init-report", "3")
    assert code == 0, err
    report = report_of(out)
    unreachable = [item for item in report["plan"]["initialised"] if item["rule"] == "unreachable"]
    ids = {item["token"]: item["id"] for item in unreachable}
    assert "<0x65>" in ids and "<0x20>" in ids and report["plan"]["init_rules"]["unreachable"] == len(unreachable)
    assert f"unreachable ({len(unreachable)})" in stdout + err
    src_head = tensors(src)["lm_head.weight" if arch == "llama" else "model.embed_tokens.weight"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    out_head = model.get_output_embeddings().weight
    mean_row = src_head.double().mean(0).float()
    assert torch.equal(out_head[ids["<0x65>"]], mean_row)
    tokenizer = AutoTokenizer.from_pretrained(out)
    hidden, logits = lm_head_inputs(model, torch.tensor([tokenizer(" ".join(factories.corpus(1))).input_ids]))
    probabilities = logits.double().softmax(-1)
    bound = (hidden.double() @ src_head.double().T).exp().mean(-1) / logits.double().exp().sum(-1)
    assert (probabilities[:, ids["<0x65>"]] <= bound * (1 + 1e-4)).all()
    e = sp_tok["model"]["vocab"]["e"]
    assert not torch.equal(out_head[e], out_head[ids["<0x65>"]])


def test_t_is_checked_once_per_token_in_a_process_and_again_when_its_files_change(tmp_path: Path, sp_tok: dict) -> None:
    # an alignment remaps many models onto one T: its tokenizer is built and each token encoded once
    directory = factories.write_tokenizer(tmp_path / "t", sp_tok, **SP_SPECIALS)
    base = read_tokenizer(directory)
    tokens = list(base.spec.vocab)
    first = BaseTokenizerCheck(base, tokens)
    assert first.job is not None
    unreachable = first.result()
    assert unreachable and unreachable == check_base_tokenizer(base, tokens)  # byte-fallback tokens of existing characters
    half = tokens[::2]
    again = BaseTokenizerCheck(read_tokenizer(directory), half)
    assert again.job is None and again.result() == check_base_tokenizer(base, half)
    assert BaseTokenizerCheck(base, [*half, "not a token of T"]).job is not None  # a token not asked before
    factories.write_tokenizer(directory, factories.permuted(sp_tok, seed=3), **SP_SPECIALS)
    changed = read_tokenizer(directory)
    assert changed is not base and BaseTokenizerCheck(changed, half).job is not None
