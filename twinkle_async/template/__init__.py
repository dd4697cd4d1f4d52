"""Chat templates (Twinkle's ``Template`` and names), tool-call parsers, streaming detokenization."""

from twinkle_async.template.base import CHATML, ChatMLTemplate, Template
from twinkle_async.template.detokenizer import IncrementalDetokenizer
from twinkle_async.template.registry import TEMPLATES, DeepseekV4Template, Qwen3_5Template, TemplateSpec, build_template
from twinkle_async.template.tool_parsers import (
    HermesParser,
    PartialCall,
    ToolCallParser,
    detect_tool_parser,
    register_tool_parser,
    tool_parsers,
)

__all__ = ['Template', 'ChatMLTemplate', 'CHATML', 'Qwen3_5Template', 'DeepseekV4Template', 'TEMPLATES',
           'TemplateSpec', 'build_template', 'IncrementalDetokenizer', 'ToolCallParser', 'HermesParser', 'PartialCall',
           'detect_tool_parser', 'register_tool_parser', 'tool_parsers']
