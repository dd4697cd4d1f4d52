"""Trajectory messages and tools -> what Hugging Face chat templates expect (pure, validated).

Messages and tools come in OpenAI's shape (Twinkle's current one) or Twinkle's older one:

- ``tools``: ``{'type': 'function', 'function': {'name', 'description', 'parameters'}}`` or
  ``{'tool_name', 'description', 'parameters'}``; ``parameters`` a dict or a JSON string.
- assistant ``tool_calls``: ``{'id', 'type': 'function', 'function': {'name', 'arguments'}}`` or
  ``{'tool_name', 'arguments'}``; ``arguments`` a dict or a JSON string (templates get a dict).
- ``role='tool'`` messages keep ``tool_call_id`` (and ``name``); any message keeps ``reasoning_content``.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from twinkle_async.errors import InvalidInputError

__all__ = ['hf_messages', 'hf_tools', 'ROLES']

ROLES = ('system', 'user', 'assistant', 'tool')
_PASSED_THROUGH = ('tool_call_id', 'name', 'reasoning_content')


def hf_messages(trajectory: Any) -> list[dict[str, Any]]:
    """The trajectory's messages as new dicts in the shape chat templates read.

    Raises:
        InvalidInputError: no messages, an unknown role, or a malformed message or tool call (named).
    """
    if not isinstance(trajectory, Mapping):
        raise InvalidInputError(f'a trajectory must be a dict with "messages", got {type(trajectory).__name__}')
    messages = trajectory.get('messages')
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError('trajectory has no messages: "messages" must be a non-empty list')
    return [_message(m, i) for i, m in enumerate(messages)]


def hf_tools(trajectory: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The trajectory's tools in OpenAI's function shape, or ``None`` without tools.

    Raises:
        InvalidInputError: a tool without a name, or parameters that are not a JSON object (named).
    """
    tools = trajectory.get('tools') or []
    if not isinstance(tools, list):
        raise InvalidInputError(f'tools must be a list, got {type(tools).__name__}')
    return [_tool(t, f'tools[{i}]') for i, t in enumerate(tools)] or None


def _message(message: Any, i: int) -> dict[str, Any]:
    where = f'messages[{i}]'
    if not isinstance(message, Mapping):
        raise InvalidInputError(f'{where} must be a dict, got {type(message).__name__}')
    role = message.get('role')
    if role not in ROLES:
        raise InvalidInputError(f'{where}.role must be one of {ROLES}, got {role!r}')
    content = message.get('content')
    if content is None:
        content = ''
    if not isinstance(content, (str, list)):
        raise InvalidInputError(f'{where}.content must be a string or a list of parts, got {type(content).__name__}')
    hf: dict[str, Any] = {'role': role, 'content': content}
    calls = message.get('tool_calls')
    if isinstance(calls, str):
        calls = _json(calls, f'{where}.tool_calls') if calls.strip() else []
    if calls:
        if not isinstance(calls, list):
            raise InvalidInputError(f'{where}.tool_calls must be a list, got {type(calls).__name__}')
        hf['tool_calls'] = [_tool_call(c, f'{where}.tool_calls[{j}]') for j, c in enumerate(calls)]
    for key in _PASSED_THROUGH:
        if message.get(key) is not None:
            hf[key] = message[key]
    return hf


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise InvalidInputError(f'{where} must be a dict, got {type(call).__name__}')
    function = call.get('function') if 'function' in call else {'name': call.get('tool_name'),
                                                                 'arguments': call.get('arguments')}
    if not isinstance(function, Mapping) or not isinstance(function.get('name'), str):
        raise InvalidInputError(f'{where} needs a function name: {{"function": {{"name": ...}}}} '
                                '(or the older {"tool_name": ...})')
    arguments = function.get('arguments')
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    elif isinstance(arguments, str):
        arguments = _json(arguments, f'{where}.arguments')
    if not isinstance(arguments, Mapping):
        raise InvalidInputError(f'{where}.arguments must be a JSON object, got {type(arguments).__name__}')
    hf = {'type': 'function', 'function': {'name': function['name'], 'arguments': dict(arguments)}}
    if call.get('id') is not None:
        hf['id'] = call['id']
    return hf


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise InvalidInputError(f'{where} must be a dict, got {type(tool).__name__}')
    function = tool.get('function') if 'function' in tool else {
        'name': tool.get('tool_name'), 'description': tool.get('description', ''),
        'parameters': tool.get('parameters')}
    if not isinstance(function, Mapping) or not isinstance(function.get('name'), str):
        raise InvalidInputError(f'{where} needs a name: {{"type": "function", "function": {{"name": ...}}}} '
                                '(or the older {"tool_name": ...})')
    parameters = function.get('parameters') or {}
    if isinstance(parameters, str):
        parameters = _json(parameters, f'{where}.parameters')
    if not isinstance(parameters, Mapping):
        raise InvalidInputError(f'{where}.parameters must be a JSON object')
    return {'type': 'function', 'function': {**function, 'parameters': dict(parameters)}}


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f'{where} is not JSON: {exc}') from exc
