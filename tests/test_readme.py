"""The READMEs and docs stay true: every flag, exit code and output file they document
exists, every flag the tools have is documented, and the Japanese mirrors keep step."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import compare_tokenizers as ct
import remap_tokenizer as rt

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
README_JA = (ROOT / "README.ja.md").read_text(encoding="utf-8")
PAGES = sorted(path.name for path in (ROOT / "docs").glob("*.md"))
DOCS = {name: (ROOT / "docs" / name).read_text(encoding="utf-8") for name in PAGES}
DOCS_JA = {name: (ROOT / "docs" / "ja" / name).read_text(encoding="utf-8") for name in PAGES if (ROOT / "docs" / "ja" / name).is_file()}
EVERYTHING = README + "".join(DOCS.values())
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z_-]+")
# flags of other programs the README shows: mergekit-yaml, init_quality.py
# mergekit-yaml, benchmarks (init_quality.py, transplant.py, bench_remap.py, bench_align.py), ruff
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
    "--held-out",
    "--scripts",
    "--layers",
    "--modes",
    "--before",
    "--repeat",
}


def help_text(parser_module) -> str:
    return parser_module.build_parser().format_help()


def test_every_documented_flag_exists() -> None:
    helps = help_text(ct) + help_text(rt)
    documented = set(FLAG.findall(EVERYTHING)) - OTHER_PROGRAMS - {"--help"}
    missing = sorted(flag for flag in documented if flag not in helps)
    assert not missing, f"README or docs document flags the tools lack: {missing}"
    benchmark_help = subprocess.run(
        [sys.executable, "benchmarks/init_quality.py", "--help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert all(flag in benchmark_help for flag in ("--model", "--tokenizer", "--demo"))
    transplant_help = subprocess.run(
        [sys.executable, "benchmarks/transplant.py", "--help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert all(flag in transplant_help for flag in ("--a", "--b", "--text", "--held-out", "--skip-surgeon-omp"))
    for script, flags in (
        ("bench_audit.py", ("--cold",)),
        ("bench_remap.py", ("--scripts", "--layers", "--modes")),
        ("bench_align.py", ("--before", "--repeat")),
        ("audit_demo.py", ("--model",)),
        ("union_fidelity.py", ("--model",)),
    ):
        script_help = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
        assert all(flag in script_help for flag in flags), script


def test_every_flag_of_the_tools_is_documented() -> None:
    for module in (ct, rt):
        for action in module.build_parser()._actions:
            spellings = [option for option in action.option_strings if option.startswith("--") and option != "--help"]
            documented = any(option in EVERYTHING for option in spellings)
            assert not spellings or documented, f"{module.__name__}: {spellings} missing from README.md and docs/"
            # every flag in both spellings users type; help shows kebab-case first
            if spellings and ("-" in spellings[0][2:] or "_" in spellings[0][2:]) and not spellings[0].startswith("--no-"):
                assert (
                    spellings[0] == spellings[0].replace("_", "-") and spellings[0].replace("-", "_").replace("__", "--", 1) in spellings
                ), spellings


def test_exit_codes_match_help() -> None:
    compare_table, remap_table = DOCS["gate.md"], DOCS["remap.md"].split("## Which tensors")[0]
    readme_table = README.split("## The gate: compare_tokenizers.py")[1].split("## A remap")[0]
    for table, module in ((compare_table, ct), (remap_table, rt), (readme_table, ct)):
        codes = re.findall(r"^\| (\d+) \|", table, flags=re.M)
        epilog = help_text(module).split("exit codes:")[1]
        assert codes and all(re.search(rf"^\s+{code}\s", epilog, flags=re.M) for code in codes), (module.__name__, codes)
    assert re.findall(r"^\| (\d+) \|", remap_table, flags=re.M) == ["0", "1", "2", "130", "143", "129"]


@pytest.mark.parametrize("page", ["README", *PAGES])
def test_japanese_mirrors_keep_step(page: str) -> None:
    english, japanese = (README, README_JA) if page == "README" else (DOCS[page], DOCS_JA.get(page))
    assert japanese is not None, f"docs/ja/{page} is missing"
    assert set(FLAG.findall(english)) == set(FLAG.findall(japanese)), page
    assert english.count("```") == japanese.count("```"), page
    headings = re.findall(r"^#+ ", english, flags=re.M)
    assert headings == re.findall(r"^#+ ", japanese, flags=re.M), page
    tables = lambda text: [line.count("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]  # noqa: E731
    assert tables(english) == tables(japanese), page


def test_the_readmes_are_a_first_five_minutes() -> None:
    for text in (README, README_JA):
        assert len(text.splitlines()) <= 250
    for name in PAGES:
        assert f"docs/{name}" in README and f"docs/ja/{name}" in README_JA, name


def test_links_between_the_pages_lead_somewhere() -> None:
    for folder, pages in ((ROOT, {"README.md": README, "README.ja.md": README_JA}), (ROOT / "docs", DOCS), (ROOT / "docs" / "ja", DOCS_JA)):
        for name, text in pages.items():
            for target in re.findall(r"\]\((?!https?:)([^)#]+)(?:#[^)]*)?\)", text):
                assert (folder / target).exists(), f"{name}: a link to {target}, which does not exist"


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
    layout = DOCS["remap.md"].split("## Output directory")[1].split("```")[1]
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
