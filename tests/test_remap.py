"""remap_tokenizer.py end to end on tiny checkpoints: permutation, append, drop, architectures."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import pytest
import torch

import compare_tokenizers
import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS, SP_SPECIALS
from merge_fixtures import tensors
from merge_tools.common.vocab_tensors import INPUT_EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING_SUFFIXES
from merge_tools.remap.checkpoints import find_vocab_tensors, read_checkpoint, vocab_tensors_from_meta
from merge_tools.remap.config_outputs import REPORT_NAME
from merge_tools.remap.matching import MATCH_MODES
from merge_tools.remap.plan import INIT_METHODS

remap = functools.partial(factories.call_main, rt.main)


def load_model(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def vocab_tensor_names(directory: Path) -> tuple[str, str | None]:
    names = tensors(directory)
    embed = next(n for n in names if n.endswith(INPUT_EMBEDDING_SUFFIXES))
    head = next((n for n in names if n.endswith(OUTPUT_EMBEDDING_SUFFIXES)), None)
    return embed, head


report_of = factories.report_of


# ------------------------------------------------------------------ permutation is exact


def test_permutation_gives_exactly_the_same_logits(tmp_path: Path, byte_tok: dict, capsys) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    base_json = factories.permuted(byte_tok, seed=5)
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, stdout, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--max-shard-size", "30KB")
    assert code == 0, err
    assert f"- model: {out}" in stdout
    src_tok, out_tok = load_tokenizer(src), load_tokenizer(out)
    src_model, out_model = load_model(src), load_model(out)
    base_of_src = torch.tensor([base_json["model"]["vocab"][t] for t, _ in sorted(byte_tok["model"]["vocab"].items(), key=lambda x: x[1])])
    for text in factories.SAMPLE_TEXTS:
        src_ids = src_tok(text, return_tensors="pt").input_ids
        out_ids = out_tok(text, return_tensors="pt").input_ids
        assert torch.equal(base_of_src[src_ids], out_ids)
        with torch.no_grad():
            src_logits = src_model(src_ids).logits
            out_logits = out_model(out_ids).logits
        assert torch.equal(out_logits[..., base_of_src], src_logits)
    report = report_of(out)
    assert report["plan"]["counts"]["initialised"] == 0 and report["plan"]["counts"]["appended"] == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert compare_tokenizers.main([str(base), str(out), "--weights"]) == 0


@pytest.mark.parametrize("init", INIT_METHODS)
@pytest.mark.parametrize("match", MATCH_MODES)
def test_permutation_is_unchanged_by_init_and_match(tmp_path: Path, byte_tok: dict, capsys, init: str, match: str) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", factories.permuted(byte_tok, seed=9), **BYTE_SPECIALS)
    reference = tmp_path / "reference"
    assert remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", reference, "--drop-extra")[0] == 0
    out = tmp_path / "out"
    assert remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--init", init, "--match", match)[0] == 0
    expected, actual = tensors(reference), tensors(out)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


# ------------------------------------------------------------------ append and drop


@pytest.fixture
def diverged(tmp_path: Path, byte_tok: dict) -> dict:
    """A source whose tokenizer has 10% of T's... the other way round: T lacks 10% of the
    source's regular tokens and has new tokens of its own, ids shuffled."""
    vocab = factories.vocab_of(byte_tok)
    removable = [t for t, i in sorted(vocab.items(), key=lambda x: x[1]) if len(t) > 2 and not t.startswith("<|")]
    removed = removable[::4][:40]
    src_json = factories.with_tokens(byte_tok, added=["<|im_start|>", "<|im_end|>"])
    base_json = factories.permuted(
        factories.with_tokens(factories.without_tokens(byte_tok, removed), regular=["Ġthefifteenth", "Ġzz"], added=["<|tool|>"]),
        seed=3,
        keep=["<|begin_of_text|>", "<|end_of_text|>"],
    )
    src = factories.write_model(tmp_path / "src", src_json, bos="<|begin_of_text|>", eos="<|im_end|>", shard_size="15KB")
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    return {"src": src, "base": base, "src_json": src_json, "base_json": base_json, "removed": removed}


