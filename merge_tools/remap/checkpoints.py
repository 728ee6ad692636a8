"""Checkpoints in: headers, vocabulary tensors (every per-token tensor), rows read safely."""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merge_tools.common.errors import CliError
from merge_tools.common.logs import log
from merge_tools.common.safetensors_files import read_safetensors_header, read_weight_index
from merge_tools.common.sources import (
    BIN_INDEX,
    CONFIG_FILES,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    file_in_model_dir,
    hub_offline,
    looks_like_hub_id,
    resolve_source,
    select_weight_files,
)
from merge_tools.common.vocab_tensors import (
    INPUT_EMBEDDING_SUFFIXES,
    OUTPUT_EMBEDDING_SUFFIXES,
    per_token_name,
    vocab_axis_last,
    vocab_tensors_off,
)


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of a checkpoint: in the source, where its bytes are; in the output plan,
    also whether its rows are rebuilt (vocab_role) or its source bytes copied."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path | None = None  # the source file (safetensors or .bin)
    start: int = 0  # absolute byte offset of the data in a safetensors file
    vocab_role: str | None = None  # embed | head | bias: rows are rebuilt from the plan
    source: str | None = None  # the source tensor whose rows it takes, when not its own (a tied model's new lm_head)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's tensors, from its headers (or, for .bin, memory-mapped torch tensors)."""

    directory: Path
    kind: str  # safetensors | bin
    tensors: dict[str, TensorEntry]  # in file, then offset order
    bin_tensors: dict[str, Any] = field(default_factory=dict)  # name -> torch.Tensor (mmap)


@dataclass(frozen=True)
class VocabTensors:
    embed: str
    head: str | None  # None: tied to the input embedding
    bias: str | None
    rows: int
    hidden: int
    how: str  # names | meta | override | shape
    extra: tuple[str, ...] = ()  # every other tensor with a row per token (extra_vocab_tensors)


def extra_vocab_tensors(shapes: Mapping[str, tuple[int, ...]], rows: int, known: Iterable[str | None], where: Path) -> tuple[str, ...]:
    """The tensors besides embed/head/bias that carry the vocabulary, which the remap
    must permute with the same plan: those whose first dimension (last, for [1, V]) is the
    embedding's row count and whose name says they are per token, or that share their
    weight's name (`lm_head.weight_scale`, `lm_head.SCB` follow `lm_head.weight`). A
    tensor that has those rows without such a name, or a second input embedding with
    other rows (Gemma-3n's per-layer embedding of 262,144 rows under 262,400 tokens), is
    refused: copied unpermuted it would silently point at the wrong tokens."""
    known = {name for name in known if name is not None}
    stems = {name.rsplit(".", 1)[0] for name in known}
    extra = []
    for name, shape in shapes.items():
        if name in known:
            continue
        per_token = per_token_name(name)
        has_rows = (len(shape) >= 1 and shape[0] == rows) or vocab_axis_last(shape, rows)
        if has_rows and (per_token or name.rsplit(".", 1)[0] in stems):
            extra.append(name)
        elif has_rows:
            raise CliError(
                f"{where}: tensor {name} {list(shape)} has one row per token ({rows}) but its name does not say what it is; "
                "refusing to copy it unpermuted (it would point at the wrong tokens)"
            )
    off = vocab_tensors_off(shapes, rows)
    if off:
        name, count = off[0]
        raise CliError(
            f"{where}: tensor {name} {list(shapes[name])} is a vocabulary tensor with {count} rows, "
            f"not the embedding's {rows}; refusing to remap a model whose vocabulary tensors disagree"
        )
    return tuple(extra)


TORCH_DTYPE_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
}


