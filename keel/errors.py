"""Every error keel raises, in one tree, split by audience (as Pydantic AI does).

```
KeelError                       catch this to catch anything keel raises
├── UserError (ValueError)      the developer called keel wrongly; the message says what to change
│   └── UnserializableState (TypeError)   a value in state would not load back from a checkpoint
├── SetupError (RuntimeError)   the environment is not ready: a missing package, an unreachable
│   │                           database, a schema keel cannot use
│   └── SchemaVersionError      the ledger database was set up by a newer keel
├── StorageError (RuntimeError)  keel's database failed mid-run, after the retries that were safe
├── CheckpointTooLarge          a checkpoint is over `CheckpointPolicy.max_bytes` and refused
├── RateLimited                 a call would wait past its rate limit's `max_wait`
├── CircuitOpen                 a call was refused: its circuit breaker is open (fail fast)
├── ModelBehaviorError          the model answered with something keel cannot use: not an
│                               AIMessage, only malformed tool calls turn after turn, a
│                               structured answer that does not parse
├── ModelRequestsForbidden (RuntimeError)   a real model was called where only test doubles run
└── ScriptExhausted (RuntimeError)          a scripted test model ran out of turns

CheckpointSizeWarning (UserWarning)   a checkpoint is over the limit and was saved anyway
```

The runtime errors carry fields (`RateLimited.retry_after`, `CircuitOpen.retry_at`, ...) as
well as a message, and pickle across processes. Each is also importable from the module that
raises it (`keel.guards.RateLimited`, `keel.db.checkpoint.CheckpointTooLarge`, ...). The chaos
model's `ChaosRateLimitError` / `ChaosServerError` (`keel.evals`) are not keel errors: they
stand in for a provider's.
"""

from __future__ import annotations

__all__ = [
    "CheckpointSizeWarning",
    "CheckpointTooLarge",
    "CircuitOpen",
    "KeelError",
    "ModelBehaviorError",
    "ModelRequestsForbidden",
    "RateLimited",
    "SchemaVersionError",
    "ScriptExhausted",
    "SetupError",
    "StorageError",
    "UnserializableState",
    "UserError",
]


class KeelError(Exception):
    """Base class of every error keel raises."""


class UserError(KeelError, ValueError):
    """A developer mistake: bad arguments, bad configuration. The message says the fix."""


class UnserializableState(UserError, TypeError):
    """A value in state cannot be stored so that it loads back."""

    def __init__(self, path: str, type_name: str) -> None:
        self.path = path
        """Where in state, e.g. `messages[3].additional_kwargs['order']`."""
        self.type_name = type_name
        """The offending value's class, `module.Name`."""
        name = type_name.rsplit(".", 1)[-1]
        super().__init__(
            f"Cannot checkpoint state: {path} is a {type_name}, which would not load back "
            "from the database. Store plain data there (dicts, lists, strings, numbers), or "
            f"allow the class: Persistence(url, checkpoints=CheckpointPolicy(allow=({name},)))."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path, self.type_name))


class SetupError(KeelError, RuntimeError):
    """The environment is not ready: a database without keel's tables, a missing package."""


class SchemaVersionError(SetupError):
    """The ledger database is at a schema version this keel does not know (a newer keel's).

    Args:
        found: The database's version.
        known: The newest version this keel knows.
    """

    def __init__(self, *, found: int, known: int) -> None:
        self.found = found
        self.known = known
        super().__init__(
            f"The ledger database is at schema version {found}, but this keel knows versions up "
            f"to {known}: a newer keel set it up. Upgrade keel (pip install -U langgraph-keel) "
            "in every process that shares this database, or point this one at another database."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_schema_version_error, (self.found, self.known))


def _schema_version_error(found: int, known: int) -> SchemaVersionError:
    return SchemaVersionError(found=found, known=known)


class CheckpointTooLarge(KeelError):
    """A checkpoint is over `CheckpointPolicy.max_bytes` and the policy refuses it."""

    def __init__(self, thread_id: str, size: int, limit: int) -> None:
        self.thread_id = thread_id
        """The thread whose checkpoint was refused."""
        self.size = size
        """Its serialized bytes so far (at least this many)."""
        self.limit = limit
        """`CheckpointPolicy.max_bytes`."""
        super().__init__(self.describe(thread_id, size, limit, "was refused"))

    @staticmethod
    def describe(thread_id: str, size: int, limit: int, what: str) -> str:
        """The message for a checkpoint over the limit that `what` (`was refused`, `was saved`)."""
        return (
            f"A checkpoint of thread {thread_id!r} is {size:,} bytes, over the limit of "
            f"{limit:,} (CheckpointPolicy.max_bytes), and {what}. Keep large data out of state "
            "(store it elsewhere and keep a reference), compress the history, or raise the limit."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.thread_id, self.size, self.limit))


class CheckpointSizeWarning(UserWarning):
    """A checkpoint is over `CheckpointPolicy.max_bytes` (saved anyway)."""


