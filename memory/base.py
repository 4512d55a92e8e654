"""Pure logic of `ChromaStore`: record layout, filters, namespaces. No I/O here.

Layout (see `ChromaStore` for the why): items live in *partitions*, one pair of Chroma collections
per namespace prefix of length `partition_depth` (`…-i` holds one record per item, `…-v` one
record per embedded text). A namespace shorter than the depth is its own partition. A catalog
collection lists every namespace ever written and records the store's embedding model.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from langgraph.store.base import (
    InvalidNamespaceError,
    Item,
    MatchCondition,
    Op,
    PutOp,
    SearchItem,
    SearchOp,
    get_text_at_path,
    tokenize_path,
)

from keel.errors import UserError

__all__ = [
    "NEVER",
    "Hit",
    "Pending",
    "Row",
    "alive",
    "by_partition",
    "and_where",
    "check_types",
    "collection_name",
    "does_match",
    "index_texts",
    "item_id",
    "item_metadata",
    "last_puts",
    "matches",
    "namespace_where",
    "pushdown",
    "rank",
    "row_of",
    "vector_id",
]

NEVER = 1e18
"""`exp` (epoch seconds) of an item without a TTL: Chroma compares floats, so no NULLs."""

_BIG = 1.7e308
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,38}[a-z0-9]$|^[a-z0-9]$")
_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")
_RANGE = {"$gt", "$gte", "$lt", "$lte"}


def check_store_name(name: object) -> str:
    """A store name is a short lowercase slug, because it is part of Chroma collection names."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(
            f"ChromaStore(name={name!r}) must be 1-40 characters of a-z, 0-9 and '-', starting "
            "and ending with a letter or digit, e.g. name='keel'."
        )
    return name


def ns_json(namespace: Sequence[str]) -> str:
    """The namespace as compact JSON (a stable, exact, unambiguous text form)."""
    return json.dumps(list(namespace), separators=(",", ":"), ensure_ascii=False)


def collection_name(store: str, partition: Sequence[str], kind: str) -> str:
    """Chroma collection name of one partition: `keel-<store>-<sha256 prefix>-<kind>`."""
    digest = hashlib.sha256(ns_json(partition).encode()).hexdigest()[:32]
    return f"keel-{store}-{digest}-{kind}"


def item_id(namespace: Sequence[str], key: str) -> str:
    """Chroma id of an item record: exact (namespace, key), never confusable with another."""
    return json.dumps([list(namespace), key], separators=(",", ":"), ensure_ascii=False)


def vector_id(iid: str, index: int) -> str:
    """Chroma id of the `index`-th embedded text of an item."""
    return f"{iid}\x00{index}"


def item_metadata(
    namespace: Sequence[str],
    key: str,
    value: Mapping[str, Any],
    *,
    created: float,
    updated: float,
    exp: float,
    ttl: float | None,
    nv: int,
    depth: int,
) -> dict[str, Any]:
    """The Chroma metadata of an item record; `vector_metadata` keeps what vector records need.

    Labels below the partition depth (`p{depth}`…) are copied for `where`; the partition
    itself is implied by the collection.
    """
    record = [key, value, created, updated, -1.0 if ttl is None else float(ttl), nv]
    md: dict[str, Any] = {  # few keys: Chroma reads metadata key by key
        "ns": ns_json(namespace),
        "r": json.dumps(record, separators=(",", ":"), ensure_ascii=False),
        "exp": exp,
        "nv": nv,
    }
    for i in range(depth, len(namespace)):
        md[f"p{i}"] = namespace[i]
    for name, v in value.items():  # copies that Chroma's `where` can pre-filter on
        if isinstance(v, str):
            md[f"s:{name}"] = v
        elif _numeric(v) and v == v:  # not NaN (math.isnan of an int past 1e308 raises)
            md[f"n:{name}"] = _clamped(v)
    return md


def _clamped(v: float) -> float:
    """`v` as a float Chroma keeps: ±inf, and ints past a float's range, as the largest floats."""
    if isinstance(v, int) and abs(v) > _BIG:  # float(10**400) raised OverflowError
        return _BIG if v > 0 else -_BIG
    return max(-_BIG, min(_BIG, float(v)))


def vector_metadata(md: Mapping[str, Any]) -> dict[str, Any]:
    """The item metadata without the filter copies: fewer keys make every vector query cheaper.

    Filters on a vector search are checked in Python on the hits (see `ChromaStore._scored`).
    """
    return {k: v for k, v in md.items() if k in ("ns", "r", "exp") or k.startswith("p")}


