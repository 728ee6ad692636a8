"""Seeded mutations of every file the tools read: tokenizer.json, config.json,
tokenizer_config.json, generation_config.json, safetensors headers, the shard index and a
mergekit YAML. The contract, for every case: exit 0 (or 1 for a gate's mismatch) with a
result the libraries agree with, or exit 2 with exactly one `error:` line; never a
traceback, never "unexpected", never a remap that exits 1 for bad input; and the gate never
accepts a file that the tokenizers or safetensors library refuses."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors import safe_open
from tokenizers import Tokenizer

import compare_tokenizers as ct
import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS

CASES = int(os.environ.get("MERGE_TOOLS_FUZZ_CASES", "160"))  # a longer campaign: set it higher
ODD_VALUES: list[Any] = [None, True, False, 0, -1, 1.5, 2**40, "", "x", "\ud800", [], {}, [1, 2], {"content": 3}, "<0xZZ>", "../x", "/abs"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, byte_tok: dict) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    base = factories.write_model(root / "base", byte_tok, seed=1, **BYTE_SPECIALS)
    model = factories.write_model(
        root / "model", factories.permuted(byte_tok, seed=7, keep=BYTE_SPECIALS.values()), seed=2, shard_size="20KB", **BYTE_SPECIALS
    )
    return {"base": base, "model": model}


def json_paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (sampled below the first levels: vocabularies are big)."""
    found = [path]
    if isinstance(node, dict):
        items = list(node.items())
        for key, value in items if len(items) < 50 else random.sample(items, 5):
            found += json_paths(value, (*path, key))
    elif isinstance(node, list):
        for index in range(len(node)) if len(node) < 20 else random.sample(range(len(node)), 3):
            found += json_paths(node[index], (*path, index))
    return found


def mutate_value(data: Any, rng: random.Random) -> Any:
    data = copy.deepcopy(data)
    path = rng.choice(json_paths(data)[1:] or [()])
    if not path:
        return rng.choice(ODD_VALUES)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    action = rng.random()
    if action < 0.2 and isinstance(parent, dict):
        del parent[key]
    elif action < 0.3 and isinstance(parent[key], str):
        parent[key] = parent[key] + rng.choice(["\x00", "\ud800", " ", "é", "▁"])
    elif action < 0.4 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] = rng.choice([parent[key] + 1, -parent[key] - 1, float(parent[key]), str(parent[key])])
    else:
        parent[key] = rng.choice(ODD_VALUES)
    return data


def mutate_text(raw: bytes, rng: random.Random) -> bytes:
    action = rng.randrange(6)
    if action == 0:
        return raw[: rng.randrange(len(raw))]
    if action == 1:
        return b"\xef\xbb\xbf" + raw
    if action == 2:
        return raw.decode("utf-8").encode("utf-16")
    if action == 3:
        position = rng.randrange(len(raw))
        return raw[:position] + bytes([rng.randrange(256)]) + raw[position + 1 :]
    if action == 4:  # a key written twice
        text = raw.decode("utf-8")
        position = text.find("{") + 1
        return (text[:position] + '"version": "1", "version": "2", ' + text[position:]).encode()
    return b"[" * 50_000 + b"]" * 50_000


def mutate_json_file(path: Path, rng: random.Random) -> None:
    raw = path.read_bytes()
    if rng.random() < 0.3:
        path.write_bytes(mutate_text(raw, rng))
    else:
        path.write_text(json.dumps(mutate_value(json.loads(raw), rng), ensure_ascii=False), encoding="utf-8", errors="surrogatepass")


def mutate_header(path: Path, rng: random.Random) -> None:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    if rng.random() < 0.2:
        text = mutate_text(raw[8 : 8 + length], rng)
    else:
        text = json.dumps(mutate_value(header, rng), ensure_ascii=False).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def library_accepts_tokenizer(directory: Path) -> bool:
    try:
        Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception:  # the library refuses it
        return False
    return True


def library_opens_every_shard(directory: Path) -> bool:
    for path in directory.glob("*.safetensors"):
        try:
            with safe_open(str(path), framework="numpy") as handle:
                list(handle.keys())
        except Exception:  # the library refuses it
            return False
    return True


