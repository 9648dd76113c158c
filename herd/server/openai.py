"""OpenAI-compatible endpoints: JSON in, engine requests, JSON or Server-Sent Events out.

/v1/chat/completions, /v1/completions (echo with prompt logprobs), /v1/models, /tokenize, /detokenize,
/health, /metrics. Tool calls are the model's own format (herd.chat renders and parses them);
tool_choice "required" or a named function, and response_format json_object / json_schema, run
through constrained decoding (herd.engine.constrained), so their output parses and validates.

Tokenizing, rendering the chat template and compiling a JSON schema can take seconds for a large
request, so they run in a worker thread (asyncio.to_thread): the event loop keeps answering /health
and streaming meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from herd.chat.tools import functions, parse_reply
from herd.engine import AsyncEngine, QueueFull, Request as EngineRequest, RequestOutput
from herd.engine.constrained import UnsupportedSchema, json_constraint
from herd.errors import ContextOverflow, HerdError
from herd.sampling import SamplingParams
from herd.server.budget import InputBudget
from herd.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest)
from herd.server.sse import DONE, SSEResponse, event, until_disconnect

router = APIRouter()


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": _printable(message), "type": type, "param": _printable(param), "code": code}}
    return JSONResponse(body, status_code=status)


def _printable(text: str | None) -> str | None:
    """`text` as valid Unicode: a client's lone surrogate quoted in a message becomes its escape (\\ud800)
    rather than a response that cannot be encoded."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(text, str) else text


@dataclass
class Served:
    """What the handlers share (app.state.served)."""

    llm: Any  # herd.api.LLM
    engine: AsyncEngine
    model_id: str  # the name /v1/models lists
    aliases: set[str]  # other names requests may use for it (the SOURCE as given)
    context: int  # tokens per sequence: prompt + output must fit
    created: int = field(default_factory=lambda: int(time.time()))
    adapters: dict[str, int] = field(default_factory=dict)  # LoRA adapter name -> its index in the model (1..)
    read_image: Any = None  # herd.server.images.ImageSources: data URLs, and http(s) ones with --allow-image-urls
    max_images: int | None = None  # images in one request
    max_image_pixels: int | None = None  # decoded pixels of one request's images together
    inputs: InputBudget = field(default_factory=lambda: InputBudget(8 << 20))  # input prepared at once


def served(request: Request) -> Served:
    return request.app.state.served


def _check_model(s: Served, name: str | None) -> int:
    """The adapter a request's `model` names: 0 for the base model (or no name), i for adapter i."""
    _check_text(name, "model")
    if name is None or name == s.model_id or name in s.aliases:
        return 0
    if name in s.adapters:
        return s.adapters[name]
    names = ", ".join(f"`{n}`" for n in [s.model_id, *s.adapters])
    raise APIError(404, f"The model `{name}` does not exist; this server serves {names}.",
                   param="model", code="model_not_found")


