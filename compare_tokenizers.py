#!/usr/bin/env python3
"""Compare the vocabularies of two or more tokenizers before a linear model merge.

Model merging adds embedding matrices row by row, so every model in a merge must map
every token to the same id. This script diffs tokenizers (local directories,
tokenizer.json files or Hugging Face repo ids) against a reference and exits non-zero
on any token->id mismatch, so it can gate a merge in CI or a shell script.

With --mergekit-config and tokenizer_source (union, base, a model), mergekit maps rows by
token: differing vocabularies are reported (the vocabulary audit), not a mismatch.

Exit codes:
  0  vocabularies identical (same size, every token the same id): safe to merge linearly
  1  mismatch: a token->id or size difference (also at equal sizes); with --strict also
     special tokens/flags, chat template, merges/normalizer/pre-tokenizer/decoder or
     encoding fingerprint; with weights (the default) also ghost tokens, differing row
     counts and, with --mergekit-config, an architecture mergekit cannot merge
  2  usage error or unreadable input (one "error: ..." line on stderr)
  130  interrupted (143 SIGTERM, 129 SIGHUP)

Contents, by feature (each: its frozen dataclasses, then pure functions, then I/O):
  shared block    identical in remap_tokenizer.py (tests/test_shared.py guards it):
                  errors and signals, Hub and directory sources, strict JSON, tokenizer.json
                  and safetensors header checks, mergekit references, the merge check,
                  mergekit's tokenizer merge (plan_merged_vocab), command line scaffolding,
                  token spellings
  constants       of the gate
  reading         sources, tokenizer.json, configs, safetensors headers (local or Hub)
  vocab           token -> id differences, tokens shared exactly and by bytes
  special tokens  roles, flags, the chat template
  encoding        merges, normalizer, pre-tokenizer, decoder, fingerprint
  weights         rows, ghost tokens, and with --mergekit-config the architecture
  tokenizer merge tokenizer_source merges: the vocabulary audit, what still fails
  merge audit     --audit / --plot: every model's task vector, streamed from its weights
  report          a comparison, JSON and human reports
  command line    build_parser, run, main
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import functools
import gc
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import math
import operator
import os
import re
import signal
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from operator import ne
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("compare_tokenizers")

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


# ======================================================================================
# Constants of the gate
# ======================================================================================


__version__ = "0.2.0"


JSON_SCHEMA_ID = "merge_tools.compare_tokenizers/1"


# Encoded by every tokenizer: the ids' sha256 identifies the encoding behaviour, the way
# llama.cpp's convert_hf_to_gguf.py identifies pre-tokenizers (its text differs from ours).
FINGERPRINT_SAMPLE = (
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; don't PANIC!\n"
    "def remap(rows: list[int]) -> dict[int, int]:\n"
    "    return {i: r for i, r in enumerate(rows) if r != -1}  # 0x1F &&= ||\n"
    "3 33 333 3333 33333 333333 1234567890 3.14159 -42 1e-9 100,000 ２０２６\n"
    "   \t\t  \n\n\n    trailing   spaces   \r\n"
    "日本語のテキスト、東京都。中文测试，简体。한국어 텍스트입니다.\n"
    "🦙🚀 👩\u200d💻 emoji 🏳\ufe0f\u200d🌈\n"
    "e\u0301 n\u0303 a\u0308 combining marks; café naïve Ünïcödé ñ ß İ ﬁ\n"
    "Ελληνικά русский العربية हिन्दी עברית ไทย\n"
)


STATUS_LABEL = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skipped": "-"}


# ======================================================================================
# Tokenizers and weights in: sources, tokenizer.json, configs, safetensors headers
# ======================================================================================


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    special: bool = False
    normalized: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False

    def flags(self) -> dict[str, bool]:
        return {name: getattr(self, name) for name in ADDED_TOKEN_FLAGS}


@dataclass(frozen=True)
class TokenizerInfo:
    """Everything the comparison needs from one tokenizer, already read from disk."""

    source: str
    path: str
    vocab: Mapping[str, int]
    added_tokens: tuple[AddedToken, ...]
    model_type: str
    merges: Sequence[Sequence[str]] | None
    normalizer: Any
    pre_tokenizer: Any
    decoder: Any
    byte_fallback: bool
    convention: str
    special_tokens: Mapping[str, str | None]
    config_ids: Mapping[str, Any]
    generation_ids: Mapping[str, Any]
    chat_template: str | None
    fingerprint_ids: tuple[int, ...]
    weights: WeightsInfo | None = None
    document: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # tokenizer.json, for a tokenizer merge

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(str(list(self.fingerprint_ids)).encode()).hexdigest()


@dataclass(frozen=True)
class WeightsInfo:
    """Vocabulary tensors of a checkpoint, from config.json and safetensors headers only."""

    embed_name: str | None
    embed_rows: int | None
    head_name: str | None
    head_rows: int | None
    config_vocab_size: int | None
    config: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, tuple[str, tuple[int, ...]]] | None = None  # name -> (dtype, shape); None: no headers read

    @property
    def rows(self) -> int | None:
        return self.embed_rows if self.embed_rows is not None else self.config_vocab_size

    @property
    def checked(self) -> bool:
        """Whether safetensors headers were read (else only config.json is known)."""
        return self.tensors is not None


@dataclass(frozen=True)
class ResolvedSource:
    source: str
    name: str
    revision: str | None
    directory: Path
    tokenizer_file: Path | None


def resolve_tokenizer(source: str, revision: str | None) -> ResolvedSource:
    name, inline_revision = split_revision(source)
    revision = inline_revision or revision
    # safetensors headers of a repo are read over HTTP (hub_safetensors_shapes): no weights here
    directory, tokenizer_file = find_tokenizer_dir(resolve_source(name, revision, [*TOKENIZER_FILES, *CONFIG_FILES]))
    return ResolvedSource(source, name, revision, directory, tokenizer_file)


def find_tokenizer_dir(path: Path) -> tuple[Path, Path | None]:
    """(directory, tokenizer.json or None) for a directory or a tokenizer.json path."""
    if path.is_file():
        if path.stat().st_size == 0:
            raise CliError(f"{path}: empty file; expected a tokenizer.json")
        return path.parent, path
    if not path.is_dir():
        raise CliError(f"{path}: neither a directory nor a tokenizer.json file")
    candidate = path / "tokenizer.json"
    if candidate.is_file():
        return path, candidate
    if (path / "tokenizer.model").is_file() or (path / "vocab.json").is_file():
        return path, None
    raise CliError(f"{path}: no tokenizer here (expected tokenizer.json, tokenizer.model or vocab.json + merges.txt)")


def read_tokenizer_json(resolved: ResolvedSource) -> bytes:
    """tokenizer.json's raw bytes (as transformers converts them when there is none)."""
    if resolved.tokenizer_file is None:
        return tokenizer_json_via_transformers(resolved.directory).encode()
    try:
        return resolved.tokenizer_file.read_bytes()
    except OSError as exc:
        raise CliError(f"{resolved.tokenizer_file}: cannot read ({exc.strerror})") from exc


def parse_tokenizer_json(raw: bytes, where: Path) -> dict[str, Any]:
    data = parse_json(raw, where)
    check_tokenizer_json(data, where)
    return data


def added_token_from_json(entry: Mapping[str, Any]) -> AddedToken:
    return AddedToken(content=entry["content"], id=entry["id"], **{flag: entry[flag] for flag in ADDED_TOKEN_FLAGS})


def read_role_ids(config: Mapping[str, Any]) -> dict[str, Any]:
    nested = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    return {role: config.get(f"{role}_token_id", nested.get(f"{role}_token_id")) for role in SPECIAL_ROLES}


def normalized_merges(model: Mapping[str, Any]) -> list[Any] | None:
    """BPE merges as [left, right] pairs, whether stored as "left right" strings or pairs."""
    merges = model.get("merges")
    if merges is None or not merges or not isinstance(merges[0], str):
        return merges
    return [merge.split(" ", 1) for merge in merges]


def read_tokenizer_info(
    resolved: ResolvedSource,
    tokenizer_json: Mapping[str, Any],
    merges: Sequence[Sequence[str]] | None,
    fingerprint: Callable[[], tuple[int, ...]],
    weights: bool,
) -> TokenizerInfo:
    directory, tokenizer_file = resolved.directory, resolved.tokenizer_file
    where = tokenizer_file or directory
    vocab = read_vocabulary(tokenizer_json, where, structure_checked=True)  # parse_tokenizer_json checked it
    model = tokenizer_json["model"]
    added_tokens = tokenizer_json.get("added_tokens") or []
    tokenizer_config = read_optional_json(directory / "tokenizer_config.json")
    special_map = read_optional_json(directory / "special_tokens_map.json")
    special_tokens = read_special_tokens(tokenizer_json, tokenizer_config, special_map)
    check_special_tokens(vocab, special_tokens, tokenizer_config, special_map, directory)
    config = read_optional_json(directory / "config.json")
    return TokenizerInfo(
        source=resolved.source,
        path=str(tokenizer_file if tokenizer_file is not None and tokenizer_file.parent != directory else directory),
        vocab=vocab,
        added_tokens=tuple(added_token_from_json(entry) for entry in added_tokens),
        model_type=str(model.get("type", "?")),
        merges=merges,
        normalizer=tokenizer_json.get("normalizer"),
        pre_tokenizer=tokenizer_json.get("pre_tokenizer"),
        decoder=tokenizer_json.get("decoder"),
        byte_fallback=bool(model.get("byte_fallback", False)),
        convention=detect_convention(tokenizer_json),
        special_tokens=special_tokens,
        config_ids=read_role_ids(config),
        generation_ids=read_role_ids(read_optional_json(directory / "generation_config.json")),
        chat_template=read_chat_template(directory, tokenizer_config),
        fingerprint_ids=fingerprint(),
        document=tokenizer_json,
        weights=read_weights_info(directory, resolved.name, resolved.revision, config) if weights else None,
    )


def read_tokenizer_infos(resolved: Sequence[ResolvedSource], weights: bool) -> list[TokenizerInfo]:
    """Read every tokenizer. Identical tokenizer.json files (models of one family often
    share one) are parsed and fingerprinted once."""
    shared: dict[str, tuple[dict[str, Any], Sequence[Sequence[str]] | None, Callable[[], tuple[int, ...]]]] = {}
    infos = []
    for item in resolved:
        raw = read_tokenizer_json(item)
        where = item.tokenizer_file or item.directory
        key = hashlib.sha256(raw).hexdigest()
        if key not in shared:
            tokenizer_json = parse_tokenizer_json(raw, where)
            merges = normalized_merges(tokenizer_json.get("model") or {})
            # Called after read_tokenizer_info's checks, so that their messages come first.
            fingerprint = functools.cache(functools.partial(encode_fingerprint, tokenizer_json, merges, raw, where))
            shared[key] = (tokenizer_json, merges, fingerprint)
        infos.append(read_tokenizer_info(item, *shared[key], weights))
    return infos


