"""Serve a trained checkpoint over the OpenAI chat completions API, so OpenAI clients and tools can use it.

    python scripts/serve_openai_api.py --model_path out/full_sft_256       # http://127.0.0.1:8998/v1
    curl http://127.0.0.1:8998/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"model": "full_sft_256", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}'

Endpoints (the OpenAI API reference's shapes):
  POST /v1/chat/completions  messages (system, user, assistant with tool_calls, tool), temperature (0: greedy),
                             top_p, max_tokens (or max_completion_tokens; capped at --max_tokens_cap), stop,
                             seed, tools, tool_choice ("auto" or "none"), stream (server-sent events ending in
                             `data: [DONE]`, stream_options.include_usage), and repetition_penalty (as in vLLM).
                             The reply's <think>...</think> comes back as `reasoning_content` (as DeepSeek's and
                             Qwen's APIs do; left out with --show_thinking 0), its <tool_call> blocks as
                             `tool_calls` when the request has tools; `usage` counts tokens.
  GET  /v1/models            the one model served, named --served_model_name.

A malformed request gets a 4xx answer with OpenAI's error body {"error": {"message", "type", "param", "code"}}:
400 for a bad field (`seed` must be a signed 64-bit integer, as in the OpenAI API), 400 with code
`context_length_exceeded` when the prompt and max_tokens do not fit the model's context
(config.max_position_embeddings), 413 for a body over --max_request_bytes. Requests are served one at a time on
the model (a lock); others wait their turn. A reply stops being generated when its client disconnects, and ends
(finish_reason "length") --request_timeout seconds after its request was read. SIGTERM or Ctrl-C stops the
server; replies still running get SHUTDOWN_GRACE_S seconds to finish, then are cancelled.
"""

import argparse
import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from threading import Lock
from typing import Annotated, Literal