class RateLimited(KeelError):
    """A call would exceed a rate limit for longer than its `max_wait`."""

    def __init__(self, key: str, limit: int, retry_after: float, *, waited: float = 0.0) -> None:
        self.key = key
        """The bucket that is out of room, e.g. `rpm:model:gpt-4o`."""
        self.limit = limit
        """Its limit per minute."""
        self.retry_after = retry_after
        """Seconds until the bucket has room for this call (if nobody else takes it first)."""
        self.waited = waited
        """Seconds this call already waited."""
        kind, _, who = key.partition(":")
        unit = "requests" if kind == "rpm" else "tokens"
        super().__init__(
            f"Rate limit of {limit} {unit} per minute reached for {who} ({key}): room in "
            f"{retry_after:.2f} s, after waiting {waited:.2f} s; that is beyond the limit's "
            "max_wait. Raise RateLimit.max_wait or the limit, or fall back to another model."
        )

    def __reduce__(self) -> tuple[object, ...]:  # picklable across processes
        return (_rate_limited, (self.key, self.limit, self.retry_after, self.waited))


def _rate_limited(key: str, limit: int, retry_after: float, waited: float) -> RateLimited:
    return RateLimited(key, limit, retry_after, waited=waited)


class CircuitOpen(KeelError):
    """A call was refused because its circuit breaker is open: fail fast, use the fallback."""

    def __init__(self, key: str, retry_at: float, *, retry_after: float) -> None:
        self.key = key
        """The breaker, e.g. `model:gpt-4o`."""
        self.retry_at = retry_at
        """Unix time the breaker half-opens and lets calls through again."""
        self.retry_after = retry_after
        """Seconds until then, when the call was refused."""
        super().__init__(
            f"Circuit breaker {key!r} is open: calls fail fast until it half-opens in "
            f"{retry_after:.2f} s. Fall back to another model or tool, or retry after that."
        )

    def __reduce__(self) -> tuple[object, ...]:  # picklable across processes
        return (_circuit_open, (self.key, self.retry_at, self.retry_after))


def _circuit_open(key: str, retry_at: float, retry_after: float) -> CircuitOpen:
    return CircuitOpen(key, retry_at, retry_after=retry_after)


class ModelBehaviorError(KeelError):
    """The model answered, but with something keel cannot use (the model's fault, not keel's).

    Raised inside a model call when the answer is not an `AIMessage` (the call falls back to
    the next model, if any), and recorded as the run's outcome (`terminated_reason == "error"`,
    error category `model:ModelBehaviorError`) when the model sends only malformed tool calls
    turn after turn. A judge whose verdict does not parse fails the verification with it.
    """

    def __init__(self, model: str, problem: str) -> None:
        self.model = model
        """The model's name (`scripted`, `gpt-4o-mini`, ...)."""
        self.problem = problem
        """What was wrong with the answer."""
        super().__init__(
            f"{model} {problem}. A different model, a lower temperature or a clearer schema "
            "or tool description usually helps; keel ends the run rather than act on it."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.model, self.problem))


class ModelRequestsForbidden(KeelError, RuntimeError):
    """A real chat model was called while model requests are forbidden (tests, evals)."""


class ScriptExhausted(KeelError, RuntimeError):
    """The conversation asked for more turns than the script has."""


class StorageError(KeelError, RuntimeError):
    """keel's database failed during a run, after the retries that were safe.

    A transaction that surely did not commit (its connection died before `COMMIT` was sent)
    is replayed on a fresh connection first; this is raised when that is impossible or keeps
    failing. Nothing is duplicated by resuming the run: a run that ends on it resumes from its
    last checkpoint. `in_doubt` is true when the connection died while committing, so the
    transaction may or may not have been applied (keel's writes are keyed, so a resume finds
    it either way).
    """

    category = "storage"
    """The error category a run that ends on this error is reported under."""

    def __init__(
        self,
        message: str,
        *,
        in_doubt: bool = False,
        outcome: dict[str, str] | None = None,
        fix: str = "",
    ) -> None:
        super().__init__(f"{message}. {fix}" if fix else message)
        self.reason = message
        """What failed: the message without `fix`."""
        self.fix = fix
        """What to do about it, when the message says it apart ("" if not). A run that ends
        on this error says its own (whether to resume it or send its input again), so its
        outcome's detail gives `reason` alone."""
        self.in_doubt = in_doubt
        """Whether the failed transaction may have committed."""
        self.outcome = outcome
        """The run's outcome (`error` / `storage`) when a keel graph's run ended on this error
        and the caller's stream mode had no place for it (see `keel.graphs`)."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_storage_error, (self.reason, self.in_doubt, self.outcome, self.fix))


def _storage_error(
    message: str, in_doubt: bool, outcome: dict[str, str] | None = None, fix: str = ""
) -> StorageError:
    return StorageError(message, in_doubt=in_doubt, outcome=outcome, fix=fix)


def _one_line(exc: BaseException) -> str:
    """What failed, on one line, to set inside a message that says its own fix.

    Whitespace (libpq's tabs and newlines) is collapsed, libpq's "Is the server running…"
    hint and a trailing period are dropped (the message goes on with its own), a
    `StorageError` gives its `reason` without the fix it says apart, and an error without
    text gives its class name.
    """
    said = exc.reason if isinstance(exc, StorageError) else str(exc)
    lines = [ln for ln in said.splitlines() if not ln.strip().startswith("Is the server")]
    return " ".join(" ".join(lines).split()).rstrip(".") or type(exc).__name__