def pick_vocab_tensor(shapes: Mapping[str, Sequence[int]], suffixes: Sequence[str], where: Path) -> str | None:
    """The tensor named like a vocabulary tensor; the shortest name wins (multimodal
    checkpoints carry other `embeddings` tensors deeper in the tree). One that is not a
    matrix is refused, as the remap refuses it."""
    candidates = [name for name in shapes if name.endswith(suffixes)]
    if not candidates:
        return None
    name = min(candidates, key=lambda name: (name.count("."), len(name)))
    if len(shapes[name]) != 2:
        raise CliError(f"{where}: {name} has shape {list(shapes[name])}, not [rows, hidden]; the checkpoint is corrupt")
    return name


def local_safetensors_files(directory: Path, cached: bool = False) -> list[Path]:
    """The safetensors files that hold a local checkpoint: the shards its index names
    (only plain names inside the directory), else the weight files beside it. `cached`:
    the directory is a Hub snapshot, which may hold the index without the shards (a gate
    reads only their headers); then [] unless every shard is there."""
    kind, names = select_weight_files(p.name for p in directory.iterdir() if p.is_file())
    if kind != "safetensors":
        return []
    if names[0] != SAFETENSORS_INDEX:
        return [directory / name for name in names]
    shards = [
        directory / shard for shard in dict.fromkeys(read_weight_index(directory / SAFETENSORS_INDEX, shards_present=not cached).values())
    ]
    return shards if all(shard.is_file() for shard in shards) else []


def read_weights_info(directory: Path, name: str, revision: str | None, config: Mapping[str, Any]) -> WeightsInfo | None:
    nested = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    config_vocab = config.get("vocab_size", nested.get("vocab_size"))
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    hub = looks_like_hub_id(name) and not Path(name).exists()
    files = local_safetensors_files(directory, cached=hub)
    if files:
        for file in files:
            headers.update({key: (value["dtype"], tuple(value["shape"])) for key, value in read_safetensors_header(file)[0].items()})
    elif not directory.joinpath("config.json").is_file():
        return None  # a tokenizer, not a model
    elif hub:
        headers = hub_safetensors_tensors(name, revision, directory.name)
    if not headers:  # a model without safetensors (pytorch_model.bin, or headers out of reach): rows not checked
        return WeightsInfo(None, None, None, None, config_vocab, config, None)
    shapes = {key: shape for key, (_, shape) in headers.items()}
    embed = pick_vocab_tensor(shapes, INPUT_EMBEDDING_SUFFIXES, directory)
    head = pick_vocab_tensor(shapes, OUTPUT_EMBEDDING_SUFFIXES, directory)
    if shapes and embed is None:
        raise CliError(f"{directory}: the checkpoint has no input embedding (no tensor named *{', *'.join(INPUT_EMBEDDING_SUFFIXES)})")
    if shapes and head is None and (config.get("tie_word_embeddings", nested.get("tie_word_embeddings")) is False):
        raise CliError(
            f"{directory}: config.json says tie_word_embeddings: false, but "
            "the checkpoint has no output embedding (lm_head); re-download it"
        )
    if embed is not None and head is not None and shapes[embed] != shapes[head]:
        raise CliError(
            f"{directory}: {embed} is {list(shapes[embed])} but {head} is "
            f"{list(shapes[head])}; input and output embeddings must have the same shape"
        )
    return WeightsInfo(
        embed_name=embed,
        embed_rows=shapes[embed][0] if embed else None,
        head_name=head,
        head_rows=shapes[head][0] if head else None,
        config_vocab_size=config_vocab,
        config=config,
        tensors=headers or None,
    )


def header_cache_file(repo_id: str, commit: str) -> Path:
    """Where the tensors read from a repo's headers at a commit are kept, beside the Hub
    cache (HF_HOME/merge_tools/headers): an offline rerun of a gate checks what the online
    run checked, although the cache holds the index and not the shards."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "merge_tools" / "headers" / repo_id.replace("/", "--") / f"{commit}.json"


def hub_safetensors_tensors(repo_id: str, revision: str | None, commit: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor dtypes and shapes of a Hub repo from its safetensors headers (HTTP range requests),
    checked as local headers are, at the commit of the cached snapshot; offline, from what an
    earlier run read (header_cache_file); {} (with a warning) when neither is there."""
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

    cache = header_cache_file(repo_id, commit)
    try:
        metadata = get_safetensors_metadata(repo_id, revision=commit if re.fullmatch(r"[0-9a-f]{40}", commit) else revision)
    except NotASafetensorsRepoError:
        return {}
    except SafetensorsParsingError as exc:
        raise CliError(f"{repo_id}: corrupt safetensors header on the Hub ({str(exc).splitlines()[0]})") from exc
    except Exception as exc:  # offline, unreachable: the tokenizers were read from the cache
        if cache.is_file():
            return {name: (dtype, tuple(shape)) for name, (dtype, shape) in parse_json(cache.read_bytes(), cache).items()}
        log.warning("%s: cannot read safetensors headers from the Hub (%s); using config.json", repo_id, str(exc).splitlines()[0])
        return {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file, info in metadata.files_metadata.items():
        header = {
            name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)} for name, t in info.tensors.items()
        }
        tensors.update(
            {
                name: (entry["dtype"], tuple(entry["shape"]))
                for name, entry in check_safetensors_header(header, None, f"{repo_id}/{file}").items()
            }
        )
    with contextlib.suppress(OSError):  # a read-only HF_HOME: the next offline run falls back to config.json
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({name: [dtype, list(shape)] for name, (dtype, shape) in tensors.items()}))
    return tensors


# ======================================================================================
# The vocabulary check: token -> id, and what the two share
# ======================================================================================


@dataclass(frozen=True)
class VocabDiff:
    ref_size: int
    other_size: int
    moved: tuple[tuple[str, int, int], ...]
    only_in_ref: tuple[tuple[str, int], ...]
    only_in_other: tuple[tuple[str, int], ...]
    moved_count: int
    only_in_ref_count: int
    only_in_other_count: int
    shared_exact: int
    shared_by_bytes: int

    @property
    def equal(self) -> bool:
        return self.ref_size == self.other_size and not (self.moved_count or self.only_in_ref_count or self.only_in_other_count)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.equal else "fail",
            "ref_size": self.ref_size,
            "other_size": self.other_size,
            "counts": {
                "moved": self.moved_count,
                "only_in_ref": self.only_in_ref_count,
                "only_in_other": self.only_in_other_count,
                "shared_exact": self.shared_exact,
                "shared_by_bytes": self.shared_by_bytes,
            },
            "moved": [{"token": t, "ref_id": a, "other_id": b} for t, a, b in self.moved],
            "only_in_ref": [{"token": t, "id": i} for t, i in self.only_in_ref],
            "only_in_other": [{"token": t, "id": i} for t, i in self.only_in_other],
        }


def in_byte_level_alphabet(text: str) -> bool:
    """True when every character is one of the 256 byte-level symbols (code points 33-126,
    161-172 and 174-323), checked in one regex scan."""
    return NOT_BYTE_LEVEL_RE.search(text) is None


NOT_BYTE_LEVEL_RE = re.compile("[^\x21-\x7e\xa1-\xac\xae-\u0143]")


def tokens_as_bytes(tokens: Sequence[str], convention: str, byte_fallback: bool) -> list[bytes]:
    """`token_bytes` for many tokens at once: byte-level vocabularies are translated in one
    pass (one character per byte), which is ~10x faster than token by token."""
    joined = byte_level_joined(tokens) if convention == "byte_level" and not byte_fallback else None
    if joined is None:
        return [token_bytes(token, convention, byte_fallback) for token in tokens]
    out, start = [], 0
    for token in tokens:
        out.append(joined[start : start + len(token)])
        start += len(token)
    return out


