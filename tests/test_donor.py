"""--init donor and --init omp: rows of tokens M lacks come from a model that has them,
bit for bit (donor) or as OMP's sparse combination of M's rows of shared tokens (omp)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS
from merge_fixtures import tensors
from merge_tools.remap.config_outputs import REPORT_NAME
from merge_tools.remap.omp import omp_coefficients

THINK = ["<think>", "</think>"]


def remap(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    capsys.readouterr()  # what building the models printed
    code = rt.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def rows_of(directory: Path, name: str, ids: list[int]) -> torch.Tensor:
    return tensors(directory)[name][ids]


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "phi"])
def test_donor_rows_are_the_donors_bit_for_bit(tmp_path: Path, byte_tok: dict, capsys, arch: str) -> None:
    """A reasoning base with <think> / </think>, a sibling without them: the aligned
    sibling gets the base's own rows for them in every vocabulary tensor (phi: the lm_head
    bias too; tied: the one embedding)."""
    base_json = factories.with_tokens(byte_tok, added=THINK)
    base = factories.write_model(tmp_path / "base", base_json, arch=arch, seed=1, **BYTE_SPECIALS)
    sibling = factories.write_model(tmp_path / "sibling", byte_tok, arch=arch, seed=2, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, err = remap(capsys, "--src_model", sibling, "--base_tokenizer", base, "--out_dir", out, "--drop-extra", "--init", "donor")
    assert code == 0, err
    think_ids = [factories.vocab_of(base_json)[token] for token in THINK]
    written, donor, source = tensors(out), tensors(base), tensors(sibling)
    vocab_names = [name for name in donor if name.endswith(("embed_tokens.weight", "lm_head.weight", "lm_head.bias", "embed_tokens.bias"))]
    assert len(vocab_names) == {"llama": 2, "llama_tied": 1, "phi": 3}[arch]
    for name in vocab_names:
        assert torch.equal(written[name][think_ids], donor[name][think_ids]), name
        assert torch.equal(written[name][:400], source[name][:400]), name  # every other row is M's
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["plan"]["init_rules"] == {"donor": 2} and report["donor"]["tokens_matched"] == 402


def test_tokens_the_donor_lacks_fall_back_to_fvt(tmp_path: Path, byte_tok: dict, capsys) -> None:
    head, tail = factories.two_token_word(byte_tok)
    base_json = factories.with_tokens(byte_tok, regular=[head + tail], added=THINK)
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    donor = factories.write_model(tmp_path / "donor", factories.with_tokens(byte_tok, added=THINK), seed=3, **BYTE_SPECIALS)
    sibling = factories.write_model(tmp_path / "sibling", byte_tok, seed=2, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, err = remap(
        capsys,
        "--src_model",
        sibling,
        "--base_tokenizer",
        base,
        "--out_dir",
        out,
        "--drop-extra",
        "--init",
        "donor",
        "--donor-model",
        donor,
    )
    assert code == 0, err
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["plan"]["init_rules"] == {"donor": 2, "donor_fallback_fvt": 1}
    fvt = next(item for item in report["plan"]["initialised"] if item["rule"] == "donor_fallback_fvt")
    assert fvt["token"] == head + tail and fvt["from"] == [head, tail]


def test_a_donor_of_another_width_is_refused_for_donor_rows(tmp_path: Path, byte_tok: dict, capsys) -> None:
    base = factories.write_model(tmp_path / "base", factories.with_tokens(byte_tok, added=THINK), hidden=64, seed=1, **BYTE_SPECIALS)
    sibling = factories.write_model(tmp_path / "sibling", byte_tok, seed=2, **BYTE_SPECIALS)
    code, err = remap(capsys, "--src_model", sibling, "--base_tokenizer", base, "--out_dir", tmp_path / "out", "--init", "donor")
    assert code == 2 and err == "error: the donor's hidden size is 64, M's is 32: use --init omp\n"
    assert not (tmp_path / "out").exists()
    tokenizer_only = factories.write_tokenizer(tmp_path / "tok", factories.with_tokens(byte_tok, added=THINK), **BYTE_SPECIALS)
    code, err = remap(capsys, "--src_model", sibling, "--base_tokenizer", tokenizer_only, "--out_dir", tmp_path / "out", "--init", "donor")
    assert code == 2 and "no weights to take rows from" in err and "--donor-model" in err


def test_omp_applies_the_donors_sparse_code_to_ms_rows(tmp_path: Path, byte_tok: dict, capsys) -> None:
    """The donor's rows of the missing tokens are exact 3-sparse combinations of its rows of
    shared tokens (near-orthogonal in 512 dimensions): OMP finds them, and the output rows
    are the same combinations of M's rows (another width: 32), to fp32 precision."""
    base_json = factories.with_tokens(byte_tok, added=THINK)
    vocab = factories.vocab_of(base_json)
    think_ids = [vocab[token] for token in THINK]
    generator = torch.Generator().manual_seed(0)
    donor_embed, donor_head = torch.randn(402, 512, generator=generator), torch.randn(402, 512, generator=generator)
    support = {think_ids[0]: ([5, 77, 300], [0.5, -1.25, 2.0]), think_ids[1]: ([9, 10, 399], [1.5, 0.75, -0.5])}
    for row, (ids, weights) in support.items():
        donor_embed[row] = sum(w * donor_embed[i] for i, w in zip(ids, weights))
        donor_head[row] = sum(w * donor_head[i] for i, w in zip(ids, weights))
    donor = factories.write_model(
        tmp_path / "donor",
        base_json,
        hidden=512,
        seed=1,
        state_dict_overrides={"model.embed_tokens.weight": donor_embed, "lm_head.weight": donor_head},
        **BYTE_SPECIALS,
    )
    sibling = factories.write_model(tmp_path / "sibling", byte_tok, seed=2, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, err = remap(
        capsys, "--src_model", sibling, "--base_tokenizer", donor, "--out_dir", out, "--drop-extra", "--init", "omp", "--omp-k", "8"
    )
    assert code == 0, err
    written, source = tensors(out), tensors(sibling)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for row, (ids, weights) in support.items():
            expected = sum(w * source[name][i].double() for i, w in zip(ids, weights))
            assert torch.allclose(written[name][row].double(), expected, rtol=1e-5, atol=1e-5), name
    assert json.loads((out / REPORT_NAME).read_text())["plan"]["init_rules"] == {"omp": 2}


def test_omp_k_is_bounded_by_the_shared_tokens_and_the_width() -> None:
    atoms = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    targets = atoms[:2] * 2 + atoms[2:4]
    indices, coefficients = omp_coefficients(targets, atoms, 64, device="cpu")
    assert indices.shape == (2, 5) and coefficients.shape == (2, 5)  # k = min(64, 5 shared, 16 wide)
    reconstructed = np.einsum("nk,nkh->nh", coefficients.numpy(), atoms[indices.numpy()].astype(np.float64))
    assert np.allclose(reconstructed, targets, atol=1e-5)
    indices, _ = omp_coefficients(np.ones((3, 4), np.float32), np.eye(4, dtype=np.float32), 64, device="cpu")
    assert indices.shape == (3, 4)  # never more atoms than the width


def test_chat_template_source_in_append_mode_renders_to_appended_ids(tmp_path: Path, byte_tok: dict, capsys) -> None:
    from transformers import AutoTokenizer

    chat = ["<|im_start|>", "<|im_end|>"]
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    base = factories.write_tokenizer(
        tmp_path / "base", byte_tok, chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}", **BYTE_SPECIALS
    )
    sibling = factories.write_model(
        tmp_path / "sibling", factories.with_tokens(byte_tok, added=chat), seed=2, chat_template=template, **BYTE_SPECIALS
    )
    out = tmp_path / "out"
    code, err = remap(capsys, "--src_model", sibling, "--base_tokenizer", base, "--out_dir", out, "--chat-template", "source")
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    appended = {
        token: out_id
        for token, _, out_id in (
            (a["token"], a["source_id"], a["id"]) for a in json.loads((out / REPORT_NAME).read_text())["plan"]["appended"]
        )
    }
    assert ids[0] == appended["<|im_start|>"] and appended["<|im_end|>"] in ids
    code, err = remap(
        capsys,
        "--src_model",
        sibling,
        "--base_tokenizer",
        base,
        "--out_dir",
        tmp_path / "drop",
        "--drop-extra",
        "--chat-template",
        "source",
    )
    assert code == 2 and "'<|im_start|>', '<|im_end|>'" in err and "use append mode or --chat-template base" in err
    code, err = remap(capsys, "--src_model", sibling, "--base_tokenizer", base, "--out_dir", tmp_path / "drop", "--drop-extra")
    assert code == 0 and "warning: M's chat template uses '<|im_start|>', '<|im_end|>', which the output drops" in err
