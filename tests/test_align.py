"""remap_tokenizer.py --mergekit-config: one command aligns a whole merge."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import compare_tokenizers as ct
import factories
import remap_tokenizer as rt
from merge_fixtures import build_models, build_union_models, linear_yaml, tensors, union_yaml
from merge_tools.common.mergekit_config import ModelRef, map_model_references, mergekit_references
from merge_tools.common.tokenizer_merge import tokenizer_merge_settings
from merge_tools.remap.alignment import aligned_name


@pytest.fixture
def models(tmp_path: Path, byte_tok: dict) -> dict[str, Path]:
    return build_models(tmp_path / "models", byte_tok)


run = functools.partial(factories.call_main, rt.main)
ROOT = Path(__file__).resolve().parent.parent


def test_align_a_linear_merge(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = linear_yaml(
        tmp_path / "merge.yaml",
        models["base"],
        [(models["base"], 0.4), (models["same"], 0.2), (models["padded"], 0.2), (models["chat"], 0.2)],
    )
    assert ct.main(["--mergekit-config", str(config), "--weights"]) == 1
    capsys.readouterr()
    aligned = tmp_path / "aligned"
    code, out, err = run(capsys, "--mergekit-config", config, "--out_dir", aligned, "--json")
    assert code == 0, err
    summary = json.loads(out)
    status = {Path(m["source"]).name: m["status"] for m in summary["models"]}
    assert status == {"base": "identical", "same": "identical", "padded": "remapped", "chat": "remapped"}
    assert summary["gate"] == {"ok": True, "problems": []}
    merged = yaml.safe_load((aligned / "merge.yaml").read_text())
    paths = [m["model"] for m in merged["models"]]
    assert paths[:2] == [str(models["base"].resolve()), str(models["same"].resolve())]
    assert paths[2] == str((aligned / "padded").resolve()) and paths[3] == str((aligned / "chat").resolve())
    assert [m["parameters"] for m in merged["models"]] == [{"weight": 0.4}, {"weight": 0.2}, {"weight": 0.2}, {"weight": 0.2}]
    assert merged["merge_method"] == "linear" and merged["dtype"] == "float32"
    assert ct.main(["--mergekit-config", str(aligned / "merge.yaml"), "--weights"]) == 0
    # padded model: same tokens, rows cut back to the target's; its copied rows unchanged
    padded = tensors(aligned / "padded")
    assert padded["model.embed_tokens.weight"].shape[0] == 400
    assert (padded["lm_head.weight"] == tensors(models["padded"])["lm_head.weight"][:400]).all()
    summary_text = run(capsys, "--mergekit-config", config, "--out_dir", aligned)[1]
    assert "reused" in summary_text and f"mergekit-yaml {aligned / 'merge.yaml'}" in summary_text


def test_rerun_reuses_finished_remaps(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)])
    aligned = tmp_path / "aligned"
    assert run(capsys, "--mergekit-config", config, "--out_dir", aligned)[0] == 0
    before = factories.tree_digest(aligned / "chat")
    written = next(name for name in factories.report_of(aligned / "chat")["files"] if name.endswith(".safetensors"))
    stamp = (aligned / "chat" / written).stat().st_mtime_ns
    code, out, _ = run(capsys, "--mergekit-config", config, "--out_dir", aligned, "--json")
    assert code == 0
    assert [m["status"] for m in json.loads(out)["models"]] == ["identical", "reused"]
    assert factories.tree_digest(aligned / "chat") == before
    assert (aligned / "chat" / written).stat().st_mtime_ns == stamp
    # other options: the finished remap does not match, so it is redone
    code, out, _ = run(capsys, "--mergekit-config", config, "--out_dir", aligned, "--json", "--init", "mean")
    assert code == 0 and json.loads(out)["models"][1]["status"] == "remapped"


# A stand-in for mergekit's verdict, which takes seconds (importing mergekit imports peft,
# transformers and torch): it answers only once both remapped models are finished, noting
# what it saw; the tool runs as a process of its own (a test process has tqdm's monitor
# thread, and the tool forks the verdict's worker only from a single-threaded process).
SLOW_VERDICT = """
import json, sys, time
from pathlib import Path
import remap_tokenizer as rt

aligned, seen, problems, remaps = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])

def slow_verdict(_config):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        staged = [p for p in aligned.glob(".*.tmp-*") if (p / "remap_report.json").is_file()] if aligned.is_dir() else []
        if len(staged) == remaps:
            published = sorted(p.name for p in aligned.iterdir() if not p.name.startswith("."))
            seen.write_text(json.dumps({"staged": len(staged), "published": published}))
            return problems
        time.sleep(0.02)
    seen.write_text(json.dumps("the models never all finished while the verdict was awaited"))
    return problems