def run(tool: Callable[[list[str]], int], argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    argv = [str(a) for a in argv]
    code = tool(argv)
    _, err = capsys.readouterr()
    assert "Traceback" not in err and "error: unexpected" not in err, (argv, err)
    if code == 2:  # one line, and nothing before it that the error makes moot
        assert err.count("\n") == 1 and err.startswith("error: "), err
    return code, err


VOCAB_TENSORS = [  # name, shape (V: the vocabulary, H: the hidden size): real layouts and ambiguous ones
    ("model.layers.9.embed_tokens.weight", ("V", "H")),
    ("model.layers.9.shared_head.head.weight", ("V", "H")),
    ("final_logits_bias", (1, "V")),
    ("lm_head.bias", ("V",)),
    ("medusa_head.0.1.weight", ("V", "H")),
    ("lm_head.SCB", ("V",)),
    ("model.mystery.weight", ("V", 3)),
    ("model.layers.9.embed_tokens.weight", (7, "H")),
]


def assert_ids_follow_tokens(model: Path, out: Path, base: Path) -> None:
    """Every id of a *_token_id(s) / *_token_index key names the same token before and after."""
    token_of = {i: t for t, i in factories.vocab_of(json.loads((model / "tokenizer.json").read_text())).items()}
    base_ids = factories.vocab_of(json.loads((base / "tokenizer.json").read_text()))
    before, after = json.loads((model / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for section in (None, "text_config"):
        old, new = (before, after) if section is None else (before.get(section) or {}, after.get(section) or {})
        for key in TOKEN_ID_KEYS:
            values = old.get(key) if isinstance(old.get(key), list) else [old.get(key)]
            moved = new.get(key) if isinstance(new.get(key), list) else [new.get(key)]
            for value, result in zip(values, moved):
                if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 400:
                    assert result == base_ids[token_of[value]], (key, value, result)


TOKEN_ID_KEYS = ["image_token_index", "video_token_id", "boi_token_index", "vision_start_token_id", "audio_token_ids"]


def add_vocab_tensor(model: Path, rng: random.Random) -> None:
    """One more tensor in the last shard, named in the index, as MTP / Medusa / biased heads have."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    name, shape = rng.choice(VOCAB_TENSORS)
    shard = sorted(model.glob("*.safetensors"))[-1]
    state = load_file(str(shard))
    state[name] = np.random.default_rng(0).standard_normal([{"V": 400, "H": 32}.get(d, d) for d in shape]).astype(np.float32)
    save_file(state, str(shard), metadata={"format": "pt"})
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = shard.name
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def add_token_ids(model: Path, rng: random.Random) -> None:
    config = json.loads((model / "config.json").read_text())
    where = config.setdefault("text_config", {"vocab_size": config["vocab_size"]}) if rng.random() < 0.3 else config
    where[rng.choice(TOKEN_ID_KEYS)] = rng.choice([0, 5, 399, 400, 10**6, -1, "x", None, [1, 2], [3, 500], 1.5])
    (model / "config.json").write_text(json.dumps(config))


TARGETS = [
    "tokenizer.json",
    "config.json",
    "tokenizer_config.json",
    "generation_config.json",
    "header",
    "index",
    "yaml",
    "vocab tensor",
    "config ids",
    "long name",
]


@pytest.mark.slow
def test_seeded_mutations_of_every_input(tmp_path: Path, pristine: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(int(os.environ.get("MERGE_TOOLS_FUZZ_SEED", "20261129")))
    outcomes: dict[str, set[int]] = {target: set() for target in TARGETS}
    for case in range(CASES):
        target = TARGETS[case % len(TARGETS)]
        random.seed(case)
        work = tmp_path / f"case{case}"
        model = work / "model"
        shutil.copytree(pristine["model"], model)
        if target == "header":
            mutate_header(rng.choice(sorted(model.glob("*.safetensors"))), rng)
        elif target == "vocab tensor":
            add_vocab_tensor(model, rng)
        elif target == "config ids":
            add_token_ids(model, rng)
        elif target == "long name":
            name = work / rng.choice(["x" * 300, "y" * 5000, "z" * 200 + "/" + "w" * 260])
            models = [{"model": str(path), "parameters": {"weight": 0.5}} for path in (pristine["base"], name)]
            (work / "merge.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
        elif target == "index":
            mutate_json_file(model / "model.safetensors.index.json", rng)
        elif target == "yaml":
            config = {
                "merge_method": "linear",
                "base_model": str(pristine["base"]),
                "models": [{"model": str(model), "parameters": {"weight": 0.5}}],
            }
            raw = yaml.safe_dump(config).encode()
            mutated = (
                mutate_text(raw, rng)
                if rng.random() < 0.3
                else yaml.safe_dump(mutate_value(config, rng), allow_unicode=True).encode("utf-8", "surrogatepass")
            )
            (work / "merge.yaml").write_bytes(mutated)
        elif (model / target).exists():
            mutate_json_file(model / target, rng)
        if target in ("yaml", "long name"):
            code, _ = run(ct.main, ["--mergekit-config", work / "merge.yaml", "--weights"], capsys)
            assert code in (0, 1, 2)
            code, _ = run(rt.main, ["--mergekit-config", work / "merge.yaml", "--out_dir", work / "aligned"], capsys)
            assert code in (0, 2)
            outcomes[target].add(code)
            continue
        gate, _ = run(ct.main, [pristine["base"], model, "--weights"], capsys)
        if gate in (0, 1):  # the gate read it: the libraries must read it too
            assert library_accepts_tokenizer(model), f"case {case}: the gate read a tokenizer.json the tokenizers library refuses"
            assert library_opens_every_shard(model), f"case {case}: the gate read a header the safetensors library refuses"
        out = work / "out"
        code, err = run(rt.main, ["--src_model", model, "--base_tokenizer", pristine["base"], "--out_dir", out, "--drop-extra"], capsys)
        assert code in (0, 2), f"case {case} ({target}): exit {code}: {err}"
        if code == 0:
            assert ct.main([str(pristine["base"]), str(out), "--weights"]) == 0, capsys.readouterr()
            assert library_opens_every_shard(out)
            if target == "config ids":
                assert_ids_follow_tokens(model, out, pristine["base"])
        else:
            assert not out.exists() and sorted(p.name for p in work.iterdir()) == ["model"], (case, err)
        outcomes[target].add(code)
    # every kind of file was broken at least once; token ids in a config only move (a dropped token is never one: drop mode keeps T's)
    assert all(2 in codes for target, codes in outcomes.items() if target != "config ids"), outcomes
    assert outcomes["config ids"] == {0}, outcomes