def byte_level_joined(tokens: Sequence[str]) -> bytes | None:
    """The bytes of all tokens back to back, or None if a token has a character outside
    the byte-level alphabet (then bytes and characters no longer correspond one to one)."""
    try:
        return "".join(tokens).translate(BYTE_LEVEL_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return None


def regular_tokens(info: TokenizerInfo) -> list[str]:
    added = {token.content for token in info.added_tokens}
    return [token for token in info.vocab if token not in added]


def count_shared_by_bytes(ref: TokenizerInfo, other: TokenizerInfo, shared_exact: int) -> int:
    """How many tokens two tokenizers share when regular tokens match by their bytes and
    added tokens by content (what `remap_tokenizer.py --match bytes` copies)."""
    same_convention = (ref.convention, ref.byte_fallback) == (other.convention, other.byte_fallback)
    # Within the alphabet the byte map is one character per byte and injective, so
    # matching by bytes is matching by spelling: no need to build 2 x 128k keys. (Usually
    # the added tokens are in the alphabet too, and one scan of everything settles it.)
    if (
        same_convention
        and ref.convention == "byte_level"
        and not ref.byte_fallback
        and all(
            in_byte_level_alphabet("".join(info.vocab)) or in_byte_level_alphabet("".join(regular_tokens(info))) for info in (ref, other)
        )
    ):
        return shared_exact
    keys = []
    for info in (ref, other):
        added = {token.content for token in info.added_tokens}
        keys.append((added, set(tokens_as_bytes(regular_tokens(info), info.convention, info.byte_fallback))))
    (ref_added, ref_bytes), (other_added, other_bytes) = keys
    return len(ref_added & other_added) + len(ref_bytes & other_bytes)


def show_token(token: str, convention: str = "plain", byte_fallback: bool = False) -> str:
    """`'Ġthe' (" the")`: the token as stored, plus its text when the spelling differs."""
    shown = quoted(token)
    text = token_bytes(token, convention, byte_fallback).decode("utf-8", "surrogateescape")
    if text != token:
        shown += ' ("' + escape_text(text).replace('"', '\\"') + '")'
    if not unicodedata.is_normalized("NFC", token):  # `é` as e + U+0301 looks like `é`: show what it is
        shown += " [not NFC: " + " ".join(f"U+{ord(char):04X}" for char in token) + "]"
    return shown


def diff_vocab(ref: TokenizerInfo, other: TokenizerInfo, head: int) -> VocabDiff:
    """Counts over the whole vocabularies, lists of the first `head` by REF id (OTHER id
    for tokens only in OTHER). Ids are 0..n-1 (vocab_from_json makes sure). Shuffled
    128k-token vocabularies differ in nearly every id, so each pass over all tokens is a
    sort, a set operation or a map() that runs in C: one lookup per REF token in all."""
    ref_vocab, other_vocab = ref.vocab, other.vocab
    moved: list[tuple[str, int, int]] = []
    only_ref: list[tuple[str, int]] = []
    only_other: list[tuple[str, int]] = []
    counts = (0, 0, 0)
    if ref_vocab != other_vocab:
        ref_tokens = sorted(ref_vocab, key=ref_vocab.__getitem__)
        other_id_of = list(map(other_vocab.get, ref_tokens))  # None: only in REF
        missing = other_id_of.count(None)
        shared = len(ref_tokens) - missing
        counts = (sum(map(ne, other_id_of, range(len(ref_tokens)))) - missing, missing, len(other_vocab) - shared)
        for ref_id, other_id in enumerate(other_id_of):
            if len(moved) == min(head, counts[0]):
                break
            if other_id is not None and other_id != ref_id:
                moved.append((ref_tokens[ref_id], ref_id, other_id))
        ref_id = -1
        for _ in range(min(head, missing)):
            ref_id = other_id_of.index(None, ref_id + 1)
            only_ref.append((ref_tokens[ref_id], ref_id))
        if counts[2]:
            other_tokens = dict(zip(other_vocab.values(), other_vocab.keys()))
            extra_ids = sorted(set(range(len(other_vocab))).difference(other_id_of))[:head]
            only_other = [(other_tokens[other_id], other_id) for other_id in extra_ids]
    return VocabDiff(
        ref_size=len(ref_vocab),
        other_size=len(other_vocab),
        moved=tuple(moved),
        only_in_ref=tuple(only_ref),
        only_in_other=tuple(only_other),
        moved_count=counts[0],
        only_in_ref_count=counts[1],
        only_in_other_count=counts[2],
        shared_exact=len(ref_vocab) - counts[1],
        shared_by_bytes=count_shared_by_bytes(ref, other, len(ref_vocab) - counts[1]),
    )


def vocab_check(diff: VocabDiff, ref: TokenizerInfo, other: TokenizerInfo, mapped_by: str | None = None) -> CheckResult:
    """`mapped_by`: the tokenizer_source of a merge that maps rows by token, where a
    vocabulary that differs is reported, not a failure."""
    if diff.equal:
        summary = f"identical: {diff.ref_size} tokens, every token the same id"
    else:
        summary = (
            f"MISMATCH: {diff.ref_size} vs {diff.other_size} tokens; "
            f"{diff.moved_count} moved, {diff.only_in_ref_count} only in REF, "
            f"{diff.only_in_other_count} only in OTHER"
        )
    summary += f"; shared tokens: exact {diff.shared_exact}, by bytes {diff.shared_by_bytes}"
    lines: list[str] = []
    if diff.moved:
        lines.append(f"moved tokens (REF id -> OTHER id), {len(diff.moved)} of {diff.moved_count}:")
        lines += [f"  {a:>8} -> {b:<8} {show_token(t, ref.convention, ref.byte_fallback)}" for t, a, b in diff.moved]
    for title, entries, info, count in (
        ("only in REF", diff.only_in_ref, ref, diff.only_in_ref_count),
        ("only in OTHER", diff.only_in_other, other, diff.only_in_other_count),
    ):
        if entries:
            lines.append(f"{title}, {len(entries)} of {count}:")
            lines += [f"  {i:>8}  {show_token(t, info.convention, info.byte_fallback)}" for t, i in entries]
    if mapped_by is not None and not diff.equal:
        summary = summary.replace("MISMATCH: ", f"differs, mergekit maps the rows by token (tokenizer_source: {mapped_by}): ", 1)
    return CheckResult("vocab", "ok" if diff.equal or mapped_by is not None else "fail", summary, diff.to_dict(), tuple(lines))


# ======================================================================================
# Special tokens and the chat template
# ======================================================================================


def describe_special(info: TokenizerInfo, role: str) -> dict[str, Any]:
    token = info.special_tokens.get(role)
    return {
        "token": token,
        "id": info.vocab.get(token) if token is not None else None,
        "config_id": info.config_ids.get(role),
        "generation_config_id": info.generation_ids.get(role),
    }


def inconsistent_role_ids(info: TokenizerInfo) -> list[str]:
    """config.json / generation_config.json ids that disagree with the tokenizer."""
    problems = []
    for role in SPECIAL_ROLES:
        described = describe_special(info, role)
        for key, label in (("config_id", "config.json"), ("generation_config_id", "generation_config.json")):
            value = described[key]
            if value is None or described["id"] is None:
                continue
            ids = value if isinstance(value, list) else [value]
            if described["id"] not in ids:
                problems.append(
                    f"{label} {role}_token_id={value} but the tokenizer's {role} token "
                    f"{show_token(described['token'])} is id {described['id']}"
                )
    return problems


def special_tokens_check(ref: TokenizerInfo, other: TokenizerInfo, strict: bool) -> CheckResult:
    roles = {role: {"ref": describe_special(ref, role), "other": describe_special(other, role)} for role in SPECIAL_ROLES}
    differing = [
        role
        for role, sides in roles.items()
        if (sides["ref"]["token"], sides["ref"]["id"]) != (sides["other"]["token"], sides["other"]["id"])
    ]
    ref_added = {token.content: token for token in ref.added_tokens}
    other_added = {token.content: token for token in other.added_tokens}
    flag_diffs = []
    for content in sorted(ref_added.keys() & other_added.keys(), key=lambda c: ref_added[c].id):
        ref_flags, other_flags = ref_added[content].flags(), other_added[content].flags()
        changed = {name: [ref_flags[name], other_flags[name]] for name in ADDED_TOKEN_FLAGS if ref_flags[name] != other_flags[name]}
        if changed:
            flag_diffs.append({"token": content, "changed": changed})
    added_only = sorted(ref_added.keys() ^ other_added.keys())
    inconsistencies = {"ref": inconsistent_role_ids(ref), "other": inconsistent_role_ids(other)}
    problems = bool(differing or flag_diffs or added_only)
    status = "ok" if not problems else ("fail" if strict else "warn")
    parts = [f"roles differ: {', '.join(differing)}" if differing else "bos/eos/pad/unk agree"]
    if flag_diffs:
        parts.append(f"{len(flag_diffs)} added-token flag difference(s)")
    if added_only:
        parts.append(f"{len(added_only)} token(s) added in only one tokenizer")
    lines = [f"{'role':<5} {'REF':<36} OTHER"]
    for role, sides in roles.items():
        cells = []
        for side in (sides["ref"], sides["other"]):
            token = side["token"]
            cells.append("-" if token is None else f"{show_token(token)} id {side['id']}")
        mark = "  <-- differs" if role in differing else ""
        lines.append(f"{role:<5} {cells[0]:<36} {cells[1]}{mark}")
    for diff in flag_diffs:
        changes = ", ".join(f"{name} {a}->{b}" for name, (a, b) in diff["changed"].items())
        lines.append(f"flags of {show_token(diff['token'])}: {changes}")
    for side, problems_of_side in inconsistencies.items():
        lines += [f"{side.upper()}: {problem}" for problem in problems_of_side]
    return CheckResult(
        "special_tokens",
        status,
        "; ".join(parts),
        {"roles": roles, "flag_differences": flag_diffs, "added_in_one_only": added_only, "inconsistent_ids": inconsistencies},
        tuple(lines),
    )


def chat_template_check(ref: TokenizerInfo, other: TokenizerInfo, strict: bool, max_lines: int = 20) -> CheckResult:
    if ref.chat_template == other.chat_template:
        summary = "equal" if ref.chat_template is not None else "neither has one"
        return CheckResult("chat_template", "ok", summary, {"equal": True})
    diff = list(
        difflib.unified_diff(
            (ref.chat_template or "").splitlines(),
            (other.chat_template or "").splitlines(),
            "REF",
            "OTHER",
            lineterm="",
            n=1,
        )
    )
    shown = diff[:max_lines] + ([f"... {len(diff) - max_lines} more diff lines"] if len(diff) > max_lines else [])
    return CheckResult("chat_template", "fail" if strict else "warn", "differs", {"equal": False}, tuple(shown))


# ======================================================================================
# Encoding: merges, normalizer, pre-tokenizer, decoder, fingerprint
# ======================================================================================


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def encoding_check(ref: TokenizerInfo, other: TokenizerInfo, strict: bool) -> CheckResult:
    details: dict[str, Any] = {
        "model_type": [ref.model_type, other.model_type],
        "byte_fallback": [ref.byte_fallback, other.byte_fallback],
        "convention": [ref.convention, other.convention],
    }
    differing = [key for key, (a, b) in details.items() if a != b]
    if ref.merges == other.merges:
        details["merges_equal"] = True
    else:
        rank = first_difference(ref.merges or (), other.merges or ())
        details["merges_equal"] = rank is None
        details["merges_first_difference_rank"] = rank
        if rank is not None:
            differing.append(f"merges (first difference at rank {rank})")
    for name in ("normalizer", "pre_tokenizer", "decoder"):
        equal = getattr(ref, name) == getattr(other, name)
        details[f"{name}_equal"] = equal
        if not equal:
            differing.append(name)
    same_ids = ref.fingerprint_ids == other.fingerprint_ids
    details["fingerprint"] = {"identical": same_ids, "ref_sha256": ref.fingerprint, "other_sha256": other.fingerprint}
    if not same_ids:
        differing.append("fingerprint")
    if differing:
        status = "fail" if strict else "warn"
        summary = "differs: " + ", ".join(differing)
    else:
        status, summary = "ok", f"same model, merges, normalizer, pre-tokenizer, decoder; fingerprint {ref.fingerprint[:16]}"
    lines = (
        f"model type      {ref.model_type} / {other.model_type}",
        f"merges          {'equal' if details['merges_equal'] else 'differ at rank ' + str(details.get('merges_first_difference_rank'))}",
        *(f"{name:<15} {'equal' if details[name + '_equal'] else 'differs'}" for name in ("normalizer", "pre_tokenizer", "decoder")),
        f"byte_fallback   {ref.byte_fallback} / {other.byte_fallback}",
        f"fingerprint     {'identical' if same_ids else 'DIFFERS'}  REF {ref.fingerprint[:16]}  OTHER {other.fingerprint[:16]}",
    )
    return CheckResult("encoding", status, summary, details, lines)


def build_library_tokenizer(text: str, where: Path) -> Any:
    from tokenizers import Tokenizer

    return tokenizers_library(where, Tokenizer.from_str, text)


def encode_fingerprint(
    tokenizer_json: Mapping[str, Any], merges: Sequence[Sequence[str]] | None, raw: bytes, where: Path, sample: str = FINGERPRINT_SAMPLE
) -> tuple[int, ...]:
    """The ids the tokenizers library gives `sample` (no special tokens added).

    Building a whole 128k-token BPE costs ~0.2 s of CPU; a BPE that only holds the
    entries the sample can reach (bpe_model_for_words) builds in milliseconds and encodes
    it the same. That needs the sample's words exactly as the model sees them, which the
    library's own normalizer and pre-tokenizer give as long as no added token occurs in the
    sample (added tokens split the text before both). Otherwise, and for other models,
    the whole tokenizer is built."""
    model = tokenizer_json.get("model") or {}
    if (
        model.get("type") == "BPE"
        and isinstance(model.get("vocab"), Mapping)
        and merges is not None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
    ):
        probe_json = {**tokenizer_json, "added_tokens": [], "model": {"type": "WordLevel", "vocab": {"<probe>": 0}, "unk_token": "<probe>"}}
        probe = build_library_tokenizer(json.dumps(probe_json), where)
        normalizer = probe.normalizer

        def normalize(text: str) -> str:
            return tokenizers_library(where, normalizer.normalize_str, text) if normalizer is not None else text

        normalized = normalize(sample)
        # the library skips added tokens with empty content
        contents = [entry["content"] for entry in tokenizer_json.get("added_tokens") or [] if entry.get("content")]
        if not any(content in sample or content in normalized or normalize(content) in normalized for content in contents):
            # The library refuses a merge of or into a token it does not know; the pruned
            # build no longer sees most merges, so they are checked here.
            vocab, merged = model["vocab"], merge_results(merges)
            if not (all(map(vocab.__contains__, merged)) and vocab.keys() >= set(chain.from_iterable(merges))):
                raise CliError(f"{where}: not a valid tokenizer.json (a merge names a token that is not in the model vocabulary)")
            pre_tokenized = (
                tokenizers_library(where, probe.pre_tokenizer.pre_tokenize_str, normalized)
                if probe.pre_tokenizer is not None
                else [(normalized, None)]
            )
            pruned = {
                **tokenizer_json,
                "added_tokens": [],
                "model": bpe_model_for_words(model, merged, [word for word, _ in pre_tokenized]),
            }
            return tuple(
                tokenizers_library(where, build_library_tokenizer(json.dumps(pruned), where).encode, sample, add_special_tokens=False).ids
            )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{where}: not UTF-8 ({exc})") from exc
    return tuple(tokenizers_library(where, build_library_tokenizer(text, where).encode, sample, add_special_tokens=False).ids)


# ======================================================================================
# Weights and the merge: rows, ghost tokens, architecture
# ======================================================================================


def ghost_tokens(info: TokenizerInfo, rows: int) -> list[tuple[str, int]]:
    return sorted(((token, token_id) for token, token_id in info.vocab.items() if token_id >= rows), key=lambda item: item[1])


def describe_weights(info: TokenizerInfo, head: int) -> dict[str, Any]:
    weights = info.weights
    assert weights is not None
    rows = weights.rows
    ghosts = ghost_tokens(info, rows) if rows is not None else []
    return {
        "embed_tensor": weights.embed_name,
        "embed_rows": weights.embed_rows,
        "lm_head_tensor": weights.head_name,
        "lm_head_rows": weights.head_rows,
        "config_vocab_size": weights.config_vocab_size,
        "tokenizer_size": len(info.vocab),
        "padding_rows": max(0, rows - len(info.vocab)) if rows is not None else None,
        "ghost_count": len(ghosts),
        "ghost_tokens": [{"token": t, "id": i} for t, i in ghosts[:head]],
    }


def weights_check(ref: TokenizerInfo, other: TokenizerInfo, head: int, mapped_by: str | None = None) -> CheckResult:
    """Rows, padding and ghost tokens of both sides. `mapped_by` (a tokenizer_source merge):
    ghost tokens and differing row counts are mapped by token (the vocabulary audit judges
    them), not a failure; stale per-token tensors still are."""
    sides = {
        label: describe_weights(info, head)
        for label, info in (("ref", ref), ("other", other))
        if info.weights is not None and info.weights.checked
    }
    unchecked = [label.upper() for label, info in (("ref", ref), ("other", other)) if info.weights is None or not info.weights.checked]
    if not sides:
        return CheckResult(
            "weights",
            "skipped",
            f"not checked: {' and '.join(unchecked)} {'have' if len(unchecked) > 1 else 'has'} no safetensors",
            {"not_checked": unchecked},
        )
    problems = [
        f"{label.upper()} has {side['ghost_count']} ghost token(s) (ids with no embedding row)"
        for label, side in sides.items()
        if side["ghost_count"]
    ]
    if ref.weights is not None and other.weights is not None and ref.weights.rows != other.weights.rows:
        problems.append(f"embedding rows differ: {ref.weights.rows} vs {other.weights.rows}")
    mapped = len(problems) if mapped_by is not None else 0  # the first `mapped` problems are mapped by token
    for label, info in (("ref", ref), ("other", other)):
        if label in sides and info.weights is not None and info.weights.rows is not None:
            shapes = {name: shape for name, (_, shape) in (info.weights.tensors or {}).items()}
            problems += [
                f"{label.upper()}'s {name} has {count} rows, its embedding {info.weights.rows}"
                for name, count in vocab_tensors_off(shapes, info.weights.rows)
            ]
    lines = [f"{'':<6} {'embed rows':>10} {'lm_head rows':>12} {'config':>8} {'tokenizer':>9} {'padding':>7} {'ghosts':>6}"]
    for label, side in sides.items():
        head_rows = side["lm_head_rows"] if side["lm_head_tensor"] else "tied"
        lines.append(
            f"{label.upper():<6} {side['embed_rows']!s:>10} {head_rows!s:>12} {side['config_vocab_size']!s:>8} "
            f"{side['tokenizer_size']:>9} {side['padding_rows']!s:>7} {side['ghost_count']:>6}"
        )
    for label, side in sides.items():
        info = ref if label == "ref" else other
        for ghost in side["ghost_tokens"]:
            lines.append(f"{label.upper()} ghost: id {ghost['id']} {show_token(ghost['token'], info.convention, info.byte_fallback)}")
    rows = sorted({str(side["embed_rows"] or side["config_vocab_size"]) for side in sides.values()})
    summary = "; ".join(problems) if problems else f"{' / '.join(rows)} embedding rows, no ghost tokens"
    if unchecked:
        summary += f"; {unchecked[0]} not checked (no safetensors)"
        lines.append(f"{unchecked[0]}: not checked (no safetensors)")
    failing = problems[mapped:]
    if mapped and not failing:
        summary += " (mapped by token; ghost tokens: see the merge's tokenizer above)"
    elif mapped:
        summary = "; ".join(failing)
    return CheckResult("weights", "fail" if failing else "ok", summary, {**sides, "not_checked": unchecked}, tuple(lines))


def architecture_check(base: ModelFacts | None, other: ModelFacts | None, strict: bool, same_layers: bool, lora: str | None) -> CheckResult:
    """Whether mergekit can merge OTHER with the base and keeps what OTHER expects."""
    if lora is not None:
        return CheckResult("architecture", "skipped", f"not checked: a LoRA ({lora}) is applied to this model")
    if base is None or other is None:
        return CheckResult("architecture", "skipped", "not checked: no config.json / safetensors headers on one side")
    found = compare_models(base, other, strict, same_layers)
    levels = {level for level, _ in found}
    status = "fail" if "fail" in levels else "warn" if "warn" in levels else "ok"
    summary = "; ".join(message for level, message in found if level != "info") or "same architecture, config and tensors"
    if "info" in levels and status == "ok":
        summary = "same architecture and tensors; " + "; ".join(message for level, message in found if level == "info")
    return CheckResult(
        "architecture",
        status,
        summary,
        {"differences": [{"level": level, "message": message} for level, message in found]},
        tuple(f"{level}: {message}" for level, message in found),
    )


def with_architecture(
    config: Mapping[str, Any],
    source_of: Mapping[ModelRef, str],
    sources: Sequence[str],
    infos: Sequence[TokenizerInfo],
    comparisons: Sequence[Comparison],
    strict: bool,
) -> tuple[list[Comparison], list[str]]:
    """The comparisons with an `architecture` check each, and the problems of the merge
    configuration itself (merge method, slices)."""
    info_of = dict(zip(sources, infos))

    def facts_of_source(source: str) -> ModelFacts | None:
        weights = info_of[source].weights
        return ModelFacts(weights.config, weights.tensors) if weights is not None and weights.config else None

    def facts(reference: Any) -> ModelFacts | None:
        return facts_of_source(source_of[parse_model_reference(reference)]) if reference is not None else None

    lora_of = {source: ref.lora for ref, source in source_of.items() if ref.lora}
    same_layers = not config.get("slices")
    base = facts_of_source(sources[0])
    checked = [
        dataclasses.replace(
            c, checks=(*c.checks, architecture_check(base, facts_of_source(source), strict, same_layers, lora_of.get(source)))
        )
        for c, source in zip(comparisons, sources[1:])
    ]
    return checked, check_merge_config(config, facts)


# ======================================================================================
# Merges that build their tokenizer: the vocabulary audit (tokenizer_source / tokenizer:)
# ======================================================================================


def model_vocab(name: str, info: TokenizerInfo, merged: bool = True) -> ModelVocab:
    """A model's tokens and rows for plan_merged_vocab: rows from the embedding (else
    config.json's vocab_size, else one per token); config.json's vocab_size where it is
    below the embedding's (mergekit reads that). `merged` False: a tokenizer_source that is
    no model of the merge: all its tokens, no rows."""
    weights = info.weights
    added = {t.content: t.flags() for t in sorted(info.added_tokens, key=lambda t: t.id)}
    rows = weights.rows if weights is not None and merged else None
    config_rows = weights.config_vocab_size if weights is not None else None
    if merged and weights is not None and weights.embed_rows is not None and is_int(config_rows) and 0 <= config_rows < weights.embed_rows:
        return ModelVocab(name, info.vocab, added, config_rows, embedding_rows=weights.embed_rows)
    return ModelVocab(name, info.vocab, added, rows if rows is not None else max(info.vocab.values(), default=-1) + 1, merged)


def merged_chat_template(config: Mapping[str, Any], merged: MergedVocab, info_of: Mapping[str, TokenizerInfo]) -> str | None:
    """The chat template the merged model gets: the YAML's own (a literal template, or
    `auto`: the most common of the models'), else that of the tokenizer it takes; None
    for a template mergekit names (its own files)."""
    wanted = config.get("chat_template")
    if isinstance(wanted, str) and "{" in wanted:
        return wanted
    if wanted == "auto":
        templates = [info.chat_template.strip() for info in info_of.values() if info.chat_template]
        return max(templates, key=templates.count) if templates else None
    if wanted:
        return None
    return info_of[merged.tokenizer_model].chat_template


def tokenizer_merge_problems(config: Mapping[str, Any], merged: MergedVocab, info_of: Mapping[str, TokenizerInfo]) -> list[str]:
    """What still fails when mergekit maps rows by token: ghost tokens it cannot read and
    bad `tokenizer.tokens` (plan_merged_vocab), special tokens of the merged tokenizer it
    lacks, a chat template that writes tokens the merged tokenizer lacks (config.json ids:
    merged_config_ids)."""
    problems = list(merged.problems + merged.unreadable)
    out = set(merged.tokens)
    taken = info_of[merged.tokenizer_model]
    missing_special = sorted({token for token in taken.special_tokens.values() if token and token not in out})
    if missing_special:
        problems.append(f"the merged tokenizer lacks its own special token(s) {', '.join(map(repr, missing_special))} (ghost tokens)")
    every_added = dict.fromkeys(t.content for info in info_of.values() for t in info.added_tokens)
    template = merged_chat_template(config, merged, info_of)
    lacking = [token for token in template_special_tokens(template, every_added) if token not in out]
    if lacking:
        problems.append(
            f"the chat template writes {', '.join(map(repr, lacking[:5]))}, which the merged tokenizer lacks: "
            "chats would be tokenized as plain text"
        )
    return problems


def merged_config_ids(merged: MergedVocab, base: TokenizerInfo, taken: TokenizerInfo) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the base's config.json, which mergekit keeps with the merged
    vocabulary: a bos/eos/pad id past the merged rows fails; one that names neither the
    base's token at that id nor the merged tokenizer's token of that role (`taken`: the
    tokenizer the merge takes, which may order its ids otherwise) is a warning."""
    problems, warnings = [], []
    token_of_id = {token_id: token for token, token_id in base.vocab.items()}
    for role, value in base.config_ids.items():
        for token_id in value if isinstance(value, list) else [value]:
            if not is_int(token_id):
                continue
            if token_id >= merged.size:
                problems.append(f"the merged config's {role}_token_id {token_id} is past the merged vocabulary's {merged.size} rows")
            elif token_id < len(merged.tokens) and merged.tokens[token_id] not in (
                token_of_id.get(token_id),
                taken.special_tokens.get(role),
            ):
                warnings.append(
                    f"the merged config's {role}_token_id {token_id} is {merged.tokens[token_id]!r} in the merged tokenizer, "
                    f"{token_of_id.get(token_id)!r} in the base's (mergekit keeps the base's config.json)"
                )
    return problems, warnings


def render_tokenizer_merge(merged: MergedVocab, head: int) -> list[str]:
    """The vocabulary audit, human-readable: the tokenizer the merge gets, the tokens each
    model adds, and for each model the rows it lacks and where they come from."""
    what = {"union": f"the union of {len(merged.fills)} models' tokenizers", "base": f"the base's ({merged.base})"}
    lines = [
        f"tokenizer  {what.get(merged.source, f'that of {merged.source}')}: {len(merged.tokens)} tokens"
        + (f", {merged.size} rows" if merged.size != len(merged.tokens) else "")
        + "; mergekit maps every model's rows by token"
    ]
    for model, added in merged.added_by.items():
        if added:
            shown = ", ".join(repr(t) for t in added[:head]) + (f", ... ({len(added)})" if len(added) > head else "")
            lines.append(f"  {model} adds {len(added)}: {shown}")
    for model, fills in merged.fills.items():
        output = merged.output_fills.get(model, fills)
        for label, table in (("lacks", fills), ("lacks in lm_head", output if output != fills else {})):
            if table:
                shown = "; ".join(f"{t!r} <- {fill.describe()}" for t, fill in list(table.items())[:head])
                lines.append(f"  {model} {label} {len(table)}: {shown}" + (" ..." if len(table) > head else ""))
    if merged.row_base is None and any(fill.rule == "mean" for fills in merged.fills.values() for fill in fills.values()):
        lines.append("  no base_model: a token several models hold takes the mean of their rows")
    lines += [f"  changes: {text}" for text in merged.changes[:head]]
    lines += [f"  warning: {text}" for text in merged.warnings[:head]]
    return lines


# ======================================================================================
# Merge audit (--audit, --plot): what each model contributes, from its weights
# ======================================================================================

AUDIT_BLOCK_BYTES = 3 * 2**20  # float32 values read and computed at a time, all models together: the CPU cache's share
AUDIT_WORKERS = 2  # numpy releases the GIL in reads, conversions and BLAS: two tensors at a time
GRAM_BY_DOTS = 8  # up to this many models, the task vectors' Gram matrix by dot products
NEAR_DUPLICATE, CONFLICTING = 0.95, -0.3  # task-vector cosines named in the report
LOW_SHARE, HIGH_SHARE = 0.02, 0.5
LAYER_OUTLIER = 3.0  # a layer that moved this many times the model's median layer is named
TOP_TENSORS = 5
AUDIT_DTYPES = ("BF16", "F16", "F32", "F64")  # widened to float32 (sizes: DTYPE_SIZES)


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


@dataclass(frozen=True)
class TensorSums:
    """One tensor, streamed through every model: the Gram matrix of the models' task
    vectors (their difference from the reference), and the reference's squared norm."""

    name: str
    gram: np.ndarray  # (models, models) float64: <d_i, d_j>
    reference_square: float
    vocabulary: bool = False
    nonfinite: tuple[int, ...] = ()  # models whose values of it hold a NaN or an infinity (figures leave it out)
    overflow: bool = False  # finite values whose squares overflow float32 sums (figures leave it out)


@dataclass(frozen=True)
class ModelAudit:
    model: str
    weight: float | None  # None: not in the YAML's models (the base of a task-arithmetic merge)
    task_vector_norm: float
    relative_norm: float
    share: float | None  # None for the reference model itself
    layers: tuple[float, ...]
    top_tensors: tuple[tuple[str, float, float], ...]  # (tensor, norm, norm / the reference's)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "weight": self.weight,
            "task_vector_norm": self.task_vector_norm,
            "relative_norm": self.relative_norm,
            "share": self.share,
            "layers": list(self.layers),
            "top_tensors": [{"tensor": t, "norm": n, "relative": r} for t, n, r in self.top_tensors],
        }


