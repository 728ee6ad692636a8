"""A CLI that never misleads: what each tool prints, where, and in which words; the
conventions users bring from git, huggingface-cli and mergekit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import compare_tokenizers as ct
import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS
from merge_tools import __version__
from merge_tools.common.cli import quoted
from merge_tools.common.logs import LogFormatter
from merge_tools.gate.vocab_check import show_token
from merge_tools.remap.config_outputs import REPORT_NAME

ROOT = Path(__file__).resolve().parent.parent
CHAT = ["<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def call(capsys: pytest.CaptureFixture[str], tool: object, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = tool.main([str(a) for a in argv])  # type: ignore[attr-defined]
    out, err = capsys.readouterr()
    return code, out, err


def script(name: str, *argv: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / name), *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, byte_tok: dict) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    chat_json = factories.with_tokens(byte_tok, added=CHAT)
    return {
        "base": factories.write_model(root / "base", byte_tok, seed=1, **BYTE_SPECIALS),
        "chat": factories.write_model(root / "chat", chat_json, seed=2, chat_template=TEMPLATE, **BYTE_SPECIALS),
        "sp": factories.write_tokenizer(root / "sp", factories.metaspace_bpe(), bos="<s>", eos="</s>", unk="<unk>"),
    }


def test_append_output_that_cannot_merge_gets_no_merge_snippet(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    code, out, _ = call(capsys, rt, "--src_model", models["chat"], "--base_tokenizer", models["base"], "--out_dir", tmp_path / "append")
    assert code == 0 and out == "# not mergeable with T's models (402 vs 400 rows): use --drop-extra for merges\n"
    code, out, err = call(
        capsys, rt, "--src_model", models["chat"], "--base_tokenizer", models["base"], "--out_dir", tmp_path / "drop", "--drop-extra"
    )
    assert code == 0 and out.startswith("# mergekit: add the remapped model") and f"- model: {tmp_path / 'drop'}" in out
    # the dropped special tokens are named, and the template that writes them out is warned about
    assert "dropped special/added tokens: '<|im_start|>', '<|im_end|>'" in err
    assert "warning: M's chat template uses '<|im_start|>', '<|im_end|>', which the output drops" in err
    assert "copied 400 (0 of them to new ids)" in err


def test_a_transplant_says_so(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    code, _, err = call(
        capsys,
        rt,
        "--src_model",
        models["base"],
        "--base_tokenizer",
        models["sp"],
        "--out_dir",
        tmp_path / "out",
        "--drop-extra",
        "--match",
        "exact",
    )
    assert code == 0
    assert "warning: mostly initialised (" in err and "this is a tokenizer transplant, expect a large quality loss" in err
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert any("tokenizer transplant" in w for w in report["plan"]["warnings"])
    assert len(report["plan"]["initialised"]) == report["plan"]["counts"]["initialised"] > 50  # every one, not the first 50


def test_init_report_shows_telling_examples_and_explains_them(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    code, out, _ = call(
        capsys, rt, "--src_model", models["base"], "--base_tokenizer", models["sp"], "--dry-run", "--init-report", "3", "--match", "bytes"
    )
    assert code == 0
    section = out.split("initialised rows, by rule")[1]
    assert "A + B is the mean of their rows" in section and "{" not in section  # the notation, and no Python dicts
    fvt = section.split("  fvt (")[1].splitlines()[1:4]
    assert len(fvt) == 3 and all(" <- " in line and " + " in line for line in fvt)  # multi-part decompositions first
    assert "<0x" not in "".join(fvt)
    assert call(capsys, rt, "--src_model", models["base"], "--base_tokenizer", models["sp"], "--dry-run", "--init-report", "-1")[0] == 2


@pytest.mark.parametrize("tool", [rt, ct], ids=["remap", "compare"])
def test_json_on_every_exit(tmp_path: Path, tool: object, capsys) -> None:
    argv = (
        ["--src_model", tmp_path / "nope", "--base_tokenizer", tmp_path / "nope", "--out_dir", tmp_path / "o", "--json"]
        if tool is rt
        else [tmp_path / "nope", tmp_path / "nope2", "--json"]
    )
    code, out, err = call(capsys, tool, *argv)
    document = json.loads(out)
    assert (
        code == 2 == document["exit_code"]
        and "no such file or directory" in document["error"]
        and document["schema"].startswith("merge_tools.")
    )
    assert err.startswith("error: ")
    code, out, _ = call(capsys, tool, "--json", "--no-such-flag")
    assert code == 2 and json.loads(out)["exit_code"] == 2


def test_both_spellings_did_you_mean_version_and_help_groups(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    code, _, _ = call(
        capsys,
        rt,
        "--src-model",
        models["chat"],
        "--base_tokenizer",
        models["base"],
        "--out-dir",
        tmp_path / "out",
        "--drop_extra",
        "--max_shard_size",
        "50KB",
    )
    assert code == 0 and json.loads((tmp_path / "out" / REPORT_NAME).read_text())["options"]["drop_extra"] is True
    code, _, err = call(capsys, rt, "--src_model", models["chat"], "--base_tokenizer", models["base"], "--drop-extr")
    assert code == 2 and "(did you mean --drop-extra?)" in err
    code, _, err = call(capsys, ct, models["base"], models["chat"], "--wieghts")
    assert code == 2 and "(did you mean --weights?)" in err
    for name in ("remap_tokenizer.py", "compare_tokenizers.py"):
        version = script(name, "--version")
        assert version.returncode == 0 and version.stdout == f"{name} {__version__}\n"
        help_text = script(name, "--help").stdout
        assert help_text.startswith(f"usage: {name} ") and "examples:" in help_text and "inputs:" in help_text and "behaviour:" in help_text
    help_text = script("remap_tokenizer.py", "--help").stdout
    assert "--drop-extra, --drop_extra" in help_text and "(default: auto)" in help_text and "initialisation" in help_text


def test_gguf_inputs_are_named(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    for tool, argv in (
        (rt, ["--src_model", gguf, "--base_tokenizer", models["base"], "--out_dir", tmp_path / "o"]),
        (ct, [models["base"], gguf]),
        (ct, [models["base"], tmp_path]),
    ):
        code, _, err = call(capsys, tool, *argv)
        assert code == 2 and "GGUF files are not supported: point at the Hugging Face model directory or repo id" in err, err


def test_one_log_format_and_one_quoting_style(tmp_path: Path, byte_tok: dict, capsys) -> None:
    assert quoted("'") == "'\\''" and quoted("a\x04b") == "'a\\x04b'" and show_token("\x04") == "'\\x04'"
    assert show_token("Ġ\x90", "plain") == "'Ġ\\x90'"
    assert show_token("Ã", "byte_level") == "'Ã' (\"\\xc3\")"  # a byte that is not UTF-8: one backslash, as everywhere
    record = __import__("logging").LogRecord("x", 30, __file__, 1, "careful", None, None)
    assert LogFormatter("%(message)s").format(record) == "warning: careful" == LogFormatter("%(message)s").format(record)


def test_output_directories_get_normal_permissions(tmp_path: Path, models: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            "sh",
            "-c",
            f'umask 022 && "{sys.executable}" "{ROOT / "remap_tokenizer.py"}" --src_model "{models["chat"]}" '
            f'--base_tokenizer "{models["base"]}" --out_dir "{out}" --drop-extra',
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o755"


def test_yaml_errors_name_the_file_line_and_column(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("merge_method: linear\nmodels: []\n")
    for tool, argv in ((ct, ["--mergekit-config", empty]), (rt, ["--mergekit-config", empty, "--out_dir", tmp_path / "a"])):
        code, _, err = call(capsys, tool, *argv)
        assert code == 2 and f"error: {empty}: names no models" in err, err
    broken = tmp_path / "broken.yaml"
    broken.write_text("merge_method: linear\nmodels:\n  - model: [a\n")
    code, _, err = call(capsys, ct, "--mergekit-config", broken)
    assert code == 2 and f"{broken}: not valid YAML (line 4, column 1:" in err, err