def test_append_mode_keeps_base_encoding_and_every_source_row(tmp_path: Path, diverged: dict, capsys) -> None:
    out = tmp_path / "append"
    code, _, err = remap(capsys, "--src_model", diverged["src"], "--base_tokenizer", diverged["base"], "--out_dir", out)
    assert code == 0, err
    src_vocab, base_vocab = factories.vocab_of(diverged["src_json"]), factories.vocab_of(diverged["base_json"])
    appended = [t for t in src_vocab if t not in base_vocab]
    out_tok, base_tok = load_tokenizer(out), load_tokenizer(diverged["base"])
    assert len(out_tok) == len(base_vocab) + len(appended)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(base_vocab) + len(appended)
    for text in factories.SAMPLE_TEXTS + ["<|begin_of_text|>hello", "fifteenth sixteenth"]:
        assert out_tok(text).input_ids == base_tok(text).input_ids
    src_t, out_t = tensors(diverged["src"]), tensors(out)
    out_vocab = out_tok.get_vocab()
    for token, src_id in src_vocab.items():
        out_id = out_vocab[token]
        assert torch.equal(out_t["model.embed_tokens.weight"][out_id], src_t["model.embed_tokens.weight"][src_id]), token
        assert torch.equal(out_t["lm_head.weight"][out_id], src_t["lm_head.weight"][src_id]), token
    assert all(out_vocab[token] >= len(base_vocab) for token in appended)
    im_end = out_vocab["<|im_end|>"]
    assert out_tok.decode([im_end]) == "<|im_end|>"
    generation = json.loads((out / "generation_config.json").read_text())
    assert im_end in generation["eos_token_id"] and base_vocab["<|end_of_text|>"] in generation["eos_token_id"]
    assert config["eos_token_id"] == base_vocab["<|end_of_text|>"] == out_tok.eos_token_id
    report = report_of(out)
    assert report["plan"]["counts"]["appended"] == len(appended)
    assert report["plan"]["counts"]["dropped"] == 0


def test_appended_regular_tokens_decode_to_their_text(tmp_path: Path, byte_tok: dict, capsys) -> None:
    src_json = factories.with_tokens(byte_tok, regular=["Ġmergekit", "Ġremap"])
    src = factories.write_model(tmp_path / "src", src_json, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", byte_tok, **BYTE_SPECIALS)
    out = tmp_path / "out"
    assert remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out)[0] == 0
    out_tok = load_tokenizer(out)
    assert out_tok.decode([len(byte_tok["model"]["vocab"])]) == " mergekit"
    assert out_tok.decode([len(byte_tok["model"]["vocab"]) + 1]) == " remap"