@dataclass(frozen=True)
class MergeAudit:
    reference: str  # the base model, or "mean of the models"
    models: tuple[ModelAudit, ...]
    pairs: tuple[tuple[str, str, float], ...]
    vocabulary: tuple[tuple[str, str, float], ...]  # (model, tensor, task-vector norm), reported apart
    flags: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    bytes_read: int = 0
    problems: tuple[str, ...] = ()  # broken models (NaN or infinite weights): the merge check fails
    notes: tuple[str, ...] = ()  # what the figures mean here (the reference, passthrough, LoRAs left out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "models": [m.to_dict() for m in self.models],
            "pairs": [{"a": a, "b": b, "cosine": c} for a, b, c in self.pairs],
            "vocabulary_tensors": [{"model": m, "tensor": t, "norm": n} for m, t, n in self.vocabulary],
            "flags": list(self.flags),
            "notes": list(self.notes),
            "problems": list(self.problems),
            "skipped": list(self.skipped),
            "bytes_read": self.bytes_read,
        }


def merge_weights(config: Mapping[str, Any], name_of: Callable[[Any], str]) -> dict[str, float]:
    """Each model's weight in the YAML (`parameters.weight`, else the shared one, else 1): a
    gradient list by its mean, a per-tensor list ({filter, value}) by the mean of its values."""

    def value(raw: Any) -> float | None:
        if isinstance(raw, bool):
            return None
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, list) and raw:
            values = [value(item.get("value") if isinstance(item, Mapping) else item) for item in raw]
            numbers = [v for v in values if v is not None]
            return sum(numbers) / len(numbers) if numbers else None
        return None

    shared = config.get("parameters") if isinstance(config.get("parameters"), Mapping) else {}
    default = value(shared.get("weight"))
    weights: dict[str, float] = {}
    entries = [e for e in config.get("models") or [] if isinstance(e, Mapping)]
    entries += [s for slice_ in config.get("slices") or [] if isinstance(slice_, Mapping) for s in slice_.get("sources") or []]
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("model") is not None:
            parameters = entry.get("parameters") if isinstance(entry.get("parameters"), Mapping) else {}
            own = value(parameters.get("weight"))
            weights.setdefault(name_of(entry["model"]), own if own is not None else default if default is not None else 1.0)
    return weights


