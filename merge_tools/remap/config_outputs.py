"""Config outputs: vocab_size and every token id of config.json and generation_config.json;
M's other files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_tools.common.errors import CliError
from merge_tools.common.sources import CONFIG_FILES, TOKENIZER_FILES
from merge_tools.common.strict_json import is_int
from merge_tools.remap.checkpoints import config_value

if TYPE_CHECKING:
    from merge_tools.remap.plan import RemapPlan
    from merge_tools.remap.tokenizers_in import TokenizerSource


REPORT_NAME = "remap_report.json"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx", ".npz", ".pkl", ".ot")


def role_ids(roles: Mapping[str, str | None], vocab: Mapping[str, int]) -> dict[str, int | None]:
    return {role: vocab.get(token) if token is not None else None for role, token in roles.items()}


def as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def output_role_ids(
    base_roles: Mapping[str, str | None],
    base_vocab: Mapping[str, int],
    base_config: Mapping[str, Any],
    base_generation: Mapping[str, Any],
    src_eos_tokens: Sequence[str],
    plan: RemapPlan,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """bos/eos/pad ids for the output's config.json and generation_config.json: T's ids
    (from its configs, else its tokenizer). In append mode generation also stops at the
    source's eos tokens, which keep their rows at appended ids."""
    from_tokenizer = role_ids(base_roles, base_vocab)
    config_ids: dict[str, Any] = {}
    for role in ("bos", "eos", "pad"):
        value = base_config.get(f"{role}_token_id", (base_config.get("text_config") or {}).get(f"{role}_token_id"))
        config_ids[role] = value if as_id_list(value) and all(i < plan.n_rows for i in as_id_list(value)) else from_tokenizer.get(role)
    generation_ids = dict(config_ids)
    for role in ("bos", "eos", "pad"):
        value = base_generation.get(f"{role}_token_id")
        if as_id_list(value) and all(i < plan.n_rows for i in as_id_list(value)):
            generation_ids[role] = value
    if plan.mode == "append":
        eos = as_id_list(generation_ids["eos"])
        extra = [plan.out_vocab[t] for t in src_eos_tokens if t in plan.out_vocab and plan.out_vocab[t] not in eos]
        if extra:
            generation_ids["eos"] = eos + extra
    return config_ids, generation_ids


CONFIG_SECTIONS = ("text_config", "vision_config", "audio_config")  # sub-configs of multimodal models


TOKEN_ID_KEY_RE = re.compile(r"_token_(ids?|index|indices)$")


ROLE_ID_KEYS = frozenset(f"{role}_token_id" for role in ("bos", "eos", "pad"))  # T's, by role (output_role_ids)


# Ids of a role rather than of a content token: when M's token is dropped, T's id for the role
# (T's config, else its tokenizer), else none; never a refusal.
ROLE_LIKE_KEYS = frozenset(f"{role}_token_id" for role in ("unk", "mask", "sep", "cls", "decoder_start"))


def config_sections(config: Mapping[str, Any]) -> list[tuple[str | None, Mapping[str, Any]]]:
    """(None, the config) and its multimodal sub-configs."""
    return [(None, config), *((name, config[name]) for name in CONFIG_SECTIONS if isinstance(config.get(name), Mapping))]