def test_drop_mode_has_exactly_the_base_vocabulary(tmp_path: Path, diverged: dict, capsys) -> None:
    out = tmp_path / "drop"
    code, _, err = remap(
        capsys, "--src_model", diverged["src"], "--base_tokenizer", diverged["base"], "--out_dir", out, "--drop-extra", "--init", "mean"
    )
    assert code == 0, err
    base_vocab = factories.vocab_of(diverged["base_json"])
    src_vocab = factories.vocab_of(diverged["src_json"])
    out_tok = load_tokenizer(out)
    assert out_tok.get_vocab() == base_vocab and len(out_tok) == len(base_vocab)
    assert (out / "tokenizer.json").read_bytes() == (diverged["base"] / "tokenizer.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(base_vocab)
    src_t, out_t = tensors(diverged["src"]), tensors(out)
    embed, head = src_t["model.embed_tokens.weight"], src_t["lm_head.weight"]
    mean_embed = embed[: len(src_vocab)].double().mean(0).float()
    mean_head = head[: len(src_vocab)].double().mean(0).float()
    for token, base_id in base_vocab.items():
        if token in src_vocab:
            assert torch.equal(out_t["model.embed_tokens.weight"][base_id], embed[src_vocab[token]])
            assert torch.equal(out_t["lm_head.weight"][base_id], head[src_vocab[token]])
        else:
            assert torch.equal(out_t["model.embed_tokens.weight"][base_id], mean_embed), token
            assert torch.equal(out_t["lm_head.weight"][base_id], mean_head), token
    report = report_of(out)
    dropped = {d["token"] for d in report["plan"]["dropped"]}
    assert {"<|im_start|>", "<|im_end|>"} <= dropped
    assert report["plan"]["counts"]["dropped"] == len(set(src_vocab) - set(base_vocab))
    assert compare_tokenizers.main([str(diverged["base"]), str(out)]) == 0


def test_unk_init_uses_the_source_unk_row(tmp_path: Path, sp_tok: dict, capsys) -> None:
    src = factories.write_model(tmp_path / "src", sp_tok, **SP_SPECIALS)
    base_json = factories.with_tokens(sp_tok, regular=["▁zebra"])
    base = factories.write_tokenizer(tmp_path / "base", base_json, **SP_SPECIALS)
    out = tmp_path / "out"
    assert remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra", "--init", "unk")[0] == 0
    new_id = factories.vocab_of(base_json)["▁zebra"]
    unk_id = sp_tok["model"]["vocab"]["<unk>"]
    assert torch.equal(tensors(out)["model.embed_tokens.weight"][new_id], tensors(src)["model.embed_tokens.weight"][unk_id])
    assert report_of(out)["plan"]["init_rules"] == {"unk": 1}


# ------------------------------------------------------------------ architectures


@pytest.mark.parametrize(
    ("arch", "embed", "head"),
    [
        ("llama", "model.embed_tokens.weight", "lm_head.weight"),
        ("llama_tied", "model.embed_tokens.weight", None),
        ("gemma", "model.embed_tokens.weight", None),
        ("qwen2", "model.embed_tokens.weight", "lm_head.weight"),
        ("gpt2", "transformer.wte.weight", None),
        ("gpt_neox", "gpt_neox.embed_in.weight", "embed_out.weight"),
        ("phi", "model.embed_tokens.weight", "lm_head.weight"),
    ],
)
def test_architectures(tmp_path: Path, byte_tok: dict, capsys, arch: str, embed: str, head: str | None) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, arch=arch, **BYTE_SPECIALS)
    base_json = factories.permuted(factories.with_tokens(byte_tok, regular=["Ġthefox"]), seed=2)
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")
    assert code == 0, err
    report = report_of(out)
    assert (report["vocab_tensors"]["embed"], report["vocab_tensors"]["head"]) == (embed, head)
    src_t, out_t = tensors(src), tensors(out)
    assert set(src_t) == set(out_t)
    src_vocab, base_vocab = factories.vocab_of(byte_tok), factories.vocab_of(base_json)
    for name in [n for n in (embed, head, "lm_head.bias" if arch == "phi" else None) if n]:
        assert out_t[name].shape[0] == len(base_vocab)
        for token, src_id in list(src_vocab.items())[:50]:
            assert torch.equal(out_t[name][base_vocab[token]], src_t[name][src_id])
    for name, value in src_t.items():
        if name not in (embed, head, "lm_head.bias"):
            assert torch.equal(out_t[name], value) and out_t[name].dtype == value.dtype
    if arch == "phi":
        assert report["vocab_tensors"]["bias"] == "lm_head.bias"
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(base_vocab)
    assert config.get("tie_word_embeddings") == json.loads((src / "config.json").read_text()).get("tie_word_embeddings")
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gemma", "qwen2", "gpt2", "gpt_neox", "phi"])
def test_name_table_agrees_with_transformers_meta_model(tmp_path: Path, byte_tok: dict, arch: str) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, arch=arch, **BYTE_SPECIALS)
    ckpt = read_checkpoint(src)
    config = json.loads((src / "config.json").read_text())
    by_names = find_vocab_tensors(ckpt, config, embed_name=None, head_name=None, trust_remote_code=False)
    by_meta = vocab_tensors_from_meta(src, {n: t.shape for n, t in ckpt.tensors.items()}, trust_remote_code=False)
    assert by_meta is not None and by_meta[0] == by_names.embed
    if arch == "gpt_neox":
        # transformers 5 calls the parameter lm_head and renames `embed_out` when loading:
        # meta names cannot find it, one reason the name table is asked first.
        assert by_meta[1] in (by_names.head, None)
    else:
        assert by_meta[1] == by_names.head


