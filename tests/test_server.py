"""The OpenAI-compatible server driven by the official openai client over real HTTP."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import tierkv
from serving import openai_client, running_server

PROMPT = "Once upon a time"
CHAT = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about a cat."}]


@pytest.fixture(scope="module")
def engine():
    # fp32: the server caches prompts by default, and a cached prefix's KV (computed in other shapes) may
    # round a bf16 exact tie the other way; in fp32 the greedy outputs equal Engine.generate's exactly
    eng = tierkv.load("demo", device="cpu", dtype="float32")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine) as url:
        yield url


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def test_models_lists_the_served_model(server, engine):
    models = openai_client(server).models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_completion_equals_engine_generate(server, engine):
    ref = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    out = openai_client(server).completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0,
                                                   extra_body={"ignore_eos": True})
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids) and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_token_id_prompt_and_stop_string(server, engine):
    ids = engine.encode(PROMPT)
    ref = engine.generate(ids, max_new_tokens=20, ignore_eos=True)
    stop = ref.text[3:6]
    expect = engine.generate(ids, max_new_tokens=20, ignore_eos=True, stop=stop)
    out = openai_client(server).completions.create(model="demo", prompt=ids, max_tokens=20, temperature=0,
                                                   stop=[stop], extra_body={"ignore_eos": True})
    assert out.choices[0].text == expect.text and out.choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_engine_generate(server, engine):
    ref = engine.generate(PROMPT, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    out = openai_client(server).completions.create(model="demo", prompt=PROMPT, max_tokens=10, temperature=0.8,
                                                   top_p=0.9, seed=7)
    assert out.choices[0].text == ref.text


def test_streamed_completion_joins_to_the_whole(server, engine):
    ref = engine.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    chunks = list(openai_client(server).completions.create(
        model="demo", prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_chat_applies_the_template(server, engine):
    ids = engine.tokenizer.encode_chat(CHAT)
    ref = engine.generate(ids, max_new_tokens=12)
    out = openai_client(server).chat.completions.create(model="demo", messages=CHAT, max_tokens=12, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ids)


def test_streamed_chat_with_usage(server, engine):
    ref = engine.generate(engine.tokenizer.encode_chat(CHAT), max_new_tokens=12)
    chunks = list(openai_client(server).chat.completions.create(
        model="demo", messages=CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_sse_wire_format(server):
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_eight_concurrent_clients(server, engine):
    seeds = list(range(8))
    refs = [engine.generate(PROMPT, max_new_tokens=10, temperature=0.9, seed=s).text for s in seeds]

    def ask(seed: int) -> str:
        stream = openai_client(server).completions.create(model="demo", prompt=PROMPT, max_tokens=10,
                                                          temperature=0.9, seed=seed, stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, seeds))
    assert got == refs


def _wait_for(cond, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(engine, stream):
    with running_server(engine) as url:
        body = {"model": "demo", "prompt": PROMPT, "max_tokens": 480, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        if stream:
            with httpx.stream("POST", f"{url}/v1/completions", json=body) as resp:
                next(resp.iter_bytes())             # generation under way; then the client leaves
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
        assert _wait_for(lambda: health(url)["cancelled"] == 1 and health(url)["active"] == 0)
        got = health(url)
        assert got["completed"] == 0 and got["live_sequences"] == 0
        assert engine.kv_stats()["live_sequences"] == 0
        # and the server keeps serving
        out = openai_client(url).completions.create(model="demo", prompt=PROMPT, max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1
