"""keel.memory: long-term memory (ChromaStore, offline embeddings, working memory, lessons).

Nothing is public yet: the Chroma store arrives with the memory issue.
"""

__all__: list[str] = []