rt.installed_mergekit_problems = slow_verdict
sys.exit(rt.main(sys.argv[5:]))
"""


@pytest.mark.parametrize("union", [False, True])
@pytest.mark.parametrize("problems", [[], ["chat_template: refused by the test"]])
def test_models_finished_before_mergekits_verdict_are_held_while_the_next_is_written(
    tmp_path: Path, models: dict[str, Path], byte_tok: dict, problems: list[str], union: bool
) -> None:
    """When mergekit's verdict comes only after every model is finished, the finished ones
    are held staged, not waited for; no model is published before the verdict (a union's
    merged tokenizer, ALIGNED/tokenizer, is: the remaps read it); a refusal leaves nothing."""
    if union:
        union_models = build_union_models(tmp_path / "union", byte_tok)
        config, remaps = union_yaml(tmp_path / "merge.yaml", union_models, ["base", "sib1", "sib2"]), 3
    else:
        weighted = [(models["base"], 0.5), (models["padded"], 0.25), (models["chat"], 0.25)]
        config, remaps = linear_yaml(tmp_path / "merge.yaml", models["base"], weighted), 2
    aligned, seen = tmp_path / "aligned", tmp_path / "seen.json"
    argv = [aligned, seen, json.dumps(problems), remaps, "--mergekit-config", config, "--out_dir", aligned, "--json"]
    done = subprocess.run(
        [sys.executable, "-c", SLOW_VERDICT, *map(str, argv)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert json.loads(seen.read_text()) == {"staged": remaps, "published": ["tokenizer"] if union else []}, done.stderr
    if problems:
        assert done.returncode == 2 and "mergekit would refuse it: chat_template: refused by the test" in done.stderr, done.stderr
        assert not aligned.exists()
        return
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert [m["status"] for m in summary["models"]] == (["remapped"] * 3 if union else ["identical", "remapped", "remapped"])
    names = {"base", "sib1", "sib2", "tokenizer"} if union else {"padded", "chat"}
    assert {p.name for p in aligned.iterdir() if not p.name.startswith(".")} == {*names, "merge.yaml"}
    assert summary["gate"]["ok"] and ct.main(["--mergekit-config", str(aligned / "merge.yaml"), "--weights"]) == 0


def test_slices_and_union_tokenizer(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = tmp_path / "franken.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [{"model": str(models["base"]), "layer_range": [0, 1]}]},
                    {"sources": [{"model": str(models["chat"]), "layer_range": [1, 2]}]},
                ],
                "tokenizer_source": "union",
                "dtype": "float32",
            }
        )
    )
    aligned = tmp_path / "aligned"
    # the union is built (tests/test_union.py): both models get its 402 tokens
    code, out, err = run(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "union", "--json")
    assert code == 0, err
    assert json.loads(out)["target"] == {"model": str((tmp_path / "union" / "tokenizer").resolve()), "tokens": 402, "rows": 402}
    assert yaml.safe_load((tmp_path / "union" / "merge.yaml").read_text())["slices"][0]["sources"][0]["model"] == str(
        (tmp_path / "union" / "base").resolve()
    )
    # --base-tokenizer still chooses the target
    code, out, err = run(capsys, "--mergekit-config", config, "--out_dir", aligned, "--base-tokenizer", models["base"])
    assert code == 0, err
    merged = yaml.safe_load((aligned / "merge.yaml").read_text())
    assert "tokenizer_source" not in merged
    assert merged["slices"][1]["sources"][0] == {"model": str((aligned / "chat").resolve()), "layer_range": [1, 2]}
    assert "target tokenizer: " + str(models["base"]) in out


def test_target_from_tokenizer_source_and_override(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = linear_yaml(
        tmp_path / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)], tokenizer_source=str(models["chat"])
    )
    code, out, _ = run(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "a", "--dry-run", "--json")
    summary = json.loads(out)
    # the target is the chat model's tokenizer, written to ALIGNED/tokenizer as mergekit's tokenizer merge would build it
    assert code == 0 and summary["target"]["model"] == str((tmp_path / "a" / "tokenizer").resolve()) and summary["target"]["tokens"] == 402
    assert summary["tokenizer_merge"]["source"] == str(models["chat"])
    assert [m["status"] for m in summary["models"]] == ["to remap", "identical"]
    assert not (tmp_path / "a").exists()
    code, out, _ = run(
        capsys, "--mergekit-config", config, "--out_dir", tmp_path / "a", "--dry-run", "--json", "--base_tokenizer", models["base"]
    )
    assert json.loads(out)["target"]["model"] == str(models["base"])


def test_lora_references_are_refused(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {models['base']}+some/lora\n    parameters: {{weight: 1.0}}\n")
    code, _, err = run(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "a")
    assert code == 2 and "applies a LoRA" in err and "merge it first" in err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [("- a\n- b\n", "top level must be a mapping"), ("merge_method: linear\n", "names no models"), ("models: 3\n", "must be a list")],
)
def test_unknown_yaml_shapes(tmp_path: Path, capsys, text: str, message: str) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(text)
    code, _, err = run(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "a")
    assert code == 2 and message in err


def test_mode_flags_conflict(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models["base"], 1.0)])
    code, _, err = run(capsys, "--mergekit-config", config, "--out_dir", tmp_path / "a", "--src_model", models["base"])
    assert code == 2 and "leave out --src_model" in err
    code, _, err = run(capsys, "--out_dir", tmp_path / "a")
    assert code == 2 and "--src_model and --base_tokenizer are required" in err


def test_map_model_references_keeps_every_other_key() -> None:
    config = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "x", "parameters": {"density": 0.5, "weight": [0, 1]}}],
        "parameters": {"normalize": True},
        "modules": {"text": {"slices": [{"sources": [{"model": "y", "layer_range": [0, 4]}], "base_model": "b"}]}},
    }
    mapped = map_model_references(config, lambda r: r.upper())
    assert mapped == {
        "merge_method": "ties",
        "base_model": "B",
        "models": [{"model": "X", "parameters": {"density": 0.5, "weight": [0, 1]}}],
        "parameters": {"normalize": True},
        "modules": {"text": {"slices": [{"sources": [{"model": "Y", "layer_range": [0, 4]}], "base_model": "B"}]}},
    }
    assert mergekit_references(config) == ["b", "x", "b", "y", "b"]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"base_model": "b"}, None),
        ({"base_model": "b", "tokenizer_source": "base"}, ("base", {}, None)),
        ({"base_model": "b", "tokenizer_source": "union"}, ("union", {}, None)),
        ({"base_model": "b", "tokenizer_source": "model:x"}, ("x", {}, None)),
        ({"base_model": "b", "tokenizer": {"source": "y@rev", "pad_to_multiple_of": 8}}, ("y@rev", {}, 8)),
        ({"tokenizer": {"tokens": {1: {"force": True}}, "pad_to_multiple_of": "8"}}, ("union", {"1": {"force": True}}, None)),
    ],
)
def test_tokenizer_merge_settings(config: dict, expected: tuple | None) -> None:
    """(source, tokens, pad_to_multiple_of) as mergekit reads them: `tokenizer:` defaults to union."""
    assert tokenizer_merge_settings(config) == expected


def test_aligned_names_are_readable_and_unique() -> None:
    taken: set[str] = set()
    assert aligned_name(ModelRef("org/model"), taken) == "org--model"
    assert aligned_name(ModelRef("org/model", "v2"), taken) == "org--model-v2"
    assert aligned_name(ModelRef("/models/a/"), taken) == "a"
    assert aligned_name(ModelRef("/other/a"), taken) == "a-2"


def test_a_changed_model_is_remapped_again_not_reused(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    """Same path, same options, new weights (a fine-tune re-downloaded, a checkpoint saved
    over): the stale alignment must not be merged."""
    config = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)])
    aligned = tmp_path / "aligned"
    assert run(capsys, "--mergekit-config", config, "--out_dir", aligned)[0] == 0
    from safetensors.torch import load_file, save_file

    state = {}
    for shard in models["chat"].glob("*.safetensors"):
        changed = {name: value + 1 for name, value in load_file(shard).items()}  # same names, shapes and sizes
        save_file(changed, shard, metadata={"format": "pt"})
        state.update(changed)
    code, out, _ = run(capsys, "--mergekit-config", config, "--out_dir", aligned, "--json")
    assert code == 0 and json.loads(out)["models"][1]["status"] == "remapped"
    name = next(name for name in state if not name.endswith(("embed_tokens.weight", "lm_head.weight")))
    assert torch.equal(tensors(aligned / "chat")[name], state[name])


# ---- inputs are never written ------------------------------------------------------------


def snapshot(*paths: Path) -> dict[str, object]:
    """Bytes of every file under each path (a file or a folder), to prove nothing changed."""
    return {str(p): factories.tree_digest(p) if p.is_dir() else p.read_bytes() for p in paths}


def test_out_dir_in_the_yamls_folder_never_replaces_the_yaml(tmp_path: Path, models: dict[str, Path], monkeypatch, capsys) -> None:
    """`--out_dir .` next to merge.yaml: ALIGNED/merge.yaml would be the user's own file."""
    work = tmp_path / "work"
    work.mkdir()
    config = linear_yaml(work / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)])
    before = snapshot(config)
    monkeypatch.chdir(work)
    code, _, err = run(capsys, "--mergekit-config", "merge.yaml", "--out_dir", ".")
    assert code == 2 and "the aligned merge.yaml) is the merge configuration" in err and "nothing was written" in err, err
    assert snapshot(config) == before and sorted(p.name for p in work.iterdir()) == ["merge.yaml"]


