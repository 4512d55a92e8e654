"""keel.tools: the tool contract, `KeelTool`, the `tool` decorator, the registry, tool stubs.

`stubbing` answers tool calls without running the tools (replay and shadow runs).
"""

from keel.tools.registry import KeelTool, RegisteredTool, ToolRegistry, spec_of, tool
from keel.tools.spec import Reconciler, ResourceExtractor, Risk, ToolSpec
from keel.tools.stubs import StubAnswer, ToolStub, stubbing

__all__ = [
    "KeelTool",
    "Reconciler",
    "RegisteredTool",
    "ResourceExtractor",
    "Risk",
    "StubAnswer",
    "ToolRegistry",
    "ToolSpec",
    "ToolStub",
    "spec_of",
    "stubbing",
    "tool",
]
