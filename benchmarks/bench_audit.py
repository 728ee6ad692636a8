#!/usr/bin/env python3
"""Wall time and memory of `compare_tokenizers.py --audit` against reading the same files.

    python benchmarks/bench_audit.py [--layers 8 32] [--models 3] [--workdir DIR] [--cold]

Builds `--models` synthetic Llama-shaped bf16 checkpoints per size (hidden 2048,
intermediate 5632, vocab 32,256: 3.4 GB per model at 32 layers; each with its own seeded
values, so every model has a task vector against the first) and a merge YAML with the
first as base_model, then measures, per size:

  cat     cat of every shard of every model to /dev/null (what reading the files costs)
  audit   compare_tokenizers.py --mergekit-config merge.yaml --audit --json

wall time and peak RSS (summed over the process tree, sampled every 10 ms), the median of
--repeat rounds that alternate the two (a shared virtual disk's speed wanders). Warm: the
files are in the page cache for both (the machine has the RAM); --cold drops the page cache
before each run (needs root: /proc/sys/vm/drop_caches). It is a benchmark, not a test: the
test suite runs it at a tiny size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_remap  # noqa: E402
import synthetic  # noqa: E402


def build(workdir: Path, layers: int, models: int, hidden: int, intermediate: int, vocab: int) -> tuple[Path, list[Path]]:
    """`models` checkpoints of `layers` layers (reused when already there) and their YAML."""
    tokenizer = synthetic.synthetic_tokenizer(regular=vocab)
    directories = []
    for index in range(models):
        directory = workdir / f"L{layers}" / f"model{index}"
        if not (directory / "config.json").is_file():
            bench_remap.write_checkpoint(directory, tokenizer, layers, hidden, intermediate, 2 * 10**9, seed=index)
        directories.append(directory)
    config = {"merge_method": "task_arithmetic", "base_model": str(directories[0]), "dtype": "bfloat16"}
    config["models"] = [{"model": str(d), "parameters": {"weight": 1.0 / (models - 1)}} for d in directories[1:]]
    path = workdir / f"L{layers}" / "merge.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path, directories


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32_000, help="regular tokens (256 special tokens are added)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge_tools_bench_audit"))
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for layers in args.layers:
        config, directories = build(args.workdir, layers, args.models, args.hidden, args.intermediate, args.vocab)
        shards = sorted(str(p) for d in directories for p in d.glob("*.safetensors"))
        size = sum(Path(p).stat().st_size for p in shards)
        row = {"layers": layers, "gb_per_model": size / args.models / 1e9, "models": args.models}
        commands = {
            "cat": ["sh", "-c", 'cat "$@" > /dev/null', "cat", *shards],
            "audit": [sys.executable, str(ROOT / "compare_tokenizers.py"), "--mergekit-config", str(config), "--audit", "--json"],
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
        for _ in range(args.repeat):  # alternating, so that both see the same disk weather
            for name, command in commands.items():
                if args.cold:
                    drop_caches()
                else:  # warm: read once first, so that both runs find the files in the page cache
                    subprocess.run(commands["cat"], check=True)
                runs[name].append(bench_remap.measure(command))
        for name, measured in runs.items():
            row[name] = {key: statistics.median(m[key] for m in measured) for key in measured[0]}
            row[name]["walls"] = [round(m["wall"], 2) for m in measured]
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(f"{bench_remap.machine()}; {'cold' if args.cold else 'warm'} page cache")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def table(results: list[dict]) -> str:
    lines = ["| models × size | cat: wall (median) | audit: wall (median) | × cat | audit: peak RSS |", "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['models']} × {r['gb_per_model']:.2f} GB ({r['layers']} layers) | {r['cat']['wall']:.1f} s | "
            f"{r['audit']['wall']:.1f} s | {r['audit']['wall'] / r['cat']['wall']:.2f} | {r['audit']['rss'] / 1e9:.2f} GB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
