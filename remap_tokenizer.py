#!/usr/bin/env python3
"""Permute a causal LM's vocabulary rows into a base tokenizer's token order.

Linear merges (mergekit linear, task arithmetic, TIES, ...) add embedding and lm_head
matrices row by row, so every model must map each token to the same id. This script
rewrites a model (M) so that its rows follow another tokenizer (T):

  append mode (default)  every token of T at T's id, then M's tokens that T lacks, with a
                         patched tokenizer that can decode them
  --drop-extra           exactly T's vocabulary and config.vocab_size: ready to merge

Rows of T's tokens that M lacks are initialised (default: FVT, the mean of the rows of
the source tokens that spell the same text). The remap streams tensor by tensor: memory
stays around one vocabulary matrix whatever the model size, and every other tensor is
copied byte for byte.

Exit codes: 0 ok, 1 the self-check of the written output failed, 2 usage or input error,
128 + signal when stopped (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).

Contents, by feature (each: its frozen dataclasses, then pure functions, then I/O):
  shared block    identical in compare_tokenizers.py (tests/test_shared.py guards it):
                  errors and signals, Hub and directory sources, strict JSON, tokenizer.json
                  and safetensors header checks, mergekit references, the merge check,
                  mergekit's tokenizer merge (plan_merged_vocab), command line scaffolding,
                  token spellings
  constants       of the remap
  tokenizers in   VocabSpec, reading, spelling, what a tokenizer produces, matching,
                  FVT decompositions
  the plan        RemapPlan: where every output row comes from (pure)
  row math        copies, means, FVT and OMP rows
  checkpoints in  headers, vocabulary tensors (every per-token tensor), rows
  the donor       rows of a model that has the tokens (--init donor / omp), and of the
                  models of a tokenizer merge (init mergekit)
  shards out      shard plan, the streaming ShardWriter, verification
  outputs         tokenizer files, configs, other files
  output dir      lock, staging, atomic publish, leftovers of dead runs
  one remap       read inputs -> plan -> report -> write
  alignment       --mergekit-config: plan, remaps, merge.yaml, gate
  tokenizer merge tokenizer_source (union, base, a model): the merged tokenizer, its rows
  command line    build_parser, options_from_args, run, main
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import enum
import errno
import functools
import gc
import hashlib
import itertools
import json
import logging
import math
import operator
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger("remap_tokenizer")

# >>> shared: identical in compare_tokenizers.py and remap_tokenizer.py
# Each script works when copied alone, so the code both need is written out in both files;
# tests/test_shared.py fails as soon as the two copies differ.


class CliError(Exception):
    """An input or usage problem, reported as one `error: ...` line and exit code 2."""


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
CONFIG_FILES = ("config.json", "generation_config.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(source: str) -> bool:
    return bool(HUB_ID_RE.match(source)) and not source.startswith((".", "~")) and not source.endswith(".json")


def split_revision(reference: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`); local paths keep any `@` they contain."""
    if "@" in reference and not os.path.exists(reference):
        path, _, revision = reference.rpartition("@")
        if not path:
            raise CliError(f"{reference!r}: no model name before the @revision")
        return path, revision or None
    return reference, None


def file_in_model_dir(directory: Path, name: str, where: Path) -> Path:
    """`directory/name` for a file name read from a file (a shard named by an index).
    The name is judged, not where it leads: an absolute name, `..` or a subdirectory is
    refused, while a file that is in the directory by name is read wherever its symlink
    points (the Hub cache links every file into `blobs/`; users link shards to other disks)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        raise CliError(f"{where}: names the file {name!r}, which is not a plain file name inside the model directory; refusing to read it")
    return directory / name


def select_weight_files(filenames: Iterable[str]) -> tuple[str, list[str]]:
    """Which files hold a checkpoint's weights: ("safetensors"|"bin", files). Prefers
    safetensors, then the `model*` / `pytorch_model*` naming transformers writes (repos
    often also carry `consolidated.safetensors` or `original/*.pth` copies)."""
    names = sorted(set(filenames))
    top = [n for n in names if "/" not in n]
    for kind, index, pattern in (
        ("safetensors", SAFETENSORS_INDEX, re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")),
        ("safetensors", None, re.compile(r"^(?!consolidated).*\.safetensors$")),
        ("bin", BIN_INDEX, re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")),
    ):
        if index is not None and index in top:
            return kind, [index]
        files = [n for n in top if pattern.match(n)]
        if files:
            return kind, files
    return "none", []


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_failure(where: str, revision: str | None, exc: BaseException) -> str:
    """One line that says why huggingface_hub could not give `where`, and what to do."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    causes = []
    cause: BaseException | None = exc
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    token_hint = "set HF_TOKEN=hf_... or run `hf auth login`"
    for cause in causes:
        if isinstance(cause, GatedRepoError):
            if os.environ.get("HF_TOKEN"):
                return (
                    f"{where}: gated repository, and the token in HF_TOKEN has no access: accept its licence on the Hub with that account"
                )
            return f"{where}: gated repository: accept its licence on the Hub, then pass a token ({token_hint})"
        if isinstance(cause, RevisionNotFoundError):
            return f"{where}: the repository has no revision {revision!r}"
        if isinstance(cause, RepositoryNotFoundError):
            return f"{where}: neither a local directory nor a Hub repository (a private repo needs a token: {token_hint})"
    if hub_offline():
        return (
            f"{where}: not a local directory, and not in the local Hub cache "
            "(HF_HUB_OFFLINE is set): download it once online or pass a local directory"
        )
    for cause in causes:
        response = getattr(cause, "response", None)
        if isinstance(cause, HfHubHTTPError) and response is not None:
            return f"{where}: not in the local Hub cache, and {endpoint} answered HTTP {response.status_code}: try again later"
        if "Connect" in type(cause).__name__ or "Timeout" in type(cause).__name__ or isinstance(cause, ConnectionError):
            return (
                f"{where}: neither a local directory nor a reachable Hub repo "
                f"({endpoint} cannot be reached, and it is not in the local Hub cache)"
            )
    return f"{where}: cannot fetch from the Hub ({type(exc).__name__}: {exc})".splitlines()[0]


def resolve_source(source: str, revision: str | None, allow_patterns: Sequence[str]) -> Path:
    """A local path as is, or the folder of a Hub repo's snapshot in the Hugging Face cache
    holding `allow_patterns` (huggingface_hub honours HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT
    and HF_HOME; mergekit finds the same files there)."""
    if not source:
        raise CliError("an empty model or tokenizer name")
    if len(source) > 1000:
        raise CliError(f"{source[:60]}...: a name of {len(source)} characters is neither a path nor a Hub repo id")
    path = Path(source).expanduser()
    if path.exists():
        if path.suffix.lower() == ".gguf" or (
            path.is_dir() and any(path.glob("*.gguf")) and not any((path / n).is_file() for n in ("config.json", "tokenizer.json"))
        ):
            raise CliError(
                f"{source}: GGUF files are not supported: point at the Hugging "
                "Face model directory or repo id (safetensors, tokenizer.json)"
            )
        return path
    if not looks_like_hub_id(source):
        raise CliError(f"{source}: no such file or directory")
    from huggingface_hub import snapshot_download

    where = f"{source}@{revision}" if revision else source
    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=list(allow_patterns)))
    except Exception as exc:  # huggingface_hub raises HTTP, OS, validation and cache errors
        raise CliError(hub_failure(where, revision, exc)) from exc


def show_hub_progress(show: bool) -> None:
    """huggingface_hub's download bars write to stderr: on a terminal only, never with --json."""
    if show:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: cannot read ({exc.strerror})") from exc
    return parse_json(raw, path)


def read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a JSON object")
    return data


def read_mergekit_config(path: Path) -> Any:
    import yaml

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}): save it as UTF-8") from exc
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CliError(f"{path}: not valid YAML ({where}{problem})") from exc
    except RecursionError as exc:
        raise CliError(f"{path}: nested too deeply to be a mergekit configuration") from exc
    if not isinstance(config, dict):
        raise CliError(f"{path}: not a mergekit configuration (the top level must be a mapping, got {type(config).__name__})")
    return config


# Signals: SIGINT, SIGTERM (timeout, Slurm, Docker, systemd) and SIGHUP all stop a run the
# same way: an Interrupted exception in the main thread, cleanup, one line, 128 + signal.
# Inside deferred_signals() (publishing an output) a signal only sets a flag, and is raised
# once the output directory is in a known state.


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; KeyboardInterrupt so that every cleanup path sees it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class SignalState:
    deferring = 0
    pending: int | None = None
    stopping = False  # a signal was raised: later ones wait for the cleanup to end
    swallowed: int | None = None  # raised where Python drops exceptions (a finalizer): raised again at the next check


def _unraisable(unraisable: Any) -> None:
    """Python drops an exception raised inside a finalizer or weakref callback, printing
    "Exception ignored": for our own stop, keep it instead, for check_interrupt()."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        SignalState.swallowed = getattr(unraisable.exc_value, "signum", signal.SIGINT)
        return
    sys.__unraisablehook__(unraisable)


def check_interrupt() -> None:
    """Raise a stop whose signal arrived where Python could not raise it."""
    if SignalState.swallowed is not None and not SignalState.deferring:
        signum, SignalState.swallowed = SignalState.swallowed, None
        raise Interrupted(signum)


def _on_signal(signum: int, _frame: Any) -> None:
    if SignalState.deferring or SignalState.stopping:
        SignalState.pending = SignalState.pending or signum
        return
    SignalState.stopping = True
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_handled() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread (elsewhere, as in a
    worker thread of a caller, the process keeps its own handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable
    SignalState.deferring, SignalState.pending, SignalState.stopping, SignalState.swallowed = 0, None, False, None
    try:
        yield
        check_interrupt()
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    SignalState.deferring += 1
    try:
        yield
    finally:
        SignalState.deferring -= 1
    if not SignalState.deferring and SignalState.pending is not None and not SignalState.stopping:
        SignalState.stopping = True
        raise Interrupted(SignalState.pending)
    check_interrupt()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
MAIN_FINISHED = False  # main() has decided the outcome: a late signal changes nothing


def _signal_outside_main(signum: int, _frame: object) -> None:
    if not MAIN_FINISHED:  # before main() installs its handlers nothing was written yet
        os.write(2, f"error: interrupted ({signal_name(signum)}); nothing was written\n".encode())
        os._exit(128 + signum)


if __name__ == "__main__":
    for _signum in STOP_SIGNALS:
        signal.signal(_signum, _signal_outside_main)


def finish_main() -> None:
    """main() has decided the outcome. When the script runs as a program the process exits
    right after, and Python restores the default handlers while it exits: block the stop
    signals, so that one arriving then cannot turn a finished run into a kill."""
    global MAIN_FINISHED
    MAIN_FINISHED = True
    if __name__ == "__main__" and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


# ---- JSON, tokenizer.json and safetensors headers, read strictly -------------------------
# What the tokenizers, transformers and safetensors libraries refuse, both tools refuse
# (exit 2 naming the file); what they accept but would read two ways, too.

ADDED_TOKEN_FLAGS = ("special", "normalized", "lstrip", "rstrip", "single_word")
SPECIAL_ROLES = ("bos", "eos", "pad", "unk")
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
SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(\\u[dD][c-fC-F][0-9a-fA-F]{2})?|\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def parse_json(raw: bytes, where: object) -> Any:
    """JSON read the way the Rust libraries read it, strictly: UTF-8 without a byte-order
    mark, no key twice in one object, no lone surrogate, no NaN/Infinity."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise CliError(f"{where}: starts with a UTF-8 byte-order mark, which the tokenizers library cannot read: save it without one")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{where}: not UTF-8 text (invalid byte at offset {exc.start}; UTF-16?): save it as UTF-8") from exc
    if "\\u" in text:
        for match in SURROGATE_ESCAPE_RE.finditer(text):
            if match.group(1) is None:  # a pair has both halves; a lone half is not text
                line = text.count("\n", 0, match.start()) + 1
                raise CliError(f"{where}: line {line}: {match.group(0)} is half of a UTF-16 surrogate pair, not a character; fix the file")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        data = dict(pairs)
        if len(data) < len(pairs):
            seen: set[str] = set()
            twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
            raise CliError(
                f"{where}: the key {escape_text(twice)!r} appears twice in one object; readers disagree on which one counts: fix the file"
            )
        return data

    def no_constants(name: str) -> NoReturn:
        raise CliError(f"{where}: {name} is not valid JSON; fix the file")

    try:
        return json.loads(text, object_pairs_hook=unique_keys, parse_constant=no_constants)
    except json.JSONDecodeError as exc:
        raise CliError(f"{where}: corrupt JSON ({exc}); re-download or fix the file") from exc
    except RecursionError as exc:
        raise CliError(f"{where}: nested too deeply to be a configuration file; the file is corrupt") from exc


def is_int(value: Any) -> bool:
    return type(value) is int  # JSON true/false are bools, and 1.0 is a float: neither is an id


def check_tokenizer_json(data: Any, where: object) -> None:
    """The structure the tokenizers library requires of tokenizer.json, checked before any
    of it is used: a model with a vocabulary, integer ids, added tokens with all their flags,
    merges as pairs."""
    if not isinstance(data, dict):
        raise CliError(f"{where}: not a tokenizer.json (expected a JSON object)")
    model = data.get("model")
    if not isinstance(model, dict):
        raise CliError(f'{where}: no "model" object in tokenizer.json')
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        if vocab and set(map(type, vocab.values())) != {int}:  # one C-speed pass over 128k ids
            token, value = next((t, v) for t, v in vocab.items() if not is_int(v))
            raise CliError(f"{where}: the id of token {escape_text(token)!r} is {value!r}, not an integer; fix tokenizer.json")
    elif isinstance(vocab, list):
        for token_id, entry in enumerate(vocab):
            if not (
                isinstance(entry, list)
                and len(entry) == 2
                and isinstance(entry[0], str)
                and isinstance(entry[1], (int, float))
                and not isinstance(entry[1], bool)
            ):
                raise CliError(f"{where}: Unigram piece {token_id} is {entry!r}, not a [piece, score] pair; fix tokenizer.json")
    else:
        raise CliError(f"{where}: no model vocabulary in tokenizer.json")
    added_tokens = data.get("added_tokens")
    if added_tokens is not None and not isinstance(added_tokens, list):
        raise CliError(f"{where}: added_tokens is not a list; fix tokenizer.json")
    for index, entry in enumerate(added_tokens or []):
        problem = None
        if not isinstance(entry, dict):
            problem = "is not an object"
        elif not isinstance(entry.get("content"), str):
            problem = 'has no text "content"'
        elif not is_int(entry.get("id")) or entry["id"] < 0:
            problem = f"has the id {entry.get('id')!r}, not a non-negative integer"
        else:
            wrong = [flag for flag in ADDED_TOKEN_FLAGS if not isinstance(entry.get(flag), bool)]
            problem = f"needs true/false for {', '.join(wrong)}" if wrong else None
        if problem:
            raise CliError(f"{where}: added_tokens[{index}] {problem} (the tokenizers library refuses it); fix tokenizer.json")
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        component = data.get(key)
        if component is not None and not (isinstance(component, dict) and isinstance(component.get("type"), str)):
            raise CliError(f'{where}: {key} is {str(component)[:60]!r}, not an object with a "type"; fix tokenizer.json')
    merges = model.get("merges")
    if merges is not None:
        if not isinstance(merges, list):
            raise CliError(f"{where}: merges is not a list; fix tokenizer.json")
        if not merges_are_pairs(merges):  # a few C-speed passes; the loop below only names the culprit
            for rank, merge in enumerate(merges):
                pair = merge.split(" ") if isinstance(merge, str) else merge
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)):
                    raise CliError(f"{where}: merge {rank} is {merge!r}, not a pair of tokens; fix tokenizer.json")


def merges_are_pairs(merges: list[Any]) -> bool:
    """Every merge "left right" (one space) or [left, right] (two strings)."""
    kinds = set(map(type, merges))
    if kinds == {str}:
        return set(map(str.count, merges, itertools.repeat(" "))) == {1}
    if kinds == {list}:
        return set(map(len, merges)) == {2} and set(map(type, itertools.chain.from_iterable(merges))) == {str}
    return not merges


def escape_text(text: str) -> str:
    """Show control, format and whitespace characters other than a space as escapes."""
    named = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}
    out = []
    for char in text:
        if char in named:
            out.append(named[char])
        elif "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8, kept by surrogateescape
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif unicodedata.category(char)[0] in "CZ" and char != " ":
            out.append(f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def model_vocab_from_json(tokenizer_json: Mapping[str, Any], where: object) -> Mapping[str, int]:
    """The model's own token->id, added tokens not included, as the tokenizers library
    reads it (a Unigram vocabulary is a list of [piece, score] pairs in id order)."""
    raw = tokenizer_json["model"]["vocab"]
    return {entry[0]: token_id for token_id, entry in enumerate(raw)} if isinstance(raw, list) else raw


def vocab_from_json(tokenizer_json: Mapping[str, Any], where: object) -> dict[str, int]:
    """token->id as tokenizer.json declares it (model vocabulary, then added tokens),
    refused when ambiguous: two tokens on one id, gaps, or an added token declared at an
    id other than its vocabulary id."""
    vocab = dict(model_vocab_from_json(tokenizer_json, where))
    for added in tokenizer_json.get("added_tokens") or []:
        content, declared = added["content"], added["id"]
        if not content:  # the tokenizers library skips an added token without content
            continue
        if vocab.get(content, declared) != declared:
            raise CliError(
                f"{where}: added token {escape_text(content)!r} is declared at id {declared} but the vocabulary has it "
                f"at id {vocab[content]}; fix tokenizer.json"
            )
        vocab[content] = declared
    if set(vocab.values()) == set(range(len(vocab))):
        return vocab
    by_id: dict[int, str] = {}  # slow path, only to name the problem
    for token, token_id in vocab.items():
        if token_id in by_id:
            raise CliError(
                f"{where}: tokens {escape_text(by_id[token_id])!r} and {escape_text(token)!r} share id {token_id}; "
                "the vocabulary is corrupt (re-download or fix tokenizer.json)"
            )
        by_id[token_id] = token
    missing = next(i for i in range(len(by_id)) if i not in by_id)
    raise CliError(
        f"{where}: token ids are not 0..{len(by_id) - 1} (the first missing id is {missing}); "
        "fast tokenizers assume contiguous ids: fix tokenizer.json"
    )


def library_added_token_ids(
    model_vocab: Mapping[str, int], model_vocab_size: int, added_tokens: Sequence[Mapping[str, Any]]
) -> dict[str, int]:
    """The ids the tokenizers library gives the added tokens when it loads tokenizer.json,
    whatever ids the file declares: in file order, a token the model vocabulary has keeps
    that id, every other one gets the next id after the model vocabulary; empty contents
    are skipped. (Library versions differ on a model vocabulary that is not 0..n-1, where
    this is refused either way.) tests/test_compare.py checks it against the installed
    library."""
    ids: dict[str, int] = {}
    next_id = model_vocab_size
    for entry in added_tokens:
        content = entry.get("content")
        if not content or content in ids:
            continue
        if content in model_vocab:
            ids[content] = model_vocab[content]
        else:
            ids[content], next_id = next_id, next_id + 1
    return ids


def read_vocabulary(tokenizer_json: Any, where: object, *, structure_checked: bool = False) -> dict[str, int]:
    """token->id of a tokenizer.json, after every check that it loads as declared
    (structure_checked: check_tokenizer_json has already run on this document)."""
    if not structure_checked:
        check_tokenizer_json(tokenizer_json, where)
    vocab = vocab_from_json(tokenizer_json, where)
    if not vocab:
        raise CliError(f"{where}: the tokenizer has no tokens; fix or re-download tokenizer.json")
    model_vocab = model_vocab_from_json(tokenizer_json, where)
    for content, loaded in library_added_token_ids(
        model_vocab, len(tokenizer_json["model"]["vocab"]), tokenizer_json.get("added_tokens") or []
    ).items():
        if loaded != vocab.get(content):
            raise CliError(
                f"{where}: added token {escape_text(content)!r} is declared at id {vocab.get(content)} but the tokenizers "
                f"library loads it at id {loaded} (not in the model vocabulary and not numbered right after it); "
                "fix tokenizer.json"
            )
    return vocab


def special_token_content(value: Any) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_special_tokens(
    tokenizer_json: Mapping[str, Any], tokenizer_config: Mapping[str, Any], special_map: Mapping[str, Any]
) -> dict[str, str | None]:
    """bos/eos/pad/unk as transformers reads them: tokenizer_config.json, then
    special_tokens_map.json; unk also from the model itself."""
    roles: dict[str, str | None] = {}
    model = tokenizer_json.get("model") or {}
    for role in SPECIAL_ROLES:
        key = f"{role}_token"
        token = special_token_content(tokenizer_config.get(key)) or special_token_content(special_map.get(key))
        if token is None and role == "unk":
            if isinstance(model.get("unk_token"), str):
                token = model["unk_token"]
            elif is_int(model.get("unk_id")) and model.get("type") == "Unigram" and 0 <= model["unk_id"] < len(model["vocab"]):
                token = model["vocab"][model["unk_id"]][0]
        roles[role] = token
    return roles


def check_special_tokens(
    vocab: Mapping[str, int],
    roles: Mapping[str, str | None],
    tokenizer_config: Mapping[str, Any],
    special_map: Mapping[str, Any],
    directory: Path,
) -> None:
    """transformers appends every special token it is told about but cannot find as a new
    id, so the vocabulary it loads would be larger than tokenizer.json's: refuse that."""
    named: list[tuple[str, Any]] = [(f"{role}_token", token) for role, token in roles.items()]
    for source in (tokenizer_config, special_map):
        extra = source.get("additional_special_tokens") or []
        named += [("additional_special_tokens entry", token) for token in (extra if isinstance(extra, list) else [])]
        extra = source.get("extra_special_tokens") or []
        named += [
            ("extra_special_tokens entry", token)
            for token in (extra.values() if isinstance(extra, Mapping) else extra if isinstance(extra, list) else [])
        ]
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    named += [("added_tokens_decoder entry", entry) for entry in (decoder.values() if isinstance(decoder, Mapping) else [])]
    for key, value in named:
        token = special_token_content(value)
        if token is not None and token not in vocab:
            raise CliError(
                f"{directory / 'tokenizer_config.json'}: {key} {escape_text(token)!r} is not in the vocabulary "
                f"(transformers would append it as a new id {len(vocab)}); fix the file or the vocabulary"
            )


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


# ---- mergekit configurations ------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A model of a mergekit configuration: `path[@revision][+lora]`."""

    path: str
    revision: str | None = None
    lora: str | None = None

    def __str__(self) -> str:
        text = f"{self.path}@{self.revision}" if self.revision else self.path
        return f"{text}+{self.lora}" if self.lora else text


def parse_model_reference(value: Any) -> ModelRef:
    """A mergekit model reference, as a string (`path@rev+lora`) or its dict form."""
    if isinstance(value, Mapping):
        model, lora = value.get("model"), value.get("lora")
        if isinstance(model, Mapping):
            path, revision = model.get("path"), model.get("revision")
        else:
            path, revision = split_revision(str(model)) if model is not None else (None, None)
        if isinstance(lora, Mapping):
            lora = lora.get("path")
        if not path:
            raise CliError(f"cannot read the model reference {value!r}")
        return ModelRef(str(path), revision, str(lora) if lora else None)
    if not isinstance(value, str) or not value:
        raise CliError(f"cannot read the model reference {value!r}")
    model_part, _, lora = value.partition("+")
    path, revision = split_revision(model_part)
    return ModelRef(path, revision, lora or None)


def map_model_references(config: Any, change: Callable[[Any], Any], where: object = "the mergekit configuration") -> dict[str, Any]:
    """A copy of a mergekit configuration with every model reference replaced by
    change(reference): models[].model, slices[].sources[].model, slices[].base_model,
    base_model, and the same inside modules. Errors name `where` (the YAML file)."""
    if not isinstance(config, Mapping):
        raise CliError(f"{where}: not a mergekit configuration: the YAML top level must be a mapping")

    def block(part: Mapping[str, Any]) -> dict[str, Any]:
        result = dict(part)
        if part.get("models") is not None:
            if not isinstance(part["models"], list):
                raise CliError(f"{where}: models: must be a list of {{model: ...}} entries")
            result["models"] = []
            for entry in part["models"]:
                if not isinstance(entry, Mapping) or "model" not in entry:
                    raise CliError(f"{where}: models[] entry without a 'model' key: {entry!r}")
                result["models"].append({**entry, "model": change(entry["model"])})
        if part.get("slices") is not None:
            if not isinstance(part["slices"], list):
                raise CliError(f"{where}: slices: must be a list")
            result["slices"] = []
            for slice_ in part["slices"]:
                if not isinstance(slice_, Mapping) or not isinstance(slice_.get("sources"), list):
                    raise CliError(f"{where}: slices[] entry without a list of sources: {slice_!r}")
                sources = []
                for source in slice_["sources"]:
                    if not isinstance(source, Mapping) or "model" not in source:
                        raise CliError(f"{where}: slices[].sources[] entry without a 'model' key: {source!r}")
                    sources.append({**source, "model": change(source["model"])})
                new_slice = {**slice_, "sources": sources}
                if slice_.get("base_model") is not None:
                    new_slice["base_model"] = change(slice_["base_model"])
                result["slices"].append(new_slice)
        if part.get("base_model") is not None:
            result["base_model"] = change(part["base_model"])
        return result

    result = block(config)
    if config.get("modules") is not None:
        if not isinstance(config["modules"], Mapping):
            raise CliError(f"{where}: modules: must be a mapping of name -> {{models|slices}}")
        result["modules"] = {name: block(module) for name, module in config["modules"].items()}
    if not any(result.get(key) for key in ("models", "slices", "modules")):
        raise CliError(f"{where}: names no models (expected models:, slices: or modules:)")
    return result


def mergekit_references(config: Any, where: object = "the mergekit configuration") -> list[Any]:
    """Every model reference of a mergekit configuration in order of appearance, base_model
    first (references repeat where the YAML repeats them)."""
    found: list[Any] = []

    def record(reference: Any) -> Any:
        found.append(reference)
        return reference

    map_model_references(config, record, where)
    base = config.get("base_model")
    return ([base] if base is not None else []) + found


def local_or_hub(ref: ModelRef, yaml_dir: Path) -> str:
    """A model path as mergekit resolves it: against the working directory (else a Hub
    repo id). A relative path found only next to the YAML is an error, which says how to
    run: mergekit, started from here, would not find it."""
    path = Path(ref.path).expanduser()
    if path.exists():
        return str(path.resolve())
    beside = yaml_dir / ref.path
    if not path.is_absolute() and beside.exists():
        raise CliError(
            f"{ref.path}: not in the working directory {Path.cwd()}, only next to the YAML ({beside}); mergekit resolves "
            f"model paths against the working directory: run from {yaml_dir} (cd there first) or write the absolute path"
        )
    return ref.path


# ---- merges that build their own tokenizer (tokenizer_source / tokenizer:) ------------
# mergekit's tokenizer merge (mergekit/tokenizer/build.py and embed.py, 0.1.5): the
# output tokenizer is the base's (`base`), a model's, or the base's with every other
# model's tokens appended (`union`); each model's vocabulary rows are then permuted onto
# it by token, and a row a model lacks comes from `tokenizer.tokens`, else from the one
# model that holds the token, else from the base, else the mean of the holders (zero
# when no model holds it).


@dataclass(frozen=True)
class ModelVocab:
    """One model's tokens as the tokenizer merge reads them: token -> id, its added
    tokens (content -> the five flags) and the rows mergekit reads (ids at or past them
    are ghost tokens): the embedding's, or config.json's vocab_size where that is smaller
    (`embedding_rows` then keeps the embedding's own count). `merged` False: a
    tokenizer_source that is not a model of the merge (its tokens, none of its rows)."""

    name: str
    vocab: Mapping[str, int]
    added: Mapping[str, Mapping[str, bool]]
    rows: int
    merged: bool = True
    embedding_rows: int | None = None

    @functools.cached_property
    def held(self) -> dict[str, int]:
        return {token: token_id for token, token_id in self.vocab.items() if 0 <= token_id < self.rows}


@dataclass(frozen=True)
class RowFill:
    """Where a row a model lacks comes from: the mean of `models`' rows of `token` (or of
    their row `token_id`), one model's row when `models` has one entry, zero when none."""

    rule: str  # holder (the one model that has it) | base | mean | zero | tokens (tokenizer.tokens)
    models: tuple[str, ...] = ()
    token: str | None = None
    token_id: int | None = None

    def describe(self) -> str:
        if not self.models:
            return "zero"
        of = (
            f" (its row of {self.token!r})"
            if self.token is not None
            else f" (its row {self.token_id})"
            if self.token_id is not None
            else ""
        )
        return f"{'mean of ' if len(self.models) > 1 else ''}{', '.join(self.models)}{of}"


@dataclass(frozen=True)
class MergedVocab:
    """The tokenizer a merge with tokenizer_source gets and, per model, the rows it lacks:
    `fills` for the input embedding, `output_fills` for lm_head (they differ where mergekit
    takes the two from different models: slices, the first and the last)."""

    source: str  # union | base | a model
    base: str  # the model whose tokenizer a union or `base` extends (base_model, else the first model)
    tokens: tuple[str, ...]  # the output tokenizer's tokens in id order
    appended: Mapping[str, Mapping[str, bool]]  # tokens the merged tokenizer adds as added tokens -> flags
    added_by: Mapping[str, tuple[str, ...]]  # model -> tokens it brings that the base lacks
    fills: Mapping[str, Mapping[str, RowFill]]  # model -> token -> where its input embedding row comes from
    ghosts: Mapping[str, tuple[tuple[str, int], ...]]  # model -> tokens at ids past its rows
    size: int  # rows of the merged model (pad_to_multiple_of applied)
    problems: tuple[str, ...] = ()  # what makes mergekit refuse the configuration
    unreadable: tuple[str, ...] = ()  # ghost tokens mergekit fails on (the alignment fills them)
    warnings: tuple[str, ...] = ()
    output_fills: Mapping[str, Mapping[str, RowFill]] = field(default_factory=dict)  # model -> token -> its lm_head row's source
    row_base: str | None = None  # the base_model whose row a token several models hold takes (None: their mean)
    changes: tuple[str, ...] = ()  # what the merged tokenizer changes against the base's own (the gate fills it)

    @property
    def tokenizer_model(self) -> str:
        """The model whose tokenizer the merged one extends: the base (union, base) or the source."""
        return self.base if self.source in ("union", "base") else self.source

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "base": self.base,
            "size": self.size,
            "tokens": len(self.tokens),
            "union": {"size": len(self.tokens), "added": {m: list(t) for m, t in self.added_by.items()}}
            if self.source == "union"
            else None,
            "fills": {m: {t: fill.describe() for t, fill in fills.items()} for m, fills in self.fills.items()},
            "output_fills": {
                m: {t: fill.describe() for t, fill in fills.items()} for m, fills in self.output_fills.items() if fills != self.fills.get(m)
            },
            "ghosts": {m: [{"token": t, "id": i} for t, i in ghosts] for m, ghosts in self.ghosts.items() if ghosts},
            "problems": list(self.problems + self.unreadable),
            "warnings": list(self.warnings),
            "changes": list(self.changes),
        }


