"""Row math: copies, means, FVT rows and combinations of rows, on raw bytes of any float
dtype (numpy)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from merge_tools.common.errors import CliError
from merge_tools.common.safetensors_files import DTYPE_SIZES
from merge_tools.remap.plan import FVT_ROW, GIVEN_ROWS, MEAN_ROW, ZERO_ROW

if TYPE_CHECKING:
    from merge_tools.remap.plan import RemapPlan


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # dtypes whose rows this script can average


ROW_CHUNK_BYTES = 8 * 2**20  # below glibc's largest mmap threshold, so chunk buffers are reused, not faulted in anew


FVT_BATCH_ROWS = 512


NONFINITE_MASK = {"F64": (8, 0x7FF0000000000000), "F32": (4, 0x7F800000), "F16": (2, 0x7C00), "BF16": (2, 0x7F80)}


def _uint_view(raw: np.ndarray, dtype: str) -> np.ndarray:
    width = NONFINITE_MASK[dtype][0]
    return raw.view({8: np.uint64, 4: np.uint32, 2: np.uint16}[width])


def nonfinite_rows(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Rows (of a (rows, row_bytes) uint8 matrix) holding a NaN or an infinity: all
    exponent bits set, tested on the integers, a row chunk at a time (cache-sized)."""
    bits = _uint_view(raw, dtype)
    mask = bits.dtype.type(NONFINITE_MASK[dtype][1])
    result = np.empty(len(raw), dtype=bool)
    step = max(1, ROW_CHUNK_BYTES // 8 // max(1, raw.shape[1]))
    for start in range(0, len(raw), step):
        # (x & mask) <= mask for every element, with equality only when all exponent bits are set
        result[start : start + step] = np.bitwise_and(bits[start : start + step], mask).max(axis=1) == mask
    return result


def decode_rows(raw: np.ndarray, dtype: str) -> np.ndarray:
    """(rows, row_bytes) uint8 -> (rows, hidden) float32 (float64 stays float64)."""
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "F64":
        return raw.view(np.float64)
    raise CliError(f"cannot compute initialised rows in dtype {dtype} (supported: {', '.join(FLOAT_DTYPES)})")


def encode_rows(values: np.ndarray, dtype: str) -> np.ndarray:
    """(rows, hidden) floats -> (rows, row_bytes) uint8, rounding to nearest even."""
    values = np.ascontiguousarray(values)
    if dtype == "BF16":
        single = values.astype(np.float32)
        bits = single.view(np.uint32)
        rounded = ((bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
        rounded[np.isnan(single)] = 0x7FC0
        encoded = rounded
    else:
        encoded = values.astype({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])
    return encoded.reshape(values.shape[0], -1).view(np.uint8)


def mean_of_rows(raw: np.ndarray, dtype: str, rows: np.ndarray) -> np.ndarray:
    """float64 mean of the selected rows, accumulated in chunks to bound memory."""
    hidden = raw.shape[1] // DTYPE_SIZES[dtype]
    total = np.zeros(hidden, dtype=np.float64)
    step = max(1, ROW_CHUNK_BYTES // max(1, raw.shape[1]))
    for start in range(0, len(rows), step):
        total += decode_rows(raw[rows[start : start + step]], dtype).sum(axis=0, dtype=np.float64)
    return total / max(1, len(rows))


def build_rows(
    src: np.ndarray,
    dtype: str,
    plan: RemapPlan,
    start: int,
    stop: int,
    mean_row: Callable[[], np.ndarray],
    finite: np.ndarray,
    given: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Output rows [start, stop) of one vocabulary matrix as raw bytes: copies gathered
    from `src`, FVT rows averaged from their (finite) parts, mean and zero rows, and the
    rows computed beforehand (`given`: sorted output rows and their bytes; donor, OMP and
    calibrated rows)."""
    sources = np.asarray(plan.row_source[start:stop], dtype=np.int64)
    out = src[np.maximum(sources, 0)] if len(src) else np.zeros((stop - start, src.shape[1]), np.uint8)
    if (sources >= 0).all():
        return out
    if given is not None:
        rows, values = given
        first, last = np.searchsorted(rows, [start, stop])
        out[rows[first:last] - start] = values[first:last]
    elif np.isin(sources, GIVEN_ROWS).any():  # a tensor the donor has no rows for (MTP, Medusa, ...)
        out[np.isin(sources, GIVEN_ROWS)] = mean_row()
    out[sources == ZERO_ROW] = 0
    if (sources == MEAN_ROW).any():
        out[sources == MEAN_ROW] = mean_row()
    if (sources == FVT_ROW).any():
        rows, offsets, flat = plan.fvt_csr
        first, last = np.searchsorted(rows, [start, stop])
        for batch in range(first, last, FVT_BATCH_ROWS):
            end = min(last, batch + FVT_BATCH_ROWS)
            averaged = fvt_average(
                src, dtype, flat[offsets[batch] : offsets[end]], offsets[batch : end + 1] - offsets[batch], finite, mean_row
            )
            out[rows[batch:end] - start] = averaged
    return out


def fvt_average(
    src: np.ndarray, dtype: str, parts: np.ndarray, offsets: np.ndarray, finite: np.ndarray, mean_row: Callable[[], np.ndarray]
) -> np.ndarray:
    """Raw rows, row k the float64 mean of the finite source rows parts[offsets[k]:offsets[k+1]]
    (the mean row when none is finite). Summed one part position at a time: rows have a
    handful of parts, and this is ~10x faster than numpy's reduceat over rows."""
    n = len(offsets) - 1
    owner = np.repeat(np.arange(n), np.diff(offsets))
    keep = finite[parts]
    parts, owner = parts[keep], owner[keep]
    counts = np.bincount(owner, minlength=n)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    sums = np.zeros((n, src.shape[1] // DTYPE_SIZES[dtype]), dtype=np.float64)
    for position in range(int(counts.max(initial=0))):
        rows = np.flatnonzero(counts > position)
        values = decode_rows(src[parts[first[rows] + position]], dtype)
        if len(rows) == n:
            sums += values
        else:
            sums[rows] += values
    averaged = encode_rows(sums / np.maximum(counts, 1)[:, None], dtype)
    if (counts == 0).any():
        averaged[counts == 0] = mean_row()
    return averaged


def combine_rows(rows: np.ndarray, dtype: str, indices: Any, coefficients: Any, chunk: int = 256) -> np.ndarray:
    """Raw output rows: row i is sum_j coefficients[i, j] * rows[indices[i, j]] (float64),
    encoded in `dtype`; `rows` is a raw (rows, row_bytes) matrix, gathered 256 targets at
    a time."""
    indices, coefficients = np.asarray(indices), np.asarray(coefficients, dtype=np.float64)
    out = np.empty((len(indices), rows.shape[1]), dtype=np.uint8)
    for start in range(0, len(indices), chunk):
        ids = indices[start : start + chunk]
        values = decode_rows(rows[ids.reshape(-1)], dtype).astype(np.float64).reshape(*ids.shape, -1)
        out[start : start + chunk] = encode_rows(np.einsum("nk,nkh->nh", coefficients[start : start + chunk], values), dtype)
    return out
