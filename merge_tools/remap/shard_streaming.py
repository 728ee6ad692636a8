"""Writing the shards: every shard at once, vocabulary rows built chunk by chunk, read back
and checked."""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from merge_tools.common.errors import CliError, check_interrupt, deferred_signals
from merge_tools.common.logs import log
from merge_tools.remap.checkpoints import read_exactly, read_matrix, torch_uint8
from merge_tools.remap.progress import progress_bar
from merge_tools.remap.row_math import FLOAT_DTYPES, ROW_CHUNK_BYTES, build_rows, encode_rows, mean_of_rows, nonfinite_rows
from merge_tools.remap.shard_writer import ShardWriter

if TYPE_CHECKING:
    from merge_tools.remap.checkpoints import Checkpoint, TensorEntry
    from merge_tools.remap.plan import RemapPlan
    from merge_tools.remap.shards import ShardPlan


MAX_WRITER_THREADS = 8


class SelfCheckError(Exception):
    """The written output does not match the plan (exit code 1)."""


@dataclass(frozen=True)
class RowContext:
    """One vocabulary matrix of the source and what its initialised rows need (computed
    once, when first asked for)."""

    matrix: np.ndarray
    dtype: str
    real_rows: int
    given: tuple[np.ndarray, np.ndarray] | None = None  # donor / OMP rows: (output rows, bytes)

    @functools.cached_property
    def finite(self) -> np.ndarray:
        return ~nonfinite_rows(self.matrix, self.dtype) if self.dtype in FLOAT_DTYPES else np.ones(len(self.matrix), bool)

    @functools.cached_property
    def mean(self) -> np.ndarray:
        rows = np.flatnonzero(self.finite[: self.real_rows])
        return encode_rows(mean_of_rows(self.matrix, self.dtype, rows)[None, :], self.dtype)[0]

    def mean_row(self) -> np.ndarray:
        return self.mean


