"""tokenizer.json, tokenizer_config.json and chat templates, read strictly: what the
tokenizers and transformers libraries refuse, both tools refuse."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_tools.common.errors import CliError
from merge_tools.common.strict_json import escape_text, is_int, read_optional_json

if TYPE_CHECKING:
    pass


# What the tokenizers, transformers and safetensors libraries refuse, both tools refuse
# (exit 2 naming the file); what they accept but would read two ways, too.
ADDED_TOKEN_FLAGS = ("special", "normalized", "lstrip", "rstrip", "single_word")


SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


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
