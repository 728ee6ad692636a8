#!/usr/bin/env python3
"""Transplants across tokenizer families, side by side with mergekit-tokensurgeon.

    python benchmarks/transplant.py --a DIR_A --b DIR_B [--text FILE ...] [--held-out]
                                    [--init fvt mean omp auto] [--surgeon subword omp]
                                    [--skip-surgeon-omp A-B] [--json FILE]

Both directions: A onto B's tokenizer (B is the donor: `--init omp` and tokensurgeon take
B's rows as the basis) and B onto A's. Each contender runs as its own process (wall time
and peak RSS of that process); every output is evaluated on each text, encoded by the
output's tokenizer, next to the original model on its own tokenizer:

  bits/byte      total NLL over the text's UTF-8 bytes (comparable across tokenizers)
  ratio          bits/byte over the original's
  mass on init   at positions whose next token has a copied row, the mean probability the
                 model puts on initialised rows (rows it had no trained row for): what
                 guessed rows steal from the tokens the model knows
  natural        the same mass for the target model itself (it owns those tokens) on the
                 same rows and text: the rate a transplant's mass should come close to
  choice         what --init auto chose (remap_report.json's init_auto)

--held-out adds two texts from this Python's standard library, which no one here wrote and
the calibration was not tuned on: Lib/textwrap.py (code) and pydoc_data's "execmodel" topic
(English prose). --init auto was tuned on its built-in text and benchmarks/sample_text.txt.

"Initialised" is each tool's own account: ours from remap_report.json (every row not
copied or moved), tokensurgeon's from its own rule (tokens of the donor whose normalized
form the model lacks: mergekit.tokenizer.normalization, as it decides). Needs mergekit
(requirements-e2e.txt). `benchmarks/fetch_real_models.py` makes SmolLM2-135M and
Gemma-3-270M available offline.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# A small process runs the command and reports its children's peak RSS: measured from this
# (large) process, a child's ru_maxrss would start at this process's RSS at fork time.
PEAK_RSS_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def run_measured(argv: list[str], log: Path) -> tuple[float, float]:
    """Run a command to completion: (wall seconds, peak RSS in MB of its largest process)."""
    rss_file = log.with_suffix(".rss")
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.call(
            [sys.executable, "-c", PEAK_RSS_WRAPPER, str(rss_file), *argv], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    if code != 0:
        raise RuntimeError(f"{argv[:3]}... failed ({code}); see {log}:\n{log.read_text()[-2000:]}")
    return time.monotonic() - started, int(rss_file.read_text()) / 1024


def ours(model: Path, target: Path, out: Path, init: str, omp_k: int) -> tuple[float, float, set[int], str]:
    argv = [sys.executable, str(ROOT / "remap_tokenizer.py"), "--src_model", str(model), "--base_tokenizer", str(target)]
    argv += ["--out_dir", str(out), "--drop-extra", "--init", init, "--overwrite", "--omp-k", str(omp_k)]
    seconds, rss = run_measured(argv, out.with_suffix(".log"))
    report = json.loads((out / "remap_report.json").read_text())
    return seconds, rss, {entry["id"] for entry in report["plan"]["initialised"]}, auto_choice(report.get("init_auto"))


def auto_choice(auto: dict | None) -> str:
    """What --init auto chose, in a few words."""
    if not auto:
        return ""
    if auto["chose"] != "calibrated":
        return auto["chose"]
    return f"lambda {auto['lambda']:g}, alpha {auto['alpha']:g}" + (" (untied)" if auto["untied"] else "")


def surgeon(model: Path, target: Path, out: Path, method: str, omp_k: int) -> tuple[float, float, set[int], str]:
    shutil.rmtree(out, ignore_errors=True)
    executable = Path(sys.executable).with_name("mergekit-tokensurgeon")
    argv = [str(executable), str(model), str(target), str(out), "-a", method, "-k", str(omp_k), "--no-write-model-card"]
    seconds, rss = run_measured(argv, out.with_suffix(".log"))
    return seconds, rss, surgeon_initialised(model, target), ""


def held_out_texts(workdir: Path) -> list[Path]:
    """Lib/textwrap.py and pydoc_data's execmodel topic, written to workdir."""
    import textwrap
    from pydoc_data.topics import topics

    code, prose = workdir / "textwrap.py", workdir / "execmodel.txt"
    code.write_text(Path(textwrap.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    prose.write_text(topics["execmodel"], encoding="utf-8")
    return [code, prose]


def surgeon_initialised(model: Path, donor: Path) -> set[int]:
    """The donor's ids that tokensurgeon approximates: its normalized form is not in the
    model's normalized vocabulary (build_embedding_matrix, without prefix or byte match)."""
    from mergekit.tokenizer.normalization import normalized_vocabulary
    from transformers import AutoTokenizer

    have = normalized_vocabulary(AutoTokenizer.from_pretrained(model))
    return {i for token, i in normalized_vocabulary(AutoTokenizer.from_pretrained(donor)).items() if token not in have}


def evaluate(model_dir: Path, text: str, initialised: set[int], max_length: int) -> tuple[float, float]:
    """(bits per byte, mean probability on initialised rows at positions whose target row
    was copied) over non-overlapping windows, each starting with bos when there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = max_length - len(prefix)
    vocab_rows = model.get_output_embeddings().weight.shape[0]
    init_mask = torch.zeros(vocab_rows, dtype=torch.bool)
    init_mask[[i for i in initialised if i < vocab_rows]] = True
    total, mass, mass_positions = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), step):
            window = torch.tensor([prefix + ids[start : start + step]])
            if window.shape[1] < 2:
                continue
            logits = model(window).logits[0, :-1].float()
            targets = window[0, 1:]
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            known = ~init_mask[targets]
            if known.any():
                probabilities = logits[known].softmax(dim=-1)
                mass += probabilities[:, init_mask].sum().item()
                mass_positions += int(known.sum())
    return total / math.log(2) / len(text.encode()), mass / max(1, mass_positions)


def directions(a: Path, b: Path) -> list[tuple[str, Path, Path]]:
    return [(f"{a.name} -> {b.name}'s tokenizer", a, b), (f"{b.name} -> {a.name}'s tokenizer", b, a)]


def contenders(args: argparse.Namespace, label: str) -> list[tuple[str, str, str]]:
    """(tool, method, display name) to run for one direction."""
    found = [("ours", init, f"ours {init}") for init in args.init]
    for method in args.surgeon:
        if method == "omp" and label in args.skip_surgeon_omp:
            continue
        found.append(("surgeon", method, f"tokensurgeon {method}" + (f" (k {args.omp_k})" if method == "omp" else "")))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True, help="a model directory")
    parser.add_argument("--b", type=Path, required=True, help="a model directory of another tokenizer family")
    parser.add_argument("--text", type=Path, nargs="+", help="texts to evaluate on (default: sample_text.txt unless --held-out)")
    parser.add_argument("--held-out", action="store_true", help="add textwrap.py and the execmodel topic (see above)")
    parser.add_argument("--init", nargs="*", default=["fvt", "mean", "omp", "auto"], help="our --init methods")
    parser.add_argument("--surgeon", nargs="*", default=["subword", "omp"], choices=["subword", "omp", "mean"])
    parser.add_argument(
        "--skip-surgeon-omp", nargs="*", default=[], help="directions (MODEL-TARGET, by folder name) where tokensurgeon omp is not run"
    )
    parser.add_argument("--omp-k", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256, help="evaluation window in tokens")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge_tools_transplant"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = (args.text or ([] if args.held_out else [HERE / "sample_text.txt"])) + (held_out_texts(args.workdir) if args.held_out else [])
    texts = {path.name: path.read_text(encoding="utf-8") for path in paths}
    natural: dict[tuple, float] = {}
    results = []
    for label, model, target in directions(args.a.resolve(), args.b.resolve()):
        short = f"{model.name}-{target.name}"
        originals = {name: evaluate(model, text, set(), args.max_length)[0] for name, text in texts.items()}
        for text_name, bpb in originals.items():
            results.append({"direction": label, "text": text_name, "contender": "original (own tokenizer)", "bits_per_byte": bpb})
        for tool, method, name in contenders(args, short):
            out = args.workdir / f"{model.name}-to-{target.name}-{tool}-{method}"
            print(f"{short}: {name} ...", file=sys.stderr, flush=True)
            seconds, rss, initialised, choice = (ours if tool == "ours" else surgeon)(model, target, out, method, args.omp_k)
            run = {"direction": label, "contender": name, "choice": choice, "initialised_rows": len(initialised)}
            run |= {"seconds": seconds, "peak_rss_mb": rss}
            for text_name, text in texts.items():
                results.append(evaluated(run, out, target, text_name, text, initialised, originals[text_name], natural, args.max_length))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def evaluated(
    run: dict, out: Path, target: Path, text_name: str, text: str, initialised: set[int], original: float, natural: dict, max_length: int
) -> dict:
    """One contender's row for one text; the target's natural mass on the same rows (cached)."""
    bpb, mass = evaluate(out, text, initialised, max_length)
    key = (str(target), text_name, frozenset(initialised))
    if key not in natural:
        natural[key] = evaluate(target, text, initialised, max_length)[1]
    row = {**run, "text": text_name, "bits_per_byte": bpb, "ratio": bpb / original, "mass_on_initialised": mass}
    row["natural_mass"] = natural[key]
    print(
        f"  {text_name}: {bpb:.3f} bits/byte, mass on init {mass:.3f} (natural {natural[key]:.3f}), {run['seconds']:.0f} s {run['choice']}",
        file=sys.stderr,
        flush=True,
    )
    return row


def table(results: list[dict]) -> str:
    lines = [
        "| direction | text | contender | bits/byte | ratio | mass on init | natural | initialised rows | wall (s) | peak RSS (MB) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "ratio" not in r:
            lines.append(f"| {r['direction']} | {r['text']} | {r['contender']} | {r['bits_per_byte']:.3f} | 1.00 | - | - | - | - | - |")
            continue
        name = r["contender"] + (f" ({r['choice']})" if r["choice"] else "")
        lines.append(
            f"| {r['direction']} | {r['text']} | {name} | {r['bits_per_byte']:.3f} | {r['ratio']:.2f} "
            f"| {r['mass_on_initialised']:.3f} | {r['natural_mass']:.3f} | {r['initialised_rows']:,} | {r['seconds']:.0f} "
            f"| {r['peak_rss_mb']:,.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
