"""Every tensor and every config id that carries the vocabulary follows the tokens, or the
remap refuses: real checkpoint layouts (MTP layers, Medusa heads, logit biases, per-row
scales, multimodal token ids, encoder-decoders) built on disk."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import compare_tokenizers as ct
import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS, report_of, tensors

remap = functools.partial(factories.call_main, rt.main)

# name -> shape, as the real checkpoints name them (V: the vocabulary, H: the hidden size)
EXTRA = {
    "model.layers.2.embed_tokens.weight": ("V", "H"),  # DeepSeek-V3 MTP layer
    "model.layers.2.shared_head.head.weight": ("V", "H"),
    "medusa_head.0.1.weight": ("V", "H"),  # Medusa
    "final_logits_bias": (1, "V"),  # BART-style logit bias
    "model.embed_tokens.bias": ("V",),
    "model.embed_tokens_per_layer.weight": ("V", 8),  # Gemma-3n per-layer embedding
    "lm_head.SCB": ("V",),  # bitsandbytes per-row scale of lm_head
    "lm_head.weight_scale": ("V", 1),  # FP8 per-row scale
}
PASSED_THROUGH = {"medusa_head.0.0.linear.weight": ("H", "H")}  # a Medusa head's residual block: not per token


def with_tensors(directory: Path, extra: dict[str, tuple], rows: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Add tensors to a single-shard model as its checkpoint would hold them."""
    path = directory / "model.safetensors"
    state = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    added = {name: torch.randn(*[{"V": rows, "H": hidden}.get(d, d) for d in shape], generator=generator) for name, shape in extra.items()}
    save_file({**state, **added}, path, metadata={"format": "pt"})
    return added


def model_with_extras(tmp_path: Path, tokenizer: dict, extra: dict[str, tuple] = EXTRA, **kwargs) -> tuple[Path, dict]:
    src = factories.write_model(tmp_path / "src", tokenizer, shard_size="100MB", **BYTE_SPECIALS, **kwargs)
    return src, with_tensors(src, extra, len(factories.vocab_of(tokenizer)), 32)


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_every_vocabulary_tensor_follows_the_tokens(tmp_path: Path, byte_tok: dict, arch: str, capsys) -> None:
    extra = {**EXTRA, "lm_head.bias": ("V",)} if arch == "llama_tied" else EXTRA  # a head bias on a tied model
    src, added = model_with_extras(tmp_path, byte_tok, {**extra, **PASSED_THROUGH}, arch=arch)
    base_json = factories.permuted(byte_tok, seed=5)
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")
    assert code == 0, err
    written = tensors(out)
    src_ids, out_ids = byte_tok["model"]["vocab"], base_json["model"]["vocab"]
    order = torch.tensor([src_ids[token] for token in sorted(out_ids, key=out_ids.__getitem__)])
    for name, value in added.items():
        if name in PASSED_THROUGH:
            assert torch.equal(written[name], value), name
        elif value.shape[0] == 1:
            assert torch.equal(written[name], value[:, order]), name
        else:
            assert torch.equal(written[name], value[order]), name
    assert set(report_of(out)["vocab_tensors"]["extra"]) == set(extra)


def test_extra_vocabulary_tensors_get_rows_for_new_tokens(tmp_path: Path, byte_tok: dict, capsys) -> None:
    head, tail = factories.two_token_word(byte_tok)
    src, added = model_with_extras(tmp_path, byte_tok, {"model.layers.2.embed_tokens.weight": ("V", "H"), "final_logits_bias": (1, "V")})
    base_json = factories.with_tokens(byte_tok, regular=[head + tail])
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    out = tmp_path / "out"
    assert remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")[0] == 0
    written, vocab = tensors(out), byte_tok["model"]["vocab"]
    new = len(vocab)
    mtp = added["model.layers.2.embed_tokens.weight"]
    assert torch.equal(
        written["model.layers.2.embed_tokens.weight"][new], (mtp[vocab[head]].double() + mtp[vocab[tail]].double()).div(2).float()
    )
    assert written["final_logits_bias"].shape == (1, new + 1)


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("model.router_table.weight", ("V", 4), "has one row per token"),
        ("model.layers.2.embed_tokens.weight", (7, "H"), "a vocabulary tensor with 7 rows"),
    ],
)
def test_an_ambiguous_vocabulary_tensor_is_refused(tmp_path: Path, byte_tok: dict, name: str, shape: tuple, message: str, capsys) -> None:
    src, _ = model_with_extras(tmp_path, byte_tok, {name: shape})
    base = factories.write_tokenizer(tmp_path / "base", factories.permuted(byte_tok), **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out)
    assert code == 2 and name in err and message in err, err
    assert not out.exists()


