#!/usr/bin/env python3
"""The merge audit on real weights: SmolLM2-135M and five fine-tune-like siblings.

    python benchmarks/audit_demo.py --model DIR [--workdir DIR] [--plot FILE]

Each sibling is M with Gaussian noise added, at a scale (a fraction of each tensor's
standard deviation) chosen per decoder layer, so that the audit has something to find:

  instruct        1 % everywhere
  instruct-copy   instruct plus 0.02 %: a near-duplicate of it
  late-layers     3 % in the last quarter of the layers, 0.5 % elsewhere
  barely          0.05 % everywhere: hardly a fine-tune
  odd-layer       1 % everywhere, 10 % in the middle layer

then runs `compare_tokenizers.py --mergekit-config merge.yaml --audit --plot FILE` on a
task_arithmetic merge of the five (weight 0.2 each, base_model M) and prints its report.
The README's chart comes from this script.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def sibling(base: Path, out: Path, scale_of_layer, seed: int, start: Path | None = None) -> None:
    """M (or `start`) plus noise of scale_of_layer(layer) x each tensor's std (layer None:
    tensors outside the decoder layers)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for file in base.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copy(file, out / file.name)
    reference = load_file(str(base / "model.safetensors"))
    tensors = load_file(str((start or base) / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        match = re.search(r"\.layers\.(\d+)\.", name)
        scale = scale_of_layer(int(match.group(1)) if match else None)
        if tensor.numel() > 1 and scale:
            noise = torch.randn(tensor.shape, generator=generator) * scale * reference[name].float().std()
            tensors[name] = (tensor.float() + noise).to(tensor.dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/audit_demo"))
    parser.add_argument("--plot", type=Path, default=Path("/tmp/audit_demo/audit.png"))
    args = parser.parse_args()
    layers = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    plans = {
        "instruct": (lambda layer: 0.01, None),
        "instruct-copy": (lambda layer: 0.0002, "instruct"),
        "late-layers": (lambda layer: 0.03 if layer is not None and layer >= layers * 3 // 4 else 0.005, None),
        "barely": (lambda layer: 0.0005, None),
        "odd-layer": (lambda layer: 0.1 if layer == layers // 2 else 0.01, None),
    }
    for seed, (name, (scale, start)) in enumerate(plans.items(), start=1):
        sibling(args.model, work / name, scale, seed, work / start if start else None)
    base = work / "SmolLM2-135M"
    if not base.is_symlink():
        base.symlink_to(args.model.resolve())
    config = {"merge_method": "task_arithmetic", "base_model": base.name, "dtype": "bfloat16"}
    config["models"] = [{"model": name, "parameters": {"weight": 0.2}} for name in plans]
    (work / "merge.yaml").write_text(json.dumps(config))
    command = [sys.executable, str(ROOT / "compare_tokenizers.py"), "--mergekit-config", "merge.yaml", "--plot", str(args.plot.resolve())]
    result = subprocess.run(command, capture_output=True, text=True, cwd=work)  # paths as the YAML writes them, relative
    sys.stdout.write(result.stdout)
    if result.returncode:
        raise SystemExit(f"the gate exited {result.returncode}:\n{result.stderr[-2000:]}")


if __name__ == "__main__":
    main()
