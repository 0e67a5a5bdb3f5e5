"""Server refusals: the API key, the Host guard, body limits, bad requests (4xx with an OpenAI error
object) while other clients keep being served; the bind policy of ``tierkv serve``."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

import tierkv
from serving import openai_client, running_server
from tierkv.cli_serve import bind_policy, is_loopback
from tierkv.server.app import LOOPBACK_HOSTS, MAX_BODY_BYTES

KEY = "s3cret-key"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine():
    eng = tierkv.load("demo", device="cpu")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def keyed(engine):
    with running_server(engine, api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def open_server(engine):
    with running_server(engine) as url:
        yield url


def assert_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                         ("POST", "/v1/chat/completions"), ("GET", "/v1/nothing")])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {KEY}", KEY])
def test_every_route_needs_the_key(keyed, method, path, auth):
    headers = {} if auth is None else {"authorization": auth}
    err = assert_error(httpx.request(method, keyed + path, headers=headers, json={}), 401)
    assert err["type"] == "authentication_error"


def test_health_and_page_need_no_key_and_the_key_works(keyed):
    assert httpx.get(f"{keyed}/health").json()["status"] == "ok"
    assert httpx.get(f"{keyed}/").status_code == 200
    out = openai_client(keyed, api_key=KEY).completions.create(model="demo", prompt=PROMPT, max_tokens=3,
                                                                temperature=0)
    assert out.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai_client(keyed, api_key="nope").models.list()


def test_dns_rebinding_host_is_refused(open_server):
    err = assert_error(httpx.get(f"{open_server}/v1/models", headers={"host": "evil.example:80"}), 400)
    assert err["code"] == "invalid_host"
    assert httpx.get(f"{open_server}/v1/models", headers={"host": "localhost:1234"}).status_code == 200


def post(url: str, body: object, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, **kwargs)


GOOD = {"model": "demo", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}


@pytest.mark.parametrize("change,status,param", [
    ({"model": "gpt-9"}, 404, "model"),
    ({"model": None}, 400, "model"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"max_tokens": "many"}, 400, "max_tokens"),
    ({"temperature": -0.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"prompt": 42}, 400, "prompt"),
    ({"prompt": {"text": "x"}}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"prompt": ["one", "two"]}, 400, "prompt"),
    ({"prompt": [10 ** 9]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"n": 2}, 400, "n"),
    ({"stop": 5}, 400, "stop"),
    ({"seed": "x"}, 400, "seed"),
    ({"logprobs": 5}, 400, "logprobs"),
    ({"frobnicate": True}, 400, "frobnicate"),
    ({"stream": "yes"}, 400, "stream"),
])
def test_bad_fields_are_refused(open_server, change, status, param):
    err = assert_error(post(open_server, {**GOOD, **change}), status)
    assert err["param"] == param


def test_bad_chat_messages(open_server):
    for messages in (None, [], "hi", [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]):
        resp = httpx.post(f"{open_server}/v1/chat/completions", json={"model": "demo", "messages": messages})
        assert assert_error(resp, 400)["param"] == "messages"


def test_body_limits_and_content_types(open_server):
    big = {**GOOD, "prompt": "x" * (MAX_BODY_BYTES + 10)}
    assert_error(post(open_server, big), 413)
    chunks = (b"x" * 65536 for _ in range(MAX_BODY_BYTES // 65536 + 2))    # no Content-Length: counted as read
    assert_error(httpx.post(f"{open_server}/v1/completions", content=chunks,
                            headers={"content-type": "application/json"}), 413)
    assert_error(httpx.post(f"{open_server}/v1/completions", content=b"{not json",
                            headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(f"{open_server}/v1/completions", content=b"[1, 2]",
                            headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(f"{open_server}/v1/completions", content=b"prompt=x",
                            headers={"content-type": "application/x-www-form-urlencoded"}), 415)
    assert_error(httpx.get(f"{open_server}/v1/completions"), 405)
    assert_error(httpx.get(f"{open_server}/nowhere"), 404)


def test_refusals_do_not_disturb_a_running_stream(open_server, engine):
    ref = engine.generate(PROMPT, max_new_tokens=60, ignore_eos=True).text
    got: list[str] = []

    def stream() -> None:
        chunks = openai_client(open_server).completions.create(model="demo", prompt=PROMPT, max_tokens=60,
                                                               temperature=0, stream=True,
                                                               extra_body={"ignore_eos": True})
        got.append("".join(c.choices[0].text for c in chunks if c.choices))
    worker = threading.Thread(target=stream)
    worker.start()
    for _ in range(10):
        assert_error(post(open_server, {**GOOD, "temperature": -1}), 400)
        assert_error(httpx.post(f"{open_server}/v1/completions", content=b"{", headers={
            "content-type": "application/json"}), 400)
    worker.join(timeout=60)
    assert got == [ref]
    assert httpx.get(f"{open_server}/health").json()["rejected"] >= 20


def test_bind_policy():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("myhost")
    assert bind_policy("127.0.0.1", None, False) == LOOPBACK_HOSTS
    with pytest.raises(tierkv.ArgumentError, match="--api-key"):
        bind_policy("0.0.0.0", None, False)
    assert bind_policy("0.0.0.0", KEY, False) is None
    assert bind_policy("0.0.0.0", None, True) is None


def test_serve_refuses_a_keyless_public_bind(monkeypatch):
    from typer.testing import CliRunner

    from tierkv.cli import app
    monkeypatch.delenv("TIERKV_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "demo", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 2 and "--insecure-no-key" in result.output


def test_without_the_extra_the_error_names_the_install():
    code = ("import sys; sys.modules['uvicorn'] = None\n"
            "try:\n    import tierkv.server\nexcept ImportError as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"})
    assert "pip install starlette uvicorn" in done.stdout and "tierkv[serve]" in done.stdout, done.stderr
