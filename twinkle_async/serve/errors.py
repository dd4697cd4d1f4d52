"""OpenAI-shaped error bodies: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError

from twinkle_async.errors import (
    AdapterNotFoundError,
    EngineDeadError,
    InvalidRequestError,
    NotSupportedError,
    OverloadedError,
    PromptTooLongError,
    TwinkleAsyncError,
)

__all__ = ['ApiError', 'error_body', 'from_exception', 'from_validation_error']


class ApiError(Exception):
    """An HTTP error the gateway answers with (never a traceback)."""

    def __init__(self, status: int, message: str, kind: str = 'invalid_request_error',
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {'error': {'message': message, 'type': kind, 'param': param, 'code': code}}


def from_exception(exc: TwinkleAsyncError) -> ApiError:
    """Our typed errors as HTTP statuses: bad request 400, unknown adapter 404, too long 413, overloaded 429,
    not supported 501, engine dead 503."""
    if isinstance(exc, AdapterNotFoundError):
        return ApiError(404, str(exc), 'invalid_request_error', 'model', 'model_not_found')
    if isinstance(exc, PromptTooLongError):
        return ApiError(413, str(exc), 'invalid_request_error', 'messages', 'context_length_exceeded')
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), 'invalid_request_error')
    if isinstance(exc, OverloadedError):
        return ApiError(429, str(exc), 'rate_limit_error', code='overloaded')
    if isinstance(exc, NotSupportedError):
        return ApiError(501, str(exc), 'not_supported_error')
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), 'server_error', code='engine_dead')
    return ApiError(500, f'{type(exc).__name__}: {exc}', 'server_error')


def from_validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    param = '.'.join(str(part) for part in first['loc'])
    return ApiError(422, f'{param}: {first["msg"]}', 'invalid_request_error', param)
