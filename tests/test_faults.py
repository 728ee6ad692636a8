"""Nothing is ever lost: output names that cannot escape, an atomic publish, signals at any
moment, runs that died, two runs on one output. Signals and concurrency use real
subprocesses and real signals; every case checks that nothing beside the output changed."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import compare_tokenizers as ct
import factories
import remap_tokenizer as rt
from factories import BYTE_SPECIALS
from merge_tools.common.mergekit_config import ModelRef
from merge_tools.remap.alignment import aligned_name
from merge_tools.remap.alignment_dir import ALIGNMENT_MANIFEST
from merge_tools.remap.config_outputs import REPORT_NAME
from merge_tools.remap.output_dir import OWNER_FILE, process_started

ROOT = Path(__file__).resolve().parent.parent
CHAT = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, byte_tok: dict) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    chat_json = factories.permuted(factories.with_tokens(byte_tok, added=CHAT), seed=3, keep=BYTE_SPECIALS.values())
    chat = factories.write_model(root / "chat", chat_json, seed=4, bos=BYTE_SPECIALS["bos"], eos="<|im_end|>")
    (chat / "original").mkdir()
    return {
        "base": factories.write_model(root / "base", byte_tok, seed=1, **BYTE_SPECIALS),
        "chat": chat,
        # a few MB in many shards, so that a run spends a while writing
        "wide": factories.write_model(
            root / "wide", chat_json, hidden=256, shard_size="300KB", seed=5, bos=BYTE_SPECIALS["bos"], eos="<|im_end|>"
        ),
    }


def listing_digest(directory: Path) -> dict[str, str]:
    """Every path below `directory` (links not followed) with the sha256 of each file."""
    result = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        result[key] = "link" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return result


def beside(out: Path) -> list[str]:
    """What sits beside D apart from D: staging, old or lock files left behind."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def remap_cli(*args: object, session: bool = False) -> subprocess.Popen[str]:
    """The remap as a process of its own (session=True: leading its own process group, as
    a command typed in a terminal is)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "remap_tokenizer.py"), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=session,
    )


def wait_until_loaded(pid: int, library: str, timeout: float = 60) -> None:
    """Until the process has mapped a shared library (read from /proc): a moment inside its
    imports. Before the script's first line runs, a signal meets Python's own defaults,
    which no program can change."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if library in Path(f"/proc/{pid}/maps").read_text():
                return
        except OSError:
            return
        time.sleep(0.001)


