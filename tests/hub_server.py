"""A local stand-in for the Hugging Face Hub HTTP API, enough for `huggingface_hub.HfApi` to publish model repos.

It speaks the endpoints the real client calls (same paths, payloads and error headers), keeps repositories in memory
with a commit history per branch, and binds to 127.0.0.1 only:

    GET  /api/whoami-v2                                  the token's owner
    POST /api/repos/create                               {name, organization, visibility, type}
    POST /api/validate-yaml                              card metadata check (YAML mapping, list/str types)
    POST /api/models/{repo}/branch/{branch}              {startingPoint?}
    GET  /api/models/{repo}[/revision/{rev}]             model info with siblings (blobId, size, lfs.sha256)
    GET  /api/models/{repo}/commits/{rev}                commit history (newest first)
    POST /api/models/{repo}/preupload/{rev}              upload mode per file (+ remote oid of unchanged files)
    POST /{repo}.git/info/lfs/objects/batch              LFS batch API, "basic" transfer
    PUT  /lfs/{oid}  POST /lfs/verify                    LFS object upload and verification
    POST /api/models/{repo}/commit/{rev}                 ndjson commit: header, file, lfsFile, deletedFile
    GET  /{repo}/resolve/{rev}/{path}                    file download

`SilentServer` is the unlucky case: it accepts TCP connections and never answers a byte.

`fail_with = 500` makes every request answer that status (a server outage), or only those whose path matches the
regular expression `fail_on` when it is set (e.g. `"/commit/"`: uploads succeed, the commit fails); `requests`
records every request's method, path, headers and body so tests can check what went over the wire.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg", ".gguf", ".h5", ".msgpack", ".model")
_REGULAR_MAX = 10 * 1024 * 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, dict]  # path -> {"data": bytes} or {"lfs": oid, "size": int}


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def history(self, branch: str) -> list[Commit]:
        out, oid = [], self.branches.get(branch)
        while oid is not None:
            out.append(self.commits[oid])
            oid = self.commits[oid].parent
        return out


class LocalHub:
    """In-memory Hub; `with LocalHub(token=..., user=...) as hub:` serves it at `hub.endpoint` on 127.0.0.1."""

    def __init__(self, token: str, user: str = "tester"):
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.fail_with: int | None = None
        self.fail_on: str | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ state helpers for tests
    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        return self.repos[repo_id].history(branch)

    def file(self, repo_id: str, path: str, branch: str = "main") -> bytes:
        entry = self.commits(repo_id, branch)[0].files[path]
        return entry["data"] if "data" in entry else self.lfs[entry["lfs"]]

    # ------------------------------------------------------------------ repository operations
    def _commit(self, repo: Repo, branch: str, title: str, description: str, changes: list[tuple[str, dict | None]]):
        head = repo.branches.get(branch)
        files = dict(repo.commits[head].files) if head else {}
        for path, entry in changes:
            if entry is None:
                files.pop(path, None)
            else:
                files[path] = entry
        digest = hashlib.sha1(json.dumps([head, title, time.time_ns(), sorted(files)]).encode()).hexdigest()
        repo.commits[digest] = Commit(digest, head, title, description, files)
        repo.branches[branch] = digest
        return digest


def _make_handler(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        # ---------------------------------------------------------------- plumbing
        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                return self.rfile.read(length)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return b""

        def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
            body = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, code: str | None = None):
            self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else
                       {"X-Error-Message": message})

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"  # case-insensitive lookup

        def _handle(self, method: str):
            url = urlparse(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            body = self._body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            hub.requests.append({"method": method, "path": self.path, "headers": headers,
                                 "body": body})
            if hub.fail_with is not None and (hub.fail_on is None or re.search(hub.fail_on, path)):
                return self._error(hub.fail_with, "Internal Error - We're working hard to fix this!")
            if path.startswith("/lfs/"):  # pre-signed storage URLs: no auth header, like S3
                return self._lfs_object(method, path, body)
            if method == "GET" and path == "/api/agent-harnesses":  # the client's user-agent registry, public
                return self._send(200, {"standardEnvVars": [], "harnesses": {}})
            if method == "POST" and path == "/api/validate-yaml":  # public, like on the Hub
                return self._validate_yaml(json.loads(body))
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            with hub._lock:
                return self._route(method, path, query, body)

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_PUT(self):
            self._handle("PUT")

        # ---------------------------------------------------------------- routes
        def _route(self, method, path, query, body):
            if method == "GET" and path == "/api/whoami-v2":
                return self._send(200, {"type": "user", "name": hub.user, "orgs": [],
                                        "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if m and method == "POST":
                return self._lfs_batch(m.group(1), json.loads(body))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|branch|preupload|commit|commits)/(.+))?", path)
            if m:
                repo = hub.repos.get(m.group(1))
                if repo is None:
                    return self._error(404, f"Repository not found: {m.group(1)}", "RepoNotFound")
                action, rev = m.group(2), m.group(3) or "main"
                if action == "branch" and method == "POST":
                    return self._create_branch(repo, rev, json.loads(body or b"{}"))
                if rev not in repo.branches:
                    return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                if method == "GET" and action in (None, "revision"):
                    return self._info(repo, rev, blobs=query.get("blobs", [""])[0].lower() == "true")
                if method == "GET" and action == "commits":
                    return self._send(200, [{"id": c.oid, "title": c.title, "message": c.description,
                                             "authors": [{"user": hub.user}], "date": "2026-11-24T00:00:00.000Z"}
                                            for c in repo.history(rev)])
                if method == "POST" and action == "preupload":
                    return self._preupload(repo, rev, json.loads(body))
                if method == "POST" and action == "commit":
                    return self._create_commit(repo, rev, body)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m and method == "GET" and m.group(1) in hub.repos:
                repo, rev = hub.repos[m.group(1)], m.group(2)
                if rev in repo.branches and m.group(3) in repo.commits[repo.branches[rev]].files:
                    return self._send(200, raw=hub.file(repo.repo_id, m.group(3), rev))
                return self._error(404, "Entry not found", "EntryNotFound")
            return self._error(404, f"Unknown endpoint {method} {path}")

        def _create_repo(self, payload):
            if payload.get("type", "model") != "model":
                return self._error(400, "This stand-in only hosts model repositories")
            repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
            if repo_id in hub.repos:
                # The real Hub answers the conflict with the repo's url, which `create_repo(exist_ok=True)` returns.
                return self._send(409, {"error": "You already created this model repo",
                                        "url": f"{hub.endpoint}/{repo_id}"})
            repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            hub.repos[repo_id] = repo
            gitattributes = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in _LFS_SUFFIXES)
            hub._commit(repo, "main", "initial commit", "", [(".gitattributes", {"data": gitattributes})])
            return self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

        def _validate_yaml(self, payload):
            content = payload.get("content", "")
            errors = []
            m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            if m is None:
                return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError as e:
                return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
            if not isinstance(meta, dict):
                errors.append({"message": "metadata must be a YAML mapping"})
            else:
                for key in ("tags", "datasets"):
                    value = meta.get(key, [])
                    if not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
                        errors.append({"message": f'"{key}" must be a list of strings'})
                for key in ("license", "library_name", "base_model", "pipeline_tag"):
                    if key in meta and not isinstance(meta[key], (str, list)):
                        errors.append({"message": f'"{key}" must be a string'})
                for entry in meta.get("model-index") or []:
                    for result in entry.get("results", []):
                        if not {"task", "dataset", "metrics"} <= set(result):
                            errors.append({"message": '"model-index" results need task, dataset and metrics'})
            if errors:
                return self._send(400, {"errors": errors})
            return self._send(200, {"errors": [], "warnings": []})

        def _create_branch(self, repo: Repo, branch: str, payload):
            if branch in repo.branches:
                return self._error(409, f"Reference already exists: refs/heads/{branch}")
            start = payload.get("startingPoint") or "main"
            if start not in repo.branches:
                return self._error(404, f"Invalid rev id: {start}", "RevisionNotFound")
            repo.branches[branch] = repo.branches[start]
            return self._send(200, {})

        def _info(self, repo: Repo, rev: str, blobs: bool):
            commit = repo.commits[repo.branches[rev]]
            siblings = []
            for name, entry in sorted(commit.files.items()):
                sibling = {"rfilename": name}
                if blobs:
                    if "lfs" in entry:
                        pointer = lfs_pointer(entry["lfs"], entry["size"])
                        sibling.update(blobId=git_blob_id(pointer), size=entry["size"],
                                       lfs={"sha256": entry["lfs"], "size": entry["size"],
                                            "pointerSize": len(pointer)})
                    else:
                        sibling.update(blobId=git_blob_id(entry["data"]), size=len(entry["data"]))
                siblings.append(sibling)
            return self._send(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid,
                                    "private": repo.private, "siblings": siblings, "tags": []})

        def _preupload(self, repo: Repo, rev: str, payload):
            files = repo.commits[repo.branches[rev]].files
            out = []
            for f in payload["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = f["path"].endswith(_LFS_SUFFIXES) or f["size"] > _REGULAR_MAX or b"\0" in sample
                remote = files.get(f["path"])
                oid = None
                if remote is not None:
                    oid = remote["lfs"] if "lfs" in remote else git_blob_id(remote["data"])
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
            return self._send(200, {"files": out, "commitOid": repo.branches[rev]})

        def _lfs_batch(self, repo_id: str, payload):
            if repo_id not in hub.repos:
                return self._error(404, f"Repository not found: {repo_id}", "RepoNotFound")
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.lfs:
                    entry["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs/{obj['oid']}"},
                                        "verify": {"href": f"{hub.endpoint}/lfs/verify"}}
                objects.append(entry)
            return self._send(200, {"transfer": "basic", "objects": objects})

        def _lfs_object(self, method, path, body):
            if method == "PUT":
                oid = path.rsplit("/", 1)[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._error(400, "sha256 of the uploaded content does not match the object id")
                hub.lfs[oid] = body
                return self._send(200, {})
            if method == "POST" and path == "/lfs/verify":
                payload = json.loads(body)
                if payload["oid"] not in hub.lfs or len(hub.lfs[payload["oid"]]) != payload["size"]:
                    return self._error(404, "LFS object not found")
                return self._send(200, {})
            return self._error(404, "Unknown LFS endpoint")

        def _create_commit(self, repo: Repo, rev: str, body: bytes):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header":
                return self._error(400, "The first ndjson line must be the commit header")
            header, changes = lines[0]["value"], []
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    changes.append((value["path"], {"data": base64.b64decode(value["content"])}))
                elif line["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._error(422, f"LFS object {value['oid']} was never uploaded")
                    changes.append((value["path"], {"lfs": value["oid"], "size": len(hub.lfs[value["oid"]])}))
                elif line["key"] == "deletedFile":
                    changes.append((value["path"], None))
                else:
                    return self._error(400, f"Unsupported commit operation {line['key']}")
            oid = hub._commit(repo, rev, header["summary"], header.get("description", ""), changes)
            return self._send(200, {"success": True, "commitOid": oid,
                                    "commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{oid}"})

    return Handler


class SilentServer:
    """A server that accepts connections on 127.0.0.1 and never answers; `with SilentServer() as s:` serves at
    `s.endpoint`.

    Connections are held open (unread) until the server closes, like a stalled proxy or an overloaded endpoint.
    """

    def __init__(self):
        self._socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.endpoint = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._socket.settimeout(0.1)
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections.append(connection)

    def __enter__(self) -> "SilentServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()
        for connection in self.connections:
            connection.close()
