"""safetensors headers and shard indexes, read strictly (as the safetensors library refuses
them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from merge_tools.common.errors import CliError
from merge_tools.common.sources import file_in_model_dir
from merge_tools.common.strict_json import escape_text, is_int, parse_json, read_json

DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "C64": 8,
}


def check_safetensors_header(header: Any, data_size: int | None, where: object) -> dict[str, Any]:
    """The tensors of a safetensors header, refused as the safetensors library refuses them
    (unknown dtype, a shape that is not a list of non-negative integers, data_offsets that
    disagree with shape x dtype size, overlap, leave a hole or do not end where the file
    does) before anything is written. data_size None: the file size is not known."""
    if not isinstance(header, dict):
        raise CliError(f"{where}: corrupt safetensors header (not a JSON object); re-download it")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise CliError(f"{where}: __metadata__ must map names to strings; re-download the file")
            continue
        if not isinstance(info, dict):
            raise CliError(f"{where}: the header entry of tensor {escape_text(name)!r} is not an object; re-download the file")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise CliError(
                f"{where}: tensor {escape_text(name)!r} has the unknown dtype "
                f"{dtype!r} (known: {', '.join(DTYPE_SIZES)}); re-download the file"
            )
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise CliError(
                f"{where}: tensor {escape_text(name)!r} has the shape {shape!r}, not a list of non-negative integers; re-download the file"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets)) and 0 <= offsets[0] <= offsets[1]):
            raise CliError(f"{where}: tensor {escape_text(name)!r} has invalid data_offsets {offsets!r}; re-download the file")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise CliError(
                f"{where}: tensor {escape_text(name)!r} ({dtype} {shape}) takes {expected} "
                f"bytes, its data_offsets give {offsets[1] - offsets[0]}; re-download the file"
            )
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            what = "overlaps the previous tensor" if start < position else "leaves a hole before it"
            raise CliError(
                f"{where}: tensor {escape_text(name)!r} {what} (data_offsets start at {start}, expected {position}); the file is corrupt"
            )
        position = end
    if data_size is not None and position != data_size:
        problem = "truncated download?" if position > data_size else "extra bytes after the last tensor"
        raise CliError(f"{where}: its tensors need {position} bytes of data, the file holds {data_size} ({problem}); re-download it")
    return {name: info for name, info in header.items() if name != "__metadata__"}


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(checked tensors of the header, absolute offset of the data) of a safetensors file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 2 or length > min(100_000_000, size - 8):
                raise CliError(f"{path}: not a safetensors file or truncated (header length {length}, file size {size}); re-download it")
            raw = handle.read(length)
    except OSError as exc:
        raise CliError(f"{path}: cannot read ({exc.strerror})") from exc
    return check_safetensors_header(parse_json(raw, path), size - 8 - length, path), 8 + length


def read_weight_index(index_path: Path, *, shards_present: bool = True) -> dict[str, str]:
    """tensor -> shard of a `*.index.json`: an object of strings whose shard names are plain
    file names beside it (and, unless shards_present is False, exist)."""
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CliError(f"{index_path}: no weight_map; re-download the file")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CliError(f"{index_path}: the shard of tensor {escape_text(tensor)!r} is {shard!r}, not a file name; re-download the file")
        path = file_in_model_dir(index_path.parent, shard, index_path)
        if shards_present and not path.is_file():
            raise CliError(f"{index_path}: names shard {shard!r}, which is missing; re-download the model")
    return weight_map
