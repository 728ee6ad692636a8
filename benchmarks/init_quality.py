#!/usr/bin/env python3
"""How good are the initialised rows? Remap a model onto another tokenizer with every
--init method and --match mode, then measure it.

    python benchmarks/init_quality.py --model M --tokenizer T [--donor D] [--text FILE] [--workdir DIR]
    python benchmarks/init_quality.py --demo          # offline: trains a tiny model first

M, T and D are directories or Hub repo ids (benchmarks/fetch_real_models.py makes two real
families available offline). With --donor, `omp` (D's sparse codes applied to M's rows) and
`donor` (D's own rows; only when D's hidden size is M's) join the methods.

For each combination the model is remapped with --drop-extra (what a merge uses) and
evaluated on the text encoded by T; the original model is evaluated on the same text
encoded by its own tokenizer. Token-level NLL and perplexity depend on the tokenizer;
bits per byte (total NLL over the text's UTF-8 bytes) compares across tokenizers.

--demo builds everything offline: a 500-token byte-level BPE and a tiny Llama trained on
the text for --steps steps, and a target tokenizer that extends the vocabulary with 300
longer tokens, which the model has no rows for (the vocabulary-extension case).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from merge_tools.common.errors import CliError  # noqa: E402
from merge_tools.remap.checkpoints import resolve_model  # noqa: E402
from merge_tools.remap.matching import MATCH_MODES  # noqa: E402
from merge_tools.remap.options import RemapOptions  # noqa: E402
from merge_tools.remap.plan import INIT_METHODS  # noqa: E402
from merge_tools.remap.remap import remap  # noqa: E402


def nll(model_dir: Path, tokenizer_dir: Path, text: str, max_length: int) -> tuple[float, int]:
    """(total negative log-likelihood in nats, predicted tokens) over non-overlapping
    windows of the text, each starting with bos when the tokenizer has one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = max_length - len(prefix)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), step):
            window = torch.tensor([prefix + ids[start : start + step]])
            if window.shape[1] < 2:
                continue
            logits = model(window).logits[0, :-1].float()
            targets = window[0, 1:]
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    return total, count


def row(label: str, init: str, match: str, copied: object, initialised: object, total: float, count: int, n_bytes: int) -> dict:
    return {
        "model": label,
        "init": init,
        "match": match,
        "copied": copied,
        "initialised": initialised,
        "nll": total / count,
        "ppl": math.exp(total / count),
        "bits_per_byte": total / math.log(2) / n_bytes,
        "tokens": count,
    }


def evaluate(
    model: str,
    tokenizer: str,
    text: str,
    workdir: Path,
    inits: list[str],
    matches: list[str],
    max_length: int,
    donor: str | None = None,
    omp_k: int = 64,
) -> list[dict]:
    n_bytes = len(text.encode())
    model_dir = resolve_model(model, None)
    results = [row("original (own tokenizer)", "-", "-", "-", "-", *nll(model_dir, model_dir, text, max_length), n_bytes)]
    for match in matches:
        for init in inits:
            out = workdir / f"{init}-{match}"
            options = RemapOptions(
                src_model=model,
                base_tokenizer=tokenizer,
                out_dir=out,
                drop_extra=True,
                init=init,
                match=match,
                overwrite=True,
                donor_model=donor,
                omp_k=omp_k,
            )
            try:
                report = remap(options)
            except CliError as exc:  # e.g. donor rows of another width
                print(f"  {init:>5} {match:>5}: skipped ({exc})", file=sys.stderr, flush=True)
                continue
            counts = report["plan"]["counts"]
            label = f"remapped (match {match} -> {report['match_mode']})" if match == "auto" else "remapped"
            results.append(
                row(
                    label, init, match, counts["copied"] + counts["moved"], counts["initialised"], *nll(out, out, text, max_length), n_bytes
                )
            )
            print(f"  {init:>5} {match:>5}: bits/byte {results[-1]['bits_per_byte']:.3f}", file=sys.stderr, flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| model | init | match | copied rows | initialised rows | NLL / token | perplexity | bits / byte |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['init']} | {r['match']} | {r['copied']} | {r['initialised']} "
            f"| {r['nll']:.3f} | {r['ppl']:.2f} | {r['bits_per_byte']:.3f} |"
        )
    return "\n".join(lines)


def build_demo(workdir: Path, text: str, steps: int, seed: int = 0) -> tuple[Path, Path]:
    """A tiny Llama trained on `text` with a 500-token byte-level BPE, and a target that
    extends that vocabulary with 300 longer tokens (BPE training on the same text is
    greedy, so the first 500 tokens keep their ids): the vocabulary-extension case, where
    the quality of the new rows is all that differs between the init methods."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    lines = [line for line in text.splitlines() if line.strip()]

    def train(vocab_size: int) -> Tokenizer:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"], show_progress=False
        )
        tokenizer.train_from_iterator(lines, trainer)
        return tokenizer

    source, target = train(500), train(800)
    tokenizer_config = json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"})
    tokenizer_dir = workdir / "target-tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "tokenizer.json").write_text(target.to_str())
    (tokenizer_dir / "tokenizer_config.json").write_text(tokenizer_config)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=source.get_vocab_size(),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    ids = torch.tensor(source.encode(text).ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    context = 64
    for step in range(steps):
        starts = torch.randint(0, max(1, len(ids) - context), (16,))
        batch = torch.stack([torch.cat([torch.tensor([0]), ids[s : s + context - 1]]) for s in starts])
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"  training step {step}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model_dir = workdir / "model"
    model.save_pretrained(model_dir)
    (model_dir / "tokenizer.json").write_text(source.to_str())
    (model_dir / "tokenizer_config.json").write_text(tokenizer_config)
    return model_dir, tokenizer_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="directory or Hub repo id")
    parser.add_argument("--tokenizer", help="directory or Hub repo id")
    parser.add_argument("--donor", help="a model whose rows --init donor / omp use (directory or Hub repo id)")
    parser.add_argument("--omp-k", type=int, default=64)
    parser.add_argument("--text", type=Path, default=HERE / "sample_text.txt")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge_tools_init_quality"))
    parser.add_argument("--init", nargs="+", choices=INIT_METHODS, help="default: fvt mean unk zero, and omp donor with --donor")
    parser.add_argument("--match", nargs="+", default=["exact", "bytes"], choices=MATCH_MODES)
    parser.add_argument("--max-length", type=int, default=128, help="evaluation window in tokens")
    parser.add_argument("--demo", action="store_true", help="train a tiny model offline and use it")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the --demo model")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    if args.demo:
        model_dir, tokenizer_dir = build_demo(args.workdir, text, args.steps)
        args.model, args.tokenizer = str(model_dir), str(tokenizer_dir)
    if args.model is None or args.tokenizer is None:
        parser.error("give --model and --tokenizer, or --demo")
    inits = args.init or ["fvt", "mean", "unk", "zero", *(["omp", "donor"] if args.donor else [])]
    results = evaluate(
        args.model, args.tokenizer, text, args.workdir / "remapped", inits, args.match, args.max_length, args.donor, args.omp_k
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