def config_token_ids(
    config: Mapping[str, Any], plan: RemapPlan, src_token_of_id: Mapping[int, str], base: TokenizerSource | None = None
) -> dict[tuple[str | None, str], Any]:
    """Every config key that holds token ids of M (`image_token_index`, `video_token_id`,
    `boi_token_index`, `vision_start_token_id`, ...: *_token_id(s) / *_token_index, at the
    top and in text_config / vision_config / audio_config) -> its value in the output: each
    id follows its token. bos/eos/pad are T's (output_role_ids). A token the output has no
    row for (dropped) is an error: the model would point at another token; for a role
    (unk_token_id, mask_token_id, ...: ROLE_LIKE_KEYS) T's id takes its place."""
    out_of_src = {src: out for out, src in enumerate(plan.row_source) if src >= 0 and plan.row_rule[out] in ("copied", "moved", "appended")}
    remapped: dict[tuple[str | None, str], Any] = {}
    for section, values in config_sections(config):
        for key, value in values.items():
            if not TOKEN_ID_KEY_RE.search(key) or key in ROLE_ID_KEYS or value is None:
                continue
            ids = value if isinstance(value, list) else [value]
            if not all(is_int(i) for i in ids):
                continue
            new = []
            for token_id in ids:
                if token_id < 0 or token_id not in out_of_src and token_id >= plan.src_rows:
                    new.append(token_id)  # -1 and other sentinels
                elif token_id in out_of_src:
                    new.append(out_of_src[token_id])
                elif key in ROLE_LIKE_KEYS:
                    new.append(base_role_id(base, key) if base is not None else None)
                else:
                    where = f"{section}.{key}" if section else key
                    token = src_token_of_id.get(token_id, f"<row {token_id}>")
                    raise CliError(
                        f"config.json {where} is {token_id} ({token!r}), a token the output drops"
                        + (": run without --drop-extra to keep it" if plan.mode == "drop" else "")
                    )
            remapped[(section, key)] = new if isinstance(value, list) else new[0]
    return remapped


def base_role_id(base: TokenizerSource, key: str) -> int | None:
    """T's id for a role key (`unk_token_id`): its config's, else its tokenizer's token of that role."""
    value = config_value(base.config, key)
    if is_int(value):
        return value
    token = base.spec.roles.get(key.removesuffix("_token_id"))
    return base.spec.vocab.get(token) if token is not None else None


def patch_config(
    config: Mapping[str, Any],
    vocab_size: int,
    ids: Mapping[str, Any],
    token_ids: Mapping[tuple[str | None, str], Any] | None = None,
    untied: bool = False,
) -> dict[str, Any]:
    """M's config with the new vocab_size (wherever it appears), role ids and token ids
    (config_token_ids), and tie_word_embeddings false wherever it is set (and at the top)
    when a tied model got its own lm_head; everything else unchanged. Multimodal configs
    keep the text model's values under text_config."""
    data = json.loads(json.dumps(config))
    sections = {name: values for name, values in config_sections(data)}
    if untied:
        data["tie_word_embeddings"] = False
        for values in sections.values():
            if "tie_word_embeddings" in values:
                values["tie_word_embeddings"] = False
    holders = [values for values in sections.values() if "vocab_size" in values]
    for values in holders or [sections.get("text_config", data)]:
        values["vocab_size"] = vocab_size
    target = data["text_config"] if isinstance(data.get("text_config"), dict) and "vocab_size" not in data else data
    for role, value in ids.items():
        key = f"{role}_token_id"
        if value is not None or key in target:
            target[key] = value
    for (section, key), value in (token_ids or {}).items():
        sections[section][key] = value
    return data


def patch_generation_config(config: Mapping[str, Any], ids: Mapping[str, Any]) -> dict[str, Any]:
    data = dict(config)
    for role, value in ids.items():
        key = f"{role}_token_id"
        if value is not None or key in data:
            data[key] = value
    return data


def copy_other_files(src_dir: Path, out: Path) -> list[str]:
    """M's files that are neither weights, configs nor tokenizer files (README, LICENSE,
    ...). Only the top level: subdirectories such as `original/` hold other formats."""
    copied = []
    for path in sorted(src_dir.iterdir()):
        name = path.name
        if (
            not path.is_file()
            or name.startswith(".")
            or name.endswith(WEIGHT_SUFFIXES)
            or name.endswith(".index.json")
            or name in TOKENIZER_FILES
            or name in CONFIG_FILES
            or name == REPORT_NAME
        ):
            continue
        shutil.copyfile(path, out / name)
        copied.append(name)
    return copied


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
