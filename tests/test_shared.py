"""The two scripts are self-contained, so the code both need is written out twice, between
the same two marker lines; these tests keep the copies from drifting apart."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "# >>> shared: identical in compare_tokenizers.py and remap_tokenizer.py\n"
END = "# <<< shared\n"


def shared_block(script: str) -> str:
    text = (ROOT / script).read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{script}: expected one shared block"
    return text[text.index(BEGIN) : text.index(END) + len(END)]


def test_the_shared_blocks_are_byte_identical() -> None:
    compare, remap = shared_block("compare_tokenizers.py"), shared_block("remap_tokenizer.py")
    assert compare == remap, "the shared blocks differ: edit one, then copy it into the other script"


def test_nothing_in_the_shared_block_is_defined_again_outside_it() -> None:
    block_names = {
        node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else node.targets[0].id
        for node in ast.parse(shared_block("remap_tokenizer.py")).body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) or (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name))
    }
    assert {"CliError", "resolve_source", "file_in_model_dir"} <= block_names
    for script in ("compare_tokenizers.py", "remap_tokenizer.py"):
        text = (ROOT / script).read_text(encoding="utf-8")
        outside = text.replace(shared_block(script), "")
        defined = {
            node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else node.targets[0].id
            for node in ast.parse(outside).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) or (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name))
        }
        assert not block_names & defined, f"{script} redefines {sorted(block_names & defined)} outside the shared block"
