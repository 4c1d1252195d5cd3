"""The one HTTP client for OpenAI-compatible servers (vLLM, SGLang, hosted APIs), shared by the
openai engine (engines/openai.py) and the LLM judge (judge.py).

    client = ServerClient("http://node1:8000/v1", api_key_env="OPENAI_API_KEY")
    client.probe()                                   # GET /v1/models, fails fast naming the URL
    reply = client.post("/chat/completions", body)   # the reply as a plain dict

Built on the official `openai` package, used only as a transport: its retries (exponential
backoff 0.5 s doubling to 8 s with jitter; `Retry-After` / `retry-after-ms` honoured up to
2 minutes; on connection errors, timeouts, 408, 409, 429 and 5xx), timeouts and pooled,
thread-safe connections. Requests go through `client.post(path, cast_to=Response)`, so the
reply is the server's raw JSON: vendor fields (vLLM's `token_ids`, `reasoning_content`) are
kept and a malformed body is ours to report, not a pydantic error.

The API key is read from the environment variable named `api_key_env` at every request and
sent as a per-request `Authorization` header; it is never stored on an object, logged, or put
in an error message. No key set: no Authorization header at all (a local vLLM).

Errors: `EngineUnavailable` (retries spent on connection errors, timeouts, 429 or 5xx: the
server is down or overloaded), `ServerRejected` (another 4xx: the request itself is wrong),
`BadReply` (200 with a body that is not a JSON object, or that fails the caller's `check`, on
every one of the attempts: a reply that cannot be read is a transient failure, asked again with
the same backoff, never kept as an empty answer). BadReply is an EngineUnavailable, so a stage
stops unfinished (exit 3) with its finished rows kept and a rerun asks again. Each names the
URL; an EngineUnavailable carries the last error body the server sent (a 500 naming
EngineDeadError), also when the server is unreachable afterwards.
"""

from __future__ import annotations

import json
import os
import time

import httpx2
import openai

from posttrain.engines.base import EngineUnavailable, ServerRejected
from posttrain.engines.config import check_url

__all__ = ["BadReply", "ServerClient", "ServerRejected", "api_base", "chat_completions_url"]

_UNUSED_KEY = "key-is-sent-per-request"  # the library insists on a key; this one is never sent


class BadReply(EngineUnavailable):
    """The server answered 200, every time it was asked, with a body that is not a JSON object
    (or not one the caller can use)."""


def api_base(base_url: str) -> str:
    """http://host:port[/] -> http://host:port/v1; a base ending in /v1 (or
    /v1/chat/completions) keeps its /v1. The scheme must be http or https."""
    base = check_url(base_url).strip().rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    return base if base.endswith("/v1") else base + "/v1"


def chat_completions_url(base_url: str) -> str:
    return api_base(base_url) + "/chat/completions"


