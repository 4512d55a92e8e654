"""Model resolution: any LangChain chat model, an `init_chat_model` string, or an import path.

Strings name a model three ways:
- `provider:name` (`openai:gpt-4o-mini`), through LangChain's `init_chat_model`;
- `package.module:attribute`, a chat model or a function that returns one (no arguments);
- `keel:demo` and its siblings: the demo scenario's scripted models (`keel.evals.demo`);
- `local:` (or `local`, `local:qwen2.5-coder-1.5b`): keel's local model, llama.cpp over a GGUF
  file, no key and no network (`keel.local_model`; `pip install 'langgraph-keel[local]'` and
  `keel models install` first).
"""

from __future__ import annotations

import importlib

from langchain_core.language_models import BaseChatModel

from keel.errors import SetupError, UserError

__all__ = ["BUNDLED_MODELS", "model_name_of", "price_name_of", "resolve_model"]

BUNDLED_MODELS = {
    "keel:demo": "keel.evals.demo:demo_model",
    "keel:demo-memory": "keel.evals.demo:demo_memory_model",
    "keel:demo-router": "keel.evals.demo:demo_router_model",
    "keel:demo-support": "keel.evals.demo:demo_support_model",
}
"""keel's scripted demo models by name, each an import path (loaded only when named)."""


def resolve_model(model: str | BaseChatModel) -> BaseChatModel:
    """Return a chat model for `model`: a model instance as is, or a string (see the module).

    Raises:
        UserError: `model` is neither a chat model nor a string that names one.
        SetupError: the provider's integration package is not installed (for `local:`, the
            `local` extra or the model file).
    """
    if isinstance(model, BaseChatModel):
        return model
    if not isinstance(model, str) or not model.strip():
        raise UserError(
            f"model must be a LangChain chat model or a string like 'openai:gpt-4o-mini', "
            f"got {model!r}."
        )
    if model == "local" or model.startswith("local:"):
        from keel.local_model import local_chat_model  # llama_cpp is imported only here

        return local_chat_model(model.partition(":")[2].strip())
    if model.startswith("keel:"):
        if model not in BUNDLED_MODELS:
            raise UserError(
                f"Unknown bundled model {model!r}; keel bundles {sorted(BUNDLED_MODELS)}."
            )
        return _import_model(BUNDLED_MODELS[model])
    if "." in model.partition(":")[0]:
        return _import_model(model)
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


def price_name_of(model: BaseChatModel) -> str:
    """The name the price table prices `model` by: its name, `ollama:`-prefixed for Ollama.

    Ollama's chat model names the model without its provider (`llama3.1:8b`); keel prices the
    models that run on this machine at $0 (`keel.pricing.FREE_PREFIXES`).
    """
    name = model_name_of(model)
    if model._llm_type == "chat-ollama" and not name.startswith("ollama:"):
        return f"ollama:{name}"
    return name


def _import_model(path: str) -> BaseChatModel:
    module_name, _, attr = path.partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(
            f"Cannot import model {path!r}: {exc}. Name it 'package.module:attribute'."
        ) from exc
    if not isinstance(value, BaseChatModel) and callable(value):
        value = value()
    if not isinstance(value, BaseChatModel):
        raise UserError(
            f"{path!r} is {type(value).__name__}, not a LangChain chat model (or a function "
            "that returns one)."
        )
    return value
