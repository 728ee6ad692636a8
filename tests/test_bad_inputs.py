"""Bad input never crashes either tool, and nothing is ever lost.

Every case checks: the exit code; exactly one `error:` line on stderr that names the
file (or argument) and says what to do; no traceback; every source directory
byte-identical afterwards; no output and no temporary directory left behind.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import compare_tokenizers as ct
import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS
from merge_tools.remap.config_outputs import REPORT_NAME

shutil_usage = namedtuple("shutil_usage", "total used free")


@pytest.fixture
def model(tmp_path: Path, byte_tok: dict) -> Path:
    return factories.write_model(tmp_path / "model", byte_tok, shard_size="20KB", **BYTE_SPECIALS)


@pytest.fixture
def base(tmp_path: Path, byte_tok: dict) -> Path:
    return factories.write_tokenizer(tmp_path / "base", factories.permuted(byte_tok, 1), **BYTE_SPECIALS)


def check(
    capsys: pytest.CaptureFixture[str],
    tool: Callable[[list[str]], int],
    argv: list[object],
    *,
    mentions: list[str],
    sources: list[Path],
    out: Path | None = None,
    code: int = 2,
) -> str:
    before = {source: factories.tree_digest(source) for source in sources if source.is_dir()}
    parents = {source.parent for source in sources} | ({out.parent} if out else set())
    listing = {parent: sorted(p.name for p in parent.iterdir()) for parent in parents if parent.is_dir()}
    result = tool([str(a) for a in argv])
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert result == code, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for text in mentions:
        assert text in errors[0], (text, errors[0])
    for source, digest in before.items():
        assert factories.tree_digest(source) == digest, f"{source} changed"
    if out is not None and out not in sources:
        assert not out.exists() or out.is_file(), f"{out} was created"
    for parent, names in listing.items():
        assert sorted(p.name for p in parent.iterdir()) == names, f"leftovers in {parent}"
    return errors[0]


def remap_args(model: Path, base: Path, out: Path, *extra: object) -> list[object]:
    return ["--src_model", model, "--base_tokenizer", base, "--out_dir", out, *extra]


# ------------------------------------------------------------------ paths and arguments


def test_compare_nonexistent_path(capsys, tok_dir: Path, tmp_path: Path) -> None:
    check(capsys, ct.main, [tok_dir, tmp_path / "missing"], mentions=[str(tmp_path / "missing"), "no such file"], sources=[tok_dir])


def test_remap_nonexistent_model(capsys, base: Path, tmp_path: Path) -> None:
    check(
        capsys,
        rt.main,
        remap_args(tmp_path / "missing", base, tmp_path / "out"),
        mentions=["missing", "no such file"],
        sources=[base],
        out=tmp_path / "out",
    )


def test_compare_directory_without_tokenizer(capsys, tok_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    check(capsys, ct.main, [tok_dir, empty], mentions=[str(empty), "no tokenizer here", "tokenizer.json"], sources=[tok_dir, empty])


def test_remap_base_without_tokenizer(capsys, model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    check(
        capsys,
        rt.main,
        remap_args(model, empty, tmp_path / "out"),
        mentions=[str(empty), "no tokenizer here"],
        sources=[model, empty],
        out=tmp_path / "out",
    )


def test_compare_empty_file(capsys, tok_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "tokenizer.json"
    empty.write_text("")
    check(capsys, ct.main, [tok_dir, empty], mentions=[str(empty), "empty file"], sources=[tok_dir])


def test_remap_empty_tokenizer_json(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    (base / "tokenizer.json").write_text("")
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=[str(base / "tokenizer.json"), "empty file"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def test_out_dir_equal_to_source(capsys, model: Path, base: Path) -> None:
    check(
        capsys,
        rt.main,
        remap_args(model, base, model),
        mentions=["--out_dir", str(model), "source model", "outside"],
        sources=[model, base],
    )


def test_out_dir_inside_source(capsys, model: Path, base: Path) -> None:
    out = model / "remapped"
    check(capsys, rt.main, remap_args(model, base, out), mentions=["inside the source model directory"], sources=[model, base], out=out)


def test_out_dir_containing_the_source_with_overwrite(capsys, model: Path, base: Path) -> None:
    check(
        capsys,
        rt.main,
        remap_args(model, base, model.parent, "--overwrite"),
        mentions=["contains the source model", "would delete it"],
        sources=[model, base],
    )


def test_out_dir_is_a_file(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "file.txt"
    out.write_text("keep me")
    check(capsys, rt.main, remap_args(model, base, out), mentions=[str(out), "existing file"], sources=[model, base], out=out)
    assert out.read_text() == "keep me"


def test_out_dir_in_an_unwritable_parent(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        out = Path("/proc/merge-tools-test/out")  # not writable even for root
        mention = "/proc"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out, mention = locked / "out", str(locked)
    check(capsys, rt.main, remap_args(model, base, out), mentions=[mention, "choose another --out_dir"], sources=[model, base])


@pytest.mark.parametrize(
    ("flag", "value", "mention"),
    [("--max-shard-size", "lots", "not a size"), ("--pad-to-multiple-of", "0", "positive integer"), ("--init", "magic", "invalid choice")],
)
def test_garbage_arguments(capsys, model: Path, base: Path, tmp_path: Path, flag: str, value: str, mention: str) -> None:
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out", flag, value),
        mentions=[flag, mention],
        sources=[model, base],
        out=tmp_path / "out",
    )


def test_repo_id_offline_not_cached(capsys, base: Path, tmp_path: Path) -> None:
    check(
        capsys,
        rt.main,
        remap_args("some-org/not-cached", base, tmp_path / "out"),
        mentions=["some-org/not-cached", "HF_HUB_OFFLINE", "download it once online"],
        sources=[base],
        out=tmp_path / "out",
    )
    check(capsys, ct.main, [base, "some-org/not-cached"], mentions=["some-org/not-cached", "HF_HUB_OFFLINE"], sources=[base])


# ------------------------------------------------------------------ tokenizers


def test_corrupt_tokenizer_json(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    (base / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0,}')
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=[str(base / "tokenizer.json"), "corrupt JSON"],
        sources=[model, base],
        out=tmp_path / "out",
    )
    check(capsys, ct.main, [model, base], mentions=[str(base / "tokenizer.json"), "corrupt JSON"], sources=[model, base])


def edit_tokenizer(directory: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((directory / "tokenizer.json").read_text())
    change(data)
    (directory / "tokenizer.json").write_text(json.dumps(data))


def test_two_tokens_on_one_id(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    edit_tokenizer(base, lambda d: d["model"]["vocab"].update({"Ġzzz": 7}))
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["share id 7", "corrupt"],
        sources=[model, base],
        out=tmp_path / "out",
    )
    check(capsys, ct.main, [model, base], mentions=["share id 7"], sources=[model, base])


def test_ids_with_gaps(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    edit_tokenizer(base, lambda d: d["model"]["vocab"].update({"Ġzzz": 1000}))
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["not 0..400", "first missing id is 400", "contiguous"],
        sources=[model, base],
        out=tmp_path / "out",
    )
    check(capsys, ct.main, [base, model], mentions=["first missing id is 400"], sources=[model, base])


def test_added_token_colliding_with_a_vocabulary_token(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    def collide(d: dict) -> None:
        token = next(t for t in d["model"]["vocab"] if t.startswith("Ġ"))
        d["added_tokens"].append(
            {"id": 399, "content": token, "special": False, "normalized": True, "lstrip": False, "rstrip": False, "single_word": False}
        )

    edit_tokenizer(base, collide)
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["declared at id 399", "fix tokenizer.json"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def test_special_token_absent_from_the_vocabulary(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["pad_token"] = "<pad>"
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["tokenizer_config.json", "pad_token '<pad>'", "not in the vocabulary"],
        sources=[model, base],
        out=tmp_path / "out",
    )
    check(capsys, ct.main, [model, base], mentions=["pad_token '<pad>'"], sources=[model, base])


# ------------------------------------------------------------------ weights


def first_shard(model: Path) -> Path:
    return sorted(model.glob("*.safetensors"))[0]


def test_truncated_shard(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    shard = first_shard(model)
    shard.write_bytes(shard.read_bytes()[:-100])
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=[shard.name, "truncated", "re-download"],
        sources=[model, base],
        out=tmp_path / "out",
    )
    check(capsys, ct.main, [base, model, "--weights"], mentions=[shard.name, "truncated"], sources=[model, base])


def rewrite_header(shard: Path, change: Callable[[dict], None]) -> None:
    raw = shard.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-(len(text) + 8) % 8)
    shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])


def test_overlapping_data_offsets(capsys, byte_tok: dict, base: Path, tmp_path: Path) -> None:
    model = factories.write_model(tmp_path / "model", byte_tok, shard_size="200KB", **BYTE_SPECIALS)
    shard = first_shard(model)

    def overlap(header: dict) -> None:
        names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
        first, second = header[names[0]], header[names[1]]
        second["data_offsets"] = [
            first["data_offsets"][0],
            first["data_offsets"][0] + second["data_offsets"][1] - second["data_offsets"][0],
        ]

    rewrite_header(shard, overlap)
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=[shard.name, "overlaps"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def test_data_offsets_past_the_end(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    shard = first_shard(model)

    def stretch(header: dict) -> None:
        name = next(n for n in header if n != "__metadata__")
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start, end + 4096]
        header[name]["shape"] = [header[name]["shape"][0] + 4096 // (4 * header[name]["shape"][1]), header[name]["shape"][1]]

    rewrite_header(shard, stretch)
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=[shard.name, "truncated"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def edit_index(model: Path, change: Callable[[dict], None]) -> None:
    path = model / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def test_index_names_a_missing_shard(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    edit_index(model, lambda i: i["weight_map"].update({"model.norm.weight": "model-00099-of-00099.safetensors"}))
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["model.safetensors.index.json", "model-00099-of-00099.safetensors", "missing"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def test_index_names_a_tensor_not_in_its_shard(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    def move(index: dict) -> None:
        files = sorted(set(index["weight_map"].values()))
        index["weight_map"]["model.norm.weight"] = next(f for f in files if f != index["weight_map"]["model.norm.weight"])

    edit_index(model, move)
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["'model.norm.weight' should be in", "re-download"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def test_index_shard_name_escaping_the_directory(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    edit_index(model, lambda i: i["weight_map"].update({"model.norm.weight": "../base/tokenizer.json"}))
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["../base/tokenizer.json", "not a plain file name inside the model directory"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def drop_tensor(model: Path, name: str, rename: str | None = None) -> None:
    for shard in model.glob("*.safetensors"):
        rewrite = []
        with open(shard, "rb") as handle:
            raw = handle.read()
        length = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + length])
        if name not in header:
            continue
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(shard))
        value = tensors.pop(name)
        if rename:
            tensors[rename] = value
        save_file(tensors, str(shard), metadata={"format": "pt"})
        del rewrite
    edit_index(model, lambda i: i["weight_map"].update({rename: i["weight_map"].pop(name)}) if rename else i["weight_map"].pop(name))


def test_missing_embedding_tensor(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    drop_tensor(model, "model.embed_tokens.weight")
    message = check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=[str(model), "--embed-name"],
        sources=[model, base],
        out=tmp_path / "out",
    )
    assert "input embedding" in message


def test_unknown_architecture_names_the_overrides(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    drop_tensor(model, "model.embed_tokens.weight", rename="net.tok_emb.w")
    drop_tensor(model, "lm_head.weight", rename="net.out_proj.w")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "my-own-arch"
    (model / "config.json").write_text(json.dumps(config))
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["--embed-name NAME", "--head-name NAME", "net.tok_emb.w"],
        sources=[model, base],
        out=tmp_path / "out",
    )
    out = tmp_path / "out"
    assert rt.main([str(a) for a in remap_args(model, base, out, "--embed-name", "net.tok_emb.w", "--head-name", "net.out_proj.w")]) == 0
    assert json.loads((out / REPORT_NAME).read_text())["vocab_tensors"]["how"] == "override"


def test_embedding_and_head_with_different_rows(capsys, byte_tok: dict, base: Path, tmp_path: Path) -> None:
    model = factories.write_model(tmp_path / "model", byte_tok, **BYTE_SPECIALS)
    from safetensors.torch import load_file, save_file

    for shard in model.glob("*.safetensors"):
        tensors = load_file(str(shard))
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"] = tensors["lm_head.weight"][:390].clone()
            save_file(tensors, str(shard), metadata={"format": "pt"})
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["lm_head.weight is [390, 32]", "same rows and hidden size"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def test_embedding_and_head_with_different_hidden_sizes(capsys, byte_tok: dict, base: Path, tmp_path: Path) -> None:
    model = factories.write_model(tmp_path / "model", byte_tok, **BYTE_SPECIALS)
    from safetensors.torch import load_file, save_file

    for shard in model.glob("*.safetensors"):
        tensors = load_file(str(shard))
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"] = torch.zeros(400, 16)
            save_file(tensors, str(shard), metadata={"format": "pt"})
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["[400, 16]", "same rows and hidden size"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def test_config_vocab_size_disagreeing_with_the_tensors(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 512
    (model / "config.json").write_text(json.dumps(config))
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["vocab_size 512", "400 rows", "the tensors are right", "set vocab_size to 400"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def test_bin_checkpoint_with_a_pickled_object(capsys, byte_tok: dict, base: Path, tmp_path: Path) -> None:
    model = factories.write_model(tmp_path / "model", byte_tok, **BYTE_SPECIALS)
    from safetensors.torch import load_file

    state = {}
    for shard in model.glob("*.safetensors"):
        state.update(load_file(str(shard)))
        shard.unlink()
    (model / "model.safetensors.index.json").unlink()
    state["training_args"] = argparse.Namespace(lr=1e-5)  # weights_only=True refuses arbitrary objects
    torch.save(state, model / "pytorch_model.bin")
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["pytorch_model.bin", "weights_only=True", "convert it to safetensors"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def test_remote_code_is_never_run(capsys, model: Path, base: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model / "config.json").read_text())
    config.update(
        {"model_type": "evil", "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}}
    )
    (model / "config.json").write_text(json.dumps(config))
    drop_tensor(model, "model.embed_tokens.weight", rename="evil.emb")
    check(
        capsys, rt.main, remap_args(model, base, tmp_path / "out"), mentions=["--embed-name"], sources=[model, base], out=tmp_path / "out"
    )
    assert not marker.exists()


# ------------------------------------------------------------------ faults


def test_disk_full_while_writing(capsys, model: Path, base: Path, tmp_path: Path, monkeypatch) -> None:
    real = rt.write_all  # the flat script's: the one patched below and run by rt.main
    calls = {"n": 0}

    def full(fd: int, data: memoryview, offset: int) -> None:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(rt, "write_all", full)
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out", "--max-shard-size", "20KB"),
        mentions=["disk full", "nothing was left behind"],
        sources=[model, base],
        out=tmp_path / "out",
    )


def test_keyboard_interrupt_half_way(capsys, model: Path, base: Path, tmp_path: Path, monkeypatch) -> None:
    real = rt.ShardWriter.copy_range  # the flat script's: the one patched below and run by rt.main
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(rt.ShardWriter, "copy_range", interrupted)
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out", "--max-shard-size", "20KB"),
        mentions=["interrupted", "nothing was written"],
        sources=[model, base],
        out=tmp_path / "out",
        code=130,
    )


def test_not_enough_free_space_is_found_before_writing(capsys, model: Path, base: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(rt.shutil, "disk_usage", lambda path: shutil_usage(total=10**6, used=10**6 - 4096, free=4096))
    check(
        capsys,
        rt.main,
        remap_args(model, base, tmp_path / "out"),
        mentions=["not enough free space", "KB (+64 MB to spare), 4.10 KB are free"],
        sources=[model, base],
        out=tmp_path / "out",
    )
