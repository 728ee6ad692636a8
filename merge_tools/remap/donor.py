"""The donor: rows of a model that has the tokens (--init donor / omp), local or over HTTP."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from merge_tools.common.errors import CliError
from merge_tools.common.safetensors_files import check_safetensors_header
from merge_tools.common.sources import (
    CONFIG_FILES,
    TOKENIZER_FILES,
    hub_failure,
    looks_like_hub_id,
    resolve_source,
    select_weight_files,
    split_revision,
)
from merge_tools.remap.checkpoints import Checkpoint, TensorEntry, find_vocab_tensors, read_checkpoint, read_matrix
from merge_tools.remap.matching import effective_match_mode, match_tokens
from merge_tools.remap.omp import omp_coefficients
from merge_tools.remap.progress import progress_bar
from merge_tools.remap.row_math import combine_rows, decode_rows, encode_rows, mean_of_rows
from merge_tools.remap.tokenizers_in import read_tokenizer

if TYPE_CHECKING:
    from merge_tools.remap.checkpoints import VocabTensors
    from merge_tools.remap.options import RemapOptions
    from merge_tools.remap.plan import RemapPlan
    from merge_tools.remap.tokenizers_in import VocabSpec


@dataclass(frozen=True)
class Donor:
    """D's tokenizer and vocabulary tensors, read from safetensors headers; rows are read
    on demand (memory-mapped pages locally, HTTP range requests for a Hub repo)."""

    source: str
    spec: VocabSpec
    ckpt: Checkpoint
    vocab: VocabTensors
    remote: tuple[str, str | None] | None = None  # (repo id, revision) when read over HTTP

    def tensor(self, role: str) -> TensorEntry | None:
        name = {"embed": self.vocab.embed, "head": self.vocab.head or self.vocab.embed, "bias": self.vocab.bias}[role]
        return self.ckpt.tensors[name] if name is not None else None

    def read_rows(self, role: str, ids: np.ndarray) -> np.ndarray:
        """Raw rows `ids` of one vocabulary tensor, (len(ids), row_bytes) uint8."""
        tensor = self.tensor(role)
        assert tensor is not None
        if self.remote is None:
            return np.ascontiguousarray(read_matrix(self.ckpt, tensor)[ids])
        return hub_tensor_rows(*self.remote, tensor, ids)


def read_donor(source: str, revision: str | None, trust_remote_code: bool, required: bool = True) -> Donor | None:
    """A local model directory, or a Hub repo of which only the tokenizer files and configs
    are downloaded (the headers and rows come by HTTP range requests). None when it has no
    weights and `required` is False (--init auto: then there is no donor)."""
    if Path(source).expanduser().exists() or not looks_like_hub_id(source):
        directory = resolve_source(source, revision, [])
        if not directory.is_dir():
            raise CliError(f"--donor-model {source}: expected a model directory or repo id, got a file")
        tokenizer = read_tokenizer(directory)
        if select_weight_files(p.name for p in directory.iterdir() if p.is_file())[0] == "none":
            if not required:
                return None
            raise CliError(f"{directory}: no weights to take rows from; name a model with weights (--donor-model D) or use --init fvt")
        ckpt, remote = read_checkpoint(directory), None
    else:
        directory = resolve_source(source, revision, [*TOKENIZER_FILES, *CONFIG_FILES])
        tokenizer = read_tokenizer(directory)
        found = hub_checkpoint(source, revision, directory, required)
        if found is None:
            return None
        ckpt, remote = found, (source, revision)
    vocab = find_vocab_tensors(ckpt, tokenizer.config, embed_name=None, head_name=None, trust_remote_code=trust_remote_code)
    return Donor(source, tokenizer.spec, ckpt, vocab, remote)


def hub_checkpoint(repo_id: str, revision: str | None, directory: Path, required: bool = True) -> Checkpoint | None:
    """A Hub repo's tensors from its safetensors headers (start: offset in the data part);
    None for a repo without safetensors weights when they are not `required`."""
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import NotASafetensorsRepoError

    try:
        metadata = get_safetensors_metadata(repo_id, revision=revision)
    except NotASafetensorsRepoError as exc:
        if not required:
            return None
        raise CliError(
            f"{repo_id}: no safetensors weights to take rows from; name a model with weights (--donor-model D) or use --init fvt"
        ) from exc
    except Exception as exc:  # HTTP, offline, parsing
        raise CliError(hub_failure(repo_id, revision, exc)) from exc
    tensors: dict[str, TensorEntry] = {}
    for file, info in metadata.files_metadata.items():
        header = {
            name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)} for name, t in info.tensors.items()
        }
        for name, entry in check_safetensors_header(header, None, f"{repo_id}/{file}").items():
            start, end = entry["data_offsets"]
            tensors[name] = TensorEntry(name, entry["dtype"], tuple(entry["shape"]), end - start, Path(file), start)
    return Checkpoint(directory, "remote", tensors)


def hub_get_range(repo_id: str, revision: str | None, file: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file of a Hub repo, by an HTTP range request (the way
    huggingface_hub reads safetensors headers; HF_TOKEN and HF_ENDPOINT apply)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    try:
        response = get_session().get(
            hf_hub_url(repo_id, file, revision=revision), headers={**build_hf_headers(), "Range": f"bytes={start}-{end - 1}"}
        )
        hf_raise_for_status(response)
    except Exception as exc:  # HTTP and connection errors alike
        raise CliError(hub_failure(f"{repo_id}/{file}", revision, exc)) from exc
    data = response.content if response.status_code == 206 else response.content[start:end]
    if len(data) != end - start:
        raise CliError(f"{repo_id}/{file}: the Hub sent {len(data)} bytes for a range of {end - start}; try again")
    return data


@functools.cache
def hub_data_start(repo_id: str, revision: str | None, file: str) -> int:
    return 8 + int.from_bytes(hub_get_range(repo_id, revision, file, 0, 8), "little")


def hub_tensor_rows(repo_id: str, revision: str | None, tensor: TensorEntry, ids: np.ndarray) -> np.ndarray:
    """Rows of a remote tensor; nearby rows share one request (spans of at most 64 MB)."""
    rows = tensor.shape[0] if tensor.shape else 1
    row_bytes = tensor.nbytes // max(1, rows)
    base = hub_data_start(repo_id, revision, str(tensor.file)) + tensor.start
    out = np.empty((len(ids), row_bytes), dtype=np.uint8)
    order = np.argsort(ids, kind="stable")
    span_rows = max(1, 64 * 10**6 // max(1, row_bytes))
    position = 0
    while position < len(order):
        first = int(ids[order[position]])
        end = position
        while end < len(order) and int(ids[order[end]]) < first + span_rows:
            end += 1
        last = int(ids[order[end - 1]])
        data = np.frombuffer(
            hub_get_range(repo_id, revision, str(tensor.file), base + first * row_bytes, base + (last + 1) * row_bytes), dtype=np.uint8
        )
        out[order[position:end]] = data.reshape(-1, row_bytes)[ids[order[position:end]] - first]
        position = end
    return out


def donor_tokens(base: VocabSpec, donor: Donor, match: str, base_unreachable: frozenset[int] = frozenset()) -> dict[str, int]:
    """T's tokens -> the donor's rows (matched as --match says; rows the donor has)."""
    matches = match_tokens(base, donor.spec, effective_match_mode(match, base, donor.spec), base_unreachable)
    token_of_base = {token_id: token for token, token_id in base.vocab.items()}
    return {token_of_base[base_id]: donor_id for base_id, donor_id in matches.src_of_base.items() if donor_id < donor.vocab.rows}


def read_donor_for(opts: RemapOptions, vocab: VocabTensors) -> Donor | None:
    """D for --init donor / omp / auto: --donor-model, else T itself (which then needs
    weights, but for auto: None when T has none)."""
    if opts.donor_model is not None:
        name, revision = split_revision(opts.donor_model)
    else:
        name, revision = opts.base_tokenizer, opts.base_revision
    donor = read_donor(name, revision, opts.trust_remote_code, required=opts.init != "auto" or opts.donor_model is not None)
    if donor is not None and opts.init == "donor" and donor.vocab.hidden != vocab.hidden:
        raise CliError(f"the donor's hidden size is {donor.vocab.hidden}, M's is {vocab.hidden}: use --init omp")
    return donor


def initialised_rows(
    plan: RemapPlan,
    ckpt: Checkpoint,
    vocab: VocabTensors,
    src: VocabSpec,
    donor: Donor,
    opts: RemapOptions,
    unreachable: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset()),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """role -> (output rows, their raw bytes) for the rows the donor fills: its own rows
    (donor), or M's rows of shared tokens combined by OMP's coefficients (omp). The atoms
    are the tokens M and the donor share, but none that the donor's or M's tokenizer never
    produces (`unreachable`: the donor's ids, when the donor is T, and M's): their rows were
    hardly trained."""
    out_rows = np.array(sorted(plan.donor_rows), dtype=np.int64)
    if not len(out_rows):
        return {}
    donor_ids = np.array([plan.donor_rows[int(r)] for r in out_rows], dtype=np.int64)
    result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if plan.init == "donor":
        for role in ("embed", "head", "bias"):
            name = getattr(vocab, role)
            if name is not None:
                result[role] = (out_rows, donor_row_bytes(donor, role, donor_ids, ckpt.tensors[name], ckpt))
        return result
    shared = match_tokens(donor.spec, src, effective_match_mode(opts.match, donor.spec, src), *unreachable).src_of_base
    pairs = np.array(sorted((d, m) for d, m in shared.items() if d < donor.vocab.rows and m < vocab.rows), dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        raise CliError(f"--init omp: the donor {donor.source} and the model share no tokens to combine")
    head_rows, head_coefficients = None, None
    for role in ("embed", "head"):
        name = getattr(vocab, role)
        if name is None:
            continue
        tensor, donor_tensor = ckpt.tensors[name], donor.tensor(role)
        assert donor_tensor is not None
        atoms = decode_rows(donor.read_rows(role, pairs[:, 0]), donor_tensor.dtype)
        targets = decode_rows(donor.read_rows(role, donor_ids), donor_tensor.dtype)
        progress = progress_bar(len(targets), opts.show_progress, f"OMP {role}", unit="rows")
        try:
            indices, coefficients = omp_coefficients(targets, atoms, opts.omp_k, progress=progress.update)
        finally:
            progress.close()
        m_rows = pairs[:, 1][indices.numpy()]
        result[role] = (out_rows, combine_rows(read_matrix(ckpt, tensor), tensor.dtype, m_rows, coefficients))
        if role == "head" or vocab.head is None:
            head_rows, head_coefficients = m_rows, coefficients
    if vocab.bias is not None and head_rows is not None:
        bias = ckpt.tensors[vocab.bias]
        result["bias"] = (out_rows, combine_rows(read_matrix(ckpt, bias), bias.dtype, head_rows, head_coefficients))
    return result


def donor_row_bytes(donor: Donor, role: str, donor_ids: np.ndarray, tensor: TensorEntry, ckpt: Checkpoint) -> np.ndarray:
    """The donor's rows for one of M's vocabulary tensors: bit for bit in the same dtype,
    else converted; a bias the donor lacks is M's mean bias."""
    donor_tensor = donor.tensor(role)
    if donor_tensor is None:  # M has an output bias, D has none
        matrix = read_matrix(ckpt, tensor)
        mean = encode_rows(mean_of_rows(matrix, tensor.dtype, np.arange(len(matrix)))[None, :], tensor.dtype)
        return np.repeat(mean, len(donor_ids), axis=0)
    raw = donor.read_rows(role, donor_ids)
    return raw if donor_tensor.dtype == tensor.dtype else encode_rows(decode_rows(raw, donor_tensor.dtype), tensor.dtype)
