"""A scripted model whose answer holds PII (the served output guard must redact it in streams)."""

from langchain_core.language_models import BaseChatModel

from keel.evals import ScriptedChatModel

LEAKY = "Your card 4111 1111 1111 1111 is billed; write to jane.doe@example.com."


def model() -> BaseChatModel:
    """One final answer with a card number and an email address."""
    return ScriptedChatModel(script=[LEAKY])
