"""A test double of the Hugging Face Hub: a local HTTP server on 127.0.0.1 that answers the
endpoints the real ``huggingface_hub`` client calls to create a repository, upload a folder
(README metadata check, preupload, LFS batch + PUT, commit) and download it (repo info, tree, resolve).

Not the Hub: one branch per repository, no auth checks, no Xet storage (clients talk to it with
``HF_HUB_DISABLE_XET=1``, which makes them use the LFS protocol). Every request is logged in
``requests`` so tests can assert what was (or was not) asked.

    with HubDouble() as hub:            # hub.endpoint == "http://127.0.0.1:PORT"
        HfApi(endpoint=hub.endpoint, token="hf_test").upload_folder(...)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

#: Files at least this large are uploaded by LFS (the Hub's rule is similar: binaries and >10 MB).
LFS_MIN_BYTES = 1024


class HubDouble:
    """The server (started by ``with``); ``repos[repo_id][path] -> bytes`` is what was committed."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}  # repo_id -> sha of the last commit
        self.lfs: dict[str, bytes] = {}  # sha256 -> uploaded bytes
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "HubDouble":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- what the endpoints do -----------------------------------------------------------------
    def create(self, body: dict[str, Any]) -> tuple[int, Any]:
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
            self.repos[repo_id] = {}
            self.commits[repo_id] = hashlib.sha1(repo_id.encode()).hexdigest()
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    def validate_yaml(self, body: dict[str, Any]) -> tuple[int, Any]:
        """The README's front matter must be a YAML mapping (the Hub checks its fields too)."""
        import yaml

        m = re.match(r"^---\n(.*?)\n---\n", body["content"], flags=re.S)
        try:
            ok = m is None or isinstance(yaml.safe_load(m[1]), dict)
        except yaml.YAMLError:
            ok = False
        if not ok:
            return 400, {"errors": [{"message": "README.md metadata is not a YAML mapping"}]}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, body: dict[str, Any]) -> tuple[int, Any]:
        files = [{"path": f["path"], "uploadMode": "lfs" if f["size"] >= LFS_MIN_BYTES else "regular",
                  "shouldIgnore": False} for f in body["files"]]  # fmt: skip
        return 200, {"files": files}

    def lfs_batch(self, body: dict[str, Any]) -> tuple[int, Any]:
        objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                    "actions": {"upload": {"href": f"{self.endpoint}/_lfs/{o['oid']}"}}}
                   for o in body["objects"]]  # fmt: skip
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, data: bytes) -> tuple[int, Any]:
        if hashlib.sha256(data).hexdigest() != oid:
            return 400, {"error": "sha256 mismatch"}
        self.lfs[oid] = data
        return 200, {}

    def commit(self, repo_id: str, ndjson: bytes) -> tuple[int, Any]:
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        files = dict(self.repos[repo_id])
        for line in ndjson.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 422, {"error": f"LFS object {value['oid']} was not uploaded"}
                files[value["path"]] = self.lfs[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
        sha = hashlib.sha1(repr(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items())).encode())
        with self._lock:
            self.repos[repo_id], self.commits[repo_id] = files, sha.hexdigest()
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha.hexdigest()}",
                     "commitOid": sha.hexdigest(), "success": True}  # fmt: skip

    def info(self, repo_id: str) -> tuple[int, Any]:
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        siblings = [{"rfilename": p} for p in sorted(self.repos[repo_id])]
        return 200, {"id": repo_id, "modelId": repo_id, "sha": self.commits[repo_id], "private": False,
                     "siblings": siblings, "tags": []}  # fmt: skip

    def tree(self, repo_id: str) -> tuple[int, Any]:
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        out = []
        for p, data in sorted(self.repos[repo_id].items()):
            entry: dict[str, Any] = {"type": "file", "path": p, "size": len(data), "oid": _git_oid(data)}
            if len(data) >= LFS_MIN_BYTES:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        return 200, out


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


_REPO = r"(?P<repo>[^/]+/[^/]+)"


def _handler(hub: HubDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, status: int, payload: Any = None, *, raw: bytes | None = None,
                  headers: dict[str, str] | None = None, head: bool = False) -> None:  # fmt: skip
            data = raw if raw is not None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((method, path))
            body = self._body() if method in ("POST", "PUT") else b""
            m = None
            if method == "POST" and path == "/api/repos/create":
                return self._send(*hub.create(json.loads(body)))
            if method == "POST" and path == "/api/validate-yaml":
                return self._send(*hub.validate_yaml(json.loads(body)))
            if method == "POST" and (m := re.fullmatch(rf"/api/models/{_REPO}/preupload/[^/]+", path)):
                return self._send(*hub.preupload(json.loads(body)))
            if method == "POST" and (m := re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path)):
                return self._send(*hub.lfs_batch(json.loads(body)))
            if method == "PUT" and (m := re.fullmatch(r"/_lfs/(?P<oid>[0-9a-f]{64})", path)):
                return self._send(*hub.lfs_put(m["oid"], body))
            if method == "POST" and (m := re.fullmatch(rf"/api/models/{_REPO}/commit/[^/]+", path)):
                return self._send(*hub.commit(m["repo"], body))
            if method == "GET" and (m := re.fullmatch(rf"/api/models/{_REPO}(/revision/[^/]+)?", path)):
                return self._send(*hub.info(m["repo"]))
            if method == "GET" and (m := re.fullmatch(rf"/api/models/{_REPO}/tree/[^/]+(/.*)?", path)):
                return self._send(*hub.tree(m["repo"]))
            if method in ("GET", "HEAD") and (m := re.fullmatch(rf"/{_REPO}/resolve/[^/]+/(?P<file>.+)", path)):
                files = hub.repos.get(m["repo"])
                if files is None or m["file"] not in files:
                    return self._send(404, {"error": "Entry not found"}, head=method == "HEAD",
                                      headers={"X-Error-Code": "EntryNotFound"})  # fmt: skip
                data = files[m["file"]]
                etag = hashlib.sha256(data).hexdigest() if len(data) >= LFS_MIN_BYTES else _git_oid(data)
                headers = {"X-Repo-Commit": hub.commits[m["repo"]], "ETag": f'"{etag}"'}
                return self._send(200, raw=data, headers=headers, head=method == "HEAD")
            return self._send(404, {"error": f"the Hub double does not answer {method} {path}"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

    return Handler
