"""Tool calls in a model's output text -> OpenAI-shaped ``tool_calls``: a small registry of parsers.

The first registered parser whose ``detect`` matches owns the text (Twinkle's ``ToolCallRegistry`` rule).
Shipped: :class:`HermesParser` (Hermes / Qwen ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, and
Qwen3-Coder's ``<tool_call><function=name><parameter=k>v</parameter></function></tool_call>``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional, Protocol

__all__ = ['ToolCallParser', 'PartialCall', 'HermesParser', 'register_tool_parser', 'tool_parsers',
           'detect_tool_parser', 'partial_marker']


@dataclass(frozen=True)
class PartialCall:
    """One tool call as far as a growing text shows it, for streaming: ``name`` once known (``None`` before, and
    for a closed block that is no valid call); ``arguments`` the JSON text so far, which later texts only extend."""

    name: Optional[str]
    arguments: str
    closed: bool


class ToolCallParser(Protocol):
    """One tool-call format; ``start`` is the text that opens a call (a stream holds back what may begin it)."""

    name: str
    start: str

    def detect(self, text: str) -> bool:
        """Cheap check: does ``text`` carry this format's markup?"""

    def parse(self, text: str) -> list[dict[str, Any]]:
        """OpenAI-shaped calls ``{'type': 'function', 'function': {'name', 'arguments': dict}}``, in order."""

    def clean(self, text: str) -> str:
        """``text`` without this format's markup (the assistant message's content)."""

    def partial_calls(self, text: str, final: bool) -> list[PartialCall]:
        """One entry per call block begun in ``text`` (``final``: no more text will come); the closed blocks'
        valid calls agree with :meth:`parse` (same names, same arguments once JSON-decoded)."""


class HermesParser:
    """``<tool_call>`` blocks holding JSON (Hermes, Qwen2.5/3) or ``<function=...>`` XML (Qwen3-Coder)."""

    name = 'hermes'
    start = '<tool_call>'
    _BLOCK = re.compile(r'<tool_call>\s*([\s\S]*?)\s*(?:</tool_call>|\Z)')
    _FUNCTION = re.compile(r'<function=([^>]+)>([\s\S]*?)</function>')
    _PARAMETER = re.compile(r'<parameter=([^>]+)>\s*([\s\S]*?)\s*</parameter>')
    _STRIP = re.compile(r'<tool_call>[\s\S]*?(?:</tool_call>|\Z)')
    _NAME_THEN_ARGUMENTS = re.compile(r'\{\s*"(?:name|tool_name)"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
    _OPENING_FUNCTION = re.compile(r'<function=([^>]+)>')

    def detect(self, text: str) -> bool:
        return '<tool_call>' in text

    def parse(self, text: str) -> list[dict[str, Any]]:
        calls = (self._parse_block(match.group(1)) for match in self._BLOCK.finditer(text))
        return [call for call in calls if call is not None]

    def clean(self, text: str) -> str:
        return self._STRIP.sub('', text).strip()

    def partial_calls(self, text: str, final: bool) -> list[PartialCall]:
        return [self._partial_block(match.group(1), final or match.group(0).endswith('</tool_call>'))
                for match in self._BLOCK.finditer(text)]

    def _partial_block(self, block: str, closed: bool) -> PartialCall:
        """JSON calls written name first stream their arguments as the model writes them (less a tail of spaces
        and braces that may close the call); others appear whole when their block closes."""
        head = self._NAME_THEN_ARGUMENTS.match(block)
        raw = block[head.end():] if head else ''
        if head and raw.lstrip()[:1] in ('', '{'):
            name = json.loads(head.group(1))
            if not closed:
                raw = raw[:len(raw) - partial_marker(raw, '</tool_call>')]
                return PartialCall(name, raw.rstrip(' \t\r\n}'), closed)
            call, arguments = self._parse_block(block), raw.rstrip().removesuffix('}').rstrip()
            if call is not None and _json_or_text(arguments) == call['function']['arguments']:
                return PartialCall(name, arguments, closed)
        elif not closed:
            function = self._OPENING_FUNCTION.search(block)
            return PartialCall(function.group(1).strip() if function else None, '', closed)
        call = self._parse_block(block) if closed else None
        if call is None:
            return PartialCall(None, '', closed)
        arguments = call['function']['arguments']
        return PartialCall(call['function']['name'], json.dumps(arguments, ensure_ascii=False), closed)

    def _parse_block(self, block: str) -> Optional[dict[str, Any]]:
        function = self._FUNCTION.search(block)
        if function is not None:
            arguments = {m.group(1).strip(): _json_or_text(m.group(2).strip())
                         for m in self._PARAMETER.finditer(function.group(2))}
            return _call(function.group(1).strip(), arguments)
        try:
            data = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get('name') or data.get('tool_name'), str):
            return None
        arguments = data.get('arguments', {})
        if isinstance(arguments, str):
            arguments = _json_or_text(arguments) if arguments.strip() else {}
        return _call(data.get('name') or data['tool_name'], arguments if isinstance(arguments, dict) else {})


_PARSERS: list[ToolCallParser] = [HermesParser()]


def register_tool_parser(parser: ToolCallParser, first: bool = False) -> None:
    """Add a parser (replacing one of the same ``name``); ``first`` gives it priority over the others."""
    _PARSERS[:] = [p for p in _PARSERS if p.name != parser.name]
    _PARSERS.insert(0 if first else len(_PARSERS), parser)


def tool_parsers() -> list[ToolCallParser]:
    """The registered parsers, in the order they are tried."""
    return list(_PARSERS)


def detect_tool_parser(text: str) -> Optional[ToolCallParser]:
    """The first parser that recognises ``text``, or ``None``."""
    return next((p for p in _PARSERS if text and p.detect(text)), None)


def partial_marker(text: str, marker: str) -> int:
    """The length of the longest tail of ``text`` that may be the beginning of ``marker`` (0 if none)."""
    return max((keep for keep in range(1, len(marker)) if text.endswith(marker[:keep])), default=0)


def _call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {'type': 'function', 'function': {'name': name, 'arguments': arguments}}


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, ValueError):
        return value
