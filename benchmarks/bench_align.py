#!/usr/bin/env python3
"""What an alignment writes and costs: linked against --copy, and align + plain merge
against mergekit's own union merge.

    python benchmarks/bench_align.py [--layers 18] [--repeat 3] [--workdir DIR] [--json FILE] [--before SCRIPT]

Builds four synthetic Llama-shaped bf16 checkpoints of about 3 GB (hidden 2048, vocabulary
128,256, 18 layers) in 4 shards each, laid out as save_pretrained lays them out (the
embedding in the first shard, lm_head in the last): base; sibling (the base's tokenizer,
other weights); shuffled (the base's tokens, ids shuffled); added (the base's tokenizer
plus three added tokens). Then, rounds interleaved, each command followed by `sync`:

  align --copy    remap_tokenizer.py --mergekit-config (linear, base_model base) --copy
  align linked    the same, shards without a vocabulary tensor linked (the default)
  cp: what ...    `cp` of the files each alignment writes (every file of the two models
                  it remaps, or all but their linked shards): the floor for those bytes
  mergekit union  mergekit-yaml on a union merge (base, added, and added-2: two tokens of
                  its own), tokenizer_source: union
  ours union      remap_tokenizer.py --mergekit-config on that YAML, then a plain
                  mergekit-yaml on ALIGNED/merge.yaml

and prints medians: wall, peak RSS (of the process tree), bytes written and linked, with
the goals: bytes written no more than the shards that hold a vocabulary tensor, linked
≤ 0.5 × the --copy wall, align + plain merge ≤ 1.2 × mergekit's union. Needs mergekit for
the union rows (requirements-e2e.txt); --tiny runs it at a few MB.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import synthetic  # noqa: E402
from bench_remap import TreeSampler, machine, write_checkpoint  # noqa: E402
from merge_tools.remap.shards import human_bytes, parse_size  # noqa: E402

MERGEKIT_YAML = Path(sys.executable).with_name("mergekit-yaml")


def with_added(tokenizer_json: dict, tokens: list[str]) -> dict:
    data = copy.deepcopy(tokenizer_json)
    next_id = len(data["model"]["vocab"]) + len(data["added_tokens"])
    for offset, token in enumerate(tokens):
        flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        data["added_tokens"].append({"id": next_id + offset, "content": token, **flags})
    return data


def build(workdir: Path, layers: int, hidden: int, intermediate: int, vocab: int, shard: str) -> dict[str, Path]:
    tokenizer = synthetic.synthetic_tokenizer(regular=vocab, specials=256, seed=0)
    tokenizers = {
        "base": tokenizer,
        "sibling": tokenizer,
        "shuffled": synthetic.variant(tokenizer, missing=0.0, new=0.0, seed=3),
        "added": with_added(tokenizer, ["<tool_call>", "</tool_call>", "<think>"]),
        "added-2": with_added(tokenizer, ["<think>", "<answer>"]),
    }
    models = {}
    for seed, (name, tokenizer_json) in enumerate(tokenizers.items()):
        models[name] = workdir / name
        write_checkpoint(models[name], tokenizer_json, layers, hidden, intermediate, parse_size(shard), seed=seed)
    subprocess.run(["sync"], check=True)
    return models


def write_yaml(path: Path, base: Path, models: list[Path], union: bool) -> Path:
    import yaml

    config = {"merge_method": "linear", "base_model": str(base), "dtype": "bfloat16"}
    config["models"] = [{"model": str(m), "parameters": {"weight": round(1 / len(models), 4)}} for m in models]
    if union:
        config["tokenizer_source"] = "union"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def measure(argv: list[str], log: Path) -> dict[str, float]:
    """Wall (with the `sync` after it) and peak RSS of a command's process tree."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        sampler = TreeSampler(process.pid)
        sampler.start()
        code = process.wait()
        sampler.done.set()
        sampler.join()
    subprocess.run(["sync"], check=True)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}): see {log}\n{log.read_text()[-2000:]}")
    return {"wall": time.perf_counter() - started, "rss": sampler.peak_rss}


def align(config: Path, out: Path, log: Path, *extra: str, script: Path = ROOT / "remap_tokenizer.py") -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, str(script), "--mergekit-config", str(config), "--out_dir", str(out), "--json", *extra]
    result = measure(argv, log)
    summary = json.loads(log.read_text()[log.read_text().index("{") :])
    return result | {"written": summary["bytes"]["written"], "linked": summary["bytes"]["linked"]}


