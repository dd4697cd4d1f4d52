"""``create_app(sampler)``: the OpenAI-compatible gateway over an ``AsyncSampler`` (either engine, or Ray replicas).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus), and per session ``GET|DELETE /v1/sessions/{id}/trajectory``. A session groups an
agent's calls by the ``X-Session-ID`` header or the base URL ``/sessions/{id}/v1``; its trajectory holds the exact
ids the engine was given and sampled (see :mod:`twinkle_async.serve.sessions`). A client that disconnects aborts
its request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from twinkle_async.adapters import BASE_MODEL
from twinkle_async.data_format.outputs import SampleResponse
from twinkle_async.errors import InvalidInputError, TwinkleAsyncError
from twinkle_async.serve import openai_format as fmt
from twinkle_async.serve.errors import ApiError, from_exception, from_validation_error
from twinkle_async.serve.metrics import GatewayMetrics
from twinkle_async.serve.protocol import ChatCompletionRequest, CompletionRequest
from twinkle_async.serve.sessions import Segment, Session, SessionStore
from twinkle_async.template import tool_parsers

__all__ = ['create_app', 'MAX_BODY_BYTES']

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 2**20
"""Largest request body accepted (413 above it)."""

M = TypeVar('M', bound=BaseModel)
T = TypeVar('T')


class _ClientGone(Exception):
    """The client disconnected: its request was aborted; there is nobody to answer."""


def create_app(sampler: Any, *, api_key: Optional[str] = None, model_name: Optional[str] = None,
               sessions: Optional[SessionStore] = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app serving ``sampler`` (an ``AsyncSampler`` the caller has started and will close).

    Args:
        api_key: when set, every ``/v1`` and ``/sessions`` call needs ``Authorization: Bearer <api_key>``.
        model_name: the base model's name in ``/v1/models`` and ``model`` (default: the sampler's model id).
    """
    gateway = _Gateway(sampler, model_name or str(sampler.model_id), sessions or SessionStore(), max_body_bytes)
    metrics = gateway.metrics
    app = FastAPI(title='twinkle_async gateway', docs_url=None, redoc_url=None)
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(_ClientGone)
    async def client_gone(_: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's code for "client closed the request"

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception('gateway: unexpected error')
        return JSONResponse(ApiError(500, f'internal error: {type(exc).__name__}', 'server_error').body(), 500)

    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)

    @app.get('/health')
    async def health() -> Response:
        if gateway.engine_dead:
            return JSONResponse(ApiError(503, 'the engine is dead', 'server_error').body(), status_code=503)
        return JSONResponse({'status': 'ok'})

    @app.get('/metrics')
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get('/v1/models')
    async def models() -> dict[str, Any]:
        return gateway.models()

    @app.post('/v1/chat/completions')
    async def chat(request: Request) -> Response:
        return await gateway.chat(request, request.headers.get('x-session-id'))

    @app.post('/sessions/{session_id}/v1/chat/completions')
    async def session_chat(session_id: str, request: Request) -> Response:
        return await gateway.chat(request, session_id)

    @app.post('/v1/completions')
    async def completions(request: Request) -> Response:
        return await gateway.completions(request)

    @app.get('/v1/sessions/{session_id}/trajectory')
    async def trajectory(session_id: str) -> dict[str, Any]:
        return gateway.session(session_id).as_dict()

    @app.delete('/v1/sessions/{session_id}/trajectory')
    async def forget(session_id: str) -> dict[str, Any]:
        gateway.session(session_id)
        gateway.sessions.delete(session_id)
        return {'session_id': session_id, 'deleted': True}

    return app