def layer_of(name: str) -> int | None:
    match = LAYER_INDEX_RE.search(name)  # the shared block's: group 1 is the prefix, the index follows it
    return int(name[match.end(1) : match.end() - 1]) if match else None


def summarize_audit(
    names: Sequence[str], weights: Mapping[str, float], sums: Sequence[TensorSums], reference: str | None, conclusions: bool = True
) -> MergeAudit:
    """Every figure of the audit from the per-tensor sums (pure). `reference`: the base
    model's name (its own task vector is zero: it takes no share), None for the mean.
    Tensors with NaN or infinite values are left out of every figure and named as
    problems. `conclusions` False: no notes on shares and pairs (a reference that cannot
    support them, a merge that averages nothing); a layer out of its model's line still is."""
    import numpy as np

    problems = tuple(
        f"{names[k]}: {s.name} holds NaN or infinite values: a broken model (a merge spreads them into the result)"
        for s in sums
        for k in s.nonfinite
    )
    skipped = tuple(f"{s.name}: its values overflow float32 sums" for s in sums if s.overflow)
    sums = [s for s in sums if not s.nonfinite and not s.overflow]
    body = [s for s in sums if not s.vocabulary]
    square = np.sum([s.gram.diagonal() for s in body], axis=0) if body else np.zeros(len(names))
    norms = np.sqrt(square)
    reference_norm = math.sqrt(sum(s.reference_square for s in body)) or 1.0
    voices = {n: weights.get(n, 1.0) * float(norms[i]) for i, n in enumerate(names) if n != reference}
    total_voice = sum(abs(v) for v in voices.values()) or 1.0
    layer_count = max((layer_of(s.name) for s in body if layer_of(s.name) is not None), default=-1) + 1
    layer_square = np.zeros((len(names), layer_count))
    for s in body:
        layer = layer_of(s.name)
        if layer is not None:
            layer_square[:, layer] += s.gram.diagonal()
    models = []
    for i, name in enumerate(names):
        ranked = sorted(body, key=lambda s: -s.gram[i, i])[:TOP_TENSORS] if name != reference else []
        top = tuple(
            (s.name, math.sqrt(s.gram[i, i]), math.sqrt(s.gram[i, i] / s.reference_square) if s.reference_square else None) for s in ranked
        )
        share = abs(voices[name]) / total_voice if name in voices else None
        models.append(
            ModelAudit(
                name,
                weights.get(name),
                float(norms[i]),
                float(norms[i]) / reference_norm,
                share,
                tuple(np.sqrt(layer_square[i]).tolist()),
                top,
            )
        )
    gram = np.sum([s.gram for s in body], axis=0) if body else np.zeros((len(names), len(names)))
    pairs = tuple(
        (names[i], names[j], float(gram[i, j] / (norms[i] * norms[j])) if norms[i] and norms[j] else 0.0)
        for i, j in itertools.combinations(range(len(names)), 2)
        if reference not in (names[i], names[j])
    )
    vocabulary = tuple((n, s.name, math.sqrt(s.gram[i, i])) for s in sums if s.vocabulary for i, n in enumerate(names) if n != reference)
    flags = audit_flags(models, pairs, conclusions)
    if any(relative is None for m in models for _, _, relative in m.top_tensors):
        flags += ("a tensor that is all zeros in the reference has no relative change (null)",)
    return MergeAudit(
        "mean of the models" if reference is None else reference, tuple(models), pairs, vocabulary, flags, skipped, problems=problems
    )


