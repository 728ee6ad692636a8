"""Merges that build their tokenizer (tokenizer_source / tokenizer:): the vocabulary audit,
what still fails, what the merged tokenizer changes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_tools.common.errors import CliError
from merge_tools.common.mergekit_config import local_or_hub, parse_model_reference
from merge_tools.common.spellings import token_bytes
from merge_tools.common.strict_json import escape_text, is_int
from merge_tools.common.tokenizer_files import SPECIAL_ROLES, template_special_tokens
from merge_tools.common.tokenizer_merge import (
    PLAIN_FLAGS,
    ModelVocab,
    merged_tokenizer_json,
    named_tokens,
    plan_merged_vocab,
    tokenizer_merge_settings,
    vocabulary_groups,
)
from merge_tools.gate.fingerprint import encode_fingerprint
from merge_tools.gate.reading import normalized_merges, read_tokenizer_infos, resolve_tokenizer

if TYPE_CHECKING:
    from merge_tools.common.mergekit_config import ModelRef
    from merge_tools.common.tokenizer_merge import MergedVocab
    from merge_tools.gate.reading import TokenizerInfo


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
