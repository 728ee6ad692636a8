"""Merges with tokenizer_source (union, base, a model): the gate's vocabulary audit, and
the alignment that builds the merged tokenizer and fills rows by mergekit's rules. The
same merges run through the real mergekit in test_e2e_mergekit.py."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import compare_tokenizers as ct
import factories
import remap_tokenizer as rt
from merge_fixtures import UNION_TOKENS, build_union_models, expected_row, union_yaml
from merge_tools.common.tokenizer_merge import ModelVocab, RowFill, plan_merged_vocab

align = functools.partial(factories.call_main, rt.main)
gate = functools.partial(factories.call_main, ct.main)
TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_union_models(tmp_path_factory.mktemp("union"), factories.byte_level_bpe())


def vocab_of(directory: Path) -> dict[str, int]:
    return factories.vocab_of(json.loads((directory / "tokenizer.json").read_text()))


# ---- the plan (pure) ---------------------------------------------------------------------


EXTRA = [f"<x{i}>" for i in range(8)]


@st.composite
def merges(draw: st.DrawFn) -> tuple[list[ModelVocab], str]:
    """2-4 models over 6 shared tokens, each adding some of EXTRA (added tokens, in its
    own order) and maybe losing its last rows (ghost tokens)."""
    count = draw(st.integers(2, 4))
    models = []
    for index in range(count):
        extra = draw(st.lists(st.sampled_from(EXTRA), unique=True, max_size=5))
        vocab = {f"t{i}": i for i in range(6)} | {token: 6 + j for j, token in enumerate(extra)}
        rows = len(vocab) - draw(st.integers(0, min(2, len(extra))))
        flags = {"special": draw(st.booleans()), "normalized": False, "lstrip": False, "rstrip": False, "single_word": False}
        models.append(ModelVocab(f"m{index}", vocab, {token: flags for token in extra}, rows))
    return models, draw(st.sampled_from([m.name for m in models] + [None]))


@settings(max_examples=200, deadline=None)
@given(merges())
def test_the_union_plan_follows_mergekits_rules(case: tuple[list[ModelVocab], str | None]) -> None:
    models, base_name = case
    merged = plan_merged_vocab(models, base_name, "union", {}, None)
    held = {m.name: {t for t, i in m.vocab.items() if i < m.rows} for m in models}
    # the base's tokens keep their ids; every token some model holds is in; nothing else
    assert list(merged.tokens[:6]) == [f"t{i}" for i in range(6)]
    assert len(set(merged.tokens)) == len(merged.tokens) == merged.size
    assert set(merged.tokens) == set().union(*held.values())
    assert merged.base == (base_name or models[0].name) and merged.row_base == base_name
    for m in models:
        assert set(merged.fills[m.name]) == set(merged.tokens) - held[m.name]
        assert merged.output_fills[m.name] == merged.fills[m.name]  # models: one group for both tensors
        for token, fill in merged.fills[m.name].items():
            holders = tuple(n.name for n in models if token in held[n.name])
            # with a base_model its row wins; without one, mergekit averages every holder
            assert fill.models == ((base_name,) if base_name in holders else holders)
            assert fill.rule == ("holder" if len(holders) == 1 else "base" if base_name in holders else "mean")
        ghosts = {t for t, i in m.vocab.items() if i >= m.rows}
        assert {t for t, _ in merged.ghosts[m.name]} == ghosts
        # a ghost of one model that another model holds is what mergekit fails on; the base's own
        # ghosts mergekit strips from the tokenizer the union extends
        failing = len(ghosts & set(merged.tokens)) if m.name != merged.base else 0
        assert sum(f"{m.name} lists" in text for text in merged.unreadable) == failing


def test_union_order_flags_and_tokens_settings() -> None:
    plain = {"special": False, "normalized": True, "lstrip": False, "rstrip": False, "single_word": False}
    special = dict(plain, special=True, normalized=False)
    base = ModelVocab("base", {"a": 0, "b": 1}, {}, 2)
    one = ModelVocab("one", {"a": 0, "b": 1, "<s1>": 2, "c": 3}, {"<s1>": special}, 4)
    two = ModelVocab("two", {"a": 0, "b": 1, "<s1>": 2, "<s2>": 3}, {"<s1>": plain, "<s2>": plain}, 4)
    merged = plan_merged_vocab([one, base, two], "base", "union", {}, 4)
    # regular tokens of every model first, then added tokens (first flags win), padded to 4
    assert merged.tokens == ("a", "b", "c", "<s1>", "<s2>") and merged.size == 8
    assert merged.appended == {"c": plain, "<s1>": special, "<s2>": plain}
    assert merged.fills["base"]["<s1>"] == RowFill("mean", ("one", "two"))
    assert merged.fills["two"]["c"] == RowFill("holder", ("one",))
    tokens = {
        "<s1>": {"source": "two", "force": True},
        "<new>": {"source": {"kind": "model_token", "model": "one", "token": "c"}},
        "<s2>": {"source": {"kind": "zero"}},
    }
    merged = plan_merged_vocab([base, one, two], None, "union", tokens, None)
    assert merged.tokens[-1] == "<new>" and merged.base == "base"
    assert merged.fills["two"]["<s1>"] == RowFill("tokens", ("two",))  # forced: even the holder takes it
    assert merged.fills["base"]["<new>"] == RowFill("tokens", ("one",), token="c")
    assert merged.fills["one"]["<s2>"] == RowFill("tokens") and merged.fills["one"]["<s2>"].describe() == "zero"
    bad = plan_merged_vocab([base, one], None, "union", {"<s1>": {"source": "base"}, "x": {"force": True}}, None)
    assert any("its source base lacks the token" in p for p in bad.problems) and any("no source" in p for p in bad.problems)
    # a token the base holds as a regular one and another model as an added one: added at the base's id
    promoted = plan_merged_vocab([base, ModelVocab("three", {"a": 0, "b": 1}, {"b": special}, 2)], "base", "union", {}, None)
    assert promoted.tokens == ("a", "b") and promoted.appended == {"b": special}
    # base / a model: that tokenizer, nothing appended
    assert plan_merged_vocab([base, one], None, "base", {}, None).tokens == ("a", "b")
    assert plan_merged_vocab([base, one], None, "one", {}, None).tokens == ("a", "b", "<s1>", "c")


# ---- the gate ------------------------------------------------------------------------------


def test_the_gate_passes_a_union_merge_and_audits_it(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = union_yaml(tmp_path / "merge.yaml", models, ["base", "sib1", "sib2"])
    code, out, err = gate(capsys, "--mergekit-config", config, "--json")
    assert code == 0, out + err
    merge = json.loads(out)["merge"]
    sib1, sib2, base = (str(models[n]) for n in ("sib1", "sib2", "base"))
    assert merge["union"] == {"size": 404, "added": {sib1: UNION_TOKENS["sib1"], sib2: ["<both>", "<think>"]}}
    assert merge["fills"][base] == {"<tool_call>": sib1, "</tool_call>": sib1, "<both>": f"mean of {sib1}, {sib2}", "<think>": sib2}
    assert merge["fills"][sib1] == {"<think>": sib2} and merge["status"] == "ok"
    assert [c["verdict"] for c in json.loads(out)["comparisons"]] == ["mapped", "mapped"]
    code, out, _ = gate(capsys, "--mergekit-config", config)
    assert code == 0 and "mergekit maps the rows by token (tokenizer_source: union)" in out and "MISMATCH" not in out
    assert f"{base} lacks 4: '<tool_call>' <- {sib1}" in out
    # the same merge by index (no tokenizer_source) still fails
    plain = union_yaml(tmp_path / "plain.yaml", models, ["base", "sib1", "sib2"], tokenizer_source=None)
    assert gate(capsys, "--mergekit-config", plain)[0] == 1


@pytest.mark.parametrize(
    ("extra", "names", "message"),
    [
        ({}, ["base", "sib1", "ghost"], "lists '<tool_call>' at id 400, past its 400 embedding rows (a ghost token)"),
        ({"tokenizer_source": "base", "chat_template": "{% for m in messages %}<tool_call>{{ m }}{% endfor %}"}, ["base", "sib1"],
         "the chat template writes '<tool_call>', which the merged tokenizer lacks"),
        ({"tokenizer_source": None, "tokenizer": {"tokens": {"<think>": {"source": "SIB1"}}}}, ["base", "sib1", "sib2"],
         "its source SIB1 lacks the token"),
    ],
)  # fmt: skip
def test_the_gate_fails_what_mergekit_fails_on(tmp_path: Path, models: dict[str, Path], capsys, extra, names, message) -> None:
    extra = json.loads(json.dumps(extra).replace("SIB1", str(models["sib1"])))
    config = union_yaml(tmp_path / "merge.yaml", models, names, **extra)
    code, out, err = gate(capsys, "--mergekit-config", config)
    assert code == 1 and message.replace("SIB1", str(models["sib1"])) in out, out + err
    assert "merge  FAIL" in out and "(but the merge fails: see merge above)" in out and "safe to merge" not in out


def test_both_tokenizer_settings_are_refused_from_the_yaml_alone(tmp_path: Path, capsys) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(
        "merge_method: linear\nmodels: [{model: nowhere/a, parameters: {weight: 1}}]\ntokenizer_source: union\ntokenizer: {}\n"
    )
    code, out, _ = gate(capsys, "--mergekit-config", config)
    assert code == 1 and "Cannot specify both" in out and "no model was read" in out


# ---- the alignment -------------------------------------------------------------------------


def check_rows(aligned: Path, models: dict[str, Path], names: list[str], summary: dict) -> None:
    """Every aligned model's row of every token is the one mergekit's merge would use."""
    union = vocab_of(aligned / "tokenizer")
    vocabs = {n: vocab_of(models[n]) for n in names}
    weights = {n: factories.tensors(models[n]) for n in names}
    for entry in summary["models"]:
        name = Path(entry["source"]).name
        out = factories.tensors(Path(entry["output"]))
        assert vocab_of(Path(entry["output"])) == union
        for tensor in TENSORS:
            for token, token_id in union.items():
                assert torch.equal(out[tensor][token_id], expected_row(weights, vocabs, name, token, tensor)), (name, token)


def test_the_alignment_builds_the_union(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    names = ["base", "sib1", "sib2"]
    config = union_yaml(tmp_path / "merge.yaml", models, names)
    aligned = tmp_path / "aligned"
    code, out, err = align(capsys, "--mergekit-config", config, "--out_dir", aligned, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["gate"]["ok"] and summary["tokenizer_merge"]["union"]["size"] == 404
    assert [m["init_rules"] for m in summary["models"]] == [
        {"mergekit_holder": 3, "mergekit_mean": 1},
        {"mergekit_holder": 1},
        {"mergekit_holder": 2},
    ]
    check_rows(aligned, models, names, summary)
    # the union tokenizer: transformers loads it, each new token is one token, flags kept
    tokenizer = transformers.AutoTokenizer.from_pretrained(aligned / "tokenizer")
    ids = tokenizer("a<tool_call>b<think>c<both>", add_special_tokens=False)["input_ids"]
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids if i >= 400] == ["<tool_call>", "<think>", "<both>"]
    assert tokenizer.added_tokens_decoder[403].special is False and tokenizer.added_tokens_decoder[400].special is True
    merged_yaml = yaml.safe_load((aligned / "merge.yaml").read_text())
    assert "tokenizer_source" not in merged_yaml and merged_yaml["base_model"] == str((aligned / "base").resolve())
    assert gate(capsys, "--mergekit-config", aligned / "merge.yaml")[0] == 0
    # a rerun reuses every remap; a changed sib2 redoes the models whose rows come from it
    assert [m["status"] for m in json.loads(align(capsys, "--mergekit-config", config, "--out_dir", aligned, "--json")[1])["models"]] == [
        "reused"
    ] * 3


def test_changed_donor_models_invalidate_reuse(tmp_path: Path, byte_tok: dict, capsys) -> None:
    models = build_union_models(tmp_path / "models", byte_tok)
    config = union_yaml(tmp_path / "merge.yaml", models, ["base", "sib1", "sib2"])
    aligned = tmp_path / "aligned"
    assert align(capsys, "--mergekit-config", config, "--out_dir", aligned)[0] == 0
    sib2 = json.loads((models["sib2"] / "tokenizer.json").read_text())
    factories.write_model(models["sib2"], sib2, seed=9, **factories.BYTE_SPECIALS)  # new weights, same tokens
    code, out, _ = align(capsys, "--mergekit-config", config, "--out_dir", aligned, "--json")
    assert code == 0 and [m["status"] for m in json.loads(out)["models"]] == ["remapped"] * 3
    check_rows(aligned, models, ["base", "sib1", "sib2"], json.loads(out))


def test_ghost_tokens_are_filled_and_named(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    names = ["base", "sib1", "ghost"]
    config = union_yaml(tmp_path / "merge.yaml", models, names)
    aligned = tmp_path / "aligned"
    code, out, err = align(capsys, "--mergekit-config", config, "--out_dir", aligned, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["tokenizer_merge"]["ghosts"] == {
        str(models["ghost"]): [{"token": "<tool_call>", "id": 400}, {"token": "</tool_call>", "id": 401}]
    }
    assert "ghost" in err and "its row is filled from the models that hold the token" in err
    check_rows(aligned, models, names, summary)
    code, out, _ = align(capsys, "--mergekit-config", config, "--out_dir", aligned)
    assert "2 ghost token(s), rows filled from the models that hold them: '<tool_call>' (id 400)" in out


def test_tokens_settings_and_padding(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    sib1, sib2 = str(models["sib1"]), str(models["sib2"])
    tokenizer = {
        "source": "union",
        "pad_to_multiple_of": 64,
        "chat_template": "{% for m in messages %}<think>{{ m.content }}{% endfor %}",  # mergekit ignores it here
        "tokens": {
            "<both>": {"source": {"kind": "zero"}},
            "<new>": {"source": {"kind": "model_token", "model": sib1, "token": "<tool_call>"}},
            "<|begin_of_text|>": {"source": sib2, "force": True},
        },
    }
    config = union_yaml(tmp_path / "merge.yaml", models, ["base", "sib1", "sib2"], tokenizer_source=None, tokenizer=tokenizer)
    aligned = tmp_path / "aligned"
    code, out, err = align(capsys, "--mergekit-config", config, "--out_dir", aligned, "--json")
    assert code == 0, err
    union = vocab_of(aligned / "tokenizer")
    weights = {n: factories.tensors(models[n]) for n in ("base", "sib1", "sib2")}
    for entry in json.loads(out)["models"]:
        out_rows = factories.tensors(Path(entry["output"]))["model.embed_tokens.weight"]
        assert out_rows.shape[0] == 448  # 405 tokens, padded to 64
        assert torch.equal(out_rows[union["<new>"]], weights["sib1"]["model.embed_tokens.weight"][400])
        assert torch.equal(out_rows[union["<|begin_of_text|>"]], weights["sib2"]["model.embed_tokens.weight"][0])
        if Path(entry["source"]).name == "base":
            assert not out_rows[union["<both>"]].any()
        assert json.loads((Path(entry["output"]) / "config.json").read_text())["vocab_size"] == 448
    # the template the user wrote under tokenizer: reaches mergekit at the top level; the gate says mergekit ignores it there
    assert yaml.safe_load((aligned / "merge.yaml").read_text())["chat_template"] == tokenizer["chat_template"]
    code, out, _ = gate(capsys, "--mergekit-config", config, "--json")
    assert code == 0 and any(
        "tokenizer.chat_template is ignored by mergekit" in w for w in json.loads(out)["merge"]["tokenizer"]["warnings"]
    )


def test_a_source_tokenizer_that_moves_the_bases_special_tokens_is_named(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    """mergekit keeps the base's config.json: with another model's tokenizer as the source,
    an eos_token_id that names neither the base's token nor the merged tokenizer's eos is
    named (a warning: which ids a config lists is the model's own business)."""
    shuffled = factories.permuted(factories.byte_level_bpe(), seed=5)
    moved = factories.write_model(tmp_path / "moved", shuffled, seed=6, **factories.BYTE_SPECIALS)
    config = union_yaml(tmp_path / "merge.yaml", models | {"moved": moved}, ["base", "moved"], tokenizer_source=str(moved))
    code, out, _ = gate(capsys, "--mergekit-config", config, "--json")
    warnings = json.loads(out)["merge"]["tokenizer"]["warnings"]
    assert code == 0 and any("the merged config's eos_token_id 1 is" in w and "'<|end_of_text|>' in the base's" in w for w in warnings)


def test_a_config_vocab_size_past_the_embedding_is_aligned_too(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    """ "tokenizer says 131072, tensor has 131070" with config.json saying 131072 as well:
    mergekit's union fails with an IndexError; the alignment warns and fills the rows."""
    ghost = tmp_path / "ghost"
    shutil.copytree(models["ghost"], ghost)
    config_json = json.loads((ghost / "config.json").read_text())
    (ghost / "config.json").write_text(json.dumps(config_json | {"vocab_size": 402}))
    config = union_yaml(tmp_path / "merge.yaml", models | {"ghost": ghost}, ["base", "sib1", "ghost"])
    code, out, err = align(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned", "--json")
    assert code == 0, err
    assert "config.json says vocab_size 402, model.embed_tokens.weight has 400 rows" in err
    assert json.loads((tmp_path / "aligned" / "ghost" / "config.json").read_text())["vocab_size"] == 403  # the union
    assert json.loads(out)["tokenizer_merge"]["ghosts"][str(ghost)] == [
        {"token": "<tool_call>", "id": 400},
        {"token": "</tool_call>", "id": 401},
    ]


def test_a_base_regular_token_another_model_adds_becomes_an_added_token(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    """As mergekit's union re-registers it (transformers' add_tokens), so that text holding
    it is split alike (checked against mergekit itself in test_e2e_mergekit.py)."""
    config = union_yaml(tmp_path / "merge.yaml", models, ["regular", "sib2"], base="regular")
    assert align(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned")[0] == 0
    tokenizer_json = json.loads((tmp_path / "aligned" / "tokenizer" / "tokenizer.json").read_text())
    think = vocab_of(models["regular"])["<think>"]
    assert {e["content"]: e["id"] for e in tokenizer_json["added_tokens"]}["<think>"] == think
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "aligned" / "tokenizer")
    assert "<think>" in tokenizer.tokenize("a<think>b")


# ---- what mergekit does, predicted (issue 28) ------------------------------------------------


def gate_json(capsys, config: Path, *extra: str) -> tuple[int, dict]:
    code, out, err = gate(capsys, "--mergekit-config", config, "--json", *extra)
    return code, json.loads(out)


def test_without_a_base_model_shared_tokens_take_the_mean(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = union_yaml(tmp_path / "merge.yaml", models, ["sib1", "sib2", "base"], base=None)
    code, report = gate_json(capsys, config)
    sib1, sib2 = str(models["sib1"]), str(models["sib2"])
    assert code == 0 and report["merge"]["fills"][str(models["base"])]["<both>"] == f"mean of {sib1}, {sib2}"
    assert "no base_model: a token several models hold takes the mean of their rows" in gate(capsys, "--mergekit-config", config)[1]


def test_a_config_vocab_size_below_the_rows_fails_as_mergekit_does(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    """mergekit reads config.json's vocab_size: tokens past it are ghosts, and its union fails
    with a KeyError on one another model holds; the alignment writes a consistent copy."""
    low = tmp_path / "low"
    shutil.copytree(models["sib1"], low)
    (low / "config.json").write_text(json.dumps(json.loads((low / "config.json").read_text()) | {"vocab_size": 401}))
    config = union_yaml(tmp_path / "merge.yaml", models | {"low": low}, ["base", "sib1", "low"])
    code, out, _ = gate(capsys, "--mergekit-config", config)
    assert code == 1 and f"{low}'s config.json says vocab_size 401, below its 403 embedding rows" in out, out
    assert "KeyError" in out and "remap_tokenizer.py --mergekit-config fills the row" in out
    code, out, err = align(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned", "--json")
    assert code == 0 and json.loads((tmp_path / "aligned" / "low" / "config.json").read_text())["vocab_size"] == 403, err


@pytest.mark.parametrize(
    ("names", "extra"),
    [
        (["base", "sib1"], {"tokenizer_source": "SIB2"}),  # a tokenizer_source that is no model of the merge
        (["ghost", "sib1"], {"base": "ghost"}),  # ghost tokens in the base: mergekit strips them
        (["base", "sib1"], {"tokenizer_source": None, "tokenizer": {"tokens": {"<|begin_of_text|>": {"source": "SIB2"}}}}),
    ],
)
def test_what_mergekit_merges_is_not_refused(tmp_path: Path, models: dict[str, Path], capsys, names, extra) -> None:
    extra = json.loads(json.dumps(extra).replace("SIB2", str(models["sib2"])))
    config = union_yaml(tmp_path / "merge.yaml", models, names, **extra)
    code, report = gate_json(capsys, config)
    assert code == 0 and report["merge"]["status"] == "ok", report["merge"]
    assert align(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "aligned")[0] == 0


def test_a_tokenizer_source_outside_the_merge_gives_zero_rows(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = union_yaml(tmp_path / "merge.yaml", models, ["base", "sib1"], tokenizer_source=str(models["sib2"]))
    code, report = gate_json(capsys, config)
    assert report["merge"]["fills"][str(models["base"])] == {"<think>": "zero", "<both>": str(models["sib1"])}
    assert any("'<think>' is held by no model: its row is zero" in w for w in report["merge"]["tokenizer"]["warnings"])


def test_the_gate_names_what_the_merged_tokenizer_changes(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    """The vocabularies agree and no row moves, but the merged model gets another tokenizer."""
    config = union_yaml(tmp_path / "merge.yaml", models, ["regular", "regular_added"], base="regular")
    code, report = gate_json(capsys, config)
    assert code == 0 and report["merge"]["tokenizer"]["changes"] == [
        "'<think>' becomes an added token (special) at id 400, as another model adds it: text holding it is split around it"
    ]
    config = union_yaml(tmp_path / "merge.yaml", models, ["base", "templated"], tokenizer_source=str(models["templated"]))
    code, out, _ = gate(capsys, "--mergekit-config", config)
    templated = models["templated"]
    assert code == 0 and f"changes: the chat template is {templated}'s, not the base's" in out
    assert f"changes: eos token '<|begin_of_text|>' ({templated}'s), the base's is '<|end_of_text|>'" in out


def test_a_union_that_splits_text_anew_is_named(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    """A regular token no merge makes becomes an added token of the union: it splits words
    that hold it, in the merged model only (checked against mergekit in test_e2e_mergekit)."""
    config = union_yaml(tmp_path / "merge.yaml", models, ["base", "split"])
    code, report = gate_json(capsys, config)
    warning = next(w for w in report["merge"]["tokenizer"]["warnings"] if "splits text unlike the base's" in w)
    assert code == 0 and "' brown' becomes Ġb|r|own (the base: Ġb|row|n)" in warning, warning
    code, report = gate_json(capsys, config, "--strict")
    assert code == 1 and any("splits text unlike the base's" in p for p in report["merge"]["problems"])


def test_a_tokenizer_of_another_family_is_pointed_to_a_transplant(tmp_path: Path, models: dict[str, Path], sp_tok: dict, capsys) -> None:
    other = factories.write_model(tmp_path / "llama2", sp_tok, seed=4, **factories.SP_SPECIALS)
    config = union_yaml(tmp_path / "merge.yaml", models | {"other": other}, ["base", "other"])
    code, report = gate_json(capsys, config)
    changes = report["merge"]["tokenizer"]["changes"]
    assert any(f"regular tokens of {other} become added tokens" in c and "--drop-extra" in c for c in changes), changes
    assert any("splits text unlike the base's" in w for w in report["merge"]["tokenizer"]["warnings"])


def test_passthrough_slices_take_each_vocabulary_tensor_from_its_slice(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    slices = [["base", [0, 1]], ["sib1", [1, 2]]]
    config = union_yaml(tmp_path / "merge.yaml", models, ["base", "sib1"], "passthrough", base=None, slices=slices)
    code, report = gate_json(capsys, config)
    base, sib1 = str(models["base"]), str(models["sib1"])
    assert code == 0 and report["merge"]["fills"][base] == dict.fromkeys(UNION_TOKENS["sib1"], "zero")
    assert report["merge"]["tokenizer"]["output_fills"] == {base: dict.fromkeys(UNION_TOKENS["sib1"], sib1)}
    assert any("held by no model that mergekit takes the input embedding from" in w for w in report["merge"]["tokenizer"]["warnings"])


def test_flags_that_differ_between_siblings_are_named(tmp_path: Path, byte_tok: dict, models: dict[str, Path], capsys) -> None:
    flagged = factories.with_tokens(byte_tok, added=["<tool_call>"], special=False)
    other = factories.write_model(tmp_path / "other", flagged, seed=5, **factories.BYTE_SPECIALS)
    config = union_yaml(tmp_path / "merge.yaml", models | {"other": other}, ["base", "sib1", "other"])
    warnings = gate_json(capsys, config)[1]["merge"]["tokenizer"]["warnings"]
    assert any("'<tool_call>' is added by" in w and "different flags" in w for w in warnings), warnings


def test_row_fills_say_where_a_token_id_row_comes_from() -> None:
    assert RowFill("tokens", ("m",), token_id=5).describe() == "m (its row 5)"
    assert RowFill("tokens", ("m",), token="id 5").describe() == "m (its row of 'id 5')"
