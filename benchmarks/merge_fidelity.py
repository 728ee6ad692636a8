#!/usr/bin/env python3
"""Merge fidelity: do the base's own tokens survive an aligned merge?

    python benchmarks/merge_fidelity.py --model M [--tokens T1 T2 ...] [--text FILE] [--workdir DIR]
    python benchmarks/merge_fidelity.py --demo      # offline: a tiny model trained first

The base is M, whose `--tokens` (default: the special tokens its chat template writes out,
e.g. SmolLM2-Instruct's <|im_start|> / <|im_end|>) have trained rows. The sibling is M
with every weight perturbed (Gaussian noise, 2 % of each tensor's standard deviation) and
those tokens removed from its tokenizer and rows: a fine-tune of an earlier base that never
had them. For each --init (fvt, mean, donor, omp) the merge is aligned with
`remap_tokenizer.py --mergekit-config`, merged by mergekit (linear 0.5 / 0.5, and
task_arithmetic with the sibling's task vector at weight 1.0), and measured:

  row error     relative L2 distance of the merged rows of the base-only tokens from the
                base's own rows (embed_tokens and lm_head together): 0 is perfect
  bits / byte   of the merged model on the text (chat-formatted when M has a template, so
                that the base-only tokens occur), next to the base alone; `donor` keeps the
                base's rows exactly, so it is the ideal the other methods are held to

Needs mergekit (requirements-e2e.txt).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from merge_tools.common.tokenizer_files import read_chat_template, special_token_content, template_special_tokens  # noqa: E402
from merge_tools.common.vocab_tensors import INPUT_EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING_SUFFIXES  # noqa: E402
from merge_tools.remap.alignment import align_mergekit  # noqa: E402
from merge_tools.remap.checkpoints import resolve_model  # noqa: E402
from merge_tools.remap.options import AlignOptions  # noqa: E402
from merge_tools.remap.tokenizers_in import read_tokenizer  # noqa: E402

INITS = ("fvt", "mean", "donor", "omp")


def load_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def chat_tokens(model: Path) -> list[str]:
    tokenizer = read_tokenizer(model)
    template = read_chat_template(model, tokenizer.tokenizer_config)
    return template_special_tokens(template, tokenizer.spec.added)


def make_sibling(base: Path, out: Path, tokens: list[str], noise: float, seed: int = 0) -> None:
    """The base, perturbed, without `tokens` (ids renumbered, rows removed)."""
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tokenizer = read_tokenizer(base)
    data = copy.deepcopy(dict(tokenizer.tokenizer_json))
    removed_ids = sorted(tokenizer.spec.vocab[token] for token in tokens)
    keep = [i for i in range(len(tokenizer.spec.vocab)) if i not in set(removed_ids)]
    new_id = {old: new for new, old in enumerate(keep)}
    vocab = data["model"]["vocab"]
    data["model"]["vocab"] = {t: new_id[i] for t, i in vocab.items() if i in new_id}
    data["added_tokens"] = [
        {**entry, "id": new_id[entry["id"]]} for entry in data.get("added_tokens") or [] if entry["content"] not in tokens
    ]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = dict(tokenizer.tokenizer_config)
    config.pop("chat_template", None)
    config["added_tokens_decoder"] = {
        str(new_id[int(i)]): v for i, v in (config.get("added_tokens_decoder") or {}).items() if v.get("content") not in tokens
    }
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(config.get(key), list):
            config[key] = [t for t in config[key] if special_token_content(t) not in tokens]
    for role in ("bos", "eos", "pad", "unk"):
        if special_token_content(config.get(f"{role}_token")) in tokens:
            config.pop(f"{role}_token")
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in load_tensors(base).items():
        values = tensor.float()
        if values.numel() > 1:
            values = values + torch.randn(values.shape, generator=generator) * noise * values.std()
        if (
            values.dim() >= 1
            and values.shape[0] == tokenizer.config.get("vocab_size")
            and name.endswith(INPUT_EMBEDDING_SUFFIXES + OUTPUT_EMBEDDING_SUFFIXES)
        ):
            values = values[keep]
        tensors[name] = values.to(tensor.dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model_config = json.loads((base / "config.json").read_text())
    model_config["vocab_size"] = len(keep)
    for role in ("bos", "eos", "pad"):
        value = model_config.get(f"{role}_token_id")
        if isinstance(value, int):
            model_config[f"{role}_token_id"] = new_id.get(value)
    (out / "config.json").write_text(json.dumps(model_config, indent=1))


def merge(config: dict, workdir: Path, name: str) -> Path:
    path = workdir / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = workdir / f"merged-{name}"
    shutil.rmtree(out, ignore_errors=True)
    command = [str(Path(sys.executable).with_name("mergekit-yaml")), str(path), str(out), "--copy-tokenizer"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return out


def row_error(merged: Path, base: Path, ids: list[int]) -> float:
    merged_t, base_t = load_tensors(merged), load_tensors(base)
    names = [n for n in base_t if n.endswith(INPUT_EMBEDDING_SUFFIXES + OUTPUT_EMBEDDING_SUFFIXES)]
    diff = sum(float((merged_t[n][ids].float() - base_t[n][ids].float()).norm() ** 2) for n in names)
    norm = sum(float(base_t[n][ids].float().norm() ** 2) for n in names)
    return math.sqrt(diff / norm)


def bits_per_byte(model: Path, text: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    net = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    ids = tokenizer(text, add_special_tokens=False).input_ids[:4096]
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 511):
            window = torch.tensor([ids[start : start + 512]])
            if window.shape[1] < 2:
                continue
            logits = net(window).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    used = tokenizer.decode(ids, skip_special_tokens=False)
    return total / math.log(2) / len(used.encode())


def formatted_text(model: Path, text: str) -> str:
    """The text as chat turns when the model has a chat template, so its special tokens occur."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    if not tokenizer.chat_template:
        return text
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": p} for i, p in enumerate(paragraphs)]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def run(base: Path, tokens: list[str], text: str, workdir: Path, inits: list[str], noise: float) -> list[dict]:
    sibling = workdir / "sibling"
    make_sibling(base, sibling, tokens, noise)
    ids = [read_tokenizer(base).spec.vocab[token] for token in tokens]
    chat = formatted_text(base, text)
    results = [{"init": "-", "method": "base alone", "row_error": 0.0, "bits_per_byte": bits_per_byte(base, chat)}]
    for init in inits:
        for method, weight in (("linear", 0.5), ("task_arithmetic", 1.0)):
            config = {
                "merge_method": method,
                "base_model": str(base),
                "dtype": "float32",
                "models": [{"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(sibling), "parameters": {"weight": weight}}],
            }
            aligned = workdir / f"aligned-{init}"
            source = workdir / "merge.yaml"
            import yaml

            source.write_text(yaml.safe_dump(config, sort_keys=False))
            summary, code = align_mergekit(AlignOptions(config=source, out_dir=aligned, init=init, overwrite=True))
            assert code == 0, summary
            merged = merge(yaml.safe_load((aligned / "merge.yaml").read_text()), workdir, f"{init}-{method}")
            results.append(
                {"init": init, "method": method, "row_error": row_error(merged, base, ids), "bits_per_byte": bits_per_byte(merged, chat)}
            )
            print(
                f"  {init:>6} {method:<16} row error {results[-1]['row_error']:.3f}  bits/byte {results[-1]['bits_per_byte']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    return results


def table(results: list[dict]) -> str:
    lines = ["| init | merge | row error of base-only tokens | bits / byte |", "| --- | --- | ---: | ---: |"]
    for r in results:
        label = "donor (the ideal: base rows kept)" if r["init"] == "donor" else r["init"]
        lines.append(f"| {label} | {r['method']} | {r['row_error'] * 100:.1f} % | {r['bits_per_byte']:.3f} |")
    return "\n".join(lines)


def build_demo(workdir: Path, text: str, steps: int) -> tuple[Path, list[str]]:
    """init_quality.py's tiny trained Llama, with two chat tokens added (their rows trained
    for a few more steps on chat-formatted text) and a chat template that uses them."""
    sys.path.insert(0, str(HERE))
    import init_quality

    model, _ = init_quality.build_demo(workdir / "demo", text, steps)
    tokens = ["<|im_start|>", "<|im_end|>"]
    tokenizer_json = json.loads((model / "tokenizer.json").read_text())
    next_id = len(set(tokenizer_json["model"]["vocab"]) | {entry["content"] for entry in tokenizer_json["added_tokens"]})
    for offset, token in enumerate(tokens):
        tokenizer_json["added_tokens"].append(
            {
                "id": next_id + offset,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (model / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = AutoModelForCausalLM.from_pretrained(str(model))
    net.resize_token_embeddings(next_id + len(tokens), mean_resizing=False)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ids = torch.tensor(tokenizer(formatted_text(model, text), add_special_tokens=False).input_ids)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(max(1, steps // 3)):
        starts = torch.randint(0, max(1, len(ids) - 64), (16,))
        batch = torch.stack([ids[s : s + 64] for s in starts])
        net(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    net.save_pretrained(str(model))
    return model, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the base: a directory or Hub repo id with trained special tokens")
    parser.add_argument("--tokens", nargs="+", help="the base-only tokens (default: those its chat template writes out)")
    parser.add_argument("--text", type=Path, default=HERE / "sample_text.txt")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge_tools_merge_fidelity"))
    parser.add_argument("--init", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--noise", type=float, default=0.02, help="the sibling's perturbation, in standard deviations of each tensor")
    parser.add_argument("--demo", action="store_true", help="train a tiny model offline and use it")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the --demo model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.demo:
        base, tokens = build_demo(args.workdir, text, args.steps)
    elif args.model:
        base = resolve_model(args.model, None)
        tokens = args.tokens or chat_tokens(base)
    else:
        parser.error("give --model M, or --demo")
    if not tokens:
        parser.error("the base has no special tokens in its chat template: name them with --tokens")
    results = run(base, tokens, text, args.workdir, args.init, args.noise)
    print(f"base-only tokens: {', '.join(tokens)}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
