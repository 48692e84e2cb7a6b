"""What a chat completions request may say, checked before any work: the body's fields, their
types and ranges, the conversation's shape and size, and its prompt within the model's context.

Every refusal is a RequestError naming the field (`param`) and a machine-readable `code`, which
the server answers in OpenAI's error shape. Fields are checked by name: the ones in ACCEPTED
are honoured; NEUTRAL ones are accepted only at the value that asks for nothing (a `tools` list
that is empty, a `response_format` of text, penalties of 0); anything else, including a field
this server does not know, is refused rather than silently ignored.
"""

from __future__ import annotations

import json

from .config import DEFAULT_TEMPERATURE, MAX_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_K_RANGE
from .conversation import render_for_completion

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
TOP_LOGPROBS_RANGE = (0, 20)  # OpenAI's bound
MAX_STOPS, MAX_STOP_CHARS = 4, 100
MAX_BODY_BYTES = 512 * 1024  # 32,000 chars of JSON-escaped text and 500 envelopes fit easily

# honoured (see parse_request); `model` and `user` are accepted and not used
ACCEPTED = (
    "messages",
    "model",
    "temperature",
    "top_k",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "n",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "user",
)
STREAM_OPTIONS = ("include_usage", "include_obfuscation")  # the second only pads chunks: nothing to do
# field -> is this value a request for nothing? (then it is accepted; otherwise refused by name)
NEUTRAL = {
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),  # only means something with tools
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "frequency_penalty": lambda v: v is None or (not isinstance(v, bool) and v == 0),
    "presence_penalty": lambda v: v is None or (not isinstance(v, bool) and v == 0),
    "logit_bias": lambda v: v is None or v == {},
    "modalities": lambda v: v is None or v == ["text"],
    "store": lambda v: v is None or v is False,
    "metadata": lambda v: v is None or isinstance(v, dict),  # a label for the caller's own records
}


