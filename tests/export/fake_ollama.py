"""A faithful fake of the parts of Ollama's REST API that `ollama-load` uses (no Ollama server
can be installed on this machine). Endpoints and status codes follow docs/api.md of ollama:

- HEAD /api/blobs/sha256:<hex>  -> 200 when the blob exists, 404 otherwise
- POST /api/blobs/sha256:<hex>  -> 201 Created; 400 when the body's sha256 differs from the digest
- POST /api/create {model, files: {name: digest}, template, parameters, stream}
                                -> 200 {"status": "success"}; 400 when a file's blob is missing
- POST /api/chat {model, messages, options, stream}
                                -> 200 chat response; 404 {"error": "model '<x>' not found"}
- GET  /api/tags                -> the created models

The chat "model" renders the prompt with the created Go template (ftpipe's renderer) and answers
a fixed text with done_reason "stop" - or "length" when `answer_stops` is False - so tests can see
the prompt Ollama would build.
"""

from __future__ import annotations

import hashlib
import json
from http.server import BaseHTTPRequestHandler

from loopback import LoopbackServer

from ftpipe.export.gotemplate import ollama_values, render


class FakeOllama(LoopbackServer):
    def __init__(self, answer: str = "positive", answer_stops: bool = True):
        self.blobs: dict[str, int] = {}
        self.models: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.prompts: list[str] = []
        self.answer, self.answer_stops = answer, answer_stops
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, code: int, obj=None):
                body = b"" if obj is None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                fake.calls.append(("HEAD", self.path))
                if self.path.startswith("/api/blobs/"):
                    return self._send(200 if self.path[len("/api/blobs/"):] in fake.blobs else 404)
                self._send(404)

            def do_GET(self):
                fake.calls.append(("GET", self.path))
                if self.path == "/api/tags":
                    return self._send(200, {"models": [{"name": n, "model": n} for n in fake.models]})
                self._send(404, {"error": "not found"})

            def do_POST(self):
                fake.calls.append(("POST", self.path))
                body = self._body()
                if self.path.startswith("/api/blobs/"):
                    digest = self.path[len("/api/blobs/"):]
                    if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                        return self._send(400, {"error": "digest mismatch"})
                    fake.blobs[digest] = len(body)
                    return self._send(201)
                req = json.loads(body or b"{}")
                if self.path == "/api/create":
                    missing = [d for d in (req.get("files") or {}).values() if d not in fake.blobs]
                    if missing:
                        return self._send(400, {"error": f"missing blob {missing[0]}"})
                    fake.models[req["model"]] = req
                    return self._send(200, {"status": "success"})
                if self.path == "/api/chat":
                    model = fake.models.get(req.get("model"))
                    if model is None:
                        return self._send(404, {"error": f"model '{req.get('model')}' not found"})
                    fake.prompts.append(render(model.get("template") or "{{ .Prompt }}", ollama_values(req["messages"])))
                    return self._send(200, {
                        "model": req["model"], "created_at": "2026-11-21T00:00:00Z",
                        "message": {"role": "assistant", "content": fake.answer},
                        "done": True, "done_reason": "stop" if fake.answer_stops else "length",
                        "total_duration": 1, "eval_count": 1,
                    })
                self._send(404, {"error": "not found"})

        super().__init__(Handler)