def audit_flags(models: Sequence[ModelAudit], pairs: Sequence[tuple[str, str, float]], conclusions: bool = True) -> tuple[str, ...]:
    """What the human report points at: a model that hardly contributes or dominates,
    near-duplicate and conflicting pairs (only with `conclusions`), a layer far out of a
    model's line."""
    import numpy as np

    flags = []
    voiced = [m for m in models if m.share is not None]
    for m in voiced if conclusions else ():
        if m.share is not None and m.share < LOW_SHARE:
            flags.append(f"{m.model} hardly contributes (share {m.share:.1%}): drop it or raise its weight")
        if m.share is not None and m.share > HIGH_SHARE and len(voiced) >= 3:
            flags.append(f"{m.model} dominates the merge (share {m.share:.1%})")
    for a, b, cosine in pairs if conclusions else ():
        if cosine >= NEAR_DUPLICATE:
            flags.append(f"{a} and {b} are near-duplicates (task-vector cosine {cosine:.3f}): one of them adds little")
        elif cosine <= CONFLICTING:
            flags.append(f"{a} and {b} conflict (task-vector cosine {cosine:.3f}): their changes cancel in a linear merge")
    for m in voiced:
        moved = [value for value in m.layers if value > 0]
        median = float(np.median(moved)) if len(moved) >= 3 else 0.0
        outliers = [layer for layer, value in enumerate(m.layers) if median and value > LAYER_OUTLIER * median]
        for run in consecutive_runs(outliers):
            ratios = [m.layers[layer] / median for layer in run]
            where = f"layer {run[0]}" if len(run) == 1 else f"layers {run[0]}-{run[-1]}"
            low, high = min(ratios), max(ratios)
            flags.append(f"{m.model}: {where} moved {low:.1f}x" + (f"-{high:.1f}x" if high - low >= 0.05 else "") + " its median layer")
    return tuple(flags)


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


def short_names(names: Sequence[str]) -> dict[str, str]:
    """Chart labels: each name's last path component, or as many as tell the names apart."""
    for depth in range(1, 8):
        short = {name: "/".join(name.rstrip("/").split("/")[-depth:]) for name in names}
        if len(set(short.values())) == len(set(names)):
            return short
    return {name: name for name in names}


def consecutive_runs(values: Sequence[int]) -> list[list[int]]:
    """[1, 2, 3, 7] -> [[1, 2, 3], [7]]."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return runs


def render_audit(audit: MergeAudit) -> list[str]:
    """The audit as the human report shows it."""
    width = max(len(m.model) for m in audit.models)
    read = f"{audit.bytes_read / 1e9:.2f} GB" if audit.bytes_read >= 1e9 else f"{audit.bytes_read / 1e6:.1f} MB"
    lines = ["", f"audit  against {audit.reference} ({read} of weights read)"]
    lines.append(f"  {'model':<{width}}  {'weight':>6}  {'task vector':>11}  {'relative':>8}  {'share':>6}  most moved tensor (relative)")
    for m in audit.models:
        share = f"{m.share:.1%}" if m.share is not None else "base"
        weight = f"{m.weight:.3g}" if m.weight is not None else "-"
        relative = m.top_tensors[0][2] if m.top_tensors else None
        top = f"{m.top_tensors[0][0]} ({'-' if relative is None else f'{relative:.3g}'})" if m.top_tensors else "-"
        lines.append(f"  {m.model:<{width}}  {weight:>6}  {m.task_vector_norm:>11.4g}  {m.relative_norm:>8.4f}  {share:>6}  {top}")
    shown = [p for p in audit.pairs if len(audit.pairs) <= 10 or not CONFLICTING < p[2] < NEAR_DUPLICATE]
    lines += [f"  cosine  {a}  ~  {b}: {c:+.3f}" for a, b, c in shown]
    if len(shown) < len(audit.pairs):
        lines.append(f"  ({len(audit.pairs) - len(shown)} more pairs between {CONFLICTING} and {NEAR_DUPLICATE}: see --json)")
    lines += [f"  note  {flag}" for flag in (*audit.notes, *audit.flags)]
    lines += [f"  FAIL  {problem}" for problem in audit.problems]
    if audit.skipped:
        lines.append(f"  {len(audit.skipped)} tensor(s) not compared, e.g. {audit.skipped[0]}")
    return lines


def write_audit_plot(audit: MergeAudit, path: Path) -> None:
    """Share per model (bars) and the per-layer task-vector norms (a heatmap, models by
    layers), labelled with the model names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    voiced = [m for m in audit.models if m.share is not None]
    short = short_names([m.model for m in audit.models] + [audit.reference])
    labels = [short[m.model] for m in voiced]
    figure, (bars, heat) = plt.subplots(1, 2, figsize=(14, 1.5 + 0.5 * len(voiced)), gridspec_kw={"width_ratios": [1, 2]})
    shares = [100 * (m.share or 0) for m in voiced]
    bars.barh(labels, shares, color="tab:blue")
    for row, share in enumerate(shares):
        bars.annotate(f"{share:.1f} %", (share, row), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    bars.invert_yaxis()
    bars.set_xlim(0, max(shares, default=0) * 1.2 or 1)
    bars.set_xlabel("share of the merge (%)")
    bars.set_title(f"share: weight x task vector, against {short[audit.reference]}")
    layers = max((len(m.layers) for m in voiced), default=0)
    grid = [list(m.layers) + [0.0] * (layers - len(m.layers)) for m in voiced]
    image = heat.imshow(grid, aspect="auto", cmap="viridis")
    heat.set_yticks(range(len(voiced)), labels=labels)
    heat.set_xlabel("decoder layer")
    heat.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    heat.set_title("task-vector norm per layer")
    figure.colorbar(image, ax=heat, label="||model - reference||")
    figure.tight_layout()
    chart = io.BytesIO()
    try:
        figure.savefig(chart, dpi=110, format=path.suffix.lower().lstrip("."))
    finally:
        plt.close(figure)
    try:
        with path.open("wb") as handle:  # written here, where a full disk is an error (savefig to a path hides some)
            handle.write(chart.getvalue())
    except OSError as exc:
        raise CliError(f"--plot {path}: cannot write it ({exc.strerror})") from exc


# ======================================================================================
# A comparison and its report
# ======================================================================================


@dataclass(frozen=True)
class CheckResult:
    """One named check of a comparison: `ok`, `warn` (a difference tolerated without
    --strict), `fail` (counts towards exit code 1) or `skipped`."""

    name: str
    status: str
    summary: str
    details: Mapping[str, Any] = field(default_factory=dict)
    lines: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "summary": self.summary, **self.details}


@dataclass(frozen=True)
class Comparison:
    ref: str
    other: str
    vocab: VocabDiff
    checks: tuple[CheckResult, ...]
    mapped_by: str | None = None  # the tokenizer_source of a merge that maps rows by token

    @property
    def failed(self) -> bool:
        return any(check.status == "fail" for check in self.checks)

    @property
    def weights_checked(self) -> bool:
        weights = next((check for check in self.checks if check.name == "weights"), None)
        return weights is not None and weights.status != "skipped" and not weights.details.get("not_checked")

    def verdict_text(self) -> str:
        """Never "safe" on what was not checked."""
        if self.failed:
            return "MISMATCH: do not merge linearly"
        if self.mapped_by is not None and not self.vocab.equal:
            return f"vocabularies differ: mergekit maps the rows by token (tokenizer_source: {self.mapped_by})"
        if self.weights_checked:
            return "identical: safe to merge linearly"
        weights = next(check for check in self.checks if check.name == "weights")
        sides = list(weights.details.get("not_checked") or ["REF", "OTHER"])
        reason = (
            "--no-weights"
            if weights.summary.endswith("--no-weights")
            else f"{' and '.join(sides)} {'have' if len(sides) > 1 else 'has'} no safetensors"
        )
        return f"tokenizers identical (weights not checked: {reason})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "other": self.other,
            "equal": self.vocab.equal,
            "verdict": "mismatch" if self.failed else "mapped" if self.mapped_by is not None and not self.vocab.equal else "identical",
            "verdict_text": self.verdict_text(),
            "weights_checked": self.weights_checked,
            "checks": {check.name: check.to_dict() for check in self.checks},
        }


def compare(
    ref: TokenizerInfo, other: TokenizerInfo, *, strict: bool, head: int, weights: bool = True, mapped_by: str | None = None
) -> Comparison:
    """Every check of OTHER against REF; `mapped_by`: the tokenizer_source of a merge
    that maps rows by token (vocab_check, weights_check)."""
    diff = diff_vocab(ref, other, head)
    checks = [
        vocab_check(diff, ref, other, mapped_by),
        special_tokens_check(ref, other, strict),
        chat_template_check(ref, other, strict),
        encoding_check(ref, other, strict),
    ]
    checks.append(
        weights_check(ref, other, head, mapped_by)
        if weights
        else CheckResult("weights", "skipped", "not checked: --no-weights", {"not_checked": ["REF", "OTHER"]})
    )
    return Comparison(ref.source, other.source, diff, tuple(checks), mapped_by)


