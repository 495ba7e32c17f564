"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming),
/health and /metrics, over one `AsyncEngine`.

Every request is parsed and validated here before it reaches the engine, and every failure is an
OpenAI-shaped JSON error with a 4xx/5xx status: malformed JSON 400, bad field 400, unknown field 400,
unknown model 404, missing/wrong API key 401, too-long prompt 400 (`context_length_exceeded`), body too
large 413, too many requests in flight 503 with Retry-After. A client that disconnects (mid-stream or
while waiting for a non-streamed answer) has its sequences aborted, which frees their cache blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, AsyncIterator, Optional, TypeVar, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from frugalm.serve.async_engine import AsyncEngine, Overloaded
from frugalm.serve.config import ServerConfig
from frugalm.serve.engine import LLMEngine, PromptError
from frugalm.serve.metrics import Metrics
from frugalm.serve.protocol import APIError, ChatRequest, CompletionRequest, validation_error
from frugalm.serve.reasoning import OPEN, ReasoningParser
from frugalm.serve.sampling_params import SamplingParams
from frugalm.serve.sequence import RequestOutput, TokenLogprob

log = logging.getLogger("frugalm.serve")
RequestT = TypeVar("RequestT", ChatRequest, CompletionRequest)


# ---------------------------------------------------------------------------------------- token text
def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet (printable stand-ins for the 256 byte values)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class TokenText:
    """Token id -> display string and raw bytes (for logprobs); works without a tokenizer too."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._bytes_of = _byte_decoder()
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> list[int]:
        if self.tokenizer is not None:
            piece = self.tokenizer.id_to_token(token_id)
            if piece and all(ch in self._bytes_of for ch in piece):
                return [self._bytes_of[ch] for ch in piece]
        return list(self._text(token_id).encode("utf-8"))


# ---------------------------------------------------------------------------------------- per-request state
@dataclass
class _Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    parser: Optional[ReasoningParser] = None


@dataclass
class _Job:
    """One HTTP request's sequences: ids, where their outputs arrive, and how to build the answer."""

    rids: list[str]
    queue: "asyncio.Queue[Union[RequestOutput, BaseException]]"
    choices: dict[str, _Choice]
    prompt_tokens: int
    logprobs: Optional[int]
    include_usage: bool