def test_unknown_names_fall_back_to_the_meta_model(tmp_path: Path, byte_tok: dict, capsys) -> None:
    """Mamba calls its embedding `backbone.embeddings`: not in the name table, but
    transformers knows the class, so the meta-device model tells which tensor it is."""
    import transformers

    config = transformers.MambaConfig(vocab_size=400, hidden_size=32, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    src = tmp_path / "src"
    model.save_pretrained(src)
    factories.write_tokenizer(src, byte_tok, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", factories.permuted(byte_tok, 2), **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out)
    assert code == 0, err
    report = report_of(out)
    assert report["vocab_tensors"]["embed"] == "backbone.embeddings.weight" and report["vocab_tensors"]["how"] == "meta"


def test_padded_source_and_padded_base(tmp_path: Path, byte_tok: dict, capsys) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, rows=448, arch="qwen2", **BYTE_SPECIALS)
    base_json = factories.permuted(byte_tok, seed=4)
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    (base / "config.json").write_text(json.dumps({"vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1}))
    out = tmp_path / "out"
    assert remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")[0] == 0
    out_t, src_t = tensors(out), tensors(src)
    assert out_t["model.embed_tokens.weight"].shape == (512, 32)
    report = report_of(out)
    assert report["plan"]["counts"]["padding"] == 112 and report["plan"]["counts"]["source_padding_rows"] == 48
    mean = src_t["model.embed_tokens.weight"][:400].double().mean(0).float()
    assert torch.equal(out_t["model.embed_tokens.weight"][400], mean)  # padding rows: mean of real rows only
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 512
    assert compare_tokenizers.main([str(base), str(out), "--weights"]) == 0
    out2 = tmp_path / "out2"
    assert remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out2, "--pad-to-multiple-of", "64")[0] == 0
    assert tensors(out2)["lm_head.weight"].shape[0] == 448


def test_ghost_tokens_are_reported_and_initialised(tmp_path: Path, byte_tok: dict, capsys) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, rows=391, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", byte_tok, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")
    assert code == 0, err
    assert "9 source token(s) have ids beyond the embedding's 391 rows (ghost tokens)" in err
    report = report_of(out)
    assert report["plan"]["counts"]["ghost"] == 9
    assert [g["source_id"] for g in report["plan"]["ghosts"]] == list(range(391, 400))
    assert tensors(out)["model.embed_tokens.weight"].shape[0] == 400
    assert compare_tokenizers.main([str(base), str(out), "--weights"]) == 0


def test_bin_checkpoint_written_by_torch(tmp_path: Path, byte_tok: dict, capsys) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    state = tensors(src)
    for file in list(src.glob("*.safetensors")) + list(src.glob("*.index.json")):
        file.unlink()
    torch.save(state, src / "pytorch_model.bin")
    base_json = factories.permuted(byte_tok, 1)
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out)
    assert code == 0, err
    out_t = tensors(out)
    base_vocab = factories.vocab_of(base_json)
    for token, src_id in factories.vocab_of(byte_tok).items():
        assert torch.equal(out_t["lm_head.weight"][base_vocab[token]], state["lm_head.weight"][src_id])
    assert torch.equal(out_t["model.norm.weight"], state["model.norm.weight"])


# ------------------------------------------------------------------ output directory


def test_output_loads_without_warnings_and_ids_agree(tmp_path: Path, diverged: dict, capsys, caplog) -> None:
    out = tmp_path / "out"
    assert remap(capsys, "--src_model", diverged["src"], "--base_tokenizer", diverged["base"], "--out_dir", out, "--drop-extra")[0] == 0
    from transformers import AutoModelForCausalLM

    with caplog.at_level(logging.WARNING):
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    tokenizer = load_tokenizer(out)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["bos_token_id"] == tokenizer.bos_token_id == generation["bos_token_id"]
    assert config["eos_token_id"] == tokenizer.eos_token_id == generation["eos_token_id"]
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_existing_out_dir_is_refused_and_overwrite_replaces_it(tmp_path: Path, byte_tok: dict, capsys) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", src, "--out_dir", out)
    assert code == 2 and "exists and is not empty; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what this tool wrote: never a directory of other files
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", src, "--out_dir", out, "--overwrite")
    assert code == 2 and "holds files this tool did not write (no remap_report.json)" in err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert remap(capsys, "--src_model", src, "--base_tokenizer", src, "--out_dir", out)[0] == 0  # an empty directory is fine
    first = (out / REPORT_NAME).read_text()
    assert remap(capsys, "--src_model", src, "--base_tokenizer", src, "--out_dir", out, "--init", "zero")[0] == 2
    assert remap(capsys, "--src_model", src, "--base_tokenizer", src, "--out_dir", out, "--init", "zero", "--overwrite")[0] == 0
    assert (out / REPORT_NAME).read_text() != first and json.loads((out / REPORT_NAME).read_text())["options"]["init"] == "zero"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())  # as mkdir would make it


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failure_half_way_leaves_nothing(tmp_path: Path, byte_tok: dict, capsys, monkeypatch) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    before = factories.tree_digest(src)
    calls = {"n": 0}
    real = rt.ShardWriter.copy_range  # the flat script's: the one patched below and run by rt.main

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(rt.ShardWriter, "copy_range", failing)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", src, "--out_dir", out, "--max-shard-size", "20KB")
    assert code == 2 and "disk full" in err
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert factories.tree_digest(src) == before


