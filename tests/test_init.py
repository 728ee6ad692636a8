"""Rows for tokens the source lacks: FVT, role mapping, and matching across conventions."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS, SP_SPECIALS, report_of, tensors
from merge_tools.common.spellings import token_bytes
from merge_tools.remap.tokenizers_in import model_only_tokenizer, read_tokenizer

remap = functools.partial(factories.call_main, rt.main)


def test_fvt_row_is_the_mean_of_the_decomposition_bit_for_bit(tmp_path: Path, byte_tok: dict, capsys) -> None:
    head, tail = factories.two_token_word(byte_tok)
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    base_json = factories.with_tokens(byte_tok, regular=[head + tail])
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra", "--init-report", "5")
    assert code == 0, err
    assert "init fvt" in err and repr(head) in err and repr(tail) in err
    new_id = factories.vocab_of(base_json)[head + tail]
    src_t, out_t = tensors(src), tensors(out)
    a, b = byte_tok["model"]["vocab"][head], byte_tok["model"]["vocab"][tail]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        expected = torch.stack([src_t[name][a], src_t[name][b]]).mean(0)
        assert torch.equal(out_t[name][new_id], expected), name
    report = report_of(out)
    assert report["plan"]["init_rules"] == {"fvt": 1}
    assert report["plan"]["initialised"] == [{"token": head + tail, "id": new_id, "rule": "fvt", "from": [head, tail]}]


def test_fvt_in_bf16_rounds_like_torch(tmp_path: Path, byte_tok: dict, capsys) -> None:
    head, tail = factories.two_token_word(byte_tok)
    src = factories.write_model(tmp_path / "src", byte_tok, dtype="bfloat16", **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", factories.with_tokens(byte_tok, regular=[head + tail]), **BYTE_SPECIALS)
    out = tmp_path / "out"
    assert remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")[0] == 0
    src_t, out_t = tensors(src), tensors(out)
    a, b = byte_tok["model"]["vocab"][head], byte_tok["model"]["vocab"][tail]
    expected = ((src_t["lm_head.weight"][a].double() + src_t["lm_head.weight"][b].double()) / 2).float().to(torch.bfloat16)
    assert out_t["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(out_t["lm_head.weight"][len(byte_tok["model"]["vocab"])], expected)


def test_special_tokens_get_role_rows_or_the_mean_never_a_decomposition(tmp_path: Path, byte_tok: dict, capsys) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    base_json = factories.with_tokens(byte_tok, added=["<|eot|>", "<|im_start|>"])
    base = factories.write_tokenizer(tmp_path / "base", base_json, bos="<|begin_of_text|>", eos="<|eot|>")
    out = tmp_path / "out"
    assert remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")[0] == 0
    base_vocab = factories.vocab_of(base_json)
    src_t, out_t = tensors(src), tensors(out)
    src_eos = byte_tok["model"]["vocab"]["<|end_of_text|>"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out_t[name][base_vocab["<|eot|>"]], src_t[name][src_eos])
        mean = src_t[name][:400].double().mean(0).float()
        assert torch.equal(out_t[name][base_vocab["<|im_start|>"]], mean)
    assert report_of(out)["plan"]["init_rules"] == {"mean": 1, "role": 1}
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == base_vocab["<|eot|>"]


def test_zero_init(tmp_path: Path, byte_tok: dict, capsys) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    base_json = factories.with_tokens(byte_tok, regular=["Ġzzz"], added=["<|x|>"])
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    out = tmp_path / "out"
    assert remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra", "--init", "zero")[0] == 0
    embed = tensors(out)["model.embed_tokens.weight"]
    assert not embed[400:].any()
    assert report_of(out)["plan"]["init_rules"] == {"zero": 2}


def test_nan_rows_never_leak_into_initialised_rows(tmp_path: Path, byte_tok: dict, capsys) -> None:
    head, tail = factories.two_token_word(byte_tok)
    vocab = byte_tok["model"]["vocab"]
    poisoned = torch.randn(400, 32)
    poisoned[vocab[head]] = float("nan")
    poisoned[5, 3] = float("inf")
    src = factories.write_model(tmp_path / "src", byte_tok, state_dict_overrides={"model.embed_tokens.weight": poisoned}, **BYTE_SPECIALS)
    base = factories.write_tokenizer(
        tmp_path / "base", factories.with_tokens(byte_tok, regular=[head + tail], added=["<|x|>"]), **BYTE_SPECIALS
    )
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")
    assert code == 0
    assert "2 row(s) hold NaN/Inf" in err
    embed = tensors(out)["model.embed_tokens.weight"]
    assert torch.isfinite(embed[400:]).all()
    assert torch.equal(embed[400], poisoned[vocab[tail]])  # the NaN part is left out of the FVT mean
    assert torch.isnan(embed[vocab[head]]).all()  # copied rows stay bit-exact, NaN included


def test_sentencepiece_source_onto_byte_level_base_shares_rows_by_bytes(tmp_path: Path, sp_tok: dict, byte_tok: dict, capsys) -> None:
    src = factories.write_model(tmp_path / "src", sp_tok, **SP_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", byte_tok, **BYTE_SPECIALS)
    counts = {}
    for match in ("exact", "bytes"):
        out = tmp_path / match
        code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra", "--match", match)
        assert code == 0, err
        plan = report_of(out)["plan"]["counts"]
        counts[match] = plan["copied"] + plan["moved"]
    assert counts["bytes"] > 0.5 * len(byte_tok["model"]["vocab"])
    assert counts["exact"] < 0.5 * counts["bytes"]
    auto = tmp_path / "auto"
    assert remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", auto, "--drop-extra")[0] == 0
    assert report_of(auto)["match_mode"] == "bytes"
    # rows matched by bytes are the source's rows of the same text
    src_t, out_t = tensors(src), tensors(tmp_path / "bytes")
    assert torch.equal(
        out_t["lm_head.weight"][byte_tok["model"]["vocab"]["Ġthe"]], src_t["lm_head.weight"][sp_tok["model"]["vocab"]["▁the"]]
    )


def test_byte_level_source_onto_sentencepiece_base_decomposes_by_bytes(tmp_path: Path, sp_tok: dict, byte_tok: dict, capsys) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", sp_tok, **SP_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra", "--init-report", "400")
    assert code == 0, err
    report = report_of(out)
    by_token = {i["token"]: i for i in report["plan"]["initialised"]}
    # a byte-fallback token of the base is the source's byte-level symbol for that byte
    assert report["plan"]["counts"]["copied"] + report["plan"]["counts"]["moved"] > 200
    assert "<0xE6>" not in by_token  # matched to the byte-level symbol of that byte
    assert by_token["<0x0A>"]["rule"] == "unreachable"  # the base has "\n", which it produces instead
    fvt = [i for i in report["plan"]["initialised"] if i["rule"] == "fvt"]
    assert any(len(i["from"]) >= 2 for i in fvt)
    for item in fvt:  # every decomposition spells exactly the base token's bytes
        spelled = b"".join(token_bytes(t, "byte_level", False) for t in item["from"])
        assert spelled == token_bytes(item["token"], "metaspace", True), item
    # the role rows: base <s>/</s> take the source's bos/eos rows
    assert by_token["<s>"]["rule"] == "role:bos" and by_token["</s>"]["rule"] == "role:eos"


@pytest.mark.parametrize(
    ("token", "convention", "fallback"),
    [("▁the", "metaspace", False), ("Ġthe", "byte_level", False), ("<0x20>", "metaspace", True)],
)
def test_conventions_resolve_to_the_same_bytes(token: str, convention: str, fallback: bool) -> None:
    data = token_bytes(token, convention, fallback)
    assert data in (b" the", b" ")
    if token == "<0x20>":
        assert data + token_bytes("the", "metaspace", True) == b" the"


@pytest.mark.parametrize("kind", ["byte-level", "byte-level, ignore_merges", "SentencePiece-style"])
def test_fvt_model_built_for_the_texts_encodes_them_as_the_whole_model_does(tmp_path: Path, kind: str) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tokenizer_json = {
        "byte-level": lambda: factories.byte_level_bpe(),
        "byte-level, ignore_merges": lambda: factories.byte_level_bpe(ignore_merges=True),
        "SentencePiece-style": lambda: factories.metaspace_bpe(),
    }[kind]()
    src = read_tokenizer(factories.write_tokenizer(tmp_path / "src", tokenizer_json))
    whole = Tokenizer.from_str(src.text)
    whole.normalizer, whole.pre_tokenizer, whole.post_processor = None, None, None
    vocab = sorted(tokenizer_json["model"]["vocab"])
    characters = sorted({char for token in vocab for char in token} | set("日é\n "))
    texts = st.lists(
        st.lists(st.one_of(st.sampled_from(vocab), st.sampled_from(characters)), min_size=1, max_size=6).map("".join),
        min_size=1,
        max_size=20,
    )

    @given(texts)
    @settings(max_examples=100, deadline=None)
    def same_ids(batch: list[str]) -> None:
        pruned = model_only_tokenizer(src, batch)
        if not any(added["content"] in text for added in tokenizer_json["added_tokens"] for text in batch):
            assert pruned.get_vocab_size() < len(vocab)
        assert [e.ids for e in pruned.encode_batch(batch, add_special_tokens=False)] == [
            e.ids for e in whole.encode_batch(batch, add_special_tokens=False)
        ]

    same_ids()