@dataclass(frozen=True, slots=True)
class Row:
    """One decoded Chroma record."""

    iid: str
    namespace: tuple[str, ...]
    key: str
    value: dict[str, Any]
    created: float
    updated: float
    exp: float
    ttl: float | None
    nv: int

    def item(self) -> Item:
        """As a LangGraph `Item`."""
        return Item(
            value=self.value,
            key=self.key,
            namespace=self.namespace,
            created_at=_dt(self.created),
            updated_at=_dt(self.updated),
        )

    def search_item(self, score: float | None) -> SearchItem:
        """As a LangGraph `SearchItem`."""
        return SearchItem(
            self.namespace, self.key, self.value, _dt(self.created), _dt(self.updated), score
        )


def row_of(md: Mapping[str, Any]) -> Row:
    """Decode the metadata of an item or vector record."""
    namespace = tuple(json.loads(md["ns"]))
    key, value, created, updated, ttl, nv = json.loads(md["r"])
    return Row(
        iid=item_id(namespace, key),
        namespace=namespace,
        key=key,
        value=value,
        created=created,
        updated=updated,
        exp=float(md["exp"]),
        ttl=None if ttl < 0 else float(ttl),
        nv=int(nv),
    )


def alive(row: Row, now: float) -> bool:
    """Whether an item is visible: expired items are invisible at once, before any sweep."""
    return row.exp > now


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def index_texts(value: Mapping[str, Any], fields: Sequence[str]) -> list[str]:
    """The texts of `value` to embed for `fields` (LangGraph's path syntax, `$` = whole value)."""
    texts: list[str] = []
    for path in fields:
        if path == "$":
            texts.append(json.dumps(value, ensure_ascii=False))
            continue
        texts.extend(get_text_at_path(value, tokenize_path(path)))
    return texts


# Filters ---------------------------------------------------------------------------------------


def check_types(op: Op) -> Op:
    """The operation with its namespace as a tuple, or a `UserError` naming the wrong type.

    LangGraph types these arguments but does not check them: a namespace written
    `("memories")` (a string: the comma is missing) was split into one label per letter and
    stored, a list namespace failed with `unhashable type: 'list'`, and a key, limit, query
    or ttl of another type failed deep in the store with an error that named nothing.
    """
    name = type(op).__name__
    field = "namespace_prefix" if isinstance(op, SearchOp) else "namespace"
    ns = getattr(op, field, None)
    if ns is not None:
        if isinstance(ns, str):
            raise UserError(
                f"{name}: the {field} {ns!r} is a string; a namespace is a tuple of labels: "
                f"({ns!r},) (mind the comma) or ('memories', tenant, user)."
            )
        if isinstance(ns, list):
            listed: Any = op  # every op is a NamedTuple; mypy checks `**` against each field
            op = listed._replace(**{field: tuple(ns)})
        elif not isinstance(ns, tuple):
            raise UserError(
                f"{name}: the {field} must be a tuple of string labels, got {type(ns).__name__}."
            )
    key = getattr(op, "key", "")
    if not isinstance(key, str):
        raise UserError(f"{name}: the key must be a string, got {type(key).__name__} {key!r}.")
    for what in ("limit", "offset"):
        n = getattr(op, what, 0)
        if isinstance(n, bool) or not isinstance(n, int):
            raise UserError(f"{name}: {what} must be a whole number, got {n!r}.")
    query = getattr(op, "query", None)
    if query is not None and not isinstance(query, str):
        raise UserError(f"{name}: the query must be text or None, got {type(query).__name__}.")
    ttl = getattr(op, "ttl", None)
    if ttl is not None and not is_minutes(ttl):
        raise UserError(f"put(ttl={ttl!r}): {TTL_RULE}")
    return op


MAX_TTL = 1e15
"""The longest TTL in minutes (1.9 billion years): its expiry stays a finite float below `NEVER`."""
TTL_RULE = (
    f"ttl is in minutes and must be a number > 0 and at most {MAX_TTL:g}, or None for no expiry."
)


def is_minutes(ttl: object) -> bool:
    """Whether `ttl` is a TTL keel can store: a finite number of minutes in (0, `MAX_TTL`].

    An infinite TTL made an expiry Chroma drops from the metadata (it keeps no `inf`): the item
    was written without one, and every later search of its partition failed on it.
    """
    return isinstance(ttl, int | float) and not isinstance(ttl, bool) and 0 < ttl <= MAX_TTL