def test_dry_run_writes_nothing(tmp_path: Path, diverged: dict, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, err = remap(
        capsys,
        "--src_model",
        diverged["src"],
        "--base_tokenizer",
        diverged["base"],
        "--out_dir",
        out,
        "--dry-run",
        "--max-shard-size",
        "40KB",
    )
    assert code == 0 and not out.exists()
    # the plan is the report: on stdout, so that `--dry-run > plan.txt` keeps it
    assert stdout.startswith("plan:") and "shards:" in stdout and "model-00001-of-" in stdout and "plan:" not in err
    code, stdout, _ = remap(
        capsys, "--src_model", diverged["src"], "--base_tokenizer", diverged["base"], "--dry-run", "--json"
    )  # no --out_dir needed
    report = json.loads(stdout)
    assert report["dry_run"] is True and report["out_dir"] is None
    missing_from_base = set(factories.vocab_of(diverged["src_json"])) - set(factories.vocab_of(diverged["base_json"]))
    assert report["plan"]["counts"]["appended"] == len(missing_from_base)
    assert "self_check" not in report and not out.exists()


def test_report_lists_files_with_their_sha256(tmp_path: Path, diverged: dict, capsys) -> None:
    out = tmp_path / "out"
    extra = tmp_path / "copy.json"
    assert remap(capsys, "--src_model", diverged["src"], "--base_tokenizer", diverged["base"], "--out_dir", out, "--report", extra)[0] == 0
    report = report_of(out)
    import hashlib

    for name, digest in report["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert set(report["files"]) == {p.name for p in out.iterdir()} - {REPORT_NAME}
    assert json.loads(extra.read_text())["files"] == report["files"]
    assert report["self_check"]["ok"] is True


def test_self_check_failure_exits_1_and_writes_nothing(tmp_path: Path, byte_tok: dict, capsys, monkeypatch) -> None:
    src = factories.write_model(tmp_path / "src", byte_tok, **BYTE_SPECIALS)
    real = rt.build_rows  # the flat script's: the one patched below and run by rt.main

    def corrupt(src_matrix, *args, **kwargs):
        rows = real(src_matrix, *args, **kwargs)
        rows[0, 0] ^= 1
        return rows

    monkeypatch.setattr(rt, "build_rows", corrupt)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", src, "--out_dir", out)
    assert code == 1 and "self-check failed" in err
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_append_with_ignore_merges_counts_reachable_tokens(tmp_path: Path, capsys) -> None:
    """With ignore_merges a whole word found in the vocabulary is one token, so an appended
    word becomes reachable: counted, warned about, and --drop-extra recommended."""
    base_json = factories.byte_level_bpe(ignore_merges=True)
    src_json = factories.with_tokens(base_json, regular=["Ġmergekit", "Ġremapping"])
    src = factories.write_model(tmp_path / "src", src_json, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out)
    assert code == 0
    assert "2 appended token(s) can be produced by encoding text" in err and "use --drop-extra" in err
    assert report_of(out)["tokenizer"] == {"appended_reachable_by_encoding": 2}
    assert load_tokenizer(out)(" mergekit", add_special_tokens=False).input_ids == [factories.vocab_of(src_json)["Ġmergekit"]]


def test_append_onto_a_base_whose_specials_are_not_in_the_model_vocabulary(tmp_path: Path, byte_tok: dict, capsys) -> None:
    """Llama-3 keeps its special tokens out of the BPE vocabulary and numbers them after it;
    once the vocabulary grows, the tokenizers library would renumber them unless they are
    written into it too."""
    base_json = factories.with_tokens(byte_tok, added=["<|eot_id|>", "<|reserved_0|>"])
    for token in ("<|eot_id|>", "<|reserved_0|>"):
        del base_json["model"]["vocab"][token]  # still ids 400, 401: numbered right after the vocabulary
    src_json = factories.with_tokens(byte_tok, regular=["Ġzzz"], added=["<|im_end|>"])
    src = factories.write_model(tmp_path / "src", src_json, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out)
    assert code == 0, err
    vocab = load_tokenizer(out).get_vocab()
    assert (vocab["<|eot_id|>"], vocab["<|reserved_0|>"]) == (400, 401)
    assert (vocab["Ġzzz"], vocab["<|im_end|>"]) == (402, 403)
