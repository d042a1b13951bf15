"""A stand-in Hugging Face hub on 127.0.0.1: ``/{repo_id}/resolve/{revision}/{filename}`` answered as the
hub answers ``huggingface_hub`` (HEAD for the metadata, GET for the bytes), with the headers it reads
(``X-Repo-Commit``, ``ETag``, ``Content-Length``) and its error codes (``X-Error-Code: RepoNotFound`` /
``EntryNotFound``)."""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # one revision of every repo
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")


class StandinHub:
    """``repos``: {repo_id: {filename: bytes}}. ``requests`` lists (method, path) as they arrive."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def log_message(self, *args) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StandinHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        match = _RESOLVE.match(handler.path.split("?")[0])
        files = self.repos.get(match["repo"]) if match else None
        if files is None:
            return self._error(handler, "RepoNotFound", "Repository not found")
        if match["filename"] not in files:
            return self._error(handler, "EntryNotFound", "Entry not found", commit=True)
        content = files[match["filename"]]
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        handler.send_header("Content-Length", str(len(content)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if body:
            handler.wfile.write(content)

    def _error(self, handler, code: str, message: str, commit: bool = False) -> None:
        handler.send_response(404)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        if commit:
            handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