class RequestError(Exception):
    """A refused request: HTTP status, message, and for the OpenAI shape the offending param
    and a machine-readable code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _shown(v) -> str:
    return json.dumps(v)[:40]


def _number(body: dict, key: str, default, lo, hi, integer: bool, lo_open: bool = False):
    v = body.get(key)
    if v is None:
        return default
    # (no float() of an int: 10**400 is valid JSON and would overflow)
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or (integer and isinstance(v, float) and not v.is_integer())
    ):
        raise RequestError(
            400, f"{key} must be {'an integer' if integer else 'a number'}, got {_shown(v)}", key, "invalid_type"
        )
    if not (lo < v if lo_open else lo <= v) or not v <= hi:
        raise RequestError(400, f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key, "invalid_value")
    return int(v) if integer else float(v)


def _flag(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(400, f"{key} must be true or false, got {_shown(v)}", key, "invalid_type")
    return v


def _check_fields(body: dict) -> None:
    for key, v in body.items():
        if key in ACCEPTED:
            continue
        if key not in NEUTRAL:
            raise RequestError(
                400,
                f"unknown field {key[:60]!r}; this server accepts {', '.join(ACCEPTED)}",
                key[:60],
                "unknown_parameter",
            )
        if not NEUTRAL[key](v):
            raise RequestError(
                400, f"{key} is not supported by this server (got {_shown(v)})", key, "unsupported_parameter"
            )


def _content_text(content, i: int):
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(
            400,
            f"message {i} must be an object with a string 'content' (or text parts)",
            f"messages.[{i}].content",
            "invalid_type",
        )
    return content


def _messages(msgs) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    if len(msgs) > MAX_MESSAGES:
        raise RequestError(
            413, f"too many messages: {len(msgs)} > {MAX_MESSAGES}", "messages", "array_above_max_length"
        )
    total = 0
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(400, f"message {i} must be an object with a string 'content'", f"messages.[{i}]")
        content = _content_text(m.get("content"), i)
        role = "system" if m.get("role") == "developer" else m.get("role")  # OpenAI's newer name
        if role not in ("system", "user", "assistant") or (role == "system" and i != 0):
            raise RequestError(
                400,
                f"message {i}: role must be user or assistant (system only first), got {str(role)[:40]!r}",
                f"messages.[{i}].role",
            )
        n = len(content)
        if n > MAX_MESSAGE_CHARS:
            raise RequestError(
                413,
                f"message {i} is too long: {n} > {MAX_MESSAGE_CHARS} characters",
                f"messages.[{i}].content",
                "string_above_max_length",
            )
        total += n
        clean.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(
            413,
            f"the conversation is too long: {total} > {MAX_TOTAL_CHARS} characters",
            "messages",
            "context_length_exceeded",
        )
    expect = "user"
    for i, m in enumerate(clean):
        if m["role"] == "system":
            continue
        if m["role"] != expect:
            raise RequestError(
                400,
                f"message {i}: expected role {expect!r}, got {m['role']!r} (roles alternate "
                "user, assistant, ... and end with user)",
                f"messages.[{i}].role",
            )
        expect = "assistant" if expect == "user" else "user"
    if clean[-1]["role"] != "user":
        raise RequestError(400, "the last message must be from the user", "messages")
    return clean


def parse_request(
    body,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = 50,
    max_tokens: int = 512,
    model_id: str | None = None,
) -> dict:
    """Check a chat completions body (the page's or OpenAI's) against the limits; defaults fill
    missing settings. Returns {"messages", "temperature", "top_k", "top_p", "max_tokens", "seed",
    "stop", "stream", "include_usage", "logprobs"} (logprobs: None, or how many alternatives to
    report per token); raises RequestError. With `model_id`, another model name is a 404, as
    OpenAI answers an unknown model."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    if model_id is not None and body.get("model") not in (None, model_id):
        raise RequestError(
            404,
            f"The model {_shown(body['model'])} does not exist; this server has {model_id!r} (GET /v1/models)",
            "model",
            "model_not_found",
        )
    _check_fields(body)
    clean = _messages(body.get("messages"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise RequestError(400, "seed must be a non-negative integer", "seed", "invalid_type")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError(400, f"only n=1 is supported, got {_shown(n)}", "n", "invalid_value")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise RequestError(
            400,
            f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings of at "
            f"most {MAX_STOP_CHARS} characters",
            "stop",
        )
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - set(STREAM_OPTIONS)):
        raise RequestError(
            400, f"stream_options must be an object with at most {', '.join(STREAM_OPTIONS)}", "stream_options"
        )
    include_usage = _flag(options or {}, "include_usage")
    logprobs = _flag(body, "logprobs")
    top_logprobs = _number(body, "top_logprobs", None, *TOP_LOGPROBS_RANGE, integer=True)
    if top_logprobs is not None and not logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError(400, "user must be a string", "user", "invalid_type")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return {
        "messages": clean,
        "temperature": _number(body, "temperature", temperature, *TEMPERATURE_RANGE, integer=False),
        "top_k": _number(body, "top_k", top_k, *TOP_K_RANGE, integer=True),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, integer=False, lo_open=True),
        "max_tokens": _number(body, key, max_tokens, *MAX_TOKENS_RANGE, integer=True),
        "seed": seed,
        "stop": stops,
        "stream": stream,
        "include_usage": include_usage,
        "logprobs": (top_logprobs or 0) if logprobs else None,
    }


def fit_prompt(tok, messages: list[dict], context: int, max_tokens: int = 1) -> list[int]:
    """Prompt ids for the reply. The oldest user/assistant pairs (after a leading system
    message) are dropped while the prompt leaves less than min(max_tokens, context/2) tokens of
    the model's context for the reply; RequestError if the last turn alone fills the context,
    or when the tokenizer refuses the text (a ValueError: e.g. its split pattern's regex hit
    its backtracking limit on this input)."""
    msgs = list(messages)
    head = 1 if msgs[0]["role"] == "system" else 0
    room = max(1, min(max_tokens, context // 2))
    while True:
        try:
            prompt = render_for_completion(tok, {"messages": msgs + [{"role": "assistant", "content": ""}]})
        except ValueError as e:
            raise RequestError(
                400, f"the model's tokenizer cannot encode this text: {str(e)[:200]}", "messages", "invalid_value"
            ) from None
        if len(prompt) + room <= context:
            return [int(t) for t in prompt]
        if len(msgs) - head <= 1:
            if len(prompt) < context:
                return [int(t) for t in prompt]  # a shorter reply, but an answer
            raise RequestError(
                413,
                f"the message is {len(prompt)} tokens; the model's context is {context}",
                "messages",
                "context_length_exceeded",
            )
        del msgs[head : head + 2]


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
