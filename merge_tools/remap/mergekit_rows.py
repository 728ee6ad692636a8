"""The rows mergekit's tokenizer merge fills (init mergekit), from the merge's models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from merge_tools.common.errors import CliError
from merge_tools.common.safetensors_files import DTYPE_SIZES
from merge_tools.remap.checkpoints import read_matrix
from merge_tools.remap.donor import read_donor
from merge_tools.remap.row_math import decode_rows, encode_rows, mean_of_rows

if TYPE_CHECKING:
    from merge_tools.remap.checkpoints import Checkpoint, TensorEntry, VocabTensors
    from merge_tools.remap.donor import Donor
    from merge_tools.remap.options import RemapOptions, RowSources
    from merge_tools.remap.plan import RemapPlan


def mergekit_rows(plan: RemapPlan, ckpt: Checkpoint, vocab: VocabTensors, opts: RemapOptions) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """role -> (output rows, raw bytes) of the rows init mergekit fills from the merge's
    models, as mergekit's PermutedVocabulary computes them: one model's row (bit for bit
    in the same dtype), or the float32 mean of the holders' rows in the merge's order; zero
    when no model holds the token; padding rows the mean of the model's rows over the merged
    vocabulary. The input embedding's rows come from the fills' input rows, lm_head's (and a
    tied model's new lm_head: opts.untie_head) from their output rows. A model that lacks a
    tensor (a bias) is left out."""
    filled = np.array(sorted(plan.donor_rows), dtype=np.int64)
    padding = np.array([row for row, rule in enumerate(plan.row_rule) if rule == "padding"], dtype=np.int64)
    if not len(filled) and not len(padding):
        return {}
    token_of_row = {token_id: token for token, token_id in plan.out_vocab.items()}
    fills = {token: (embed, head) for token, _, embed, head in opts.mergekit_fills}
    keys = dict.fromkeys((s, rev) for embed, head in fills.values() for s, rev, _ in (*embed, *head))  # the merge's order
    models = {key: read_donor(*key, opts.trust_remote_code) for key in keys}
    result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for role, tensor in vocabulary_roles(ckpt, vocab, opts.untie_head):
        wanted = [fills.get(token_of_row[int(r)], ((), ()))[0 if role == "embed" else 1] for r in filled]
        values = filled_row_values(models, role, wanted, tensor, opts.src_model)
        rows, data = filled, encode_rows(values, tensor.dtype)
        if len(padding):
            mean = merged_rows_mean(read_matrix(ckpt, tensor, plan.src_rows), tensor.dtype, plan, filled, values)
            rows = np.concatenate((filled, padding))
            data = np.concatenate((data, np.repeat(encode_rows(mean[None, :], tensor.dtype), len(padding), axis=0)))
        order = np.argsort(rows, kind="stable")
        result[role] = (rows[order], data[order])
    return result


def vocabulary_roles(ckpt: Checkpoint, vocab: VocabTensors, untie_head: str | None) -> list[tuple[str, TensorEntry]]:
    """(role, the source tensor whose dtype and row width the role's output rows take): a
    tied model's new lm_head takes its embedding's."""
    roles = [("embed", ckpt.tensors[vocab.embed])]
    if vocab.head is not None or untie_head is not None:
        roles.append(("head", ckpt.tensors[vocab.head or vocab.embed]))
    if vocab.bias is not None:
        roles.append(("bias", ckpt.tensors[vocab.bias]))
    return roles


def filled_row_values(
    models: Mapping[tuple[str, str | None], Donor], role: str, wanted: Sequence[RowSources], tensor: TensorEntry, where: str
) -> np.ndarray:
    """(rows, width) float32: each filled row the mean of its sources' rows of `role`, summed
    in the merge's order of the models; zero without a source."""
    hidden = (tensor.nbytes // max(1, tensor.shape[0])) // DTYPE_SIZES[tensor.dtype] if len(tensor.shape) > 1 else 1
    total = np.zeros((len(wanted), hidden), dtype=np.float32)
    count = np.zeros(len(wanted), dtype=np.float32)
    for key, donor in models.items():  # the order of the models in the merge: mergekit's order of summation
        if donor.tensor(role) is None:
            continue
        picks = [(k, row) for k, sources in enumerate(wanted) for s, rev, row in sources if (s, rev) == key]
        if not picks:
            continue
        positions, ids = (np.array(column, dtype=np.int64) for column in zip(*picks))
        values = decode_rows(donor.read_rows(role, ids), donor.tensor(role).dtype).reshape(len(ids), -1)
        if values.shape[1] != hidden:
            raise CliError(f"{donor.source}: its {role} rows are {values.shape[1]} wide, {where}'s {hidden}")
        total[positions] += values
        count[positions] += 1
    return total / np.maximum(count, 1)[:, None]


def merged_rows_mean(matrix: np.ndarray, dtype: str, plan: RemapPlan, filled: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The mean of a model's rows over the merged vocabulary (its copied rows and the filled
    ones; zero rows count): mergekit's padding row."""
    tokens = len(plan.out_vocab)
    sources = np.asarray(plan.row_source[:tokens], dtype=np.int64)
    copied = sources[sources >= 0]
    total = values[filled < tokens].sum(axis=0, dtype=np.float64)
    if len(copied):
        total = total + mean_of_rows(matrix, dtype, copied) * len(copied)
    return total / max(1, tokens)
