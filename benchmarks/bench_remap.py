#!/usr/bin/env python3
"""Wall time and memory of remap_tokenizer.py against `cp -r` and the naive approach.

    python benchmarks/bench_remap.py [--layers 8 24] [--workdir DIR] [--repeat 1]

Builds synthetic Llama-shaped bf16 checkpoints (vocab 128,256, hidden 2048, several
shards, a seeded byte-level tokenizer) and a base tokenizer variant (5 % of the tokens
missing, 1 % new, ids shuffled), then runs, each followed by `sync` so that each pays for
its bytes reaching the disk:

  cp            cp -r of the checkpoint directory
  remap append  remap_tokenizer.py (append mode)
  remap drop    remap_tokenizer.py --drop-extra
  naive         transformers from_pretrained, rows copied into a resized embedding,
                save_pretrained (benchmarks/naive_remap.py)

and prints wall time, peak RssAnon and peak RSS (summed over the process tree, sampled
from /proc every 10 ms) with the ratios the README quotes. It is a benchmark, not a test:
the test suite only runs it at a tiny size (--tiny) to prove that it works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import synthetic  # noqa: E402
from merge_tools.remap.checkpoints import TensorEntry  # noqa: E402
from merge_tools.remap.shards import parse_size, plan_shards, safetensors_header  # noqa: E402


def llama_tensors(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def write_checkpoint(
    directory: Path, tokenizer_json: dict, layers: int, hidden: int, intermediate: int, shard_bytes: int, seed: int = 0
) -> int:
    """A bf16 Llama checkpoint with random weights, sharded like save_pretrained."""
    import numpy as np

    sys.path.insert(0, str(ROOT))

    vocab = len(tokenizer_json["model"]["vocab"]) + len(tokenizer_json["added_tokens"])
    heads, kv_heads = 16, 4
    shapes = llama_tensors(layers, hidden, intermediate, heads, kv_heads, vocab)
    entries = [TensorEntry(name, "BF16", shape, int(np.prod(shape)) * 2) for name, shape in shapes]
    plan = plan_shards(entries, shard_bytes)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(2**22, dtype=np.float32) * 0.02).view(np.uint32) >> 16
    block = block.astype(np.uint16).view(np.uint8)  # 8 MB of bf16 values, repeated
    for file, shard in zip(plan.files, plan.tensors):
        with open(directory / file, "wb") as handle:
            handle.write(safetensors_header(shard, {"format": "pt"}))
            for entry in shard:
                remaining = entry.nbytes
                while remaining:
                    chunk = block[: min(len(block), remaining)]
                    handle.write(chunk.tobytes())
                    remaining -= len(chunk)
    if len(plan.files) > 1:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map()})
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer_json["model"]["vocab"].get("<|begin_of_text|>", 128000),
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    synthetic.write_tokenizer_dir(directory, tokenizer_json)
    return plan.total_size


class TreeSampler(threading.Thread):
    """Peak RssAnon and VmRSS summed over a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_anon = self.peak_rss = 0
        self.done = threading.Event()

    def tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry))
                except (OSError, ValueError, IndexError):
                    continue
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def sample(self) -> None:
        anon = rss = 0
        for pid in self.tree():
            try:
                with open(f"/proc/{pid}/status") as handle:
                    for line in handle:
                        if line.startswith("RssAnon:"):
                            anon += int(line.split()[1]) * 1024
                        elif line.startswith("VmRSS:"):
                            rss += int(line.split()[1]) * 1024
            except OSError:
                continue
        self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            time.sleep(self.interval)


