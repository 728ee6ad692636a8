"""ShardWriter: one safetensors file streamed to disk (O_DIRECT where it can), hashed as it
goes."""

from __future__ import annotations

import enum
import errno
import hashlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_tools.common.errors import CliError
from merge_tools.remap.shards import safetensors_header

if TYPE_CHECKING:
    from merge_tools.remap.checkpoints import TensorEntry


COPY_CHUNK_BYTES = 2**20  # the writer's buffer: small enough to stay in the CPU cache between read, hash and write


DIRECT_IO_ALIGNMENT = 4096  # O_DIRECT offsets and lengths: a multiple of the logical block size (512 or 4096)


def write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def direct_io(fd: int) -> bool:
    """Switch a file to O_DIRECT where the system and the file system allow it (Linux on
    ext4, xfs, btrfs and most others; macOS has no O_DIRECT): writes then go from this
    process's buffer to the disk, with no copy into the page cache. That copy was the
    largest CPU cost of a remap (perf: a quarter of all samples), and a 70B model written
    through the page cache also evicts everything else from it."""
    if not hasattr(os, "O_DIRECT"):
        return False
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError:
        return False
    return True


class WriterState(enum.Enum):
    """Where a ShardWriter is in its life (checked by every call, as llama.cpp's GGUFWriter
    checks its WriterState): WRITING (header written, tensors follow) -> FINISHED (every
    byte on its way to the disk) -> CLOSED (fsynced or abandoned)."""

    WRITING = "writing"
    FINISHED = "finished"
    CLOSED = "closed"


class ShardWriter:
    """Writes one safetensors file and its sha256 as it goes: header first (every shape is
    known from the plan), then each tensor's bytes. Bytes are gathered in page-aligned
    buffers of COPY_CHUNK_BYTES that are written out whole (O_DIRECT needs aligned offsets
    and lengths; the last block is padded, then the file cut to size) by a thread of the
    writer's own, so that the disk writes one buffer while the next is filled: with
    O_DIRECT a write returns only once the disk has the data. A pass-through tensor is read
    from the source straight into the buffer and hashed there, never decoded: one pass over
    the bytes. Setting `stop` makes the next chunk raise InterruptedError. Calls in order:
    write() / copy_range() while WRITING, finish(), then sync_and_close(); close() at any
    time (self.state says which comes next)."""

    def __init__(self, path: Path, entries: Sequence[TensorEntry], progress: Any, stop: threading.Event | None = None) -> None:
        import mmap

        self.path, self.progress, self.stop = path, progress, stop
        self.position = 0  # bytes of the file so far, those in the buffer included
        self.filled = 0  # bytes in the buffer, which go at offset position - filled
        self.digest = hashlib.sha256()
        self.buffer, self.spare = (memoryview(mmap.mmap(-1, COPY_CHUNK_BYTES)) for _ in range(2))
        self.writing: Future[None] | None = None  # the spare buffer's write
        self.io = ThreadPoolExecutor(1, thread_name_prefix=f"write {path.name}")
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.direct = direct_io(self.fd)
        self.state = WriterState.WRITING
        try:
            self.write(safetensors_header(entries, {"format": "pt"}))
        except BaseException:
            self.close()
            raise

    def _expect(self, state: WriterState, call: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"ShardWriter.{call}() on {self.path.name} while {self.state.value}, expected {state.value}")

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise InterruptedError(f"{self.path.name}: stopped")

    def _appended(self, count: int) -> None:
        self.digest.update(self.buffer[self.filled : self.filled + count])
        self.filled += count
        self.position += count
        self.progress.update(count)
        if self.filled == len(self.buffer):
            self._flush(self.filled)

    def _flush(self, length: int) -> None:
        """Hand the buffer's first `length` bytes to the write thread; go on in the spare
        buffer once its own write is done."""
        previous = self.writing
        self.writing = self.io.submit(self._write_at, self.buffer[:length], self.position - self.filled)
        if previous is not None:
            previous.result()
        self.buffer, self.spare = self.spare, self.buffer
        self.filled = 0

    def _write_at(self, data: memoryview, offset: int) -> None:
        try:
            write_all(self.fd, data, offset)
        except OSError as exc:  # a file system that takes the O_DIRECT flag but not these writes
            if not self.direct or exc.errno != errno.EINVAL:
                raise
            import fcntl

            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False
            write_all(self.fd, data, offset)

    def write(self, data: Any) -> None:
        self._expect(WriterState.WRITING, "write")
        view = memoryview(data).cast("B")
        while view:
            self._check_stop()
            count = min(len(view), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + count] = view[:count]
            self._appended(count)
            view = view[count:]

    def copy_range(self, source: Path, start: int, nbytes: int) -> None:
        """Pass a tensor through unchanged: raw bytes from the source file."""
        self._expect(WriterState.WRITING, "copy_range")
        try:
            handle = source.open("rb", buffering=0)
        except OSError as exc:
            raise CliError(f"{source}: cannot read ({exc.strerror}); was it removed while the remap ran? Run again") from exc
        with handle:
            done = 0
            while done < nbytes:
                self._check_stop()
                room = self.buffer[self.filled : self.filled + min(len(self.buffer) - self.filled, nbytes - done)]
                got = os.preadv(handle.fileno(), [room], start + done)
                if got == 0:
                    raise CliError(f"{source}: ends inside a tensor; the file is truncated: re-download it")
                self._appended(got)
                done += got

    def finish(self) -> None:
        """Write out what the buffers hold: the file is then complete, read it back at will."""
        self._expect(WriterState.WRITING, "finish")
        if self.filled and self.direct:
            padded = -(-self.filled // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT
            self.buffer[self.filled : padded] = bytes(padded - self.filled)
            self._flush(padded)
        elif self.filled:
            self._flush(self.filled)
        if self.writing is not None:
            self.writing.result()
            self.writing = None
        if os.fstat(self.fd).st_size != self.position:
            os.ftruncate(self.fd, self.position)
        self.state = WriterState.FINISHED

    def sync_and_close(self) -> str:
        """fsync, close; the file's sha256."""
        self._expect(WriterState.FINISHED, "sync_and_close")
        try:
            os.fsync(self.fd)
        finally:
            self.close()
        return self.digest.hexdigest()

    def close(self) -> None:
        self.state = WriterState.CLOSED
        self.io.shutdown(wait=True, cancel_futures=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