def _sampling(body, seed: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, seed=seed,
            logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _check_text(value, param: str) -> None:
    """400 naming `param` if a string anywhere in `value` is not valid Unicode: JSON's \\ud800 escape
    gives Python a lone surrogate, which no tokenizer can encode."""
    todo = [(value, param)]
    while todo:
        v, where = todo.pop()
        if isinstance(v, str):
            if v.isascii():
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(400, f"{where} is not valid Unicode: it holds a lone surrogate ({v[e.start]!r}) at "
                                    f"character {e.start}", param=param) from None
        elif isinstance(v, dict):
            todo += [(k, f"{where} (a key)") for k in v]
            todo += [(x, f"{where}.{k}") for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            todo += [(x, f"{where}[{i}]") for i, x in enumerate(v)]


async def _prepare(s: Served, share: int, work, *args):
    """work(*args) in a worker thread, holding `share` bytes of the server's InputBudget while it runs (also
    when the request is cancelled meanwhile: the thread runs on, and so does what it costs)."""
    async with s.inputs.hold(share):
        done = asyncio.ensure_future(asyncio.to_thread(work, *args))
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            await asyncio.gather(done, return_exceptions=True)
            raise


def _has_images(messages) -> bool:
    """Whether any message holds a content part that is not text (an image part, or one the template will
    refuse): such a request is prepared with the whole InputBudget, for decoding images costs more than
    their bytes say."""
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(not (isinstance(p, dict) and p.get("type") == "text") for p in m["content"])
               for m in messages)


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _requests(s: Served, prompt_ids: list[int], max_tokens: int | None, body, n: int, prefix: str,
              **kwargs) -> list[EngineRequest]:
    if max_tokens is None:
        max_tokens = max(s.context - len(prompt_ids), 0)
    reqs = []
    for i in range(n):
        seed = body.seed + i if body.seed is not None else None  # n > 1: distinct but reproducible draws
        req = EngineRequest(f"{prefix}-{i}", list(prompt_ids), max_tokens, _sampling(body, seed), **kwargs)
        try:
            s.engine.engine.validate(req)
        except ContextOverflow as e:
            raise APIError(400, f"This model's context for this server is {s.context} tokens: {e}",
                           param="messages" if prefix.startswith("chatcmpl") else "prompt",
                           code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        reqs.append(req)
    return reqs


def _submit(s: Served, reqs: list[EngineRequest]):
    try:
        return s.engine.submit(*reqs)
    except QueueFull as e:
        raise APIError(429, f"The server is busy: {e}. Retry later.", type="rate_limit_error",
                       code="queue_full") from None
    except (ContextOverflow, ValueError) as e:
        raise APIError(400, str(e)) from None


@dataclass
class Choice:
    """One choice as it accumulates: text, tokens, logprobs, and what was already streamed."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    sent: int = 0  # characters of text already streamed as content
    held: bool = False  # auto tool mode: a tool call may have started; hold the rest
    opened: bool = False  # named tool mode: the tool call's header was sent
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    def add(self, out: RequestOutput) -> None:
        if out.error is not None:
            raise APIError(500, f"generation failed: {out.error}", type="server_error", code="internal_error")
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.finish_reason = out.finish_reason
        self.cached_tokens = max(self.cached_tokens, out.cached_tokens)


async def _collect(s: Served, reqs: list[EngineRequest], choices: list[Choice]) -> None:
    by_id = {r.request_id: c for r, c in zip(reqs, choices)}
    async for out in s.engine.outputs(_submit(s, reqs), reqs):
        by_id[out.request_id].add(out)


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(len(c.token_ids) for c in choices)
    cached = min(c.cached_tokens for c in choices) if choices else 0  # OpenAI's field: the prompt's, once
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# -- chat ------------------------------------------------------------------------------------------------------

TOOL_STARTS = ("<|python_tag|>", "<|python_start|>", "<function=", "<tool_call>", "[", "{")
TOOL_TAGS = ("<function=", "<tool_call>")


@dataclass
class ChatPlan:
    mode: str | None  # None (plain text), "auto" (model's own tool format), "named", "required" (constrained)
    tools: list[dict] | None
    named: str | None
    fmt: Any


def _chat_plan(s: Served, body: ChatCompletionRequest) -> tuple[ChatPlan, dict | None, bool]:
    """(plan, JSON schema, constrained?) for the request's tools, tool_choice and response_format."""
    tools = body.tools or None
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    fmt = s.llm.chat_format
    try:
        fns = functions(tools)
    except HerdError as e:
        raise APIError(400, str(e), param="tools") from None
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice needs a non-empty tools list", param="tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                                '"function": {"name": NAME}}', param="tool_choice")
        match = [f for f in fns if f["name"] == name]
        if not match:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        return ChatPlan("named", tools, name, fmt), match[0].get("parameters") or {"type": "object"}, True
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                   "parameters": f.get("parameters") or {"type": "object"}},
                  "required": ["name", "parameters"]} for f in fns]
        return ChatPlan("required", tools, None, fmt), {"type": "array", "minItems": 1,
                                                        "items": {"anyOf": items}}, True
    plan = ChatPlan("auto" if choice == "auto" else None, tools if choice == "auto" else None, None, fmt)
    rf = body.response_format
    if rf is None or rf.type == "text":
        return plan, None, False
    if rf.type == "json_object":
        return plan, None, True
    if rf.json_schema is None or rf.json_schema.json_schema is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    return plan, rf.json_schema.json_schema, True


def _tool_call(name: str, arguments: str, index: int | None = None) -> dict:
    call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


