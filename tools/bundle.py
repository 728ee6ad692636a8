#!/usr/bin/env python3
"""Write compare_tokenizers.py and remap_tokenizer.py from the merge_tools package.

Each script is self-contained (it runs when copied alone next to the installed
requirements), so it is generated the way SQLite generates its amalgamation: the modules
it needs, concatenated in dependency order, each under a banner with its path; the
imports between them removed; every other import in one block at the top. Imports of
third-party modules that a module makes at import time (numpy) come right after the tool
package's __init__, which follows every common module: so the signal handlers of
merge_tools/common/errors.py are installed before numpy is imported.

  python tools/bundle.py          write both scripts
  python tools/bundle.py --check  exit 1 when a committed script differs from a fresh build

The build refuses a top-level name defined in two modules, a module the order below does
not list, and an order in which a module comes before one it imports at run time.
"""

from __future__ import annotations

import argparse
import ast
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "merge_tools"

COMMON = ["__init__", "common/__init__", "common/logs", "common/errors", "common/strict_json", "common/sources",
          "common/tokenizer_files", "common/safetensors_files", "common/vocab_tensors", "common/spellings",
          "common/mergekit_config", "common/merge_check", "common/tokenizer_merge", "common/cli"]  # fmt: skip
SCRIPTS = {
    "compare_tokenizers.py": ("gate", ["fingerprint", "reading", "vocab_check", "tokenizer_checks", "weights_check", "comparison",
                                       "tokenizer_merge_audit", "audit", "audit_reading", "audit_report", "report", "cli"]),
    "remap_tokenizer.py": ("remap", ["tokenizers_in", "progress", "matching", "plan", "row_math", "omp", "checkpoints", "options",
                                     "donor", "mergekit_rows", "shards", "shard_writer", "shard_streaming", "calibration_text",
                                     "calibration", "body_forward", "calibration_scoring", "calibration_run", "config_outputs",
                                     "tokenizer_outputs", "output_dir", "summary", "model_views", "remap", "union",
                                     "alignment_dir", "alignment", "cli"]),
}  # fmt: skip
BANNER_WIDTH = 90


class BundleError(Exception):
    """The package cannot be bundled as it is (one line, exit 2)."""


@dataclass
class Module:
    """One module of the package, taken apart: its imports and the code after them."""

    path: str  # merge_tools/common/logs.py
    docstring: str
    code: str
    names: set[str]
    package_imports: set[str]  # modules of merge_tools it imports at run time
    plain: set[tuple[str, str | None]] = field(default_factory=set)  # import x [as y]
    members: dict[str, set[tuple[str, str | None]]] = field(default_factory=dict)  # from x import y [as z]
    typing_only: set[tuple[str, str | None]] = field(default_factory=set)  # import x as y under TYPE_CHECKING


def read_module(relative: str) -> Module:
    path = PACKAGE / f"{relative}.py"
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    module = Module(f"merge_tools/{relative}.py", ast.get_docstring(tree) or "", "", set(), set())
    lines = source.splitlines(keepends=True)
    code_start = 0
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str) and not code_start:
            code_start = node.end_lineno
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            take_import(module, node, typing_only=False)
            code_start = node.end_lineno
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for inner in node.body:
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    take_import(module, inner, typing_only=True)
            code_start = node.end_lineno
        else:
            break
    stray = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno > code_start]
    if stray and not (relative.endswith("__init__") and all(not stdlib(alias.name) for node in stray for alias in node.names)):
        raise BundleError(f"{module.path}:{stray[0].lineno}: an import after the code; imports come first (or inside a function)")
    module.code = "".join(lines[code_start:]).strip("\n")
    for node in tree.body:
        module.names |= defined_names(node)
    return module


def take_import(module: Module, node: ast.Import | ast.ImportFrom, typing_only: bool) -> None:
    if isinstance(node, ast.ImportFrom):
        if node.module == "__future__":
            return
        if node.module is not None and node.module.split(".")[0] == "merge_tools":
            if not typing_only:
                module.package_imports.add(node.module)
            return
        target = module.typing_only if typing_only else None
        for alias in node.names:
            if target is not None:
                raise BundleError(f"{module.path}: only `import x as y` may stand under TYPE_CHECKING (from {node.module})")
            module.members.setdefault(node.module or "", set()).add((alias.name, alias.asname))
        return
    for alias in node.names:
        (module.typing_only if typing_only else module.plain).add((alias.name, alias.asname))


