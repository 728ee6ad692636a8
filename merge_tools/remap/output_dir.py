"""The output directory: lock, staging, atomic publish, leftovers of dead runs."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from merge_tools.common.errors import CliError, deferred_signals
from merge_tools.common.logs import log
from merge_tools.remap.config_outputs import REPORT_NAME
from merge_tools.remap.shards import human_bytes


# The output directory: D appears complete or not at all. A run holds an exclusive lock on
# D (`.<D>.lock` beside it) from start to end, writes into a staging directory beside D
# (`.<D>.tmp-XXXXXX`, with an owner file naming the pid), and publishes it in one atomic
# rename: renameat2(RENAME_EXCHANGE) over an existing D, RENAME_NOREPLACE onto a missing
# one (Linux); elsewhere two renames, undone on failure. Staging directories of runs that
# died (SIGKILL, power cut) are found by their name and removed by the next run into D.
def check_out_dir(out_dir: Path, protected: Mapping[str, Path], overwrite: bool) -> None:
    """Refuse an out_dir that is a file, would touch an input, or holds something that
    --overwrite may not replace (only an earlier output of this tool, with its report)."""
    if out_dir.is_symlink():
        raise CliError(f"--out_dir {out_dir} is a symbolic link; publishing replaces the link, not what it points to: give the real path")
    try:
        resolved = out_dir.resolve(strict=False)
    except RuntimeError as exc:  # Python < 3.13: a symlink loop
        raise CliError(f"--out_dir {out_dir}: a loop of symbolic links") from exc
    for label, path in protected.items():
        source = path.resolve()
        if resolved == source or source in resolved.parents:
            raise CliError(
                f"--out_dir {out_dir} is {'the' if resolved == source else 'inside the'} "
                f"{label} directory {path}; choose a directory outside it"
            )
        if resolved in source.parents and overwrite:
            raise CliError(
                f"--out_dir {out_dir} contains the {label} directory {path}; --overwrite would delete it: choose another directory"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--out_dir {out_dir} is an existing file; choose a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise CliError(f"--out_dir {out_dir} exists and is not empty; pass --overwrite to replace it")
        if not (out_dir / REPORT_NAME).is_file():
            raise CliError(
                f"--out_dir {out_dir} holds files this tool did not write (no {REPORT_NAME}); --overwrite only replaces "
                "an earlier output: remove it yourself or choose another directory"
            )
    parent = nearest_existing(resolved.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"cannot write in {parent} (permission denied); choose another --out_dir")


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(parent: Path, needed: int) -> None:
    where = nearest_existing(parent.resolve())
    free = shutil.disk_usage(where).free
    if free < needed + 64 * 10**6:
        raise CliError(
            f"not enough free space in {where}: the output needs {human_bytes(needed)} (+64 MB to spare), {human_bytes(free)} are free; "
            "free some space or choose another --out_dir"
        )


OWNER_FILE = ".remap-owner.json"


PUBLISHED: list[Path] = []  # outputs this process has published, for an honest message on interrupt


ACTIVE_OUTPUTS: list[OutputDirectory] = []  # entered and not yet left


def release_outputs() -> None:
    """Remove the staging directories and locks of outputs an interrupted run still holds."""
    for output in list(ACTIVE_OUTPUTS):
        output.__exit__(None, None, None)


def short_name(out_dir: Path) -> str:
    """A prefix for the files beside D that stays far below the 255-byte name limit."""
    name = out_dir.name
    return name if len(name.encode()) <= 80 else f"{name[:40]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def process_started(pid: int) -> str | None:
    """When a process started (clock ticks after boot, from /proc), or None if it is gone;
    pids are reused, so a pid alone does not prove the owner is alive."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "unknown"