class _Guard:
    """ASGI middleware: the API key check (all but ``/health``), then request metrics for the POST endpoints
    (status and latency to the answer's last byte, streams included)."""

    def __init__(self, app: Any, api_key: Optional[str], metrics: GatewayMetrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        path = scope['path']
        if self.api_key and path != '/health' and not _authorized(_header(scope, b'authorization'), self.api_key):
            error = ApiError(401, 'a valid API key is needed: Authorization: Bearer <key>', 'authentication_error',
                             code='invalid_api_key')
            return await JSONResponse(error.body(), status_code=401)(scope, receive, send)
        if scope['method'] != 'POST':
            return await self.app(scope, receive, send)
        began, status = self.metrics.started(), 500

        async def sending(message: Any) -> None:
            nonlocal status
            if message['type'] == 'http.response.start':
                status = message['status']
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.finished('chat' if path.endswith('/chat/completions') else 'completions', status, began)


def _header(scope: Any, name: bytes) -> Optional[str]:
    return next((value.decode('latin-1') for key, value in scope['headers'] if key == name), None)


class _Gateway:
    """The request handling behind the routes (one per app)."""

    def __init__(self, sampler: Any, model_name: str, sessions: SessionStore, max_body_bytes: int) -> None:
        self.sampler, self.model_name, self.sessions, self.max_body_bytes = sampler, model_name, sessions, \
            max_body_bytes
        self.metrics = GatewayMetrics(sampler)

    @property
    def engine_dead(self) -> bool:
        try:
            return bool(self.sampler.engine.is_dead)
        except TwinkleAsyncError:  # Ray replicas have no local engine: they are restarted when they die
            return False

    def models(self) -> dict[str, Any]:
        created = int(time.time())
        names = [self.model_name, *self.sampler.list_adapters()]
        return {'object': 'list', 'data': [
            {'id': name, 'object': 'model', 'created': created, 'owned_by': 'twinkle_async',
             'root': self.model_name, 'parent': None if name == self.model_name else self.model_name}
            for name in names]}

    def session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise ApiError(404, f'no session {session_id!r} (never used, deleted or expired)', code='session_not_found')
        return session

    async def chat(self, request: Request, session_id: Optional[str]) -> Any:
        body = await self._parse(request, ChatCompletionRequest)
        with _typed_errors():
            params, adapter = fmt.sampling_params(body), self._adapter(body.model)
            trajectory = {'messages': body.messages, **({'tools': body.tools} if body.tools else {})}
            feature = self.sampler.template.encode(trajectory)
            if feature is None:
                raise InvalidInputError('the conversation is longer than the template\'s max_length')
            rendered = list(feature['input_ids'])
            images = {'images': feature['images']} if feature.get('images') else {}  # image_url parts, loaded
        session = self.sessions.get_or_create(session_id) if session_id else None
        asked_logprobs = params.logprobs is not None
        if session is not None and not asked_logprobs:  # a session's trajectory records the sampled logprobs
            params = params.model_copy(update={'logprobs': 0})
        prompt, segment = session.prompt_for(rendered, self._decode, self._encode) if session else (rendered, None)
        turn = (session, segment) if session is not None and segment is not None else None
        parse_calls = self.sampler.template.split_tool_calls if body.wants_tool_calls else None
        call = dict(sampling_params=params, adapter_name=adapter, session_id=session_id)
        if body.stream:
            stream = _ChatStream(self, body, prompt, images, call, parse_calls, turn, asked_logprobs)
            return _EventStream(stream.run())
        response = await self._sample(request, {'input_ids': prompt, **images}, call)
        if turn is not None:
            first = response.sequences[0]
            turn[0].add_turn(turn[1], prompt, first.tokens, first.logprobs, first.weight_versions, first.stop_reason)
        return fmt.chat_body(response, body.model or self.model_name, self._decode, parse_calls,
                             body.return_token_ids, asked_logprobs)

    async def completions(self, request: Request) -> Any:
        body = await self._parse(request, CompletionRequest)
        with _typed_errors():
            params, adapter = fmt.sampling_params(body), self._adapter(body.model)
            prompt = body.prompt if isinstance(body.prompt, list) else self._encode(body.prompt)
        call = dict(sampling_params=params, adapter_name=adapter)
        if body.stream:
            return _EventStream(_completion_stream(self, body, prompt, call))
        response = await self._sample(request, {'input_ids': prompt}, call)
        return fmt.completion_body(response, body.model or self.model_name, self._decode, body.return_token_ids)

    async def _sample(self, request: Any, inputs: dict[str, Any], call: dict[str, Any]) -> SampleResponse:
        with _typed_errors():
            response: SampleResponse = await _unless_disconnected(request.receive, self.sampler.sample(inputs, **call))
        self.metrics.tokens(len(inputs['input_ids']), sum(len(s.tokens) for s in response.sequences))
        return response

    async def _parse(self, request: Any, model: type[M]) -> M:
        declared = request.headers.get('content-length')
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f'the request body is over {self.max_body_bytes} bytes', code='body_too_large')
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            raise ApiError(413, f'the request body is over {self.max_body_bytes} bytes', code='body_too_large')
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f'the body is not JSON: {exc}', code='invalid_json') from None
        if not isinstance(data, dict):
            raise ApiError(400, 'the body must be a JSON object', code='invalid_json')
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    def _adapter(self, model: Optional[str]) -> str:
        if model is None or model == self.model_name:
            return BASE_MODEL
        if model in self.sampler.list_adapters():
            return model
        raise ApiError(404, f'model {model!r} is not served (serving {self.model_name!r} and adapters '
                            f'{self.sampler.list_adapters()})', param='model', code='model_not_found')

    def _decode(self, ids: Any) -> str:
        return str(self.sampler.template.decode(list(ids), skip_special_tokens=False))

    def _encode(self, text: str) -> list[int]:
        return list(self.sampler.template.tokenizer(text, add_special_tokens=False)['input_ids'])