def tokenizer_merge_settings(config: Mapping[str, Any]) -> tuple[str, Mapping[str, Any], int | None] | None:
    """(source, tokens, pad_to_multiple_of) of a merge that builds its tokenizer, None for
    one that merges rows by index. source: union, base, or the model's reference."""
    block = config.get("tokenizer")
    if config.get("tokenizer_source") is None and not isinstance(block, Mapping):
        return None
    block = block if isinstance(block, Mapping) else {}
    source = config.get("tokenizer_source") if config.get("tokenizer_source") is not None else block.get("source", "union")
    if isinstance(source, str) and source.startswith("model:"):
        source = source[len("model:") :]
    source = source if source in ("union", "base") else str(parse_model_reference(source))
    tokens = {str(token): setting for token, setting in block["tokens"].items()} if isinstance(block.get("tokens"), Mapping) else {}
    pad = block.get("pad_to_multiple_of")
    return source, tokens, pad if isinstance(pad, int) and not isinstance(pad, bool) and pad > 0 else None


def vocabulary_groups(config: Mapping[str, Any], name_of: Callable[[Any], str]) -> dict[str, tuple[str, ...]]:
    """The models mergekit reads each vocabulary tensor from, in its order (mergekit/plan.py):
    with models:, every model then the base_model (if not listed); with slices:, the input
    embedding from the first slice's sources, lm_head from the last slice's. Each tensor's
    rows a model lacks come from the models of its group. {} : every model, for both."""
    slices = config.get("slices")
    if not isinstance(slices, list) or not slices or config.get("models"):
        return {}

    def sources(slice_: Any) -> tuple[str, ...]:
        entries = slice_.get("sources") if isinstance(slice_, Mapping) else None
        return tuple(dict.fromkeys(name_of(s["model"]) for s in entries or [] if isinstance(s, Mapping) and s.get("model") is not None))

    return {"embed": sources(slices[0]), "head": sources(slices[-1])}


def named_tokens(tokens: Mapping[str, Any], name_of: Callable[[Any], str]) -> dict[str, Any]:
    """`tokenizer.tokens` with each model reference spelled as name_of(reference) (the
    name a model has in plan_merged_vocab), so that two spellings of one model agree; one
    that names no model of the merge stays as written (mergekit fails on it only where it
    needs the row: plan_merged_vocab says when)."""

    def spelled(reference: Any) -> str:
        try:
            return name_of(reference)
        except CliError:
            return str(parse_model_reference(reference))

    renamed: dict[str, Any] = {}
    for token, setting in tokens.items():
        source = setting.get("source") if isinstance(setting, Mapping) else None
        if isinstance(source, Mapping) and source.get("kind") == "model_token" and source.get("model") is not None:
            source = {**source, "model": spelled(source["model"])}
        elif source is not None and not isinstance(source, Mapping):
            source = spelled(source)
        renamed[token] = {**setting, "source": source} if isinstance(setting, Mapping) else setting
    return renamed


PLAIN_FLAGS = {
    "special": False,
    "normalized": True,
    "lstrip": False,
    "rstrip": False,
    "single_word": False,
}  # transformers' add_tokens("x")


def merged_tokens(
    models: Sequence[ModelVocab], base: ModelVocab, source: str, extra: Iterable[str]
) -> tuple[list[str], dict[str, Mapping[str, bool]], list[str]]:
    """The output tokenizer's tokens in id order, those it adds as added tokens (with
    flags), and warnings, as build_tokenizer orders them: the base's (held) tokens; for a
    union then every other model's regular tokens, then every added token (first flags win;
    one the base holds as a regular token becomes an added token at its id, as transformers'
    add_tokens makes it); then the tokens of `tokenizer.tokens`."""
    if source not in ("union", "base"):
        chosen = next(m for m in models if m.name == source)
        tokens = sorted(chosen.vocab, key=chosen.vocab.__getitem__)
    else:
        held = base.held
        tokens = sorted(held, key=held.__getitem__)
    seen = set(tokens)
    appended: dict[str, Mapping[str, bool]] = {}
    warnings: list[str] = []

    def append(token: str, flags: Mapping[str, bool]) -> None:
        if token not in seen:
            seen.add(token)
            tokens.append(token)
            appended[token] = flags

    order = [base, *(m for m in models if m is not base and m.merged)]
    if source == "union":
        added_anywhere = {token for m in order for token in m.added if token in m.held}
        for m in order:
            held = m.held
            for token in sorted(held, key=held.__getitem__):
                if token not in added_anywhere:
                    append(token, PLAIN_FLAGS)
        first: dict[str, str] = {}
        for m in order:
            held = m.held
            for token in sorted((t for t in m.added if t in held), key=held.__getitem__):
                if token in base.held and token not in base.added:
                    appended.setdefault(token, m.added[token])
                append(token, m.added[token])
                if token in first and dict(m.added[token]) != dict(appended.get(token, m.added[token])) and first[token] != base.name:
                    warnings.append(
                        f"{token!r} is added by {first[token]} and {m.name} with different flags: mergekit keeps the flags of the "
                        f"model it reads first, which changes from run to run (it iterates a set); the alignment takes {first[token]}'s"
                    )
                first.setdefault(token, m.name)
    for token in extra:
        append(token, PLAIN_FLAGS)
    return tokens, appended, warnings


def configured_fill(token: str, setting: Any, by_name: Mapping[str, ModelVocab]) -> RowFill | str:
    """A `tokenizer.tokens` entry's source as a RowFill, or why mergekit fails on it
    (`by_name`: the models mergekit reads the tensor from)."""
    source = setting.get("source") if isinstance(setting, Mapping) else None
    if isinstance(source, Mapping) and source.get("kind") == "zero":
        return RowFill("tokens")
    if isinstance(source, Mapping) and source.get("kind") == "model_token":
        model = str(parse_model_reference(source.get("model")))
        if model not in by_name:
            return f"tokenizer.tokens[{token!r}]: its source {model} is not a model of the merge"
        if source.get("token_id") is not None:
            token_id = source["token_id"]
            if not is_int(token_id) or not 0 <= token_id < by_name[model].rows:
                return f"tokenizer.tokens[{token!r}]: token_id {token_id!r} is not a row of {model} ({by_name[model].rows} rows)"
            return RowFill("tokens", (model,), token_id=int(token_id))
        if source.get("token") not in by_name[model].held:
            return f"tokenizer.tokens[{token!r}]: {model} has no token {source.get('token')!r}"
        return RowFill("tokens", (model,), token=str(source["token"]))
    if source is None:
        return f"tokenizer.tokens[{token!r}]: no source (mergekit needs source: a model, {{kind: zero}} or {{kind: model_token, ...}})"
    model = str(parse_model_reference(source))
    if model not in by_name:
        return f"tokenizer.tokens[{token!r}]: its source {model} is not a model of the merge"
    if token not in by_name[model].held:
        return f"tokenizer.tokens[{token!r}]: its source {model} lacks the token"
    return RowFill("tokens", (model,))


@dataclass(frozen=True)
class FillTable:
    """The rows of one vocabulary tensor that mergekit fills (plan_merged_vocab), for the
    models it reads the tensor from."""

    fills: dict[str, dict[str, RowFill]]
    problems: list[str]
    warnings: list[str]


def fill_table(out: Sequence[str], members: Sequence[ModelVocab], row_base: str | None, tokens: Mapping[str, Any], where: str) -> FillTable:
    """PermutedVocabulary's choice for every token some member lacks (or a forced one): a
    `tokenizer.tokens` source; else the one member that holds it, the base's row, the mean
    of the holders' in member order, or zero. A `tokenizer.tokens` entry is evaluated only
    where mergekit evaluates it."""
    held = {m.name: m.held for m in members}
    by_name = {m.name: m for m in members}
    forced = {t for t, s in tokens.items() if isinstance(s, Mapping) and s.get("force")}
    shared: dict[str, RowFill] = {}
    problems, warnings = [], []
    for token in out:
        owners = tuple(m.name for m in members if token in held[m.name])
        setting = tokens.get(token)
        if len(owners) == len(members) and token not in forced:
            continue
        if setting is not None:
            fill = configured_fill(token, setting, by_name)
            if isinstance(fill, str):
                problems.append(fill)
                continue
        else:
            if not owners:
                warnings.append(f"{token!r} is held by no model{where}: its row is zero")
            rule = "holder" if len(owners) == 1 else "zero" if not owners else "base" if row_base in owners else "mean"
            fill = RowFill(rule, (row_base,) if rule == "base" and row_base is not None else owners)
        shared[token] = fill
    fills = {m.name: {t: f for t, f in shared.items() if t not in held[m.name] or t in forced} for m in members}
    return FillTable(fills, problems, warnings)