def defined_names(node: ast.stmt) -> set[str]:
    """Top-level names a statement binds (an `if __name__ == "__main__":` block binds none that count)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}


def module_name(relative: str) -> str:
    return "merge_tools" if relative == "__init__" else "merge_tools." + relative.removesuffix("/__init__").replace("/", ".")


def stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def load(script: str) -> tuple[list[Module], Module]:
    """The modules of one script in order, checked; and its tool package's __init__."""
    tool, names = SCRIPTS[script]
    order = [*COMMON, f"{tool}/__init__", *(f"{tool}/{name}" for name in names)]
    listed = {relative for relatives in [COMMON, *([f"{t}/__init__", *(f"{t}/{n}" for n in ns)] for t, ns in SCRIPTS.values())]
              for relative in relatives}  # fmt: skip
    on_disk = {str(p.relative_to(PACKAGE).with_suffix("")) for p in PACKAGE.rglob("*.py")}
    if on_disk - listed:
        raise BundleError(f"modules not listed in tools/bundle.py: {', '.join(sorted(on_disk - listed))}")
    modules = [read_module(relative) for relative in order]
    defined: dict[str, str] = {}
    before: set[str] = set()
    for relative, module in zip(order, modules):
        later = module.package_imports - before
        if later:
            raise BundleError(f"{module.path} imports {', '.join(sorted(later))} at run time, which the order puts after it")
        for name in module.names:
            if name in defined:
                raise BundleError(f"the name {name} is defined in {defined[name]} and in {module.path}: one of them must go")
            defined[name] = module.path
        before.add(module_name(relative))
    return modules, modules[len(COMMON)]


def name_key(name: str) -> tuple[int, str]:
    """isort's order by type: CONSTANTS, then Classes, then everything else."""
    return (0 if name.isupper() and len(name) > 1 else 1 if name[:1].isupper() else 2, name)


def alias(name: str, asname: str | None) -> str:
    return f"{name} as {asname}" if asname else name


def import_block(modules: list[Module]) -> tuple[list[str], list[str]]:
    """(the imports at the top of the script, those that come after the tool's __init__)."""
    plain = {entry for module in modules for entry in module.plain}
    members: dict[str, set[tuple[str, str | None]]] = {}
    for module in modules:
        for source, entries in module.members.items():
            members.setdefault(source, set()).update(entries)
    late = sorted(entry for entry in plain if not stdlib(entry[0]))
    if any(not stdlib(source) for source in members):
        raise BundleError("a third-party `from x import y` at module level: import the module lazily inside the function")
    typing_only = {entry for module in modules for entry in module.typing_only} - plain
    if not typing_only:  # every name a TYPE_CHECKING block imported is imported at run time here
        members.get("typing", set()).discard(("TYPE_CHECKING", None))
    top = ["from __future__ import annotations", ""]
    top += [f"import {alias(*entry)}" for entry in sorted(plain - set(late), key=lambda e: e[0].lower())]
    for source in sorted(members, key=str.lower):
        names = ", ".join(alias(*entry) for entry in sorted(members[source], key=lambda e: name_key(e[0])))
        line = f"from {source} import {names}"
        if len(line) > 140:
            line = f"from {source} import (\n" + "".join(f"    {part},\n" for part in names.split(", ")) + ")"
        top.append(line)
    if typing_only:
        top += ["", "if TYPE_CHECKING:", *(f"    import {alias(*entry)}" for entry in sorted(typing_only))]
    return top, [f"import {alias(*entry)}  # noqa: E402" for entry in late]


def banner(module: Module) -> str:
    rule = "# " + "=" * (BANNER_WIDTH - 2)
    text = textwrap.fill(module.docstring.split("\n\n")[0].replace("\n", " "), BANNER_WIDTH - 2) if module.docstring else ""
    lines = [rule, f"# {module.path}", *(f"# {line}" for line in text.splitlines()), rule]
    return "\n".join(lines)


def build(script: str) -> str:
    modules, tool_init = load(script)
    tool = SCRIPTS[script][0]
    top, late = import_block(modules)
    parts = [
        "#!/usr/bin/env python3",
        f'"""{tool_init.docstring}\n"""',
        "",
        f"# Generated by tools/bundle.py from the merge_tools package (merge_tools/common, merge_tools/{tool}):",
        "# do not edit it by hand; edit the package, then run `python tools/bundle.py`.",
        "",
        *top,
    ]
    text = "\n".join(parts) + "\n"
    after_imports = True
    for module in modules:
        code = module.code
        if module is tool_init and late:
            code = (code + "\n" if code else "") + "\n".join(late)
        if code:
            # isort: one blank line after an import block; ruff format: two between top-level definitions
            text += ("\n" if after_imports else "\n\n") + banner(module) + "\n" + code + "\n"
            after_imports = code.endswith("# noqa: E402")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write compare_tokenizers.py and remap_tokenizer.py from the merge_tools package.")
    parser.add_argument("--check", action="store_true", help="exit 1 when a committed script differs from a fresh build; write nothing")
    args = parser.parse_args(argv)
    try:
        built = {script: build(script) for script in SCRIPTS}
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stale = [
        script for script, text in built.items() if not (ROOT / script).is_file() or (ROOT / script).read_text(encoding="utf-8") != text
    ]
    if args.check:
        for script in stale:
            print(f"{script} differs from a fresh build of the package: run python tools/bundle.py", file=sys.stderr)
        return 1 if stale else 0
    for script in stale:
        (ROOT / script).write_text(built[script], encoding="utf-8")
        print(f"wrote {script}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