def wait_until_handled(pid: int, signum: int, timeout: float = 60) -> None:
    """Until the process catches `signum` (SigCgt in /proc/PID/status): the tool has put its
    handlers in place. A signal before that meets Python's defaults and kills it silently,
    as it would any program still starting (what made this test flaky on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
        if int(caught, 16) >> (signum - 1) & 1:
            return
        time.sleep(0.001)


def assert_complete(out: Path) -> None:
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["self_check"]["ok"]
    files = {p.name for p in out.iterdir()}
    assert set(report["files"]) | set(report.get("linked", {})) | {REPORT_NAME} == files  # every file written or linked


# ---------------------------------------------------------------- names of aligned outputs


@pytest.mark.parametrize(
    "path",
    [
        "models/chat/..",
        "models/chat/.",
        "models/chat/",
        "/",
        ".",
        "..",
        "~",
        "a/b/../../..",
        ".hidden",
        "...",
        "x" * 300,
        "org/name",
        "a b/c:d",
    ],
)
def test_aligned_names_are_one_plain_component(path: str) -> None:
    taken: set[str] = set()
    name = aligned_name(ModelRef(path), taken)
    assert name not in ("", ".", "..") and "/" not in name and not name.startswith(".") and len(name.encode()) <= 120
    assert aligned_name(ModelRef(path), taken) != name  # unique
    assert aligned_name(ModelRef(path.upper()), {n.upper() for n in taken}) not in {n.upper() for n in taken}


def test_model_paths_ending_in_dot_dot_or_dot_stay_inside_aligned(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    work = tmp_path / "work"
    aligned = work / "aligned"
    previous = aligned / "previous"
    previous.mkdir(parents=True)
    (previous / REPORT_NAME).write_text("{}")  # an earlier output of this tool: replaceable
    (work / "precious.txt").write_text("the parent of ALIGNED must not change")
    before = listing_digest(work)
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "base_model": str(models["base"]),
                "dtype": "float32",
                "models": [
                    {"model": str(models["base"]), "parameters": {"weight": 0.5}},
                    {"model": f"{models['chat']}/original/..", "parameters": {"weight": 0.25}},
                    {"model": f"{models['chat']}/.", "parameters": {"weight": 0.25}},
                ],
            }
        )
    )
    assert rt.main(["--mergekit-config", str(config), "--out_dir", str(aligned), "--overwrite"]) == 0, capsys.readouterr().err
    after = listing_digest(work)
    assert {k: v for k, v in after.items() if not k.startswith("aligned/")} == {
        k: v for k, v in before.items() if not k.startswith("aligned/")
    }
    assert after["aligned/previous/remap_report.json"] == before["aligned/previous/remap_report.json"]
    assert sorted(p.name for p in aligned.iterdir()) == [ALIGNMENT_MANIFEST, "chat", "merge.yaml", "previous"]
    assert_complete(aligned / "chat")


def test_overwrite_never_replaces_what_the_tool_did_not_write(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    aligned = tmp_path / "aligned"
    (aligned / "chat").mkdir(parents=True)
    (aligned / "chat" / "notes.txt").write_text("mine")
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "base_model": str(models["base"]),
                "models": [{"model": str(models["chat"]), "parameters": {"weight": 1.0}}],
            }
        )
    )
    assert rt.main(["--mergekit-config", str(config), "--out_dir", str(aligned), "--overwrite"]) == 2
    assert "holds files this tool did not write" in capsys.readouterr().err
    assert (aligned / "chat" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- publishing


def run_remap(capsys: pytest.CaptureFixture[str], models: dict[str, Path], out: Path, *extra: str) -> tuple[int, str]:
    code = rt.main(["--src_model", str(models["chat"]), "--base_tokenizer", str(models["base"]), "--out_dir", str(out), *extra])
    return code, capsys.readouterr().err


def test_overwrite_swaps_atomically(tmp_path: Path, models: dict[str, Path], capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert run_remap(capsys, models, out)[0] == 0
    exchanged = []
    real = rt.rename_atomic  # the flat script's: the one patched below and run by rt.main
    # a spy, not a fake: the real renameat2 runs; it only records which flag the publish used
    monkeypatch.setattr(rt, "rename_atomic", lambda a, b, *, exchange: exchanged.append(exchange) or real(a, b, exchange=exchange))
    assert run_remap(capsys, models, out, "--overwrite", "--init", "zero")[0] == 0
    assert exchanged == [True] and json.loads((out / REPORT_NAME).read_text())["options"]["init"] == "zero"
    assert beside(out) == []


def test_a_failed_swap_puts_the_old_output_back(tmp_path: Path, models: dict[str, Path], capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without renameat2 (macOS, some file systems) the swap is two renames; when the
    second fails, the first is undone."""
    out = tmp_path / "out"
    assert run_remap(capsys, models, out)[0] == 0
    before = listing_digest(out)
    # False is what rename_atomic returns where libc or the file system lacks renameat2 (EINVAL/ENOSYS)
    monkeypatch.setattr(rt, "rename_atomic", lambda a, b, *, exchange: False)
    real_rename = os.rename

    def rename(source: object, target: object) -> None:
        if Path(str(target)) == out and ".tmp-" in str(source):
            raise OSError(errno.EIO, "Input/output error", str(target))
        real_rename(source, target)

    # stands for an I/O error on the second rename, which a real file system cannot be made to give on cue without root
    monkeypatch.setattr(rt.os, "rename", rename)
    code, err = run_remap(capsys, models, out, "--overwrite", "--init", "zero")
    assert code == 2 and "nothing was left behind" in err
    assert listing_digest(out) == before and beside(out) == []


