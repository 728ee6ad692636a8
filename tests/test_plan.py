"""The pure parts of remap_tokenizer.py, tested exhaustively: plan, matching, shards,
safetensors headers and the row arithmetic."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import compare_tokenizers as ct
import remap_tokenizer as rt
from merge_tools.common.errors import CliError
from merge_tools.common.safetensors_files import DTYPE_SIZES, check_safetensors_header, read_safetensors_header
from merge_tools.common.sources import file_in_model_dir, select_weight_files
from merge_tools.common.spellings import token_bytes
from merge_tools.common.tokenizer_files import detect_convention
from merge_tools.common.tokenizer_merge import round_up
from merge_tools.remap import shard_writer
from merge_tools.remap.checkpoints import TensorEntry
from merge_tools.remap.config_outputs import output_role_ids, patch_config
from merge_tools.remap.matching import Matches, effective_match_mode, match_tokens
from merge_tools.remap.plan import FVT_ROW, INIT_METHODS, MEAN_ROW, ZERO_ROW, RemapPlan, plan_remap
from merge_tools.remap.progress import NoProgress
from merge_tools.remap.row_math import FLOAT_DTYPES, build_rows, decode_rows, encode_rows, nonfinite_rows
from merge_tools.remap.shard_writer import ShardWriter, WriterState, direct_io, write_all
from merge_tools.remap.shards import parse_size, plan_shards
from merge_tools.remap.tokenizer_outputs import patch_tokenizer_json
from merge_tools.remap.tokenizers_in import VocabSpec, spell_bytes, utf8_pieces

UNIVERSE = [f"t{i}" for i in range(40)] + ["<s>", "</s>", "<unk>", "<|im_start|>"]
ADDED = {"<s>", "</s>", "<unk>", "<|im_start|>"}
FLAGS = {"special": True, "normalized": False, "lstrip": False, "rstrip": False, "single_word": False}


@st.composite
def vocab_specs(draw: st.DrawFn, min_size: int = 1) -> VocabSpec:
    tokens = draw(st.lists(st.sampled_from(UNIVERSE), min_size=min_size, max_size=len(UNIVERSE), unique=True))
    ids = draw(st.permutations(range(len(tokens))))
    vocab = dict(zip(tokens, ids))
    roles = {
        role: (token if token in vocab else None) for role, token in (("bos", "<s>"), ("eos", "</s>"), ("pad", None), ("unk", "<unk>"))
    }
    return VocabSpec(vocab, {t: FLAGS for t in tokens if t in ADDED}, roles)


@given(
    base=vocab_specs(),
    src=vocab_specs(),
    extra_rows=st.integers(-5, 8),
    drop=st.booleans(),
    init=st.sampled_from(INIT_METHODS),
    base_config_extra=st.one_of(st.none(), st.integers(-3, 10)),
    pad=st.one_of(st.none(), st.integers(1, 16)),
)
@settings(max_examples=400, deadline=None)
def test_plan_invariants(base, src, extra_rows, drop, init, base_config_extra, pad) -> None:
    src_rows = max(0, len(src) + extra_rows)
    base_config = None if base_config_extra is None else len(base) + base_config_extra
    matches = match_tokens(base, src, "exact")
    decompositions = {t: (src.vocab[t],) for t in base.vocab if t in src.vocab}
    plan = plan_remap(
        base,
        src,
        src_rows=src_rows,
        matches=matches,
        drop_extra=drop,
        init=init,
        base_config_vocab_size=base_config,
        pad_to_multiple_of=pad,
        decompositions=decompositions,
    )
    assert len(plan.row_source) == len(plan.row_rule) == plan.n_rows
    # every base token keeps its id, and one with a real source row is copied from exactly it
    for token, base_id in base.vocab.items():
        assert plan.out_vocab[token] == base_id
        if token in src.vocab and src.vocab[token] < src_rows:
            assert plan.row_source[base_id] == src.vocab[token]
            assert plan.row_rule[base_id] in ("copied", "moved")
        else:
            assert plan.row_rule[base_id] not in ("copied", "moved", "appended")
    # no two tokens share an id; token ids are 0..n-1 and every row exists
    ids = sorted(plan.out_vocab.values())
    assert ids == list(range(len(plan.out_vocab)))
    assert plan.n_rows >= len(plan.out_vocab)
    if pad:
        assert plan.n_rows % pad == 0
    real_src = {i for i in src.vocab.values() if i < src_rows}
    copied_from = [s for s, rule in zip(plan.row_source, plan.row_rule) if rule in ("copied", "moved", "appended")]
    assert len(copied_from) == len(set(copied_from))
    if drop:
        expected = max(len(base), base_config) if base_config is not None else len(base)
        assert plan.n_rows == round_up(expected, pad)
        assert set(plan.out_vocab) == set(base.vocab)
        assert {t for t, _, _ in plan.dropped} == {t for t, i in src.vocab.items() if t not in base.vocab and i < src_rows}
    else:
        # append mode: every real source row appears exactly once
        assert set(copied_from) == real_src
        assert plan.n_rows == round_up(len(base) + len(plan.appended), pad)
    assert {i for _, i in plan.src_ghosts} == {i for i in src.vocab.values() if i >= src_rows}
    for row, source in enumerate(plan.row_source):
        assert source >= 0 and source < src_rows or source in (MEAN_ROW, ZERO_ROW, FVT_ROW)
        if source == FVT_ROW:
            assert plan.fvt_parts[row] and all(0 <= i < src_rows for i in plan.fvt_parts[row])
    json.dumps(plan.to_dict({i: t for t, i in src.vocab.items()}))


@given(base=vocab_specs(), src=vocab_specs())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_patched_tokenizer_vocabulary_equals_the_plan(base, src) -> None:
    from tokenizers import Tokenizer

    plan = plan_remap(base, src, src_rows=len(src), matches=match_tokens(base, src, "exact"), drop_extra=False, init="mean")
    base_json = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, **FLAGS} for t, i in sorted(base.vocab.items(), key=lambda x: x[1]) if t in ADDED],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {"type": "BPE", "vocab": dict(base.vocab), "merges": []},
    }
    patched = patch_tokenizer_json(base_json, plan, {t: FLAGS for t in src.added})
    assert Tokenizer.from_str(json.dumps(patched)).get_vocab(with_added_tokens=True) == dict(plan.out_vocab)


def spec(tokens: list[str], convention: str, byte_fallback: bool = False, added: tuple[str, ...] = ()) -> VocabSpec:
    return VocabSpec({t: i for i, t in enumerate(tokens)}, {a: FLAGS for a in added}, {}, convention, byte_fallback)


def test_bytes_matching_across_conventions() -> None:
    base = spec(["<s>", "Ġthe", "the", "Ċ", "Ġ"], "byte_level", added=("<s>",))
    src = spec(["<unk>", "<s>", "<0x20>", "<0x0A>", "▁the", "the", "▁"], "metaspace", byte_fallback=True, added=("<unk>", "<s>"))
    matches = match_tokens(base, src, "bytes")
    assert matches.src_of_base == {0: 1, 1: 4, 2: 5, 3: 3, 4: 6}
    # `<0x20>` and `▁` both stand for b" ": the regular token keeps the match
    assert matches.collisions == ({"side": "source", "bytes": " ", "kept": "▁", "kept_id": 6, "dropped": "<0x20>", "dropped_id": 2},)
    assert match_tokens(base, src, "exact").src_of_base == {0: 1, 2: 5}
    assert effective_match_mode("auto", base, src) == "bytes"
    assert effective_match_mode("auto", base, base) == "exact"


def test_collision_losers_are_not_appended() -> None:
    base = spec(["a"], "byte_level")
    src = spec(["<0x20>", "▁", "a"], "metaspace", byte_fallback=True)
    plan = plan_remap(base, src, src_rows=3, matches=match_tokens(base, src, "bytes"), drop_extra=False, init="mean")
    assert [(t, s) for t, s, _ in plan.appended] == [("Ġ", 1)]
    assert plan.dropped == (("<0x20>", 0, "same bytes as the token the source tokenizer produces for them"),)


@pytest.mark.parametrize(
    ("data", "convention", "fallback", "expected"),
    [
        (b" the", "byte_level", False, "Ġthe"),
        (b" the", "metaspace", False, "▁the"),
        (b"\xe6", "metaspace", True, "<0xE6>"),
        (b"\xe6", "metaspace", False, None),
        (b"\xe6\x97\xa5", "byte_level", False, "æĹ¥"),
    ],
)
def test_spell_bytes(data: bytes, convention: str, fallback: bool, expected: str | None) -> None:
    assert spell_bytes(data, convention, fallback) == expected


@given(st.binary(max_size=12))
def test_spelling_round_trips_through_token_bytes(data: bytes) -> None:
    for convention, fallback in (("byte_level", False), ("metaspace", True), ("plain", False), ("wordpiece", False)):
        spelled = spell_bytes(data, convention, fallback)
        if spelled is not None:
            assert token_bytes(spelled, convention, fallback) == data


@given(st.binary(max_size=16))
def test_utf8_pieces_cover_the_bytes(data: bytes) -> None:
    rebuilt = b"".join(text.encode() if text is not None else bytes([byte]) for text, byte in utf8_pieces(data))
    assert rebuilt == data


# ------------------------------------------------------------------ shards and headers


@pytest.mark.parametrize(
    ("text", "value"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000), ("1234", 1234), ("30kb", 30_000)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "five", "5XB", "-1GB", "0", "5 G B"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@given(st.lists(st.integers(0, 100), max_size=30), st.integers(1, 150))
def test_plan_shards(sizes: list[int], limit: int) -> None:
    entries = [TensorEntry(f"t{i}", "U8", (n,), n) for i, n in enumerate(sizes)]
    plan = plan_shards(entries, limit)
    assert [e for shard in plan.tensors for e in shard] == entries
    assert len(plan.files) == len(plan.tensors) == (len(set(plan.files)))
    for shard in plan.tensors:
        assert shard and (len(shard) == 1 or sum(e.nbytes for e in shard) <= limit)
    if not entries:
        assert plan.files == ()
    elif len(plan.files) == 1:
        assert plan.files == ("model.safetensors",)
    else:
        assert plan.files[0] == f"model-00001-of-{len(plan.files):05d}.safetensors"


TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@st.composite
def tensor_sets(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.text(min_size=1, max_size=12).filter(lambda n: n != "__metadata__"), min_size=1, max_size=6, unique=True))
    result = {}
    for name in names:
        dtype = draw(st.sampled_from(sorted(TORCH_DTYPES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        raw = draw(st.binary(min_size=int(np.prod(shape)) * DTYPE_SIZES[dtype], max_size=int(np.prod(shape)) * DTYPE_SIZES[dtype]))
        result[name] = (
            torch.frombuffer(bytearray(raw) or bytearray(1), dtype=torch.uint8)[: len(raw)].view(TORCH_DTYPES[dtype]).reshape(shape)
        )
    return result


@given(tensor_sets(), st.booleans(), st.sampled_from([4096, 8192, 2**20]))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_streamed_safetensors_round_trip_through_the_library(
    tmp_path_factory, tensors: dict[str, torch.Tensor], direct: bool, chunk: int
) -> None:
    """Through O_DIRECT (where the temporary directory's file system has it) and the page
    cache, with buffers small enough that tensors straddle flushes."""
    directory = tmp_path_factory.mktemp("st")
    direct = direct and supports_direct_io(directory)
    entries = [
        TensorEntry(name, next(k for k, v in TORCH_DTYPES.items() if v == t.dtype), tuple(t.shape), t.numel() * t.element_size())
        for name, t in tensors.items()
    ]
    # half the tensors are copied from a file, half go through write()
    source = directory / "source.bin"
    blobs = {name: tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for name in tensors}
    source.write_bytes(b"".join(blobs.values()))
    offsets, position = {}, 0
    for name, blob in blobs.items():
        offsets[name], position = position, position + len(blob)
    path = directory / "x.safetensors"
    with (
        mock.patch.object(shard_writer, "COPY_CHUNK_BYTES", chunk),
        mock.patch.object(shard_writer, "direct_io", lambda fd: direct and DIRECT_IO(fd)),
    ):
        writer = ShardWriter(path, entries, NoProgress())
        for i, entry in enumerate(entries):
            if i % 2:
                writer.copy_range(source, offsets[entry.name], entry.nbytes)
            else:
                writer.write(blobs[entry.name])
        writer.finish()
        assert writer.direct == direct
        digest = writer.sync_and_close()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
    header, _ = read_safetensors_header(path)
    assert set(header) == set(tensors)


DIRECT_IO = direct_io


def supports_direct_io(directory: Path) -> bool:
    with (directory / "probe").open("wb") as handle:
        supported = DIRECT_IO(handle.fileno())
    (directory / "probe").unlink()
    return supported


def test_writer_falls_back_to_the_page_cache_when_direct_writes_are_refused(tmp_path: Path, monkeypatch) -> None:
    # Some file systems take the O_DIRECT flag and then refuse the writes (EINVAL).
    real, refused = write_all, []

    def picky(fd: int, data: memoryview, offset: int) -> None:
        if os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL):
            refused.append(len(data))
            if offset:  # a first block gets through, then the file system refuses
                raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, data, offset)

    if not supports_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}: the file system has no O_DIRECT")
    monkeypatch.setattr(shard_writer, "write_all", picky)  # the module ShardWriter reads them from
    monkeypatch.setattr(shard_writer, "COPY_CHUNK_BYTES", 4096)
    payload = bytes(range(256)) * 40
    entry = TensorEntry("t", "U8", (len(payload),), len(payload))
    writer = ShardWriter(tmp_path / "x.safetensors", [entry], NoProgress())
    assert writer.direct
    writer.write(payload)
    writer.finish()
    digest = writer.sync_and_close()
    data = (tmp_path / "x.safetensors").read_bytes()
    assert refused and not writer.direct
    assert data.endswith(payload) and digest == hashlib.sha256(data).hexdigest()


def test_header_validation_rejects_overlaps_and_truncation() -> None:
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}}
    assert check_safetensors_header(good, 12, "x") == good
    with pytest.raises(CliError, match="overlaps"):
        check_safetensors_header({**good, "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, 12, "x")
    with pytest.raises(CliError, match="truncated"):
        check_safetensors_header(good, 10, "x")
    with pytest.raises(CliError, match="extra bytes"):
        check_safetensors_header(good, 16, "x")
    with pytest.raises(CliError, match="takes 8 bytes"):
        check_safetensors_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 6]}}, 6, "x")
    for bad, message in (
        ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}, "unknown dtype 'Q4'"),
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "not a list of non-negative integers"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "not a list of non-negative integers"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "not a list of non-negative integers"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "invalid data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "invalid data_offsets"),
        ("F32", "not an object"),
    ):
        with pytest.raises(CliError, match=message):
            check_safetensors_header({"a": bad}, 8, "x")


HEADER_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "U8", "I64", "Q4", "f32"]),
        "shape": st.one_of(st.lists(st.integers(0, 4), max_size=3), st.lists(st.sampled_from([1.0, -1, True]), min_size=1, max_size=2)),
        "data_offsets": st.one_of(st.tuples(st.integers(-2, 40), st.integers(-2, 40)).map(list), st.just([0])),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), HEADER_ENTRY, min_size=1, max_size=3), st.integers(0, 48))
def test_header_checks_accept_exactly_what_the_safetensors_library_opens(tmp_path_factory, header: dict, data_size: int) -> None:
    """Both tools read headers with the shared check: it must never accept a file that the
    safetensors library refuses, nor refuse one it opens."""
    from safetensors import safe_open

    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path_factory.mktemp("header") / "x.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(data_size))
    try:
        with safe_open(str(path), framework="numpy") as handle:
            library = sorted(handle.keys())
    except Exception:  # the library refuses the file
        library = None
    try:
        ours = sorted(read_safetensors_header(path)[0])
    except CliError:
        ours = None
    assert ours == library, (header, data_size)
    try:
        compared = sorted(read_safetensors_header(path)[0])
    except CliError:
        compared = None
    assert compared == ours


# ------------------------------------------------------------------ row arithmetic


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=64))
def test_bf16_rounding_matches_torch(values: list[float]) -> None:
    array = np.array(values, dtype=np.float32)[None, :]
    ours = encode_rows(array, "BF16").view(np.uint16)
    theirs = torch.from_numpy(array).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = np.isfinite(array)
    assert np.array_equal(ours[finite], theirs[finite])
    assert np.array_equal(np.isnan(decode_rows(encode_rows(array, "BF16"), "BF16")), np.isnan(array))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_rows_and_codecs(dtype: str) -> None:
    values = np.array([[1.0, 2.0], [np.nan, 0.0], [0.0, -np.inf], [3.5, -1.25]], dtype=np.float64)
    raw = encode_rows(values, dtype)
    assert nonfinite_rows(raw, dtype).tolist() == [False, True, True, False]
    decoded = decode_rows(raw, dtype)
    assert decoded[0].tolist() == [1.0, 2.0] and decoded[3].tolist() == [3.5, -1.25]


def test_build_rows_fvt_mean_zero_and_nan_exclusion() -> None:
    src_values = np.array([[1.0, 2.0], [3.0, 6.0], [np.nan, 1.0], [10.0, 10.0]], dtype=np.float32)
    src = encode_rows(src_values, "F32")
    plan = RemapPlan(
        mode="drop",
        init="fvt",
        n_rows=5,
        n_base=5,
        src_rows=4,
        row_source=(1, FVT_ROW, FVT_ROW, ZERO_ROW, MEAN_ROW),
        row_rule=("moved", "fvt", "fvt", "zero", "padding"),
        fvt_parts={1: (0, 1), 2: (2,)},
        out_vocab={},
        appended=(),
        dropped=(),
        src_ghosts=(),
        src_padding_rows=0,
        matches=Matches("exact", {}),
    )
    finite = ~nonfinite_rows(src, "F32")
    mean = encode_rows(np.array([[14 / 3, 6.0]]), "F32")[0]
    rows = decode_rows(build_rows(src, "F32", plan, 0, 5, lambda: mean, finite), "F32")
    assert rows[0].tolist() == [3.0, 6.0]
    assert rows[1].tolist() == [2.0, 4.0]  # mean of rows 0 and 1
    assert rows[2].tolist() == decode_rows(mean[None, :], "F32")[0].tolist()  # only part is NaN: the mean row
    assert rows[3].tolist() == [0.0, 0.0]
    assert not np.isnan(rows).any()
    assert decode_rows(build_rows(src, "F32", plan, 1, 3, lambda: mean, finite), "F32").tolist() == rows[1:3].tolist()


def test_output_role_ids_prefer_base_configs_and_add_source_eos_in_append_mode() -> None:
    plan = RemapPlan(
        mode="append",
        init="fvt",
        n_rows=12,
        n_base=10,
        src_rows=12,
        row_source=tuple(range(12)),
        row_rule=("copied",) * 12,
        fvt_parts={},
        out_vocab={"<s>": 0, "</s>": 1, "<|im_end|>": 11},
        appended=(),
        dropped=(),
        src_ghosts=(),
        src_padding_rows=0,
        matches=Matches("exact", {}),
    )
    config_ids, generation_ids = output_role_ids(
        {"bos": "<s>", "eos": "</s>", "pad": None}, {"<s>": 0, "</s>": 1}, {"eos_token_id": [1, 2]}, {}, ["<|im_end|>"], plan
    )
    assert config_ids == {"bos": 0, "eos": [1, 2], "pad": None}
    assert generation_ids["eos"] == [1, 2, 11]
    drop = plan.__class__(**{**plan.__dict__, "mode": "drop"})
    assert output_role_ids({"bos": "<s>", "eos": "</s>", "pad": None}, {"<s>": 0, "</s>": 1}, {}, {}, ["<|im_end|>"], drop)[1]["eos"] == 1


def test_patch_config_keeps_everything_else() -> None:
    config = {"vocab_size": 10, "eos_token_id": 5, "hidden_size": 8, "tie_word_embeddings": True}
    assert patch_config(config, 12, {"bos": 0, "eos": 1, "pad": None}) == {
        "vocab_size": 12,
        "eos_token_id": 1,
        "bos_token_id": 0,
        "hidden_size": 8,
        "tie_word_embeddings": True,
    }
    nested = {"text_config": {"vocab_size": 10}, "model_type": "gemma3"}
    assert patch_config(nested, 12, {})["text_config"]["vocab_size"] == 12


def test_select_weight_files() -> None:
    assert select_weight_files(["model.safetensors.index.json", "model-00001-of-00002.safetensors", "consolidated.safetensors"]) == (
        "safetensors",
        ["model.safetensors.index.json"],
    )
    assert select_weight_files(["model.safetensors", "consolidated.safetensors", "pytorch_model.bin"]) == (
        "safetensors",
        ["model.safetensors"],
    )
    assert select_weight_files(["pytorch_model.bin", "original/consolidated.00.pth"]) == ("bin", ["pytorch_model.bin"])
    assert select_weight_files(["README.md"]) == ("none", [])


@pytest.mark.parametrize("module", [rt, ct], ids=["remap", "compare"])
@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ".", "", "a\\b.safetensors"])
def test_file_names_read_from_files_must_be_plain(tmp_path: Path, module: Any, name: str) -> None:
    with pytest.raises(module.CliError, match="not a plain file name inside the model directory"):
        module.file_in_model_dir(tmp_path, name, tmp_path / "model.safetensors.index.json")


def test_a_plain_name_is_kept_even_when_its_symlink_leads_elsewhere(tmp_path: Path) -> None:
    elsewhere = tmp_path / "other-disk" / "blob"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").symlink_to(elsewhere)
    path = file_in_model_dir(tmp_path / "model", "model.safetensors", tmp_path)
    assert path == tmp_path / "model" / "model.safetensors" and path.read_bytes() == b"x"


def test_the_shard_writer_checks_its_state(tmp_path: Path) -> None:
    entry = TensorEntry("x", "U8", (4,), 4)
    writer = ShardWriter(tmp_path / "x.safetensors", [entry], NoProgress())
    assert writer.state is WriterState.WRITING
    with pytest.raises(RuntimeError, match=r"sync_and_close\(\) on x.safetensors while writing, expected finished"):
        writer.sync_and_close()
    writer.write(b"abcd")
    writer.finish()
    with pytest.raises(RuntimeError, match=r"write\(\) on x.safetensors while finished"):
        writer.write(b"e")
    writer.sync_and_close()
    assert writer.state is WriterState.CLOSED and load_file(str(tmp_path / "x.safetensors"))["x"].tolist() == list(b"abcd")


def test_wordpiece_pieces_match_by_where_they_stand_in_a_word() -> None:
    """`##` continues a word; every other WordPiece piece starts one (after a space): a
    word-initial piece never takes a mid-word row."""
    base = spec(["[UNK]", "the", "##the", "##ing", "play"], "wordpiece", added=("[UNK]",))
    src = spec(["Ġthe", "the", "ing", "Ġplay", "play"], "byte_level")
    assert match_tokens(base, src, "bytes").src_of_base == {1: 0, 2: 1, 3: 2, 4: 3}
    assert spell_bytes(b" the", "wordpiece", False) == "the" and spell_bytes(b"the", "wordpiece", False) == "##the"


def test_a_wordpiece_tokenizer_json_reads_as_wordpiece() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordPiece({"[UNK]": 0, "the": 1, "##re": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    assert detect_convention(json.loads(tokenizer.to_str())) == "wordpiece"
