"""--init auto, measured: the candidate rows (FVT and OMP), the transplanted model run on
the calibration text for every share lambda in one batch (one layer in memory at a time),
bits per byte and the mass on initialised rows for every output scale alpha, the donor's
own (natural) mass; then the rows the choice gives."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from merge_tools.common.logs import log
from merge_tools.common.safetensors_files import DTYPE_SIZES
from merge_tools.remap.body_forward import BodyUnavailable, StreamedBody, empty_body, output_logit_transform
from merge_tools.remap.calibration import (
    FVT_SHARES,
    OUTPUT_SCALES,
    SAME_SPACE_SAMPLE,
    AutoChoice,
    CalibrationPoint,
    bits_per_byte,
    calibration_windows,
    choose_point,
    median_cosine,
)
from merge_tools.remap.calibration_scoring import FixedPart, calibrated_parts, fixed_part, nll_and_mass, torch_rows
from merge_tools.remap.checkpoints import read_matrix
from merge_tools.remap.donor import initialised_rows
from merge_tools.remap.matching import effective_match_mode, match_tokens
from merge_tools.remap.plan import CALIBRATED_ROW
from merge_tools.remap.row_math import build_rows, decode_rows, encode_rows, fvt_average
from merge_tools.remap.shard_streaming import RowContext

if TYPE_CHECKING:
    from merge_tools.remap.checkpoints import Checkpoint, VocabTensors
    from merge_tools.remap.donor import Donor
    from merge_tools.remap.options import RemapOptions
    from merge_tools.remap.plan import RemapPlan
    from merge_tools.remap.tokenizers_in import TokenizerSource


LOGIT_ROW_CHUNK = 16384  # output rows per logits block: (positions x 16k) float32


@dataclass(frozen=True)
class BlendRows:
    """The calibrated rows of one vocabulary tensor (sorted output ids): their FVT rows
    (OMP's where a token has no FVT decomposition) and their OMP rows, float32."""

    rows: np.ndarray
    fvt: np.ndarray
    omp: np.ndarray
    dtype: str

    def given(self, fvt_share: float, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(output rows, their bytes): scale * (share * FVT + (1 - share) * OMP), a block
        of rows at a time (float32: no copy of the whole matrix in float64)."""
        out = np.empty((len(self.rows), self.fvt.shape[1] * DTYPE_SIZES[self.dtype]), dtype=np.uint8)
        fvt_weight, omp_weight = np.float32(fvt_share * scale), np.float32((1 - fvt_share) * scale)
        for start in range(0, len(self.rows), LOGIT_ROW_CHUNK):
            stop = start + LOGIT_ROW_CHUNK
            out[start:stop] = encode_rows(self.fvt[start:stop] * fvt_weight + self.omp[start:stop] * omp_weight, self.dtype)
        return self.rows, out


@dataclass(frozen=True)
class CalibrationInputs:
    """What the measurement reads: M's checkpoint and vocabulary tensors, T's tokenizer,
    the plan and the candidate rows."""

    plan: RemapPlan
    ckpt: Checkpoint
    vocab: VocabTensors
    base: TokenizerSource
    blends: Mapping[str, BlendRows]
    src_real_rows: int  # M's rows that hold a token (the mean row is theirs)
    trust_remote_code: bool
    row_sources: dict[str, RowSource] = field(default_factory=dict)  # filled by row_source_for


def blend_candidates(
    plan: RemapPlan, sources: Callable[[str], RowSource], omp_rows: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, BlendRows]:
    """role -> BlendRows of the plan's calibrated rows, from OMP's rows (initialised_rows)
    and M's rows averaged over each token's FVT parts."""
    blends: dict[str, BlendRows] = {}
    for role, (rows, raw) in omp_rows.items():
        keep = np.array([plan.row_source[int(r)] == CALIBRATED_ROW for r in rows], dtype=bool)
        rows, raw = rows[keep], raw[keep]
        ctx = sources(role).ctx
        omp = decode_rows(raw, ctx.dtype).astype(np.float32)
        fvt = omp.copy()
        with_parts = np.array([int(r) in plan.fvt_parts for r in rows], dtype=bool)
        if with_parts.any():
            parts = [plan.fvt_parts[int(r)] for r in rows[with_parts]]
            offsets = np.concatenate(([0], np.cumsum([len(p) for p in parts]))).astype(np.int64)
            flat = np.fromiter((i for p in parts for i in p), dtype=np.int64, count=int(offsets[-1]))
            averaged = fvt_average(ctx.matrix, ctx.dtype, flat, offsets, ctx.finite, ctx.mean_row)
            fvt[with_parts] = decode_rows(averaged, ctx.dtype)
        blends[role] = BlendRows(rows, fvt, omp, ctx.dtype)
    return blends


def calibrated_rows(
    plan: RemapPlan,
    inputs: Any,
    donor: Donor,
    opts: RemapOptions,
    unreachable: tuple[frozenset[int], frozenset[int]],
    text: str,
    text_source: str,
) -> tuple[AutoChoice, dict[str, tuple[np.ndarray, np.ndarray]], bool]:
    """(the choice, role -> given rows for write_shards, whether a tied M gets an lm_head).
    `inputs`: the remap's RemapInputs."""
    started = time.monotonic()
    omp_rows = initialised_rows(plan, inputs.ckpt, inputs.vocab, inputs.src.spec, donor, opts, unreachable)
    omp_seconds = time.monotonic() - started
    real_rows = min(plan.src_rows, len(inputs.src.spec.vocab))
    sources: dict[str, RowSource] = {}  # M's matrices, each read once for the blends and the forwards

    def source(role: str) -> RowSource:
        return row_source(sources, plan, inputs.ckpt, inputs.vocab, role, real_rows)

    blends = blend_candidates(plan, source, omp_rows)
    calibration = CalibrationInputs(plan, inputs.ckpt, inputs.vocab, inputs.base, blends, real_rows, opts.trust_remote_code, sources)
    tied = inputs.vocab.head is None
    windows, lengths, n_bytes = encode_windows(inputs.base, text)
    text_info = {"source": text_source, "bytes": n_bytes, "tokens": int((lengths - 1).sum()), "windows": len(windows)}
    try:
        points = measure_points(calibration, inputs.src_dir, windows, lengths, n_bytes)
    except BodyUnavailable as exc:
        log.warning("--init auto: cannot run M here (%s): FVT rows, not calibrated", exc)
        choice = AutoChoice(
            "fvt", f"calibration not possible: {exc}", text=text_info, seconds=time.monotonic() - started, omp_seconds=omp_seconds
        )
        return choice, {role: blend.given(1.0) for role, blend in blends.items()}, False
    natural, note = natural_measure(donor, inputs.base, plan, windows, lengths, n_bytes)
    point = choose_point([p for p in points if p.exact])
    choice = AutoChoice(
        "calibrated", "the donor's rows are not in M's space: FVT and OMP rows blended, output rows scaled, as measured",
        point, points[0], natural[1] if natural else None, natural[0] if natural else None, note, tuple(points), text_info,
        time.monotonic() - started, omp_seconds,
    )  # fmt: skip
    return choice, given_rows(blends, point, tied), tied and choice.untie


def given_rows(blends: Mapping[str, BlendRows], point: CalibrationPoint, tied: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The rows written: the blend for the input rows (and bias), scaled for the output
    rows (a tied model's new lm_head: the embedding's blend, scaled)."""
    rows = {role: blend.given(point.fvt_share) for role, blend in blends.items()}
    if point.output_scale != 1.0:
        rows["head"] = blends["embed" if tied else "head"].given(point.fvt_share, point.output_scale)
    return rows


def encode_windows(base: TokenizerSource, text: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The calibration text in T's tokens, cut into windows (calibration_windows)."""
    from tokenizers import Tokenizer

    from merge_tools.common.tokenizer_files import tokenizers_library

    tokenizer = tokenizers_library(base.directory, Tokenizer.from_str, base.text)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    bos_token = base.spec.roles.get("bos")
    windows, lengths = calibration_windows(ids, base.spec.vocab.get(bos_token) if bos_token else None)
    return windows, lengths, len(text.encode())


def measure_points(
    calibration: CalibrationInputs, src_dir: Any, windows: np.ndarray, lengths: np.ndarray, n_bytes: int
) -> list[CalibrationPoint]:
    """The (lambda, alpha) pairs measured on the calibration text. The output side decides
    most and its logits are linear in lambda, so one forward with FVT input rows scores
    every lambda (alpha 1), then every alpha at the best lambda; a second forward with that
    lambda's input rows measures the pair exactly (points with input_share == fvt_share
    are exact: the rows the remap would write)."""
    run = CalibrationRun.open(calibration, src_dir, windows, lengths, n_bytes)
    first = run.forward(1.0)
    points = first.score([(share, 1.0) for share in FVT_SHARES])
    share = min(points, key=lambda p: p.bits_per_byte).fvt_share
    points += first.score([(share, alpha) for alpha in OUTPUT_SCALES if alpha != 1.0])
    guess = choose_point(points)
    if guess.fvt_share != 1.0:
        points += run.forward(guess.fvt_share).score(list(dict.fromkeys([(guess.fvt_share, 1.0), (guess.fvt_share, guess.output_scale)])))
    return points


@dataclass(frozen=True)
class CalibrationRun:
    """M's body and output rows, and the calibration windows, ready for forwards."""

    calibration: CalibrationInputs
    src_dir: Any
    windows: np.ndarray
    lengths: np.ndarray
    n_bytes: int
    body: Any
    prefix: str
    config: Any

    @classmethod
    def open(cls, calibration: CalibrationInputs, src_dir: Any, windows: np.ndarray, lengths: np.ndarray, n_bytes: int) -> CalibrationRun:
        body, prefix, config = empty_body(src_dir, calibration.trust_remote_code)
        return cls(calibration, src_dir, windows, lengths, n_bytes, body, prefix, config)

    def forward(self, share: float) -> ScoredForward:
        """M's states on the windows with the input rows of `share`, and the logits of the
        rows the choice leaves alone."""
        calibration, vocab = self.calibration, self.calibration.vocab
        skip = frozenset(name for name in (vocab.head, vocab.bias, *vocab.extra) if name is not None)
        embed = row_source_for(calibration, "embed")
        used, compact = compact_ids(self.windows, self.lengths)
        streamed = StreamedBody(self.body, self.prefix, calibration.ckpt, vocab.embed, skip)
        try:
            hidden = streamed.last_hidden(compact, torch_rows(embed.rows_at(used, calibration.blends["embed"].given(share))))
        finally:
            streamed.close()
        targets, counted = next_tokens(self.windows, self.lengths)
        states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[counted]
        head_role = "head" if vocab.head is not None else "embed"
        head = row_source_for(calibration, head_role)
        calibrated, initialised = masks(calibration.plan)
        scale, cap = output_logit_transform(self.config)
        # the calibrated rows are left out of these chunks: they need no value here
        fixed = fixed_part(states, targets, head.chunks(None), calibrated, initialised, scale, cap)
        return ScoredForward(self, share, states, targets, fixed, calibration.blends[head_role], ~initialised[targets], scale, cap)


@dataclass(frozen=True)
class ScoredForward:
    """One forward's states, ready to score (lambda, alpha) pairs."""

    run: CalibrationRun
    input_share: float
    states: Any
    targets: np.ndarray
    fixed: FixedPart
    head: BlendRows
    known: np.ndarray
    scale: float
    cap: float | None

    def score(self, combos: Sequence[tuple[float, float]]) -> list[CalibrationPoint]:
        parts = calibrated_parts(self.states, self.targets, self.head.rows, self.head.fvt, self.head.omp, combos, self.scale, self.cap)
        points = []
        for (share, alpha), (lse, picked) in zip(combos, parts):
            nll, mass = nll_and_mass(self.fixed, lse, picked, self.known)
            points.append(CalibrationPoint(share, alpha, bits_per_byte(nll, self.run.n_bytes), mass, self.input_share))
        return points


def compact_ids(windows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the ids the windows use, sorted; the windows in positions into them, padding 0)."""
    used = np.unique(np.concatenate([window[:length] for window, length in zip(windows, lengths)]))
    compact = np.searchsorted(used, windows)
    compact[np.arange(windows.shape[1])[None, :] >= lengths[:, None]] = 0
    return used, compact


@dataclass(frozen=True)
class RowSource:
    """The output rows of one of M's vocabulary tensors as the remap writes them
    (build_rows), for any rows asked, float32."""

    plan: RemapPlan
    ctx: RowContext

    def rows_at(self, ids: np.ndarray, given: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return np.concatenate([decode_rows(self.build(int(i), int(i) + 1, given), self.ctx.dtype) for i in ids]).astype(np.float32)

    def build(self, start: int, stop: int, given: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        ctx = self.ctx
        return build_rows(ctx.matrix, ctx.dtype, self.plan, start, stop, ctx.mean_row, ctx.finite, given)

    def chunks(self, given: tuple[np.ndarray, np.ndarray] | None) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.plan.n_rows, LOGIT_ROW_CHUNK):
            stop = min(self.plan.n_rows, start + LOGIT_ROW_CHUNK)
            yield start, decode_rows(self.build(start, stop, given), self.ctx.dtype).astype(np.float32)


def row_source_for(calibration: CalibrationInputs, role: str) -> RowSource:
    c = calibration
    return row_source(c.row_sources, c.plan, c.ckpt, c.vocab, role, c.src_real_rows)


def row_source(cache: dict[str, RowSource], plan: RemapPlan, ckpt: Checkpoint, vocab: VocabTensors, role: str, real_rows: int) -> RowSource:
    """The rows of M's embed or head as written (one read of each matrix per remap)."""
    if role not in cache:
        tensor = ckpt.tensors[getattr(vocab, role)]
        cache[role] = RowSource(plan, RowContext(read_matrix(ckpt, tensor, plan.src_rows), tensor.dtype, real_rows))
    return cache[role]


def masks(plan: RemapPlan) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated rows, initialised rows: every row not copied from M) over the output."""
    sources = np.asarray(plan.row_source, dtype=np.int64)
    return sources == CALIBRATED_ROW, sources < 0


def next_tokens(windows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the next token at every counted position, which of the windows' positions count)."""
    positions = np.arange(windows.shape[1] - 1)[None, :]
    counted = (positions < (lengths - 1)[:, None]).reshape(-1)
    return windows[:, 1:].reshape(-1)[counted], counted


def natural_measure(
    donor: Donor, base: TokenizerSource, plan: RemapPlan, windows: np.ndarray, lengths: np.ndarray, n_bytes: int
) -> tuple[tuple[float, float] | None, str | None]:
    """((bits per byte, mass) of the donor itself on the same windows and rows, or None,
    why not): the rate at which a model that owns T's tokens uses the ones M lacks."""
    if donor.remote is not None:
        return None, "the donor's weights are not on this machine (its rows were read over HTTP)"
    if dict(donor.spec.vocab) != dict(base.spec.vocab):
        return None, "the donor's vocabulary is not T's"
    embed, head = donor.tensor("embed"), donor.tensor("head")
    assert embed is not None and head is not None
    try:
        body, prefix, config = empty_body(donor.ckpt.directory, False)
        skip = frozenset(name for name in (donor.vocab.head, donor.vocab.bias, *donor.vocab.extra) if name is not None)
        streamed = StreamedBody(body, prefix, donor.ckpt, donor.vocab.embed, skip)
        used, compact = compact_ids(windows, lengths)
        try:
            hidden = streamed.last_hidden(compact, torch_rows(decode_rows(donor.read_rows("embed", used), embed.dtype)))
        finally:
            streamed.close()
    except BodyUnavailable as exc:
        return None, f"cannot run the donor here ({exc})"
    targets, counted = next_tokens(windows, lengths)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[counted]
    rows = donor.vocab.rows
    initialised = np.zeros(rows, dtype=bool)
    sources = np.asarray(plan.row_source[:rows], dtype=np.int64)
    initialised[: len(sources)] = sources < 0
    scale, cap = output_logit_transform(config)
    fixed = fixed_part(states, targets, donor_chunks(donor, rows, head.dtype), np.zeros(rows, dtype=bool), initialised, scale, cap)
    ((lse, picked),) = calibrated_parts(
        states, targets, np.zeros(0, np.int64), np.zeros((0, 1)), np.zeros((0, 1)), [(1.0, 1.0)], scale, cap
    )
    nll, mass = nll_and_mass(fixed, lse, picked, ~initialised[targets])
    return (bits_per_byte(nll, n_bytes), mass), None


def donor_chunks(donor: Donor, rows: int, dtype: str) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, rows, LOGIT_ROW_CHUNK):
        ids = np.arange(start, min(rows, start + LOGIT_ROW_CHUNK))
        yield start, decode_rows(donor.read_rows("head", ids), dtype).astype(np.float32)


def same_space_cosine(donor: Donor, inputs: Any, match: str) -> float:
    """Median cosine between M's and the donor's input rows of the tokens they share (at
    most SAME_SPACE_SAMPLE of them, evenly spread): near 1 for a model and its fine-tunes,
    near 0 across families."""

    shared = match_tokens(donor.spec, inputs.src.spec, effective_match_mode(match, donor.spec, inputs.src.spec)).src_of_base
    pairs = np.array(sorted((d, m) for d, m in shared.items() if d < donor.vocab.rows and m < inputs.vocab.rows), dtype=np.int64)
    if not len(pairs):
        return 0.0
    pairs = pairs[np.linspace(0, len(pairs) - 1, min(len(pairs), SAME_SPACE_SAMPLE)).astype(np.int64)]
    embed = inputs.ckpt.tensors[inputs.vocab.embed]
    mine = decode_rows(read_matrix(inputs.ckpt, embed, inputs.vocab.rows)[pairs[:, 1]], embed.dtype)
    theirs = decode_rows(donor.read_rows("embed", pairs[:, 0]), donor.tensor("embed").dtype)  # type: ignore[union-attr]
    return median_cosine(mine.astype(np.float32), theirs.astype(np.float32))
