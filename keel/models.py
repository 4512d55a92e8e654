"""Model resolution: any LangChain chat model, or an `init_chat_model` string."""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel

from keel.errors import SetupError, UserError

__all__ = ["model_name_of", "resolve_model"]


def resolve_model(model: str | BaseChatModel) -> BaseChatModel:
    """Return a chat model for `model`: a model instance as is, or a `provider:name` string.

    Raises:
        UserError: `model` is neither a chat model nor a `provider:name` string.
        SetupError: the provider's integration package is not installed.
    """
    if isinstance(model, BaseChatModel):
        return model
    if not isinstance(model, str) or not model.strip():
        raise UserError(
            f"model must be a LangChain chat model or a string like 'openai:gpt-4o-mini', "
            f"got {model!r}."
        )
    from langchain.chat_models import init_chat_model

    try:
        return init_chat_model(model)
    except ImportError as exc:
        raise SetupError(
            f"Cannot load model {model!r}: {exc}. Install the provider's package "
            "(e.g. `pip install langchain-openai` for 'openai:…', `langchain-anthropic` for "
            "'anthropic:…', `langchain-ollama` for 'ollama:…')."
        ) from exc
    except ValueError as exc:
        raise UserError(
            f"Cannot resolve model {model!r}: {exc}. Use 'provider:model', e.g. "
            "'openai:gpt-4o-mini' or 'anthropic:claude-haiku-4-5'."
        ) from exc


def model_name_of(model: BaseChatModel) -> str:
    """The model's name, as the price table knows it."""
    for attr in ("model_name", "model", "model_id"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return model._llm_type
