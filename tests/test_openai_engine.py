"""The openai engine and its client against scripted OpenAI-compatible servers on 127.0.0.1
(tests/fake_openai_server.py): reply parsing (literal tables), retries with Retry-After, 5xx,
round-robin and failover, fan-out when `n` is refused, refused optional fields, malformed
replies graded (never a crash), the API key kept out of every output, a server down at start,
and a server killed mid-run then restarted: the rerun resumes with no duplicate.

    .venv/bin/python -m pytest tests/test_openai_engine.py -q

The engine against a real vLLM server: tests/test_openai_engine_vllm.py.
"""

import json
import logging
import time

import pytest
from fake_openai_server import FakeOpenAIServer, completion_reply

from posttrain import cli
from posttrain.config import ConfigError
from posttrain.engines import EngineConfig, EngineUnavailable, SamplingParams
from posttrain.engines.openai import OpenAIEngine, parse_choices
from posttrain.records import Problem, read_jsonl
from posttrain.sampling import sample_row
from posttrain.verify import verify_row

pytestmark = pytest.mark.server

FAST = {"retry-after-ms": "10"}
ONE = [[{"role": "user", "content": "q0"}]]


def echo(body: dict) -> dict:
    """n choices "<question> #k", or "<question> seed=S" when one choice and a seed is sent."""
    q = body["messages"][-1]["content"]
    n = body.get("n", 1)
    if n == 1 and "seed" in body:
        return completion_reply(body, [f"{q} seed={body['seed']}"])
    return completion_reply(body, [f"{q} #{k}" for k in range(n)])


def openai_engine(urls: list[str], model: str, *, probe: bool = True, **settings) -> OpenAIEngine:
    """OpenAIEngine(model, config) with engine settings given as keywords."""
    config = EngineConfig(kind="openai", base_urls=list(urls), **settings)
    return OpenAIEngine(model, config, probe=probe)


def engine_for(*servers, **kw) -> OpenAIEngine:
    kw = {"timeout": 5, "max_retries": 1, "concurrency": 2, **kw}
    return openai_engine([s.base_url + "/v1" for s in servers], "fake", **kw)


def prompts(k: int) -> list:
    return [[{"role": "user", "content": f"q{i}"}] for i in range(k)]


# ---------------------------------------------------------------------------- parsing


def choice(**kw) -> dict:
    return {
        "index": 0,
        "finish_reason": "stop",
        "message": {"role": "assistant", "content": "4"},
        **kw,
    }


def lp(*values, tokens=None) -> dict:
    tokens = tokens or ["t"] * len(values)
    return {"content": [{"token": t, "logprob": v} for t, v in zip(tokens, values)]}


PARSE_CASES = [
    # (reply, text, finish, token_ids, num_tokens, sum_logprob, reasoning)
    (
        {"choices": [choice(token_ids=[19, 2], logprobs=lp(-0.25, -0.5))]},
        "4",
        "stop",
        [19, 2],
        2,
        -0.75,
        None,
    ),
    # ids from vLLM's return_tokens_as_token_ids strings
    (
        {"choices": [choice(logprobs=lp(-1.0, -2.0, tokens=["token_id:19", "token_id:2"]))]},
        "4",
        "stop",
        [19, 2],
        2,
        -3.0,
        None,
    ),
    # no ids, no log-probs: the count from usage (one choice)
    ({"choices": [choice()], "usage": {"completion_tokens": 7}}, "4", "stop", [], 7, None, None),
    # log-probs without ids: one token per log-prob
    ({"choices": [choice(logprobs=lp(-1.0, -1.0, -1.0))]}, "4", "stop", [], 3, -3.0, None),
    (
        {"choices": [choice(message={"content": "4", "reasoning_content": "2+2 is 4"})]},
        "4",
        "stop",
        [],
        0,
        None,
        "2+2 is 4",
    ),
    (
        {"choices": [choice(message={"content": "4", "reasoning": "r"})]},
        "4",
        "stop",
        [],
        0,
        None,
        "r",
    ),
    # cut off: content None at the limit; finish_reason missing or "abort" counts as cut off
    (
        {"choices": [choice(message={"content": None}, finish_reason="length")]},
        "",
        "length",
        [],
        0,
        None,
        None,
    ),
    ({"choices": [choice(finish_reason=None)]}, "4", "length", [], 0, None, None),
    ({"choices": [choice(finish_reason="abort")]}, "4", "length", [], 0, None, None),
    # a log-prob that is not a finite number: no log-probs at all
    ({"choices": [choice(logprobs=lp(-1.0, "x"))]}, "4", "stop", [], 0, None, None),
    ({"choices": [{"index": 0}]}, "", "length", [], 0, None, None),
    # ({"choices": "nonsense"} no longer reaches parse_choices: engines/replies.reply_problem
    # refuses it and the request is asked again; tests/test_holes.py)
]