def check_utf8(op: object) -> None:
    """Refuse a lone surrogate in an operation's namespace, key, value or query.

    It is not UTF-8: Chroma's tokenizer, its metadata and SQLite each fail on it with an error
    that does not say which text was at fault.
    """
    parts = {
        "namespace": getattr(op, "namespace", None) or getattr(op, "namespace_prefix", None),
        "key": getattr(op, "key", None),
        "value": getattr(op, "value", None),
        "query": getattr(op, "query", None),
    }
    for what, part in parts.items():
        try:
            json.dumps(part, ensure_ascii=False, default=str).encode("utf-8")
        except RecursionError:  # it escaped as a bare RecursionError
            raise UserError(
                f"ChromaStore: the {what} of a {type(op).__name__} is nested too deeply to store "
                "as JSON; flatten it."
            ) from None
        except UnicodeEncodeError:
            raise UserError(
                f"ChromaStore: the {what} of a {type(op).__name__} holds a lone surrogate (text "
                "that is not UTF-8, such as '\\ud800'), which the store cannot keep or embed: "
                "pass valid text (text.encode('utf-8', 'replace').decode() drops it)."
            ) from None


def check_put(op: PutOp) -> None:
    """Refuse a `put` whose value is not a JSON object, or whose `index` is not a field list.

    LangGraph types the value `dict[str, Any]` and `index` `Literal[False] | list[str] | None`;
    without this a string value failed deep in the store with `AttributeError: 'str' object has
    no attribute 'items'`, an object with `TypeError: ... not JSON serializable` and
    `index=True` with `'bool' object is not iterable`, after the texts were embedded.
    """
    where = f"put({list(op.namespace)!r}, {op.key!r}, ...)"
    if op.value is not None:
        check_put_namespace(op.namespace)
        if not isinstance(op.value, Mapping):
            raise UserError(
                f"{where}: the value must be a dict (a JSON object), got "
                f"{type(op.value).__name__}; wrap it, e.g. {{'text': ...}}."
            )
        try:
            json.dumps(op.value, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"{where}: the value must hold only JSON types (dict, list, str, int, float, "
                f"bool, None): {exc}. Convert it first, e.g. str() or .isoformat()."
            ) from None
    index = op.index
    if not (
        index is None
        or index is False
        or (isinstance(index, list | tuple) and all(isinstance(f, str) for f in index))
    ):
        raise UserError(
            f"{where}: index must be None (the store's fields), False (not searchable) or a "
            f"list of field paths such as ['text'], got {index!r}."
        )


def check_put_namespace(namespace: tuple[str, ...]) -> None:
    """Refuse writing to the empty namespace or under the reserved root label "langgraph".

    LangGraph's `BaseStore.put` refuses both, but ops handed straight to `batch`/`abatch` (as
    the LangGraph server does) skip that check; the labels themselves are checked for every op
    by `validate_op_namespace`. Deletes (value None) are not refused, as in LangGraph.
    """
    if not namespace:
        raise InvalidNamespaceError(
            "Namespace cannot be empty: put(...) needs at least one label, e.g. ('memories',)."
        )
    if namespace[0] == "langgraph":
        raise InvalidNamespaceError(
            f'Root label for namespace cannot be "langgraph" (reserved by LangGraph). '
            f"Got: {namespace}; pick another first label."
        )


def check_filter(flt: object) -> dict[str, Any] | None:
    """Reject filters LangGraph's stores do not understand, naming the bad part."""
    if flt is None:
        return None
    if not isinstance(flt, Mapping):
        raise UserError(f"search(filter=...) must be a dict of field -> value, got {flt!r}.")
    for name, cond in flt.items():
        if isinstance(cond, Mapping) and any(str(k).startswith("$") for k in cond):
            bad = [k for k in cond if k not in _OPS]
            if bad:
                raise UserError(
                    f"search(filter={{{name!r}: ...}}) uses unsupported operator(s) {bad}; "
                    f"use one of {list(_OPS)} or a plain value."
                )
    return dict(flt)


def matches(value: Mapping[str, Any], flt: Mapping[str, Any] | None) -> bool:
    """LangGraph's filter semantics (as `InMemoryStore`), evaluated exactly on the value.

    One deliberate difference: a range operator (`$gt` …) on a missing or non-numeric field
    does not match, where `InMemoryStore` raises `TypeError` or compares numeric strings.
    """
    return not flt or all(_compare(value.get(k), f) for k, f in flt.items())


