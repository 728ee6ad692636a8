"""Tokenizers in: reading and validating, token texts and spellings, what a tokenizer
produces, FVT decompositions."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from merge_tools.common.errors import STOP_SIGNALS, CliError, Interrupted, SignalState
from merge_tools.common.sources import CONFIG_FILES, TOKENIZER_FILES
from merge_tools.common.spellings import BYTE_FALLBACK_TOKENS, bpe_model_for_words, bytes_to_unicode, merge_results, token_bytes
from merge_tools.common.strict_json import parse_json, read_optional_json
from merge_tools.common.tokenizer_files import (
    ADDED_TOKEN_FLAGS,
    check_special_tokens,
    detect_convention,
    read_special_tokens,
    read_vocabulary,
    tokenizer_json_via_transformers,
    tokenizers_library,
)

FVT_PRUNE_MAX_SUBSTRINGS = (
    300_000  # sum of len(text)**2 over the FVT texts past which listing their substrings costs more than building the whole BPE
)


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


def check_base_tokenizer(base: TokenizerSource, candidates: Sequence[str]) -> frozenset[int]:
    """Build T with the tokenizers library (proof that transformers can load the files that
    are written out) and, on the same build, find which of `candidates` it never produces
    (unreachable_tokens). Run in a forked worker while M's side is worked out."""
    from tokenizers import Tokenizer

    return unreachable_tokens(base, candidates, tokenizers_library(base.directory, Tokenizer.from_str, base.text))


class BaseTokenizerCheck:
    """check_base_tokenizer, forked (ForkedCall), once per T and token in a process: an
    alignment remaps many models onto one T, whose tokenizer need be built (0.6 s for a
    128k-token BPE) and whose candidate tokens need be encoded only once. T is the same
    object while its files are unchanged (read_tokenizer_once); the answers are kept with
    it, by token."""

    last: ClassVar[tuple[TokenizerSource, dict[str, bool]] | None] = None  # the last T checked, token -> never produced

    def __init__(self, base: TokenizerSource, candidates: Sequence[str]) -> None:
        self.base, self.candidates = base, candidates
        known = self.last[1] if self.last is not None and self.last[0] is base else None
        self.known = known if known is not None and all(token in known for token in candidates) else None
        self.job = ForkedCall(check_base_tokenizer, base, candidates) if self.known is None else None

    def result(self) -> frozenset[int]:
        vocab = self.base.spec.vocab
        if self.job is None:
            assert self.known is not None
            return frozenset(vocab[token] for token in self.candidates if self.known[token])
        unreachable = self.job.result()
        # the answers of one T at a time: the one an alignment has
        last = self.last if self.last is not None and self.last[0] is self.base else (self.base, {})
        last[1].update((token, vocab.get(token) in unreachable) for token in self.candidates)
        BaseTokenizerCheck.last = last
        return unreachable


def read_tokenizer(path: Path) -> TokenizerSource:
    """Read and validate a tokenizer (the tokenizers library is not needed for that: see
    library_added_token_ids and check_base_tokenizer). An alignment reads each model's
    tokenizer several times (its view, its remap, the target's, the final check): a folder
    whose files have not changed since is read once (a 128k-token tokenizer: 0.2 s)."""
    directory = path.parent if path.is_file() else path
    stamps = []
    for name in (path.name if path.is_file() else "tokenizer.json", *TOKENIZER_FILES, *CONFIG_FILES):
        with contextlib.suppress(OSError):
            stat = (directory / name).stat()
            stamps.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return read_tokenizer_once(path.resolve(), tuple(stamps))


@functools.lru_cache(maxsize=16)
def read_tokenizer_once(path: Path, _stamps: tuple[tuple[str, int, int, int], ...]) -> TokenizerSource:
    """read_tokenizer's work, for a path and the state of its files (the cache key)."""
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

    def ready(self) -> bool:
        """Whether result() would return without waiting for the worker (without a worker:
        True, result() does the work right away)."""
        return self.process is None or self.receiver.poll()

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