def measure(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run `command` then `sync`; wall time includes the sync."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    sampler = TreeSampler(process.pid)
    sampler.start()
    _, err = process.communicate()
    sampler.done.set()
    sampler.join()
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{err.decode()[-2000:]}")
    return {"wall": wall, "anon": sampler.peak_anon, "rss": sampler.peak_rss}


def machine() -> str:
    try:
        memory = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        memory = 0
    return (
        f"{os.cpu_count()} cores, {memory / 2**30:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 24])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=7168)
    parser.add_argument("--vocab", type=int, default=128_000, help="regular tokens (256 special tokens are added)")
    parser.add_argument("--shard-size", default="1GB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge_tools_bench"))
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the table shows each contender's median")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a few-MB model, to check that the benchmark runs")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--scripts",
        type=Path,
        nargs="+",
        metavar="SCRIPT",
        help="remap with each of these versions of remap_tokenizer.py, interleaved in every round (an old version against "
        "this one, measured in one run: figures from another day are no comparison); default: this checkout's",
    )
    parser.add_argument("--modes", nargs="+", default=["append", "drop"], choices=["append", "drop"])
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.intermediate, args.vocab, args.shard_size = [1, 2], 64, 128, 2000, "300KB"
    sys.path.insert(0, str(ROOT))

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    tokenizer = synthetic.synthetic_tokenizer(regular=args.vocab, specials=256, seed=0)
    base = synthetic.write_tokenizer_dir(args.workdir / "base-tokenizer", synthetic.variant(tokenizer, missing=0.05, new=0.01, seed=1))
    largest_vocab_tensor = (args.vocab + 256) * args.hidden * 2
    print(f"machine: {machine()}")
    print(f"vocabulary tensor: {largest_vocab_tensor / 1e9:.3f} GB (bf16 {args.vocab + 256} x {args.hidden})\n")
    results = []
    for layers in args.layers:
        src = args.workdir / f"src-{layers}"
        size = write_checkpoint(src, tokenizer, layers, args.hidden, args.intermediate, parse_size(args.shard_size))
        subprocess.run(["sync"], check=True)
        out = args.workdir / "out"
        contenders = {"cp -r": ["cp", "-r", str(src), str(out)]}
        for script in args.scripts or [ROOT / "remap_tokenizer.py"]:
            remap = [sys.executable, str(script), "--src_model", str(src), "--base_tokenizer", str(base), "--out_dir", str(out)]
            label = "remap" if not args.scripts else f"{script.stem}"
            for mode in args.modes:
                contenders[f"{label} {mode}"] = [*remap, "--max-shard-size", args.shard_size, *(["--drop-extra"] if mode == "drop" else [])]
        if not args.skip_naive:
            contenders["naive"] = [sys.executable, str(HERE / "naive_remap.py"), str(src), str(base), str(out), args.shard_size]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
        for _ in range(args.repeat):  # rounds interleave the contenders: disks drift
            for name, command in contenders.items():
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=True)
                runs[name].append(measure(command, env=dict(os.environ, HF_HUB_OFFLINE="1")))
        for name, measured in runs.items():
            best = {key: statistics.median(run[key] for run in measured) for key in ("wall", "anon", "rss")}
            results.append({"checkpoint_gb": size / 1e9, "layers": layers, "contender": name, "runs": measured, **best})
            print(
                f"  {layers:>2} layers {size / 1e9:5.2f} GB  {name:<13} {best['wall']:7.2f} "
                f"s  RssAnon {best['anon'] / 1e9:5.2f} GB  RSS {best['rss'] / 1e9:5.2f} GB"
                "  (walls: " + ", ".join(f"{r['wall']:.2f}" for r in measured) + ")",
                flush=True,
            )
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    print()
    print(table(results, largest_vocab_tensor))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "vocab_tensor_bytes": largest_vocab_tensor, "results": results}, indent=2))


def table(results: list[dict], vocab_tensor: int) -> str:
    lines = [
        "| checkpoint | contender | wall (s) | × cp | peak RssAnon (GB) | peak RSS (GB) | naive ÷ this: time, RSS |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in sorted({r["checkpoint_gb"] for r in results}):
        rows = {r["contender"]: r for r in results if r["checkpoint_gb"] == size}
        cp, naive = rows["cp -r"], rows.get("naive")
        for name, r in rows.items():
            versus = f"{naive['wall'] / r['wall']:.1f}×, {naive['rss'] / r['rss']:.1f}×" if naive and name not in ("cp -r", "naive") else ""
            lines.append(
                f"| {size:.2f} GB | {name} | {r['wall']:.2f} | {r['wall'] / cp['wall']:.2f} "
                f"| {r['anon'] / 1e9:.2f} | {r['rss'] / 1e9:.2f} | {versus} |"
            )
    anon_budget = (2 * vocab_tensor + 0.6e9) / 1e9
    rss_budget = (2 * vocab_tensor + 1e9) / 1e9
    lines.append(f"\nbudgets: RssAnon ≤ {anon_budget:.2f} GB, RSS ≤ {rss_budget:.2f} GB, wall ≤ 1.3 × cp + 2.5 s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