class OpenAIServer:
    def __init__(self, engine: LLMEngine, config: ServerConfig, model_name: str):
        self.engine = engine
        self.config = config
        self.model_name = model_name
        self.created = int(time.time())
        self.metrics = Metrics()
        self.async_engine = AsyncEngine(engine, max_pending=config.max_pending, metrics=self.metrics)
        self.tokens = TokenText(engine.tokenizer)

    # ------------------------------------------------------------------ request checks
    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        try:
            data = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"could not parse the JSON body: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the JSON body must be an object", code="invalid_json")
        return data

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    async def parse_request(self, request: Request, model: type[RequestT]) -> RequestT:
        """The checks every generation endpoint runs, in the order their errors take precedence: API key
        (401), body size and JSON (413/400), the request schema (400, naming the field), then the model
        name (404). One method, so /v1/completions and /v1/chat/completions cannot drift apart."""
        self.check_auth(request)
        data = await self.read_json(request)
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        self.check_model(req.model)
        return req

    def max_tokens(self, requested: Optional[int], prompt_len: int) -> int:
        room = self.engine.max_model_len - prompt_len
        if requested is None:
            return max(1, min(self.config.default_max_tokens, room))
        if requested > room:
            raise APIError(
                400, f"This model's maximum context length is {self.engine.max_model_len} tokens. However, you "
                f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
                f"completion). Please reduce the prompt or max_tokens.",
                param="max_tokens", code="context_length_exceeded")
        return requested

    def encode(self, prompt: Union[str, list[int]], param: str) -> list[int]:
        try:
            return self.engine.encode_prompt(prompt)
        except PromptError as e:
            raise APIError(400, str(e), param=param, code=e.code) from None

    @staticmethod
    def sampling(req: Union[ChatRequest, CompletionRequest], max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=0 if req.top_k is None else req.top_k,
                max_tokens=max_tokens, stop=req.stop, seed=req.seed, n=req.n, logprobs=logprobs,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                ignore_eos=req.ignore_eos,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

    # ------------------------------------------------------------------ running a job
    def start(self, prompts: list[list[int]], params: SamplingParams, *, include_usage: bool,
              in_reasoning: Optional[bool]) -> _Job:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        base = uuid.uuid4().hex
        requests, choices = [], {}
        for p, ids in enumerate(prompts):
            for c in range(params.n):
                rid = f"{base}-{p}-{c}"
                requests.append((rid, ids, params.for_choice(c)))
                parser = ReasoningParser(in_reasoning) if in_reasoning is not None else None
                choices[rid] = _Choice(index=p * params.n + c, parser=parser)

        def sink(item: Union[RequestOutput, BaseException]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            self.async_engine.submit(requests, sink)
        except Overloaded as e:
            raise APIError(503, f"The server is overloaded ({e}); retry shortly.", type="overloaded_error",
                           code="server_overloaded", headers={"Retry-After": "1"}) from None
        return _Job([r[0] for r in requests], queue, choices, sum(len(ids) for ids in prompts),
                    params.logprobs, include_usage)

    def abort(self, job: _Job) -> None:
        for rid, choice in job.choices.items():
            if choice.finish_reason is None:
                self.async_engine.abort(rid)

    async def next_output(self, job: _Job) -> tuple[_Choice, RequestOutput]:
        item = await job.queue.get()
        if isinstance(item, BaseException):
            raise APIError(500, f"generation failed: {item}", type="server_error", code="engine_error")
        choice = job.choices[item.request_id]
        choice.token_ids += item.new_token_ids
        choice.logprobs += item.new_logprobs
        choice.text += item.text_delta
        if item.finished:
            choice.finish_reason = item.finish_reason
        return choice, item

    async def run_to_end(self, job: _Job, request: Request) -> None:
        """Collect a non-streamed job, aborting it if the client goes away first."""
        async def collect() -> None:
            while any(c.finish_reason is None for c in job.choices.values()):
                await self.next_output(job)

        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return
                if await request.is_disconnected():
                    raise asyncio.CancelledError
        finally:
            if not task.done():
                task.cancel()
                self.abort(job)

    def usage(self, job: _Job) -> dict[str, int]:
        completion = sum(len(c.token_ids) for c in job.choices.values())
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                "total_tokens": job.prompt_tokens + completion}

    # ------------------------------------------------------------------ logprobs formats
    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        t = self.tokens
        return {"content": [
            {"token": t.text(lp.token_id), "logprob": lp.logprob, "bytes": t.bytes(lp.token_id),
             "top_logprobs": [{"token": t.text(i), "logprob": v, "bytes": t.bytes(i)} for i, v in lp.top]}
            for lp in lps]}

    def completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        t = self.tokens
        tokens, offsets = [], []
        for lp in lps:
            s = t.text(lp.token_id)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{t.text(i): v for i, v in lp.top} for lp in lps], "text_offset": offsets}

    # ------------------------------------------------------------------ endpoints
    async def completions(self, request: Request) -> Response:
        req = await self.parse_request(request, CompletionRequest)
        prompts = [self.encode(p, "prompt") for p in req.prompts()]
        max_tokens = self.max_tokens(req.max_tokens, max(len(p) for p in prompts))
        params = self.sampling(req, max_tokens, req.logprobs)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        job = self.start(prompts, params, include_usage=include_usage, in_reasoning=None)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        if req.stream:
            return self.sse(job, self.stream_completion(job, head))
        await self.run_to_end(job, request)
        choices = []
        for c in sorted(job.choices.values(), key=lambda c: c.index):
            choices.append({"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                            "logprobs": self.completion_logprobs(c.logprobs, 0) if req.logprobs is not None else None})
        return JSONResponse({**head, "choices": choices, "usage": self.usage(job)})

    async def stream_completion(self, job: _Job, head: dict) -> AsyncIterator[dict]:
        extra = {"usage": None} if job.include_usage else {}
        offsets = {rid: 0 for rid in job.choices}
        while any(c.finish_reason is None for c in job.choices.values()):
            choice, out = await self.next_output(job)
            lp = None
            if job.logprobs is not None:
                lp = self.completion_logprobs(out.new_logprobs, offsets[out.request_id])
                offsets[out.request_id] += sum(len(s) for s in lp["tokens"])
            if out.text_delta or out.new_token_ids or out.finished:
                yield {**head, "choices": [{"index": choice.index, "text": out.text_delta, "logprobs": lp,
                                            "finish_reason": out.finish_reason if out.finished else None}], **extra}
        if job.include_usage:
            yield {**head, "choices": [], "usage": self.usage(job)}

    async def chat(self, request: Request) -> Response:
        req = await self.parse_request(request, ChatRequest)
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no tokenizer chat template; use /v1/completions with token ids",
                           param="messages", code="no_chat_template")
        try:
            messages = req.chat_messages()
            rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok.encode(rendered, add_special_tokens=False)
        except (ValueError, TypeError) as e:  # ChatTemplateError is a ValueError
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        ids = self.encode(ids, "messages")
        max_tokens = self.max_tokens(req.requested_max_tokens(), len(ids))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling(req, max_tokens, logprobs)
        in_reasoning = rendered.rstrip().endswith(OPEN) if self.config.reasoning_parser else None
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        job = self.start([ids], params, include_usage=include_usage, in_reasoning=in_reasoning)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name}
        if req.stream:
            return self.sse(job, self.stream_chat(job, {**head, "object": "chat.completion.chunk"}))
        await self.run_to_end(job, request)
        choices = []
        for c in sorted(job.choices.values(), key=lambda c: c.index):
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            if c.parser is not None:
                r1, c1 = c.parser.feed(c.text)
                r2, c2 = c.parser.finish()
                message["content"] = c1 + c2
                if c.parser.had_reasoning:
                    message["reasoning_content"] = r1 + r2
            choices.append({"index": c.index, "message": message, "finish_reason": c.finish_reason,
                            "logprobs": self.chat_logprobs(c.logprobs) if req.logprobs else None})
        return JSONResponse({**head, "choices": choices, "usage": self.usage(job)})

    async def stream_chat(self, job: _Job, head: dict) -> AsyncIterator[dict]:
        extra = {"usage": None} if job.include_usage else {}

        def chunk(index: int, delta: dict, logprobs: Any = None, finish: Optional[str] = None) -> dict:
            return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish}], **extra}

        for c in sorted(job.choices.values(), key=lambda c: c.index):
            yield chunk(c.index, {"role": "assistant", "content": ""})
        while any(c.finish_reason is None for c in job.choices.values()):
            choice, out = await self.next_output(job)
            reasoning, content = "", out.text_delta
            if choice.parser is not None:
                reasoning, content = choice.parser.feed(out.text_delta)
                if out.finished:
                    r, c = choice.parser.finish()
                    reasoning, content = reasoning + r, content + c
            lp = self.chat_logprobs(out.new_logprobs) if job.logprobs is not None and out.new_logprobs else None
            delta: dict[str, str] = {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            if delta or lp:
                yield chunk(choice.index, delta, lp)
            if out.finished:
                yield chunk(choice.index, {}, None, out.finish_reason)
        if job.include_usage:
            yield {**head, "choices": [], "usage": self.usage(job)}

    def sse(self, job: _Job, events: AsyncIterator[dict]) -> StreamingResponse:
        """Server-sent events; the job is aborted if the stream ends early (client disconnect cancels it)."""
        async def body() -> AsyncIterator[bytes]:
            try:
                try:
                    async for event in events:
                        yield f"data: {json.dumps(event, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()
                except APIError as e:
                    yield f"data: {json.dumps(e.body())}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                self.abort(job)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(engine: LLMEngine, config: Optional[ServerConfig] = None, *, model_name: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving `engine`; its engine thread starts and stops with the app's lifespan."""
    config = config or ServerConfig()
    name = model_name or config.served_model_name or "frugalm"
    server = OpenAIServer(engine, config, name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.async_engine.start()
        try:
            yield
        finally:
            server.async_engine.shutdown()

    app = FastAPI(title="frugalm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(APIError(e.status_code, f"{e.detail}: {request.method} {request.url.path}", code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error_response(APIError(400, f"invalid request: {e.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(APIError(500, "internal server error", type="server_error", code="internal_error"))

    @app.get("/health")
    async def health():
        if not server.async_engine.alive:
            return _error_response(APIError(503, "engine is not running", type="unavailable_error", code="unavailable"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(engine, server.async_engine.pending),
                                 media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": server.created, "owned_by": "frugalm",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        server.check_auth(request)
        server.check_model(model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await server.chat(request)

    return app
