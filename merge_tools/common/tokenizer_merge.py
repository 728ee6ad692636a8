"""mergekit's tokenizer merge (tokenizer_source / tokenizer:), decided from the models'
vocabularies alone."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from merge_tools.common.errors import CliError
from merge_tools.common.mergekit_config import parse_model_reference
from merge_tools.common.strict_json import is_int
from merge_tools.common.tokenizer_files import ADDED_TOKEN_FLAGS, vocab_from_json


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
