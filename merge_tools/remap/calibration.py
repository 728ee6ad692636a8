"""--init auto: which rows a transplant gets, decided by measuring them. With a donor in
M's own space (a model of M's family that has the tokens) its rows; with none, FVT; across
families, each missing token's input row blends its FVT and OMP rows (share lambda of FVT)
and its output row is that row times alpha (alpha < 1 unties a tied model), lambda and
alpha the pair that gives the lowest bits per byte on a calibration text (pure parts)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FVT_SHARES = (1.0, 0.75, 0.5, 0.25, 0.0)  # lambda: the input rows' share of FVT (the rest: OMP)
OUTPUT_SCALES = (1.0, 0.9, 0.8, 0.7, 0.6)  # alpha: the output rows of the blended tokens, scaled
UNTIE_MIN_GAIN = 0.01  # untying doubles the vocabulary's weights: only for 1 % fewer bits per byte
WINDOW_TOKENS = 256
SAME_SPACE_COSINE = 0.5  # median cosine of M's and the donor's rows of shared tokens: above, one space
SAME_SPACE_SAMPLE = 4096


@dataclass(frozen=True)
class CalibrationPoint:
    """One (lambda, alpha) measured on the calibration text: bits per byte, and the mean
    probability on initialised rows where the next token has a trained row (mass)."""

    fvt_share: float
    output_scale: float
    bits_per_byte: float
    mass: float
    input_share: float = 1.0  # the lambda of the input rows the states were computed with

    @property
    def exact(self) -> bool:
        """Measured with the input rows this lambda writes (else an estimate from others)."""
        return self.input_share == self.fvt_share

    def to_dict(self) -> dict[str, float]:
        return {
            "lambda": self.fvt_share,
            "alpha": self.output_scale,
            "input_lambda": self.input_share,
            "bits_per_byte": round(self.bits_per_byte, 4),
            "mass": round(self.mass, 4),
        }


@dataclass(frozen=True)
class AutoChoice:
    """What --init auto chose and what it measured (remap_report.json's init_auto)."""

    chose: str  # fvt | donor | calibrated
    reason: str
    point: CalibrationPoint | None = None  # the chosen pair (calibrated)
    before: CalibrationPoint | None = None  # lambda 1, alpha 1: the rows --init fvt writes
    natural_mass: float | None = None  # the donor's own mass on the same rows and text
    natural_bits_per_byte: float | None = None
    natural_note: str | None = None  # why the natural mass was not measured
    points: tuple[CalibrationPoint, ...] = ()
    text: Mapping[str, Any] = field(default_factory=dict)  # source, bytes, tokens, windows
    seconds: float = 0.0  # the whole choice: OMP rows, forwards, logits
    omp_seconds: float = 0.0

    @property
    def untie(self) -> bool:
        return self.point is not None and self.point.output_scale != 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "chose": self.chose,
            "reason": self.reason,
            "lambda": self.point.fvt_share if self.point else None,
            "alpha": self.point.output_scale if self.point else None,
            "untied": self.untie,
            "natural_mass": rounded(self.natural_mass),
            "natural_bits_per_byte": rounded(self.natural_bits_per_byte),
            "natural_note": self.natural_note,
            "mass_before": rounded(self.before.mass if self.before else None),
            "mass_after": rounded(self.point.mass if self.point else None),
            "bits_per_byte_before": rounded(self.before.bits_per_byte if self.before else None),
            "bits_per_byte_after": rounded(self.point.bits_per_byte if self.point else None),
            "calibration_text": dict(self.text),
            "points": [p.to_dict() for p in self.points],
            "seconds": round(self.seconds, 2),
            "omp_seconds": round(self.omp_seconds, 2),
        }


def rounded(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


def choose_point(points: Sequence[CalibrationPoint], untie_min_gain: float = UNTIE_MIN_GAIN) -> CalibrationPoint:
    """The pair with the lowest bits per byte; but output rows as they are (alpha 1: the
    model stays tied, no weights added) unless scaling them gains `untie_min_gain` of the
    best alpha-1 pair's bits per byte. Ties go to the earlier point (more FVT, less scaling)."""
    best = min(points, key=lambda p: p.bits_per_byte)
    unscaled = [p for p in points if p.output_scale == 1.0]
    if best.output_scale == 1.0 or not unscaled:
        return best
    best_unscaled = min(unscaled, key=lambda p: p.bits_per_byte)
    return best if best.bits_per_byte < best_unscaled.bits_per_byte * (1 - untie_min_gain) else best_unscaled


def calibration_windows(ids: Sequence[int], bos: int | None, window: int = WINDOW_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """The text's token ids cut into windows of `window` tokens, each starting with bos
    when there is one, the last padded with id 0: (ids (windows, window), real lengths).
    Every token is in exactly one window."""
    prefix = [bos] if bos is not None else []
    step = window - len(prefix)
    if step <= 0:
        raise ValueError("window too short")
    pieces = [prefix + list(ids[start : start + step]) for start in range(0, len(ids), step)]
    pieces = [piece for piece in pieces if len(piece) >= 2]
    out = np.zeros((len(pieces), window), dtype=np.int64)
    lengths = np.array([len(piece) for piece in pieces], dtype=np.int64)
    for row, piece in enumerate(pieces):
        out[row, : len(piece)] = piece
    return out, lengths


def auto_method(has_donor: bool, rows_to_initialise: int, same_hidden: bool, cosine: float | None) -> tuple[str, str]:
    """(the init the plan uses, why): fvt without a donor or a row to initialise; the
    donor's own rows when they live in M's space (M and the donor are one family: their
    rows of shared tokens point the same way); else the calibrated blend."""
    if rows_to_initialise == 0:
        return "fvt", "no row to initialise"
    if not has_donor:
        return "fvt", "no donor with weights (T has none; --donor-model names one)"
    if same_hidden and cosine is not None and cosine >= SAME_SPACE_COSINE:
        return "donor", f"the donor's rows are in M's space (median cosine {cosine:.2f} over shared tokens)"
    if same_hidden and cosine is not None:
        return "auto", f"the donor's rows are not in M's space (median cosine {cosine:.2f} over shared tokens)"
    return "auto", "the donor's width differs from M's"


def median_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Median over rows of the cosine between a[i] and b[i] (float rows)."""
    dot = (a * b).sum(axis=1, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    valid = norms > 0
    return float(np.median(dot[valid] / norms[valid])) if valid.any() else 0.0


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / math.log(2) / max(1, n_bytes)