def read_checkpoint(directory: Path) -> Checkpoint:
    kind, files = select_weight_files(p.name for p in directory.iterdir() if p.is_file())
    if kind == "none":
        raise CliError(f"{directory}: no weights (expected model*.safetensors or pytorch_model*.bin)")
    expected: dict[str, str] = {}
    if files[0].endswith(".index.json"):
        expected = read_weight_index(directory / files[0])
        files = list(dict.fromkeys(expected.values()))
    if kind == "bin":
        return read_bin_checkpoint(directory, files, expected)
    tensors: dict[str, TensorEntry] = {}
    for name in files:
        path = file_in_model_dir(directory, name, directory)
        header, data_start = read_safetensors_header(path)
        for tensor, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            tensors[tensor] = TensorEntry(tensor, info["dtype"], tuple(info["shape"]), end - start, path, data_start + start)
        for tensor, file in expected.items():
            if file == name and tensor not in header:
                raise CliError(f"{directory / SAFETENSORS_INDEX}: tensor {tensor!r} should be in {name} but is not; re-download the model")
    return Checkpoint(directory, "safetensors", tensors)


def torch_uint8() -> Any:
    import torch

    return torch.uint8


def read_bin_checkpoint(directory: Path, files: Sequence[str], expected: Mapping[str, str]) -> Checkpoint:
    """pytorch_model*.bin through torch.load(weights_only=True): never unpickles code."""
    import pickle

    import torch

    tensors: dict[str, TensorEntry] = {}
    bin_tensors: dict[str, Any] = {}
    for name in files:
        path = file_in_model_dir(directory, name, directory)
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (pre-zip) format cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CliError(
                f"{path}: torch.load(weights_only=True) refuses it (it pickles objects other than tensors); "
                "this script never runs code from a checkpoint: convert it to safetensors with a tool you trust"
            ) from exc
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise CliError(f"{path}: cannot read the checkpoint ({str(exc).splitlines()[0]}); re-download it") from exc
        if not isinstance(state, Mapping):
            raise CliError(f"{path}: not a state dict")
        seen_storage: dict[tuple[int, int], str] = {}
        for tensor_name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if key in seen_storage and tensor_name.endswith(OUTPUT_EMBEDDING_SUFFIXES):
                continue  # a tied lm_head saved as a second name for the embedding
            seen_storage[key] = tensor_name
            dtype = TORCH_DTYPE_NAMES.get(str(tensor.dtype).removeprefix("torch."))
            if dtype is None:
                raise CliError(f"{path}: tensor {tensor_name!r} has dtype {tensor.dtype}, which safetensors cannot store")
            tensors[tensor_name] = TensorEntry(tensor_name, dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size(), path, 0)
            bin_tensors[tensor_name] = tensor
        for tensor_name, file in expected.items():
            if file == name and tensor_name not in state:
                raise CliError(f"{directory / BIN_INDEX}: tensor {tensor_name!r} should be in {name} but is not; re-download the model")
    return Checkpoint(directory, "bin", tensors, bin_tensors)


def config_value(config: Mapping[str, Any], *keys: str) -> Any:
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    for key in keys:
        if key in config:
            return config[key]
        if key in text:
            return text[key]
    return None


def pick_by_suffix(shapes: Mapping[str, tuple[int, ...]], suffixes: Sequence[str], hidden: int | None) -> list[str]:
    candidates = [n for n, s in shapes.items() if len(s) == 2 and n.endswith(suffixes)]
    if hidden and len(candidates) > 1:
        candidates = [n for n in candidates if shapes[n][1] == hidden] or candidates
    if len(candidates) > 1:  # multimodal checkpoints carry deeper `embeddings`: prefer the shallowest
        depth = min(n.count(".") for n in candidates)
        candidates = [n for n in candidates if n.count(".") == depth]
    return candidates