@dataclasses.dataclass
class _StreamedChoice:
    """What one streamed choice has produced so far."""

    text: str = ''
    shown: str = ''  # the content sent so far
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[Any] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str = 'abort'
    calls: fmt.ToolCallDeltas = dataclasses.field(default_factory=fmt.ToolCallDeltas)

    def add(self, delta: Any) -> None:
        self.text += delta.text
        self.tokens += delta.token_ids
        self.logprobs += delta.logprobs or []
        self.versions += [delta.weight_version] * len(delta.token_ids)


class _ChatStream:
    """One streamed chat completion: a role chunk, then content and (when tools were offered) tool-call deltas
    as OpenAI streams them, then each choice's finish."""

    def __init__(self, gateway: _Gateway, body: ChatCompletionRequest, prompt: list[int], images: dict[str, Any],
                 call: dict[str, Any], parse_calls: Any, turn: Optional[tuple[Session, Segment]],
                 with_logprobs: bool) -> None:
        self.gateway, self.body, self.prompt, self.images, self.call = gateway, body, prompt, images, call
        self.parse_calls, self.turn, self.with_logprobs = parse_calls, turn, with_logprobs
        self.call_starts = [parser.start for parser in tool_parsers()]
        self.id, self.created, self.model = fmt.new_id('chatcmpl'), int(time.time()), body.model or gateway.model_name

    def _chunk(self, choices: list[dict[str, Any]], usage: Optional[dict[str, int]] = None) -> dict[str, Any]:
        return fmt.chunk('chat.completion.chunk', self.id, self.created, self.model, choices, usage)

    async def run(self) -> AsyncGenerator[dict[str, Any], None]:
        choices = [_StreamedChoice() for _ in range(self.body.n)]
        yield self._chunk([{'index': i, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}
                           for i in range(self.body.n)])
        with _typed_errors():
            stream = self.gateway.sampler.stream({'input_ids': self.prompt, **self.images}, **self.call)
            async with contextlib.aclosing(stream) as deltas:
                async for delta in deltas:
                    choice = choices[delta.index]
                    choice.add(delta)
                    update = self._update(choice, delta.text, delta.finish_reason is not None)
                    logprobs = delta.logprobs if self.with_logprobs else None
                    if update or logprobs:
                        yield self._chunk([self._delta(delta.index, update, logprobs)])
                    if delta.finish_reason is not None:
                        yield self._chunk([self._finish(delta.index, choice, delta.finish_reason)])
        generated = sum(len(choice.tokens) for choice in choices)
        self.gateway.metrics.tokens(len(self.prompt), generated)
        if self.turn is not None:
            first = choices[0]
            self.turn[0].add_turn(self.turn[1], self.prompt, first.tokens, first.logprobs or None, first.versions,
                                  first.finish_reason)
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield self._chunk([], fmt.usage(len(self.prompt), generated))

    def _update(self, choice: _StreamedChoice, text: str, final: bool) -> dict[str, Any]:
        """The delta's content (what may open a tool call held back) and tool-call deltas, when tools were offered."""
        if self.parse_calls is None:
            return {'content': text} if text else {}
        update: dict[str, Any] = {}
        if final:
            content = self.parse_calls(choice.text)[0]
            text = content[len(choice.shown):] if content.startswith(choice.shown) else ''
        else:
            text = fmt.shown_before_calls(choice.text, self.call_starts)[len(choice.shown):]
        if text:
            choice.shown += text
            update['content'] = text
        tool_calls = choice.calls.update(choice.text, final)
        if tool_calls:
            update['tool_calls'] = tool_calls
        return update

    def _delta(self, index: int, update: dict[str, Any], logprobs: Any) -> dict[str, Any]:
        choice: dict[str, Any] = {'index': index, 'delta': update, 'finish_reason': None}
        if logprobs:
            choice['logprobs'] = fmt.chat_logprobs(logprobs, self.gateway._decode)
        return choice

    def _finish(self, index: int, choice: _StreamedChoice, reason: str) -> dict[str, Any]:
        finish: dict[str, Any] = {'index': index, 'delta': {},
                                  'finish_reason': 'tool_calls' if choice.calls.calls else reason}
        choice.finish_reason = reason
        if self.body.return_token_ids:
            finish.update(token_ids=choice.tokens, weight_versions=choice.versions)
        return finish