@pytest.mark.parametrize("where", ["equal", "inside"])
@pytest.mark.parametrize("union", [False, True])
def test_out_dir_at_or_inside_a_model_writes_nothing(tmp_path: Path, models: dict[str, Path], capsys, where: str, union: bool) -> None:
    extra = {"tokenizer_source": "union"} if union else {}
    config = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)], **extra)
    before = snapshot(models["chat"], models["base"], config)
    out_dir = models["chat"] if where == "equal" else models["chat"] / "aligned"
    code, _, err = run(capsys, "--mergekit-config", config, "--out_dir", out_dir)
    assert code == 2 and f"{'is' if where == 'equal' else 'is inside'} the model {models['chat']}" in err, err
    assert snapshot(models["chat"], models["base"], config) == before


def test_a_second_stage_into_the_same_folder_keeps_its_inputs(tmp_path: Path, byte_tok: dict, capsys) -> None:
    """The models of the YAML are ALIGNED/* of a first alignment, aligned again into ALIGNED:
    the new outputs take other names, and the inputs are never written, renamed or removed."""
    from merge_fixtures import build_union_models, union_yaml

    union = build_union_models(tmp_path / "models", byte_tok)
    aligned = tmp_path / "aligned"
    first = union_yaml(tmp_path / "first.yaml", union, ["base", "sib1", "sib2"])
    assert run(capsys, "--mergekit-config", first, "--out_dir", aligned)[0] == 0
    new = factories.write_model(tmp_path / "new", factories.with_tokens(byte_tok, added=["<new>"]), seed=7, **factories.BYTE_SPECIALS)
    stage = {"base": aligned / "base", "sib1": aligned / "sib1", "new": new}
    second = union_yaml(tmp_path / "second.yaml", stage, ["base", "sib1", "new"])
    before = snapshot(aligned / "base", aligned / "sib1", second)
    code, out, err = run(capsys, "--mergekit-config", second, "--out_dir", aligned, "--json")
    assert code == 0, err
    assert snapshot(aligned / "base", aligned / "sib1", second) == before
    outputs = {Path(m["output"]).name for m in json.loads(out)["models"]}
    assert outputs == {"base-2", "sib1-2", "new"}
    merged = yaml.safe_load((aligned / "merge.yaml").read_text())
    assert {Path(m["model"]).name for m in merged["models"]} == outputs


