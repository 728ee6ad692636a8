#!/usr/bin/env python3
"""The naive remap the benchmark compares against: load the whole model with
transformers, copy rows into a resized embedding, save_pretrained.

    python benchmarks/naive_remap.py SRC BASE_TOKENIZER OUT [MAX_SHARD_SIZE]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    src, base, out = (Path(a) for a in sys.argv[1:4])
    shard = sys.argv[4] if len(sys.argv) > 4 else "5GB"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, low_cpu_mem_usage=True)
    src_vocab = AutoTokenizer.from_pretrained(src).get_vocab()
    base_vocab = AutoTokenizer.from_pretrained(base).get_vocab()
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    model.resize_token_embeddings(len(base_vocab))
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        new_in[:] = old_in.mean(0)
        new_out[:] = old_out.mean(0)
        for token, base_id in base_vocab.items():
            src_id = src_vocab.get(token)
            if src_id is not None:
                new_in[base_id] = old_in[src_id]
                new_out[base_id] = old_out[src_id]
    model.save_pretrained(out, max_shard_size=shard)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / name, out / name)


if __name__ == "__main__":
    main()