async def _completion_stream(gateway: _Gateway, body: CompletionRequest, prompt: list[int],
                             call: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    request_id, created, model = fmt.new_id('cmpl'), int(time.time()), body.model or gateway.model_name
    generated = 0
    with _typed_errors():
        async with contextlib.aclosing(gateway.sampler.stream({'input_ids': prompt}, **call)) as deltas:
            async for delta in deltas:
                generated += len(delta.token_ids)
                choice: dict[str, Any] = {'index': delta.index, 'text': delta.text,
                                          'finish_reason': delta.finish_reason, 'logprobs': None}
                if delta.logprobs:
                    choice['logprobs'] = fmt.completion_logprobs(delta.logprobs, gateway._decode)
                yield fmt.chunk('text_completion', request_id, created, model, [choice])
    gateway.metrics.tokens(len(prompt), generated)
    if body.stream_options and body.stream_options.include_usage:
        yield fmt.chunk('text_completion', request_id, created, model, [], fmt.usage(len(prompt), generated))


async def _sse(chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[str]:
    """Server-sent events; an error after the first chunk is sent as an error event (the status is gone)."""
    try:
        async with contextlib.aclosing(chunks) as items:
            async for item in items:
                yield f'data: {json.dumps(item, ensure_ascii=False)}\n\n'
    except ApiError as exc:
        yield f'data: {json.dumps(exc.body())}\n\n'
    yield 'data: [DONE]\n\n'


async def _unless_disconnected(receive: Any, work: Awaitable[T]) -> T:
    """``await work``, cancelled (its requests aborted) as soon as the client disconnects, or when this is.

    Raises:
        _ClientGone: the client disconnected first.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()  # a no-op once done
        gone.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _disconnect(receive: Any) -> None:
    while (await receive())['type'] != 'http.disconnect':
        pass


class _EventStream(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects, closing their generator (which aborts
    the request in the engine) instead of leaving it to the garbage collector."""

    def __init__(self, chunks: AsyncGenerator[dict[str, Any], None]) -> None:
        super().__init__(_sse(chunks), media_type='text/event-stream')

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await _unless_disconnected(receive, self.stream_response(send))
        except _ClientGone:
            pass
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # _sse is an async generator


@contextlib.contextmanager
def _typed_errors() -> Any:
    try:
        yield
    except TwinkleAsyncError as exc:
        raise from_exception(exc) from None


def _authorized(header: Optional[str], api_key: str) -> bool:
    scheme, _, token = (header or '').partition(' ')
    return scheme.lower() == 'bearer' and hmac.compare_digest(token.strip().encode(), api_key.encode())
