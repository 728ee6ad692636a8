"""transformers 4 and 5: an output written under one version loads under the other.

.ci/run runs the suite in a transformers-5 and a transformers-4 virtualenv and points
MERGE_TOOLS_OTHER_PYTHON at the other one, so each output is also loaded there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS
from merge_tools.remap.tokenizer_outputs import portable_tokenizer_config

OTHER_PYTHON = os.environ.get("MERGE_TOOLS_OTHER_PYTHON")
LOADER = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(out)
dtype_keyword = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
model = AutoModelForCausalLM.from_pretrained(out, **{dtype_keyword: torch.float32})
ids = tokenizer("The quick brown fox <|im_start|>", add_special_tokens=False).input_ids
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -1, :8].tolist()
print(json.dumps({"version": transformers.__version__, "len": len(tokenizer), "vocab": tokenizer.get_vocab(), "ids": ids,
                  "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "logits": logits,
                  "extra": sorted(getattr(tokenizer, "additional_special_tokens", None)
                                  or getattr(tokenizer, "extra_special_tokens", None) or [])}))
"""


def load_in(python: str, directory: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([python, "-c", LOADER, str(directory)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture
def saved_by_this_version(tmp_path: Path, byte_tok: dict) -> Path:
    """A base tokenizer as this transformers version's save_pretrained writes it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(factories.permuted(byte_tok, 6))),
        bos_token=BYTE_SPECIALS["bos"],
        eos_token=BYTE_SPECIALS["eos"],
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("mode", ["append", "drop"])
def test_output_loads_in_both_transformers_versions(tmp_path: Path, byte_tok: dict, saved_by_this_version: Path, mode: str) -> None:
    """Written by this version's remap, loaded here and by the other major version alike
    (skipped up front, before any work, where no other version is configured)."""
    if OTHER_PYTHON is None:
        if os.environ.get("MERGE_TOOLS_CI"):
            pytest.fail("MERGE_TOOLS_OTHER_PYTHON is not set")
        pytest.skip("set MERGE_TOOLS_OTHER_PYTHON to a Python with the other transformers major version (.ci/run does)")
    src = factories.write_model(
        tmp_path / "src", factories.with_tokens(byte_tok, regular=["Ġremapped"], added=["<|tool|>"]), **BYTE_SPECIALS
    )
    out = tmp_path / mode
    assert (
        rt.main(
            ["--src_model", str(src), "--base_tokenizer", str(saved_by_this_version), "--out_dir", str(out)]
            + (["--drop-extra"] if mode == "drop" else [])
        )
        == 0
    )
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config.get("tokenizer_class") != "TokenizersBackend" and not isinstance(config.get("extra_special_tokens"), list)
    here = load_in(sys.executable, out)
    assert here["bos"] == json.loads((out / "config.json").read_text())["bos_token_id"]
    assert here["extra"] == ["<|im_start|>"]
    there = load_in(OTHER_PYTHON, out)
    assert here["version"].split(".")[0] != there["version"].split(".")[0]
    for key in ("len", "vocab", "ids", "bos", "eos", "extra"):
        assert here[key] == there[key], key
    assert torch.allclose(torch.tensor(here["logits"]), torch.tensor(there["logits"]), atol=1e-5)


def test_portable_tokenizer_config() -> None:
    v5 = {"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<a>", "<b>"], "bos_token": "<s>", "backend": "tokenizers"}
    assert portable_tokenizer_config(v5) == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": ["<a>", "<b>"],
        "bos_token": "<s>",
        "backend": "tokenizers",
    }
    v4 = {"tokenizer_class": "PreTrainedTokenizerFast", "extra_special_tokens": {}, "additional_special_tokens": ["<a>"]}
    assert portable_tokenizer_config(v4) is None


@pytest.mark.parametrize("union", [False, True])
def test_a_linked_aligned_model_loads_in_both_versions(tmp_path: Path, byte_tok: dict, union: bool) -> None:
    """An alignment's output (shards linked to the source's, a tied model given an lm_head
    for mergekit in the union case) loads here and in the other major version, with the
    logits of a full copy of the same alignment."""
    if OTHER_PYTHON is None:
        if os.environ.get("MERGE_TOOLS_CI"):
            pytest.fail("MERGE_TOOLS_OTHER_PYTHON is not set")
        pytest.skip("set MERGE_TOOLS_OTHER_PYTHON to a Python with the other transformers major version (.ci/run does)")
    from merge_fixtures import build_models, build_union_models, linear_yaml, union_yaml

    if union:
        models = build_union_models(tmp_path / "models", byte_tok)
        config, name = union_yaml(tmp_path / "merge.yaml", models, ["tied", "sib1"], base="tied"), "tied"
    else:
        models = build_models(tmp_path / "models", byte_tok)
        config, name = linear_yaml(tmp_path / "merge.yaml", models["base"], [(models["base"], 0.5), (models["chat"], 0.5)]), "chat"
    outputs = {}
    for mode in ("linked", "copy"):
        argv = ["--mergekit-config", str(config), "--out_dir", str(tmp_path / mode)] + (["--copy"] if mode == "copy" else [])
        assert rt.main(argv) == 0
        outputs[mode] = tmp_path / mode / name
    assert factories.report_of(outputs["linked"])["linked"] and not factories.report_of(outputs["copy"])["linked"]
    here, there = load_in(sys.executable, outputs["linked"]), load_in(OTHER_PYTHON, outputs["linked"])
    copied = load_in(sys.executable, outputs["copy"])
    assert here["vocab"] == there["vocab"] == copied["vocab"] and here["logits"] == copied["logits"]
    assert torch.allclose(torch.tensor(here["logits"]), torch.tensor(there["logits"]), atol=1e-5)
