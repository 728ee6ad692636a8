"""Reading: sources, tokenizer.json, configs, safetensors headers (local or Hub) into
TokenizerInfo."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_tools.common.errors import CliError
from merge_tools.common.logs import log
from merge_tools.common.safetensors_files import check_safetensors_header, read_safetensors_header, read_weight_index
from merge_tools.common.sources import (
    CONFIG_FILES,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    looks_like_hub_id,
    resolve_source,
    select_weight_files,
    split_revision,
)
from merge_tools.common.strict_json import parse_json, read_optional_json
from merge_tools.common.tokenizer_files import (
    ADDED_TOKEN_FLAGS,
    SPECIAL_ROLES,
    check_special_tokens,
    check_tokenizer_json,
    detect_convention,
    read_chat_template,
    read_special_tokens,
    read_vocabulary,
    tokenizer_json_via_transformers,
)
from merge_tools.common.vocab_tensors import INPUT_EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING_SUFFIXES
from merge_tools.gate.fingerprint import encode_fingerprint


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
