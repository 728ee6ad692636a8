#!/usr/bin/env python3
"""Cost of the merge check: `compare_tokenizers.py --mergekit-config merge.yaml` (weights by
default: tokenizers, headers, architecture) against the tokenizer-only gate (--no-weights).

    python benchmarks/bench_gate.py [--models 3] [--layers 32] [--hidden 4096] [--runs 5]

Builds --models Llama-shaped checkpoints with a 128,256-token byte-level tokenizer (the
same one in each, as after an alignment) whose shards are sparse files: real safetensors
headers, data that takes no disk space (the gate reads headers only). Prints the median
wall time of fresh processes for both gates and their ratio (the issue's budget: 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import synthetic  # noqa: E402
from bench_remap import llama_tensors  # noqa: E402
from merge_tools.common.sources import SAFETENSORS_INDEX  # noqa: E402
from merge_tools.remap.checkpoints import TensorEntry  # noqa: E402
from merge_tools.remap.shards import plan_shards, safetensors_header  # noqa: E402


def sparse_checkpoint(directory: Path, tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int, config: dict) -> None:
    """safetensors shards whose data parts are holes: headers exact, files full size."""
    sys.path.insert(0, str(ROOT))

    entries = [TensorEntry(name, "BF16", shape, 2 * int(__import__("math").prod(shape))) for name, shape in tensors]
    plan = plan_shards(entries, shard_bytes)
    for file, shard in zip(plan.files, plan.tensors):
        header = safetensors_header(shard, {"format": "pt"})
        with open(directory / file, "wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + sum(e.nbytes for e in shard))
    if len(plan.files) > 1:
        (directory / SAFETENSORS_INDEX).write_text(
            json.dumps({"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map()})
        )
    (directory / "config.json").write_text(json.dumps(config))


def timed(command: list[str], runs: int) -> float:
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge_tools_bench_gate"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    tokenizer = synthetic.synthetic_tokenizer(regular=args.vocab, specials=256, seed=0)
    rows = args.vocab + 256
    tensors = llama_tensors(args.layers, args.hidden, args.intermediate, 32, 8, rows)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": rows,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
    }
    models = []
    for index in range(args.models):
        directory = synthetic.write_tokenizer_dir(args.workdir / f"model{index}", tokenizer)
        sparse_checkpoint(directory, tensors, 5 * 10**9, config)
        models.append(directory)
    merge = args.workdir / "merge.yaml"
    merge.write_text(
        json.dumps(
            {
                "merge_method": "linear",
                "base_model": str(models[0]),
                "models": [{"model": str(m), "parameters": {"weight": 1 / len(models)}} for m in models],
            }
        )
    )
    size = sum(p.stat().st_size for m in models for p in m.glob("*.safetensors"))
    gate = [sys.executable, str(ROOT / "compare_tokenizers.py"), "--mergekit-config", str(merge)]
    tokenizers_only = timed([*gate, "--no-weights"], args.runs)
    with_weights = timed(gate, args.runs)  # --weights is the default
    print(f"{args.models} models, {args.layers} layers, hidden {args.hidden}, {rows} rows: {size / 1e9:.1f} GB of (sparse) checkpoints")
    print(
        f"tokenizer-only gate {tokenizers_only:.2f} s; with --weights (headers, architecture) "
        f"{with_weights:.2f} s: {with_weights / tokenizers_only:.2f}x (median of {args.runs})"
    )


if __name__ == "__main__":
    main()