class ServerClient:
    """One server's client: JSON in, JSON dict out, retries by the openai library."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 600.0,
        max_retries: int = 5,
    ):
        self.base = api_base(base_url)
        self.root = self.base[: -len("/v1")]  # vLLM's /tokenize and /detokenize live here
        self.api_key_env = api_key_env  # the variable's name only, never its value
        self.timeout, self.max_retries = timeout, max_retries
        self.last_error: str | None = None  # the server's last 5xx/429 body, for messages
        # The library retries 5xx itself and, when the server then stops answering, reports
        # only the connection error: a hook keeps the body of each 5xx / 429 as it arrives.
        self._client = openai.OpenAI(
            base_url=self.base,
            api_key=_UNUSED_KEY,
            timeout=timeout,
            max_retries=max_retries,
            http_client=openai.DefaultHttpxClient(
                timeout=timeout, event_hooks={"response": [self._keep_error]}
            ),
        )

    def __repr__(self) -> str:
        return f"ServerClient({self.base!r}, api_key_env={self.api_key_env!r})"

    def _headers(self) -> dict:
        key = os.environ.get(self.api_key_env)
        # openai.Omit() removes the header the library would otherwise add
        return {"Authorization": f"Bearer {key}" if key else openai.Omit()}

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        text: bool = False,
        check=None,
    ) -> dict | str:
        """`method` ("get" | "post") `path` (relative to .../v1, or an absolute http URL);
        returns the JSON object the server sent (its text when `text`). `check(reply)` says
        what is wrong with a JSON object (None: nothing); a wrong one is asked again like a
        malformed body. Raises EngineUnavailable, ServerRejected, BadReply; never anything
        carrying the key."""
        url = path if path.startswith("http") else self.base + path
        options = {"headers": self._headers()}
        if timeout is not None:
            options["timeout"] = timeout
        if max_retries is not None:
            options["max_retries"] = max_retries
        attempts = 1 + (self.max_retries if max_retries is None else max_retries)
        for attempt in range(attempts):
            response = self._send(method, url, body, options, attempts, timeout)
            if text:
                return response.text
            reply, problem = _read_json(response)
            if problem is None and check is not None:
                problem = check(reply)
            if problem is None:
                return reply
            if attempt + 1 < attempts:  # the library's backoff: 0.5 s doubling, at most 8 s
                time.sleep(min(0.5 * 2**attempt, 8.0))
        raise BadReply(f"{url}: {problem} (the same after {attempts} attempt(s))")

    def _send(self, method, url, body, options, attempts, timeout):
        try:
            if method == "get":
                return self._client.get(url, cast_to=httpx2.Response, options=options)
            return self._client.post(url, body=body, cast_to=httpx2.Response, options=options)
        except openai.APIStatusError as e:
            status, detail = e.status_code, _snippet(e.response.text)
            if status in (408, 409, 429) or status >= 500:
                raise EngineUnavailable(
                    f"{url}: HTTP {status} after {attempts} attempt(s): {detail}"
                ) from None
            raise ServerRejected(url, status, detail) from None
        except openai.APITimeoutError:
            raise EngineUnavailable(
                f"{url}: timed out ({timeout or self.timeout:g} s) after {attempts} attempt(s)"
                + self._last_words()
            ) from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise EngineUnavailable(
                f"{url}: cannot connect after {attempts} attempt(s): "
                f"{type(cause).__name__}: {cause}" + self._last_words()
            ) from None

    def _keep_error(self, response) -> None:
        if response.status_code == 429 or response.status_code >= 500:
            response.read()
            self.last_error = f"HTTP {response.status_code}: {_snippet(response.text)}"

    def _last_words(self) -> str:
        """The last error the server sent before it stopped answering, if any: why it died."""
        return f"; before that the server answered {self.last_error}" if self.last_error else ""

    def post(self, path: str, body: dict, **kw) -> dict:
        return self.request("post", path, body, **kw)

    def get(self, path: str, **kw) -> dict:
        return self.request("get", path, **kw)

    def probe(self, timeout: float = 5.0) -> list[str]:
        """GET /v1/models once, without retries: the served model names. A server that is down
        or not OpenAI-compatible fails here, within `timeout`, naming its URL."""
        try:
            reply = self.get("/models", timeout=timeout, max_retries=0)
        except (EngineUnavailable, ServerRejected, BadReply) as e:
            raise EngineUnavailable(f"server {self.base} is not answering: {e}") from None
        data = reply.get("data")
        if not isinstance(data, list):
            raise EngineUnavailable(
                f"server {self.base}: /v1/models has no 'data' list: {_snippet(json.dumps(reply))}"
            )
        return [m.get("id") for m in data if isinstance(m, dict)]

    def close(self) -> None:
        self._client.close()


def _read_json(response) -> tuple[dict | None, str | None]:
    """(the JSON object of a reply, None) or (None, what is wrong with it)."""
    try:
        reply = json.loads(response.content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"server sent non-JSON: {_snippet(response.text)}"
    if not isinstance(reply, dict):
        return None, f"server sent JSON that is not an object: {_snippet(response.text)}"
    return reply, None


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text[:limit] + ("..." if len(text) > limit else "")