def test_config_token_ids_follow_their_tokens(tmp_path: Path, byte_tok: dict, capsys) -> None:
    src_json = factories.with_tokens(byte_tok, added=["<image>", "<video>"])
    ids = factories.vocab_of(src_json)
    src = factories.write_model(
        tmp_path / "src",
        src_json,
        config_overrides={"image_token_index": ids["<image>"], "video_token_id": ids["<video>"], "vision_start_token_id": ids["Ġthe"]},
        **BYTE_SPECIALS,
    )
    config = json.loads((src / "config.json").read_text())
    config["text_config"] = {"vocab_size": config["vocab_size"], "boi_token_index": ids["<image>"]}
    (src / "config.json").write_text(json.dumps(config))
    base_json = factories.permuted(src_json, seed=3)
    base = factories.write_tokenizer(tmp_path / "base", base_json, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")
    assert code == 0, err
    written = json.loads((out / "config.json").read_text())
    out_ids = factories.vocab_of(base_json)
    assert written["image_token_index"] == out_ids["<image>"] != ids["<image>"]
    assert written["video_token_id"] == out_ids["<video>"] and written["vision_start_token_id"] == out_ids["Ġthe"]
    assert written["text_config"] == {"vocab_size": len(out_ids), "boi_token_index": out_ids["<image>"]}
    assert written["vocab_size"] == len(out_ids)


def test_a_config_token_the_output_drops_is_refused(tmp_path: Path, byte_tok: dict, capsys) -> None:
    src_json = factories.with_tokens(byte_tok, added=["<image>"])
    src = factories.write_model(
        tmp_path / "src", src_json, config_overrides={"image_token_index": factories.vocab_of(src_json)["<image>"]}, **BYTE_SPECIALS
    )
    base = factories.write_tokenizer(tmp_path / "base", byte_tok, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")
    assert code == 2 and "image_token_index" in err and "'<image>'" in err and "without --drop-extra" in err, err
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out)  # append mode keeps it
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["image_token_index"] == len(byte_tok["model"]["vocab"])


def test_encoder_decoder_checkpoints_are_refused(tmp_path: Path, byte_tok: dict, capsys) -> None:
    import transformers

    config = transformers.BartConfig(
        vocab_size=400, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    src = tmp_path / "bart"
    transformers.BartForConditionalGeneration(config).save_pretrained(src)
    factories.write_tokenizer(src, byte_tok, **BYTE_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", factories.permuted(byte_tok), **BYTE_SPECIALS)
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", tmp_path / "out")
    assert code == 2 and "encoder-decoder" in err and "shared.weight" in err, err


def test_the_gate_fails_a_vocabulary_tensor_left_at_other_rows(tmp_path: Path, byte_tok: dict, capsys) -> None:
    """A checkpoint whose MTP embedding was not resized with the main one (a remap by a tool
    that only knew embed_tokens and lm_head): the gate names it."""
    good = factories.write_model(tmp_path / "good", byte_tok, shard_size="100MB", **BYTE_SPECIALS)
    stale, _ = model_with_extras(tmp_path, byte_tok, {"model.layers.2.embed_tokens.weight": (396, "H")})
    code, out, _ = factories.call_main(ct.main, capsys, good, stale)
    assert code == 1 and "model.layers.2.embed_tokens.weight has 396 rows, its embedding 400" in out, out


def test_a_role_id_whose_token_is_dropped_takes_the_targets(tmp_path: Path, byte_tok: dict, sp_tok: dict, capsys) -> None:
    """Gemma's config names unk_token_id 3; SmolLM2's tokenizer has no <unk>: a role, not content,
    so the output gets T's unk (none here), not a refusal."""
    src = factories.write_model(tmp_path / "src", sp_tok, config_overrides={"unk_token_id": 0}, **factories.SP_SPECIALS)
    base = factories.write_tokenizer(tmp_path / "base", byte_tok, **BYTE_SPECIALS)
    out = tmp_path / "out"
    code, _, err = remap(capsys, "--src_model", src, "--base_tokenizer", base, "--out_dir", out, "--drop-extra")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["unk_token_id"] is None
