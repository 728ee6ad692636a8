"""Models as an alignment sees them: vocabulary, rows, headers; and what identifies what a
remap read."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from merge_tools.common.merge_check import ModelFacts
from merge_tools.common.sources import select_weight_files
from merge_tools.common.strict_json import is_int
from merge_tools.common.tokenizer_merge import ModelVocab
from merge_tools.remap.checkpoints import config_value, find_vocab_tensors, read_checkpoint, resolve_model
from merge_tools.remap.tokenizers_in import read_tokenizer


@dataclass(frozen=True)
class ModelView:
    """A model (or tokenizer) as the alignment sees it: its vocabulary and row count."""

    source: str
    revision: str | None
    directory: Path
    vocab: Mapping[str, int]
    rows: int
    weight_bytes: int
    hidden: int | None = None
    facts: ModelFacts | None = None  # config and tensor headers, for the merge check
    added: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)  # added tokens -> flags
    head_name: str | None = None  # the output embedding (None: tied, or no weights)
    vocab_shard_bytes: int = 0  # the bytes of the shards that hold a vocabulary tensor (what a linked alignment writes)

    def bytes_to_write(self, link: bool) -> int:
        return self.vocab_shard_bytes if link else self.weight_bytes

    def merge_vocab(self, name: str, merged: bool = True) -> ModelVocab:
        """The model as the tokenizer merge reads it: the rows mergekit takes as held are
        config.json's vocab_size where that is below the embedding's."""
        config_rows = config_value(self.facts.config, "vocab_size") if self.facts is not None else None
        if merged and is_int(config_rows) and 0 <= config_rows < self.rows:
            return ModelVocab(name, self.vocab, self.added, config_rows, embedding_rows=self.rows)
        return ModelVocab(name, self.vocab, self.added, self.rows if merged else len(self.vocab), merged)


def view_model(source: str, revision: str | None, trust_remote_code: bool) -> ModelView:
    directory = resolve_model(source, revision)
    tokenizer = read_tokenizer(directory)
    config = tokenizer.config
    if directory.is_dir() and select_weight_files(p.name for p in directory.iterdir() if p.is_file())[0] != "none":
        ckpt = read_checkpoint(directory)
        vocab = find_vocab_tensors(ckpt, config, embed_name=None, head_name=None, trust_remote_code=trust_remote_code)
        facts = ModelFacts(config, {name: (t.dtype, t.shape) for name, t in ckpt.tensors.items()})
        weight_bytes = sum(t.nbytes for t in ckpt.tensors.values())
        names = {vocab.embed, vocab.head, vocab.bias, *vocab.extra}
        shards = {t.file for name, t in ckpt.tensors.items() if name in names}
        vocab_shard_bytes = sum(t.nbytes for t in ckpt.tensors.values() if t.file in shards) if ckpt.kind == "safetensors" else weight_bytes
        return ModelView(
            source, revision, directory, tokenizer.spec.vocab, vocab.rows, weight_bytes, vocab.hidden, facts, tokenizer.spec.added,
            vocab.head, vocab_shard_bytes,
        )  # fmt: skip
    rows = config_value(config, "vocab_size")
    rows = rows if isinstance(rows, int) else len(tokenizer.spec.vocab)
    return ModelView(source, revision, directory, tokenizer.spec.vocab, rows, 0, added=tokenizer.spec.added)


def directory_fingerprint(path: Path) -> str:
    """What a remap read from a model or tokenizer folder, in one hash: the folder (a Hub
    snapshot's is named by its commit), every file's name, size and mtime (symlinks
    followed, as the Hub cache links into blobs/), and every safetensors header. An
    alignment reuses an earlier remap only when this is unchanged."""
    directory = path if path.is_dir() else path.parent
    digest = hashlib.sha256(str(directory.resolve()).encode())
    for file in sorted(p for p in directory.iterdir() if p.is_file()):
        stat = file.stat()
        digest.update(f"\0{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        if file.suffix == ".safetensors" and stat.st_size >= 8:
            with file.open("rb") as handle:
                digest.update(handle.read(8 + min(int.from_bytes(handle.read(8), "little"), stat.st_size)))
    return digest.hexdigest()