def plan_merged_vocab(
    models: Sequence[ModelVocab],
    base_name: str | None,
    source: str,
    tokens: Mapping[str, Any],
    pad_to_multiple_of: int | None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> MergedVocab:
    """The tokenizer merge of mergekit, decided from the models' vocabularies alone (pure).
    `base_name`: the base_model (None: the union extends the first model's tokenizer, and a
    token several models hold takes the mean of their rows). `groups`: vocabulary_groups.
    A ghost token of the output's vocabulary in any model but the one whose tokenizer the
    merge extends (mergekit strips its ghosts) is a problem: mergekit fails on it."""
    merging = [m for m in models if m.merged]
    base = next((m for m in merging if m.name == base_name), merging[0])
    if source not in ("union", "base") and source not in {m.name for m in models}:
        raise CliError(f"tokenizer source {source} is neither a model of the merge nor read")
    out, appended, warnings = merged_tokens(models, base, source, tokens)
    row_base = base.name if base_name is not None else None
    problems: list[str] = []
    tables: dict[str, dict[str, dict[str, RowFill]]] = {}
    for role in ("embed", "head"):
        names = list((groups or {}).get(role) or [m.name for m in merging])
        members = sorted((m for m in merging if m.name in names), key=lambda m: names.index(m.name))
        where = f" that mergekit takes the {'input embedding' if role == 'embed' else 'lm_head'} from" if groups else ""
        table = fill_table(out, members, row_base if row_base in names else None, tokens, where)
        # a model outside the group: mergekit never reads this tensor of it; the merge's rows will do
        everyone = fill_table(out, merging, row_base, tokens, "") if len(members) < len(merging) else table
        tables[role] = {m.name: table.fills.get(m.name, everyone.fills[m.name]) for m in merging}
        problems += table.problems
        warnings += table.warnings
    read = {name for group in (groups or {}).values() for name in group} or {m.name for m in merging}
    output = set(out)
    unreadable = [
        ghost_problem(m, token, token_id)
        for m in merging
        if m is not base and m.name in read
        for token, token_id in sorted(m.vocab.items(), key=lambda item: item[1])
        if token_id >= m.rows and token in output
    ]
    return MergedVocab(
        source=source,
        base=base.name,
        tokens=tuple(out),
        appended=appended,
        added_by={m.name: tuple(t for t in out if t in m.held and t not in base.held) for m in merging if m is not base},
        fills=tables["embed"],
        ghosts={m.name: tuple(sorted(((t, i) for t, i in m.vocab.items() if i >= m.rows), key=lambda item: item[1])) for m in merging},
        size=round_up(len(out), pad_to_multiple_of),
        problems=tuple(dict.fromkeys(problems)),
        unreadable=tuple(unreadable),
        warnings=tuple(dict.fromkeys(warnings)),
        output_fills=tables["head"],
        row_base=row_base,
    )


def ghost_problem(model: ModelVocab, token: str, token_id: int) -> str:
    """Why mergekit's tokenizer merge fails on a model that lists `token` past its rows."""
    fix = "remap_tokenizer.py --mergekit-config fills the row from the models that hold it"
    if model.embedding_rows is not None and model.embedding_rows > model.rows:
        return (
            f"{model.name}'s config.json says vocab_size {model.rows}, below its {model.embedding_rows} embedding rows: mergekit's "
            f"tokenizer merge fails on {token!r} (id {token_id}; KeyError); {fix} and writes a consistent config.json"
        )
    return (
        f"{model.name} lists {token!r} at id {token_id}, past its {model.rows} embedding rows (a ghost token): "
        f"mergekit's tokenizer merge fails on it; {fix}"
    )


def merged_tokenizer_json(document: Mapping[str, Any], merged: MergedVocab, where: object) -> dict[str, Any]:
    """The merged tokenizer's tokenizer.json: `document` (that of merged.tokenizer_model)
    without the tokens the merge drops (its ghost tokens), with the appended tokens as added
    tokens at their ids, flags kept (what mergekit's add_tokens makes of them)."""
    position = {token: token_id for token_id, token in enumerate(merged.tokens)}
    vocab = vocab_from_json(document, where)
    moved = next((token for token, token_id in vocab.items() if token in position and position[token] != token_id), None)
    if moved is not None:
        raise CliError(f"{where}: its token ids are not contiguous (e.g. {moved!r}); the merged tokenizer cannot extend it")
    data = {**document, "model": dict(document["model"]), "added_tokens": list(document.get("added_tokens") or [])}
    dropped = {token for token in vocab if token not in position}
    if dropped:
        strip_tokens(data, dropped, where)
    for token, flags in merged.appended.items():
        data["added_tokens"].append({"id": position[token], "content": token, **{f: bool(flags[f]) for f in ADDED_TOKEN_FLAGS}})
    return data


def strip_tokens(data: dict[str, Any], dropped: set[str], where: object) -> None:
    """Remove ghost tokens from a tokenizer.json (vocabulary, merges, added tokens)."""
    model = data["model"]
    if not isinstance(model.get("vocab"), dict):
        raise CliError(f"{where}: ghost tokens in a {model.get('type')} tokenizer cannot be dropped (only BPE and WordPiece)")
    model["vocab"] = {token: token_id for token, token_id in model["vocab"].items() if token not in dropped}
    if isinstance(model.get("merges"), list):
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        model["merges"] = [m for m, p in zip(model["merges"], pairs) if dropped.isdisjoint((*p, "".join(p)))]
    data["added_tokens"] = [entry for entry in data.get("added_tokens") or [] if entry.get("content") not in dropped]


def round_up(value: int, multiple: int | None) -> int:
    return value if not multiple else -(-value // multiple) * multiple


class LogFormatter(logging.Formatter):
    """`warning: ...` and `error: ...` as the one-line errors read; plain text for progress."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return printable(message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}")


def printable(text: str) -> str:
    """Text that stderr can take whatever its encoding: lone surrogates and characters it
    cannot encode become backslash escapes instead of a UnicodeEncodeError."""
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


def print_error(message: str) -> None:
    """The one `error: ...` line of a failed run."""
    sys.stderr.write(printable("error: " + " ".join(str(message).splitlines())) + "\n")


def configure_logging(debug: bool) -> None:
    """Logs go to the current stderr (tests swap it), never to stdout."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


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


def iter_components(node: Any) -> Iterator[Mapping[str, Any]]:
    """Every dict inside a tokenizer.json component (Sequence members included)."""
    if isinstance(node, Mapping):
        yield node
        for value in node.values():
            yield from iter_components(value)
    elif isinstance(node, list):
        for value in node:
            yield from iter_components(value)


def detect_convention(tokenizer_json: Mapping[str, Any]) -> str:
    """How regular tokens spell text: `byte_level` (GPT-2 byte map, `Ġ` for a space),
    `metaspace` (SentencePiece, `▁` for a space), `wordpiece` (BERT: `##` continues a
    word, every other piece starts one) or `plain`."""
    model = tokenizer_json.get("model")
    if isinstance(model, Mapping) and model.get("type") == "WordPiece":
        return "wordpiece"
    parts = [tokenizer_json.get(key) for key in ("normalizer", "pre_tokenizer", "decoder")]
    types = {component.get("type") for component in iter_components(parts) if isinstance(component.get("type"), str)}
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types:
        return "metaspace"
    for component in iter_components(parts):
        if component.get("type") == "Replace" and "▁" in json.dumps(component, ensure_ascii=False):
            return "metaspace"
    return "plain"


def tokenizers_library(where: object, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """call(*args) into the tokenizers library. Whatever it raises, a Rust panic included
    (PanicException, which is no Exception), means that it cannot use the file."""
    try:
        return call(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - PanicException derives from BaseException
        detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"{where}: not a valid tokenizer.json ({detail})") from exc


def read_chat_template(directory: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The chat template as transformers finds it: chat_template.jinja, chat_template.json,
    then tokenizer_config.json (several named templates are shown as sorted JSON)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"{jinja}: cannot read it as UTF-8 text ({exc})") from exc
    template = read_optional_json(directory / "chat_template.json").get("chat_template", tokenizer_config.get("chat_template"))
    if isinstance(template, list):
        return json.dumps(template, ensure_ascii=False, sort_keys=True)
    return template if isinstance(template, str) else None


def template_special_tokens(template: str | None, tokens: Iterable[str]) -> list[str]:
    """Which of `tokens` (added and special tokens) a chat template writes out literally."""
    return [token for token in tokens if template and len(token) > 1 and token in template]


INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight", "tok_embeddings.weight")
OUTPUT_EMBEDDING_SUFFIXES = ("lm_head.weight", "embed_out.weight", "lm_head.linear.weight", "output.weight")


# Names of tensors that hold a row (or a value) per token: second input embeddings and
# heads (DeepSeek-V3's MTP layers, Medusa), per-layer embeddings (Gemma-3n), logit biases,
# and the per-row scales of quantized heads (bitsandbytes SCB, FP8 weight_scale).
PER_TOKEN_NAME_RE = re.compile(
    r"(embed_tokens|word_embeddings|tok_embeddings|(^|\.)wte\.|embed_in\.|lm_head|embed_out|shared_head\.head|medusa_head|"
    r"(^|\.)head\.|logits?_bias|(^|\.)output\.)"
)
NOT_PER_TOKEN_NAME_RE = re.compile(r"(norm|position|wpe|rotary|inv_freq)", re.IGNORECASE)


def per_token_name(name: str) -> bool:
    return bool(PER_TOKEN_NAME_RE.search(name)) and not NOT_PER_TOKEN_NAME_RE.search(name)


def vocab_axis_last(shape: Sequence[int], rows: int) -> bool:
    """A [1, V] tensor (final_logits_bias): its tokens run along the last axis."""
    return len(shape) == 2 and shape[0] == 1 and shape[1] == rows and rows != 1


# Per-token tensors that must have exactly the embedding's rows (a second input embedding,
# a second head, a logit bias); a count of their own means a half-resized checkpoint.
SAME_ROWS_NAME_RE = re.compile(r"(embed_tokens|word_embeddings|tok_embeddings|head\.weight$|logits?_bias$|lm_head\.bias$)")


def vocab_tensors_off(shapes: Mapping[str, Sequence[int]], rows: int) -> list[tuple[str, int | None]]:
    """(name, token count) of the tensors named SAME_ROWS_NAME_RE whose count is not `rows`."""
    found = []
    for name, shape in shapes.items():
        if per_token_name(name) and SAME_ROWS_NAME_RE.search(name) and len(shape) in (1, 2):
            count = token_count(shape, rows)
            if count != rows:
                found.append((name, count))
    return found


def token_count(shape: Sequence[int], rows: int) -> int | None:
    """How many tokens a per-token tensor has rows for (its first dimension; the last for
    a [1, N] bias), None for a scalar."""
    if not shape:
        return None
    return shape[1] if len(shape) == 2 and shape[0] == 1 and shape[1] != 1 and rows != 1 else shape[0]


# ---- the merge as a whole: architectures, tensors, layers, merge method ------------------
# What mergekit refuses, or silently settles with the base model's value, read from
# config.json and safetensors headers only.

ARCH_MUST_MATCH = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
ARCH_INHERITED = (
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "hidden_act",
    "hidden_activation",
    "sliding_window",
    "attention_bias",
    "mlp_bias",
)
# mergekit 0.1.5's merge methods: name -> (what it does with base_model: required,
# optional or ignored; its parameters without a default, as (name, scope): `input` for every
# model, `non_base` for every model but the base, `shared` once). The gate validates with
# this table (importing mergekit means importing torch: seconds); the alignment asks the
# installed mergekit itself, and tests/test_mergekit_config.py checks the two agree.
MERGEKIT_METHODS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "linear": ("ignored", (("weight", "input"),)),
    "slerp": ("required", (("t", "shared"),)),
    "nuslerp": ("optional", (("weight", "non_base"),)),
    "multislerp": ("optional", (("weight", "non_base"),)),
    "nearswap": ("required", (("t", "shared"),)),
    "ram": ("required", ()),
    "ramplus_tl": ("required", ()),
    "sce": ("required", ()),
    "passthrough": ("ignored", ()),
    "model_stock": ("required", ()),
    "arcee_fusion": ("required", ()),
    "karcher": ("ignored", ()),
    **{
        name: ("required", (("weight", "non_base"),))
        for name in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
    },
}
MERGEKIT_DTYPES = ("bfloat16", "float16", "float32", "float64", "int64")  # mergekit.common.dtype_from_name ("torch." prefix allowed)


def installed_mergekit_methods() -> dict[str, tuple[str, tuple[tuple[str, str], ...]]] | None:
    """MERGEKIT_METHODS as the installed mergekit's registry has them, None without mergekit."""
    import importlib.util

    if importlib.util.find_spec("mergekit") is None:
        return None
    from mergekit.merge_methods import registry

    return {
        method.spec.name: (method.spec.contract.base.value, tuple((p.name, p.scope.value) for p in method.spec.parameters if p.required))
        for method in registry.registered_methods()
    }


def mergekit_config_problems(config: Mapping[str, Any], methods: Mapping[str, tuple[str, tuple[tuple[str, str], ...]]]) -> list[str]:
    """What mergekit refuses in a configuration, from the YAML alone: an unknown
    merge_method (with the name it was likely meant to be), a base_model the method needs,
    a parameter without a default that no model gives, an unknown dtype, a model listed twice."""
    problems = []
    method = config.get("merge_method")
    if not isinstance(method, str) or method not in methods:
        close = difflib.get_close_matches(str(method).lower().replace("-", "_").replace(" ", "_"), list(methods), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else f" (mergekit's methods: {', '.join(sorted(methods))})"
        return [f"merge_method {method!r} is not a mergekit merge method{hint}"]
    base_policy, required = methods[method]
    if base_policy == "required" and config.get("base_model") is None:
        problems.append(f"merge_method {method} needs a base_model, and the configuration names none")
    for key in ("dtype", "out_dtype"):
        value = config.get(key)
        if value is not None and str(value).removeprefix("torch.") not in MERGEKIT_DTYPES:
            problems.append(f"{key} {value!r} is not one mergekit knows ({', '.join(MERGEKIT_DTYPES)})")
    if config.get("tokenizer_source") is not None and config.get("tokenizer") is not None:
        problems.append("tokenizer_source and tokenizer: are both given (mergekit: 'Cannot specify both'); keep one")
    models = config.get("models") if isinstance(config.get("models"), list) else []
    base = model_identity(config["base_model"]) if config.get("base_model") is not None else None
    shared = config.get("parameters") if isinstance(config.get("parameters"), Mapping) else {}
    seen: set[str] = set()
    for index, entry in enumerate(models):
        if not isinstance(entry, Mapping) or entry.get("model") is None:
            continue
        identity = model_identity(entry["model"])
        if identity in seen:
            problems.append(f"models[{index}]: {parse_model_reference(entry['model'])} is listed twice")
        seen.add(identity)
        given = entry.get("parameters") if isinstance(entry.get("parameters"), Mapping) else {}
        for name, scope in required:
            applies = scope == "input" or (scope == "non_base" and identity != base)
            if applies and name not in given and name not in shared:
                problems.append(f"models[{index}]: merge_method {method} needs parameters: {{{name}: ...}} for this model")
    for name, scope in required:
        if (
            scope == "shared"
            and name not in shared
            and not any(isinstance(e, Mapping) and name in (e.get("parameters") or {}) for e in models)
        ):
            problems.append(f"merge_method {method} needs parameters: {{{name}: ...}}")
    return problems


def model_identity(reference: Any) -> str:
    """A model reference as mergekit tells models apart: path, revision and LoRA as written
    (two spellings of one folder are two inputs to it; the same spelling twice is a duplicate)."""
    return str(parse_model_reference(reference))


LAYER_RE = re.compile(r"(^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
LAYER_INDEX_RE = re.compile(r"((?:^|\.)(?:layers|h|blocks|layer)\.)\d+\.")


@dataclass(frozen=True)
class ModelFacts:
    """A model as the merge check sees it: config.json and its tensors' dtypes and shapes
    (None when it has no safetensors headers to read)."""

    config: Mapping[str, Any]
    tensors: Mapping[str, tuple[str, tuple[int, ...]]] | None

    def value(self, key: str) -> Any:
        text = self.config.get("text_config")
        return text[key] if isinstance(text, Mapping) and key in text and key not in self.config else self.config.get(key)

    def layers(self) -> int | None:
        """The layer count mergekit iterates: config.json's (else the tensors' highest layer + 1)."""
        value = self.value("num_hidden_layers") or self.value("n_layer")
        if is_int(value):
            return value
        found = {int(m.group(2)) for name in self.tensors or () for m in [LAYER_RE.search(name)] if m}
        return max(found) + 1 if found else None


def layer_template(tensors: Mapping[str, tuple[str, tuple[int, ...]]], keep_index: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensors with the layer index taken out (`model.layers.N.mlp...` -> `model.layers.*.mlp...`;
    `keep_index`: left in), vocabulary tensors left out."""
    vocab = INPUT_EMBEDDING_SUFFIXES + OUTPUT_EMBEDDING_SUFFIXES + tuple(s.replace(".weight", ".bias") for s in OUTPUT_EMBEDDING_SUFFIXES)
    return {name if keep_index else LAYER_INDEX_RE.sub(r"\1*.", name): info for name, info in tensors.items() if not name.endswith(vocab)}


def compare_models(base: ModelFacts, other: ModelFacts, strict: bool, same_layers: bool) -> list[tuple[str, str]]:
    """(level, message) differences of `other` from `base`: fail, warn (fail with strict) or info."""
    found: list[tuple[str, str]] = []
    for key in ARCH_MUST_MATCH:
        if base.value(key) != other.value(key) and not (key == "head_dim" and None in (base.value(key), other.value(key))):
            found.append(("fail", f"{key} {other.value(key)!r}, the base has {base.value(key)!r}"))
    for key in ARCH_INHERITED:
        if base.value(key) != other.value(key):
            found.append(
                ("fail" if strict else "warn", f"{key} {other.value(key)!r}: the merged model takes the base's {base.value(key)!r}")
            )
    if bool(base.value("tie_word_embeddings")) != bool(other.value("tie_word_embeddings")):
        found.append(("info", "tie_word_embeddings differs (mergekit merges a tied embedding into lm_head)"))
    if same_layers and base.layers() != other.layers():
        found.append(
            (
                "fail",
                f"{other.layers()} layers, the base has {base.layers()} (mergekit: "
                "all inputs to a slice must have the same number of layers)",
            )
        )
    if base.tensors is not None and other.tensors is not None:
        # the same layers of both are merged (models:): every tensor of every layer must be in both; slices: by layer template
        ours, theirs = (layer_template(t, keep_index=same_layers) for t in (base.tensors, other.tensors))
        missing = sorted(set(ours) ^ set(theirs), key=lambda name: (name not in theirs, name))
        if missing:
            shown = ", ".join(f"{name} ({'only OTHER' if name in theirs else 'only the base'})" for name in missing[:3])
            found.append(
                ("fail", f"{len(missing)} tensor name(s) only in one of the two (mergekit: 'required but not present'), e.g. {shown}")
            )
        shapes = [name for name in sorted(set(ours) & set(theirs)) if ours[name][1] != theirs[name][1]]
        if shapes:
            found.append(
                (
                    "fail",
                    f"{len(shapes)} tensor(s) of another shape, e.g. {shapes[0]} "
                    f"{list(theirs[shapes[0]][1])} vs {list(ours[shapes[0]][1])}",
                )
            )
        dtypes = [name for name in sorted(set(ours) & set(theirs)) if ours[name][0] != theirs[name][0]]
        if dtypes:
            found.append(
                ("warn", f"{len(dtypes)} tensor(s) of another dtype, e.g. {dtypes[0]} {theirs[dtypes[0]][0]} vs {ours[dtypes[0]][0]}")
            )
    return found


def check_merge_config(config: Mapping[str, Any], facts: Callable[[Any], ModelFacts | None]) -> list[str]:
    """Problems of the configuration itself: a method that needs base_model without one;
    slices whose layer ranges leave their model or whose sources differ in length."""
    problems = []
    method = str(config.get("merge_method", "")).lower()
    for index, slice_ in enumerate(config.get("slices") or []):
        lengths = set()
        for source in slice_.get("sources") or [] if isinstance(slice_, Mapping) else []:
            layer_range = source.get("layer_range") if isinstance(source, Mapping) else None
            if not (
                isinstance(layer_range, list)
                and len(layer_range) == 2
                and all(map(is_int, layer_range))
                and 0 <= layer_range[0] <= layer_range[1]
            ):
                problems.append(f"slices[{index}]: layer_range {layer_range!r} is not [start, end]")
                continue
            lengths.add(layer_range[1] - layer_range[0])
            model = facts(source.get("model"))
            layers = model.layers() if model is not None else None
            if layers is not None and layer_range[1] > layers:
                problems.append(
                    f"slices[{index}]: layer_range {layer_range} of "
                    f"{parse_model_reference(source.get('model'))} goes past its {layers} layers"
                )
        if len(lengths) > 1 and method != "passthrough":
            problems.append(f"slices[{index}]: its sources take {sorted(lengths)} layers; mergekit needs the same number from each")
    return problems


# ---- command line scaffolding ------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are a CliError (one line, exit 2), with a "did you mean"
    for a mistyped flag (Python's own suggest_on_error arrives only in 3.14). Abbreviated
    flags are refused: `--drop-extr` is a typo, not a request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            known = [option for action in self._actions for option in action.option_strings]
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], known, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
        raise CliError(message)


def flag(name: str) -> list[str]:
    """A long option in both spellings users type, kebab-case first (what help shows):
    flag("--drop-extra") == ["--drop-extra", "--drop_extra"]."""
    kebab = name.replace("_", "-")
    snake = "--" + kebab[2:].replace("-", "_")
    return [kebab] if snake == kebab else [kebab, snake]


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code: 0 after --help / --version, 2 (one error
    line, and a JSON document with --json) for a usage error."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version print and exit
        return int(exc.code or 0)
    except CliError as exc:
        message = f"{exc} (see --help)"
        if "--json" in (sys.argv[1:] if argv is None else argv):
            print_json_error(message, 2)
        print_error(message)
        return 2


def print_json_error(message: str, code: int) -> None:
    """With --json, stdout carries one JSON document on every exit, failures included."""
    sys.stdout.write(json.dumps({"schema": f"merge_tools.{log.name}/1", "exit_code": code, "error": message}, ensure_ascii=False) + "\n")


def quoted(token: str) -> str:
    """A token as the reports show it: in single quotes, control characters escaped."""
    return "'" + escape_text(token).replace("'", "\\'") + "'"


# ---- token spellings and BPE pieces ------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte maps to one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# str.translate table from byte-level characters to the latin-1 character of their byte,
# so that `token.translate(...).encode("latin-1")` decodes a token at C speed.
BYTE_LEVEL_TO_LATIN1 = {ord(char): byte for byte, char in bytes_to_unicode().items()}
BYTE_FALLBACK_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
BYTE_FALLBACK_TOKENS = frozenset(f"<0x{byte:02X}>" for byte in range(256))


def token_bytes(token: str, convention: str, byte_fallback: bool) -> bytes:
    """The raw bytes a regular token stands for, whatever the tokenizer's spelling."""
    if byte_fallback and token.startswith("<0x"):
        match = BYTE_FALLBACK_RE.match(token)
        if match:
            return bytes([int(match.group(1), 16)])
    if convention == "byte_level":
        try:
            return token.translate(BYTE_LEVEL_TO_LATIN1).encode("latin-1")
        except UnicodeEncodeError:  # a character outside the byte-level alphabet
            return token.encode()
    if convention == "metaspace":
        return token.replace("▁", " ").encode()
    if convention == "wordpiece":  # a piece that starts a word stands for the word's leading space too
        return token[2:].encode() if token.startswith("##") and len(token) > 2 else b" " + token.encode()
    return token.encode()


def substrings(words: Iterable[str], longest: int) -> set[str]:
    """Every substring of every word, up to `longest` characters."""
    found: set[str] = set()
    for word in set(words):
        for start in range(len(word)):
            found.update(word[start:end] for end in range(start + 1, min(len(word), start + longest) + 1))
    return found


def merge_results(merges: Sequence[Sequence[str]]) -> list[str]:
    """The token each BPE merge makes ([left, right] -> left + right), computed in C."""
    return list(map(operator.add, map(operator.itemgetter(0), merges), map(operator.itemgetter(1), merges)))


def bpe_model_for_words(model: Mapping[str, Any], merged: Sequence[str], words: Iterable[str]) -> dict[str, Any]:
    """The part of a BPE model (tokenizer.json "model"; `merged`: merge_results of its
    merges) that can act on `words` (spelled as the model sees them): encoding any of
    them with it gives the same tokens and ids as with the whole model.

    BPE only merges two adjacent pieces of one word into a piece that is again a substring
    of that word, and `ignore_merges` looks the whole word up; so it can only use the
    vocabulary entries that are substrings of a word, byte-fallback tokens, the unk token,
    and merges whose result is one of those (kept in their order, which is all that rank
    means). Ids are kept. Not for continuing_subword_prefix / end_of_word_suffix models,
    whose pieces are spelled differently from the word."""
    vocab = model["vocab"]
    wanted = substrings(words, max(map(len, vocab), default=0))
    if model.get("byte_fallback"):
        wanted |= BYTE_FALLBACK_TOKENS
    if isinstance(model.get("unk_token"), str):
        wanted.add(model["unk_token"])
    kept = wanted & vocab.keys()
    return {
        **model,
        "vocab": {token: vocab[token] for token in kept},
        "merges": list(itertools.compress(model["merges"], map(kept.__contains__, merged))),
    }


def tokenizer_json_via_transformers(directory: Path) -> str:
    """tokenizer.json text for repos that only ship tokenizer.model or vocab.json +
    merges.txt: let transformers convert them (slow, and only needed here)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), use_fast=True)
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        if backend is None:
            raise ValueError("transformers returned no fast tokenizer")
        return backend.to_str()
    except Exception as exc:  # transformers raises many kinds for unconvertible input
        hint = " (SentencePiece models need `pip install sentencepiece protobuf`)" if (directory / "tokenizer.model").exists() else ""
        raise CliError(
            f"{directory}: no tokenizer.json, and transformers could not convert the tokenizer: {exc}{hint}".splitlines()[0]
        ) from exc


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: two 128k-token tokenizers make ~10^6 objects
    that all live on, so the collections they would trigger free nothing and cost ~10 %
    of a run's preparation."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.json:
        print_json_error(message, code)
    print_error(message)
    return code


def run_guarded(
    args: argparse.Namespace, run: Callable[[argparse.Namespace], int], stopped: Callable[[], str], cleanup: Callable[[], None]
) -> int:
    """run(args) with the stop signals handled and every failure turned into one line on
    stderr (and a JSON document with --json): exit 2 for bad input, 128 + signal when
    stopped (`stopped()` says what was completed), and never a traceback without --debug."""
    configure_logging(args.debug)
    show_hub_progress(sys.stderr.isatty() and not args.json)
    try:
        with signals_handled(), collection_paused():
            try:
                return run(args)
            finally:
                cleanup()
                finish_main()
    except CliError as exc:
        if args.debug:
            log.exception("traceback")
        return fail(args, str(exc), 2)
    except KeyboardInterrupt as exc:  # Ctrl-C, or Interrupted by SIGTERM / SIGHUP
        signum = getattr(exc, "signum", 2)
        return fail(args, f"interrupted ({signal_name(signum)}){stopped()}", 128 + signum)
    except OSError as exc:  # a path the file system refuses: too long, a symlink loop, no permission to list
        if args.debug:
            raise
        hints = {errno.ENAMETOOLONG: ": shorten it", errno.ELOOP: ": a loop of symbolic links", errno.EACCES: ": check its permissions"}
        name = str(exc.filename or "")
        where = f"{name[:100]}{'...' if len(name) > 100 else ''}: " if name else ""
        return fail(args, f"{where}{exc.strerror or exc}{hints.get(exc.errno or 0, '')}", 2)
    except Exception as exc:  # a bug or an input nobody foresaw: still one line, exit 2
        if args.debug:
            raise
        return fail(args, f"unexpected {type(exc).__name__}: {str(exc)[:300]} (rerun with --debug for the traceback)", 2)


# <<< shared

# numpy is imported here, after the shared block has installed the signal handlers (a
# Ctrl-C during this 0.1 s import is then one line, not a traceback), and after setting
# OpenBLAS to one thread: its threads spin for ~0.1 s of CPU once started, nothing here
# multiplies matrices with it, and the writer threads want every core. torch and
# transformers stay lazy: seconds to import, and most runs never need them.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

# ======================================================================================
# Constants of the remap
# ======================================================================================


REPORT_NAME = "remap_report.json"


REPORT_SCHEMA_ID = "merge_tools.remap_report/1"


INIT_METHODS = ("fvt", "mean", "unk", "zero", "donor", "omp")


MATCH_MODES = ("auto", "exact", "bytes")


# Files only a slow (Python) tokenizer reads: in append mode they would disagree with
# the patched tokenizer.json, so they are left out.
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx", ".npz", ".pkl", ".ot")


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # dtypes whose rows this script can average


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


COPY_CHUNK_BYTES = 2**20  # the writer's buffer: small enough to stay in the CPU cache between read, hash and write


DIRECT_IO_ALIGNMENT = 4096  # O_DIRECT offsets and lengths: a multiple of the logical block size (512 or 4096)


MAX_WRITER_THREADS = 8


ROW_CHUNK_BYTES = 8 * 2**20  # below glibc's largest mmap threshold, so chunk buffers are reused, not faulted in anew


FVT_BATCH_ROWS = 512


FVT_PRUNE_MAX_SUBSTRINGS = (
    300_000  # sum of len(text)**2 over the FVT texts past which listing their substrings costs more than building the whole BPE
)


LIST_CAP = 50  # entries per list in remap_report.json; counts are always complete


# Row sources in RemapPlan.row_source: >= 0 copies that source row.
MEAN_ROW, ZERO_ROW, FVT_ROW, DONOR_ROW, OMP_ROW = -1, -2, -3, -4, -5


class SelfCheckError(Exception):
    """The written output does not match the plan (exit code 1)."""


__version__ = "0.2.0"


# ======================================================================================
# Tokenizers in: spelling, reading, matching, FVT decompositions
# ======================================================================================


@dataclass(frozen=True)
class VocabSpec:
    """What the plan needs to know about one tokenizer, read from its files."""

    vocab: Mapping[str, int]
    added: Mapping[str, Mapping[str, bool]]  # added-token content -> flags
    roles: Mapping[str, str | None]  # bos/eos/pad/unk -> token
    convention: str = "plain"  # byte_level | metaspace | wordpiece | plain
    byte_fallback: bool = False

    def __len__(self) -> int:
        return len(self.vocab)


@dataclass(frozen=True)
class TokenizerSource:
    """A tokenizer as read from a model or tokenizer directory."""

    directory: Path
    tokenizer_json: Mapping[str, Any]
    spec: VocabSpec
    tokenizer_config: Mapping[str, Any]
    config: Mapping[str, Any]
    generation_config: Mapping[str, Any]
    on_disk: bool  # False: converted from tokenizer.model / vocab.json by transformers
    text: str  # tokenizer.json as read (or as converted)


BYTE_LEVEL_CHAR = bytes_to_unicode()


LATIN1_TO_BYTE_LEVEL = {byte: char for byte, char in BYTE_LEVEL_CHAR.items()}


def spell_bytes(data: bytes, convention: str, byte_fallback: bool) -> str | None:
    """The regular-token spelling of `data` in a convention, or None if it has none
    (invalid UTF-8 in a vocabulary without byte-level symbols or byte fallback)."""
    if convention == "byte_level":
        return data.decode("latin-1").translate(LATIN1_TO_BYTE_LEVEL)
    if byte_fallback and len(data) == 1 and data[0] >= 0x80:
        return f"<0x{data[0]:02X}>"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if convention == "wordpiece":
        return None if not text else text[1:] if text.startswith(" ") and len(text) > 1 else "##" + text
    return text.replace(" ", "▁") if convention == "metaspace" else text


def utf8_pieces(data: bytes) -> list[tuple[str | None, int | None]]:
    """Split bytes into (text, None) runs of valid UTF-8 and (None, byte) stray bytes."""
    pieces: list[tuple[str | None, int | None]] = []
    while data:
        try:
            pieces.append((data.decode("utf-8"), None))
            break
        except UnicodeDecodeError as exc:
            if exc.start:
                pieces.append((data[: exc.start].decode("utf-8"), None))
            pieces.append((None, data[exc.start]))
            data = data[exc.start + 1 :]
    return pieces


def text_bytes(token: str, spec: VocabSpec) -> bytes | None:
    """The text a token stands for, as bytes: a regular token's in its tokenizer's spelling
    convention; a non-special added token's literal content (the tokenizer splits it out of
    the text before its model runs, so `\\n` or `<table>` in Gemma's added tokens is text
    like any other; a `normalized` one matches the normalized text). None for special
    tokens, which are not text."""
    flags = spec.added.get(token)
    if flags is None:
        return token_bytes(token, spec.convention, spec.byte_fallback)
    if flags.get("special", True):
        return None
    if flags.get("normalized") and spec.convention == "metaspace":
        return token.replace("▁", " ").encode()
    return token.encode()


def is_byte_fallback_token(token: str, spec: VocabSpec) -> bool:
    return spec.byte_fallback and token in BYTE_FALLBACK_TOKENS and token not in spec.added


def emission_order(spec: VocabSpec, unreachable: frozenset[int]) -> Callable[[tuple[str, int]], tuple[bool, bool, int]]:
    """Sort key over (token, id) of one tokenizer: among tokens that spell the same bytes,
    the one the tokenizer produces for those bytes comes first (it is not `unreachable`),
    then a regular token before a byte-fallback one (`A` before `<0x41>`, which the model
    hardly ever saw), then the lowest id."""
    return lambda item: (item[1] in unreachable, is_byte_fallback_token(item[0], spec), item[1])


@dataclass(frozen=True)
class Matches:
    """Which source token each base token was matched to."""

    mode: str  # exact | bytes
    src_of_base: Mapping[int, int]
    collisions: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "matched": len(self.src_of_base),
            "collisions": len(self.collisions),
            "collision_examples": list(self.collisions[:LIST_CAP]),
        }


def match_tokens(
    base: VocabSpec,
    src: VocabSpec,
    mode: str,
    base_unreachable: frozenset[int] = frozenset(),
    src_unreachable: frozenset[int] = frozenset(),
) -> Matches:
    """Pair base ids with source ids. `exact` pairs equal spellings; `bytes` pairs added
    tokens by content, then every token that is text (regular tokens, non-special added
    tokens: text_bytes) by the bytes it stands for. When several tokens of one side spell
    the same bytes, the one its tokenizer produces for them keeps the match (emission_order)
    and the others are reported as collisions; a token its tokenizer never produces
    (`*_unreachable`, ids) neither gives nor takes a match."""
    if mode == "exact":
        return Matches("exact", {base_id: src.vocab[token] for token, base_id in base.vocab.items() if token in src.vocab})
    collisions: list[dict[str, Any]] = []
    token_of_id = {side: {i: t for t, i in spec.vocab.items()} for side, spec in (("source", src), ("base", base))}

    def by_bytes(spec: VocabSpec, side: str, unreachable: frozenset[int]) -> dict[bytes, int]:
        table: dict[bytes, int] = {}
        for token, token_id in sorted(spec.vocab.items(), key=emission_order(spec, unreachable)):
            key = text_bytes(token, spec)
            if key is None:
                continue
            if key in table:
                kept_id = table[key]
                collisions.append(
                    {
                        "side": side,
                        "bytes": key.decode("utf-8", "backslashreplace"),
                        "kept": token_of_id[side][kept_id],
                        "kept_id": kept_id,
                        "dropped": token,
                        "dropped_id": token_id,
                    }
                )
            elif token_id not in unreachable:
                table[key] = token_id
        return table

    src_by_bytes = by_bytes(src, "source", src_unreachable)
    base_by_bytes = by_bytes(base, "base", base_unreachable)
    src_of_base: dict[int, int] = {}
    for content in base.added:
        if content in src.vocab:
            src_of_base[base.vocab[content]] = src.vocab[content]
    claimed = set(src_of_base.values())
    for key, base_id in base_by_bytes.items():
        src_id = src_by_bytes.get(key)
        if src_id is not None and src_id not in claimed and base_id not in src_of_base:
            src_of_base[base_id] = src_id
            claimed.add(src_id)
    return Matches("bytes", src_of_base, tuple(collisions))


def effective_match_mode(requested: str, base: VocabSpec, src: VocabSpec) -> str:
    if requested != "auto":
        return requested
    same = (base.convention, base.byte_fallback) == (src.convention, src.byte_fallback)
    return "exact" if same else "bytes"


def check_base_tokenizer(base: TokenizerSource, candidates: Sequence[str]) -> frozenset[int]:
    """Build T with the tokenizers library (proof that transformers can load the files that
    are written out) and, on the same build, find which of `candidates` it never produces
    (unreachable_tokens). Run in a forked worker while M's side is worked out."""
    from tokenizers import Tokenizer

    return unreachable_tokens(base, candidates, tokenizers_library(base.directory, Tokenizer.from_str, base.text))


def read_tokenizer(path: Path) -> TokenizerSource:
    """Read and validate a tokenizer (the tokenizers library is not needed for that: see
    library_added_token_ids and check_base_tokenizer)."""
    directory = path.parent if path.is_file() else path
    file = path if path.is_file() else directory / "tokenizer.json"
    if file.is_file():
        if file.stat().st_size == 0:
            raise CliError(f"{file}: empty file; expected a tokenizer.json")
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise CliError(f"{file}: cannot read ({exc.strerror})") from exc
        data, on_disk = parse_json(raw, file), True
        text = raw.decode("utf-8")
    elif (directory / "tokenizer.model").is_file() or (directory / "vocab.json").is_file():
        text = tokenizer_json_via_transformers(directory)
        data, on_disk = parse_json(text.encode(), file), False
    else:
        raise CliError(f"{directory}: no tokenizer here (expected tokenizer.json, tokenizer.model or vocab.json + merges.txt)")
    vocab = read_vocabulary(data, file)
    model = data["model"]
    tokenizer_config = read_optional_json(directory / "tokenizer_config.json")
    special_map = read_optional_json(directory / "special_tokens_map.json")
    roles = read_special_tokens(data, tokenizer_config, special_map)
    check_special_tokens(vocab, roles, tokenizer_config, special_map, directory)
    added = {entry["content"]: {flag: entry[flag] for flag in ADDED_TOKEN_FLAGS} for entry in data.get("added_tokens") or []}
    spec = VocabSpec(vocab, added, roles, detect_convention(data), bool(model.get("byte_fallback", False)))
    return TokenizerSource(
        directory,
        data,
        spec,
        tokenizer_config,
        read_optional_json(directory / "config.json"),
        read_optional_json(directory / "generation_config.json"),
        on_disk,
        text,
    )


class ForkedCall:
    """fn(*args) in a forked child where fork exists and this process has no other thread
    (the work holds the GIL); else right here, when the result is asked for. Forking
    shares the arguments instead of pickling them: they are whole tokenizers."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        import multiprocessing

        self.fn, self.args, self.process = fn, args, None
        if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
            context = multiprocessing.get_context("fork")
            self.receiver, sender = context.Pipe(duplex=False)
            self.process = context.Process(target=_background_child, args=(sender, fn, args), daemon=True)
            # forked with the stop signals blocked: the child sets its own handlers before
            # it takes one (a Ctrl-C reaches the whole process group)
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if hasattr(signal, "pthread_sigmask") else None
            try:
                self.process.start()
            finally:
                if blocked is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            sender.close()

    def result(self) -> Any:
        if self.process is None:
            return self.fn(*self.args)
        try:
            ok, value = self.receiver.recv()
        except EOFError:
            self.process.join()
            if SignalState.pending is not None or self.process.exitcode in (-2, -15, -1):
                raise Interrupted(SignalState.pending or -self.process.exitcode) from None
            raise CliError(f"a worker process checking the tokenizer died (exit code {self.process.exitcode})") from None
        finally:
            self.process.join()
        if not ok:
            raise value
        return value


def _background_child(sender: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the run and this daemon
    # child ends with it; SIGTERM / SIGHUP end the child at once, without a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        sender.send((True, fn(*args)))
    except BaseException as exc:  # handed to the parent, which raises it
        sender.send((False, exc))


def model_only_tokenizer(src: TokenizerSource, texts: Sequence[str]) -> Any:
    """The source tokenizer's model alone (its added tokens still split the text), for
    texts already spelled as the model sees them. A whole 128k-token BPE costs ~0.2 s of
    CPU to build; when the texts are few, only the entries they can reach are built
    (bpe_model_for_words), which encodes them the same (tests/test_init.py)."""
    from tokenizers import Tokenizer

    model = src.tokenizer_json.get("model") or {}
    joined = "\0".join(texts)
    prunable = (
        model.get("type") == "BPE"
        and isinstance(model.get("vocab"), Mapping)
        and isinstance(model.get("merges"), list)
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and sum(len(text) ** 2 for text in texts) <= FVT_PRUNE_MAX_SUBSTRINGS
        and not any(entry.get("content") and entry["content"] in joined for entry in src.tokenizer_json.get("added_tokens") or [])
    )
    if prunable:
        pairs = [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in model["merges"]]
        pruned = {**src.tokenizer_json, "added_tokens": [], "model": bpe_model_for_words(model, merge_results(pairs), texts)}
        tokenizer = tokenizers_library(src.directory, Tokenizer.from_str, json.dumps(pruned))
    else:
        tokenizer = tokenizers_library(src.directory, Tokenizer.from_str, src.text)
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = None
    tokenizer.post_processor = None
    return tokenizer


def fvt_decompositions(texts: Mapping[str, bytes], src: TokenizerSource) -> dict[str, tuple[int, ...]]:
    """For each token (-> the bytes it stands for: text_bytes), the source ids that spell
    the same bytes: the bytes written in the source's convention and run through the
    source's model alone (no normalizer or pre-tokenizer: the bytes are already what the
    model sees; its added tokens still split them, as in the tokenizer). One `encode_batch`
    call, so 100k tokens take about a second."""
    spec = src.spec
    pieces_of_token: list[list[tuple[str | None, int | None]]] = []
    encoded_texts: list[str] = []
    for data in texts.values():
        if spec.convention == "byte_level":
            pieces = [(spell_bytes(data, "byte_level", False), None)]
        else:
            pieces = [
                (spell_bytes(text.encode(), spec.convention, False), None) if text is not None else (None, byte)
                for text, byte in utf8_pieces(data)
            ]
        pieces_of_token.append(pieces)
        encoded_texts += [text for text, _ in pieces if text]
    encoded = (
        iter(
            tokenizers_library(
                src.directory, model_only_tokenizer(src, encoded_texts).encode_batch, encoded_texts, add_special_tokens=False
            )
        )
        if encoded_texts
        else iter(())
    )
    result: dict[str, tuple[int, ...]] = {}
    for token, pieces in zip(texts, pieces_of_token):
        ids: list[int] = []
        for text, byte in pieces:
            if text:
                ids += next(encoded).ids
            elif byte is not None:
                byte_id = spec.vocab.get(f"<0x{byte:02X}>") if spec.byte_fallback else None
                if byte_id is not None:
                    ids.append(byte_id)
        result[token] = tuple(ids)
    return result


def token_texts(tokens: Iterable[str], spec: VocabSpec) -> dict[str, bytes]:
    """token -> the bytes it stands for, for the tokens that are text (text_bytes)."""
    return {token: data for token in tokens if (data := text_bytes(token, spec)) is not None}


def unreachable_tokens(source: TokenizerSource, tokens: Iterable[str], built: Any = None) -> frozenset[int]:
    """The ids of those `tokens` that `source`'s tokenizer never produces: a token's own
    spelling (what its model sees), run through the model alone, comes out as other tokens.
    One rule finds a byte-fallback `<0x41>` when `A` exists, a BPE entry that no merge
    makes, and a regular token that an added token with the same text shadows. Exact for
    BPE and Unigram: a piece either of them produces inside a longer word, it also produces
    alone (a BPE merge never crosses the piece's edges; the parts of a best Unigram path
    are best paths); other models (WordPiece, whose `##` pieces only occur inside words)
    are taken as emitting every token. Added tokens are always produced, and so is the
    byte-fallback token of a byte that is not a character by itself. `built`: the whole
    tokenizer, when the caller has built it already."""
    model = source.tokenizer_json.get("model") or {}
    if model.get("type") not in ("BPE", "Unigram") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return frozenset()
    spec = source.spec
    spellings: dict[str, str] = {}
    for token in tokens:
        if token in spec.added or not token:
            continue
        if is_byte_fallback_token(token, spec):
            byte = int(token[3:5], 16)
            if byte < 0x80:
                spellings[token] = spell_bytes(bytes([byte]), spec.convention, False) or token
        else:
            spellings[token] = token
    texts = list(spellings.values())
    if not texts:
        return frozenset()
    if built is not None:
        built.normalizer, built.pre_tokenizer, built.post_processor = None, None, None
    tokenizer = built if built is not None else model_only_tokenizer(source, texts)
    encoded = tokenizers_library(source.directory, tokenizer.encode_batch, texts, add_special_tokens=False)
    return frozenset(spec.vocab[token] for token, encoding in zip(spellings, encoded) if encoding.ids != [spec.vocab[token]])


# ======================================================================================
# The plan: where every output row comes from (pure)
# ======================================================================================


@dataclass(frozen=True)
class RemapPlan:
    """Where every output row comes from.

    row_source[i] >= 0 copies source row row_source[i] bit for bit; MEAN_ROW, ZERO_ROW
    and FVT_ROW (the mean of the source rows fvt_parts[i]) are initialised rows; DONOR_ROW
    copies the donor's row donor_rows[i], OMP_ROW combines M's rows as OMP expresses the
    donor's row donor_rows[i] in the donor's rows of shared tokens. row_rule[i] says why
    (copied, moved, appended, role:eos, fvt, mean, unk, zero, donor, omp, *_fallback_*, padding).
    """

    mode: str  # append | drop
    init: str
    n_rows: int
    n_base: int
    src_rows: int
    row_source: tuple[int, ...]
    row_rule: tuple[str, ...]
    fvt_parts: Mapping[int, tuple[int, ...]]
    out_vocab: Mapping[str, int]
    appended: tuple[tuple[str, int, int], ...]  # (token in base spelling, source id, output id)
    dropped: tuple[tuple[str, int, str], ...]  # (token, source id, reason)
    src_ghosts: tuple[tuple[str, int], ...]  # source tokens whose id has no embedding row
    src_padding_rows: int
    matches: Matches
    warnings: tuple[str, ...] = ()
    donor_rows: Mapping[int, int] = field(default_factory=dict)  # output row -> donor row (DONOR_ROW, OMP_ROW)
    src_added_flags: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)  # M's added tokens and their flags

    @functools.cached_property
    def fvt_csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """fvt_parts as arrays: sorted output rows, offsets into the flat source rows."""
        rows = np.array(sorted(self.fvt_parts), dtype=np.int64)
        lengths = np.array([len(self.fvt_parts[int(r)]) for r in rows], dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(self.fvt_parts[int(r)] for r in rows), dtype=np.int64, count=int(lengths.sum()))
        return rows, np.concatenate(([0], np.cumsum(lengths))).astype(np.int64), flat

    def rule_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rule in self.row_rule:
            key = "role" if rule.startswith("role:") else rule
            counts[key] = counts.get(key, 0) + 1
        return counts

    def to_dict(self, src_token_of_id: Mapping[int, str]) -> dict[str, Any]:
        """Counts, and every initialised and dropped token (lists of appended and ghost
        tokens are capped at LIST_CAP: the counts are complete)."""
        counts = self.rule_counts()
        initialised = [
            {
                "token": token,
                "id": out_id,
                "rule": self.row_rule[out_id],
                "from": [src_token_of_id.get(i, f"<row {i}>") for i in self.fvt_parts.get(out_id, ())]
                or (
                    [src_token_of_id.get(self.row_source[out_id], f"<row {self.row_source[out_id]}>")]
                    if self.row_source[out_id] >= 0
                    else []
                )
                or ([f"<donor row {self.donor_rows[out_id]}>"] if out_id in self.donor_rows else []),
            }
            for token, out_id in sorted(self.out_vocab.items(), key=lambda item: item[1])
            if self.row_rule[out_id] not in ("copied", "moved", "appended")
        ]
        return {
            "mode": self.mode,
            "init": self.init,
            "rows": {"output": self.n_rows, "base_tokens": self.n_base, "source": self.src_rows},
            "counts": {
                "copied": counts.get("copied", 0),
                "moved": counts.get("moved", 0),
                "appended": len(self.appended),
                "initialised": len(initialised),
                "dropped": len(self.dropped),
                "ghost": len(self.src_ghosts),
                "padding": counts.get("padding", 0),
                "source_padding_rows": self.src_padding_rows,
            },
            "init_rules": {rule: n for rule, n in sorted(counts.items()) if rule not in ("copied", "moved", "appended")},
            "match": self.matches.to_dict(),
            "initialised": initialised,
            "dropped": [{"token": t, "source_id": i, "reason": r, "added": t in self.src_added_flags} for t, i, r in self.dropped],
            "ghosts": [{"token": t, "source_id": i} for t, i in self.src_ghosts[:LIST_CAP]],
            "appended": [{"token": t, "source_id": s, "id": o} for t, s, o in self.appended[:LIST_CAP]],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class InitContext:
    """What the rule for a row M lacks needs to know (one object instead of loose pairs)."""

    init: str
    src: VocabSpec
    src_rows: int
    decompositions: Mapping[str, Sequence[int]]
    donor_of_token: Mapping[str, int]
    unreachable: frozenset[int] = frozenset()  # T's ids that T's tokenizer never produces
    fill_rules: Mapping[str, str] = field(default_factory=dict)  # init mergekit: T's token -> RowFill.rule

    @functools.cached_property
    def src_unk(self) -> int | None:
        return self.src.vocab.get(self.src.roles.get("unk") or "")


@dataclass
class RowsBuilder:
    """The output rows as plan_remap decides them, one after the other."""

    source: list[int] = field(default_factory=list)
    rule: list[str] = field(default_factory=list)
    fvt_parts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    donor_rows: dict[int, int] = field(default_factory=dict)

    def add(self, source: int, rule: str) -> int:
        self.source.append(source)
        self.rule.append(rule)
        return len(self.source) - 1


def plan_remap(
    base: VocabSpec,
    src: VocabSpec,
    *,
    src_rows: int,
    matches: Matches,
    drop_extra: bool,
    init: str,
    base_config_vocab_size: int | None = None,
    pad_to_multiple_of: int | None = None,
    decompositions: Mapping[str, Sequence[int]] | None = None,
    donor_of_token: Mapping[str, int] | None = None,
    unreachable: frozenset[int] = frozenset(),
    fill_rules: Mapping[str, str] | None = None,
) -> RemapPlan:
    """Decide where every output row comes from (see RemapPlan). Pure: the caller reads
    the tokenizers and, for FVT, encodes the missing tokens' text (`decompositions`); for
    donor and omp, `donor_of_token` maps T's tokens to the donor's rows (tokens the donor
    lacks fall back to FVT, then the mean); `unreachable`: T's ids that T's tokenizer never
    produces (unreachable_tokens); for init mergekit (an alignment of a merge with a
    tokenizer_source), `fill_rules` names T's tokens whose rows come from the merge's
    models (RowFill), M's own rows not. Three steps: T's tokens, M's tokens T lacks (appended
    or dropped), padding to the row count."""
    if init not in (*INIT_METHODS, "mergekit"):
        raise ValueError(f"unknown init method {init!r}")
    context = InitContext(init, src, src_rows, decompositions or {}, donor_of_token or {}, unreachable, fill_rules or {})
    rows = RowsBuilder()
    plan_base_rows(rows, base, matches, context)
    out_vocab, appended, dropped, ghosts = plan_source_extras(rows, base, src, src_rows, matches, drop_extra)
    warnings = [f"{len(ghosts)} source token(s) have ids beyond the embedding's {src_rows} rows (ghost tokens)"] if ghosts else []
    padding = DONOR_ROW if init == "mergekit" else MEAN_ROW
    n_rows = plan_row_count(rows, len(base.vocab), drop_extra, base_config_vocab_size, pad_to_multiple_of, warnings, padding)
    return RemapPlan(
        mode="drop" if drop_extra else "append",
        init=init,
        n_rows=n_rows,
        n_base=len(base.vocab),
        src_rows=src_rows,
        row_source=tuple(rows.source),
        row_rule=tuple(rows.rule),
        fvt_parts=rows.fvt_parts,
        out_vocab=out_vocab,
        appended=tuple(appended),
        dropped=tuple(dropped),
        src_ghosts=tuple(ghosts),
        src_padding_rows=max(0, src_rows - min(src_rows, len(src.vocab))),
        matches=matches,
        warnings=tuple(warnings),
        donor_rows=rows.donor_rows,
        src_added_flags=src.added,
    )


def plan_base_rows(rows: RowsBuilder, base: VocabSpec, matches: Matches, context: InitContext) -> None:
    """A row for every token of T, at T's id: M's row when M has the token, else M's row
    of the same role (bos/eos/pad/unk), else the --init rule's. Init mergekit: the rows
    fill_rules names come from the merge's models (forced ones too), no role rows."""
    base_role_of_token = {token: role for role, token in base.roles.items() if token is not None}
    for base_id, token in enumerate(sorted(base.vocab, key=base.vocab.__getitem__)):
        src_id = matches.src_of_base.get(base_id)
        if context.init == "mergekit" and token in context.fill_rules:
            rows.donor_rows[rows.add(DONOR_ROW, f"mergekit_{context.fill_rules[token]}")] = base_id
            continue
        if src_id is not None and src_id < context.src_rows:
            rows.add(src_id, "copied" if src_id == base_id else "moved")
            continue
        if context.init == "mergekit":
            rows.add(ZERO_ROW, "mergekit_zero")
            continue
        role = base_role_of_token.get(token)
        role_src = context.src.vocab.get(context.src.roles.get(role) or "") if role else None
        if role_src is not None and role_src < context.src_rows:
            rows.add(role_src, f"role:{role}")
        else:
            initialise_row(rows, base_id, token, bool(base.added.get(token, {}).get("special")), context)


def initialise_row(rows: RowsBuilder, base_id: int, token: str, special: bool, context: InitContext) -> None:
    """The row of a token of T that M lacks, by --init; FVT and the mean as fallbacks.
    A token T's tokenizer never produces gets the mean row, whatever the method guesses
    (but the donor's own row): in the output layer the mean row takes at most 1/V of the
    probability (Jensen: exp of the mean logit is at most the mean of exp), where a copy of
    the row of the token that T does produce for those bytes would split its probability."""
    init, src_unk = context.init, context.src_unk
    if base_id in context.unreachable and init in ("fvt", "omp", "donor") and not (init == "donor" and token in context.donor_of_token):
        rows.add(MEAN_ROW, "unreachable")
    elif init == "zero":
        rows.add(ZERO_ROW, "zero")
    elif init == "unk" and src_unk is not None and src_unk < context.src_rows:
        rows.add(src_unk, "unk")
    elif init in ("donor", "omp") and token in context.donor_of_token:
        rows.donor_rows[rows.add(DONOR_ROW if init == "donor" else OMP_ROW, init)] = context.donor_of_token[token]
    else:
        parts = tuple(i for i in context.decompositions.get(token, ()) if i < context.src_rows and i != src_unk)
        if init in ("fvt", "donor", "omp") and not special and parts:
            rows.fvt_parts[rows.add(FVT_ROW, "fvt" if init == "fvt" else f"{init}_fallback_fvt")] = parts
        elif init in ("donor", "omp"):
            rows.add(MEAN_ROW, f"{init}_fallback_mean")
        elif init == "fvt" and not special:
            rows.add(MEAN_ROW, "fvt_fallback_mean")
        else:
            rows.add(MEAN_ROW, "mean" if init in ("mean", "fvt") else "unk_fallback_mean")


def plan_source_extras(
    rows: RowsBuilder, base: VocabSpec, src: VocabSpec, src_rows: int, matches: Matches, drop_extra: bool
) -> tuple[dict[str, int], list[tuple[str, int, int]], list[tuple[str, int, str]], list[tuple[str, int]]]:
    """M's tokens that T lacks: appended after T's (append mode) or dropped (--drop-extra,
    or when they cannot be spelled in T's convention); M's ghost tokens. Returns (output
    vocabulary, appended, dropped, ghosts)."""
    claimed = set(matches.src_of_base.values())
    dropped_by_bytes = {c["dropped_id"] for c in matches.collisions if c["side"] == "source"}
    out_vocab = dict(base.vocab)
    appended: list[tuple[str, int, int]] = []
    dropped: list[tuple[str, int, str]] = []
    ghosts: list[tuple[str, int]] = []
    for token, src_id in sorted(src.vocab.items(), key=lambda item: item[1]):
        if src_id >= src_rows:
            ghosts.append((token, src_id))
            continue
        if src_id in claimed:
            continue
        if token in src.added or matches.mode == "exact":
            spelling: str | None = token
        else:
            spelling = spell_bytes(token_bytes(token, src.convention, src.byte_fallback), base.convention, base.byte_fallback)
        if drop_extra:
            dropped.append((token, src_id, "not in the base tokenizer"))
        elif src_id in dropped_by_bytes:
            dropped.append((token, src_id, "same bytes as the token the source tokenizer produces for them"))
        elif spelling is None:
            dropped.append((token, src_id, "cannot be spelled in the base tokenizer's convention"))
        elif spelling in out_vocab:
            dropped.append((token, src_id, f"its spelling {spelling!r} is already a base token"))
        else:
            out_id = rows.add(src_id, "appended")
            out_vocab[spelling] = out_id
            appended.append((spelling, src_id, out_id))
    return out_vocab, appended, dropped, ghosts


def plan_row_count(
    rows: RowsBuilder,
    n_base: int,
    drop_extra: bool,
    base_config_vocab_size: int | None,
    pad_to_multiple_of: int | None,
    warnings: list[str],
    padding_source: int = MEAN_ROW,
) -> int:
    """The output's row count (T's config.json vocab_size with --drop-extra, rounded up to
    --pad-to-multiple-of); padding rows get the mean row (init mergekit: DONOR_ROW, the mean
    of the merged rows that mergekit_rows computes)."""
    n_tokens = len(rows.source)
    target = n_tokens
    if drop_extra and base_config_vocab_size is not None:
        if base_config_vocab_size < n_base:
            warnings.append(
                f"the base's config.json vocab_size ({base_config_vocab_size}) is smaller than its tokenizer "
                f"({n_base} tokens); the output keeps a row for every token"
            )
        target = max(base_config_vocab_size, n_base)
    n_rows = round_up(target, pad_to_multiple_of)
    for _ in range(n_rows - n_tokens):
        rows.add(padding_source, "padding")
    return n_rows


# ======================================================================================
# Row math: copies, means, FVT and OMP rows (numpy, torch)
# ======================================================================================


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
    rows computed beforehand (`given`: sorted output rows and their bytes; donor and OMP)."""
    sources = np.asarray(plan.row_source[start:stop], dtype=np.int64)
    out = src[np.maximum(sources, 0)] if len(src) else np.zeros((stop - start, src.shape[1]), np.uint8)
    if (sources >= 0).all():
        return out
    if given is not None:
        rows, values = given
        first, last = np.searchsorted(rows, [start, stop])
        out[rows[first:last] - start] = values[first:last]
    elif ((sources == DONOR_ROW) | (sources == OMP_ROW)).any():  # a tensor the donor has no rows for (MTP, Medusa, ...)
        out[(sources == DONOR_ROW) | (sources == OMP_ROW)] = mean_row()
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


OMP_EXACT_FLOP_BUDGET = 1e13  # past this many multiply-adds, CPU runs pick from each target's most correlated atoms only


def omp_coefficients(
    targets: Any,
    atoms: Any,
    k: int,
    *,
    chunk: int = 256,
    device: str | None = None,
    exact: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Any, Any]:
    """Orthogonal Matching Pursuit, batched (torch): each target row (n, h) as a k-sparse
    combination of `atoms` (m, h), as mergekit-tokensurgeon does (Goddard & Neto, 2025).
    Returns (indices (n, k') into atoms, coefficients (n, k') float64), k' = min(k, m, h).

    Exact greedy OMP correlates the residual with every atom at each of the k steps:
    n * m * h * k multiply-adds, seconds on a GPU, an hour on two CPU cores for 10^4
    targets against 128k atoms of width 2048. So `exact` defaults to True on CUDA or below
    OMP_EXACT_FLOP_BUDGET; otherwise each target picks only among the 2k' atoms most
    correlated with it (one matrix product per chunk of targets), on their Gram matrix.
    Either way the coefficients are the least-squares fit (float64 Cholesky) to the atoms
    chosen, which is what keeps OMP's residual orthogonal to them."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    n, m = targets.shape[0], atoms.shape[0]
    k = max(0, min(k, m, atoms.shape[1]))
    if n == 0 or k == 0:
        return torch.zeros((n, k), dtype=torch.long), torch.zeros((n, k), dtype=torch.float64)
    if exact is None:
        exact = device.startswith("cuda") or float(n) * m * atoms.shape[1] * k <= OMP_EXACT_FLOP_BUDGET
    atoms = torch.as_tensor(atoms, dtype=torch.float32, device=device)
    norms = atoms.norm(dim=1)
    unit = atoms / norms.clamp(min=1e-12).unsqueeze(1)
    unit[norms == 0] = 0  # an all-zero atom is never chosen
    all_indices, all_coefficients = [], []
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # correlations and Gram matrices in full fp32
    try:
        for start in range(0, n, chunk):
            y = torch.as_tensor(targets[start : start + chunk], dtype=torch.float32, device=device)
            atom_ids, coefficients = tame_coefficients(y, unit, *omp_chunk(y, unit, k, exact))
            all_indices.append(atom_ids.cpu())
            all_coefficients.append((coefficients / norms[atom_ids].double().clamp(min=1e-12)).cpu())
            if progress is not None:
                progress(len(y))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return torch.cat(all_indices), torch.cat(all_coefficients)


def omp_chunk(y: Any, unit: Any, k: int, exact: bool) -> tuple[Any, Any]:
    """(atom ids, coefficients for the unit atoms) of a batch of targets."""
    import torch

    if exact:
        atom_ids = omp_select_exact(y, unit, k)
        basis = unit[atom_ids]
        gram = torch.bmm(basis, basis.transpose(1, 2)).double()
        return atom_ids, least_squares(gram, torch.bmm(basis, y.unsqueeze(2)).squeeze(2).double())
    correlation = y @ unit.T
    chosen = correlation.abs().topk(min(unit.shape[0], 2 * k), dim=1).indices  # (b, C)
    candidates = unit[chosen]
    picked = omp_on_gram(torch.bmm(candidates, candidates.transpose(1, 2)).double(), correlation.gather(1, chosen).double(), k)
    atom_ids = chosen.gather(1, picked)
    basis = unit[atom_ids]
    gram = torch.bmm(basis, basis.transpose(1, 2)).double()
    return atom_ids, least_squares(gram, torch.bmm(basis, y.unsqueeze(2)).squeeze(2).double())


def tame_coefficients(y: Any, unit: Any, atom_ids: Any, coefficients: Any) -> tuple[Any, Any]:
    """OMP's last picks can be nearly collinear, and exact least squares then cancels large
    coefficients: harmless in the donor's space, wild once applied to M's rows (on
    Gemma-3 -> SmolLM2 some rows came out 20x too long, and the model's bits per byte went
    from 4 to 170). Rows whose coefficients outweigh their target 3:1 are solved again with
    a ridge of 1e-2 (the unit atoms' Gram diagonal is 1); well-posed rows keep the exact fit."""
    import torch

    wild = coefficients.norm(dim=1) > 3 * y.double().norm(dim=1)
    if bool(wild.any()):
        basis = unit[atom_ids[wild]]
        gram = torch.bmm(basis, basis.transpose(1, 2)).double()
        projection = torch.bmm(basis, y[wild].unsqueeze(2)).squeeze(2).double()
        coefficients = coefficients.clone()
        coefficients[wild] = least_squares(gram, projection, ridge=1e-2)
    return atom_ids, coefficients


def omp_select_exact(y: Any, unit: Any, k: int) -> Any:
    """The atoms greedy OMP picks for each target of a batch: at every step the one most
    correlated with the residual, which is kept orthogonal to an orthonormal basis of the
    atoms picked so far (Gram-Schmidt twice per step: fp32 keeps its orthogonality).
    `unit`: the atoms all targets share (m, h), or each target's own candidates (b, m, h);
    returns (b, k) indices into them."""
    import torch

    batch, width = y.shape
    per_target = unit.dim() == 3
    rows = torch.arange(batch, device=y.device)
    basis = torch.zeros((batch, width, k), dtype=y.dtype, device=y.device)
    picked = torch.zeros((batch, k), dtype=torch.long, device=y.device)
    used = torch.zeros((batch, unit.shape[-2]), dtype=torch.bool, device=y.device)
    residual = y.clone()
    for step in range(k):
        correlation = torch.bmm(unit, residual.unsqueeze(2)).squeeze(2) if per_target else residual @ unit.T
        correlation = correlation.abs_().masked_fill_(used, -1.0)
        picked[:, step] = correlation.argmax(dim=1)
        used[rows, picked[:, step]] = True
        direction = unit[rows, picked[:, step]] if per_target else unit[picked[:, step]]
        for _ in range(2):
            done = basis[:, :, :step]
            direction = direction - torch.bmm(done, torch.bmm(done.transpose(1, 2), direction.unsqueeze(2))).squeeze(2)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp(min=1e-12)
        basis[:, :, step] = direction
        residual = residual - direction * (direction * residual).sum(dim=1, keepdim=True)
    return picked


def least_squares(gram: Any, projection: Any, ridge: float = 1e-10) -> Any:
    """x solving (gram + ridge I) x = projection per batch (float64 Cholesky; the default
    ridge only keeps atoms that depend on the ones before them from breaking it)."""
    import torch

    size = gram.shape[-1]
    factor, _ = torch.linalg.cholesky_ex(gram + ridge * torch.eye(size, dtype=gram.dtype, device=gram.device))
    return torch.cholesky_solve(projection.unsqueeze(2), factor).squeeze(2)


def omp_on_gram(gram: Any, projection: Any, k: int) -> Any:
    """Greedy OMP's picks from a batch's own candidates, in coefficient space (Batch-OMP,
    Rubinstein, Zibulevsky & Elad 2008): gram (b, C, C) of unit candidates, projection
    (b, C) of each target on them. The Cholesky factor of the picked atoms' Gram grows by
    one row per step (two triangular solves), so a step costs O(C k), not O(C h) or a new
    factorisation. Returns (b, k) positions into the candidates."""
    import torch

    batch, size = projection.shape
    rows = torch.arange(batch, device=gram.device)
    picked = torch.zeros((batch, k), dtype=torch.long, device=gram.device)
    factor = torch.zeros((batch, k, k), dtype=gram.dtype, device=gram.device)
    columns = torch.zeros((batch, size, k), dtype=gram.dtype, device=gram.device)  # gram[:, :, picked]
    used = torch.zeros((batch, size), dtype=torch.bool, device=gram.device)
    correlation = projection.clone()  # <residual, candidate> for every candidate
    for step in range(k):
        choice = correlation.abs().masked_fill_(used, -1.0).argmax(dim=1)
        picked[:, step], used[rows, choice] = choice, True
        columns[:, :, step] = gram[rows, :, choice]
        if step:
            known = factor[:, :step, :step]
            w = torch.linalg.solve_triangular(known, columns[rows, :, step].gather(1, picked[:, :step]).unsqueeze(2), upper=False)
            factor[:, step, :step] = w.squeeze(2)
            factor[:, step, step] = (1.0 - w.squeeze(2).pow(2).sum(dim=1)).clamp(min=1e-10).sqrt()
        else:
            factor[:, 0, 0] = 1.0
        lower = factor[:, : step + 1, : step + 1]
        target = projection.gather(1, picked[:, : step + 1]).unsqueeze(2)
        coefficients = torch.cholesky_solve(target, lower, upper=False)
        correlation = projection - torch.bmm(columns[:, :, : step + 1], coefficients).squeeze(2)
    return picked


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


# ======================================================================================
# Checkpoints in: headers, vocabulary tensors, rows
# ======================================================================================


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
    matrix = np.empty(tensor.nbytes, dtype=np.uint8)
    if tensor.nbytes:
        read_exactly(tensor.file, tensor.start, memoryview(matrix), f"tensor {tensor.name}")
    matrix.flags.writeable = False
    return matrix.reshape(rows, -1)


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


# ======================================================================================
# The donor: rows of a model that has the tokens (--init donor / omp)
# ======================================================================================


@dataclass(frozen=True)
class Donor:
    """D's tokenizer and vocabulary tensors, read from safetensors headers; rows are read
    on demand (memory-mapped pages locally, HTTP range requests for a Hub repo)."""

    source: str
    spec: VocabSpec
    ckpt: Checkpoint
    vocab: VocabTensors
    remote: tuple[str, str | None] | None = None  # (repo id, revision) when read over HTTP

    def tensor(self, role: str) -> TensorEntry | None:
        name = {"embed": self.vocab.embed, "head": self.vocab.head or self.vocab.embed, "bias": self.vocab.bias}[role]
        return self.ckpt.tensors[name] if name is not None else None

    def read_rows(self, role: str, ids: np.ndarray) -> np.ndarray:
        """Raw rows `ids` of one vocabulary tensor, (len(ids), row_bytes) uint8."""
        tensor = self.tensor(role)
        assert tensor is not None
        if self.remote is None:
            return np.ascontiguousarray(read_matrix(self.ckpt, tensor)[ids])
        return hub_tensor_rows(*self.remote, tensor, ids)


def read_donor(source: str, revision: str | None, trust_remote_code: bool) -> Donor:
    """A local model directory, or a Hub repo of which only the tokenizer files and configs
    are downloaded (the headers and rows come by HTTP range requests)."""
    if Path(source).expanduser().exists() or not looks_like_hub_id(source):
        directory = resolve_source(source, revision, [])
        if not directory.is_dir():
            raise CliError(f"--donor-model {source}: expected a model directory or repo id, got a file")
        tokenizer = read_tokenizer(directory)
        if select_weight_files(p.name for p in directory.iterdir() if p.is_file())[0] == "none":
            raise CliError(f"{directory}: no weights to take rows from; name a model with weights (--donor-model D) or use --init fvt")
        ckpt, remote = read_checkpoint(directory), None
    else:
        directory = resolve_source(source, revision, [*TOKENIZER_FILES, *CONFIG_FILES])
        tokenizer = read_tokenizer(directory)
        ckpt, remote = hub_checkpoint(source, revision, directory), (source, revision)
    vocab = find_vocab_tensors(ckpt, tokenizer.config, embed_name=None, head_name=None, trust_remote_code=trust_remote_code)
    return Donor(source, tokenizer.spec, ckpt, vocab, remote)


def hub_checkpoint(repo_id: str, revision: str | None, directory: Path) -> Checkpoint:
    """A Hub repo's tensors from its safetensors headers (start: offset in the data part)."""
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import NotASafetensorsRepoError

    try:
        metadata = get_safetensors_metadata(repo_id, revision=revision)
    except NotASafetensorsRepoError as exc:
        raise CliError(
            f"{repo_id}: no safetensors weights to take rows from; name a model with weights (--donor-model D) or use --init fvt"
        ) from exc
    except Exception as exc:  # HTTP, offline, parsing
        raise CliError(hub_failure(repo_id, revision, exc)) from exc
    tensors: dict[str, TensorEntry] = {}
    for file, info in metadata.files_metadata.items():
        header = {
            name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)} for name, t in info.tensors.items()
        }
        for name, entry in check_safetensors_header(header, None, f"{repo_id}/{file}").items():
            start, end = entry["data_offsets"]
            tensors[name] = TensorEntry(name, entry["dtype"], tuple(entry["shape"]), end - start, Path(file), start)
    return Checkpoint(directory, "remote", tensors)


