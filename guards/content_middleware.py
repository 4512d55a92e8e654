"""The content guards as LangChain `AgentMiddleware`, for `langchain.agents.create_agent`.

The same decisions as keel's `input_guard` / `output_guard` nodes and `execute_tools`
(`keel.guards.screening` over `check_input` / `check_output`), through `wrap_model_call` and
`wrap_tool_call` only, so neither adds a graph node:

- `InputGuardMiddleware`: every tool result is checked as it comes back (flag, redact, or
  withhold it), and the user's new messages before the model reads them (a blocked one ends
  the run as `blocked`, in the model's place);
- `OutputGuardMiddleware`: the model's final answer is checked for PII and secrets and
  redacted (or withheld) before it is returned.

A result or answer a guard acted on carries `response_metadata["keel_guard"]`; with a ledger
(`ledger=Ledger(url)`) each finding is also written to the audit log (`kind="content"`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain.agents.middleware.types import ToolCallRequest
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langgraph.types import Command

from keel import outcome
from keel._drive import Steps, adrive, both, call, drive
from keel.db.audit import AuditLog, AuditRecord
from keel.db.ledger import Ledger
from keel.errors import UserError
from keel.guards.content import InputGuardPolicy, OutputGuardPolicy
from keel.guards.middleware import (
    AsyncModelHandler,
    AsyncToolHandler,
    ModelHandler,
    ToolHandler,
    _context,
    _marked,
    _ran,
    _stored,
    _unrun,
    stop_message,
)
from keel.guards.screening import (
    GUARD_KEY,
    Screened,
    ascreen_inputs,
    ascreen_tool_result,
    screen_answer,
    screen_inputs,
    screen_tool_result,
)

__all__ = ["InputGuardMiddleware", "OutputGuardMiddleware"]


class _Audited(AgentMiddleware[Any, Any, Any]):
    """Writes an audit record per message a content guard acted on, when given a ledger."""

    def __init__(self, ledger: Ledger | None) -> None:
        super().__init__()
        if ledger is not None and not isinstance(ledger, Ledger):
            raise UserError(f"ledger=... must be a keel.Ledger(url), got {ledger!r}.")
        self.audit = AuditLog(ledger) if ledger is not None else None

    def _records(self, messages: Sequence[BaseMessage], runtime: object) -> list[AuditRecord]:
        if self.audit is None:
            return []
        ctx = _context(runtime)
        out = []
        for m in messages:
            note = m.response_metadata.get(GUARD_KEY)
            if isinstance(note, dict):
                tool = isinstance(m, ToolMessage)
                out.append(
                    AuditRecord(
                        kind="content",
                        decision=str(note["action"]),
                        status=str(note["source"]),
                        tool=m.name if tool else None,
                        rule=", ".join(note["rules"]),
                        result="; ".join(note["excerpts"]),
                        tool_call_id=m.tool_call_id if isinstance(m, ToolMessage) else None,
                        user_id=ctx.user_id,
                        tenant_id=ctx.tenant_id,
                    )
                )
        return out

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: ModelHandler
    ) -> ModelResponse[Any] | AIMessage:
        """The model call through this guard (see the class), its answer stored as keel's are."""
        return _stored(request, drive(self._model(request, handler)))

    async def awrap_model_call(
        self, request: ModelRequest[Any], handler: AsyncModelHandler
    ) -> ModelResponse[Any] | AIMessage:
        """The model call through this guard (see the class), async."""
        return _stored(request, await adrive(self._model(request, handler)))

    def _model(
        self, request: ModelRequest[Any], handler: Callable[..., Any]
    ) -> Steps[ModelResponse[Any] | AIMessage]:
        raise NotImplementedError

    def _written(self, messages: Sequence[BaseMessage], runtime: object) -> Steps[None]:
        records = self._records(messages, runtime)
        if records and self.audit is not None:
            yield both(self.audit.write, self.audit.awrite, records)