def _compare(item_value: Any, flt: Any) -> bool:
    if isinstance(flt, Mapping):
        if any(str(k).startswith("$") for k in flt):
            return all(_apply(item_value, op, v) for op, v in flt.items())
        if not isinstance(item_value, Mapping):
            return False
        return all(_compare(item_value.get(k), v) for k, v in flt.items())
    if isinstance(flt, list | tuple):
        return (
            isinstance(item_value, list | tuple)
            and len(item_value) == len(flt)
            and all(_compare(i, f) for i, f in zip(item_value, flt, strict=True))
        )
    return bool(item_value == flt)


def _apply(value: Any, op: str, target: Any) -> bool:
    if op == "$eq":
        return bool(value == target)
    if op == "$ne":
        return bool(value != target)
    if not _numeric(value) or not _numeric(target):
        return False
    a, b = value, target  # compared as they are: float() of an int past 1e308 raises
    return bool({"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[op])


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def pushdown(flt: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Chroma `where` clauses implied by the filter: a superset pre-filter, checked exactly later.

    String equality and numeric ranges go to Chroma; everything else (bool/number equality,
    `$ne`, nested values) is left to `matches`, so the clauses never drop a matching item.
    """
    clauses: list[dict[str, Any]] = []
    for name, cond in (flt or {}).items():
        if isinstance(cond, str):
            clauses.append({f"s:{name}": cond})
        elif isinstance(cond, Mapping) and any(str(k).startswith("$") for k in cond):
            for op, target in cond.items():
                if op == "$eq" and isinstance(target, str):
                    clauses.append({f"s:{name}": target})
                elif op in _RANGE and _numeric(target) and target == target:  # not NaN
                    # non-strict: values are rounded to floats (and clamped) on both sides, so
                    # 2**53 + 1 > 2**53 holds exactly but not as floats; `matches` is exact
                    loose = {"$gt": "$gte", "$lt": "$lte"}.get(op, op)
                    clauses.append({f"n:{name}": {loose: _clamped(target)}})
    return clauses


def namespace_where(prefix: Sequence[str], depth: int) -> list[dict[str, Any]]:
    """Clauses selecting `prefix` inside its partition (none when the partition is the prefix)."""
    return [{f"p{i}": prefix[i]} for i in range(depth, len(prefix))]


def and_where(clauses: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Chroma needs `$and` for two or more clauses and rejects an empty one."""
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": list(clauses)}


def does_match(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    """LangGraph's namespace match: whole segments, `*` matches any one segment."""
    path = tuple(condition.path)
    if len(namespace) < len(path):
        return False
    pairs = (
        zip(namespace, path, strict=False)
        if condition.match_type == "prefix"
        else zip(reversed(namespace), reversed(path), strict=False)
    )
    return all(p == "*" or n == p for n, p in pairs)


# Batches -----------------------------------------------------------------------------------------

Hit = tuple[float | None, Row]
"""A search hit: its score (`None` for an item without vectors) and the row."""


@dataclass(slots=True)
class Pending:
    """Writes a batch's reads schedule: TTL refreshes and deletions of expired rows."""

    refresh: dict[str, Row] = field(default_factory=dict)
    expired: dict[str, Row] = field(default_factory=dict)


def rank(hit: Hit) -> tuple[int, float, float, tuple[str, ...], str]:
    """Sort key: scored hits by score, then unscored; ties newest first, then by name."""
    score, row = hit
    return (score is None, -(score or 0.0), -row.updated, row.namespace, row.key)


def last_puts(ops: Iterable[Op]) -> dict[tuple[tuple[str, ...], str], PutOp]:
    """The batch's puts, the last one per item winning (as in `InMemoryStore`)."""
    puts: dict[tuple[tuple[str, ...], str], PutOp] = {}
    for op in ops:
        if isinstance(op, PutOp):
            puts.pop((op.namespace, op.key), None)
            puts[(op.namespace, op.key)] = op
    return puts


def by_partition(rows: Iterable[Row], depth: int) -> dict[tuple[str, ...], list[Row]]:
    """Rows grouped by the partition (first `depth` labels) they live in."""
    out: dict[tuple[str, ...], list[Row]] = {}
    for row in rows:
        out.setdefault(row.namespace[:depth], []).append(row)
    return out