def build_report(
    ref: TokenizerInfo,
    comparisons: Sequence[Comparison],
    *,
    strict: bool,
    weights: bool,
    merge_problems: Sequence[str] | None = None,
    merged: MergedVocab | None = None,
) -> dict[str, Any]:
    failed = any(c.failed for c in comparisons) or bool(merge_problems)
    report = {
        "schema": JSON_SCHEMA_ID,
        "equal": not failed,
        "exit_code": 1 if failed else 0,
        "strict": strict,
        "weights": weights,
        "reference": {
            "source": ref.source,
            "path": ref.path,
            "vocab_size": len(ref.vocab),
            "model_type": ref.model_type,
            "convention": ref.convention,
            "fingerprint_sha256": ref.fingerprint,
        },
        "comparisons": [c.to_dict() for c in comparisons],
    }
    if merge_problems is not None:
        report["merge"] = {"status": "fail" if merge_problems else "ok", "problems": list(merge_problems)}
    if merged is not None:
        audit = merged.to_dict()
        report.setdefault("merge", {"status": "fail" if merge_problems else "ok", "problems": list(merge_problems or [])})
        report["merge"] |= {"tokenizer": audit, "union": audit.pop("union"), "fills": audit.pop("fills")}
    return report


def render_human(
    ref: TokenizerInfo,
    comparisons: Sequence[Comparison],
    color: bool = False,
    merge_problems: Sequence[str] | None = None,
    merged_lines: Sequence[str] = (),
) -> str:
    def paint(text: str, status: str) -> str:
        codes = {"ok": "32", "warn": "33", "fail": "31"}
        return f"\033[{codes[status]}m{text}\033[0m" if color and status in codes else text

    out: list[str] = [f"REF    {ref.source}  ({ref.model_type}, {len(ref.vocab)} tokens, {ref.convention})"]
    if merge_problems:
        out += [f"merge  {paint('FAIL', 'fail')} {problem}" for problem in merge_problems]
    out += list(merged_lines)
    if len(comparisons) > 1:
        width = max(len(c.other) for c in comparisons)
        out.append("")
        out.append(f"{'model':<{width}}  {'tokens':>7}  verdict")
        for comparison in comparisons:
            verdict = "MISMATCH" if comparison.failed else "mapped" if comparison.mapped_by and not comparison.vocab.equal else "identical"
            bad = [check.name for check in comparison.checks if check.status == "fail"]
            note = f" ({', '.join(bad)})" if bad else ""
            out.append(f"{comparison.other:<{width}}  {comparison.vocab.other_size:>7}  {paint(verdict, 'fail' if bad else 'ok')}{note}")
    for comparison in comparisons:
        out.append("")
        out.append(f"OTHER  {comparison.other}")
        verdict = comparison.verdict_text()
        if merge_problems and not comparison.failed:  # never "safe to merge" under a failing merge check
            verdict = verdict.replace("identical: safe to merge linearly", "identical")
            verdict += " (but the merge fails: see merge above)"
        out.append(f"verdict  {paint(verdict, 'fail' if comparison.failed else 'ok' if comparison.weights_checked else 'warn')}")
        for check in comparison.checks:
            label = paint(f"{STATUS_LABEL[check.status]:<4}", check.status)
            out.append(f"  {check.name:<15} {label} {check.summary}")
            if check.status != "ok" or check.name == "weights":
                out += [f"      {line}" for line in check.lines]
    return "\n".join(out) + "\n"


def dedupe(items: Sequence[Any]) -> list[Any]:
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


# ======================================================================================
# Command line
# ======================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Diff tokenizers against a reference before a linear model merge.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "sources: a local directory, a tokenizer.json file or a Hugging Face repo id (org/name[@rev]).\n\n"
            "examples:\n"
            "  %(prog)s meta-llama/Llama-3.1-8B-Instruct ./my-finetune            # gate one model against its base\n"
            "  %(prog)s --mergekit-config merge.yaml --json > gate.json           # the whole merge, for CI\n"
            "  %(prog)s base/tokenizer.json other/tokenizer.json --no-weights --strict\n\n"
            "exit codes:\n"
            "  0  vocabularies identical (same size, every token the same id): safe to merge linearly when the\n"
            "     weights were checked too (the verdict says when they were not)\n"
            "  1  mismatch: any token->id or size difference; with --strict also special tokens, added-token\n"
            "     flags, chat template, merges/normalizer/pre-tokenizer/decoder or fingerprint; with weights\n"
            "     also ghost tokens (ids with no embedding row), differing embedding row counts, and with\n"
            "     --mergekit-config an architecture or merge configuration mergekit cannot merge\n"
            "  2  usage error or unreadable input (one 'error: ...' line on stderr; --debug shows the traceback)\n"
            "  130  interrupted by Ctrl-C (143: SIGTERM, 129: SIGHUP)"
        ),
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("sources", nargs="*", metavar="REF OTHER", help="reference first, then one or more others")
    inputs.add_argument(
        *flag("--mergekit-config"),
        type=Path,
        metavar="FILE",
        help="compare every model of a mergekit YAML against its base_model (or first model)",
    )
    inputs.add_argument(*flag("--revision"), metavar="REV", help="Hub revision for repo ids without an @rev of their own")
    checks = parser.add_argument_group("checks")
    checks.add_argument(
        *flag("--weights"),
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read config.json and safetensors headers of model directories and repos: rows, padding, ghost tokens, "
        "and with --mergekit-config the architecture (default; --no-weights: tokenizers only)",
    )
    checks.add_argument(
        *flag("--strict"), action="store_true", help="also fail on special-token, chat-template, encoding and inherited-config differences"
    )
    add_audit_arguments(parser)
    output = parser.add_argument_group("output")
    output.add_argument(
        *flag("--json"), action="store_true", help="print one JSON document on stdout instead of the human report (errors too)"
    )
    output.add_argument(
        *flag("--head"),
        type=non_negative_int,
        default=20,
        metavar="N",
        help="list at most N tokens per section (default 20; counts are always complete)",
    )
    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument(*flag("--debug"), action="store_true", help="verbose logs and tracebacks")
    behaviour.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    audit = parser.add_argument_group("merge audit (--mergekit-config)")
    audit.add_argument(
        *flag("--audit"),
        action="store_true",
        help="read every model's weights (once, streamed) and report what each contributes: task-vector norms against "
        "the base, shares, per-layer norms, cosines between models (needs numpy)",
    )
    audit.add_argument(
        *flag("--audit-base"),
        metavar="MODEL",
        help="the model task vectors are measured from (default: the merge's base_model; without one, the mean of the models, "
        "which supports no conclusion on shares and pairs): e.g. the model the fine-tunes started from; implies --audit",
    )
    audit.add_argument(
        *flag("--plot"),
        type=Path,
        metavar="FILE",
        help="also draw the audit (share per model, per-layer norms) into FILE (.png, .svg, .pdf); implies --audit; "
        "needs matplotlib: pip install 'merge_tools[plot]'",
    )


def run(args: argparse.Namespace) -> int:
    check_audit_options(args)
    if args.mergekit_config is not None:
        if args.sources:
            raise CliError("give either REF OTHER... or --mergekit-config, not both")
        config = read_mergekit_config(args.mergekit_config)
        problems = mergekit_config_problems(config, MERGEKIT_METHODS)
        if problems:
            return refuse_configuration(args, problems)
        yaml_dir = args.mergekit_config.resolve().parent
        source_of: dict[ModelRef, str] = {}
        for reference in dedupe(mergekit_references(config, args.mergekit_config)):
            ref = parse_model_reference(reference)
            if ref.lora:
                log.warning("%s: the LoRA %s is not applied; comparing the base model's tokenizer", ref.path, ref.lora)
            local = local_or_hub(ref, yaml_dir)
            source_of[ref] = f"{local}@{ref.revision}" if ref.revision else local
        sources = dedupe(list(source_of.values()))
        if len(sources) < 2:
            raise CliError(f"{args.mergekit_config}: names only one model ({sources[0]}); nothing to compare")
        log.debug("reference: %s (%s)", sources[0], "base_model" if config.get("base_model") is not None else "first model")
    else:
        sources = args.sources
        if len(sources) < 2:
            raise CliError("need a reference and at least one other tokenizer (or --mergekit-config FILE)")
    resolved = [resolve_tokenizer(source, args.revision) for source in sources]
    audit_base = resolve_tokenizer(args.audit_base, args.revision) if args.audit_base is not None else None
    if args.plot is not None:
        refuse_plot_inside_models(args.plot, [*resolved, *([audit_base] if audit_base else [])])
    infos = read_tokenizer_infos(resolved, args.weights)
    ref = infos[0]
    settings = tokenizer_merge_settings(config) if args.mergekit_config is not None else None
    mapped_by = settings[0] if settings is not None else None
    comparisons = [compare(ref, o, strict=args.strict, head=args.head, weights=args.weights, mapped_by=mapped_by) for o in infos[1:]]
    merge_problems = None
    if args.mergekit_config is not None and args.weights:
        comparisons, merge_problems = with_architecture(config, source_of, sources, infos, comparisons, args.strict)
    merged = None
    if settings is not None:
        outside = tokenizer_source_outside(config, source_of, args.mergekit_config.resolve().parent, args.revision)
        merged, merge_problems = audit_tokenizer_merge(config, source_of, sources, infos, merge_problems, args.strict, outside)
    audit = audit_merge(config, source_of, resolved, infos, comparisons, audit_base) if args.audit else None
    if audit is not None:
        merge_problems = [*(merge_problems or []), *audit.problems]
        if args.plot is not None:
            write_audit_plot(audit, args.plot)
    report = build_report(ref, comparisons, strict=args.strict, weights=args.weights, merge_problems=merge_problems, merged=merged)
    if audit is not None:
        report["audit"] = audit.to_dict()
    if args.json:
        sys.stdout.write(json.dumps(strict_json(report), ensure_ascii=False, indent=2, allow_nan=False) + "\n")
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        lines = render_tokenizer_merge(merged, args.head) if merged is not None else []
        text = render_human(ref, comparisons, color=color, merge_problems=merge_problems, merged_lines=lines)
        sys.stdout.write(text + ("\n".join(render_audit(audit)) + "\n" if audit is not None else ""))
    return report["exit_code"]


def strict_json(data: Any) -> Any:
    """`data` with every NaN or infinity as null: --json is JSON every reader takes (a
    figure that is undefined is null, and the audit's notes say why)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, Mapping):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def refuse_plot_inside_models(plot: Path, resolved: Sequence[ResolvedSource]) -> None:
    """--plot never writes into a model's directory (nor onto one of its files)."""
    target = plot.resolve()
    for source in resolved:
        if target.is_relative_to(source.directory.resolve()):
            raise CliError(f"--plot {plot}: inside the model directory {source.directory}; write the chart elsewhere")