class InputGuardMiddleware(_Audited):
    """keel's input guard for `create_agent`: user messages and tool results, before the model.

    Example:
        ```python
        agent = create_agent(model, tools, middleware=[InputGuardMiddleware()])
        ```
    """

    def __init__(
        self, policy: InputGuardPolicy | None = None, *, ledger: Ledger | None = None
    ) -> None:
        """Check inputs by `policy` (default `InputGuardPolicy()`); audit to `ledger` if given."""
        super().__init__(ledger)
        if policy is not None and not isinstance(policy, InputGuardPolicy):
            raise UserError(f"InputGuardMiddleware needs an InputGuardPolicy(...), got {policy!r}.")
        self.policy = policy or InputGuardPolicy()

    def _screen(
        self, request: ModelRequest[Any]
    ) -> Steps[tuple[ModelRequest[Any] | AIMessage, list[Any]]]:
        screened: Screened = yield both(
            screen_inputs, ascreen_inputs, request.messages, self.policy
        )
        if screened.blocked is not None:
            return stop_message(outcome.stopped("blocked", screened.blocked)), screened.messages
        if not screened.messages:
            return request, []
        by_id = {m.id: m for m in screened.messages}
        messages = [by_id.get(m.id, m) if m.id else m for m in request.messages]
        return request.override(messages=messages), screened.messages  # type: ignore[arg-type]

    def _model(
        self, request: ModelRequest[Any], handler: Callable[..., Any]
    ) -> Steps[ModelResponse[Any] | AIMessage]:
        """Check the user's new messages; call the model with what may pass."""
        screened, found = yield from self._screen(request)
        yield from self._written(found, request.runtime)
        if isinstance(screened, AIMessage):
            return screened
        return (yield call(handler, screened))  # type: ignore[no-any-return]

    def _result(self, result: Any) -> Steps[tuple[Any, list[Any]]]:
        """The result as the model may read it, and the messages the guard acted on.

        A `Command` (`PermissionMiddleware` answers a rejected call with one, its record in
        the thread's state) has the tool messages of its update checked.
        """
        if isinstance(result, Command) and isinstance(result.update, dict):
            messages = result.update.get("messages")
            if not isinstance(messages, list):
                return result, []
            found: list[Any] = []
            checked: list[Any] = []
            for m in messages:
                if isinstance(m, ToolMessage):
                    m, acted = yield from self._result(m)
                    found.extend(acted)
                checked.append(m)
            if not found:
                return result, []
            return replace(result, update={**result.update, "messages": checked}), found
        if not isinstance(result, ToolMessage):
            return result, []
        screened = yield both(screen_tool_result, ascreen_tool_result, result, self.policy)
        return (result, []) if screened is None else (screened, [screened])

    def wrap_tool_call(self, request: ToolCallRequest, handler: ToolHandler) -> Any:
        """Run the tool and check its result before the model reads it."""
        return drive(self._tool(request, handler))

    async def awrap_tool_call(self, request: ToolCallRequest, handler: AsyncToolHandler) -> Any:
        """Run the tool and check its result before the model reads it (async)."""
        return await adrive(self._tool(request, handler))

    def _tool(self, request: ToolCallRequest, handler: Callable[..., Any]) -> Steps[Any]:
        ran = _marked((yield from _ran(request, handler)), _unrun(request))
        result, found = yield from self._result(ran)
        yield from self._written(found, request.runtime)
        return result


class OutputGuardMiddleware(_Audited):
    """keel's output guard for `create_agent`: PII and secrets in the final answer.

    Example:
        ```python
        agent = create_agent(model, tools, middleware=[OutputGuardMiddleware()])
        ```
    """

    def __init__(
        self, policy: OutputGuardPolicy | None = None, *, ledger: Ledger | None = None
    ) -> None:
        """Check answers by `policy` (default `OutputGuardPolicy()`); audit to `ledger` if given."""
        super().__init__(ledger)
        if policy is not None and not isinstance(policy, OutputGuardPolicy):
            raise UserError(
                f"OutputGuardMiddleware needs an OutputGuardPolicy(...), got {policy!r}."
            )
        self.policy = policy or OutputGuardPolicy()

    def _screen(self, response: ModelResponse[Any] | AIMessage) -> tuple[Any, list[Any]]:
        messages = response.result if isinstance(response, ModelResponse) else [response]
        out, found = [], []
        for m in messages:
            screened = None
            if isinstance(m, AIMessage) and not m.tool_calls:
                screened = screen_answer(m, self.policy)
            if screened is not None:
                found.append(screened)
            out.append(screened or m)
        if not found:
            return response, []
        if isinstance(response, ModelResponse):
            return ModelResponse(
                result=out, structured_response=response.structured_response
            ), found
        return out[0], found

    def _model(
        self, request: ModelRequest[Any], handler: Callable[..., Any]
    ) -> Steps[ModelResponse[Any] | AIMessage]:
        """Call the model; its final answer is checked before it is returned."""
        response, found = self._screen((yield call(handler, request)))
        yield from self._written(found, request.runtime)
        return response  # type: ignore[no-any-return]