def merge(config: Path, out: Path, log: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    return measure([str(MERGEKIT_YAML), str(config), str(out), "--copy-tokenizer"], log)


def vocabulary_shards(model: Path) -> set[str]:
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    return {index["model.embed_tokens.weight"], index["lm_head.weight"]}


def vocabulary_shard_bytes(model: Path) -> int:
    return sum((model / f).stat().st_size for f in vocabulary_shards(model))


def copy_floor(models: list[Path], out: Path, log: Path, vocabulary_only: bool) -> dict[str, float]:
    """`cp` of what an alignment writes, in one process tree: every file of the remapped
    models (what --copy writes), or all but the shards without a vocabulary tensor (what a
    linked alignment writes). No tool can write the same bytes faster than this."""
    shutil.rmtree(out, ignore_errors=True)
    commands = []
    for model in models:
        skipped = {f.name for f in model.glob("*.safetensors")} - vocabulary_shards(model) if vocabulary_only else set()
        files = [str(f) for f in sorted(model.iterdir()) if f.name not in skipped]
        commands.append(f"mkdir -p {shlex.quote(str(out / model.name))} && cp {shlex.join(files)} {shlex.quote(str(out / model.name))}")
    result = measure(["sh", "-c", " && ".join(commands)], log)
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=7168)
    parser.add_argument("--vocab", type=int, default=128_000, help="regular tokens (256 special tokens are added)")
    parser.add_argument("--shard-size", default="800MB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge_tools_bench_align"))
    parser.add_argument("--tiny", action="store_true", help="a few-MB model, to check that the benchmark runs")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--before",
        type=Path,
        metavar="SCRIPT",
        help="an earlier remap_tokenizer.py: its alignments (--copy and linked) run interleaved with this checkout's, in every round",
    )
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.intermediate, args.vocab, args.shard_size = 4, 64, 128, 2000, "200KB"
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    models = build(args.workdir / "models", args.layers, args.hidden, args.intermediate, args.vocab, args.shard_size)
    size = sum(p.stat().st_size for p in models["base"].glob("*.safetensors"))
    linear = write_yaml(args.workdir / "linear.yaml", models["base"], [models[n] for n in ("base", "sibling", "shuffled", "added")], False)
    union = write_yaml(args.workdir / "union.yaml", models["base"], [models[n] for n in ("base", "added", "added-2")], True)
    with_mergekit = MERGEKIT_YAML.exists()
    runs: dict[str, list[dict[str, float]]] = {}
    logs = args.workdir / "logs"
    logs.mkdir()
    for round_ in range(args.repeat):
        steps = {
            "align --copy": lambda: align(linear, args.workdir / "copy", logs / "copy.log", "--copy"),
            "align linked": lambda: align(linear, args.workdir / "linked", logs / "linked.log"),
        }
        remapped = [models["shuffled"], models["added"]]  # base and sibling have the target's tokenizer
        steps["cp: what --copy writes"] = lambda: copy_floor(remapped, args.workdir / "cp", logs / "cp.log", False)
        steps["cp: what linked writes"] = lambda: copy_floor(remapped, args.workdir / "cp", logs / "cp.log", True)
        if args.before is not None:
            steps["before: align --copy"] = lambda: align(linear, args.workdir / "copy", logs / "copy.log", "--copy", script=args.before)
            steps["before: align linked"] = lambda: align(linear, args.workdir / "linked", logs / "linked.log", script=args.before)
        if with_mergekit:
            steps["mergekit union"] = lambda: merge(union, args.workdir / "theirs", logs / "theirs.log")
            steps["ours union: align"] = lambda: align(union, args.workdir / "aligned-union", logs / "ours-align.log")
            steps["ours union: merge"] = lambda: merge(
                args.workdir / "aligned-union" / "merge.yaml", args.workdir / "ours", logs / "ours.log"
            )
        for name, step in steps.items():
            runs.setdefault(name, []).append(step())
            print(f"round {round_ + 1}: {name:<18} {runs[name][-1]['wall']:7.2f} s", flush=True)
    print(f"\nmachine: {machine()}; each model {human_bytes(size)} in 4 shards\n")
    print(report(runs, 2 * vocabulary_shard_bytes(models["shuffled"])))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "model_bytes": size, "runs": runs}, indent=2))


def report(runs: dict[str, list[dict[str, float]]], vocabulary_shards: int) -> str:
    med = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    lines = ["| step | wall (s) | peak RSS (GB) | written | linked |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, m in med.items():
        written = human_bytes(int(m["written"])) if "written" in m else ""
        linked = human_bytes(int(m["linked"])) if "linked" in m else ""
        lines.append(f"| {name} | {m['wall']:.2f} | {m['rss'] / 1e9:.2f} | {written} | {linked} |")
    copy_, linked = med["align --copy"], med["align linked"]
    lines.append(
        f"\nlinked: wrote {human_bytes(int(linked['written']))} for {human_bytes(vocabulary_shards)} of shards that hold a vocabulary "
        f"tensor (goal: no more); wall {linked['wall'] / copy_['wall']:.2f} × --copy (goal ≤ 0.5)"
    )
    if "cp: what linked writes" in med:
        floor_linked, floor_copy = med["cp: what linked writes"]["wall"], med["cp: what --copy writes"]["wall"]
        lines.append(
            f"cp of the same files: what linked writes {floor_linked / floor_copy:.2f} × what --copy writes; "
            f"linked {linked['wall'] / floor_linked:.2f} × its cp, --copy {copy_['wall'] / floor_copy:.2f} × its cp"
        )
    if "before: align linked" in med:
        before = med["before: align linked"]["wall"] / med["before: align --copy"]["wall"]
        lines.append(f"before: linked {before:.2f} × --copy")
    if "mergekit union" in med:
        ours = med["ours union: align"]["wall"] + med["ours union: merge"]["wall"]
        lines.append(f"union: align + plain merge {ours:.2f} s = {ours / med['mergekit union']['wall']:.2f} × mergekit's own (goal ≤ 1.2)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
