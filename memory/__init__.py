"""keel.memory: long-term memory on Chroma, offline embeddings, working memory, lessons.

- `ChromaStore`: a LangGraph `BaseStore` on Chroma (embedded or server), with TTL and search.
- `MiniLMEmbeddings`, `ChromaEmbeddings`, `default_index`: offline embeddings, pluggable.
- `recall`, `reflect`: nodes that put memories into the context and store lessons of runs.
- `memory_tools`: `remember`, `recall_memories`, `forget`, scoped to the run's identity.
- `WorkingMemory`: per-thread scratch space with a TTL per key.
- `Lesson`, `extract_lesson`, `user_namespace`: the pieces, for your own nodes.
"""

from keel.memory.chroma import ChromaStore
from keel.memory.embeddings import ChromaEmbeddings, MiniLMEmbeddings, default_index
from keel.memory.lessons import Lesson, extract_lesson
from keel.memory.nodes import recall, reflect
from keel.memory.scope import user_namespace
from keel.memory.tools import memory_tools
from keel.memory.working import WorkingMemory

__all__ = [
    # the store
    "ChromaStore",
    # embeddings
    "ChromaEmbeddings",
    "MiniLMEmbeddings",
    "default_index",
    # nodes and tools
    "memory_tools",
    "recall",
    "reflect",
    # building blocks
    "Lesson",
    "WorkingMemory",
    "extract_lesson",
    "user_namespace",
]
