"""Tokenizer outputs: the patched tokenizer of append mode, T's files, the chat template."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_tools.common.errors import CliError
from merge_tools.common.logs import log
from merge_tools.common.sources import TOKENIZER_FILES
from merge_tools.common.spellings import token_bytes
from merge_tools.common.strict_json import read_optional_json
from merge_tools.common.tokenizer_files import ADDED_TOKEN_FLAGS, read_chat_template, template_special_tokens
from merge_tools.remap.config_outputs import write_json
from merge_tools.remap.shard_streaming import SelfCheckError

if TYPE_CHECKING:
    from merge_tools.remap.options import RemapOptions
    from merge_tools.remap.plan import RemapPlan
    from merge_tools.remap.tokenizers_in import TokenizerSource, VocabSpec


# Files only a slow (Python) tokenizer reads: in append mode they would disagree with
# the patched tokenizer.json, so they are left out.
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt")


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