def vocab_tensors_from_meta(
    config_dir: Path, shapes: Mapping[str, tuple[int, ...]], trust_remote_code: bool
) -> tuple[str, str | None] | None:
    """Ask transformers which parameters are the input/output embeddings, instantiating the
    model class on the meta device (no memory), and match them to checkpoint keys."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # unknown architecture, remote code refused, ...
        log.debug("meta-device instantiation failed: %s", exc)
        return None
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)

    def checkpoint_key(weight: Any) -> str | None:
        for param in names.get(id(weight), []) if weight is not None else []:
            parts = param.split(".")
            for i in range(len(parts)):  # checkpoints may drop or add a prefix (`model.`, ...)
                suffix = ".".join(parts[i:])
                hits = [k for k in shapes if k == suffix or k.endswith("." + suffix)]
                if len(hits) == 1:
                    return hits[0]
        return None

    embed_weight = getattr(model.get_input_embeddings(), "weight", None)
    head_weight = getattr(model.get_output_embeddings(), "weight", None)
    embed = checkpoint_key(embed_weight)
    head = checkpoint_key(head_weight) if head_weight is not None and head_weight is not embed_weight else None
    return (embed, head) if embed else None


def find_vocab_tensors(
    ckpt: Checkpoint, config: Mapping[str, Any], *, embed_name: str | None, head_name: str | None, trust_remote_code: bool
) -> VocabTensors:
    """Which tensors hold vocabulary rows: known names first (microseconds, and checked
    against transformers in the tests), then transformers' own answer from a meta-device
    model, then the overrides' hint."""
    shapes = {name: t.shape for name, t in ckpt.tensors.items()}
    hidden = config_value(config, "hidden_size", "n_embd", "d_model")
    how = "override" if embed_name else "names"
    for name in (embed_name, head_name):
        if name is not None and name not in shapes:
            raise CliError(f"{ckpt.directory}: no tensor named {name!r} in the checkpoint")
    if embed_name is None:
        embeds = pick_by_suffix(shapes, INPUT_EMBEDDING_SUFFIXES, hidden)
        heads = pick_by_suffix(shapes, OUTPUT_EMBEDDING_SUFFIXES, hidden)
        if len(embeds) == 1 and len(heads) <= 1:
            embed_name, head_name = embeds[0], (head_name or (heads[0] if heads else None))
        else:
            found = vocab_tensors_from_meta(ckpt.directory, shapes, trust_remote_code)
            if found is None:
                rows = config_value(config, "vocab_size")
                matrices = sorted((n for n, s in shapes.items() if len(s) == 2), key=lambda n: (shapes[n][0] != rows, -shapes[n][0], n))
                candidates = ", ".join(matrices[:6]) or "none"
                raise CliError(
                    f"{ckpt.directory}: cannot tell which tensor is the input embedding (2-D candidates: {candidates}); "
                    "pass --embed-name NAME (and --head-name NAME unless the embeddings are tied)"
                )
            embed_name, head_name, how = found[0], head_name or found[1], "meta"
    if len(shapes[embed_name]) != 2:
        raise CliError(f"{ckpt.directory}: {embed_name} has shape {list(shapes[embed_name])}, not [rows, hidden]")
    if head_name is None and config_value(config, "tie_word_embeddings") is False:
        raise CliError(
            f"{ckpt.directory}: config.json says tie_word_embeddings: false, but the checkpoint has no output embedding (lm_head); "
            "the checkpoint is incomplete: re-download it (or pass --head-name NAME)"
        )
    rows, width = shapes[embed_name]
    bias = None
    if head_name is not None:
        head_shape = shapes[head_name]
        if len(head_shape) != 2 or head_shape[0] != rows or head_shape[1] != width:
            raise CliError(
                f"{ckpt.directory}: {embed_name} is {list(shapes[embed_name])} but {head_name} is {list(head_shape)}; "
                "input and output embeddings must have the same rows and hidden size"
            )
        candidate = head_name.removesuffix(".weight") + ".bias"
        if candidate in shapes:
            if shapes[candidate] != (rows,):
                raise CliError(f"{ckpt.directory}: {candidate} has shape {list(shapes[candidate])}, expected [{rows}]")
            bias = candidate
    extra = extra_vocab_tensors(shapes, rows, (embed_name, head_name, bias), ckpt.directory)
    return VocabTensors(embed_name, head_name, bias, rows, width, how, extra)


ENCODER_DECODER_TENSORS = re.compile(r"(^|\.)(shared\.weight|encoder\.embed_tokens\.weight|decoder\.embed_tokens\.weight)$")


def refuse_encoder_decoder(config: Mapping[str, Any], ckpt: Checkpoint) -> None:
    """BART, Marian, T5 and the like share one vocabulary between an encoder and a decoder
    (`shared.weight`, both `embed_tokens`, `final_logits_bias`): this tool remaps causal
    LMs, and half a remap of them would be a silently broken model."""
    shared = sorted(name for name in ckpt.tensors if ENCODER_DECODER_TENSORS.search(name))
    if config.get("is_encoder_decoder") is True or shared:
        what = f" (it has {', '.join(shared[:3])})" if shared else " (config.json: is_encoder_decoder)"
        raise CliError(
            f"{ckpt.directory}: an encoder-decoder checkpoint{what}; this tool remaps decoder-only causal LMs, "
            "and remapping half of its vocabulary tensors would break it"
        )


