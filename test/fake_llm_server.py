"""A scripted caption server on 127.0.0.1 that speaks the OpenAI and Anthropic HTTP APIs.

Tests of stage 05 talk to it over real HTTP through the same client code that talks to a paid
provider (dspy -> its HTTP engine). Each request is answered by a *behaviour* taken from a
script: ``ok`` (a caption in dspy's chat-adapter format, derived from the image so every frame
gets its own), ``429`` / ``500`` (an error status), ``hang`` (hold the connection until the client
gives up), ``garbage`` (an answer without the fields asked for), ``echo`` (a 500 whose message
repeats the request headers, keys included, as a careless proxy does), ``echo200`` (a 200, billed,
whose text and refusal repeat them), ``loosetags`` / ``notags`` (a caption whose tags are a bare
comma list, or missing), and the paid answers that
carry nothing: ``empty`` (no text, finished normally), ``refused`` (a refusal instead of
text), ``filtered`` (stopped by the content filter) and ``length`` (a reasoning model that spent
``max_tokens`` before writing any text), ``unreadable`` (a 200 whose body is cut off mid-JSON, as a
proxy that drops the connection or a server that crashes while it answers sends it: billed, and
nothing to read) and ``html`` (a 200 with an HTML error page). The server records every request
and, for answered ones, which image it captioned, so a test can count paid calls per image.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_DATA_URL = re.compile(r"data:image/[a-z]+;base64,([A-Za-z0-9+/=]+)")


def image_digest(data: bytes) -> str:
    """Short hash of an image's bytes: the server's name for the image it was sent."""
    return hashlib.sha256(data).hexdigest()[:12]


def _images_in(body: dict[str, Any]) -> list[bytes]:
    """Every image in an OpenAI (data URL) or Anthropic (base64 source) request body."""
    found: list[bytes] = []
    text = json.dumps(body)
    for match in _DATA_URL.finditer(text):
        found.append(base64.b64decode(match.group(1)))
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                source = part.get("source") if isinstance(part, dict) else None
                if isinstance(source, dict) and source.get("type") == "base64":
                    found.append(base64.b64decode(source["data"]))
    return found


def caption_text(digest: str) -> str:
    """The caption the server gives an image (a test can predict it from the image alone)."""
    return f"frame {digest} seen by the fake server"


@dataclass
class FakeLLMServer:
    """The server; use as a context manager. ``script`` is consumed one behaviour per request;
    when it runs out, ``default`` answers."""

    script: list[str] = field(default_factory=list)
    default: str = "ok"
    hang_s: float = 30.0
    #: Seconds every answered request takes (lets a test hold requests in flight).
    delay_s: float = 0.0
    #: The ``Retry-After`` header of a 429 (None: none sent).
    retry_after: str | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    answered: Counter = field(default_factory=Counter)
    model_name: str = "fake-vision-1"

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                if status == 429 and server.retry_after is not None:
                    self.send_header("Retry-After", server.retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(
                        200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]}
                    )
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                images = [image_digest(b) for b in _images_in(body)]
                with server._lock:
                    index = len(server.requests)
                    behaviour = server.script.pop(0) if server.script else server.default
                    server.requests.append(
                        {
                            "path": self.path,
                            "headers": dict(self.headers),
                            "body": body,
                            "images": images,
                            "behaviour": behaviour,
                        }
                    )
                anthropic = self.path.rstrip("/").endswith("/messages")
                if behaviour == "hang":
                    server._stop.wait(server.hang_s)
                    return
                if behaviour == "echo":
                    headers = "; ".join(f"{k}: {v}" for k, v in self.headers.items())
                    self._send(
                        500, {"error": {"message": f"bad request, headers {headers}", "type": "api_error"}}
                    )
                    return
                if behaviour in {"429", "500", "503"}:
                    status = int(behaviour)
                    kind = "rate_limit_error" if status == 429 else "api_error"
                    self._send(status, {"error": {"message": f"scripted {status}", "type": kind}})
                    return
                digest = images[0] if images else "noimage"
                if behaviour in {"unreadable", "html"}:
                    with server._lock:
                        server.answered[digest] += 1
                    data = (
                        b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"index": 0, "mess'
                        if behaviour == "unreadable"
                        else b"<html><body>502 Bad Gateway</body></html>"
                    )
                    self.send_response(200)
                    kind = "application/json" if behaviour == "unreadable" else "text/html"
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if server.delay_s:
                    time.sleep(server.delay_s)
                finish, refusal = "stop", None
                if behaviour == "garbage":
                    text = "I cannot follow the format."
                elif behaviour in {"loosetags", "notags"}:
                    text = f"[[ ## caption ## ]]\n{caption_text(digest)}\n\n"
                    if behaviour == "loosetags":
                        text += "[[ ## tags ## ]]\nstage, performer, dark\n\n"
                    text += "[[ ## completed ## ]]"
                elif behaviour == "echo200":
                    text = refusal = "headers " + "; ".join(f"{k}: {v}" for k, v in self.headers.items())
                elif behaviour in {"empty", "refused", "filtered", "length"}:
                    text = ""
                    finish = {"filtered": "content_filter", "length": "length"}.get(behaviour, "stop")
                    refusal = "I can't help with that." if behaviour == "refused" else None
                else:
                    text = (
                        f"[[ ## caption ## ]]\n{caption_text(digest)}\n\n"
                        f'[[ ## tags ## ]]\n["fake", "{digest}"]\n\n[[ ## completed ## ]]'
                    )
                with server._lock:
                    server.answered[digest] += 1
                if anthropic:
                    payload = {
                        "id": f"msg_{index}",
                        "type": "message",
                        "role": "assistant",
                        "model": body.get("model", server.model_name),
                        "content": [{"type": "text", "text": text}] if text else [],
                        "stop_reason": {
                            "stop": "refusal" if refusal else "end_turn",
                            "length": "max_tokens",
                        }.get(finish, "refusal"),
                        "stop_sequence": None,
                        "usage": {"input_tokens": 120, "output_tokens": 30},
                    }
                else:
                    payload = {
                        "id": f"chatcmpl-{index}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", server.model_name),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text or None, "refusal": refusal},
                                "finish_reason": finish,
                            }
                        ],
                        "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150},
                    }
                self._send(200, payload)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL (``http://127.0.0.1:PORT/v1``)."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def root_url(self) -> str:
        """The server root (the Anthropic client adds ``/v1/messages`` itself)."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> FakeLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def behaviours(self) -> list[str]:
        """What each request got, in arrival order."""
        with self._lock:
            return [r["behaviour"] for r in self.requests]