def test_a_long_output_name_works(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    out = tmp_path / ("m" * 250)
    code, err = run_remap(capsys, models, out)
    assert code == 0, err
    assert_complete(out) and beside(out) == []


# ---------------------------------------------------------------- runs that died, runs side by side


def test_staging_left_by_a_killed_run_is_removed_by_the_next(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".out.tmp-dead01"
    stale.mkdir()
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"partial")
    ours = {"tool": "remap_tokenizer.py", "out_dir": str(out)}
    (stale / OWNER_FILE).write_text(json.dumps({"pid": dead.pid, "started": "1", **ours}))
    unmarked = tmp_path / ".out.tmp-dead02"  # no owner file of this tool: maybe the user's own, never deleted
    unmarked.mkdir()
    (unmarked / "notes.txt").write_text("mine")
    alive = tmp_path / ".out.tmp-live01"  # a live process (on a file system where flock does not reach it): kept
    alive.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (alive / OWNER_FILE).write_text(json.dumps({"pid": sleeper.pid, "started": process_started(sleeper.pid), **ours}))
    reused_pid = tmp_path / ".out.tmp-dead04"  # its pid now belongs to another process
    reused_pid.mkdir()
    (reused_pid / OWNER_FILE).write_text(json.dumps({"pid": sleeper.pid, "started": "0", **ours}))
    other = tmp_path / ".other.tmp-dead03"  # another output's: not touched
    other.mkdir()
    try:
        code, err = run_remap(capsys, models, out)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert code == 0, err
    assert beside(out) == [".other.tmp-dead03", ".out.tmp-dead02", ".out.tmp-live01"]
    assert (unmarked / "notes.txt").read_text() == "mine"


def test_a_lock_file_of_the_users_is_never_taken_over(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    lock.write_text("my notes, not a lock of remap_tokenizer.py\n")
    code, err = run_remap(capsys, models, out)
    assert code == 2 and "was not written by this tool" in err and lock.read_text().startswith("my notes"), err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["symlink", "loop"])
def test_an_out_dir_that_is_a_symlink_is_refused_before_writing(tmp_path: Path, models: dict[str, Path], kind: str, capsys) -> None:
    out = tmp_path / "out"
    if kind == "symlink":
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real")
    else:
        out.symlink_to(tmp_path / "loop")
        (tmp_path / "loop").symlink_to(out)
    code, err = run_remap(capsys, models, out)
    assert code == 2 and "symbolic link" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "real"] if kind == "symlink" else ["loop", "out"])


