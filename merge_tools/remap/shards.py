"""The shard plan: sizes, file names, headers, and the output's tensors in order."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_tools.common.errors import CliError
from merge_tools.common.vocab_tensors import vocab_axis_last

if TYPE_CHECKING:
    from merge_tools.remap.checkpoints import Checkpoint, TensorEntry, VocabTensors


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class ShardPlan:
    """The output's shards: file names, each file's tensors in order, and the files that
    are the source's own shards unchanged (`links`: file -> the source file), which are
    linked, not written."""

    files: tuple[str, ...]
    tensors: tuple[tuple[TensorEntry, ...], ...]
    links: Mapping[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(entry.nbytes for shard in self.tensors for entry in shard)

    @property
    def written_size(self) -> int:
        """The bytes of tensors the remap writes (linked shards cost none)."""
        return sum(entry.nbytes for file, shard in zip(self.files, self.tensors) if file not in self.links for entry in shard)

    def weight_map(self) -> dict[str, str]:
        return {entry.name: file for file, shard in zip(self.files, self.tensors) for entry in shard}

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_size": self.total_size,
            "written_size": self.written_size,
            "shards": [
                {"file": f, "tensors": len(s), "bytes": sum(e.nbytes for e in s), **({"linked": True} if f in self.links else {})}
                for f, s in zip(self.files, self.tensors)
            ],
        }


def parse_size(text: str) -> int:
    """`5GB` (decimal), `500MB`, `2GiB` (binary) or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text), re.IGNORECASE)
    unit = match.group(2).upper() if match else None
    if not match or unit not in SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
    value = int(float(match.group(1)) * SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def human_bytes(count: int) -> str:
    """Decimal units, as --max-shard-size reads them."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def shard_file_names(count: int) -> tuple[str, ...]:
    if count == 1:
        return ("model.safetensors",)
    return tuple(f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1))


def plan_shards(entries: Sequence[TensorEntry], max_shard_size: int) -> ShardPlan:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes (a tensor
    larger than that gets a shard of its own), like transformers' save_pretrained."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    if not shards[-1]:
        shards.pop()
    return ShardPlan(shard_file_names(len(shards)), tuple(tuple(s) for s in shards))


def plan_linked_shards(ckpt: Checkpoint, entries: Sequence[TensorEntry], unchanged_rows: bool) -> ShardPlan:
    """The source's own shards, file by file and tensor by tensor in the source's order
    (`entries`: output_entries): a shard that holds no vocabulary tensor is linked; one that
    does is written, with its vocabulary tensors rebuilt (`unchanged_rows`: every row stays
    where it was, so that shard is linked too). Every tensor stays in exactly one file."""
    by_name = {entry.name: entry for entry in entries}
    files: dict[str, list[TensorEntry]] = {}
    for name, tensor in ckpt.tensors.items():
        files.setdefault(tensor.file.name if tensor.file is not None else "model.safetensors", []).append(by_name[name])
        extra = [e for e in entries if e.source == name]  # a tied model's new lm_head: beside its embedding
        files[next(reversed(files))].extend(extra)
    links = {}
    for file, shard in files.items():
        rebuilt = [entry for entry in shard if entry.vocab_role is not None]
        if not rebuilt or (unchanged_rows and all(entry.source is None for entry in rebuilt)):
            links[file] = next(ckpt.tensors[entry.name].file for entry in shard if entry.name in ckpt.tensors)
    return ShardPlan(tuple(files), tuple(tuple(shard) for shard in files.values()), links)


def safetensors_header(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `entries` back to
    back in order, padded with spaces so that the data starts 8-byte aligned."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata is not None else {}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return len(text).to_bytes(8, "little") + text


def output_entries(ckpt: Checkpoint, vocab: VocabTensors, n_rows: int, untie_head: str | None = None) -> list[TensorEntry]:
    """Every output tensor; vocabulary tensors (with their new row count) first, then the
    rest in source order: the shards that hold the vocabulary take longest to write (rows
    built, then read back and checked), so they start first. `untie_head`: a tied model
    gets an lm_head of that name, built from its embedding's rows, for mergekit to read; its
    config still says tied, as the model's did (transformers then ties it, as before, and so
    does the merged model when this model gives the merge its config)."""
    roles = {vocab.embed: "embed", vocab.head: "head", vocab.bias: "bias", **dict.fromkeys(vocab.extra, "rows")}
    entries = []
    for name, tensor in ckpt.tensors.items():
        role = roles.get(name)
        if role is not None:
            row_bytes = tensor.nbytes // max(1, vocab.rows)
            shape = (1, n_rows) if vocab_axis_last(tensor.shape, vocab.rows) else (n_rows, *tensor.shape[1:])
            tensor = dataclasses.replace(tensor, shape=shape, nbytes=n_rows * row_bytes, vocab_role=role)
        entries.append(tensor)
        if name == vocab.embed and vocab.head is None and untie_head is not None:
            if untie_head in ckpt.tensors:
                raise CliError(f"{ckpt.directory}: cannot untie its embeddings: it already holds a tensor {untie_head}")
            entries.append(dataclasses.replace(tensor, name=untie_head, vocab_role="head", source=name))
    return sorted(entries, key=lambda entry: entry.vocab_role is None)
