"""The OpenAI wire format: request validation and the response and stream-chunk objects.

Why this module exists: the server's routes (``app``) should be about HTTP, streaming and
cancellation; what a request may say (fields, types, limits) and what the answers look like
(completion, chat completion, their SSE chunks, the error object) is the protocol, kept here in one
place and free of any web framework so it is tested and read on its own.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tierkv.errors import TierkvError

__all__ = ["APIError", "ParsedRequest", "chat_chunk", "chat_response", "completion_chunk", "completion_response",
           "error_body", "finish_reason", "parse_request", "sse", "usage"]

DEFAULT_COMPLETION_TOKENS = 16      # OpenAI's default max_tokens for /v1/completions
MAX_STOP_STRINGS = 4

# fields the server reads; ``_NEUTRAL`` ones are accepted only with the value that changes nothing
_COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
           "n", "user", "cache_prompt", "ignore_eos"}
_FIELDS = {"completion": _COMMON | {"prompt"}, "chat": _COMMON | {"messages", "max_completion_tokens"}}
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {}),
    "logprobs": (None, False), "echo": (False, None), "suffix": (None, ""), "best_of": (1, None),
    "top_logprobs": (None, 0), "parallel_tool_calls": (None,), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}), "store": (None, False), "metadata": (None, {}),
}
_ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}`` with a status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class ParsedRequest:
    """What one completion or chat request asks the engine for."""

    kind: str                           # "completion" or "chat"
    prompt_ids: list[int]
    sampling: dict[str, Any]            # Engine.astream keyword arguments
    stream: bool = False
    include_usage: bool = False
    cache_prompt: bool = True
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{name} must be a number, not {type(value).__name__}", name)
    if not (lo < value if lo_open else lo <= value) or value > hi:
        raise _bad(f"{name}={value} is out of range: give {'more than' if lo_open else 'at least'} {lo} "
                   f"and at most {hi}", name)
    return float(value)


def _whole(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be a whole number, not {type(value).__name__}", name)
    if value < lo or (hi is not None and value > hi):
        raise _bad(f"{name}={value} is out of range ({lo}..{hi if hi is not None else ''})", name)
    return value


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false", name)
    return value


def _check_fields(body: dict[str, Any], kind: str) -> None:
    for name, value in body.items():
        if name in _FIELDS[kind]:
            continue
        if name in _NEUTRAL:
            if value in _NEUTRAL[name]:
                continue
            raise _bad(f"{name}={json.dumps(value)[:60]} is not supported by this server; leave it out", name)
        raise _bad(f"unknown or unsupported field {name!r}; supported: {', '.join(sorted(_FIELDS[kind]))}", name)


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"stop holds {len(stops)} strings; give at most {MAX_STOP_STRINGS}", "stop")
    return [s for s in stops if s]


def _prompt(body: dict[str, Any], engine: Any) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("this server takes one prompt per request; send the prompts as separate requests", "prompt")
    if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise _bad("prompt must be a string or a list of token ids (whole numbers)", "prompt")
    if not isinstance(prompt, (str, list)):
        raise _bad(f"prompt must be a string or a list of token ids, not {type(prompt).__name__}", "prompt")
    return _encode(engine, prompt, "prompt")


def _message_text(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise _bad(f"messages[{i}] must be an object with role and content", "messages")
    role, content = message.get("role"), message.get("content")
    if role not in _ROLES:
        raise _bad(f"messages[{i}].role={role!r}: use one of {', '.join(_ROLES)}", "messages")
    if isinstance(content, list):       # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return {"role": "system" if role == "developer" else role, "content": content}


def _chat_prompt(body: dict[str, Any], engine: Any) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    rendered = [_message_text(m, i) for i, m in enumerate(messages)]
    tokenizer = engine.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        raise _bad("this model has no chat template; use /v1/completions with a plain prompt", "messages")
    try:
        return _encode(engine, tokenizer.encode_chat(rendered), "messages")
    except TierkvError as exc:          # the template raised (e.g. roles out of order)
        raise _bad(str(exc), "messages") from None


def _encode(engine: Any, prompt: Any, param: str) -> list[int]:
    try:
        return engine.encode(prompt)
    except (TierkvError, TypeError) as exc:
        code = "context_length_exceeded" if "at most" in str(exc) else None
        raise _bad(str(exc), param, code) from None


def parse_request(body: Any, kind: str, engine: Any, model_name: str) -> ParsedRequest:
    """Validate a completion (``kind="completion"``) or chat request body against the engine; APIError if bad."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    _check_fields(body, kind)
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model is required (a string; GET /v1/models lists it)", "model")
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    if _whole(body, "n", 1) not in (None, 1):
        raise _bad("n must be 1: this server returns one choice per request", "n")
    ids = _prompt(body, engine) if kind == "completion" else _chat_prompt(body, engine)
    room = engine.context_limit_tokens - len(ids)
    asked = _whole(body, "max_tokens", 1) if body.get("max_tokens") is not None else \
        _whole(body, "max_completion_tokens", 1)
    if asked is not None and asked > room:
        raise _bad(f"max_tokens={asked} plus the prompt's {len(ids)} tokens exceed the model's context of "
                   f"{engine.context_limit_tokens} tokens; ask for at most {room}", "max_tokens",
                   "context_length_exceeded")
    default = min(DEFAULT_COMPLETION_TOKENS, room) if kind == "completion" else room
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise _bad("stream_options may only hold include_usage", "stream_options")
    sampling = {"max_new_tokens": default if asked is None else asked,
                "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
                "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                "top_k": _whole(body, "top_k", 0) or 0, "seed": _whole(body, "seed", 0, 2**64 - 1),
                "stop": _stop(body), "ignore_eos": _flag(body, "ignore_eos", False)}
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user")
    return ParsedRequest(kind, ids, sampling, stream=_flag(body, "stream", False),
                         include_usage=_flag(options or {}, "include_usage", False),
                         cache_prompt=_flag(body, "cache_prompt", True))