def _final_message(plan: ChatPlan, c: Choice) -> tuple[str | None, list[dict], str]:
    """(content, tool_calls, finish_reason) of a finished choice."""
    finish = c.finish_reason or "stop"
    if plan.mode == "named":
        return None, [_tool_call(plan.named, c.text)], "tool_calls" if finish == "stop" else finish
    if plan.mode == "required":
        try:
            calls = [_tool_call(x["name"], json.dumps(x["parameters"], ensure_ascii=False)) for x in json.loads(c.text)]
            return None, calls, "tool_calls"
        except (ValueError, KeyError, TypeError):
            return c.text, [], finish  # cut by max_tokens before the JSON closed
    if plan.mode == "auto":
        content, calls = parse_reply(c.text, plan.fmt, plan.tools)
        if calls:
            return content, calls, "tool_calls"
    return c.text, [], finish


def _chat_logprobs(items) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [dict(entry(lp.text, lp.logprob), top_logprobs=[entry(t, v) for _, t, v in lp.top])
                        for lp in items]}


def _chat_inputs(s: Served, body: ChatCompletionRequest, plan: ChatPlan, schema: dict | None, constrained: bool,
                 stop_ids: frozenset):
    """(prompt ids, constraint factory or None, images); slow for a large request (or one with images), so
    run in a worker thread."""
    llm = s.llm
    _check_text(body.messages, "messages")
    _check_text(body.tools, "tools")
    try:
        prompt_ids, images = llm.chat_inputs(body.messages, plan.tools, read_image=s.read_image,
                                             max_images=s.max_images, max_total_pixels=s.max_image_pixels)
    except (HerdError, ValueError, TypeError) as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    if not constrained:
        return prompt_ids, None, images
    param = "tool_choice" if plan.mode in ("named", "required") else "response_format"
    _check_text(schema, param)
    try:
        return prompt_ids, json_constraint(schema, llm.tokenizer, stop_ids, llm.config.vocab_size), images
    except UnsupportedSchema as e:
        raise APIError(400, f"{param}: {e}", param=param) from None


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    s = served(request)
    adapter = _check_model(s, body.model)
    plan, schema, constrained = _chat_plan(s, body)
    llm = s.llm
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    eot = llm.end_of_turn(plan.fmt)
    stop_ids = eot.token_ids
    share = s.inputs.capacity if _has_images(body.messages) else len(await request.body())
    prompt_ids, constraint, images = await _prepare(s, share, _chat_inputs, s, body, plan, schema, constrained,
                                                    stop_ids)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    cid = "chatcmpl-" + uuid.uuid4().hex
    reqs = _requests(s, prompt_ids, max_tokens, body, body.n, cid, stop_ids=stop_ids,
                     stop=tuple(_stops(body.stop) + list(eot.texts)),
                     logprobs=(body.top_logprobs or 0) if body.logprobs else None, constraint=constraint,
                     adapter=adapter, images=tuple(images))
    choices = [Choice(i) for i in range(body.n)]
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        queue = _submit(s, reqs)
        return SSEResponse(_chat_stream(s, reqs, queue, choices, plan, cid, created, body.model, len(prompt_ids),
                                        include_usage, body.logprobs))
    await until_disconnect(request, _collect(s, reqs, choices))
    out = []
    for c in choices:
        content, calls, finish = _final_message(plan, c)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        out.append({"index": c.index, "message": message, "finish_reason": finish,
                    "logprobs": _chat_logprobs(c.logprobs) if body.logprobs else None})
    return {"id": cid, "object": "chat.completion", "created": created, "model": body.model, "choices": out,
            "usage": _usage(len(prompt_ids), choices)}


