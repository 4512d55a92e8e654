"""A scripted model that takes its time (the e2e admission test holds a run slot with it)."""

from langchain_core.language_models import BaseChatModel

from keel.evals import ScriptedChatModel


def model() -> BaseChatModel:
    """One final answer, after 3 s."""
    return ScriptedChatModel(script=["Done."], latency=3.0)
