"""Twinkle-shaped input types: ``InputFeature``, ``Trajectory``, ``Message``, ``Tool``, ``ToolCall``.

Messages and tools follow OpenAI's shape, as Twinkle's do now; Twinkle's older ``{tool_name, arguments}``
tool calls and ``{tool_name, description, parameters}`` tools are still accepted.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from typing_extensions import TypedDict

__all__ = ['InputFeature', 'Trajectory', 'Message', 'Tool', 'ToolCall', 'FunctionCall', 'FunctionSpec']


class FunctionCall(TypedDict, total=False):
    """The ``function`` of a tool call: ``arguments`` a dict or a JSON string."""

    name: str
    arguments: Union[str, dict[str, Any]]


class ToolCall(TypedDict, total=False):
    """A tool call made by the model, OpenAI's shape: ``{'id', 'type': 'function', 'function': {...}}``."""

    id: str
    type: Literal['function']
    function: FunctionCall


class FunctionSpec(TypedDict, total=False):
    """The ``function`` of a tool: ``parameters`` is a JSON schema (dict or string)."""

    name: str
    description: str
    parameters: Union[str, dict[str, Any]]


class Tool(TypedDict, total=False):
    """A tool offered to the model, OpenAI's shape: ``{'type': 'function', 'function': {...}}``."""

    type: Literal['function']
    function: FunctionSpec


class Message(TypedDict, total=False):
    """One chat turn; a ``role='tool'`` message answers the call ``tool_call_id``."""

    role: Literal['system', 'user', 'assistant', 'tool']
    content: Union[str, list[dict[str, Any]]]
    tool_calls: list[ToolCall]
    tool_call_id: str
    name: str
    reasoning_content: str


class Trajectory(TypedDict, total=False):
    """A conversation to continue: ``messages`` (and optional ``tools``; other keys are carried along)."""

    messages: list[Message]
    tools: list[Tool]
    user_data: Any


class InputFeature(TypedDict, total=False):
    """An already-tokenized prompt: ``input_ids`` (list of ints, array or 1-D tensor).

    Other keys (Twinkle's ``labels`` rolled by one, ``attention_mask``, ``position_ids``, ``length``,
    ``messages``, ``tools``, ``user_data``, ...) are carried into ``SampledSequence.new_input_feature``.
    """

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    labels: Any
    completion_mask: Any
    length: int
    messages: list[Message]
    tools: list[Tool]
    user_data: Any