def output_row_chunks(ctx: RowContext, plan: RemapPlan) -> Iterator[np.ndarray]:
    step = max(1, ROW_CHUNK_BYTES // max(1, ctx.matrix.shape[1]))
    for start in range(0, plan.n_rows, step):
        yield build_rows(ctx.matrix, ctx.dtype, plan, start, min(plan.n_rows, start + step), ctx.mean_row, ctx.finite, ctx.given)


def warn_nonfinite(ctx: RowContext, name: str, src_token_of_id: Mapping[int, str]) -> None:
    bad = np.flatnonzero(~ctx.finite)
    if len(bad):
        shown = ", ".join(f"{i} {src_token_of_id.get(int(i), '<padding>')!r}" for i in bad[:5])
        log.warning(
            "%s: %d row(s) hold NaN/Inf (%s%s): copied as they are, left out of mean and FVT rows",
            name,
            len(bad),
            shown,
            ", ..." if len(bad) > 5 else "",
        )


@dataclass
class ShardJobs:
    """What every shard's writer needs, and every writer opened (each closed at the end,
    whatever happens)."""

    out: Path
    ckpt: Checkpoint
    plan: RemapPlan
    src_token_of_id: Mapping[int, str]
    given_rows: Mapping[str, tuple[np.ndarray, np.ndarray]]
    progress: Any
    stop: threading.Event = field(default_factory=threading.Event)
    writers: list[ShardWriter] = field(default_factory=list)

    def write_shard(self, file: str, entries: Sequence[TensorEntry]) -> tuple[ShardWriter, int]:
        """One shard, streamed; its vocabulary tensors read back: (its writer, copied rows checked)."""
        writer = ShardWriter(self.out / file, entries, self.progress, self.stop)
        self.writers.append(writer)
        written: list[tuple[int, np.ndarray, str]] = []  # vocabulary tensors, to read back
        for entry in entries:
            if entry.vocab_role is None and self.ckpt.kind == "safetensors":
                writer.copy_range(Path(entry.file or ""), entry.start, entry.nbytes)
            elif entry.vocab_role is None:
                writer.write(self.ckpt.bin_tensors[entry.name].contiguous().reshape(-1).view(torch_uint8()).numpy())
            else:
                start, given = writer.position, self.given_rows.get(entry.vocab_role or "")
                matrix = write_vocab_tensor(writer, self.ckpt, entry, self.plan, self.src_token_of_id, given)
                written.append((start, matrix, entry.name))
        writer.finish()
        return writer, sum(verify_copied_rows(self.out / file, start, matrix, self.plan, name) for start, matrix, name in written)


def raise_first_failure(futures: Iterable[Future[Any]]) -> None:
    """Wait for every future, and raise the first exception as soon as one has one (a stop
    signal, checked meanwhile, too)."""
    futures = list(futures)
    while wait(futures, timeout=0.2, return_when=FIRST_EXCEPTION).not_done:
        check_interrupt()
        if any(future.done() and future.exception() for future in futures):
            break
    failed = next((future.exception() for future in futures if future.done() and future.exception()), None)
    if failed is not None:
        raise failed


def write_shards(
    out: Path,
    ckpt: Checkpoint,
    shard_plan: ShardPlan,
    plan: RemapPlan,
    src_token_of_id: Mapping[int, str],
    show_progress: bool,
    given_rows: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[dict[str, str], int, dict[str, str]]:
    """Stream every shard into `out`; returns ({file name: sha256}, copied rows verified,
    {linked file: how}): the source's shards the plan links are linked (link_file).
    Shards are written side by side, one per core (reading, hashing and the numpy row
    work release the GIL), vocabulary shards first since they take longest. Each
    vocabulary tensor is read back once written and every copied row compared bit for bit
    with its source row (SelfCheckError). The first error stops every writer."""
    jobs = ShardJobs(out, ckpt, plan, src_token_of_id, given_rows or {}, progress_bar(shard_plan.written_size, show_progress))
    written = [(file, entries) for file, entries in zip(shard_plan.files, shard_plan.tensors) if file not in shard_plan.links]
    pool = ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, len(written), MAX_WRITER_THREADS)), thread_name_prefix="shard")
    try:
        linked = {file: link_file(source, out / file) for file, source in shard_plan.links.items()}
        # a stop raised inside submit() can leave a thread started but unknown to the pool,
        # never joined, that creates a shard after the staging directory is removed
        with deferred_signals():
            futures = {file: pool.submit(jobs.write_shard, file, entries) for file, entries in written}
        raise_first_failure(futures.values())
        results = {file: future.result() for file, future in futures.items()}
        # fsync last, all at once: a writer thread waiting for the disk would leave its core idle
        with deferred_signals():
            syncing = pool.map(lambda result: result[0].sync_and_close(), results.values())
        digests = dict(zip(results, syncing))
    except BaseException:
        jobs.stop.set()
        raise
    finally:
        with deferred_signals():  # every writer thread has ended before the caller removes `out`
            pool.shutdown(wait=True, cancel_futures=True)
            for writer in jobs.writers:
                writer.close()
            jobs.progress.close()
    return digests, sum(verified for _, verified in results.values()), linked


FICLONE = 0x40049409  # Linux ioctl: share a file's extents with a new file (btrfs, xfs, bcachefs)


