"""The READMEs stay true: every flag, exit code and output file they document exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import compare_tokenizers as ct
import remap_tokenizer as rt

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
README_JA = (ROOT / "README.ja.md").read_text(encoding="utf-8")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z_-]+")
# flags of other programs the README shows: mergekit-yaml, init_quality.py
# mergekit-yaml, benchmarks (init_quality.py, transplant.py, bench_remap.py), ruff
OTHER_PROGRAMS = {
    "--copy-tokenizer",
    "--model",
    "--tokenizer",
    "--demo",
    "--check",
    "--text",
    "--skip-surgeon-omp",
    "--skip-naive",
    "--cold",
}


def help_text(parser_module) -> str:
    return parser_module.build_parser().format_help()


def test_every_documented_flag_exists() -> None:
    helps = help_text(ct) + help_text(rt)
    documented = set(FLAG.findall(README)) - OTHER_PROGRAMS - {"--help"}
    missing = sorted(flag for flag in documented if flag not in helps)
    assert not missing, f"README documents flags the tools lack: {missing}"
    benchmark_help = subprocess.run(
        [sys.executable, "benchmarks/init_quality.py", "--help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert all(flag in benchmark_help for flag in ("--model", "--tokenizer", "--demo"))
    transplant_help = subprocess.run(
        [sys.executable, "benchmarks/transplant.py", "--help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert all(flag in transplant_help for flag in ("--a", "--b", "--text", "--skip-surgeon-omp"))
    for script, flags in (("bench_audit.py", ("--cold",)), ("audit_demo.py", ("--model",)), ("union_fidelity.py", ("--model",))):
        script_help = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
        assert all(flag in script_help for flag in flags), script


def test_every_flag_of_the_tools_is_documented() -> None:
    for module in (ct, rt):
        for action in module.build_parser()._actions:
            spellings = [option for option in action.option_strings if option.startswith("--") and option != "--help"]
            assert not spellings or any(option in README for option in spellings), f"{module.__name__}: {spellings} missing from README.md"
            # every flag in both spellings users type; help shows kebab-case first
            if spellings and ("-" in spellings[0][2:] or "_" in spellings[0][2:]) and not spellings[0].startswith("--no-"):
                assert (
                    spellings[0] == spellings[0].replace("_", "-") and spellings[0].replace("-", "_").replace("__", "--", 1) in spellings
                ), spellings


def test_exit_codes_match_help() -> None:
    compare_table = README.split("## compare_tokenizers.py")[1].split("## remap_tokenizer.py")[0]
    remap_table = README.split("## remap_tokenizer.py")[1].split("### Which tensors")[0]
    for table, module in ((compare_table, ct), (remap_table, rt)):
        codes = re.findall(r"^\| (\d+) \|", table, flags=re.M)
        epilog = help_text(module).split("exit codes:")[1]
        assert codes and all(re.search(rf"^\s+{code}\s", epilog, flags=re.M) for code in codes), (module.__name__, codes)
    assert re.findall(r"^\| (\d+) \|", remap_table, flags=re.M) == ["0", "1", "2", "130", "143", "129"]


def test_japanese_readme_keeps_step() -> None:
    assert set(FLAG.findall(README)) == set(FLAG.findall(README_JA))
    assert README.count("```") == README_JA.count("```")
    headings = re.findall(r"^#+ ", README, flags=re.M)
    assert headings == re.findall(r"^#+ ", README_JA, flags=re.M)
    tables = lambda text: [line.count("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]  # noqa: E731
    assert tables(README) == tables(README_JA)


def test_ci_runs_the_readme_test_command() -> None:
    command = re.search(r"pip install torch==2\.13\.0 -r requirements-e2e\.txt && (python -m pytest)\n", README).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'&& MERGE_TOOLS_OTHER_PYTHON="$PWD/.venv-ci-tf4/bin/python" {command})' in ci
    assert "pip install -q torch==2.13.0" in ci and ci.index("torch==2.13.0") < ci.index("requirements-e2e.txt")
    assert 'python -m pytest -m "not e2e"' in README and 'python -m pytest -m "not e2e"' in ci


def test_documented_output_layout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        rt.main(
            [
                "--src_model",
                str(ROOT / "examples/chat-finetune"),
                "--base_tokenizer",
                str(ROOT / "examples/base-model"),
                "--out_dir",
                str(out),
                "--max-shard-size",
                "30KB",
            ]
        )
        == 0
    )
    layout = README.split("### Output directory")[1].split("```")[1]
    for name in (
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "remap_report.json",
    ):
        assert name in layout and (out / name).is_file(), name
    assert list(out.glob("model-00001-of-*.safetensors"))
