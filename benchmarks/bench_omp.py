#!/usr/bin/env python3
"""Speed of --init omp's batched Orthogonal Matching Pursuit (remap_tokenizer.omp_coefficients).

    python benchmarks/bench_omp.py [--missing 10000] [--shared 128000] [--hidden 2048] [--k 64] [--device cpu|cuda]

Random rows stand in for the donor's embedding (the work does not depend on the values):
`--missing` target rows, each expressed as a k-sparse combination of `--shared` rows of
width `--hidden`, then the coefficients applied to a second (model's) matrix of another
width, as the remap does. Prints the wall time of each phase and the threads used; the
issue's target is 10,000 x 128,000 x 2048 in at most 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merge_tools.remap.omp import omp_coefficients  # noqa: E402
from merge_tools.remap.row_math import combine_rows, encode_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--missing", type=int, default=10_000)
    parser.add_argument("--shared", type=int, default=128_000)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--model-hidden", type=int, default=2048, help="width of the model whose rows are combined")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(0)
    atoms = torch.randn(args.shared, args.hidden, generator=generator)
    targets = torch.randn(args.missing, args.hidden, generator=generator)
    model_rows = encode_rows(np.random.default_rng(0).standard_normal((args.shared, args.model_hidden), dtype=np.float32), "BF16")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    indices, coefficients = omp_coefficients(targets, atoms, args.k, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    coded = time.perf_counter()
    rows = combine_rows(model_rows, "BF16", indices.numpy(), coefficients)
    combined = time.perf_counter()
    result = {
        "missing": args.missing,
        "shared": args.shared,
        "hidden": args.hidden,
        "k": args.k,
        "device": device,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "omp_seconds": round(coded - started, 2),
        "combine_seconds": round(combined - coded, 2),
        "total_seconds": round(combined - started, 2),
        "rows": list(rows.shape),
    }
    where = result["gpu"] or f"{result['threads']} threads"
    print(
        f"{args.missing} missing x {args.shared} shared rows, width {args.hidden}, k {args.k}, {device} ({where}): "
        f"OMP {result['omp_seconds']} s + combine {result['combine_seconds']} s = {result['total_seconds']} s"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