def hub_get_range(repo_id: str, revision: str | None, file: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file of a Hub repo, by an HTTP range request (the way
    huggingface_hub reads safetensors headers; HF_TOKEN and HF_ENDPOINT apply)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    try:
        response = get_session().get(
            hf_hub_url(repo_id, file, revision=revision), headers={**build_hf_headers(), "Range": f"bytes={start}-{end - 1}"}
        )
        hf_raise_for_status(response)
    except Exception as exc:  # HTTP and connection errors alike
        raise CliError(hub_failure(f"{repo_id}/{file}", revision, exc)) from exc
    data = response.content if response.status_code == 206 else response.content[start:end]
    if len(data) != end - start:
        raise CliError(f"{repo_id}/{file}: the Hub sent {len(data)} bytes for a range of {end - start}; try again")
    return data


@functools.cache
def hub_data_start(repo_id: str, revision: str | None, file: str) -> int:
    return 8 + int.from_bytes(hub_get_range(repo_id, revision, file, 0, 8), "little")


def hub_tensor_rows(repo_id: str, revision: str | None, tensor: TensorEntry, ids: np.ndarray) -> np.ndarray:
    """Rows of a remote tensor; nearby rows share one request (spans of at most 64 MB)."""
    rows = tensor.shape[0] if tensor.shape else 1
    row_bytes = tensor.nbytes // max(1, rows)
    base = hub_data_start(repo_id, revision, str(tensor.file)) + tensor.start
    out = np.empty((len(ids), row_bytes), dtype=np.uint8)
    order = np.argsort(ids, kind="stable")
    span_rows = max(1, 64 * 10**6 // max(1, row_bytes))
    position = 0
    while position < len(order):
        first = int(ids[order[position]])
        end = position
        while end < len(order) and int(ids[order[end]]) < first + span_rows:
            end += 1
        last = int(ids[order[end - 1]])
        data = np.frombuffer(
            hub_get_range(repo_id, revision, str(tensor.file), base + first * row_bytes, base + (last + 1) * row_bytes), dtype=np.uint8
        )
        out[order[position:end]] = data.reshape(-1, row_bytes)[ids[order[position:end]] - first]
        position = end
    return out


def donor_tokens(base: VocabSpec, donor: Donor, match: str, base_unreachable: frozenset[int] = frozenset()) -> dict[str, int]:
    """T's tokens -> the donor's rows (matched as --match says; rows the donor has)."""
    matches = match_tokens(base, donor.spec, effective_match_mode(match, base, donor.spec), base_unreachable)
    token_of_base = {token_id: token for token, token_id in base.vocab.items()}
    return {token_of_base[base_id]: donor_id for base_id, donor_id in matches.src_of_base.items() if donor_id < donor.vocab.rows}


def read_donor_for(opts: RemapOptions, vocab: VocabTensors) -> Donor:
    """D for --init donor / omp: --donor-model, else T itself (which then needs weights)."""
    if opts.donor_model is not None:
        name, revision = split_revision(opts.donor_model)
    else:
        name, revision = opts.base_tokenizer, opts.base_revision
    donor = read_donor(name, revision, opts.trust_remote_code)
    if opts.init == "donor" and donor.vocab.hidden != vocab.hidden:
        raise CliError(f"the donor's hidden size is {donor.vocab.hidden}, M's is {vocab.hidden}: use --init omp")
    return donor


def initialised_rows(
    plan: RemapPlan,
    ckpt: Checkpoint,
    vocab: VocabTensors,
    src: VocabSpec,
    donor: Donor,
    opts: RemapOptions,
    unreachable: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset()),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """role -> (output rows, their raw bytes) for the rows the donor fills: its own rows
    (donor), or M's rows of shared tokens combined by OMP's coefficients (omp). The atoms
    are the tokens M and the donor share, but none that the donor's or M's tokenizer never
    produces (`unreachable`: the donor's ids, when the donor is T, and M's): their rows were
    hardly trained."""
    out_rows = np.array(sorted(plan.donor_rows), dtype=np.int64)
    if not len(out_rows):
        return {}
    donor_ids = np.array([plan.donor_rows[int(r)] for r in out_rows], dtype=np.int64)
    result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if plan.init == "donor":
        for role in ("embed", "head", "bias"):
            name = getattr(vocab, role)
            if name is not None:
                result[role] = (out_rows, donor_row_bytes(donor, role, donor_ids, ckpt.tensors[name], ckpt))
        return result
    shared = match_tokens(donor.spec, src, effective_match_mode(opts.match, donor.spec, src), *unreachable).src_of_base
    pairs = np.array(sorted((d, m) for d, m in shared.items() if d < donor.vocab.rows and m < vocab.rows), dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        raise CliError(f"--init omp: the donor {donor.source} and the model share no tokens to combine")
    head_rows, head_coefficients = None, None
    for role in ("embed", "head"):
        name = getattr(vocab, role)
        if name is None:
            continue
        tensor, donor_tensor = ckpt.tensors[name], donor.tensor(role)
        assert donor_tensor is not None
        atoms = decode_rows(donor.read_rows(role, pairs[:, 0]), donor_tensor.dtype)
        targets = decode_rows(donor.read_rows(role, donor_ids), donor_tensor.dtype)
        progress = progress_bar(len(targets), opts.show_progress, f"OMP {role}", unit="rows")
        try:
            indices, coefficients = omp_coefficients(targets, atoms, opts.omp_k, progress=progress.update)
        finally:
            progress.close()
        m_rows = pairs[:, 1][indices.numpy()]
        result[role] = (out_rows, combine_rows(read_matrix(ckpt, tensor), tensor.dtype, m_rows, coefficients))
        if role == "head" or vocab.head is None:
            head_rows, head_coefficients = m_rows, coefficients
    if vocab.bias is not None and head_rows is not None:
        bias = ckpt.tensors[vocab.bias]
        result["bias"] = (out_rows, combine_rows(read_matrix(ckpt, bias), bias.dtype, head_rows, head_coefficients))
    return result


def donor_row_bytes(donor: Donor, role: str, donor_ids: np.ndarray, tensor: TensorEntry, ckpt: Checkpoint) -> np.ndarray:
    """The donor's rows for one of M's vocabulary tensors: bit for bit in the same dtype,
    else converted; a bias the donor lacks is M's mean bias."""
    donor_tensor = donor.tensor(role)
    if donor_tensor is None:  # M has an output bias, D has none
        matrix = read_matrix(ckpt, tensor)
        mean = encode_rows(mean_of_rows(matrix, tensor.dtype, np.arange(len(matrix)))[None, :], tensor.dtype)
        return np.repeat(mean, len(donor_ids), axis=0)
    raw = donor.read_rows(role, donor_ids)
    return raw if donor_tensor.dtype == tensor.dtype else encode_rows(decode_rows(raw, donor_tensor.dtype), tensor.dtype)


def mergekit_rows(plan: RemapPlan, ckpt: Checkpoint, vocab: VocabTensors, opts: RemapOptions) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """role -> (output rows, raw bytes) of the rows init mergekit fills from the merge's
    models, as mergekit's PermutedVocabulary computes them: one model's row (bit for bit
    in the same dtype), or the float32 mean of the holders' rows in the merge's order; zero
    when no model holds the token; padding rows the mean of the model's rows over the merged
    vocabulary. The input embedding's rows come from the fills' input rows, lm_head's (and a
    tied model's new lm_head: opts.untie_head) from their output rows. A model that lacks a
    tensor (a bias) is left out."""
    filled = np.array(sorted(plan.donor_rows), dtype=np.int64)
    padding = np.array([row for row, rule in enumerate(plan.row_rule) if rule == "padding"], dtype=np.int64)
    if not len(filled) and not len(padding):
        return {}
    token_of_row = {token_id: token for token, token_id in plan.out_vocab.items()}
    fills = {token: (embed, head) for token, _, embed, head in opts.mergekit_fills}
    keys = dict.fromkeys((s, rev) for embed, head in fills.values() for s, rev, _ in (*embed, *head))  # the merge's order
    models = {key: read_donor(*key, opts.trust_remote_code) for key in keys}
    result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for role, tensor in vocabulary_roles(ckpt, vocab, opts.untie_head):
        wanted = [fills.get(token_of_row[int(r)], ((), ()))[0 if role == "embed" else 1] for r in filled]
        values = filled_row_values(models, role, wanted, tensor, opts.src_model)
        rows, data = filled, encode_rows(values, tensor.dtype)
        if len(padding):
            mean = merged_rows_mean(read_matrix(ckpt, tensor, plan.src_rows), tensor.dtype, plan, filled, values)
            rows = np.concatenate((filled, padding))
            data = np.concatenate((data, np.repeat(encode_rows(mean[None, :], tensor.dtype), len(padding), axis=0)))
        order = np.argsort(rows, kind="stable")
        result[role] = (rows[order], data[order])
    return result


def vocabulary_roles(ckpt: Checkpoint, vocab: VocabTensors, untie_head: str | None) -> list[tuple[str, TensorEntry]]:
    """(role, the source tensor whose dtype and row width the role's output rows take): a
    tied model's new lm_head takes its embedding's."""
    roles = [("embed", ckpt.tensors[vocab.embed])]
    if vocab.head is not None or untie_head is not None:
        roles.append(("head", ckpt.tensors[vocab.head or vocab.embed]))
    if vocab.bias is not None:
        roles.append(("bias", ckpt.tensors[vocab.bias]))
    return roles


def filled_row_values(
    models: Mapping[tuple[str, str | None], Donor], role: str, wanted: Sequence[RowSources], tensor: TensorEntry, where: str
) -> np.ndarray:
    """(rows, width) float32: each filled row the mean of its sources' rows of `role`, summed
    in the merge's order of the models; zero without a source."""
    hidden = (tensor.nbytes // max(1, tensor.shape[0])) // DTYPE_SIZES[tensor.dtype] if len(tensor.shape) > 1 else 1
    total = np.zeros((len(wanted), hidden), dtype=np.float32)
    count = np.zeros(len(wanted), dtype=np.float32)
    for key, donor in models.items():  # the order of the models in the merge: mergekit's order of summation
        if donor.tensor(role) is None:
            continue
        picks = [(k, row) for k, sources in enumerate(wanted) for s, rev, row in sources if (s, rev) == key]
        if not picks:
            continue
        positions, ids = (np.array(column, dtype=np.int64) for column in zip(*picks))
        values = decode_rows(donor.read_rows(role, ids), donor.tensor(role).dtype).reshape(len(ids), -1)
        if values.shape[1] != hidden:
            raise CliError(f"{donor.source}: its {role} rows are {values.shape[1]} wide, {where}'s {hidden}")
        total[positions] += values
        count[positions] += 1
    return total / np.maximum(count, 1)[:, None]


def merged_rows_mean(matrix: np.ndarray, dtype: str, plan: RemapPlan, filled: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The mean of a model's rows over the merged vocabulary (its copied rows and the filled
    ones; zero rows count): mergekit's padding row."""
    tokens = len(plan.out_vocab)
    sources = np.asarray(plan.row_source[:tokens], dtype=np.int64)
    copied = sources[sources >= 0]
    total = values[filled < tokens].sum(axis=0, dtype=np.float64)
    if len(copied):
        total = total + mean_of_rows(matrix, dtype, copied) * len(copied)
    return total / max(1, tokens)


# ======================================================================================
# Shards out: plan, streaming writer, verification
# ======================================================================================


@dataclass(frozen=True)
class ShardPlan:
    files: tuple[str, ...]
    tensors: tuple[tuple[TensorEntry, ...], ...]

    @property
    def total_size(self) -> int:
        return sum(entry.nbytes for shard in self.tensors for entry in shard)

    def weight_map(self) -> dict[str, str]:
        return {entry.name: file for file, shard in zip(self.files, self.tensors) for entry in shard}

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_size": self.total_size,
            "shards": [{"file": f, "tensors": len(s), "bytes": sum(e.nbytes for e in s)} for f, s in zip(self.files, self.tensors)],
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


class NoProgress:
    def update(self, _n: int) -> None:
        pass

    def close(self) -> None:
        pass


class SharedProgress:
    """A tqdm bar that several writer threads update."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.lock = bar, threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress_bar(total: int, enabled: bool, desc: str = "writing", unit: str = "B") -> Any:
    if not enabled:
        return NoProgress()
    from tqdm import tqdm

    scale = {"unit_scale": True, "unit_divisor": 1000} if unit == "B" else {}
    return SharedProgress(tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=False, **scale))


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


def write_shards(
    out: Path,
    ckpt: Checkpoint,
    shard_plan: ShardPlan,
    plan: RemapPlan,
    src_token_of_id: Mapping[int, str],
    show_progress: bool,
    given_rows: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[dict[str, str], int]:
    """Stream every shard into `out`; returns ({file name: sha256}, copied rows verified).
    Shards are written side by side, one per core (reading, hashing and the numpy row
    work release the GIL), vocabulary shards first since they take longest. Each
    vocabulary tensor is read back once written and every copied row compared bit for bit
    with its source row (SelfCheckError). The first error stops every writer."""
    progress = progress_bar(shard_plan.total_size, show_progress)
    stop = threading.Event()
    writers: list[ShardWriter] = []  # every file opened, closed at the end whatever happens

    def write_shard(file: str, entries: Sequence[TensorEntry]) -> tuple[ShardWriter, int]:
        writer = ShardWriter(out / file, entries, progress, stop)
        writers.append(writer)
        written: list[tuple[int, np.ndarray, str]] = []  # vocabulary tensors, to read back
        for entry in entries:
            if entry.vocab_role is None and ckpt.kind == "safetensors":
                writer.copy_range(Path(entry.file or ""), entry.start, entry.nbytes)
            elif entry.vocab_role is None:
                writer.write(ckpt.bin_tensors[entry.name].contiguous().reshape(-1).view(torch_uint8()).numpy())
            else:
                start = writer.position
                given = (given_rows or {}).get(entry.vocab_role or "")
                written.append((start, write_vocab_tensor(writer, ckpt, entry, plan, src_token_of_id, given), entry.name))
        writer.finish()
        return writer, sum(verify_copied_rows(out / file, start, matrix, plan, name) for start, matrix, name in written)

    pool = ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, len(shard_plan.files), MAX_WRITER_THREADS)), thread_name_prefix="shard")
    try:
        # a stop raised inside submit() can leave a thread started but unknown to the pool,
        # never joined, that creates a shard after the staging directory is removed
        with deferred_signals():
            futures = {file: pool.submit(write_shard, file, entries) for file, entries in zip(shard_plan.files, shard_plan.tensors)}
        while wait(futures.values(), timeout=0.2, return_when=FIRST_EXCEPTION).not_done:
            check_interrupt()
            if any(future.done() and future.exception() for future in futures.values()):
                break
        failed = next((future.exception() for future in futures.values() if future.done() and future.exception()), None)
        if failed is not None:
            raise failed
        results = {file: future.result() for file, future in futures.items()}
        # fsync last, all at once: a writer thread waiting for the disk would leave its core idle
        with deferred_signals():
            syncing = pool.map(lambda result: result[0].sync_and_close(), results.values())
        digests = dict(zip(results, syncing))
    except BaseException:
        stop.set()
        raise
    finally:
        with deferred_signals():  # every writer thread has ended before the caller removes `out`
            pool.shutdown(wait=True, cancel_futures=True)
            for writer in writers:
                writer.close()
            progress.close()
    return digests, sum(verified for _, verified in results.values())


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


# ======================================================================================
# Tokenizer and config outputs
# ======================================================================================


def patch_tokenizer_json(base_json: Mapping[str, Any], plan: RemapPlan, src_added: Mapping[str, Mapping[str, bool]]) -> dict[str, Any]:
    """T's tokenizer.json plus the appended tokens at their output ids. Regular tokens join
    the model vocabulary with no merges (encoding text keeps giving T's ids). The tokenizers
    library numbers an added token that is not in the model vocabulary right after it, so
    once the vocabulary grows every added token (T's own, like Llama-3's specials, and the
    appended ones) must be in the model vocabulary at its id too."""
    model = dict(base_json["model"])  # copy only what changes: vocab and added_tokens
    data = {**base_json, "model": model, "added_tokens": list(base_json.get("added_tokens") or [])}
    model["vocab"] = list(model["vocab"]) if isinstance(model["vocab"], list) else dict(model["vocab"])
    kind = model.get("type")
    if not plan.appended:
        return data
    if kind not in ("BPE", "Unigram"):
        raise CliError(f"append mode cannot extend a {kind} tokenizer without changing how it encodes; use --drop-extra")
    added_by_id = {entry["id"]: entry["content"] for entry in data.get("added_tokens") or []}
    if kind == "Unigram":
        pieces = model["vocab"]
        lowest = min((score for _, score in pieces), default=0.0) - 100.0  # Viterbi picks these only where nothing else fits
        for token_id in range(len(pieces), plan.n_base):
            if token_id not in added_by_id:
                raise CliError("the base Unigram tokenizer has ids outside its piece list that are not added tokens; use --drop-extra")
            pieces.append([added_by_id[token_id], lowest])
    else:
        for token_id, content in added_by_id.items():
            model["vocab"].setdefault(content, token_id)
    for spelling, _src_id, out_id in plan.appended:
        if kind == "Unigram":
            model["vocab"].append([spelling, lowest])
        else:
            model["vocab"][spelling] = out_id
        flags = src_added.get(spelling)
        if flags is not None:
            data["added_tokens"].append({"id": out_id, "content": spelling, **{f: bool(flags.get(f, False)) for f in ADDED_TOKEN_FLAGS}})
    return data


def patch_tokenizer_config(config: Mapping[str, Any], plan: RemapPlan, src_added: Mapping[str, Mapping[str, bool]]) -> dict[str, Any]:
    """tokenizer_config.json with the appended added tokens in added_tokens_decoder (the
    transformers 4 layout; transformers 5 reads them from tokenizer.json)."""
    data = dict(config)
    if "added_tokens_decoder" in data:
        decoder = dict(data["added_tokens_decoder"])
        for spelling, _src_id, out_id in plan.appended:
            flags = src_added.get(spelling)
            if flags is not None:
                decoder[str(out_id)] = {"content": spelling, **{f: bool(flags.get(f, False)) for f in sorted(ADDED_TOKEN_FLAGS)}}
        data["added_tokens_decoder"] = decoder
    return data


def portable_tokenizer_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """tokenizer_config.json as transformers 4.x can read it too, or None if it already can.
    transformers 5 writes a class 4.x lacks (`TokenizersBackend`) and its extra special
    tokens as a list; 5.x reads the 4.x spellings of both."""
    data = dict(config)
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(data.get("extra_special_tokens"), list):
        extra = data.pop("extra_special_tokens")
        data["additional_special_tokens"] = list(dict.fromkeys([*(data.get("additional_special_tokens") or []), *extra]))
    return data if data != dict(config) else None


def patched_tokenizer(base_json: Mapping[str, Any], plan: RemapPlan, appended_added: Mapping[str, Any], base: VocabSpec) -> tuple[str, int]:
    """The append-mode tokenizer.json text, checked; and how many appended tokens encoding
    can produce (see check_patched_tokenizer)."""
    # compact JSON: with indent the json module falls back to its pure-Python encoder
    text = json.dumps(patch_tokenizer_json(base_json, plan, appended_added), ensure_ascii=False)
    return text, check_patched_tokenizer(text, plan, base)


def check_patched_tokenizer(patched_text: str, plan: RemapPlan, base: VocabSpec) -> int:
    """The patched tokenizer must load with exactly the plan's vocabulary. Returns how many
    appended regular tokens are reachable by encoding their own text (with `ignore_merges`
    a whole word that is in the vocabulary becomes one token)."""
    from tokenizers import Tokenizer

    library = Tokenizer.from_str(patched_text)
    loaded = library.get_vocab(with_added_tokens=True)
    if loaded != dict(plan.out_vocab):
        wrong = sorted(set(loaded.items()) ^ set(plan.out_vocab.items()), key=lambda item: item[1])[:3]
        raise SelfCheckError(f"the patched tokenizer.json loads a different vocabulary than planned (e.g. {wrong})")
    added = {token.content for token in library.get_added_tokens_decoder().values()}
    regular = [(spelling, out_id) for spelling, _, out_id in plan.appended if spelling not in added]
    texts = []
    for spelling, out_id in regular:
        try:
            texts.append((token_bytes(spelling, base.convention, base.byte_fallback).decode("utf-8"), out_id))
        except UnicodeDecodeError:
            continue  # a partial character is never a whole input on its own
    encodings = library.encode_batch([text for text, _ in texts], add_special_tokens=False) if texts else []
    return sum(1 for (_, out_id), enc in zip(texts, encodings) if enc.ids == [out_id])


def role_ids(roles: Mapping[str, str | None], vocab: Mapping[str, int]) -> dict[str, int | None]:
    return {role: vocab.get(token) if token is not None else None for role, token in roles.items()}


def as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def output_role_ids(
    base_roles: Mapping[str, str | None],
    base_vocab: Mapping[str, int],
    base_config: Mapping[str, Any],
    base_generation: Mapping[str, Any],
    src_eos_tokens: Sequence[str],
    plan: RemapPlan,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """bos/eos/pad ids for the output's config.json and generation_config.json: T's ids
    (from its configs, else its tokenizer). In append mode generation also stops at the
    source's eos tokens, which keep their rows at appended ids."""
    from_tokenizer = role_ids(base_roles, base_vocab)
    config_ids: dict[str, Any] = {}
    for role in ("bos", "eos", "pad"):
        value = base_config.get(f"{role}_token_id", (base_config.get("text_config") or {}).get(f"{role}_token_id"))
        config_ids[role] = value if as_id_list(value) and all(i < plan.n_rows for i in as_id_list(value)) else from_tokenizer.get(role)
    generation_ids = dict(config_ids)
    for role in ("bos", "eos", "pad"):
        value = base_generation.get(f"{role}_token_id")
        if as_id_list(value) and all(i < plan.n_rows for i in as_id_list(value)):
            generation_ids[role] = value
    if plan.mode == "append":
        eos = as_id_list(generation_ids["eos"])
        extra = [plan.out_vocab[t] for t in src_eos_tokens if t in plan.out_vocab and plan.out_vocab[t] not in eos]
        if extra:
            generation_ids["eos"] = eos + extra
    return config_ids, generation_ids


CONFIG_SECTIONS = ("text_config", "vision_config", "audio_config")  # sub-configs of multimodal models
TOKEN_ID_KEY_RE = re.compile(r"_token_(ids?|index|indices)$")
ROLE_ID_KEYS = frozenset(f"{role}_token_id" for role in ("bos", "eos", "pad"))  # T's, by role (output_role_ids)
# Ids of a role rather than of a content token: when M's token is dropped, T's id for the role
# (T's config, else its tokenizer), else none; never a refusal.
ROLE_LIKE_KEYS = frozenset(f"{role}_token_id" for role in ("unk", "mask", "sep", "cls", "decoder_start"))


def config_sections(config: Mapping[str, Any]) -> list[tuple[str | None, Mapping[str, Any]]]:
    """(None, the config) and its multimodal sub-configs."""
    return [(None, config), *((name, config[name]) for name in CONFIG_SECTIONS if isinstance(config.get(name), Mapping))]


def config_token_ids(
    config: Mapping[str, Any], plan: RemapPlan, src_token_of_id: Mapping[int, str], base: TokenizerSource | None = None
) -> dict[tuple[str | None, str], Any]:
    """Every config key that holds token ids of M (`image_token_index`, `video_token_id`,
    `boi_token_index`, `vision_start_token_id`, ...: *_token_id(s) / *_token_index, at the
    top and in text_config / vision_config / audio_config) -> its value in the output: each
    id follows its token. bos/eos/pad are T's (output_role_ids). A token the output has no
    row for (dropped) is an error: the model would point at another token; for a role
    (unk_token_id, mask_token_id, ...: ROLE_LIKE_KEYS) T's id takes its place."""
    out_of_src = {src: out for out, src in enumerate(plan.row_source) if src >= 0 and plan.row_rule[out] in ("copied", "moved", "appended")}
    remapped: dict[tuple[str | None, str], Any] = {}
    for section, values in config_sections(config):
        for key, value in values.items():
            if not TOKEN_ID_KEY_RE.search(key) or key in ROLE_ID_KEYS or value is None:
                continue
            ids = value if isinstance(value, list) else [value]
            if not all(is_int(i) for i in ids):
                continue
            new = []
            for token_id in ids:
                if token_id < 0 or token_id not in out_of_src and token_id >= plan.src_rows:
                    new.append(token_id)  # -1 and other sentinels
                elif token_id in out_of_src:
                    new.append(out_of_src[token_id])
                elif key in ROLE_LIKE_KEYS:
                    new.append(base_role_id(base, key) if base is not None else None)
                else:
                    where = f"{section}.{key}" if section else key
                    token = src_token_of_id.get(token_id, f"<row {token_id}>")
                    raise CliError(
                        f"config.json {where} is {token_id} ({token!r}), a token the output drops"
                        + (": run without --drop-extra to keep it" if plan.mode == "drop" else "")
                    )
            remapped[(section, key)] = new if isinstance(value, list) else new[0]
    return remapped


def base_role_id(base: TokenizerSource, key: str) -> int | None:
    """T's id for a role key (`unk_token_id`): its config's, else its tokenizer's token of that role."""
    value = config_value(base.config, key)
    if is_int(value):
        return value
    token = base.spec.roles.get(key.removesuffix("_token_id"))
    return base.spec.vocab.get(token) if token is not None else None


def patch_config(
    config: Mapping[str, Any], vocab_size: int, ids: Mapping[str, Any], token_ids: Mapping[tuple[str | None, str], Any] | None = None
) -> dict[str, Any]:
    """M's config with the new vocab_size (wherever it appears), role ids and token ids
    (config_token_ids); everything else unchanged. Multimodal configs keep the text
    model's values under text_config."""
    data = json.loads(json.dumps(config))
    sections = {name: values for name, values in config_sections(data)}
    holders = [values for values in sections.values() if "vocab_size" in values]
    for values in holders or [sections.get("text_config", data)]:
        values["vocab_size"] = vocab_size
    target = data["text_config"] if isinstance(data.get("text_config"), dict) and "vocab_size" not in data else data
    for role, value in ids.items():
        key = f"{role}_token_id"
        if value is not None or key in target:
            target[key] = value
    for (section, key), value in (token_ids or {}).items():
        sections[section][key] = value
    return data


def patch_generation_config(config: Mapping[str, Any], ids: Mapping[str, Any]) -> dict[str, Any]:
    data = dict(config)
    for role, value in ids.items():
        key = f"{role}_token_id"
        if value is not None or key in data:
            data[key] = value
    return data


def write_tokenizer_files(
    base: TokenizerSource, out: Path, patched: str | None, plan: RemapPlan, appended_added: Mapping[str, Any]
) -> None:
    """T's tokenizer files byte for byte; in append mode with new tokens, the patched
    tokenizer.json (and tokenizer_config.json) instead, without the slow-tokenizer files.
    A transformers-5-only tokenizer_config.json is rewritten so that 4.x loads it too."""
    for name in TOKENIZER_FILES:
        path = base.directory / name
        if not path.is_file():
            continue
        if patched is not None and name in (*SLOW_TOKENIZER_FILES, "tokenizer.json", "tokenizer_config.json"):
            continue
        shutil.copyfile(path, out / name)
    if patched is not None:
        (out / "tokenizer.json").write_text(patched, encoding="utf-8")
    elif not base.on_disk:
        log.info(
            "the base has no tokenizer.json; its %s files are copied as they are",
            ", ".join(n for n in SLOW_TOKENIZER_FILES if (base.directory / n).is_file()),
        )
    if base.tokenizer_config:
        config = patch_tokenizer_config(base.tokenizer_config, plan, appended_added) if patched is not None else base.tokenizer_config
        portable = portable_tokenizer_config(config)
        if portable is not None:
            log.info("tokenizer_config.json: transformers 5 layout rewritten so that transformers 4.x loads it too")
        if portable is not None or patched is not None:
            write_json(out / "tokenizer_config.json", portable or config)


def check_chat_template(opts: RemapOptions, src: TokenizerSource, plan: RemapPlan) -> None:
    """--chat-template source needs every special token M's template writes out in the
    output; with T's template, M's template tokens that the output drops are named."""
    template = read_chat_template(src.directory, src.tokenizer_config)
    lost = [token for token in template_special_tokens(template, src.spec.added) if token not in plan.out_vocab]
    if opts.chat_template == "source":
        if template is None:
            raise CliError(f"--chat-template source: {src.directory} has no chat template")
        if lost:
            raise CliError(
                f"--chat-template source: M's chat template uses {', '.join(map(repr, lost))}, which {opts.base_tokenizer} lacks "
                "and --drop-extra drops: use append mode or --chat-template base"
            )
    elif lost:
        log.warning("M's chat template uses %s, which the output drops (it gets T's chat template)", ", ".join(map(repr, lost)))


def write_source_chat_template(src: TokenizerSource, out: Path) -> None:
    """M's chat template instead of T's, in the file M keeps it in."""
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
        if (src.directory / name).is_file():
            shutil.copyfile(src.directory / name, out / name)
    config = read_optional_json(out / "tokenizer_config.json")
    config.pop("chat_template", None)
    if "chat_template" in src.tokenizer_config and not any(
        (src.directory / n).is_file() for n in ("chat_template.jinja", "chat_template.json")
    ):
        config["chat_template"] = src.tokenizer_config["chat_template"]
    write_json(out / "tokenizer_config.json", config)


def copy_other_files(src_dir: Path, out: Path) -> list[str]:
    """M's files that are neither weights, configs nor tokenizer files (README, LICENSE,
    ...). Only the top level: subdirectories such as `original/` hold other formats."""
    copied = []
    for path in sorted(src_dir.iterdir()):
        name = path.name
        if (
            not path.is_file()
            or name.startswith(".")
            or name.endswith(WEIGHT_SUFFIXES)
            or name.endswith(".index.json")
            or name in TOKENIZER_FILES
            or name in CONFIG_FILES
            or name == REPORT_NAME
        ):
            continue
        shutil.copyfile(path, out / name)
        copied.append(name)
    return copied


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


# ======================================================================================
# The output directory: lock, staging, atomic publish, leftovers
# ======================================================================================

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


# ======================================================================================
# One remap: read inputs, plan, report, write
# ======================================================================================


RowSources = tuple[tuple[str, str | None, int], ...]  # the rows a filled row averages: (model source, revision, row id)
MergekitFill = tuple[str, str, RowSources, RowSources]  # (token, RowFill.rule, input rows, output rows)


@dataclass(frozen=True)
class RemapOptions:
    src_model: str
    base_tokenizer: str
    out_dir: Path | None  # None: a dry run
    drop_extra: bool = False
    init: str = "fvt"
    match: str = "auto"
    max_shard_size: int = 5 * 10**9
    pad_to_multiple_of: int | None = None
    revision: str | None = None
    base_revision: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    embed_name: str | None = None
    head_name: str | None = None
    trust_remote_code: bool = False
    init_report: int = 0
    show_progress: bool = False
    donor_model: str | None = None
    omp_k: int = 64
    chat_template: str = "base"
    # init mergekit (alignments of a merge with tokenizer_source): T's token -> (RowFill.rule,
    # the rows to average for the input and for the output embedding), a hash of those models,
    # and the lm_head a tied model's copy gets when its output rows differ from its input rows
    mergekit_fills: tuple[MergekitFill, ...] = ()
    mergekit_inputs: str | None = None
    untie_head: str | None = None

    def identity(self) -> dict[str, Any]:
        """What determines the output: equal identities give equal outputs."""
        keys = (
            "src_model",
            "base_tokenizer",
            "drop_extra",
            "init",
            "match",
            "max_shard_size",
            "pad_to_multiple_of",
            "revision",
            "base_revision",
            "embed_name",
            "head_name",
            "donor_model",
            "omp_k",
            "chat_template",
            "mergekit_fills",
            "mergekit_inputs",
            "untie_head",
        )
        return {key: getattr(self, key) for key in keys}


@dataclass(frozen=True)
class RemapInputs:
    """M's checkpoint and configs, and both tokenizers, read and checked."""

    src_dir: Path
    base_path: Path
    config: Mapping[str, Any]
    ckpt: Checkpoint
    vocab: VocabTensors
    base: TokenizerSource
    src: TokenizerSource

    @functools.cached_property
    def src_token_of_id(self) -> dict[int, str]:
        return {token_id: token for token, token_id in self.src.spec.vocab.items()}


@dataclass(frozen=True)
class PlannedRemap:
    """The plan and what carries it out: shards, role ids, the donor (--init donor/omp)."""

    plan: RemapPlan
    match_mode: str
    shards: ShardPlan
    donor: Donor | None
    donor_of_token: Mapping[str, int]
    config_ids: Mapping[str, Any]
    generation_ids: Mapping[str, Any]
    config_token_ids: Mapping[tuple[str | None, str], Any] = field(default_factory=dict)  # config_token_ids
    donor_unreachable: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())  # (the donor's, M's) ids never produced

    @functools.cached_property
    def appended_added(self) -> dict[str, Any]:
        return {token: flags for token, flags in self.plan.src_added_flags.items() if token in {s for s, _, _ in self.plan.appended}}


def remap(opts: RemapOptions) -> dict[str, Any]:
    """Plan and (unless dry_run) write one remapped model. Returns the report; raises
    CliError for bad input and SelfCheckError when the written output is wrong."""
    started = time.monotonic()
    inputs = read_inputs(opts)
    match_mode = effective_match_mode(opts.match, inputs.base.spec, inputs.src.spec)
    base_check = ForkedCall(check_base_tokenizer, inputs.base, emission_candidates(inputs.base.spec, inputs.src.spec, match_mode))
    src_unreachable = unreachable_tokens(inputs.src, inputs.src.spec.vocab) if match_mode == "bytes" else frozenset()
    base_unreachable = base_check.result()
    check_interrupt()
    planned = plan_outputs(opts, inputs, match_mode, base_unreachable, src_unreachable)
    check_interrupt()
    report = remap_report(opts, inputs, planned)
    announce(report, planned)
    check_chat_template(opts, inputs.src, planned.plan)
    # The patched tokenizer is built and checked in a forked worker while the shards are
    # written (0.5 s of GIL-bound work for a 128k-token BPE).
    patched = PatchedTokenizer(inputs.base, planned) if planned.plan.mode == "append" and planned.plan.appended else None
    if opts.dry_run:
        report["tokenizer"] = patched.result()[1] if patched is not None else {}
    else:
        write_output(opts, inputs, planned, report, patched)
    report["seconds"] = round(time.monotonic() - started, 3)
    return report


def read_inputs(opts: RemapOptions) -> RemapInputs:
    """Resolve M and T (directories or Hub repos), check --out_dir, read M's headers and
    configs and both tokenizers; everything that can be wrong with them is found here."""
    src_dir = resolve_model(opts.src_model, opts.revision)
    base_path = resolve_source(opts.base_tokenizer, opts.base_revision, [*TOKENIZER_FILES, *CONFIG_FILES])
    if not src_dir.is_dir():
        raise CliError(f"--src_model {opts.src_model}: expected a model directory or repo id, got a file")
    base_dir = base_path if base_path.is_dir() else base_path.parent
    if opts.out_dir is not None:
        protected = {"source model": src_dir, "base tokenizer": base_dir}
        donor = Path(split_revision(opts.donor_model)[0]).expanduser() if opts.donor_model is not None else None
        if donor is not None and donor.exists():
            protected["donor model"] = donor
        check_out_dir(opts.out_dir, protected, opts.overwrite)
    elif not opts.dry_run:
        raise CliError("--out_dir is required (or --dry-run to see the plan)")
    if not (src_dir / "config.json").is_file():
        raise CliError(f"{src_dir}: no config.json; is this a transformers model directory?")
    config = read_optional_json(src_dir / "config.json")
    ckpt = read_checkpoint(src_dir)
    refuse_encoder_decoder(config, ckpt)
    vocab = find_vocab_tensors(ckpt, config, embed_name=opts.embed_name, head_name=opts.head_name, trust_remote_code=opts.trust_remote_code)
    config_rows = config_value(config, "vocab_size")
    if isinstance(config_rows, int) and config_rows != vocab.rows and opts.init == "mergekit":  # mergekit's IndexError: fixed here
        log.warning(
            "%s: config.json says vocab_size %s, %s has %s rows (the aligned copy is consistent)",
            src_dir,
            config_rows,
            vocab.embed,
            vocab.rows,
        )
    elif isinstance(config_rows, int) and config_rows != vocab.rows:
        raise CliError(
            f"{src_dir / 'config.json'}: vocab_size {config_rows} disagrees with {vocab.embed}, which has {vocab.rows} rows; "
            f"the tensors are right (transformers cannot load this checkpoint as is): set vocab_size to {vocab.rows}"
        )
    return RemapInputs(src_dir, base_path, config, ckpt, vocab, read_tokenizer(base_path), read_tokenizer(src_dir))


def plan_outputs(
    opts: RemapOptions, inputs: RemapInputs, match_mode: str, base_unreachable: frozenset[int], src_unreachable: frozenset[int]
) -> PlannedRemap:
    """Match the tokens (`*_unreachable`: the ids each tokenizer never produces), decide
    every row (reading the donor and encoding FVT texts only when some row needs them), the
    shards and the output's role ids."""
    base, src, vocab = inputs.base, inputs.src, inputs.vocab
    matches = match_tokens(base.spec, src.spec, match_mode, base_unreachable, src_unreachable)
    matched = {b for b, s in matches.src_of_base.items() if s < vocab.rows}
    unmatched = len(matched) < len(base.spec.vocab)  # else no row needs a donor, which is then not read
    donor = read_donor_for(opts, vocab) if opts.init in ("donor", "omp") and unmatched else None
    donor_of_token = donor_tokens(base.spec, donor, opts.match, base_unreachable) if donor is not None else {}
    decompositions: dict[str, tuple[int, ...]] = {}
    missing = [t for t, i in base.spec.vocab.items() if i not in matched and i not in base_unreachable and t not in donor_of_token]
    if opts.init in ("fvt", "donor", "omp") and missing:
        decompositions = fvt_decompositions(token_texts(missing, base.spec), src)
    plan = plan_remap(
        base.spec,
        src.spec,
        src_rows=vocab.rows,
        matches=matches,
        drop_extra=opts.drop_extra,
        init=opts.init,
        base_config_vocab_size=config_value(base.config, "vocab_size"),
        pad_to_multiple_of=opts.pad_to_multiple_of,
        decompositions=decompositions,
        donor_of_token=donor_of_token,
        unreachable=base_unreachable,
        fill_rules={token: rule for token, rule, _, _ in opts.mergekit_fills},
    )
    src_eos = as_id_list(src.generation_config.get("eos_token_id", config_value(inputs.config, "eos_token_id")))
    config_ids, generation_ids = output_role_ids(
        base.spec.roles,
        base.spec.vocab,
        base.config,
        base.generation_config,
        [inputs.src_token_of_id[i] for i in src_eos if i in inputs.src_token_of_id],
        plan,
    )
    token_ids = config_token_ids(inputs.config, plan, inputs.src_token_of_id, base)
    shards = plan_shards(output_entries(inputs.ckpt, vocab, plan.n_rows, opts.untie_head), opts.max_shard_size)
    donor_is_t = opts.donor_model is None and match_mode == "bytes"  # T's ids were all checked (emission_candidates)
    donor_unreachable = (base_unreachable if donor_is_t else frozenset(), src_unreachable)
    return PlannedRemap(plan, match_mode, shards, donor, donor_of_token, config_ids, generation_ids, token_ids, donor_unreachable)


def emission_candidates(base: VocabSpec, src: VocabSpec, match_mode: str) -> list[str]:
    """T's tokens whose emission is checked: matching by bytes (across families), every
    one, since any may take a match; matching by spelling, those M lacks (guessed rows)."""
    return list(base.vocab) if match_mode == "bytes" else [token for token in base.vocab if token not in src.vocab]


def remap_report(opts: RemapOptions, inputs: RemapInputs, planned: PlannedRemap) -> dict[str, Any]:
    """remap_report.json: its whole schema in one place. write_output adds self_check,
    copied_files and files; remap adds tokenizer and seconds."""
    plan, vocab, donor = planned.plan, inputs.vocab, planned.donor
    plan_report = plan.to_dict(inputs.src_token_of_id)
    transplant = transplant_warning(plan_report)
    if transplant:
        plan_report["warnings"].append(transplant)
    return {
        "schema": REPORT_SCHEMA_ID,
        "tool": f"remap_tokenizer.py {__version__}",
        "inputs": {
            "src_model": {
                "source": opts.src_model,
                "revision": opts.revision,
                "path": str(inputs.src_dir),
                "fingerprint": directory_fingerprint(inputs.src_dir),
            },
            "base_tokenizer": {
                "source": opts.base_tokenizer,
                "revision": opts.base_revision,
                "path": str(inputs.base_path),
                "fingerprint": directory_fingerprint(inputs.base_path),
            },
        },
        "options": opts.identity(),
        "out_dir": str(opts.out_dir) if opts.out_dir is not None else None,
        "dry_run": opts.dry_run,
        "match_mode": planned.match_mode,
        "vocab_tensors": dataclasses.asdict(vocab) | {"tied": vocab.head is None},
        "base_rows": base_model_rows(inputs.base),
        "plan": plan_report,
        "shards": planned.shards.to_dict(),
        "config": {
            "vocab_size": plan.n_rows,
            **{f"{role}_token_id": value for role, value in planned.config_ids.items()},
            **{f"{section}.{key}" if section else key: value for (section, key), value in planned.config_token_ids.items()},
        },
        "donor": {
            "source": donor.source,
            "rows": donor.vocab.rows,
            "hidden": donor.vocab.hidden,
            "tokens_matched": len(planned.donor_of_token),
        }
        if donor is not None
        else None,
    }


def announce(report: Mapping[str, Any], planned: PlannedRemap) -> None:
    """The plan's warnings, on stderr."""
    for warning in report["plan"]["warnings"]:
        log.warning("%s", warning)
    if planned.plan.matches.collisions:
        log.warning(
            "%d token(s) spell the same bytes as another token of their tokenizer; the one the tokenizer produces keeps the match "
            "(see the report)",
            len(planned.plan.matches.collisions),
        )


class PatchedTokenizer:
    """The append-mode tokenizer.json, built and checked in a forked worker (ForkedCall)."""

    def __init__(self, base: TokenizerSource, planned: PlannedRemap) -> None:
        spec = base.spec
        self.job = ForkedCall(patched_tokenizer, base.tokenizer_json, planned.plan, planned.appended_added, spec)
        self.value: tuple[str, dict[str, int]] | None = None

    def result(self) -> tuple[str, dict[str, int]]:
        """(the patched tokenizer.json, the report's `tokenizer` entry); warns once."""
        if self.value is None:
            patched, reachable = self.job.result()
            self.value = patched, {"appended_reachable_by_encoding": reachable}
            if reachable:
                log.warning(
                    "%d appended token(s) can be produced by encoding text with the patched tokenizer (whole words the base "
                    "matches against its vocabulary, e.g. with ignore_merges): encodings differ from the base's for them; "
                    "use --drop-extra for merges",
                    reachable,
                )
        return self.value


def write_output(
    opts: RemapOptions, inputs: RemapInputs, planned: PlannedRemap, report: dict[str, Any], patched: PatchedTokenizer | None
) -> None:
    """Write D: the donor's or OMP's rows first (they may need the whole donor embedding),
    then, in a locked staging directory, the shards (streamed, verified), configs,
    tokenizer files, M's other files and the report; then publish it."""
    assert opts.out_dir is not None
    plan, shards = planned.plan, planned.shards
    given_rows = (
        initialised_rows(plan, inputs.ckpt, inputs.vocab, inputs.src.spec, planned.donor, opts, planned.donor_unreachable)
        if planned.donor is not None
        else mergekit_rows(plan, inputs.ckpt, inputs.vocab, opts)
        if opts.init == "mergekit"
        else {}
    )
    check_free_space(opts.out_dir.parent, shards.total_size)
    try:
        with OutputDirectory(opts.out_dir, opts.overwrite) as output:
            out = output.path
            assert out is not None
            digests, verified = write_shards(out, inputs.ckpt, shards, plan, inputs.src_token_of_id, opts.show_progress, given_rows)
            self_check(out, shards)
            report["self_check"] = {"ok": True, "copied_rows_checked": verified, "tensors_checked": sum(len(t) for t in shards.tensors)}
            write_configs(out, inputs, planned)
            patched_text = None
            if patched is not None:
                patched_text, report["tokenizer"] = patched.result()
            write_tokenizer_files(inputs.base, out, patched_text, plan, planned.appended_added)
            if opts.chat_template == "source":
                write_source_chat_template(inputs.src, out)
            report["copied_files"] = copy_other_files(inputs.src_dir, out)
            listed = sorted(path for path in out.iterdir() if path.is_file() and path.name != OWNER_FILE)
            report["files"] = {path.name: digests.get(path.name) or file_digest(path) for path in listed}
            write_json(out / REPORT_NAME, report)
            output.publish()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CliError(
                f"disk full while writing into {opts.out_dir.parent}; nothing "
                f"was left behind: free at least {human_bytes(shards.total_size)}"
            ) from exc
        raise CliError(f"cannot write {exc.filename or opts.out_dir}: {exc.strerror}; nothing was left behind") from exc


def write_configs(out: Path, inputs: RemapInputs, planned: PlannedRemap) -> None:
    """The shard index (sharded output only), config.json and generation_config.json."""
    shards = planned.shards
    if len(shards.files) > 1:
        write_json(out / SAFETENSORS_INDEX, {"metadata": {"total_size": shards.total_size}, "weight_map": shards.weight_map()})
    write_json(out / "config.json", patch_config(inputs.config, planned.plan.n_rows, planned.config_ids, planned.config_token_ids))
    if inputs.src.generation_config:
        write_json(out / "generation_config.json", patch_generation_config(inputs.src.generation_config, planned.generation_ids))


def base_model_rows(base: TokenizerSource) -> int:
    """The rows of T's models: its config.json's vocab_size when T has one, else its tokens."""
    rows = config_value(base.config, "vocab_size")
    return rows if is_int(rows) and rows >= len(base.spec.vocab) else len(base.spec.vocab)


def describe_counts(plan_report: Mapping[str, Any]) -> str:
    counts = plan_report["counts"]
    rules = ", ".join(f"{rule} {n}" for rule, n in plan_report["init_rules"].items())
    return (
        f"copied {counts['copied'] + counts['moved']} ({counts['moved']} of them to new ids), appended {counts['appended']}, "
        f"initialised {counts['initialised']}{f' ({rules})' if rules else ''}, dropped {counts['dropped']}, "
        f"ghost {counts['ghost']}, padding {counts['padding']}"
    )


def human_summary(report: Mapping[str, Any], dry_run: bool, init_report: int = 0) -> str:
    plan = report["plan"]
    lines = [
        f"{'plan' if dry_run else 'remapped'}: {report['inputs']['src_model']['source']} -> token order of "
        f"{report['inputs']['base_tokenizer']['source']} ({plan['mode']} mode, init {plan['init']}, match {report['match_mode']})",
        f"rows: {plan['rows']['source']} -> {plan['rows']['output']} (base tokenizer: {plan['rows']['base_tokens']} tokens); "
        f"tensors {report['vocab_tensors']['embed']}"
        + (f", {report['vocab_tensors']['head']}" if report["vocab_tensors"]["head"] else " (tied)"),
        describe_counts(plan),
    ]
    dropped_special = [item["token"] for item in plan["dropped"] if item.get("added")]
    if dropped_special:
        lines.append(
            "dropped special/added tokens: "
            f"{', '.join(quoted(token) for token in dropped_special[:20])}{' ...' if len(dropped_special) > 20 else ''}"
        )
    shards = report["shards"]
    lines.append(f"shards: {len(shards['shards'])} file(s), {human_bytes(shards['total_size'])}")
    if dry_run:
        lines += [f"  {s['file']}  {s['tensors']} tensors  {human_bytes(s['bytes'])}" for s in shards["shards"]]
    elif "self_check" in report:
        lines.append(f"self-check: ok ({report['self_check']['copied_rows_checked']} copied rows bit-identical)")
    if init_report or dry_run:
        lines += init_examples(plan, init_report or 5)
    return "\n".join(lines)


RULE_NOTES = {
    "unreachable": "T's tokenizer never produces these tokens (another token spells their text): the mean row, "
    "which takes no probability from the tokens it does produce",
}


def init_examples(plan: Mapping[str, Any], per_rule: int) -> list[str]:
    """The `per_rule` most telling examples of each initialisation rule: tokens built from
    the most parts, longest first (the first ids are byte fallbacks and single characters);
    then tokens that spell the same bytes as another token of their tokenizer."""
    by_rule: dict[str, list[Mapping[str, Any]]] = {}
    for item in plan["initialised"]:
        by_rule.setdefault(item["rule"], []).append(item)
    lines = []
    if by_rule:
        lines.append(
            "initialised rows, by rule (TOKEN <- the rows it is made of: A + B is the mean of their rows; "
            "<donor row N>: row N of the donor):"
        )
    for rule, items in sorted(by_rule.items()):
        chosen = sorted(items, key=lambda item: (-len(item["from"]), -len(item["token"]), item["id"]))[:per_rule]
        lines.append(f"  {rule} ({len(items)}){': ' + RULE_NOTES[rule] if RULE_NOTES.get(rule) else ''}:")
        lines += [f"    {item['id']:>7} {quoted(item['token'])} <- {shown_parts(item['from'])}" for item in chosen]
    match = plan["match"]
    if match["collisions"]:
        lines.append(
            f"tokens that spell the same bytes as another token of their tokenizer ({match['collisions']}): "
            "the one the tokenizer produces keeps the match (KEPT over DROPPED):"
        )
        lines += [
            f"    {c['side']}: {quoted(c['kept'])} ({c['kept_id']}) over {quoted(c['dropped'])} ({c['dropped_id']})"
            for c in match["collision_examples"][:per_rule]
        ]
    return lines


def shown_parts(parts: Sequence[str]) -> str:
    return (
        " + ".join(part if part.startswith("<") and part.endswith(">") and " row " in part else quoted(part) for part in parts)
        or "(the mean row)"
    )


def transplant_warning(plan: Mapping[str, Any]) -> str | None:
    initialised, rows = plan["counts"]["initialised"], plan["rows"]["output"]
    if rows and initialised * 2 > rows:
        return f"mostly initialised ({initialised} of {rows} rows): this is a tokenizer transplant, expect a large quality loss"
    return None


def mergeable_with_base(report: Mapping[str, Any], base_rows: int) -> str | None:
    """None when the output has the row count of T's models, else why it cannot merge."""
    rows = report["plan"]["rows"]["output"]
    if rows == base_rows:
        return None
    return f"not mergeable with T's models ({rows} vs {base_rows} rows): use --drop-extra for merges"


def human_bytes(count: int) -> str:
    """Decimal units, as --max-shard-size reads them."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def mergekit_snippet(out_dir: str) -> str:
    return f"  - model: {out_dir}\n    parameters:\n      weight: 1.0\n"


# ======================================================================================
# Aligning a mergekit configuration (--mergekit-config)
# ======================================================================================


@dataclass(frozen=True)
class ModelView:
    """A model (or tokenizer) as the alignment sees it: its vocabulary and row count."""

    source: str
    revision: str | None
    directory: Path
    vocab: Mapping[str, int]
    rows: int
    weight_bytes: int
    hidden: int | None = None
    facts: ModelFacts | None = None  # config and tensor headers, for the merge check
    added: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)  # added tokens -> flags
    head_name: str | None = None  # the output embedding (None: tied, or no weights)

    def merge_vocab(self, name: str, merged: bool = True) -> ModelVocab:
        """The model as the tokenizer merge reads it: the rows mergekit takes as held are
        config.json's vocab_size where that is below the embedding's."""
        config_rows = config_value(self.facts.config, "vocab_size") if self.facts is not None else None
        if merged and is_int(config_rows) and 0 <= config_rows < self.rows:
            return ModelVocab(name, self.vocab, self.added, config_rows, embedding_rows=self.rows)
        return ModelVocab(name, self.vocab, self.added, self.rows if merged else len(self.vocab), merged)


def view_model(source: str, revision: str | None, trust_remote_code: bool) -> ModelView:
    directory = resolve_model(source, revision)
    tokenizer = read_tokenizer(directory)
    config = tokenizer.config
    if directory.is_dir() and select_weight_files(p.name for p in directory.iterdir() if p.is_file())[0] != "none":
        ckpt = read_checkpoint(directory)
        vocab = find_vocab_tensors(ckpt, config, embed_name=None, head_name=None, trust_remote_code=trust_remote_code)
        facts = ModelFacts(config, {name: (t.dtype, t.shape) for name, t in ckpt.tensors.items()})
        weight_bytes = sum(t.nbytes for t in ckpt.tensors.values())
        return ModelView(
            source, revision, directory, tokenizer.spec.vocab, vocab.rows, weight_bytes, vocab.hidden, facts, tokenizer.spec.added,
            vocab.head,
        )  # fmt: skip
    rows = config_value(config, "vocab_size")
    rows = rows if isinstance(rows, int) else len(tokenizer.spec.vocab)
    return ModelView(source, revision, directory, tokenizer.spec.vocab, rows, 0, added=tokenizer.spec.added)


@dataclass(frozen=True)
class AlignOptions:
    config: Path
    out_dir: Path
    base_tokenizer: str | None = None
    base_revision: str | None = None
    init: str | None = None  # None: donor (the target's rows) when the target has weights of M's width, else fvt
    match: str = "auto"
    max_shard_size: int = 5 * 10**9
    dry_run: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    show_progress: bool = False
    donor_model: str | None = None
    omp_k: int = 64
    chat_template: str = "base"


@dataclass(frozen=True)
class AlignmentPlan:
    """What an alignment does: the target, and for every model (first appearance) an
    entry of the summary; the models to remap, with their views."""

    config: Mapping[str, Any]
    yaml_dir: Path
    target_ref: ModelRef
    target_source: str
    target: ModelView
    entries: list[dict[str, Any]]
    to_remap: list[tuple[dict[str, Any], ModelView]]
    merge: TokenizerMerge | None = None  # a merge with tokenizer_source: its tokenizer and rows

    def summary(self, config_path: Path) -> dict[str, Any]:
        summary = {
            "schema": "merge_tools.align/1",
            "config": str(config_path),
            "target": {"model": str(self.target_ref), "tokens": len(self.target.vocab), "rows": self.target.rows},
            "models": self.entries,
        }
        if self.merge is not None:
            summary["tokenizer_merge"] = self.merge.merged.to_dict()
        return summary


def align_mergekit(opts: AlignOptions) -> tuple[dict[str, Any], int]:
    """Remap, with --drop-extra, every model of a mergekit configuration whose vocabulary
    or row count differs from the target tokenizer's, and write a configuration that
    merges the aligned models. Returns (summary, exit code)."""
    plan = plan_alignment(opts)
    summary = plan.summary(opts.config)
    if opts.dry_run:  # the plans need only tokenizers and headers: problems show before any byte is written
        with tempfile.TemporaryDirectory(prefix="merge_tools-tokenizer-") as scratch:
            plan = place_merged_tokenizer(plan, Path(scratch)) if plan.merge is not None else plan
            for entry, view in plan.to_remap:
                dry = dataclasses.replace(aligned_remap_options(opts, entry, view, plan), out_dir=None, dry_run=True)
                record_counts(entry, remap(dry))
        return summary, 0
    if plan.merge is not None:
        check_free_space(opts.out_dir, sum(view.weight_bytes for _, view in plan.to_remap))
        plan = place_merged_tokenizer(plan, plan.merge.directory)
        summary["target"]["model"] = str(plan.merge.directory)
    code = run_remaps(opts, plan)
    aligned, merge_yaml = write_aligned_yaml(opts, plan)
    remove_stale_outputs(opts.out_dir, plan)
    summary["merge_yaml"] = str(merge_yaml)
    summary["command"] = f"mergekit-yaml {merge_yaml} OUTPUT_DIR --copy-tokenizer"
    failures = (
        check_aligned_models(aligned, plan.yaml_dir, plan.target, opts.trust_remote_code)
        if code == 0
        else ["a remap failed its self-check"]
    )
    summary["gate"] = {"ok": not failures, "problems": failures}
    return summary, 1 if failures else code


def refuse_mergekit_markers(out_dir: Path, sources: Sequence[str]) -> None:
    """mergekit reads `@` in a model path as a revision and `+` as a LoRA: the aligned YAML
    names ALIGNED/... and the local models as absolute paths, so neither may hold them
    (checked before anything is written, not after publishing a YAML mergekit misreads)."""
    for label, path in [("--out_dir", str(out_dir.resolve())), *(("the model", s) for s in sources if os.path.exists(s))]:
        marker = next((m for m in "@+" if m in path), None)
        if marker is not None:
            what = "a revision" if marker == "@" else "a LoRA"
            raise CliError(
                f"{label} {path} contains {marker!r}, which mergekit reads as the start of {what}: the aligned merge.yaml could not "
                "name it; move it to a path without '@' or '+'"
            )


def mergekit_schema_problems(config: Mapping[str, Any]) -> list[str]:
    """The installed mergekit's own reading of the configuration (its pydantic schema), []
    without mergekit (the project's checks then stand alone)."""
    import importlib.util

    if importlib.util.find_spec("mergekit") is None:
        return []
    from mergekit.config import MergeConfiguration

    try:
        MergeConfiguration.model_validate(config)
    except Exception as exc:  # pydantic's ValidationError, or the RuntimeError of mergekit's own validators
        errors = getattr(exc, "errors", None)
        if callable(errors):
            return [f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in errors()[:3]]
        return [str(exc).splitlines()[0]]
    return []


def plan_alignment(opts: AlignOptions) -> AlignmentPlan:
    """Read the YAML, choose the target (or plan the tokenizer a tokenizer_source merge
    gets), view every model (tokenizer and headers), refuse a merge mergekit would refuse,
    and name the output of each model to remap."""
    config = read_mergekit_config(opts.config)
    references = [parse_model_reference(r) for r in mergekit_references(config, opts.config)]
    problems = mergekit_schema_problems(config) + mergekit_config_problems(config, installed_mergekit_methods() or MERGEKIT_METHODS)
    if problems:
        raise CliError(f"{opts.config}: mergekit would refuse it: {'; '.join(problems)}; nothing was remapped")
    yaml_dir = opts.config.resolve().parent
    refuse_mergekit_markers(opts.out_dir, [local_or_hub(ref, yaml_dir) for ref in references])
    for ref in references:
        if ref.lora:
            raise CliError(
                f"{opts.config}: {ref} applies a LoRA ({ref.lora}); its vocabulary rows cannot be remapped before the LoRA is "
                "merged: merge it first (e.g. with PEFT's merge_and_unload) and reference the merged model"
            )
    unique: dict[tuple[str, str | None], ModelRef] = {}
    for ref in references:
        unique.setdefault((local_or_hub(ref, yaml_dir), ref.revision), ref)
    views = {key: view_model(*key, opts.trust_remote_code) for key in unique}
    check_mergeable(config, views, unique, yaml_dir)
    merge = plan_tokenizer_merge(opts, config, unique, views, yaml_dir) if opts.base_tokenizer is None else None
    if merge is not None:
        target_ref, target_source, target = ModelRef(str(merge.directory)), str(merge.directory), merge.view
    else:
        target_ref = choose_target(opts, config, references)
        target_source = local_or_hub(target_ref, yaml_dir) if opts.base_tokenizer is None else target_ref.path
        target = view_model(target_source, target_ref.revision, opts.trust_remote_code)
    inputs = alignment_inputs(opts, views, merge, None if merge is not None else target)
    entries: list[dict[str, Any]] = []
    to_remap = []
    out_dir = opts.out_dir.resolve()
    taken = {MERGED_TOKENIZER_DIR, *(path.name for path in inputs if path.parent == out_dir)}
    carriers = tokenizer_carriers(config, unique, yaml_dir) if merge is not None else set()
    for (source, revision), ref in unique.items():
        view = views[(source, revision)]
        same = (
            view.vocab == target.vocab and view.rows == target.rows and not (merge and merge.merged.fills[merge.names[(source, revision)]])
        )
        entry = {"model": str(ref), "source": source, "revision": revision, "status": "identical" if same else "to remap",
                 "rows": view.rows, "vocab_size": len(view.vocab), "output": source}  # fmt: skip
        if same and merge is not None and (source, revision) in carriers and not same_tokenizer_files(view.directory, merge.files):
            same, entry["status"], entry["reason"] = False, "to remap", "carries the merged tokenizer"
        if not same:
            entry["output"] = str(opts.out_dir.resolve() / aligned_name(ref, taken))
            to_remap.append((entry, view))
        entries.append(entry)
    plan = AlignmentPlan(config, yaml_dir, target_ref, target_source, target, entries, to_remap, merge)
    refuse_writing_inputs(opts, inputs, plan)
    return plan


def alignment_inputs(
    opts: AlignOptions, views: Mapping[tuple[str, str | None], ModelView], merge: TokenizerMerge | None, target: ModelView | None
) -> dict[Path, str]:
    """Every local file and folder an alignment reads (resolved -> what it is): the YAML,
    every model, the target tokenizer, the donor, the tokenizer a merge extends."""
    inputs = {opts.config.resolve(): f"the merge configuration {opts.config}"}
    for (source, _), view in views.items():
        inputs.setdefault(view.directory.resolve(), f"the model {source}")
    if target is not None:
        inputs.setdefault(target.directory.resolve(), f"the target tokenizer {target.source}")
    if merge is not None:
        inputs.setdefault(merge.source_dir.resolve(), f"the tokenizer source {merge.source_dir}")
    if opts.donor_model is not None and Path(split_revision(opts.donor_model)[0]).expanduser().exists():
        inputs.setdefault(Path(split_revision(opts.donor_model)[0]).expanduser().resolve(), f"the donor model {opts.donor_model}")
    return inputs


def refuse_writing_inputs(opts: AlignOptions, inputs: Mapping[Path, str], plan: AlignmentPlan) -> None:
    """No byte of an alignment lands on an input: --out_dir is not inside one, and no path
    it writes (merge.yaml, tokenizer/, each aligned model) is, holds or lies inside one.
    Checked before anything is written."""
    out_dir = opts.out_dir.resolve()
    for path, what in inputs.items():
        if path.is_dir() and (out_dir == path or path in out_dir.parents):
            where = "is" if out_dir == path else "is inside"
            raise CliError(f"--out_dir {opts.out_dir} {where} {what} ({path}), an input; choose a directory outside it")
    outputs = {out_dir / "merge.yaml": "the aligned merge.yaml", **{Path(e["output"]): "an aligned model" for e, _ in plan.to_remap}}
    if plan.merge is not None:
        outputs[out_dir / MERGED_TOKENIZER_DIR] = "the merged tokenizer"
    for output, written in outputs.items():
        target = output.resolve()
        for path, what in inputs.items():
            if target == path or path in target.parents or target in path.parents:
                relation = "is" if target == path else "would be written inside" if path in target.parents else "holds"
                raise CliError(
                    f"{output} ({written}) {relation} {what}, an input of the alignment; nothing was written: choose another --out_dir"
                )


def tokenizer_carriers(
    config: Mapping[str, Any], unique: Mapping[tuple[str, str | None], ModelRef], yaml_dir: Path
) -> set[tuple[str, str | None]]:
    """The models whose tokenizer `mergekit-yaml --copy-tokenizer` may copy into the merged
    model: the base_model; without one, any model (it takes the first of a Python set)."""
    if config.get("base_model") is None:
        return set(unique)
    ref = parse_model_reference(config["base_model"])
    return {(local_or_hub(ref, yaml_dir), ref.revision)}


TOKENIZER_COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def same_tokenizer_files(directory: Path, files: Mapping[str, bytes]) -> bool:
    """Whether mergekit's --copy-tokenizer, copying from `directory`, gives the fast
    tokenizer `files` hold: the same files, JSON compared as data."""
    for name in TOKENIZER_COPIED:
        path = directory / name
        ours, theirs = (path.read_bytes() if path.is_file() else None), files.get(name)
        if ours is None or theirs is None:
            if ours is not theirs:
                return False
        elif ours != theirs and (not name.endswith(".json") or parse_json(ours, path) != parse_json(theirs, name)):
            return False
    return True


def choose_target(opts: AlignOptions, config: Mapping[str, Any], references: Sequence[ModelRef]) -> ModelRef:
    """--base_tokenizer, else base_model, else the first model."""
    if opts.base_tokenizer is not None:
        return ModelRef(opts.base_tokenizer, opts.base_revision)
    return parse_model_reference(config["base_model"]) if config.get("base_model") is not None else references[0]


def check_mergeable(
    config: Mapping[str, Any],
    views: Mapping[tuple[str, str | None], ModelView],
    unique: Mapping[tuple[str, str | None], ModelRef],
    yaml_dir: Path,
) -> None:
    """compare_tokenizers.py's architecture check, before anything is written: a merge
    mergekit would refuse (or one that mixes incompatible tensors) is exit 2."""
    keys = list(unique)
    base = views[keys[0]].facts

    def facts(reference: Any) -> ModelFacts | None:
        ref = parse_model_reference(reference)
        view = views.get((local_or_hub(ref, yaml_dir), ref.revision))
        return view.facts if view is not None else None

    problems = check_merge_config(config, facts)
    for key in keys[1:]:
        other = views[key].facts
        if base is None or other is None:
            continue
        for level, message in compare_models(base, other, False, not config.get("slices")):
            if level == "fail":
                problems.append(f"{unique[key]}: {message}")
            elif level == "warn":
                log.warning("%s: %s", unique[key], message)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CliError(f"the merge would fail or mix incompatible models, nothing was remapped: {'; '.join(problems[:3])}{more}")


def aligned_name(ref: ModelRef, taken: set[str]) -> str:
    """A readable directory name for a remapped model: one plain path component (never
    empty, `.`, `..` or hidden, whatever the model path ends with), unique among `taken`
    (compared case-insensitively, for case-insensitive file systems)."""
    path = ref.path.rstrip("/\\")
    if looks_like_hub_id(path) and not os.path.exists(path):
        stem = path.replace("/", "--")
    else:
        stem = os.path.basename(os.path.normpath(os.path.abspath(os.path.expanduser(path or "."))))
    stem = re.sub(r"[^\w.-]+", "_", stem + (f"-{ref.revision}" if ref.revision else "")).lstrip(".") or "model"
    if len(stem) > 100:
        stem = f"{stem[:80]}-{hashlib.sha1(stem.encode()).hexdigest()[:12]}"
    name, counter = stem, 2
    while name.lower() in {n.lower() for n in taken}:
        name, counter = f"{stem}-{counter}", counter + 1
    taken.add(name)
    return name


def aligned_remap_options(opts: AlignOptions, entry: Mapping[str, Any], view: ModelView, plan: AlignmentPlan) -> RemapOptions:
    """One model's remap in an alignment: --drop-extra onto the target; by default the
    target's own rows for the tokens the model lacks, when the widths allow."""
    target = plan.target
    if plan.merge is not None:
        return plan.merge.remap_options(opts, entry, view)
    init = opts.init or ("donor" if target.weight_bytes and view.hidden == target.hidden else "fvt")
    return RemapOptions(
        src_model=entry["source"], base_tokenizer=plan.target_source, out_dir=Path(entry["output"]), drop_extra=True, init=init,
        match=opts.match, max_shard_size=opts.max_shard_size, revision=entry["revision"], base_revision=plan.target_ref.revision,
        trust_remote_code=opts.trust_remote_code, show_progress=opts.show_progress, donor_model=opts.donor_model,
        omp_k=opts.omp_k, chat_template=opts.chat_template,
    )  # fmt: skip


def run_remaps(opts: AlignOptions, plan: AlignmentPlan) -> int:
    """Remap every model that needs it (reusing a finished remap with the same options);
    0, or 1 when a remap failed its self-check."""
    check_free_space(opts.out_dir, sum(view.weight_bytes for _, view in plan.to_remap))
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    code = 0
    for entry, view in plan.to_remap:
        check_interrupt()
        out = Path(entry["output"])
        remap_opts = aligned_remap_options(opts, entry, view, plan)
        previous = read_optional_json(out / REPORT_NAME) if (out / REPORT_NAME).is_file() else None
        if reusable(previous, remap_opts, view, plan.target):
            entry["status"], report = "reused", previous
        else:
            if previous is None and (out.is_symlink() or out.exists()) and not (out.is_dir() and not any(out.iterdir())):
                raise CliError(
                    f"{out} exists and holds files this tool did not write (no {REPORT_NAME}); remove it or choose another --out_dir"
                )
            try:
                report = remap(dataclasses.replace(remap_opts, overwrite=out.exists()))
                entry["status"] = "remapped"
            except SelfCheckError as exc:
                log.error("%s: self-check failed: %s", entry["model"], exc)
                entry["status"], code = "failed", 1
                continue
        record_counts(entry, report)
    return code


def directory_fingerprint(path: Path) -> str:
    """What a remap read from a model or tokenizer folder, in one hash: the folder (a Hub
    snapshot's is named by its commit), every file's name, size and mtime (symlinks
    followed, as the Hub cache links into blobs/), and every safetensors header. An
    alignment reuses an earlier remap only when this is unchanged."""
    directory = path if path.is_dir() else path.parent
    digest = hashlib.sha256(str(directory.resolve()).encode())
    for file in sorted(p for p in directory.iterdir() if p.is_file()):
        stat = file.stat()
        digest.update(f"\0{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        if file.suffix == ".safetensors" and stat.st_size >= 8:
            with file.open("rb") as handle:
                digest.update(handle.read(8 + min(int.from_bytes(handle.read(8), "little"), stat.st_size)))
    return digest.hexdigest()


def reusable(previous: Mapping[str, Any] | None, remap_opts: RemapOptions, view: ModelView, target: ModelView) -> bool:
    """An earlier remap in ALIGNED is kept only when it passed its self-check with the same
    options and read the same model and target (directory_fingerprint), not merely the same paths."""
    if previous is None or not previous.get("self_check", {}).get("ok"):
        return False
    inputs = previous.get("inputs") or {}
    return (
        previous.get("options") == json.loads(json.dumps(remap_opts.identity()))
        and (inputs.get("src_model") or {}).get("fingerprint") == directory_fingerprint(view.directory)
        and (inputs.get("base_tokenizer") or {}).get("fingerprint") == directory_fingerprint(target.directory)
    )


def record_counts(entry: dict[str, Any], report: Mapping[str, Any]) -> None:
    """The alignment table's words for a remap: copied (in place or moved), initialised, dropped."""
    counts = report["plan"]["counts"]
    entry.update(
        copied=counts["copied"] + counts["moved"], initialised=counts["initialised"], dropped=counts["dropped"], init=report["plan"]["init"]
    )
    entry["init_rules"] = report["plan"]["init_rules"]


def write_aligned_yaml(opts: AlignOptions, plan: AlignmentPlan) -> tuple[dict[str, Any], Path]:
    """ALIGNED/merge.yaml: the configuration with the remapped models' paths (local paths
    made absolute), without the tokenizer source: the vocabularies now agree."""
    import yaml

    replacement = {
        entry["source"] + "@" + str(entry["revision"]): entry["output"]
        for entry in plan.entries
        if entry["status"] in ("remapped", "reused")
    }

    spellings: dict[str, str] = {}  # the YAML's spelling of a model -> its spelling in the aligned YAML
    spelled: dict[str, int] = {}  # aligned model -> spellings of it given out

    def substitute(reference: Any) -> Any:
        ref = parse_model_reference(reference)
        source = local_or_hub(ref, plan.yaml_dir)
        new = replacement.get(source + "@" + str(ref.revision))
        if new is not None:
            # two spellings of one model are two inputs to mergekit: they stay two spellings
            # (`D/m`, `D/m/.`), never one path listed twice, which mergekit refuses
            if str(ref) not in spellings:
                spellings[str(ref)] = new + "/." * spelled.get(new, 0)
                spelled[new] = spelled.get(new, 0) + 1
            new = spellings[str(ref)]
            return new if not (isinstance(reference, Mapping) and reference.get("override_architecture")) else {**reference, "model": new}
        if source != ref.path:  # a local path: absolute, so the aligned YAML works from anywhere
            return str(ModelRef(source, ref.revision)) if isinstance(reference, str) else reference
        return reference

    aligned = map_model_references(plan.config, substitute)
    aligned.pop("tokenizer_source", None)
    block = aligned.pop("tokenizer", None)
    if isinstance(block, Mapping) and block.get("chat_template") is not None and aligned.get("chat_template") is None:
        aligned["chat_template"] = block["chat_template"]  # mergekit reads only the top-level key: the user's intent, honoured
    merge_yaml = opts.out_dir / "merge.yaml"
    staged_yaml = merge_yaml.with_name(f".merge.yaml.{os.getpid()}-{os.urandom(3).hex()}.tmp")  # two alignments never share it
    staged_yaml.write_text(
        f"# Written by remap_tokenizer.py from {opts.config}: every model uses the token order of {plan.target_ref}.\n"
        + yaml.safe_dump(aligned, sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
    os.replace(staged_yaml, merge_yaml)
    return aligned, merge_yaml


ALIGNMENT_MANIFEST = ".merge_tools-alignment.json"  # in ALIGNED: the folders this tool wrote there


def remove_stale_outputs(out_dir: Path, plan: AlignmentPlan) -> None:
    """Remove what an earlier alignment into the same folder wrote and the new merge.yaml no
    longer names (a model dropped from the YAML, the tokenizer of a former union): only
    folders the manifest lists and that still hold this tool's output, never an input."""
    manifest = out_dir / ALIGNMENT_MANIFEST
    previous = read_optional_json(manifest).get("outputs") if manifest.is_file() else []
    current = [Path(e["output"]).name for e in plan.entries if e["status"] in ("remapped", "reused", "failed")]
    current += [MERGED_TOKENIZER_DIR] if plan.merge is not None else []
    inputs = {Path(e["source"]).resolve() for e in plan.entries}
    for name in previous if isinstance(previous, list) else []:
        stale = out_dir / str(name)
        if name in current or "/" in str(name) or stale.is_symlink() or not stale.is_dir() or stale.resolve() in inputs:
            continue
        if name == MERGED_TOKENIZER_DIR or (stale / REPORT_NAME).is_file():
            log.info("removing %s: written by an earlier alignment, the new merge.yaml no longer uses it", stale)
            shutil.rmtree(stale, ignore_errors=True)
    staged = manifest.with_name(f"{ALIGNMENT_MANIFEST}.{os.getpid()}.tmp")
    staged.write_text(json.dumps({"outputs": current}) + "\n", encoding="utf-8")
    os.replace(staged, manifest)


def check_aligned_models(config: Mapping[str, Any], yaml_dir: Path, target: ModelView, trust_remote_code: bool) -> list[str]:
    """What compare_tokenizers.py --weights would object to in the aligned configuration."""
    problems = []
    seen = set()
    for reference in mergekit_references(config):
        ref = parse_model_reference(reference)
        key = (local_or_hub(ref, yaml_dir), ref.revision)
        if key in seen:
            continue
        seen.add(key)
        view = view_model(key[0], ref.revision, trust_remote_code)
        if view.vocab != target.vocab:
            problems.append(f"{ref}: vocabulary differs from the target's")
        if view.rows != target.rows:
            problems.append(f"{ref}: {view.rows} embedding rows, the target has {target.rows}")
    return problems


def align_table(summary: Mapping[str, Any]) -> str:
    width = max(len(m["model"]) for m in summary["models"])
    lines = [f"target tokenizer: {summary['target']['model']} ({summary['target']['tokens']} tokens, {summary['target']['rows']} rows)", ""]
    lines.append(f"{'model':<{width}}  {'status':<10} {'copied':>7} {'initialised':>11}  {'rows from':<28} output")
    for m in summary["models"]:
        rules = ", ".join(f"{rule} {n}" for rule, n in (m.get("init_rules") or {}).items()) or "-"
        lines.append(
            f"{m['model']:<{width}}  {m['status']:<10} {m.get('copied', '-')!s:>7} "
            f"{m.get('initialised', '-')!s:>11}  {rules:<28} {m['output']}"
        )
    if summary.get("tokenizer_merge"):
        lines[1:1] = tokenizer_merge_lines(summary["tokenizer_merge"])
    if "gate" in summary:
        lines.append("")
        lines.append(
            "gate: ok, every model now has the target's token->id map and rows"
            if summary["gate"]["ok"]
            else "gate: FAILED: " + "; ".join(summary["gate"]["problems"])
        )
    return "\n".join(lines)


# ======================================================================================
# Merges that build their tokenizer (tokenizer_source: union, base or a model)
# ======================================================================================

MERGED_TOKENIZER_DIR = "tokenizer"  # ALIGNED/tokenizer: the tokenizer mergekit's tokenizer merge would build


@dataclass(frozen=True)
class TokenizerMerge:
    """The tokenizer a tokenizer_source merge gets (plan_merged_vocab), written to
    `directory`, and what each model's remap onto it needs: the rows mergekit would fill
    from the other models (init mergekit)."""

    merged: MergedVocab
    directory: Path
    source_dir: Path  # the tokenizer it extends: the base's (union, base) or the source model's
    names: Mapping[tuple[str, str | None], str]  # (source, revision) -> the model's name in `merged`
    views: Mapping[tuple[str, str | None], ModelView]
    pad_to_multiple_of: int | None
    inputs_digest: str  # every model's directory_fingerprint: the filled rows come from all of them

    @functools.cached_property
    def view(self) -> ModelView:
        vocab = {token: token_id for token_id, token in enumerate(self.merged.tokens)}
        return ModelView(str(self.directory), None, self.directory, vocab, self.merged.size, 0)

    @functools.cached_property
    def files(self) -> dict[str, bytes]:
        """The merged tokenizer's files (merged_tokenizer_files)."""
        return merged_tokenizer_files(self)

    def fills_of(self, key: tuple[str, str | None]) -> tuple[MergekitFill, ...]:
        """RemapOptions.mergekit_fills of one model: each token it lacks (or that is forced),
        the rule, and the rows to average for its input embedding and for its lm_head, as
        (model source, revision, row id)."""
        key_of_name = {name: k for k, name in self.names.items()}
        name = self.names[key]

        def rows_of(token: str, fill: RowFill) -> tuple[tuple[str, str | None, int], ...]:
            sources = []
            for model in fill.models:
                other = key_of_name[model]
                row = fill.token_id if fill.token_id is not None else self.views[other].vocab[fill.token or token]
                sources.append((other[0], other[1], row))
            return tuple(sources)

        output = self.merged.output_fills.get(name, {})
        return tuple(
            (token, fill.rule, rows_of(token, fill), rows_of(token, output.get(token, fill)))
            for token, fill in self.merged.fills[name].items()
        )

    def untied_head(self, key: tuple[str, str | None], fills: Sequence[MergekitFill]) -> str | None:
        """For a model with tied embeddings whose filled output rows mergekit takes from an
        untied model's lm_head (or from other models than its input rows), the name of the
        lm_head its aligned copy gets; None when its copy stays tied."""
        view = self.views[key]
        if view.head_name is not None or view.facts is None:
            return None
        untied = {k: v.head_name for k, v in self.views.items() if v.head_name is not None}
        differs = any(embed != head or any((source, revision) in untied for source, revision, _ in head) for _, _, embed, head in fills)
        return next(iter(untied.values()), "lm_head.weight") if differs else None

    def remap_options(self, opts: AlignOptions, entry: Mapping[str, Any], view: ModelView) -> RemapOptions:
        """A model's remap onto the merged tokenizer: tokens matched by spelling as mergekit
        matches them, rows it lacks by mergekit's rules (unless --init says otherwise)."""
        init = opts.init or "mergekit"
        key = (entry["source"], entry["revision"])
        fills = self.fills_of(key)
        return RemapOptions(
            src_model=entry["source"], base_tokenizer=str(self.directory), out_dir=Path(entry["output"]), drop_extra=True, init=init,
            match="exact" if init == "mergekit" else opts.match, max_shard_size=opts.max_shard_size,
            pad_to_multiple_of=self.pad_to_multiple_of, revision=entry["revision"], trust_remote_code=opts.trust_remote_code,
            show_progress=opts.show_progress, donor_model=opts.donor_model, omp_k=opts.omp_k, chat_template=opts.chat_template,
            mergekit_fills=fills if init == "mergekit" else (), untie_head=self.untied_head(key, fills) if init == "mergekit" else None,
            mergekit_inputs=self.inputs_digest if init == "mergekit" else None,
        )  # fmt: skip


def plan_tokenizer_merge(
    opts: AlignOptions,
    config: Mapping[str, Any],
    unique: Mapping[tuple[str, str | None], ModelRef],
    views: Mapping[tuple[str, str | None], ModelView],
    yaml_dir: Path,
) -> TokenizerMerge | None:
    """The tokenizer merge of a configuration with tokenizer_source (None without one):
    mergekit's union, base or model tokenizer and its rows, planned from the models'
    tokenizers and row counts. Ghost tokens mergekit would fail on are filled here; a
    `tokenizer.tokens` mergekit refuses is exit 2."""
    settings = tokenizer_merge_settings(config)
    if settings is None:
        return None
    source, tokens, pad = settings
    names = {key: str(ref) for key, ref in unique.items()}

    def name_of(reference: Any) -> str:
        ref = parse_model_reference(reference)
        key = (local_or_hub(ref, yaml_dir), ref.revision)
        if key not in names:
            raise CliError(f"{opts.config}: {ref} is named in the tokenizer settings but is not a model of the merge")
        return names[key]

    base = name_of(config["base_model"]) if config.get("base_model") is not None else None
    models = [view.merge_vocab(names[key]) for key, view in views.items()]
    views = dict(views)
    if source not in ("union", "base"):
        ref = parse_model_reference(source)
        key = (local_or_hub(ref, yaml_dir), ref.revision)
        if key not in names:  # a tokenizer that is no model of the merge: mergekit takes its tokens, none of its rows
            names[key], views[key] = str(ref), view_model(*key, opts.trust_remote_code)
            models.append(views[key].merge_vocab(names[key], merged=False))
        source = names[key]
    merged = plan_merged_vocab(models, base, source, named_tokens(tokens, name_of), pad, vocabulary_groups(config, name_of))
    if merged.problems:
        raise CliError(f"{opts.config}: mergekit would refuse it: {'; '.join(merged.problems[:3])}; nothing was remapped")
    for text in merged.unreadable:
        log.warning("%s", text.split("; remap_tokenizer.py")[0] + "; its row is filled from the models that hold the token")
    key_of_name = {name: key for key, name in names.items()}
    source_dir = views[key_of_name[merged.tokenizer_model]].directory
    digest = hashlib.sha256("".join(directory_fingerprint(view.directory) for view in views.values()).encode()).hexdigest()
    return TokenizerMerge(merged, opts.out_dir.resolve() / MERGED_TOKENIZER_DIR, source_dir, names, views, pad, digest)


def merged_tokenizer_files(merge: TokenizerMerge) -> dict[str, bytes]:
    """The files of the merged tokenizer: the tokenizer it extends, without the ghost
    tokens the merge drops, with the appended tokens as added tokens at their ids (flags
    kept: what mergekit's add_tokens writes), tokenizer_config.json's added_tokens_decoder
    to match; special_tokens_map.json and chat templates copied."""
    source = read_tokenizer(merge.source_dir)
    position = {token: token_id for token_id, token in enumerate(merge.merged.tokens)}
    data = merged_tokenizer_json(source.tokenizer_json, merge.merged, merge.source_dir)
    dropped = {token for token in source.spec.vocab if token not in position}
    config = dict(source.tokenizer_config)
    decoder = {
        key: value
        for key, value in (config.get("added_tokens_decoder") or {}).items()
        if not (isinstance(value, Mapping) and value.get("content") in dropped)
    }
    for token, flags in merge.merged.appended.items():
        decoder[str(position[token])] = {"content": token, **{f: bool(flags[f]) for f in ADDED_TOKEN_FLAGS}}
    if decoder:
        config["added_tokens_decoder"] = decoder
    files = {
        "tokenizer.json": (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode(),
        "tokenizer_config.json": (json.dumps(config, ensure_ascii=False, indent=2) + "\n").encode(),
    }
    for name in ("special_tokens_map.json", "chat_template.jinja", "chat_template.json"):
        if (merge.source_dir / name).is_file():
            files[name] = (merge.source_dir / name).read_bytes()
    return files


def place_merged_tokenizer(plan: AlignmentPlan, directory: Path) -> AlignmentPlan:
    """Write the merged tokenizer into `directory` (files rewritten only when they change,
    so that a finished alignment stays reusable) and point the plan at it."""
    assert plan.merge is not None
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in plan.merge.files.items():
        path = directory / name
        if not path.is_file() or path.read_bytes() != content:
            staged = path.with_name(f".{name}.{os.getpid()}.tmp")
            staged.write_bytes(content)
            os.replace(staged, path)
    merge = dataclasses.replace(plan.merge, directory=directory)
    return dataclasses.replace(plan, merge=merge, target_ref=ModelRef(str(directory)), target_source=str(directory), target=merge.view)


def tokenizer_merge_lines(merged: Mapping[str, Any], head: int = 10) -> list[str]:
    """The alignment table's lines on a tokenizer merge: what each model adds, ghost tokens."""
    lines = [f"tokenizer_source {merged['source']}: {merged['tokens']} tokens, {merged['size']} rows"]
    for model, added in ((merged.get("union") or {}).get("added") or {}).items():
        if added:
            lines.append(f"  {model} adds {len(added)}: {', '.join(map(repr, added[:head]))}" + (" ..." if len(added) > head else ""))
    for model, ghosts in merged["ghosts"].items():
        shown = ", ".join(f"{g['token']!r} (id {g['id']})" for g in ghosts[:head])
        lines.append(f"  {model}: {len(ghosts)} ghost token(s), rows filled from the models that hold them: {shown}")
    return lines


# ======================================================================================
# Command line
# ======================================================================================


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def pad_multiple(text: str) -> int:
    value = positive_int(text)
    if value > 2**20:
        raise argparse.ArgumentTypeError(f"{value} rows is not a padding multiple (models pad to 8 ... 1024; at most {2**20})")
    return value


def size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Permute a model's embedding and lm_head rows into a base tokenizer's token order.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "M and T: a local directory or a Hugging Face repo id; every flag also takes the other spelling (--drop_extra).\n\n"
            "examples:\n"
            "  %(prog)s --src-model M --base-tokenizer T --out-dir D --drop-extra      # ready to merge with T's models\n"
            "  %(prog)s --src-model M --base-tokenizer T --dry-run > plan.txt          # the plan, nothing written\n"
            "  %(prog)s --src-model M --base-tokenizer T --out-dir D --drop-extra --init donor --donor-model B\n"
            "  %(prog)s --mergekit-config merge.yaml --out-dir ALIGNED                 # align a whole merge\n\n"
            "exit codes:\n"
            "  0    ok (the output directory is complete and self-checked)\n"
            "  1    the self-check of the written output failed (nothing is left in --out_dir); with\n"
            "       --mergekit-config also: the aligned configuration fails the gate\n"
            "  2    usage or input error (one 'error: ...' line on stderr; --debug shows the traceback)\n"
            "  130  interrupted by Ctrl-C; the error line says whether --out_dir was completed, else it is as before\n"
            "  143  stopped by SIGTERM, as 130\n"
            "  129  stopped by SIGHUP, as 130"
        ),
    )
    add_inputs_arguments(parser)
    add_output_arguments(parser)
    add_initialisation_arguments(parser)
    add_alignment_arguments(parser)
    add_behaviour_arguments(parser)
    return parser


def add_inputs_arguments(parser: argparse.ArgumentParser) -> None:
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(*flag("--src-model"), dest="src_model", metavar="M", help="the model to remap")
    inputs.add_argument(
        *flag("--base-tokenizer"), dest="base_tokenizer", metavar="T", help="the tokenizer whose token order the output follows"
    )
    inputs.add_argument(*flag("--revision"), metavar="REV", help="Hub revision of M")
    inputs.add_argument(*flag("--base-revision"), metavar="REV", help="Hub revision of T")
    inputs.add_argument(*flag("--embed-name"), metavar="NAME", help="checkpoint name of the input embedding, for unknown architectures")
    inputs.add_argument(
        *flag("--head-name"), metavar="NAME", help="checkpoint name of the output embedding (lm_head), for unknown architectures"
    )
    inputs.add_argument(
        *flag("--trust-remote-code"),
        action="store_true",
        help="allow transformers to run the model repo's code (only to find the embeddings)",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument(
        *flag("--out-dir"),
        dest="out_dir",
        metavar="D",
        type=Path,
        help="where to write the remapped model (with --mergekit-config: the aligned models and merge.yaml); not needed with --dry-run",
    )
    output.add_argument(
        *flag("--drop-extra"),
        action="store_true",
        help="drop M's tokens that T lacks: vocabulary and vocab_size become exactly T's (for merges)",
    )
    output.add_argument(
        *flag("--chat-template"),
        choices=("base", "source"),
        default="base",
        help="whose chat template the output gets: T's (default: base) or M's (source)",
    )
    output.add_argument(
        *flag("--max-shard-size"),
        type=size_argument,
        default="5GB",
        metavar="SIZE",
        help="largest output shard, decimal units (default: 5GB; 2GiB for binary)",
    )
    output.add_argument(
        *flag("--pad-to-multiple-of"),
        type=pad_multiple,
        metavar="N",
        help="round the row count up to a multiple of N (padding rows get the mean row)",
    )
    output.add_argument(*flag("--overwrite"), action="store_true", help="replace an earlier output of this tool in --out_dir")
    output.add_argument(*flag("--dry-run"), action="store_true", help="print the plan and the shard plan on stdout; write nothing")
    output.add_argument(*flag("--report"), type=Path, metavar="FILE", help="also write the report (remap_report.json) to FILE")
    output.add_argument(*flag("--json"), action="store_true", help="print the report as JSON on stdout (errors too)")


def add_initialisation_arguments(parser: argparse.ArgumentParser) -> None:
    initialisation = parser.add_argument_group("initialisation (rows of T's tokens that M lacks)")
    initialisation.add_argument(
        *flag("--init"),
        choices=INIT_METHODS,
        help="fvt, mean, unk, zero, donor or omp (default: fvt; with --mergekit-config: donor, the target's own rows, "
        "when the target is a model with weights)",
    )
    initialisation.add_argument(
        *flag("--donor-model"),
        metavar="D",
        help="with --init donor / omp: the model whose rows are used (default: T, when it has weights); org/name@rev for a revision",
    )
    initialisation.add_argument(
        *flag("--omp-k"),
        type=positive_int,
        default=64,
        metavar="K",
        help="with --init omp: rows of shared tokens combined per missing token (default: 64)",
    )
    initialisation.add_argument(
        *flag("--match"),
        choices=MATCH_MODES,
        default="auto",
        help="match tokens by spelling (exact) or by their bytes (bytes); auto: bytes when the conventions differ (default: auto)",
    )
    initialisation.add_argument(
        *flag("--init-report"),
        type=non_negative_int,
        default=0,
        metavar="N",
        help="show the N most telling examples of each initialisation rule",
    )


def add_alignment_arguments(parser: argparse.ArgumentParser) -> None:
    alignment = parser.add_argument_group("alignment")
    alignment.add_argument(
        *flag("--mergekit-config"),
        type=Path,
        metavar="FILE",
        help="align every model of a mergekit YAML to one tokenizer (T, else the YAML's tokenizer source or base_model) "
        "and write D/merge.yaml",
    )


def add_behaviour_arguments(parser: argparse.ArgumentParser) -> None:
    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument(*flag("--debug"), action="store_true", help="verbose logs and tracebacks")
    behaviour.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def options_from_args(args: argparse.Namespace) -> RemapOptions | AlignOptions:
    """The options of either mode from the command line, with the flags that belong to the
    other mode refused."""
    common = {
        "match": args.match, "max_shard_size": args.max_shard_size, "base_revision": args.base_revision, "overwrite": args.overwrite,
        "dry_run": args.dry_run, "trust_remote_code": args.trust_remote_code, "show_progress": not args.json and sys.stderr.isatty(),
        "donor_model": args.donor_model, "omp_k": args.omp_k, "chat_template": args.chat_template,
    }  # fmt: skip
    if args.mergekit_config is None:
        if args.src_model is None or args.base_tokenizer is None:
            raise CliError("--src_model and --base_tokenizer are required (or --mergekit-config FILE)")
        src_model, revision = with_revision(args.src_model, args.revision, "--revision")
        base_tokenizer, common["base_revision"] = with_revision(args.base_tokenizer, args.base_revision, "--base-revision")
        return RemapOptions(
            src_model=src_model, base_tokenizer=base_tokenizer, out_dir=args.out_dir, drop_extra=args.drop_extra,
            init=args.init or "fvt", pad_to_multiple_of=args.pad_to_multiple_of, revision=revision, embed_name=args.embed_name,
            head_name=args.head_name, init_report=args.init_report, **common,
        )  # fmt: skip
    if args.src_model is not None:
        raise CliError("--mergekit-config aligns the models of the YAML: leave out --src_model")
    single = {
        "--revision": args.revision,
        "--embed-name": args.embed_name,
        "--head-name": args.head_name,
        "--pad-to-multiple-of": args.pad_to_multiple_of,
    }
    for option, value in single.items():
        if value is not None:
            raise CliError(f"{option} applies to a single remap, not to --mergekit-config (write model@revision in the YAML)")
    if args.out_dir is None:
        raise CliError("--mergekit-config needs --out_dir ALIGNED (where the aligned models and merge.yaml go)")
    return AlignOptions(config=args.mergekit_config, out_dir=args.out_dir, base_tokenizer=args.base_tokenizer, init=args.init, **common)


def with_revision(source: str, revision: str | None, flag_name: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`), as in a mergekit YAML; a local path keeps any
    `@` it has. A revision given both ways must agree."""
    name, pinned = split_revision(source)
    if pinned is not None and revision is not None and pinned != revision:
        raise CliError(f"{source} pins revision {pinned!r} but {flag_name} says {revision!r}; give one")
    return name, pinned or revision


def report_inputs(args: argparse.Namespace) -> list[Path]:
    """The local files and directories a --report must stay out of: M, T, the donor, the
    YAML and every model it names (Hub repo ids are not local paths and are skipped)."""
    names = [args.src_model, args.base_tokenizer, args.donor_model]
    if args.mergekit_config is not None:
        config = read_mergekit_config(args.mergekit_config)
        names += [args.mergekit_config, *(parse_model_reference(ref).path for ref in mergekit_references(config, args.mergekit_config))]
    paths = []
    for name in names:
        if name is not None:
            path = Path(split_revision(str(name))[0]).expanduser()
            if path.exists():
                paths.append(path.parent if path.is_file() and path != args.mergekit_config else path)
    return paths


def check_report_path(report: Path, inputs: Sequence[Path], out_dir: Path | None) -> None:
    """--report gets --out_dir's checks, before anything is written: never onto or inside
    an input, never inside D (publishing D replaces what is there), a file in a directory
    that exists and can be written."""
    resolved = report.expanduser().resolve()
    if report.is_dir():
        raise CliError(f"--report {report} is a directory; give a file name")
    for path in inputs:
        source = path.resolve()
        if resolved == source or source in resolved.parents:
            raise CliError(f"--report {report} is {'the input' if resolved == source else 'inside the input'} {path}; write it elsewhere")
    if out_dir is not None and (resolved == out_dir.resolve() or out_dir.resolve() in resolved.parents):
        raise CliError(f"--report {report} is inside --out_dir {out_dir}, which the remap replaces; write it elsewhere")
    if not resolved.parent.is_dir():
        raise CliError(f"--report {report}: the directory {resolved.parent} does not exist")
    if not os.access(resolved.parent, os.W_OK | os.X_OK):
        raise CliError(f"--report {report}: cannot write in {resolved.parent} (permission denied)")


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if args.report is not None:
        check_report_path(args.report, report_inputs(args), opts.out_dir)
    if isinstance(opts, AlignOptions):
        return run_align(args, opts)
    try:
        report = remap(opts)
    except SelfCheckError as exc:
        return fail(args, f"self-check failed, nothing was written to {opts.out_dir}: {exc}", 1)
    if args.report is not None:
        write_json(args.report, report)
    summary = human_summary(report, opts.dry_run, opts.init_report)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    elif opts.dry_run:
        sys.stdout.write(summary + "\n")  # the plan is the report: `--dry-run > plan.txt` keeps it
    if opts.dry_run:
        return 0
    log.info("%s", summary)
    if not args.json:
        not_mergeable = mergeable_with_base(report, report["base_rows"])
        snippet = "# mergekit: add the remapped model to your merge configuration\nmodels:\n" + mergekit_snippet(str(opts.out_dir))
        sys.stdout.write(f"# {not_mergeable}\n" if not_mergeable else snippet)
    return 0


def run_align(args: argparse.Namespace, opts: AlignOptions) -> int:
    summary, code = align_mergekit(opts)
    if args.report is not None:
        write_json(args.report, summary)
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(align_table(summary) + "\n")
        if "command" in summary and code == 0:
            sys.stdout.write(f"\nnow run:\n  {summary['command']}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(build_parser(), argv)
    if isinstance(args, int):
        return args
    PUBLISHED.clear()
    return run_guarded(args, run, stopped=lambda: f"; {what_was_written()}", cleanup=release_outputs)


def what_was_written() -> str:
    """For the interrupt message: the outputs this run completed, or that none was."""
    return f"{', '.join(map(str, PUBLISHED))}: complete, kept" if PUBLISHED else "nothing was written"


if __name__ == "__main__":
    raise SystemExit(main())