@pytest.mark.parametrize("reply,text,finish,ids,num,total,reasoning", PARSE_CASES)
def test_parse_choices(reply, text, finish, ids, num, total, reasoning):
    (c,) = parse_choices(reply, 1)
    assert (c.text, c.finish_reason, c.token_ids, c.num_tokens) == (text, finish, ids, num)
    assert c.reasoning == reasoning
    assert c.sum_logprob == total
    if total is not None:
        assert c.mean_logprob == pytest.approx(total / num)
        assert len(c.token_logprobs) == num
    else:
        assert c.token_logprobs is None and c.mean_logprob is None


def test_choices_come_back_in_index_order():
    reply = {
        "choices": [
            choice(index=1, message={"content": "b"}),
            choice(index=0, message={"content": "a"}),
        ]
    }
    assert [c.text for c in parse_choices(reply, 2)] == ["a", "b"]


# ---------------------------------------------------------------------------- requests


def test_request_body_and_n_samples():
    with FakeOpenAIServer([echo]) as server:
        engine = engine_for(server, chat_template_kwargs={"enable_thinking": False})
        out = engine.generate(
            prompts(2), SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=64, seed=5)
        )
    assert [[c.text for c in cs] for cs in out] == [
        ["q0 #0", "q0 #1", "q0 #2"],
        ["q1 #0", "q1 #1", "q1 #2"],
    ]
    # 5 characters, one "token" each at log-prob -0.5 (fake_openai_server.completion_reply)
    assert out[0][0].token_ids == [ord(c) for c in "q0 #0"] and out[0][0].sum_logprob == -2.5
    body = server.requests[0]["body"]
    assert {
        k: body[k]
        for k in (
            "model",
            "n",
            "temperature",
            "top_p",
            "max_tokens",
            "seed",
            "logprobs",
            "chat_template_kwargs",
        )
    } == {
        "model": "fake",
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 64,
        "seed": 5,
        "logprobs": True,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    assert len(server.requests) == 2  # one request per prompt


def test_send_seed_off_sends_no_seed():
    with FakeOpenAIServer([echo]) as server:
        engine_for(server, send_seed=False).generate(ONE, SamplingParams(n=2))
    assert "seed" not in server.requests[0]["body"]


def test_429_with_retry_after_then_503_then_success():
    """429 with Retry-After: 0.4 (seconds) is honoured: the retry comes >= 0.4 s later; a 503
    with retry-after-ms: 10 is retried at once; the third attempt succeeds."""
    script = [
        (429, {"error": {"message": "rate limited"}}, {"retry-after": "0.4"}),
        (503, "busy", FAST),
        echo,
    ]
    with FakeOpenAIServer(script) as server:
        (cs,) = engine_for(server, max_retries=3).generate(ONE, SamplingParams(n=1))
    assert cs[0].text == "q0 seed=0" and len(server.requests) == 3
    t = [r["t"] for r in server.requests]
    assert t[1] - t[0] >= 0.4 and t[2] - t[1] < 0.4


def test_persistent_5xx_raises_engine_unavailable_after_retries():
    with FakeOpenAIServer([(500, "boom", FAST)]) as server:
        with pytest.raises(EngineUnavailable, match=r"HTTP 500 after 3 attempt\(s\)") as e:
            engine_for(server, max_retries=2, send_seed=False).generate(ONE, SamplingParams(n=1))
    assert len(server.requests) == 3 and e.value.partial == [None]


def test_timeout_raises_engine_unavailable():
    with FakeOpenAIServer([("sleep", 1.5, "late")]) as server:
        t0 = time.monotonic()
        with pytest.raises(EngineUnavailable, match="timed out"):
            engine_for(server, timeout=0.3, max_retries=0).generate(ONE, SamplingParams())
    assert time.monotonic() - t0 < 1.4


def test_round_robin_and_failover():
    """4 single requests over 2 servers: 2 each. Server B stops: the next 4 all go to A."""
    with FakeOpenAIServer([echo]) as a, FakeOpenAIServer([echo]) as b:
        engine = engine_for(a, b, max_retries=0)
        engine.generate(prompts(4), SamplingParams(n=1))
        assert (len(a.requests), len(b.requests)) == (2, 2)
        b.stop()
        out = engine.generate(prompts(4), SamplingParams(n=1))
    assert [cs[0].text.split()[0] for cs in out] == ["q0", "q1", "q2", "q3"]
    assert (len(a.requests), len(b.requests)) == (6, 2)


def test_fan_out_when_the_server_refuses_n():
    """A server that says n must be 1: each prompt becomes n single requests with seeds
    seed, seed+1, ...; later calls fan out at once (no more refused requests)."""

    def no_n(body):
        if body.get("n", 1) > 1:
            return 400, {"error": {"message": "'n' must be 1 for this model"}}
        return echo(body)

    with FakeOpenAIServer([no_n]) as server:
        engine = engine_for(server, concurrency=1)
        out = engine.generate(prompts(2), SamplingParams(n=3, seed=10))
        refused = sum(r["body"].get("n", 1) > 1 for r in server.requests)
        engine.generate(prompts(2), SamplingParams(n=3, seed=10))
    assert [[c.text for c in cs] for cs in out] == [
        [f"q{i} seed={s}" for s in (10, 11, 12)] for i in range(2)
    ]
    assert refused == 1 and sum(r["body"].get("n", 1) > 1 for r in server.requests) == 1
    assert len(server.requests) == 1 + 6 + 6


def test_fewer_choices_than_asked_are_completed_one_by_one():
    def one_choice(body):
        return completion_reply(body, [f"only seed={body.get('seed')}"])

    with FakeOpenAIServer([one_choice]) as server:
        (cs,) = engine_for(server).generate(ONE, SamplingParams(n=3, seed=0))
    assert [c.text for c in cs] == ["only seed=0", "only seed=1", "only seed=2"]


def test_refused_optional_fields_are_dropped_with_a_warning(caplog):
    """A hosted API that knows neither return_token_ids nor logprobs: asked again without each;
    the completion has no log-probs and its token count comes from usage."""

    def strict(body):
        for name in ("return_token_ids", "logprobs"):
            if name in body:
                return 400, {
                    "error": {"message": f"Unrecognized request argument supplied: {name}"}
                }
        return {"choices": [choice()], "usage": {"completion_tokens": 9}}

    with caplog.at_level(logging.WARNING), FakeOpenAIServer([strict]) as server:
        (cs,) = engine_for(server).generate(ONE, SamplingParams())
    assert cs[0].token_logprobs is None and cs[0].num_tokens == 9
    assert len(server.requests) == 3 and "refused 'logprobs'" in caplog.text


def test_malformed_and_empty_replies_are_graded_not_crashed():
    """Replies: empty content; content cut off (finish_reason missing); a prompt too long for
    the context (400). Each becomes a completion, and the grader records no_answer, truncated,
    truncated. (Replies that are not JSON or lack `choices` are asked again and stop the stage
    when they persist: tests/test_holes.py.)"""
    ctx = (400, {"error": {"message": "This model's maximum context length is 2048 tokens."}})
    script = [
        {"choices": [choice(message={"content": ""})]},
        {"choices": [choice(message={"content": "The answer is"}, finish_reason=None)]},
        ctx,
    ]
    problem = Problem(id="p", question="2+2?", answer="4", answer_type="exact")
    with FakeOpenAIServer(script) as server:
        engine = engine_for(server, concurrency=1)
        out = engine.generate(prompts(3), SamplingParams(n=1))
    verdicts = [
        verify_row(sample_row(problem, 0, [], cs[0], think_open=False, engine=engine))["verdict"]
        for cs in out
    ]
    assert verdicts == ["no_answer", "truncated", "truncated"]


def test_server_reasoning_becomes_the_rows_reasoning():
    reply = {
        "choices": [
            choice(message={"content": "The answer is 4.", "reasoning_content": "2 and 2 make 4"})
        ]
    }
    problem = Problem(id="p", question="2+2?", answer="4", answer_type="exact")
    with FakeOpenAIServer([reply]) as server:
        engine = engine_for(server)
        (cs,) = engine.generate(ONE, SamplingParams())
    row = verify_row(sample_row(problem, 0, [], cs[0], think_open=False, engine=engine))
    assert (row["reasoning"], row["response"], row["verdict"]) == (
        "2 and 2 make 4",
        "The answer is 4.",
        "correct",
    )


# ---------------------------------------------------------------------------- faults


def test_server_down_at_start_names_the_url_within_seconds():
    with FakeOpenAIServer([echo]) as server:
        url = server.base_url + "/v1"  # closed after the block: connection refused
    t0 = time.monotonic()
    with pytest.raises(EngineUnavailable, match=f"server {url} is not answering"):
        openai_engine([url], "fake")
    assert time.monotonic() - t0 < 6


def test_unknown_served_model_is_a_config_error():
    with FakeOpenAIServer([echo], models=("Qwen/Qwen3-8B",)) as server:
        with pytest.raises(ConfigError, match="Qwen/Qwen3-8B.*served_model"):
            openai_engine([server.base_url], "smollm2-135m")


def test_api_key_is_sent_but_never_written(monkeypatch, tmp_path, caplog):
    """The key goes in the Authorization header and nowhere else: not in the rows, the
    engine's repr or attributes, a log line, or the error when the server is gone."""
    secret = "sk-test-secret-4242"
    monkeypatch.setenv("MY_KEY", secret)
    with caplog.at_level(logging.DEBUG), FakeOpenAIServer([echo], die_after=1) as server:
        engine = engine_for(server, api_key_env="MY_KEY", max_retries=0)
        (cs,) = engine.generate(ONE, SamplingParams())
        with pytest.raises(EngineUnavailable) as e:
            engine.generate(ONE, SamplingParams())
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {secret}"
    problem = Problem(id="p", question="q0", answer="4", answer_type="exact")
    (tmp_path / "rows.jsonl").write_text(
        json.dumps(sample_row(problem, 0, ONE[0], cs[0], think_open=False, engine=engine))
    )
    seen = [
        repr(engine),
        str(e.value),
        caplog.text,
        (tmp_path / "rows.jsonl").read_text(),
        *(repr(vars(c)) for c in engine.clients),
        repr(vars(engine)),
    ]
    assert not any(secret in s for s in seen)


def test_server_killed_mid_run_then_rerun_resumes(monkeypatch, tmp_path, capsys):
    """`posttrain sample` (6 problems x 2 samples, 2 prompts per chunk, one request per prompt)
    against a server that dies after answering 3 requests: exit code 3, the message says 6
    samples are done (2 chunks of 2 prompts: 4 rows, then the one finished prompt of the third
    chunk: 2 more) and that a rerun resumes; 6 rows on disk. The server restarts on the same
    port, the same command finishes: 12 rows, no duplicate key, the first 6 lines unchanged.
    The engine is built by a stand-in for make_engine: the --base-url flags are wired by cli."""
    out = tmp_path / "samples.jsonl"
    argv = [
        "sample",
        "--problems",
        "builtin:arith:6",
        "--n",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    with FakeOpenAIServer([echo], die_after=3) as server:
        port = server.httpd.server_address[1]
        monkeypatch.setattr(
            "posttrain.commands.sample.make_engine",
            lambda *a, **k: engine_for(server, max_retries=1),
        )
        code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 3, err
    assert "6 samples are done" in err and "rerun the same command to resume" in err
    first = out.read_text().splitlines()
    assert len(first) == 6
    with FakeOpenAIServer([echo], port=port) as server:
        monkeypatch.setattr(
            "posttrain.commands.sample.make_engine", lambda *a, **k: engine_for(server)
        )
        assert cli.main(argv) == 0
    rows = read_jsonl(out)
    keys = [(r["problem"]["id"], r["sample_index"]) for r in rows]
    assert len(rows) == 12 and len(set(keys)) == 12
    assert out.read_text().splitlines()[:6] == first
    assert {r["engine"] for r in rows} == {"openai"}
