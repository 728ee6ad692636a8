"""The merge audit's reading: every model's weights streamed once, a tensor at a time, into
per-tensor sums."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_tools.common.errors import CliError, check_interrupt
from merge_tools.common.safetensors_files import DTYPE_SIZES, read_safetensors_header, read_weight_index
from merge_tools.common.sources import CONFIG_FILES, SAFETENSORS_INDEX, looks_like_hub_id, resolve_source
from merge_tools.common.vocab_tensors import per_token_name, token_count
from merge_tools.gate.audit import AUDIT_BLOCK_BYTES, AUDIT_DTYPES, AUDIT_WORKERS, GRAM_BY_DOTS, TensorSums, merge_weights, summarize_audit
from merge_tools.gate.reading import local_safetensors_files, read_tokenizer_infos
from merge_tools.gate.tokenizer_merge_audit import merge_names

if TYPE_CHECKING:
    import numpy as np

    from merge_tools.common.mergekit_config import ModelRef
    from merge_tools.gate.audit import MergeAudit
    from merge_tools.gate.comparison import Comparison
    from merge_tools.gate.reading import ResolvedSource, TokenizerInfo


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: file, absolute offset, dtype and shape."""

    file: Path
    start: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def stored_tensors(directory: Path) -> dict[str, StoredTensor]:
    """Every tensor of a local safetensors checkpoint, from its headers."""
    files = local_safetensors_files(directory)
    if not files:
        raise CliError(f"{directory}: --audit reads the weights, and there are no safetensors shards here")
    tensors = {}
    for file in files:
        header, data_start = read_safetensors_header(file)
        for name, entry in header.items():
            tensors[name] = StoredTensor(file, data_start + entry["data_offsets"][0], entry["dtype"], tuple(entry["shape"]))
    return tensors


def model_weights_dir(resolved: ResolvedSource) -> Path:
    """A model's directory with its safetensors: local as is; for a Hub repo, the shards its
    index names (else model.safetensors), downloaded from the commit the gate read into the
    Hub cache (the merge downloads them anyway; no other weight format)."""
    hub = looks_like_hub_id(resolved.name) and not Path(resolved.name).exists()
    if local_safetensors_files(resolved.directory, cached=hub):
        return resolved.directory
    if not hub:
        raise CliError(f"{resolved.directory}: --audit reads the weights, and there are no safetensors shards here")
    index = resolved.directory / SAFETENSORS_INDEX
    shards = sorted(set(read_weight_index(index, shards_present=False).values())) if index.is_file() else ["model.safetensors"]
    directory = resolve_source(resolved.name, resolved.directory.name, [*shards, *CONFIG_FILES])  # the snapshot's commit
    if not local_safetensors_files(directory, cached=True):
        raise CliError(f"{resolved.name}: --audit reads the weights, and the repo has no safetensors shards")
    return directory


def audit_plan(stored: Sequence[Mapping[str, StoredTensor]], vocabulary: set[str]) -> tuple[list[str], list[str]]:
    """(the tensors every model holds alike, in the first model's file order; why the
    others are skipped). Shapes that differ outside the vocabulary are the architecture
    check's to refuse; vocabulary tensors of different row counts are skipped."""
    first = stored[0]
    names, skipped = [], []
    elsewhere = dict.fromkeys(name for tensors in stored[1:] for name in tensors if name not in first)
    skipped += [f"{name}: not in every model" for name in elsewhere]
    for name in sorted(first, key=lambda n: (str(first[n].file), first[n].start)):
        entries = [tensors.get(name) for tensors in stored]
        if any(entry is None or entry.shape != first[name].shape for entry in entries):
            skipped.append(f"{name}: " + ("shapes differ" if name in vocabulary else "not in every model"))
        elif any(entry.dtype not in AUDIT_DTYPES for entry in entries if entry is not None):
            skipped.append(f"{name}: dtype {', '.join(sorted({e.dtype for e in entries if e is not None}))} is not compared")
        elif first[name].count:
            names.append(name)
    return names, skipped


def read_raw(handle: int, tensor: StoredTensor, first: int, count: int, raw: np.ndarray) -> np.ndarray:
    """The bytes of elements [first, first + count) of a tensor, read with pread into `raw`
    (not mmap: mapped pages count in RSS, and a file truncated meanwhile is a SIGBUS)."""
    size = DTYPE_SIZES[tensor.dtype]
    view, offset, done = memoryview(raw[: count * size]), tensor.start + first * size, 0
    while done < len(view):
        got = os.preadv(handle, [view[done:]], offset + done)
        if got <= 0:
            raise CliError(f"{tensor.file}: ended while reading it (truncated meanwhile?); re-download it")
        done += got
    return raw[: count * size]


