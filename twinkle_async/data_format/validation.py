"""One line naming each field pydantic refused, for the typed errors raised at the boundaries."""

from __future__ import annotations

from pydantic import ValidationError

__all__ = ['describe_validation_error']


def describe_validation_error(exc: ValidationError, what: str, unknown_key: str) -> str:
    """``invalid <what>: <field>: <why> (got <value>); ...``; ``unknown_key`` is the reason given for an
    unknown field."""
    parts = []
    for error in exc.errors():
        field = '.'.join(str(loc) for loc in error['loc']) or what
        reason = unknown_key if error['type'] == 'extra_forbidden' else error['msg'].removeprefix('Value error, ')
        if 'got' not in reason:
            reason += f' (got {error.get("input")!r})'
        parts.append(f'{field}: {reason}')
    return f'invalid {what}: ' + '; '.join(parts)
