#!/usr/bin/env python3
"""Speed of FVT initialisation for 100k tokens the source lacks.

    python benchmarks/bench_fvt.py [--missing 100000] [--hidden 2048]

Two seeded 128k-token byte-level tokenizers that share little: the base's first
--missing tokens absent from the source are decomposed with the source's tokenizer (one
batched encode), then their rows are built for one bf16 matrix (embedding-sized) as
remap_tokenizer.py does, for the input and the output embedding. Prints the times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import synthetic  # noqa: E402
from merge_tools.remap.matching import match_tokens  # noqa: E402
from merge_tools.remap.plan import plan_remap  # noqa: E402
from merge_tools.remap.row_math import ROW_CHUNK_BYTES, build_rows, encode_rows, mean_of_rows, nonfinite_rows  # noqa: E402
from merge_tools.remap.tokenizers_in import fvt_decompositions, read_tokenizer, token_texts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--missing", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=128_000)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge_tools_bench_fvt"))
    args = parser.parse_args()
    import numpy as np

    src_dir = synthetic.write_tokenizer_dir(args.workdir / "src", synthetic.synthetic_tokenizer(regular=args.tokens, seed=10))
    base_dir = synthetic.write_tokenizer_dir(args.workdir / "base", synthetic.synthetic_tokenizer(regular=args.tokens, seed=20))
    src = read_tokenizer(src_dir)
    base = read_tokenizer(base_dir)
    missing = [t for t in base.spec.vocab if t not in src.spec.vocab and t not in base.spec.added][: args.missing]
    started = time.perf_counter()
    decompositions = fvt_decompositions(token_texts(missing, base.spec), src)
    encode_seconds = time.perf_counter() - started
    matches = match_tokens(base.spec, src.spec, "exact")
    plan = plan_remap(
        base.spec, src.spec, src_rows=len(src.spec), matches=matches, drop_extra=True, init="fvt", decompositions=decompositions
    )
    rng = np.random.default_rng(0)
    matrix = encode_rows(rng.standard_normal((len(src.spec), args.hidden), dtype=np.float32), "BF16")
    finite = ~nonfinite_rows(matrix, "BF16")
    mean = encode_rows(mean_of_rows(matrix, "BF16", np.arange(len(matrix)))[None, :], "BF16")[0]
    started = time.perf_counter()
    step = max(1, ROW_CHUNK_BYTES // matrix.shape[1])
    for start in range(0, plan.n_rows, step):
        build_rows(matrix, "BF16", plan, start, min(plan.n_rows, start + step), lambda: mean, finite)
    rows_seconds = (time.perf_counter() - started) * 2  # the same work for embed_tokens and lm_head
    counts = plan.rule_counts()
    parts = sum(len(p) for p in plan.fvt_parts.values()) / max(1, len(plan.fvt_parts))
    print(
        f"{len(missing)} missing tokens: FVT rows {counts.get('fvt', 0)}, fallback to "
        f"mean {counts.get('fvt_fallback_mean', 0)}, {parts:.1f} source tokens per row"
    )
    print(f"decomposition (one batched encode): {encode_seconds:.2f} s")
    print(
        f"rows of two {len(src.spec)} x {args.hidden} bf16 matrices (embedding "
        f"and lm_head, {plan.n_rows} output rows each): {rows_seconds:.2f} s"
    )
    print(f"total: {encode_seconds + rows_seconds:.2f} s")


if __name__ == "__main__":
    main()