def finish_reason(reason: str) -> str:
    """The engine's finish reason as OpenAI names it ("stop" for EOS and stop strings, "length")."""
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens whose KV came from the prompt cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(req: ParsedRequest, model: str, text: str, reason: str, new_tokens: int,
                        cached_tokens: int = 0) -> dict[str, Any]:
    return {"id": f"cmpl-{req.id}", "object": "text_completion", "created": req.created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason(reason), "logprobs": None}],
            "usage": usage(len(req.prompt_ids), new_tokens, cached_tokens)}


def chat_response(req: ParsedRequest, model: str, text: str, reason: str, new_tokens: int,
                  cached_tokens: int = 0) -> dict[str, Any]:
    return {"id": f"chatcmpl-{req.id}", "object": "chat.completion", "created": req.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason(reason), "logprobs": None}],
            "usage": usage(len(req.prompt_ids), new_tokens, cached_tokens)}


def _chunk(req: ParsedRequest, model: str, obj: str, id_prefix: str, choice: dict[str, Any] | None,
           reason: str | None, use: dict[str, int] | None) -> dict[str, Any]:
    """One SSE chunk: ``choice`` holds the piece ({"text": ...} or {"delta": ...}); None is the usage chunk."""
    choices = [] if choice is None else [{"index": 0, **choice, "logprobs": None,
                                          "finish_reason": None if reason is None else finish_reason(reason)}]
    out: dict[str, Any] = {"id": f"{id_prefix}-{req.id}", "object": obj, "created": req.created,
                           "model": model, "choices": choices}
    if req.include_usage:
        out["usage"] = use
    return out


def completion_chunk(req: ParsedRequest, model: str, text: str | None, reason: str | None,
                     use: dict[str, int] | None = None) -> dict[str, Any]:
    """One SSE chunk of a streamed completion; ``text=None`` is the usage chunk (no choices)."""
    return _chunk(req, model, "text_completion", "cmpl", None if text is None else {"text": text}, reason, use)


def chat_chunk(req: ParsedRequest, model: str, delta: dict[str, str] | None, reason: str | None,
               use: dict[str, int] | None = None) -> dict[str, Any]:
    """One SSE chunk of a streamed chat completion; ``delta=None`` is the usage chunk (no choices)."""
    return _chunk(req, model, "chat.completion.chunk", "chatcmpl", None if delta is None else {"delta": delta},
                  reason, use)


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
