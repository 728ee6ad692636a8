"""A small HTTP server on 127.0.0.1 that speaks the part of the Hugging Face Hub protocol
that huggingface_hub's `snapshot_download`, `hf_hub_download`, `list_repo_files` and
`get_safetensors_metadata` use, so that tests run the real client end to end and the real
cache (`hub/models--org--name/snapshots/<commit>/<file>` symlinks into `blobs/`) is built.

Read off huggingface_hub's `hf_api.py`, `file_download.py`, `_snapshot_download.py`,
`utils/_http.py` and `constants.py` (0.36 with requests, 2.x with httpx):

  GET  /api/models/{repo}[/revision/{rev}]        model info: `sha` (the commit), `siblings`
  GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (`recursive`), one page
  HEAD /{repo}/resolve/{rev}/{path}               X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{path}               the bytes, or a `Range: bytes=a-b` of them (206)

Errors as the Hub signals them (`X-Error-Code`, which hf_raise_for_status maps to its
exception classes): RepoNotFound, RevisionNotFound, EntryNotFound (404), GatedRepo (401
without `Authorization: Bearer <token>`). `fail_with = 500` makes every answer an error.
Every request is logged with the bytes of body it sent, so tests can count what a command
fetched. Repos are folders: each commit is a folder served as that commit's files.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".model", ".msgpack", ".h5")


@dataclass
class Commit:
    sha: str
    folder: Path

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    gated: bool = False

    def commit(self, revision: str) -> Commit | None:
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    body_bytes: int
    range: str | None


def commit_sha(folder: Path, salt: str) -> str:
    digest = hashlib.sha1(salt.encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """Start with `with HubServer() as hub:`; `hub.url` goes into HF_ENDPOINT."""

    def __init__(self, token: str = "hf_test_token") -> None:
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.fail_with: int | None = None
        self.log: list[Request] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def add_commit(self, repo_id: str, folder: Path, *, ref: str | None = "main", gated: bool = False) -> str:
        """Serve `folder` as a commit of `repo_id` (created on first use); `ref` names it."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id))
        repo.gated = repo.gated or gated
        sha = commit_sha(folder, f"{repo_id}:{len(repo.commits)}")
        repo.commits[sha] = Commit(sha, folder)
        if ref is not None:
            repo.refs[ref] = sha
        return sha

    def clear_log(self) -> None:
        with self.lock:
            self.log.clear()

    def fetched(self) -> list[str]:
        """Files sent whole (GET on resolve without a range), in request order."""
        with self.lock:
            return [r.path for r in self.log if r.method == "GET" and "/resolve/" in r.path and r.status == 200]

    def body_bytes(self, suffix: str = "") -> int:
        with self.lock:
            return sum(r.body_bytes for r in self.log if r.path.endswith(suffix))


RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
INFO_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
TREE_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the clients' connection pools expect

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

        def do_HEAD(self) -> None:
            self.route(head=True)

        def do_GET(self) -> None:
            self.route(head=False)

        # -- answers -------------------------------------------------------------------

        def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head: bool = False) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)) if "Content-Length" not in (headers or {}) else headers["Content-Length"])
            self.end_headers()
            sent = 0 if head else len(body)
            if sent:
                self.wfile.write(body)
            with hub.lock:
                hub.log.append(Request(self.command, urlsplit(self.path).path, status, sent, self.headers.get("Range")))

        def error(self, status: int, code: str | None, message: str, *, head: bool) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code is not None:
                headers["X-Error-Code"] = code
            self.send(status, json.dumps({"error": message}).encode(), headers, head=head)

        def json(self, data: Any, *, head: bool) -> None:
            self.send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, head=head)

        # -- routing -------------------------------------------------------------------

        def route(self, *, head: bool) -> None:
            if hub.fail_with is not None:
                return self.error(hub.fail_with, None, "Internal Error - We're working hard to fix this as soon as possible!", head=head)
            url = urlsplit(self.path)
            for pattern, answer in ((RESOLVE_RE, self.resolve), (TREE_RE, self.tree), (INFO_RE, self.info)):
                match = pattern.match(url.path)
                if match:
                    parts = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    repo = hub.repos.get(parts.pop("repo"))
                    if repo is None:
                        return self.error(404, "RepoNotFound", "Repository not found", head=head)
                    commit = repo.commit(parts.pop("rev") or "main")
                    if commit is None:
                        return self.error(404, "RevisionNotFound", "Invalid rev id", head=head)
                    return answer(repo, commit, parts.get("path"), parse_qs(url.query), head=head)
            return self.error(404, None, "Not Found", head=head)

        def authorised(self, repo: Repo) -> bool:
            return not repo.gated or self.headers.get("Authorization") == f"Bearer {hub.token}"

        def info(self, repo: Repo, commit: Commit, _path: str | None, _query: dict[str, list[str]], *, head: bool) -> None:
            self.json(
                {
                    "_id": commit.sha[:24],
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": commit.sha,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "tags": [],
                    "siblings": [{"rfilename": name} for name in commit.files()],
                },
                head=head,
            )

        def tree(self, repo: Repo, commit: Commit, path: str | None, query: dict[str, list[str]], *, head: bool) -> None:
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            prefix = f"{path.strip('/')}/" if path else ""
            entries, folders = [], set()
            for name in commit.files():
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix) :]
                if "/" in rest:
                    folder = prefix + rest.split("/", 1)[0]
                    if folder not in folders:
                        folders.add(folder)
                        entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder})
                    if not recursive:
                        continue
                data = (commit.folder / name).read_bytes()
                entry: dict[str, Any] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": name}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            self.json(entries, head=head)

        def resolve(self, repo: Repo, commit: Commit, path: str | None, _query: dict[str, list[str]], *, head: bool) -> None:
            if not self.authorised(repo):
                return self.error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated.",
                    head=head,
                )
            file = commit.folder / (path or "")
            if not path or ".." in path.split("/") or not file.is_file():
                return self.error(404, "EntryNotFound", "Entry not found", head=head)
            data = file.read_bytes()
            etag = hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else git_blob_id(data)
            headers = {
                "X-Repo-Commit": commit.sha,
                "ETag": f'"{etag}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "") or "")
            if wanted and not head:
                start = int(wanted.group(1))
                end = min(int(wanted.group(2)) if wanted.group(2) else len(data) - 1, len(data) - 1)
                if start >= len(data):
                    return self.send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self.send(206, data[start : end + 1], headers)
            self.send(200, data, headers, head=head)

    return Handler
