"""The plan: where every output row comes from (pure)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from merge_tools.common.spellings import token_bytes
from merge_tools.common.tokenizer_merge import round_up
from merge_tools.remap.matching import LIST_CAP
from merge_tools.remap.tokenizers_in import spell_bytes

if TYPE_CHECKING:
    from merge_tools.remap.matching import Matches
    from merge_tools.remap.tokenizers_in import VocabSpec


INIT_METHODS = ("auto", "fvt", "mean", "unk", "zero", "donor", "omp")


# Row sources in RemapPlan.row_source: >= 0 copies that source row.
MEAN_ROW, ZERO_ROW, FVT_ROW, DONOR_ROW, OMP_ROW, CALIBRATED_ROW = -1, -2, -3, -4, -5, -6
GIVEN_ROWS = (DONOR_ROW, OMP_ROW, CALIBRATED_ROW)  # rows computed before the shards are written


@dataclass(frozen=True)
class RemapPlan:
    """Where every output row comes from.

    row_source[i] >= 0 copies source row row_source[i] bit for bit; MEAN_ROW, ZERO_ROW
    and FVT_ROW (the mean of the source rows fvt_parts[i]) are initialised rows; DONOR_ROW
    copies the donor's row donor_rows[i], OMP_ROW combines M's rows as OMP expresses the
    donor's row donor_rows[i] in the donor's rows of shared tokens, CALIBRATED_ROW (init
    auto) blends the FVT row of fvt_parts[i] with that OMP row as the calibration decides.
    row_rule[i] says why (copied, moved, appended, role:eos, fvt, mean, unk, zero, donor,
    omp, auto, *_fallback_*, padding).
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

    def initialised_tokens(self) -> list[tuple[int, str]]:
        """(output id, token) of every token whose row is not M's own, by id."""
        kept = ("copied", "moved", "appended")
        rows = {out_id for out_id, rule in enumerate(self.row_rule) if rule not in kept}
        return sorted((out_id, token) for token, out_id in self.out_vocab.items() if out_id in rows)

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
            for out_id, token in self.initialised_tokens()
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
    if (
        base_id in context.unreachable
        and init in ("fvt", "omp", "donor", "auto")
        and not (init == "donor" and token in context.donor_of_token)
    ):
        rows.add(MEAN_ROW, "unreachable")
    elif init == "auto" and token in context.donor_of_token:
        row = rows.add(CALIBRATED_ROW, "auto")
        rows.donor_rows[row] = context.donor_of_token[token]
        parts = fvt_parts(token, special, context)
        if parts:
            rows.fvt_parts[row] = parts
    elif init == "zero":
        rows.add(ZERO_ROW, "zero")
    elif init == "unk" and src_unk is not None and src_unk < context.src_rows:
        rows.add(src_unk, "unk")
    elif init in ("donor", "omp") and token in context.donor_of_token:
        rows.donor_rows[rows.add(DONOR_ROW if init == "donor" else OMP_ROW, init)] = context.donor_of_token[token]
    else:
        parts = fvt_parts(token, special, context)
        if init in ("fvt", "donor", "omp", "auto") and parts:
            rows.fvt_parts[rows.add(FVT_ROW, "fvt" if init == "fvt" else f"{init}_fallback_fvt")] = parts
        elif init in ("donor", "omp", "auto"):
            rows.add(MEAN_ROW, f"{init}_fallback_mean")
        elif init == "fvt" and not special:
            rows.add(MEAN_ROW, "fvt_fallback_mean")
        else:
            rows.add(MEAN_ROW, "mean" if init in ("mean", "fvt") else "unk_fallback_mean")


def fvt_parts(token: str, special: bool, context: InitContext) -> tuple[int, ...]:
    """M's rows whose mean is the FVT row of a token M lacks (none for a special token)."""
    if special:
        return ()
    return tuple(i for i in context.decompositions.get(token, ()) if i < context.src_rows and i != context.src_unk)


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