def _deltas(plan: ChatPlan, c: Choice, finished: bool) -> tuple[list[dict], str | None]:
    """The deltas to send for a choice now, and its finish_reason once finished."""
    if plan.mode in (None, "named") or (plan.mode == "required" and not finished):
        new, c.sent = c.text[c.sent:], len(c.text)
        if plan.mode is None:
            deltas = [{"content": new}] if new else []
        elif plan.mode == "required":
            deltas = []  # the JSON array is parsed whole at the end
        else:
            deltas = [] if c.opened else [{"tool_calls": [_tool_call(plan.named, "", 0)]}]
            c.opened = True
            if new:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": new}}]})
        if not finished:
            return deltas, None
        return deltas, _final_message(plan, c)[2] if plan.mode == "named" else (c.finish_reason or "stop")
    if finished:
        content, calls, finish = _final_message(plan, c)
        deltas = []
        rest = content or ""
        if calls:
            already = c.text[:c.sent]
            rest = rest[len(already):] if rest.startswith(already) else ""
        else:
            rest = c.text[c.sent:]
        if rest:
            deltas.append({"content": rest})
        if calls:
            deltas.append({"tool_calls": [dict(call, index=i) for i, call in enumerate(calls)]})
        c.sent = len(c.text)
        return deltas, finish
    # auto mode, running: stream content unless a tool call may be starting
    if c.held:
        return [], None
    if c.sent == 0:
        head = c.text.lstrip()
        if any(head.startswith(m) or m.startswith(head) for m in TOOL_STARTS):
            return [], None
    cut = len(c.text)
    for tag in TOOL_TAGS:
        i = c.text.find(tag, c.sent)
        if i >= 0:
            cut, c.held = min(cut, i), True
        for k in range(len(tag) - 1, 0, -1):
            if c.text.endswith(tag[:k]):
                cut = min(cut, len(c.text) - k)
                break
    new, c.sent = c.text[c.sent:cut], max(cut, c.sent)
    return ([{"content": new}] if new else []), None