def link_file(source: Path, target: Path) -> str:
    """`target` as the same bytes as `source` without copying them, the safest way the file
    systems allow: a reflink (the data shared copy-on-write: writing either file never
    changes the other), else a hard link (the same file under a second name), else, across
    file systems, a symbolic link to where the source really is (a Hub snapshot's file is a
    link into blobs/: the blob itself is linked). Nothing here opens the source for
    writing. Returns how: reflink, hardlink or symlink."""
    import fcntl

    real = source.resolve(strict=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with real.open("rb") as handle:
            fcntl.ioctl(fd, FICLONE, handle.fileno())
        return "reflink"
    except OSError:
        os.close(fd)
        fd = -1
        target.unlink()
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        os.link(real, target)
        return "hardlink"
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    os.symlink(real, target)
    return "symlink"


def write_vocab_tensor(
    writer: ShardWriter,
    ckpt: Checkpoint,
    entry: TensorEntry,
    plan: RemapPlan,
    src_token_of_id: Mapping[int, str],
    given: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Write a vocabulary tensor's rows in output order, chunk by chunk; returns the
    source matrix (memory-mapped) for the read-back check."""
    ctx = RowContext(
        read_matrix(ckpt, ckpt.tensors[entry.source or entry.name], plan.src_rows),
        entry.dtype,
        min(plan.src_rows, len(src_token_of_id)),
        given,
    )
    if entry.dtype in FLOAT_DTYPES:
        warn_nonfinite(ctx, entry.name, src_token_of_id)
    elif any(s < 0 for s in plan.row_source):
        raise CliError(f"{entry.name} is {entry.dtype}: initialised rows need a float dtype ({', '.join(FLOAT_DTYPES)})")
    for chunk in output_row_chunks(ctx, plan):
        writer.write(chunk)
    return ctx.matrix


def verify_copied_rows(path: Path, offset: int, source: np.ndarray, plan: RemapPlan, name: str) -> int:
    """Read a written vocabulary tensor back and compare every copied row with its source
    row, chunk by chunk (memory: one chunk, not a second matrix)."""
    row_bytes = source.shape[1]
    sources = np.asarray(plan.row_source, dtype=np.int64)
    step = max(1, ROW_CHUNK_BYTES // max(1, row_bytes))
    buffer = np.empty((min(step, plan.n_rows), row_bytes), dtype=np.uint8)
    checked = 0
    for start in range(0, plan.n_rows, step):
        rows = min(step, plan.n_rows - start)
        written = buffer[:rows]
        read_exactly(path, offset + start * row_bytes, memoryview(written.reshape(-1)), f"the written {name}")
        chunk_sources = sources[start : start + rows]
        copied = np.flatnonzero(chunk_sources >= 0)
        got, expected = (written, source[chunk_sources]) if len(copied) == rows else (written[copied], source[chunk_sources[copied]])
        if row_bytes % 8 == 0:  # compare 8 bytes at a time
            got, expected = got.view(np.uint64), expected.view(np.uint64)
        if not np.array_equal(got, expected):
            bad = copied[(written[copied] != source[chunk_sources[copied]]).any(axis=1)][0]
            raise SelfCheckError(f"{path.name}: {name} row {start + int(bad)} differs from source row {int(chunk_sources[bad])}")
        checked += len(copied)
    return checked


def self_check(out: Path, shard_plan: ShardPlan) -> None:
    """Re-open the written shards with the safetensors library: every tensor's name, shape
    and dtype must be the plan's, and the metadata {"format": "pt"}."""
    from safetensors import safe_open

    problems: list[str] = []
    for file, entries in zip(shard_plan.files, shard_plan.tensors):
        try:
            with safe_open(str(out / file), framework="numpy") as handle:
                names = set(handle.keys())
                if names != {e.name for e in entries}:
                    problems.append(f"{file}: tensor names differ from the plan")
                if handle.metadata() != {"format": "pt"}:
                    problems.append(f"{file}: metadata {handle.metadata()!r}")
                for entry in entries:
                    if entry.name in names:
                        view = handle.get_slice(entry.name)
                        if tuple(view.get_shape()) != entry.shape or view.get_dtype() != entry.dtype:
                            problems.append(
                                f"{file}: {entry.name} is {view.get_dtype()} {view.get_shape()}, planned {entry.dtype} {list(entry.shape)}"
                            )
        except Exception as exc:  # the library refuses the file
            problems.append(f"{file}: the safetensors library cannot open it ({exc})")
    if problems:
        raise SelfCheckError("; ".join(problems[:5]))