def test_names_the_file_system_refuses_end_in_one_specific_line(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    config = tmp_path / "merge.yaml"
    models_ = [{"model": name * 5000, "parameters": {"weight": 1.0}} for name in "mn"]
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": models_}))
    for tool, extra in ((ct.main, []), (rt.main, ["--out_dir", str(tmp_path / "aligned")])):
        code = tool(["--mergekit-config", str(config), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "unexpected" not in err and "too long" in err, err


def test_sigkill_leaves_a_staging_directory_that_the_next_run_removes(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    out = tmp_path / "out"
    proc = remap_cli("--src_model", models["wide"], "--base_tokenizer", models["base"], "--out_dir", out, "--max-shard-size", "300KB")
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    code, err = run_remap(capsys, models, out)
    assert code == 0, err
    assert beside(out) == []


def test_another_run_holding_the_lock_is_named(tmp_path: Path, models: dict[str, Path], capsys) -> None:
    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242\n")
        lock.flush()
        code, err = run_remap(capsys, models, out)
    assert code == 2 and f"error: another remap is writing {out} (pid 4242)" in err
    assert not out.exists()


def test_two_runs_on_one_output(tmp_path: Path, models: dict[str, Path]) -> None:
    out = tmp_path / "out"
    args = ("--src_model", models["wide"], "--base_tokenizer", models["base"], "--out_dir", out, "--max-shard-size", "300KB")
    first, second = remap_cli(*args), remap_cli(*args)
    results = sorted((proc.wait(120), proc.communicate()[1]) for proc in (first, second))
    assert [code for code, _ in results] == [0, 2], results
    assert any(text in results[1][1] for text in ("another remap is writing", "appeared while", "exists and is not empty")), results[1][1]
    assert_complete(out) and beside(out) == []


# ---------------------------------------------------------------- signals at any moment


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "group"),
    [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGHUP, False)],
    ids=["SIGINT", "Ctrl-C to the process group", "SIGTERM", "SIGTERM to the process group", "SIGHUP"],
)
def test_signals_at_any_moment_leave_a_complete_output_or_nothing(
    tmp_path: Path, models: dict[str, Path], signum: int, group: bool
) -> None:
    """Signals at spread-out moments (imports, reading, once staging exists, mid-shard,
    around publish), to the process or, as a terminal's Ctrl-C or Slurm do, to its whole
    group (the forked tokenizer worker included): exit 0 with a complete D, or 128 + signal
    with one line that says truthfully whether D was completed; never a traceback, never
    leftovers."""
    outcomes = set()
    for attempt in range(8):
        out = tmp_path / f"out{attempt}"
        proc = remap_cli(
            "--src_model", models["wide"], "--base_tokenizer", models["base"], "--out_dir", out, "--max-shard-size", "300KB", session=group
        )
        if attempt == 0:  # while numpy is being imported: our handlers are in place by then
            wait_until_loaded(proc.pid, "_multiarray_umath")
        else:  # once the staging directory exists, then later and later
            deadline = time.monotonic() + 60
            while (
                not any(p.name.startswith(f".{out.name}.tmp-") for p in tmp_path.iterdir())
                and proc.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.002)
            time.sleep((attempt - 1) * 0.03)
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err and "Exception ignored" not in err, err
        if proc.returncode == 0:
            assert_complete(out)
        else:
            assert proc.returncode == 128 + signum, err
            assert err.strip().splitlines()[-1].startswith(f"error: interrupted ({signal.Signals(signum).name}); "), err
            if "complete, kept" in err:
                assert_complete(out)
            else:
                assert "nothing was written" in err and not out.exists(), err
        assert [p for p in beside(out) if p.startswith(f".{out.name}.")] == [], (beside(out), proc.returncode, err)
        outcomes.add(proc.returncode)
    assert 128 + signum in outcomes


def test_compare_stops_on_sigterm_with_one_line(tmp_path: Path, models: dict[str, Path]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "compare_tokenizers.py"), models["base"], models["wide"], "--weights"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_handled(proc.pid, signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    if proc.returncode != 1:  # finished (the tokenizers differ) before the signal came
        assert proc.returncode == 143 and err == "error: interrupted (SIGTERM)\n" or err.endswith("nothing was written\n"), err


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_source_shard_that_changes_during_the_remap_ends_in_one_line(tmp_path: Path, models: dict[str, Path], damage: str) -> None:
    """A download or `git lfs pull` into M's folder while the remap reads it: exit 2 with one
    line (or 0 when everything was read before), staging and lock removed; never SIGBUS."""
    codes = set()
    for attempt in range(6):
        src = tmp_path / f"src{attempt}"
        subprocess.run(["cp", "-r", str(models["wide"]), str(src)], check=True)
        out = tmp_path / f"out{attempt}"
        proc = remap_cli("--src_model", src, "--base_tokenizer", models["base"], "--out_dir", out, "--max-shard-size", "300KB")
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(f".{out.name}.tmp-") for p in tmp_path.iterdir()) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(attempt * 0.02)
        for shard in src.glob("*.safetensors"):
            if damage == "truncate":
                os.truncate(shard, shard.stat().st_size // 2)
            else:
                shard.unlink()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 2), (proc.returncode, err)
        if proc.returncode == 2:
            assert err.count("\n") == 1 and err.startswith("error: ") and ("truncated" in err or "removed" in err), err
            assert not out.exists()
        assert [p for p in beside(out) if p.startswith(f".{out.name}.")] == [], beside(out)
        codes.add(proc.returncode)
    assert 2 in codes