from model.loading import load_checkpoint
from scripts.generation import (ReplyStream, add_checkpoint_flags, prompt_ids, resolve_checkpoint_flags,
                                serve_extra_missing)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(parser)
    parser.add_argument("--served_model_name", default=None,
                        help="the model name clients send and /v1/models lists (default: the checkpoint "
                             "directory's name, e.g. full_sft_256)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 opens the server to other machines (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8998, help="TCP port (default: %(default)s)")
    parser.add_argument("--max_tokens_cap", type=int, default=2048,
                        help="a request's max_tokens is lowered to this many tokens; also the default when a "
                             "request gives none, or the room its prompt leaves in the context if less "
                             "(default: %(default)s)")
    parser.add_argument("--show_thinking", type=int, default=1, choices=[0, 1],
                        help="1: return the reasoning a model writes in <think>...</think> as reasoning_content; "
                             "0: leave it out, only the answer (default: %(default)s)")
    parser.add_argument("--max_request_bytes", type=int, default=1_048_576,
                        help="a request body over this many bytes gets 413 before it is read: 1 MiB holds a full "
                             "32768-token context as JSON-escaped text with room to spare (default: %(default)s)")
    parser.add_argument("--request_timeout", type=float, default=300,
                        help="seconds a request may take once read (waiting for the model included): then its "
                             "reply ends with the text generated so far and finish_reason \"length\"; 0: no limit "
                             "(default: %(default)s)")
    args = resolve_checkpoint_flags(parser.parse_args(argv))
    if args.max_tokens_cap < 1:
        parser.error(f"--max_tokens_cap {args.max_tokens_cap}: must be at least 1 token")
    if args.max_request_bytes < 1:
        parser.error(f"--max_request_bytes {args.max_request_bytes}: must be at least 1 byte")
    if args.request_timeout < 0:
        parser.error(f"--request_timeout {args.request_timeout}: must be 0 (no limit) or more seconds")
    return args


try:  # imported after the flags are defined, so that --help works without the serve extra
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field, model_validator
    from starlette.exceptions import HTTPException
except ModuleNotFoundError as missing:
    serve_extra_missing(missing, parse_args, __name__)

log = logging.getLogger(__name__)
SEED_RANGE = (-2**63, 2**63 - 1)  # the OpenAI API's: a signed 64-bit integer (torch takes all of them)
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
SHUTDOWN_GRACE_S = 5  # on SIGTERM, replies still running get this long before they are cancelled


# ----------------------------------------------------------------------------------------------------------------
# The request, as the OpenAI API reference defines it (the fields this server uses; others are ignored)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict  # a JSON string in the OpenAI API


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def has_content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def for_template(self) -> dict:
        """The message as the chat template reads it: content as one string, 'developer' as 'system'."""
        content = self.content if not isinstance(self.content, list) else "".join(part.text for part in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        return message


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one reply per request
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    tools: list[dict] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    repetition_penalty: float = Field(1.0, gt=0)

    def max_new_tokens(self, cap: int, room: int) -> int:
        """max_completion_tokens (the API's newer name) or max_tokens, at most `cap`; when the request gives
        neither, `cap` or the `room` the prompt leaves in the context, whichever is less."""
        asked = self.max_completion_tokens or self.max_tokens
        return min(asked, cap) if asked else min(cap, room)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop or []

    def use_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


# ----------------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


def error_body(message: str, error_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status: int, message: str, error_type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """An HTTP answer with OpenAI's error body."""
    return JSONResponse(error_body(message, error_type, param, code), status_code=status)


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """A body that is not JSON or does not fit the schema: 400 naming the first wrong field."""
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {first['ctx']['error']}")
    param = ".".join(str(part) for part in first["loc"] if part != "body") or None
    return error_response(400, f"{param or 'body'}: {first['msg']}", param=param)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """404 for an unknown path or model, 405 for a wrong method, 413 for a body too large..., in OpenAI's shape."""
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return error_response(error.status_code, str(error.detail), kind, code=getattr(error, "code", None))


async def server_error(request: Request, error: Exception) -> JSONResponse:
    """500 for an unexpected failure, in OpenAI's shape."""
    return error_response(500, f"{type(error).__name__}: {error}", "server_error")


def generation_failed(error: Exception) -> dict:
    """OpenAI's error body for a generation that raised; its traceback goes to the server's log."""
    log.error("generation failed", exc_info=error)
    return error_body(f"{type(error).__name__}: {error}", "server_error")


class ModelNotFound(HTTPException):
    code = "model_not_found"


class RequestBodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, before a byte of it is read when its
    Content-Length says so, else (a chunked body) as soon as the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.message = f"the request body is over this server's limit of {max_bytes} bytes (--max_request_bytes)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, self.message)(scope, receive, send)
        received = 0

        async def receive_within_limit():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI passes an HTTPException from here on to http_error
                raise HTTPException(413, self.message)
            return message

        await self.app(scope, receive_within_limit, send)


# ----------------------------------------------------------------------------------------------------------------
# The app


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def openai_tool_calls(calls: list[dict]) -> list[dict]:
    """Parsed calls ([{"name", "arguments"}]) in the API's form, each with an id for the tool's answer to cite."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call} for call in calls]


def create_app(model, tokenizer, model_name: str, max_tokens_cap: int, show_thinking: bool = True,
               max_request_bytes: int | None = None, request_timeout: float | None = None) -> FastAPI:
    """The FastAPI app serving `model` under the name `model_name`. Generation holds one lock, so concurrent
    requests take turns on the model. max_request_bytes: the largest request body (None: no limit);
    request_timeout: seconds a reply may take (None: no limit), see ReplyStream's timeout_s."""
    app = FastAPI(title="MiniMind OpenAI-compatible API")
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    if max_request_bytes is not None:
        app.add_middleware(RequestBodyLimit, max_bytes=max_request_bytes)
    model_lock, created = Lock(), int(time.time())
    context = model.config.max_position_embeddings  # prompt and reply together, in tokens

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minimind"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.model != model_name:
            raise ModelNotFound(404, f"The model {body.model!r} does not exist; this server serves {model_name!r}")
        tools = body.tools if body.use_tools() else None
        messages = [message.for_template() for message in body.messages]
        try:  # the template checks the conversation (roles, order) before anything is generated; a long one takes
            # a while to tokenize, so in a worker thread, while the event loop serves other requests
            ids = await asyncio.to_thread(prompt_ids, tokenizer, messages, tools)
        except ValueError as error:  # dataset/chat_format.py refused the conversation (roles, order)
            return error_response(400, f"messages: {error}", param="messages")
        max_new_tokens = body.max_new_tokens(max_tokens_cap, room=context - len(ids))
        if not 1 <= max_new_tokens <= context - len(ids):
            needed = max(max_new_tokens, 1)
            return error_response(
                400, f"This model's maximum context length is {context} tokens, but the request needs "
                     f"{len(ids) + needed} ({len(ids)} in the messages, {needed} for the reply): shorten the "
                     "messages or lower max_tokens", param="messages", code="context_length_exceeded")
        reply = ReplyStream(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=body.temperature,
                            top_p=body.top_p, repetition_penalty=body.repetition_penalty, stop=body.stop_strings(),
                            parse_tools=tools is not None, seed=body.seed, lock=model_lock, timeout_s=request_timeout)
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream_events(reply, header, len(ids), include_usage, show_thinking),
                                     media_type="text/event-stream")
        try:
            await complete_while_connected(reply, request)
        except Exception as error:  # answered here: after server_error's 500 the error would go on to uvicorn,
            return JSONResponse(generation_failed(error), status_code=500)  # which drops the connection
        message = {"role": "assistant", "content": reply.content or (None if reply.tool_calls else "")}
        if show_thinking and reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = openai_tool_calls(reply.tool_calls)
        return {**header, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}],
                "usage": usage(len(ids), len(reply.token_ids))}

    return app