def read_matrix(ckpt: Checkpoint, tensor: TensorEntry, rows: int | None = None) -> np.ndarray:
    """A vocabulary tensor as a read-only (rows, row_bytes) uint8 array (`rows`: the
    vocabulary's, for a [1, V] tensor; default its first dimension), read into memory: one
    vocabulary matrix, not the shard. Not memory-mapped: a shard truncated while the remap
    runs (a download or a `git lfs pull` into the same folder) would kill the process with
    SIGBUS on the next page it touches, leaving the staging directory behind; a read
    fails with one line instead."""
    rows = rows if rows is not None else tensor.shape[0] if tensor.shape else 1
    if ckpt.kind == "bin":
        return ckpt.bin_tensors[tensor.name].contiguous().reshape(-1).view(torch_uint8()).numpy().reshape(rows, -1)
    matrix = anonymous_buffer(tensor.nbytes)
    if tensor.nbytes:
        read_exactly(tensor.file, tensor.start, memoryview(matrix), f"tensor {tensor.name}")
    matrix.flags.writeable = False
    return matrix.reshape(rows, -1)


def anonymous_buffer(nbytes: int) -> np.ndarray:
    """A zero-filled uint8 array of `nbytes` in its own anonymous mapping. Not np.empty:
    numpy advises transparent huge pages for large arrays, and where the kernel's THP
    defrag setting is `madvise` (a common default) every fault of such an array may
    compact memory first: reading two 0.5 GB vocabulary tensors that way made a 3.7 GB
    remap 1.2 x slower (the issue-30 slowdown), the source reads stalling behind it."""
    if not nbytes:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=np.uint8)


def read_exactly(path: Path, offset: int, view: memoryview, what: str) -> None:
    try:
        handle = path.open("rb", buffering=0)
    except OSError as exc:
        raise CliError(f"{path}: cannot read {what} ({exc.strerror}); was it removed while the remap ran? Run again") from exc
    with handle:
        done = 0
        while done < len(view):
            got = os.preadv(handle.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise CliError(f"{path}: ends inside {what}; the file is truncated: re-download it")
            done += got


def resolve_model(source: str, revision: str | None) -> Path:
    """A local model directory as it is; for a Hub repo, the snapshot in the Hugging Face
    cache holding its configs, tokenizer files and the weights in one format: the index
    and exactly the shards it names (never a second format, `original/*.pth` or `.gguf`)."""
    if Path(source).expanduser().exists() or not looks_like_hub_id(source):
        return resolve_source(source, revision, [])
    files = hub_repo_files(source, revision)
    if files is None:  # offline or unlisted: what the cached snapshot holds decides
        files = [p.name for p in resolve_source(source, revision, ["config.json"]).iterdir()]
    _kind, weights = select_weight_files(files)
    directory = resolve_source(source, revision, [*CONFIG_FILES, *TOKENIZER_FILES, *weights])
    if weights and weights[0].endswith(".index.json"):
        shards = sorted(set(read_weight_index(directory / weights[0], shards_present=False).values()))
        # the snapshot folder is named by its commit: the shards come from the same commit
        directory = resolve_source(source, directory.name, [*CONFIG_FILES, *TOKENIZER_FILES, *weights, *shards])
    return directory


def hub_repo_files(repo_id: str, revision: str | None) -> list[str] | None:
    """The files of a Hub repo at a revision, from its model info; None when
    the Hub cannot say (offline, unreachable, missing: resolve_source then says which).
    Model info, not the tree listing: huggingface_hub retries a listing for ~20 s."""
    if hub_offline():
        return None
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=revision)
    except Exception as exc:  # every HTTP, connection and validation error alike
        log.debug("cannot list %s: %s", repo_id, exc)
        return None
    return None if info.siblings is None else [sibling.rfilename for sibling in info.siblings]
