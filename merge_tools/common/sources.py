"""Sources: local directories and Hub repos (huggingface_hub's cache), and which files hold a
checkpoint."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from merge_tools.common.errors import CliError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


CONFIG_FILES = ("config.json", "generation_config.json")


SAFETENSORS_INDEX = "model.safetensors.index.json"


BIN_INDEX = "pytorch_model.bin.index.json"


HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(source: str) -> bool:
    return bool(HUB_ID_RE.match(source)) and not source.startswith((".", "~")) and not source.endswith(".json")


def split_revision(reference: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`); local paths keep any `@` they contain."""
    if "@" in reference and not os.path.exists(reference):
        path, _, revision = reference.rpartition("@")
        if not path:
            raise CliError(f"{reference!r}: no model name before the @revision")
        return path, revision or None
    return reference, None


def file_in_model_dir(directory: Path, name: str, where: Path) -> Path:
    """`directory/name` for a file name read from a file (a shard named by an index).
    The name is judged, not where it leads: an absolute name, `..` or a subdirectory is
    refused, while a file that is in the directory by name is read wherever its symlink
    points (the Hub cache links every file into `blobs/`; users link shards to other disks)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        raise CliError(f"{where}: names the file {name!r}, which is not a plain file name inside the model directory; refusing to read it")
    return directory / name


def select_weight_files(filenames: Iterable[str]) -> tuple[str, list[str]]:
    """Which files hold a checkpoint's weights: ("safetensors"|"bin", files). Prefers
    safetensors, then the `model*` / `pytorch_model*` naming transformers writes (repos
    often also carry `consolidated.safetensors` or `original/*.pth` copies)."""
    names = sorted(set(filenames))
    top = [n for n in names if "/" not in n]
    for kind, index, pattern in (
        ("safetensors", SAFETENSORS_INDEX, re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")),
        ("safetensors", None, re.compile(r"^(?!consolidated).*\.safetensors$")),
        ("bin", BIN_INDEX, re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")),
    ):
        if index is not None and index in top:
            return kind, [index]
        files = [n for n in top if pattern.match(n)]
        if files:
            return kind, files
    return "none", []


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_failure(where: str, revision: str | None, exc: BaseException) -> str:
    """One line that says why huggingface_hub could not give `where`, and what to do."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    causes = []
    cause: BaseException | None = exc
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    token_hint = "set HF_TOKEN=hf_... or run `hf auth login`"
    for cause in causes:
        if isinstance(cause, GatedRepoError):
            if os.environ.get("HF_TOKEN"):
                return (
                    f"{where}: gated repository, and the token in HF_TOKEN has no access: accept its licence on the Hub with that account"
                )
            return f"{where}: gated repository: accept its licence on the Hub, then pass a token ({token_hint})"
        if isinstance(cause, RevisionNotFoundError):
            return f"{where}: the repository has no revision {revision!r}"
        if isinstance(cause, RepositoryNotFoundError):
            return f"{where}: neither a local directory nor a Hub repository (a private repo needs a token: {token_hint})"
    if hub_offline():
        return (
            f"{where}: not a local directory, and not in the local Hub cache "
            "(HF_HUB_OFFLINE is set): download it once online or pass a local directory"
        )
    for cause in causes:
        response = getattr(cause, "response", None)
        if isinstance(cause, HfHubHTTPError) and response is not None:
            return f"{where}: not in the local Hub cache, and {endpoint} answered HTTP {response.status_code}: try again later"
        if "Connect" in type(cause).__name__ or "Timeout" in type(cause).__name__ or isinstance(cause, ConnectionError):
            return (
                f"{where}: neither a local directory nor a reachable Hub repo "
                f"({endpoint} cannot be reached, and it is not in the local Hub cache)"
            )
    return f"{where}: cannot fetch from the Hub ({type(exc).__name__}: {exc})".splitlines()[0]


def resolve_source(source: str, revision: str | None, allow_patterns: Sequence[str]) -> Path:
    """A local path as is, or the folder of a Hub repo's snapshot in the Hugging Face cache
    holding `allow_patterns` (huggingface_hub honours HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT
    and HF_HOME; mergekit finds the same files there)."""
    if not source:
        raise CliError("an empty model or tokenizer name")
    if len(source) > 1000:
        raise CliError(f"{source[:60]}...: a name of {len(source)} characters is neither a path nor a Hub repo id")
    path = Path(source).expanduser()
    if path.exists():
        if path.suffix.lower() == ".gguf" or (
            path.is_dir() and any(path.glob("*.gguf")) and not any((path / n).is_file() for n in ("config.json", "tokenizer.json"))
        ):
            raise CliError(
                f"{source}: GGUF files are not supported: point at the Hugging "
                "Face model directory or repo id (safetensors, tokenizer.json)"
            )
        return path
    if not looks_like_hub_id(source):
        raise CliError(f"{source}: no such file or directory")
    from huggingface_hub import snapshot_download

    where = f"{source}@{revision}" if revision else source
    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=list(allow_patterns)))
    except Exception as exc:  # huggingface_hub raises HTTP, OS, validation and cache errors
        raise CliError(hub_failure(where, revision, exc)) from exc


def show_hub_progress(show: bool) -> None:
    """huggingface_hub's download bars write to stderr: on a terminal only, never with --json."""
    if show:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