def check_audit_options(args: argparse.Namespace) -> None:
    """--audit and --plot, checked before anything is read: they need the merge, the
    weights, numpy (and matplotlib for --plot), and --plot a file outside every model."""
    args.audit = args.audit or args.plot is not None or args.audit_base is not None
    if not args.audit:
        return
    if args.mergekit_config is None:
        raise CliError("--audit needs --mergekit-config: the models, their weights and the base come from the merge")
    if not args.weights:
        raise CliError("--audit reads the weights: drop --no-weights")
    # the audit's two worker threads each run BLAS dot products: one BLAS thread each, not a pool per call
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    missing = [name for name in ("numpy", *(["matplotlib"] if args.plot is not None else [])) if importlib.util.find_spec(name) is None]
    if missing:
        raise CliError(f"--{'plot' if 'matplotlib' in missing else 'audit'} needs {' and '.join(missing)}: pip install 'merge_tools[plot]'")
    if args.plot is not None:
        check_plot_path(args.plot)


def check_plot_path(plot: Path) -> None:
    """--plot names a new or regular file in an existing directory, with a format matplotlib writes."""
    if plot.is_dir() or not plot.resolve().parent.is_dir():
        raise CliError(f"--plot {plot}: not a file in an existing directory")
    if plot.exists() and not plot.is_file():
        raise CliError(f"--plot {plot}: exists and is not a regular file; name a file")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if plot.suffix.lower().lstrip(".") not in formats:
        raise CliError(
            f"--plot {plot}: matplotlib writes no {plot.suffix or 'extension-less'} files (it writes .{', .'.join(sorted(formats))})"
        )


def merge_names(source_of: Mapping[ModelRef, str], sources: Sequence[str]) -> tuple[list[str], Callable[[Any], str]]:
    """The name of each source in the reports (the YAML's first spelling of it), and the
    name of any reference of the YAML (an error for one that is not a model of the merge)."""
    name_of_path: dict[str, str] = {}
    for ref, path in source_of.items():
        name_of_path.setdefault(path, str(ref))

    def name_of(reference: Any) -> str:
        path = source_of.get(parse_model_reference(reference))
        if path is None:
            raise CliError(f"{parse_model_reference(reference)}: named in the merge settings, but not a model of the merge")
        return name_of_path[path]

    return [name_of_path[path] for path in sources], name_of


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


def audit_tokenizer_merge(
    config: Mapping[str, Any],
    source_of: Mapping[ModelRef, str],
    sources: Sequence[str],
    infos: Sequence[TokenizerInfo],
    merge_problems: Sequence[str] | None,
    strict: bool,
    outside: tuple[str, TokenizerInfo] | None = None,
) -> tuple[MergedVocab, list[str]]:
    """A merge with tokenizer_source: the vocabulary audit, and the merge problems with
    what still fails under the tokenizer merge. `outside`: a tokenizer_source that is no
    model of the merge (its name and tokenizer)."""
    settings = tokenizer_merge_settings(config)
    assert settings is not None
    source, tokens, pad = settings
    names, name_of = merge_names(source_of, sources)
    info_of = dict(zip(names, infos))
    base = name_of(config["base_model"]) if config.get("base_model") is not None else None
    models = [model_vocab(name, info) for name, info in info_of.items()]
    if outside is not None:
        source, info_of[outside[0]] = outside
        models.append(model_vocab(outside[0], outside[1], merged=False))
    elif source not in ("union", "base"):
        source = name_of(source)
    merged = plan_merged_vocab(models, base, source, named_tokens(tokens, name_of), pad, vocabulary_groups(config, name_of))
    if isinstance(config.get("tokenizer"), Mapping) and "chat_template" in config["tokenizer"]:
        ignored = "tokenizer.chat_template is ignored by mergekit (it reads chat_template: at the top level)"
        merged = dataclasses.replace(merged, warnings=(*merged.warnings, ignored))
    id_problems, id_warnings = merged_config_ids(merged, info_of[merged.base], info_of[merged.tokenizer_model])
    split = merged_split_difference(merged, info_of) if not merged.problems else None
    merged = dataclasses.replace(
        merged,
        warnings=(*merged.warnings, *id_warnings, *([split] if split and not strict else [])),
        changes=tuple(tokenizer_changes(merged, info_of)),
    )
    problems = tokenizer_merge_problems(config, merged, info_of) + id_problems + ([split] if split and strict else [])
    return merged, list(merge_problems or []) + problems


def tokenizer_source_outside(
    config: Mapping[str, Any], source_of: Mapping[ModelRef, str], yaml_dir: Path, revision: str | None
) -> tuple[str, TokenizerInfo] | None:
    """A tokenizer_source that is no model of the merge (mergekit takes its tokens and none
    of its rows), read like the models' tokenizers; None for union, base or a model."""
    settings = tokenizer_merge_settings(config)
    if settings is None or settings[0] in ("union", "base"):
        return None
    ref = parse_model_reference(settings[0])
    local = local_or_hub(ref, yaml_dir)
    source = f"{local}@{ref.revision}" if ref.revision else local
    if ref in source_of or source in source_of.values():
        return None
    return str(ref), read_tokenizer_infos([resolve_tokenizer(source, revision)], weights=False)[0]


def tokenizer_changes(merged: MergedVocab, info_of: Mapping[str, TokenizerInfo]) -> list[str]:
    """What the merged tokenizer changes against the base's own, which the merged model
    gets even where no row moves: tokens that become added tokens, another model's chat
    template and special tokens, a tokenizer of another family folded in."""
    base, taken = info_of[merged.base], info_of[merged.tokenizer_model]
    base_added = {t.content for t in base.added_tokens}
    changes = [
        f"{token!r} becomes an added token ({'special' if flags.get('special') else 'not special'}) at id {merged.tokens.index(token)}, "
        "as another model adds it: text holding it is split around it"
        for token, flags in merged.appended.items()
        if token in base.vocab and token not in base_added
    ]
    if taken is not base:
        if taken.chat_template != base.chat_template:
            changes.append(f"the chat template is {merged.tokenizer_model}'s, not the base's")
        for role in SPECIAL_ROLES:
            theirs, ours = taken.special_tokens.get(role), base.special_tokens.get(role)
            if theirs != ours:
                changes.append(f"{role} token {theirs!r} ({merged.tokenizer_model}'s), the base's is {ours!r}")
    for model, added in merged.added_by.items():
        regular = [t for t in added if merged.appended.get(t) == PLAIN_FLAGS]
        if len(regular) > len(info_of[model].vocab) // 2:  # most of its tokens are not the base's: another family
            changes.append(
                f"{len(regular)} regular tokens of {model} become added tokens, which split text before the tokenizer's own rules: "
                f"a tokenizer of another family; transplant {model} onto the base's tokenizer instead (remap_tokenizer.py --src_model "
                f"{model} --base_tokenizer {merged.base} --drop-extra) and merge without tokenizer_source"
            )
    return changes


def merged_split_difference(merged: MergedVocab, info_of: Mapping[str, TokenizerInfo]) -> str | None:
    """How the merged tokenizer splits the fingerprint sample differently from the base's
    (the first stretch of text, both ways), or None when it splits it alike."""
    base, taken = info_of[merged.base], info_of[merged.tokenizer_model]
    if not taken.document:
        return None
    where = Path(taken.path)
    document = merged_tokenizer_json(taken.document, merged, where)
    ids = encode_fingerprint(document, normalized_merges(document["model"]), json.dumps(document).encode(), where)
    base_token = {token_id: token for token, token_id in base.vocab.items()}
    ours = [merged.tokens[i] for i in ids]
    theirs = [base_token[i] for i in base.fingerprint_ids]
    if ours == theirs:
        return None
    literal = {t.content for t in base.added_tokens}
    text, old, new = first_split_difference(theirs, ours, base, literal, literal | set(merged.appended))
    return (
        f"the merged tokenizer splits text unlike the base's: {text!r} becomes {'|'.join(map(escape_text, new))} "
        f"(the base: {'|'.join(map(escape_text, old))}); models trained on the base's splits see new ones"
    )


def first_split_difference(
    old: Sequence[str], new: Sequence[str], info: TokenizerInfo, old_literal: set[str], new_literal: set[str]
) -> tuple[str, list[str], list[str]]:
    """(the text, its pieces in `old`, in `new`) of the first stretch two encodings of one
    text split differently: from the first differing token to the next boundary both share.
    Tokens in `*_literal` (added tokens) stand for their content, the others for their bytes."""

    def spans(tokens: Sequence[str], literal: set[str]) -> list[tuple[int, int, bytes, str]]:
        position, out = 0, []
        for token in tokens:
            data = token.encode() if token in literal else token_bytes(token, info.convention, info.byte_fallback)
            out.append((position, position + len(data), data, token))
            position += len(data)
        return out

    a, b = spans(old, old_literal), spans(new, new_literal)
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x[3] != y[3]), min(len(a), len(b)))
    start = a[first][0] if first < len(a) else b[first][0] if first < len(b) else 0
    shared = {span[1] for span in a} & {span[1] for span in b}
    text = b"".join(span[2] for span in a)
    end = min((e for e in shared if e > start), default=max(a[-1][1] if a else 0, b[-1][1] if b else 0))
    word = max((e for e in shared | {0} if e <= start and (e == 0 or text[e : e + 1].isspace() or text[e - 1 : e].isspace())), default=0)
    start = word if start - word <= 40 else start  # from the start of the word it is in
    old_pieces = [span for span in a if start <= span[0] < end]
    text = b"".join(span[2] for span in old_pieces).decode("utf-8", "replace")
    return text, [span[3] for span in old_pieces], [span[3] for span in b if start <= span[0] < end]


def refuse_configuration(args: argparse.Namespace, problems: Sequence[str]) -> int:
    """A configuration mergekit refuses, found from the YAML alone: the merge check fails
    before any model is read or downloaded (exit 1)."""
    if args.json:
        report = {"schema": JSON_SCHEMA_ID, "equal": False, "exit_code": 1, "strict": args.strict, "weights": args.weights}
        report |= {"reference": None, "comparisons": [], "merge": {"status": "fail", "problems": list(problems)}}
        sys.stdout.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    else:
        lines = [f"merge  FAIL {problem}" for problem in problems]
        lines.append(f"verdict  do not merge: mergekit refuses {args.mergekit_config} (no model was read)")
        sys.stdout.write("\n".join(lines) + "\n")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(build_parser(), argv)
    if isinstance(args, int):
        return args
    return run_guarded(args, run, stopped=str, cleanup=lambda: None)


if __name__ == "__main__":
    raise SystemExit(main())
