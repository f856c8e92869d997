"""A local HTTP endpoint for the webhook tests, scripted and recording.

::

    with Receiver() as hook:                  # listens on 127.0.0.1, a free port
        hook.script([500, 429, ("hang", 3)])  # answers of the next requests; then 200
        url = hook.url("/events")
        ...
        hook.requests                          # every request: (path, headers, body, status)
        hook.accepted()                        # the bodies answered 2xx, in order

``max_body``: a larger request body is answered 413, as nginx does past its
``client_max_body_size`` (1 MiB by default).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    def __init__(self, port: int = 0, max_body: int | None = None) -> None:
        self.max_body = max_body
        self.requests: list[tuple[str, dict[str, str], bytes, int]] = []
        self._script: list[Any] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length)
                if len(body) < length:  # the client died while sending: nothing to answer
                    with receiver._lock:
                        receiver.requests.append((self.path, dict(self.headers), body, 0))
                    return
                with receiver._lock:
                    answer = receiver._script.pop(0) if receiver._script else 200
                if receiver.max_body is not None and length > receiver.max_body:
                    answer = 413
                headers: dict[str, str] = {}
                if isinstance(answer, tuple) and answer[0] == "hang":
                    time.sleep(answer[1])
                    answer = 200 if len(answer) < 3 else answer[2]
                if isinstance(answer, tuple):
                    answer, headers = answer
                with receiver._lock:
                    receiver.requests.append((self.path, dict(self.headers), body, answer))
                try:
                    self.send_response(answer)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"no")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a scripted hang)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str = "/hook", query: str = "secret_env=WALEX_TEST_WEBHOOK_SECRET") -> str:
        return f"http://127.0.0.1:{self.port}{path}?{query}"

    def script(self, answers: list[Any]) -> None:
        with self._lock:
            self._script = list(answers)

    def accepted(self) -> list[tuple[str, dict[str, str], bytes, int]]:
        with self._lock:
            return [r for r in self.requests if 200 <= r[3] < 300]