def widen(raw: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """Raw values as float32 into `out`: bf16 by its bits (the high half of a float32)."""
    import numpy as np

    if dtype == "BF16":
        np.left_shift(raw.view(np.uint16), np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, raw.view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]), casting="unsafe")


def tensor_sums(
    name: str,
    stored: Sequence[Mapping[str, StoredTensor]],
    handles: Sequence[Mapping[Path, int]],
    reference: int | None,
    vocabulary: bool,
    progress: Callable[[int], None],
) -> TensorSums:
    """Stream one tensor through every model, a block at a time: each model's slice is read
    and computed while it is in the CPU cache (AUDIT_BLOCK_BYTES of float32 for all models:
    2.5x the speed of whole-tensor numpy, which is bound by memory bandwidth)."""
    import numpy as np

    tensors = [s[name] for s in stored]
    count, models = tensors[0].count, len(tensors)
    block = min(count, max(4096, AUDIT_BLOCK_BYTES // (4 * models)))
    raws = [np.empty(block * DTYPE_SIZES[t.dtype], dtype=np.uint8) for t in tensors]
    values = np.empty((models, block), dtype=np.float32)
    centre = np.empty(block, dtype=np.float32)
    moving = [k for k in range(models) if k != reference]  # the reference's own task vector is zero
    gram = np.zeros((models, models))
    reference_square = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # NaN and infinite weights: found below, named by the audit
        for first in range(0, count, block):
            check_interrupt()
            n = min(block, count - first)
            for k, tensor in enumerate(tensors):
                widen(read_raw(handles[k][tensor.file], tensor, first, n, raws[k]), tensor.dtype, values[k, :n])
            middle = np.mean(values[:, :n], axis=0, out=centre[:n]) if reference is None else values[reference, :n]
            for k in moving:
                np.subtract(values[k, :n], middle, out=values[k, :n])
            gram[np.ix_(moving, moving)] += task_vector_gram(
                values[moving, :n] if len(moving) > GRAM_BY_DOTS else [values[k, :n] for k in moving]
            )
            reference_square += float(np.dot(middle, middle))
            progress(sum(n * DTYPE_SIZES[t.dtype] for t in tensors))
    if np.isfinite(gram).all() and math.isfinite(reference_square):
        return TensorSums(name, gram, reference_square, vocabulary)
    broken = nonfinite_models(tensors, handles, raws, values[0])  # rare: read it again to name the models
    return TensorSums(name, np.zeros_like(gram), 0.0, vocabulary, nonfinite=broken, overflow=not broken)


def nonfinite_models(
    tensors: Sequence[StoredTensor], handles: Sequence[Mapping[Path, int]], raws: Sequence[np.ndarray], buffer: np.ndarray
) -> tuple[int, ...]:
    """The models whose values of one tensor hold a NaN or an infinity."""
    import numpy as np

    broken = []
    for k, tensor in enumerate(tensors):
        for first in range(0, tensor.count, len(buffer)):
            n = min(len(buffer), tensor.count - first)
            widen(read_raw(handles[k][tensor.file], tensor, first, n, raws[k]), tensor.dtype, buffer[:n])
            if not np.isfinite(buffer[:n]).all():
                broken.append(k)
                break
    return tuple(broken)


def task_vector_gram(rows: Any) -> np.ndarray:
    """<d_i, d_j> of a chunk's task vectors: a BLAS dot per pair for a few models (a GEMM
    of a few rows by millions of columns runs at a third of the speed), a GEMM for many."""
    import numpy as np

    if isinstance(rows, list):
        gram = np.zeros((len(rows), len(rows)))
        for i, j in itertools.combinations_with_replacement(range(len(rows)), 2):
            gram[i, j] = gram[j, i] = float(np.dot(rows[i], rows[j]))
        return gram
    return (rows @ rows.T).astype(np.float64)


def run_audit(
    names: Sequence[str],
    directories: Sequence[Path],
    vocabulary: Sequence[set[str]],
    base: str | None,
    weights: Mapping[str, float],
    conclusions: bool = True,
) -> MergeAudit:
    """Read every compared tensor of every model once (AUDIT_WORKERS tensors at a time),
    with a progress bar by bytes on stderr, and summarize (summarize_audit)."""
    stored = [stored_tensors(directory) for directory in directories]
    vocab_names = set().union(*vocabulary)
    tensor_names, skipped = audit_plan(stored, vocab_names)
    total = sum(DTYPE_SIZES[s[n].dtype] * s[n].count for n in tensor_names for s in stored)
    reference = list(names).index(base) if base is not None and base in names else None
    files = [{t.file for t in s.values()} for s in stored]
    handles = [{file: os.open(file, os.O_RDONLY) for file in model_files} for model_files in files]
    bar = AuditProgress(total)
    try:
        with ThreadPoolExecutor(AUDIT_WORKERS) as pool:
            sums = list(pool.map(lambda n: tensor_sums(n, stored, handles, reference, n in vocab_names, bar.update), tensor_names))
    finally:
        bar.close()
        for model_handles in handles:
            for handle in model_handles.values():
                os.close(handle)
    audit = summarize_audit(names, weights, sums, names[reference] if reference is not None else None, conclusions)
    return dataclasses.replace(audit, skipped=(*skipped, *audit.skipped), bytes_read=total)


class AuditProgress:
    """A tqdm bar by bytes on stderr (a terminal only), updated from the worker threads."""

    def __init__(self, total: int) -> None:
        self.lock = threading.Lock()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="audit", file=sys.stderr, leave=False)

    def update(self, done: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def vocabulary_tensor_names(info: TokenizerInfo) -> set[str]:
    """The tensors of a model that hold a row per token (reported apart by the audit)."""
    weights = info.weights
    if weights is None or weights.tensors is None or weights.rows is None:
        return set()
    return {n for n, (_, shape) in weights.tensors.items() if per_token_name(n) and token_count(shape, weights.rows) == weights.rows}


def audit_merge(
    config: Mapping[str, Any],
    source_of: Mapping[ModelRef, str],
    resolved: Sequence[ResolvedSource],
    infos: Sequence[TokenizerInfo],
    comparisons: Sequence[Comparison],
    audit_base: ResolvedSource | None = None,
) -> MergeAudit:
    """--audit: every model's task vector against the reference, from its weights: the
    base_model, or `audit_base` (--audit-base), else the mean of the models (then no
    conclusion on shares or pairs is drawn). Models the architecture check fails are
    refused with its message; a model with a LoRA is left out (the audit reads weights
    without it)."""
    for comparison in comparisons:
        failed = next((c for c in comparison.checks if c.name == "architecture" and c.status == "fail"), None)
        if failed is not None:
            raise CliError(f"--audit: {comparison.other}: {failed.summary} (the architecture check); nothing to compare tensor by tensor")
    names, name_of = merge_names(source_of, [r.source for r in resolved])
    lora = {name_of(str(ref)): ref.lora for ref in source_of if ref.lora}
    kept = [(name, r, info) for name, r, info in zip(names, resolved, infos) if name not in lora]
    notes = [f"{name} is not audited: the LoRA {adapter} is applied to it in the merge, not here" for name, adapter in lora.items()]
    base = name_of(config["base_model"]) if config.get("base_model") is not None else None
    if base in lora:
        notes.append(f"the base_model applies a LoRA ({lora[base]}): the reference is not the base; pass --audit-base MODEL")
        base = None
    if audit_base is not None:
        base = next((name for name, r, _ in kept if r.directory.resolve() == audit_base.directory.resolve()), None)
        if base is None:
            base = audit_base.source
            kept.append((base, audit_base, read_tokenizer_infos([audit_base], weights=True)[0]))
    conclusions = base is not None and str(config.get("merge_method", "")).lower() != "passthrough"
    if base is None:
        notes.append(
            "no base_model: task vectors are measured from the mean of the models, so shares and cosines say how the models "
            "differ from each other, not what each adds or whether their changes agree; pass --audit-base MODEL (the model "
            "they were fine-tuned from) for that"
        )
    elif not conclusions:
        notes.append("passthrough stacks layers and averages nothing: the figures describe the models, not the merge")
    directories = [model_weights_dir(r) for _, r, _ in kept]
    weights = {name: weight for name, weight in merge_weights(config, name_of).items() if name not in lora}
    vocabulary = [vocabulary_tensor_names(info) for _, _, info in kept]
    audit = run_audit([name for name, _, _ in kept], directories, vocabulary, base, weights, conclusions)
    return dataclasses.replace(audit, notes=tuple(notes))
