"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for judge and engine tests.

Each POST takes the next scripted reply: a string (200 with that message content), an
(HTTP status, body) or (HTTP status, body, headers) tuple, ("sleep", seconds, content) to answer
late, or a function of the request body that returns one of these (or a reply dict). After the
script runs out, the last entry repeats. POSTs to other paths than /chat/completions get 404
and are not counted (a server without vLLM's /tokenize). `die_after=k` shuts the server down for good after k
requests; `port=` reuses a port (a restarted server). GET /v1/models lists `models`. Every POST
is recorded (path, headers with lower-case names, JSON body) in `server.requests`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chat_reply(content: str) -> dict:
    return {
        "id": "fake",
        "object": "chat.completion",
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
    }


def completion_reply(body: dict, texts: list[str], finish: str = "stop") -> dict:
    """A vLLM-like reply with one choice per text: token ids, and log-probs when asked. Each
    character is one "token" with id ord(c) and log-prob -0.5, so a text of k characters has
    sum_logprob -0.5 k."""
    choices = []
    for i, text in enumerate(texts):
        choice = {
            "index": i,
            "finish_reason": finish,
            "message": {"role": "assistant", "content": text},
        }
        if body.get("return_token_ids"):
            choice["token_ids"] = [ord(c) for c in text]
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": c, "logprob": -0.5} for c in text]}
        choices.append(choice)
    return {
        "id": "fake",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": choices,
        "usage": {"completion_tokens": sum(len(t) for t in texts)},
    }


class FakeOpenAIServer:
    def __init__(
        self,
        script: list,
        die_after: int | None = None,
        port: int = 0,
        models: tuple[str, ...] = ("fake",),
    ):
        self.script = list(script)
        self.die_after = die_after
        self.requests: list[dict] = []
        self.dead = False
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": m} for m in models]})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if outer.dead:  # died: drop the connection unanswered, as a crashed server does
                    self.close_connection = True
                    return
                if not self.path.endswith("/chat/completions"):  # e.g. vLLM's /tokenize
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with outer._lock:
                    body = json.loads(raw)
                    outer.requests.append(
                        {
                            "path": self.path,
                            "body": body,
                            "t": time.monotonic(),
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                        }
                    )
                    n = len(outer.requests)
                    step = outer.script[min(n, len(outer.script)) - 1]
                    dies = outer.die_after is not None and n >= outer.die_after
                    outer.dead = outer.dead or dies  # before answering: no request slips in
                if callable(step):
                    step = step(body)
                if isinstance(step, dict):
                    self._send(200, step)
                elif isinstance(step, str):
                    self._send(200, chat_reply(step))
                elif step[0] == "sleep":
                    time.sleep(step[1])
                    self._send(200, chat_reply(step[2]))
                else:
                    self._send(*step)
                if dies:
                    # shutdown() waits for serve_forever, which runs this handler: use a thread.
                    threading.Thread(target=outer.stop, daemon=True).start()

            def _send(self, status, body, headers=None):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._stopped = False

    def start(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
