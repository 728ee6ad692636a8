#!/usr/bin/env python3
"""Union merges: mergekit's own `tokenizer_source: union` merge against ours (align, then
a plain mergekit merge), on real weights.

    python benchmarks/union_fidelity.py --model DIR [--text FILE] [--workdir DIR] [--json FILE]

The base is M (SmolLM2-135M from `benchmarks/fetch_real_models.py`). Three siblings are
M with every weight perturbed (Gaussian noise, 1 % of each tensor's standard deviation)
and tokens of their own appended to tokenizer and embedding, as community fine-tunes add
them: tools (<tool_call>, </tool_call>), think (<think>, </think> and <tool_call> too: a
token two models hold, whose row mergekit averages) and chat (<|endofturn|>, not special,
and <answer>). A fourth, ghost, lists the tools tokens in its tokenizer but has only M's
rows ("tokenizer says 131072, tensor has 131070").

For the merge of base + the three siblings (linear, dtype float32 and bfloat16) it
reports, ours next to mergekit's union:

  rows          the largest relative difference of a token's row (max |a - b| / max |a|,
                embed_tokens; tied), over every token, and how many rows differ at all
  tokens        whether both merged tokenizers split the text (and a chat text holding
                every added token) into the same tokens
  wall, RSS     of each step (its own process; peak RSS of its largest process)

then the same merge with the ghost sibling added: mergekit's union and ours, and the ids
mergekit's union gives the added tokens under several PYTHONHASHSEED values (it orders
the models as a Python set; ours follow the YAML). Needs mergekit (requirements-e2e.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MERGEKIT_YAML = Path(sys.executable).with_name("mergekit-yaml")

SIBLINGS = {
    "tools": [("<tool_call>", True), ("</tool_call>", True)],
    "think": [("<think>", True), ("</think>", True), ("<tool_call>", True)],
    "chat": [("<|endofturn|>", False), ("<answer>", True)],
}
CHAT_TEXT = '<|im_start|>user\nWeather?<|im_end|>\n<think>look it up</think><tool_call>{"city": "Oslo"}</tool_call><answer>4 C<|endofturn|>'

# A small process runs the command and reports its children's peak RSS (see transplant.py).
PEAK_RSS_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def run_measured(argv: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS in MB) of a command, its output in `log`."""
    rss_file = log.with_suffix(".rss")
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.call(
            [sys.executable, "-c", PEAK_RSS_WRAPPER, str(rss_file), *argv], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
    return code, time.monotonic() - started, int(rss_file.read_text()) / 1024


def make_sibling(base: Path, out: Path, added: list[tuple[str, bool]], seed: int, ghost: bool = False) -> None:
    """M perturbed, with `added` appended to its tokenizer (added tokens) and, unless
    `ghost`, rows for them appended to its (tied) embedding."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    config = json.loads((base / "tokenizer_config.json").read_text())
    next_id = max(tokenizer["model"]["vocab"].values()) + 1
    for token, special in added:
        entry = {"id": next_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": not special}
        tokenizer["added_tokens"].append({**entry, "special": special})
        config.setdefault("added_tokens_decoder", {})[str(next_id)] = {k: v for k, v in entry.items() if k != "id"} | {"special": special}
        next_id += 1
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    for name in ("chat_template.jinja", "generation_config.json"):
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in load_file(str(base / "model.safetensors")).items():
        values = tensor.float()
        values = values + torch.randn(values.shape, generator=generator) * 0.01 * values.std() if values.numel() > 1 else values
        if name == "model.embed_tokens.weight" and not ghost:
            extra = values.mean(0) + torch.randn((len(added), values.shape[1]), generator=generator) * values.std(0)
            values = torch.cat([values, extra])
        tensors[name] = values.to(tensor.dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model_config = json.loads((base / "config.json").read_text())
    model_config["vocab_size"] = tensors["model.embed_tokens.weight"].shape[0]
    (out / "config.json").write_text(json.dumps(model_config, indent=1))


def write_yaml(path: Path, base: Path, models: list[Path], dtype: str) -> Path:
    import yaml

    config = {
        "merge_method": "linear",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1 / len(models)}} for m in models],
        "dtype": dtype,
        "tokenizer_source": "union",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def mergekit(config: Path, out: Path, log: Path, seed: str = "0") -> tuple[int, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONHASHSEED=seed)
    return run_measured([str(MERGEKIT_YAML), str(config), str(out), "--copy-tokenizer"], log, env)


def align(config: Path, out: Path, log: Path) -> tuple[int, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    return run_measured([sys.executable, str(ROOT / "remap_tokenizer.py"), "--mergekit-config", str(config), "--out_dir", str(out)], log)


def compare_by_token(theirs: Path, ours: Path, texts: list[str]) -> dict:
    """Rows of every token and tokenization of `texts`, mergekit's union vs ours."""
    import torch
    import transformers
    from safetensors.torch import load_file

    their_tok, our_tok = (transformers.AutoTokenizer.from_pretrained(p) for p in (theirs, ours))
    their_vocab, our_vocab = their_tok.get_vocab(), our_tok.get_vocab()
    tokens = sorted(their_vocab)
    a = load_file(str(theirs / "model.safetensors"))["model.embed_tokens.weight"][[their_vocab[t] for t in tokens]].float()
    b = load_file(str(ours / "model.safetensors"))["model.embed_tokens.weight"][[our_vocab[t] for t in tokens]].float()
    relative = (a - b).abs().amax(1) / a.abs().amax(1).clamp_min(1e-30)
    worst = int(relative.argmax())
    return {
        "same_tokens": set(their_vocab) == set(our_vocab),
        "same_ids": their_vocab == our_vocab,
        "tokens": len(tokens),
        "max_relative_row_difference": float(relative.max()),
        "worst_token": tokens[worst],
        "rows_differing": int((relative > 0).sum()),
        "same_tokenization": all(their_tok.tokenize(t) == our_tok.tokenize(t) for t in texts),
        "bit_identical_rows": bool(torch.equal(a, b)),
    }


def added_ids(model: Path, first: int) -> dict[str, int]:
    """The ids of the added tokens from `first` (the base's vocabulary size) on."""
    vocab = json.loads((model / "tokenizer.json").read_text())
    return {e["content"]: e["id"] for e in vocab["added_tokens"] if e["id"] >= first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--text", type=Path, default=HERE / "sample_text.txt")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/union_fidelity"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="merge dtypes to run (float32 first)")
    parser.add_argument("--seeds", nargs="*", default=["1", "2", "3"], help="more PYTHONHASHSEED values for mergekit's union")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    siblings = {name: work / name for name in SIBLINGS}
    for seed, (name, added) in enumerate(SIBLINGS.items(), start=1):
        make_sibling(args.model, siblings[name], added, seed)
    make_sibling(args.model, work / "ghost", SIBLINGS["tools"], 9, ghost=True)
    texts = [args.text.read_text(encoding="utf-8"), CHAT_TEXT]
    results: dict = {"runs": []}
    for dtype in args.dtypes:
        config = write_yaml(work / f"union-{dtype}.yaml", args.model, [args.model, *siblings.values()], dtype)
        row = {"merge": f"base + 3 siblings, {dtype}"}
        row["mergekit_union"] = mergekit(config, work / f"theirs-{dtype}", work / f"theirs-{dtype}.log")
        row["align"] = align(config, work / f"aligned-{dtype}", work / f"align-{dtype}.log")
        row["plain_merge"] = mergekit(work / f"aligned-{dtype}" / "merge.yaml", work / f"ours-{dtype}", work / f"ours-{dtype}.log")
        row["fidelity"] = compare_by_token(work / f"theirs-{dtype}", work / f"ours-{dtype}", texts)
        results["runs"].append(row)
        print(json.dumps(row), file=sys.stderr)
    config = write_yaml(work / "ghost.yaml", args.model, [args.model, *siblings.values(), work / "ghost"], "float32")
    ghost = {"merge": "base + 3 siblings + ghost, float32"}
    ghost["mergekit_union"] = mergekit(config, work / "theirs-ghost", work / "theirs-ghost.log")
    ghost["mergekit_error"] = (work / "theirs-ghost.log").read_text().strip().splitlines()[-1][:200]
    ghost["align"] = align(config, work / "aligned-ghost", work / "align-ghost.log")
    ghost["plain_merge"] = mergekit(work / "aligned-ghost" / "merge.yaml", work / "ours-ghost", work / "ours-ghost.log")
    results["ghost"] = ghost
    first = json.loads((args.model / "config.json").read_text())["vocab_size"]
    results["hash_order"] = {"PYTHONHASHSEED=0": added_ids(work / "theirs-float32", first)}
    for seed in args.seeds:
        mergekit(work / "union-float32.yaml", work / f"theirs-seed{seed}", work / f"theirs-seed{seed}.log", seed=seed)
        results["hash_order"][f"PYTHONHASHSEED={seed}"] = added_ids(work / f"theirs-seed{seed}", first)
    results["ours_ids"] = added_ids(work / "ours-float32", first)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def table(results: dict) -> str:
    lines = [
        "| merge | mergekit union: wall, RSS | ours: align + plain merge: wall, RSS | max rel. row diff (rows differing) "
        "| same tokenization |",
        "|---|---:|---:|---:|:---:|",
    ]
    for row in results["runs"]:
        theirs, aligned, plain, fid = row["mergekit_union"], row["align"], row["plain_merge"], row["fidelity"]
        lines.append(
            f"| {row['merge']} | {theirs[1]:.1f} s, {theirs[2]:.0f} MB | {aligned[1]:.1f} + {plain[1]:.1f} s, "
            f"{max(aligned[2], plain[2]):.0f} MB | {fid['max_relative_row_difference']:.2e} ({fid['rows_differing']} of {fid['tokens']}) "
            f"| {'yes' if fid['same_tokenization'] else 'NO'} |"
        )
    ghost = results["ghost"]
    lines.append(
        f"| {ghost['merge']} | exit {ghost['mergekit_union'][0]} ({ghost['mergekit_error']}) | exit {ghost['align'][0]} + "
        f"exit {ghost['plain_merge'][0]}: {ghost['align'][1]:.1f} + {ghost['plain_merge'][1]:.1f} s | | |"
    )
    lines.append("")
    for seed, ids in results["hash_order"].items():
        lines.append(f"mergekit union ids, {seed}: {ids}")
    lines.append(f"ours (every run): {results['ours_ids']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
