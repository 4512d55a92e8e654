"""keel.tools: the tool contract (`ToolSpec`), `KeelTool`, the `tool` decorator and the registry."""

from keel.tools.registry import KeelTool, RegisteredTool, ToolRegistry, spec_of, tool
from keel.tools.spec import Reconciler, ResourceExtractor, Risk, ToolSpec

__all__ = [
    "KeelTool",
    "Reconciler",
    "RegisteredTool",
    "ResourceExtractor",
    "Risk",
    "ToolRegistry",
    "ToolSpec",
    "spec_of",
    "tool",
]
