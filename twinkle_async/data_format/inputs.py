"""Twinkle-shaped input types: ``InputFeature``, ``Trajectory``, ``Message``, ``Tool``, ``ToolCall``."""

from __future__ import annotations

from typing import Any, Literal, Union

from typing_extensions import TypedDict

__all__ = ['InputFeature', 'Trajectory', 'Message', 'Tool', 'ToolCall']


class ToolCall(TypedDict, total=False):
    """A tool call made by the model: ``arguments`` is a JSON string."""

    tool_name: str
    arguments: str


class Tool(TypedDict, total=False):
    """A tool offered to the model: ``parameters`` is a JSON schema (string or dict)."""

    tool_name: str
    description: str
    parameters: Union[str, dict[str, Any]]


class Message(TypedDict, total=False):
    """One chat turn."""

    role: Literal['system', 'user', 'assistant', 'tool']
    content: Union[str, list[dict[str, str]]]
    tool_calls: list[ToolCall]
    reasoning_content: str


class Trajectory(TypedDict, total=False):
    """A conversation to continue: ``messages`` (and optional ``tools``)."""

    messages: list[Message]
    tools: list[Tool]
    user_data: dict[str, Any]


class InputFeature(TypedDict, total=False):
    """An already-tokenized prompt: ``input_ids`` (list of ints, array or 1-D tensor)."""

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    labels: Any