def rename_atomic(source: Path, target: Path, *, exchange: bool) -> bool:
    """renameat2: swap two paths (exchange) or move one onto a missing path without ever
    replacing one that appeared (no-replace). False where the system or file system lacks
    it (the caller falls back); FileExistsError when the target appeared."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, flags = -100, 2 if exchange else 1  # RENAME_EXCHANGE, RENAME_NOREPLACE
    if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), str(target))
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(target))


class OutputDirectory:
    """`with OutputDirectory(D, overwrite) as output:` write into output.path, then
    output.publish(). Leaving the block without publishing removes the staging directory;
    leaving it always releases the lock."""

    def __init__(self, out_dir: Path, overwrite: bool) -> None:
        self.out_dir, self.overwrite = out_dir, overwrite
        self.prefix = f".{short_name(out_dir)}"
        self.lock_path = out_dir.parent / f"{self.prefix}.lock"
        self.lock_fd = -1
        self.path: Path | None = None
        self.published = False

    def __enter__(self) -> OutputDirectory:
        # Each step that creates something records it before a signal can be raised, and
        # main() releases what an interrupted run still holds (release_outputs).
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            with deferred_signals():
                ACTIVE_OUTPUTS.append(self)
                self._lock()
            self._remove_stale()
            with deferred_signals():
                self.path = self._make_staging()
        except OSError as exc:
            self.__exit__(None, None, None)
            raise CliError(f"cannot create a directory in {self.out_dir.parent} ({exc.strerror}); choose another --out_dir") from exc
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with deferred_signals():
            if self.path is not None:  # the staging directory, or after publishing the old D it was swapped with
                shutil.rmtree(self.path, ignore_errors=True)
            self._unlock()
            if self in ACTIVE_OUTPUTS:
                ACTIVE_OUTPUTS.remove(self)

    def _lock(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise CliError(f"another remap is writing {self.out_dir} (pid {holder}); wait for it or choose another --out_dir") from None
            # the holder before us unlinks the file before it unlocks: lock the file that is there now
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same and not re.fullmatch(rb"\d*\n?", os.pread(fd, 64, 0)):  # a file of the user's: never taken over or removed
                os.close(fd)
                raise CliError(f"{self.lock_path} exists and was not written by this tool; remove it or choose another --out_dir")
            if same:
                self.lock_fd = fd
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self.lock_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)
            os.close(self.lock_fd)
            self.lock_fd = -1

    def _remove_stale(self) -> None:
        """Under the lock, no live run writes into D: staging directories of D are leftovers
        (checked against their owner file all the same). A `.D.mk-*` directory holding
        nothing, or only an owner file, is one a run was killed while creating."""
        for candidate in self.out_dir.parent.glob(f"{glob_escape(self.prefix)}.mk-*"):
            if candidate.is_dir() and not candidate.is_symlink() and {p.name for p in candidate.iterdir()} <= {OWNER_FILE}:
                shutil.rmtree(candidate, ignore_errors=True)
        for candidate in self.out_dir.parent.glob(f"{glob_escape(self.prefix)}.tmp-*"):
            if not candidate.is_dir() or candidate.is_symlink():
                continue
            owner = read_owner(candidate / OWNER_FILE)
            if owner is None or owner.get("tool") != "remap_tokenizer.py":  # not made by this tool: the user's, left alone
                continue
            if owner.get("pid") != os.getpid() and process_started(owner["pid"]) == owner.get("started"):
                continue
            log.info("removing %s, left by a run that did not finish", candidate)
            shutil.rmtree(candidate, ignore_errors=True)

    def _make_staging(self) -> Path:
        for _ in range(100):
            # made under a `.mk-` name and renamed once its owner file is in: every `.tmp-`
            # directory of this tool has one, so one without it is never this tool's to remove
            name = os.urandom(3).hex()
            path, making = (self.out_dir.parent / f"{self.prefix}.{kind}-{name}" for kind in ("tmp", "mk"))
            if path.exists():
                continue
            try:
                os.mkdir(making, 0o777)  # the user's umask applies, as with mkdir
            except FileExistsError:
                continue
            self.path = making
            owner = {
                "tool": "remap_tokenizer.py",
                "pid": os.getpid(),
                "started": process_started(os.getpid()),
                "out_dir": str(self.out_dir),
            }
            (making / OWNER_FILE).write_text(json.dumps(owner) + "\n", encoding="utf-8")
            os.rename(making, path)
            self.path = path
            return path
        raise FileExistsError(errno.EEXIST, "no free staging name", str(self.out_dir.parent))

    def publish(self) -> None:
        """Make the staging directory D, in one step where the system allows it."""
        assert self.path is not None and not self.published, "publish() once, inside the with block"
        (self.path / OWNER_FILE).unlink()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with deferred_signals():
            self._replace_out_dir()
            self.published = True
            PUBLISHED.append(self.out_dir)
        shutil.rmtree(self.path, ignore_errors=True)  # now the old D, if there was one

    def _replace_out_dir(self) -> None:
        assert self.path is not None
        exists = self.out_dir.exists() or self.out_dir.is_symlink()
        if exists and self.out_dir.is_dir() and not self.out_dir.is_symlink() and any(self.out_dir.iterdir()):
            if not self.overwrite or not (self.out_dir / REPORT_NAME).is_file():
                raise CliError(
                    f"{self.out_dir} appeared while the output was written; nothing "
                    "was replaced: pass --overwrite or choose another --out_dir"
                )
        elif exists and not (self.out_dir.is_dir() and not self.out_dir.is_symlink()):
            raise CliError(f"{self.out_dir} appeared as a file while the output was written; nothing was replaced")
        if exists:
            if not rename_atomic(self.path, self.out_dir, exchange=True):
                self._replace_in_two_steps()
        else:
            try:
                if not rename_atomic(self.path, self.out_dir, exchange=False):
                    os.rename(self.path, self.out_dir)
            except FileExistsError:
                raise CliError(f"{self.out_dir} appeared while the output was written; nothing was replaced: pass --overwrite") from None
            self.path.mkdir()  # publish() removes "the old D": here, nothing

    def _replace_in_two_steps(self) -> None:
        """Old D aside, new D in; if the second rename fails, the old D goes back."""
        assert self.path is not None
        aside = self.out_dir.parent / f"{self.prefix}.old-{os.urandom(3).hex()}"
        os.rename(self.out_dir, aside)
        try:
            os.rename(self.path, self.out_dir)
        except BaseException:
            os.rename(aside, self.out_dir)
            raise
        os.rename(aside, self.path)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def read_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


class HeldOutputs:
    """Finished outputs held unpublished until a go-ahead: an alignment publishes nothing
    before mergekit's verdict on the YAML, and a remap that finishes before the verdict
    hands its staging directory over (take) instead of waiting, so that the next model is
    written meanwhile. `with HeldOutputs(ready, confirm) as held:`; publish_all() confirms
    (waits for the go-ahead; raises to refuse) and publishes; leaving the block removes
    whatever is still held."""

    def __init__(self, ready: Callable[[], bool], confirm: Callable[[], None]) -> None:
        self.ready, self.confirm = ready, confirm
        self.stack = contextlib.ExitStack()
        self.outputs: list[OutputDirectory] = []

    def __enter__(self) -> HeldOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def take(self, staging: contextlib.ExitStack, output: OutputDirectory) -> bool:
        """Hold `output` (staging: the stack that would leave its block) when the go-ahead
        is not in yet, or others are held; False: publish it now."""
        if not self.outputs and self.ready():
            return False
        self.stack.enter_context(staging.pop_all())
        self.outputs.append(output)
        return True

    def publish_all(self) -> None:
        """Once confirm() passes, publish the held outputs in the order they were taken."""
        if not self.outputs:
            return
        self.confirm()
        for output in self.outputs:
            try:
                output.publish()
            except OSError as exc:
                raise CliError(
                    f"cannot publish {output.out_dir}: {exc.strerror}; it was not published, nor anything held after it"
                ) from exc
        self.outputs.clear()
        self.stack.close()