async def _chat_stream(s, reqs, queue, choices, plan, cid, created, model, n_prompt, include_usage, logprobs):
    def chunk(index: int, delta: dict, finish: str | None = None, lps=None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": _chat_logprobs(lps) if logprobs and lps else None,
                  "finish_reason": finish}
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return event(body)

    by_id = {r.request_id: c for r, c in zip(reqs, choices)}
    pending = {c.index: [] for c in choices}  # logprobs not yet sent with a chunk
    try:
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for out in s.engine.outputs(queue, reqs):
            c = by_id[out.request_id]
            c.add(out)
            pending[c.index] += out.logprobs or []
            deltas, finish = _deltas(plan, c, out.finished)
            for i, delta in enumerate(deltas):
                lps, pending[c.index] = pending[c.index], []
                yield chunk(c.index, delta, finish if (finish and i == len(deltas) - 1) else None, lps)
            if finish and not deltas:
                lps, pending[c.index] = pending[c.index], []
                yield chunk(c.index, {}, finish, lps)
        if include_usage:
            yield event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [], "usage": _usage(n_prompt, choices)})
    except APIError as e:
        yield event({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
    yield DONE


# -- completions -----------------------------------------------------------------------------------------------

def _completion_logprobs(items, offset: int = 0) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in items:
        offsets.append(offset)
        if isinstance(lp, str):  # the first prompt token: nothing predicts it
            tokens.append(lp)
            token_lps.append(None)
            tops.append(None)
            offset += len(lp)
            continue
        tokens.append(lp.text)
        token_lps.append(lp.logprob)
        tops.append({**{t: v for _, t, v in lp.top}, lp.text: lp.logprob})
        offset += len(lp.text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _prompts(s: Served, prompt) -> list[tuple[list[int], str]]:
    """(ids, text) per prompt; slow for a large prompt, so run in a worker thread."""
    tok = s.llm.tokenizer
    _check_text(prompt, "prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((tok.encode(p), p))
        else:
            vocab = s.llm.config.vocab_size
            if not p or min(p) < 0 or max(p) >= vocab:
                raise APIError(400, f"prompt token ids must be a non-empty list in 0..{vocab - 1}", param="prompt")
            out.append((list(p), tok.decode(list(p))))
    return out


def _echo_items(s: Served, c: Choice, ids: list[int]) -> list:
    """Prompt logprobs for echo; the first token is its text alone (a str)."""
    return [s.llm.tokenizer.decode(ids[:1])] + list((c.prompt_logprobs or [None])[1:])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    s = served(request)
    adapter = _check_model(s, body.model)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    prompts = await _prepare(s, len(await request.body()), _prompts, s, body.prompt)
    stop_ids = frozenset(s.llm.stop_ids)
    prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
    cid = "cmpl-" + uuid.uuid4().hex
    reqs, choices, meta = [], [], []
    for p, (ids, text) in enumerate(prompts):
        batch = _requests(s, ids, body.max_tokens, body, body.n, f"{cid}-{p}", stop_ids=stop_ids,
                          stop=tuple(_stops(body.stop)), logprobs=body.logprobs, prompt_logprobs=prompt_lp,
                          adapter=adapter)
        reqs += batch
        for _ in batch:
            choices.append(Choice(len(choices)))
            meta.append((ids, text))
    n_prompt = sum(len(ids) for ids, _ in prompts)
    created = int(time.time())

    def logprobs_of(c: Choice, items, echo_ids=None, offset: int = 0):
        if body.logprobs is None:
            return None
        if echo_ids is not None:
            items = _echo_items(s, c, echo_ids) + list(items)
        return _completion_logprobs(items, offset)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        queue = _submit(s, reqs)

        async def stream():
            by_id = {r.request_id: c for r, c in zip(reqs, choices)}
            started: set[int] = set()
            try:
                async for out in s.engine.outputs(queue, reqs):
                    c = by_id[out.request_id]
                    c.add(out)
                    text, echo_ids = out.text, None
                    if body.echo and c.index not in started:
                        echo_ids, text = meta[c.index][0], meta[c.index][1] + text
                    started.add(c.index)
                    if not text and not out.finished and not out.logprobs:
                        continue
                    choice = {"index": c.index, "text": text, "finish_reason": out.finish_reason,
                              "logprobs": logprobs_of(c, out.logprobs or [], echo_ids)}
                    chunk = {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                             "choices": [choice]}
                    if include_usage:
                        chunk["usage"] = None
                    yield event(chunk)
                if include_usage:
                    yield event({"id": cid, "object": "text_completion", "created": created, "model": body.model,
                                 "choices": [], "usage": _usage(n_prompt, choices)})
            except APIError as e:
                yield event({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
            yield DONE

        return SSEResponse(stream())
    await until_disconnect(request, _collect(s, reqs, choices))
    out = []
    for c, (ids, text) in zip(choices, meta):
        full = (text if body.echo else "") + c.text
        lps = logprobs_of(c, c.logprobs, ids if body.echo else None)
        out.append({"index": c.index, "text": full, "logprobs": lps, "finish_reason": c.finish_reason})
    return {"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": out,
            "usage": _usage(n_prompt, choices)}


# -- models, tokens, health, metrics ---------------------------------------------------------------------------

def _model_card(s: Served, name: str | None = None) -> dict:
    card = {"id": name or s.model_id, "object": "model", "created": s.created, "owned_by": "herd",
            "max_model_len": s.context}
    if name and name != s.model_id:
        card["parent"] = s.model_id  # a LoRA adapter over the base (vLLM's card says the same)
    return card


@router.get("/v1/models")
async def list_models(request: Request):
    s = served(request)
    base = _model_card(s)
    # herd's fingerprint of the served weights, so a client (herd arena) can tell which weights answer
    base["fingerprint"] = await asyncio.to_thread(lambda: s.llm.fingerprint)
    return {"object": "list", "data": [base] + [_model_card(s, n) for n in s.adapters]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    s = served(request)
    return _model_card(s, model if _check_model(s, model) else None)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    s = served(request)
    _check_model(s, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages")

    def answer() -> Response:  # in a worker thread: millions of ids take seconds to serialize too
        param = "messages" if body.messages is not None else "prompt"
        _check_text(body.messages if body.messages is not None else body.prompt, param)
        try:
            if body.messages is not None:
                ids = s.llm.chat_prompt(body.messages)
            else:
                ids = s.llm.tokenizer.encode(body.prompt, bos=None if body.add_special_tokens else False)
        except (HerdError, ValueError, TypeError) as e:
            raise APIError(400, f"{param}: {e}", param=param) from None
        head = f'{{"count":{len(ids)},"max_model_len":{s.context},"tokens":['
        return Response(head.encode() + _int_list(ids) + b"]}", media_type="application/json")

    return await _prepare(s, len(await request.body()), answer)


def _int_list(ids: list[int], piece: int = 8192) -> bytes:
    """The ints as a JSON array's inside, written a piece at a time: json.dumps of two million ids holds the GIL
    for 1.5 s in one call (the event loop, /health with it, waited that long); between pieces it is released."""
    return b",".join(",".join(map(str, ids[i:i + piece])).encode() for i in range(0, len(ids), piece))


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    s = served(request)
    _check_model(s, body.model)
    vocab = s.llm.config.vocab_size
    if any(t < 0 or t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must lie in 0..{vocab - 1}", param="tokens")
    return {"prompt": await _prepare(s, len(await request.body()), s.llm.tokenizer.decode, body.tokens)}


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request):
    return PlainTextResponse(served(request).engine.metrics.render(), media_type="text/plain; version=0.0.4")