async def complete_while_connected(reply: ReplyStream, request: Request) -> None:
    """Generate the whole reply in a worker thread, checking every DISCONNECT_POLL_S seconds that the client is
    still there: a client that has gone (its own timeout, a closed connection) cancels the reply, so the model
    is free for the next request rather than generating on to max_tokens for no one.

    Raises:
        what the generation raised.
    """
    finished = asyncio.ensure_future(asyncio.to_thread(reply.complete))
    try:
        while not finished.done():
            await asyncio.wait([finished], timeout=DISCONNECT_POLL_S)
            if not finished.done() and await request.is_disconnected():
                reply.cancel()
    except asyncio.CancelledError:  # the server is shutting down and its grace period is over
        reply.cancel()
        raise
    finished.result()


async def stream_events(reply: ReplyStream, header: dict, prompt_tokens: int, include_usage: bool,
                        show_thinking: bool):
    """Server-sent events of a streamed reply: chat.completion.chunk objects, each `data: {json}` and a blank
    line; the first carries the role, the last the finish_reason, then usage if asked, then `data: [DONE]`.
    An error while generating ends the stream with an event holding OpenAI's error object, then `data: [DONE]`.
    A client that leaves mid-reply (Starlette then cancels this generator) cancels the reply."""

    def event(delta: dict, finish_reason: str | None = None) -> str:
        chunk = {**header, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    pieces = iter(reply)
    try:  # each piece is awaited in a worker thread, so the event loop serves other requests meanwhile
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            reasoning, content = piece
            delta = {"content": content} if content else {}
            if show_thinking and reasoning:
                delta["reasoning_content"] = reasoning
            if delta:
                yield event(delta)
    except Exception as error:
        yield f"data: {json.dumps(generation_failed(error))}\n\n"
        yield "data: [DONE]\n\n"
        return
    finally:  # the client left (this generator cancelled or closed), or the reply is over: free the model
        reply.cancel()
    if reply.tool_calls:
        calls = openai_tool_calls(reply.tool_calls)  # each whole, in one chunk: they are parsed once complete
        yield event({"tool_calls": [{"index": index, **call} for index, call in enumerate(calls)]})
    yield event({}, reply.finish_reason)
    if include_usage:
        chunk = {**header, "object": "chat.completion.chunk", "choices": [],
                 "usage": usage(prompt_tokens, len(reply.token_ids))}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer = load_checkpoint(args.model_path, args.device, args.base_model_path, args.dtype)
    name = args.served_model_name or Path(args.model_path).resolve().name
    app = create_app(model, tokenizer, name, args.max_tokens_cap, bool(args.show_thinking),
                     max_request_bytes=args.max_request_bytes, request_timeout=args.request_timeout or None)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)


if __name__ == "__main__":
    main()