def test_a_changed_yaml_removes_only_the_outputs_it_no_longer_uses(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    aligned = tmp_path / "aligned"
    both = linear_yaml(tmp_path / "both.yaml", models["base"], [(models["base"], 0.4), (models["chat"], 0.3), (models["padded"], 0.3)])
    assert run(capsys, "--mergekit-config", both, "--out_dir", aligned)[0] == 0
    (aligned / "mine").mkdir()  # the user's own folder: never removed
    union = linear_yaml(tmp_path / "one.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)], tokenizer_source="union")
    assert run(capsys, "--mergekit-config", union, "--out_dir", aligned)[0] == 0
    assert (aligned / "tokenizer").is_dir() and not (aligned / "padded").exists() and (aligned / "mine").is_dir()
    one = linear_yaml(tmp_path / "one.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)])
    code, _, err = run(capsys, "--mergekit-config", one, "--out_dir", aligned)
    assert code == 0 and not (aligned / "tokenizer").exists() and (aligned / "chat").is_dir(), err
    assert sorted(p.name for p in aligned.iterdir() if not p.name.startswith(".")) == ["chat", "merge.yaml", "mine"]


def test_a_single_remap_never_writes_into_its_donor(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    before = snapshot(models["base"])
    code, _, err = run(
        capsys, "--src_model", models["chat"], "--base_tokenizer", models["padded"], "--out_dir", models["base"],
        "--overwrite", "--init", "donor", "--donor-model", models["base"], "--drop-extra",
    )  # fmt: skip
    assert code == 2 and "donor model directory" in err and snapshot(models["base"]) == before, err
