#!/usr/bin/env python3
"""Wall time of compare_tokenizers.py on two 128k-token tokenizers, against the naive
approach (transformers' AutoTokenizer + get_vocab, then comparing the dicts).

    python benchmarks/bench_compare.py [--tokens 128000] [--runs 7]

Both are timed as fresh processes (interpreter and imports included), the way a CI job or
a shell script runs them; the table shows the median of --runs runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import synthetic  # noqa: E402

NAIVE = """
import sys
from transformers import AutoTokenizer
a = AutoTokenizer.from_pretrained(sys.argv[1]).get_vocab()
b = AutoTokenizer.from_pretrained(sys.argv[2]).get_vocab()
sys.exit(0 if a == b else 1)
"""


def timed(command: list[str], runs: int) -> tuple[float, int]:
    walls, code = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        code = subprocess.run(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1")
        ).returncode
        walls.append(time.perf_counter() - started)
    return statistics.median(walls), code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128_000, help="regular tokens per tokenizer (256 special tokens are added)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge_tools_bench_compare"))
    args = parser.parse_args()
    base = synthetic.synthetic_tokenizer(regular=args.tokens, seed=0)
    pairs = {
        "identical (two copies of one tokenizer.json)": (base, base),
        "5% missing, 1% new, ids shuffled": (base, synthetic.variant(base, missing=0.05, new=0.01, seed=1)),
    }
    print(f"| pair ({args.tokens + 256} tokens each) | compare_tokenizers.py (s) | naive AutoTokenizer (s) | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for label, (left, right) in pairs.items():
        a = synthetic.write_tokenizer_dir(args.workdir / "a", left)
        b = synthetic.write_tokenizer_dir(args.workdir / "b", right)
        ours, code = timed([sys.executable, str(HERE.parent / "compare_tokenizers.py"), str(a), str(b)], args.runs)
        naive, naive_code = timed([sys.executable, "-c", NAIVE, str(a), str(b)], max(1, args.runs // 2))
        assert code == naive_code, f"the two disagree on {label}: exit {code} vs {naive_code}"
        print(f"| {label} | {ours:.2f} | {naive:.2f} | {naive / ours:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
