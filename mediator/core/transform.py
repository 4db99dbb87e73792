"""Transformations of one event: ordered field operations and a JSONata expression. Pure; no I/O.

The operations run in the order Kong's request-transformer applies them, each kind in the order written:
``remove``, ``rename``, ``replace`` (only where present), ``add`` (only where absent), then ``promote``
(copy a data field into an attribute), then the ``jsonata`` expression, whose result becomes the data.
``decrypt`` runs before all of them and ``encrypt`` after all of them (``mediator.core.jwe``: each named
data field's value becomes, or is read back from, a JWE compact serialization under an
``[encryption.NAME]`` key ring).
A path is ``data.a.b`` (a field of the JSON data) or an attribute name (``subject``, ``authid``); a
string value is a ``Template`` (``{subject}``, ``{topic.1}``, ``{inbound}``, any attribute), any other
TOML value is put into the data as JSON. An attribute written from the data gets the value's string form.

``Transform.apply`` never changes the event it is given: it returns a new one (or the same one when
nothing changed), so the destinations of one event can each transform it their own way. It raises
``TransformError`` with a reason (data that is not JSON, a field of the wrong kind, an expression that
fails or runs out of time); the caller decides what that means (dead-letter one destination at egress,
refuse the event at ingress).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mediator.core.content import NOT_JSON, parsed
from mediator.core.envelope import Envelope, attribute, data_bytes, set_attribute, valid_attribute_name, value_to_str
from mediator.core.errors import Rejected
from mediator.core.jwe import JweError, KeyRing
from mediator.core.patterns import Template, TemplateError

REQUIRED = frozenset({"id", "source", "type", "specversion"})

DataGetter = Callable[[Envelope], Any]
"""The event's data parsed as JSON (``NOT_JSON`` otherwise): ``Batch.data.get`` or ``content.parsed``.
Its result is shared with other readers and must not be modified."""


class TransformError(Exception):
    """This event cannot be transformed; the message says why."""


# --------------------------------------------------------------------------- config
JsonValue = str | int | float | bool | list[Any] | dict[str, Any]


def _check_path(path: str) -> str:
    if path.startswith("data."):
        keys = path[5:].split(".")
        if any(not k for k in keys):
            raise ValueError(f"{path!r}: an empty field name")
        return path
    if path == "data":
        raise ValueError("'data' as a whole: use jsonata to replace the data")
    if path not in REQUIRED and not valid_attribute_name(path):
        raise ValueError(f"{path!r} is neither data.FIELD nor an attribute name (lower-case letters and digits)")
    return path


class TransformConfig(BaseModel):
    """``transform = { remove = [...], rename = {...}, replace = {...}, add = {...}, promote = {...},
    jsonata = "..." }`` on a destination (egress) or an inbound (ingress)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    remove: list[str] = Field(default_factory=list, description="data fields or attributes to remove")
    rename: dict[str, str] = Field(default_factory=dict, description="from path = to path (moves the value)")
    replace: dict[str, JsonValue] = Field(default_factory=dict, description="path = value, only where present")
    add: dict[str, JsonValue] = Field(default_factory=dict, description="path = value, only where absent")
    promote: dict[str, str] = Field(default_factory=dict, description="data field = attribute to copy it into")
    jsonata: str | None = Field(default=None, description="JSONata over the data; its result becomes the data")
    jsonata_timeout_s: float = Field(default=0.05, gt=0, le=10.0, description="bound of one JSONata evaluation")
    decrypt: list[str] = Field(
        default_factory=list, description="data fields ($.a.b or data.a.b) holding JWE values to decrypt (first)"
    )
    encrypt: list[str] = Field(
        default_factory=list, description="data fields ($.a.b or data.a.b) to encrypt as JWE values (last)"
    )
    keyring: str | None = Field(
        default=None, description="the [encryption.NAME] ring of encrypt/decrypt (default: the only one)"
    )

    @field_validator("encrypt", "decrypt")
    @classmethod
    def _fields(cls, value: list[str]) -> list[str]:
        out = [data_path(p) for p in value]
        dupes = sorted({p for p in out if out.count(p) > 1})
        if dupes:
            raise ValueError(f"{dupes[0]!r} is listed twice")
        return out

    @field_validator("remove")
    @classmethod
    def _remove(cls, value: list[str]) -> list[str]:
        for path in value:
            _check_path(path)
            if path in REQUIRED:
                raise ValueError(f"{path!r} is a required attribute and cannot be removed")
        return value

    @field_validator("rename")
    @classmethod
    def _rename(cls, value: dict[str, str]) -> dict[str, str]:
        for src, dst in value.items():
            _check_path(src)
            _check_path(dst)
            if src in REQUIRED:
                raise ValueError(f"{src!r} is a required attribute and cannot be renamed away")
        return value

    @field_validator("replace", "add")
    @classmethod
    def _values(cls, value: dict[str, JsonValue]) -> dict[str, JsonValue]:
        for path, v in value.items():
            _check_path(path)
            if isinstance(v, str):
                Template.compile(v)
            elif not path.startswith("data.") and not isinstance(v, int):  # bool is an int
                raise ValueError(f"{path!r}: an attribute takes a string, an integer or a boolean")
        return value

    @field_validator("promote")
    @classmethod
    def _promote(cls, value: dict[str, str]) -> dict[str, str]:
        for src, dst in value.items():
            if not src.startswith("data."):
                raise ValueError(f"{src!r}: promote copies a data field (data.NAME) into an attribute")
            _check_path(src)
            if _check_path(dst).startswith("data."):
                raise ValueError(f"{dst!r}: promote writes an attribute, not a data field (use rename)")
        return value

    @field_validator("jsonata")
    @classmethod
    def _jsonata(cls, value: str | None) -> str | None:
        if value is not None:
            _compile_jsonata(value)
        return value

    @model_validator(mode="after")
    def _something(self) -> TransformConfig:
        ops = (self.remove, self.rename, self.replace, self.add, self.promote, self.jsonata, self.encrypt, self.decrypt)
        if not any(ops):
            raise ValueError(
                "an empty transform: give remove, rename, replace, add, promote, jsonata, encrypt or decrypt"
            )
        if self.keyring is not None and not (self.encrypt or self.decrypt):
            raise ValueError("keyring is for encrypt and decrypt")
        return self

    @property
    def crypto(self) -> bool:
        return bool(self.encrypt or self.decrypt)


def data_path(text: str) -> str:
    """``$.a.b`` (a JSONPath into the data, dotted names only) or ``data.a.b``, as ``data.a.b``."""
    path = "data." + text[2:] if text.startswith("$.") else text
    if not path.startswith("data.") or any(not k or c in k for k in path[5:].split(".") for c in "[]*$"):
        raise ValueError(f"{text!r}: name a data field, $.a.b or data.a.b (dotted names, no [] or *)")
    return path


# --------------------------------------------------------------------------- JSONata, bounded
RANGE_LIMIT = 100_000
"""The longest range (``[1..n]``) an expression may build; JSONata's own limit is 10^7, which takes a
second to count in Python, and a single built-in call cannot be interrupted."""


def _compile_jsonata(source: str) -> Any:
    try:
        return _bounded_class()(source)
    except Exception as exc:  # JException (a RuntimeError) with the position
        raise ValueError(f"JSONata: {exc}") from None


_BOUNDED: type | None = None


def _bounded_class() -> type:
    """A Jsonata subclass with a shorter range limit. (jsonata-python evaluates every expression of a
    thread on the instance constructed last there, so all of ours are of this class.)"""
    global _BOUNDED
    if _BOUNDED is None:
        from jsonata import Jsonata
        from jsonata.jexception import JException

        class _Bounded(Jsonata):  # type: ignore[misc]
            def evaluate_range_expression(self, lhs: Any, rhs: Any) -> Any:
                if isinstance(lhs, int) and isinstance(rhs, int) and rhs - lhs >= RANGE_LIMIT:
                    raise JException("D2014", -1, rhs - lhs + 1)
                return super().evaluate_range_expression(lhs, rhs)

        _BOUNDED = _Bounded
    return _BOUNDED


class _OutOfTime(Exception):
    pass


class JsonataProgram:
    """One compiled expression with a time and depth bound per evaluation.

    jsonata-python's own ``timeout`` counts from when the expression was compiled, not from each
    evaluation, and its depth counter is not reset after an error; so the bound is ours: the library calls
    back on entry to and exit from every evaluation step, and the entry callback checks the clock (every
    16th step: ``time.monotonic`` costs more than a step) and the depth. A built-in function runs to its
    end inside one step; the data's size bounds that (and ``RANGE_LIMIT`` the ranges).
    """

    MAX_DEPTH = 200
    """Nested evaluation steps; each takes several Python frames, and Python stops at 1,000 frames."""

    def __init__(self, source: str, timeout_s: float) -> None:
        self.source = source
        self.timeout_s = timeout_s
        self._expr = _compile_jsonata(source)
        self._expr.set_validate_input(False)  # the input is parsed JSON already; the check costs ~60%
        self._deadline = 0.0
        self._depth = 0
        self._steps = 0
        env = self._expr.environment
        env.set_evaluate_entry_callback(self._entry)
        env.set_evaluate_exit_callback(self._exit)

    def _entry(self, expr: Any, input: Any, env: Any) -> None:
        if env.is_parallel_call:
            return
        self._depth += 1
        self._steps += 1
        if self._depth > self.MAX_DEPTH:
            raise _OutOfTime(f"nests deeper than {self.MAX_DEPTH} steps")
        if not self._steps & 15 and time.monotonic() > self._deadline:
            raise _OutOfTime(f"ran longer than {self.timeout_s} s")

    def _exit(self, expr: Any, input: Any, env: Any, result: Any) -> None:
        if not env.is_parallel_call:
            self._depth -= 1

    def evaluate(self, data: Any, bindings: Mapping[str, Any]) -> Any:
        self._depth = 0
        self._steps = 0
        self._deadline = time.monotonic() + self.timeout_s
        try:
            return self._expr.evaluate(data, bindings)
        except _OutOfTime as exc:
            raise TransformError(f"jsonata {exc}") from None
        except RecursionError:
            raise TransformError("jsonata nests too deeply") from None
        except Exception as exc:  # JException and whatever a built-in raises
            raise TransformError(f"jsonata: {exc}") from None


# --------------------------------------------------------------------------- compiled operations
_ABSENT: Any = object()


@dataclass(frozen=True, slots=True)
class _Path:
    attribute: str | None  # an attribute name, or None for a data path
    keys: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> _Path:
        if text.startswith("data."):
            return cls(None, tuple(text[5:].split(".")))
        return cls(text)

    def __str__(self) -> str:
        return self.attribute if self.attribute is not None else "data." + ".".join(self.keys)


def _as_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return orjson.dumps(value).decode()
    raise TransformError(f"a {type(value).__name__} cannot become an attribute")


def _native(env: Envelope, name: str) -> Any:
    """An attribute's value as data: Integer and Boolean as themselves, the rest as canonical strings."""
    if name in env.attributes:
        value = env.attributes[name]
        kind = value.WhichOneof("attr")
        if kind == "ce_integer":
            return value.ce_integer
        if kind == "ce_boolean":
            return value.ce_boolean
        return value_to_str(value)
    return attribute(env, name)


class _Work:
    """One application: the copied event and its data, taken (and copied) only when an operation needs it."""

    __slots__ = ("changed", "data", "env", "getter", "source")

    def __init__(self, source: Envelope, getter: DataGetter) -> None:
        self.source = source
        self.getter = getter
        self.env: Envelope | None = None
        self.data: Any = _ABSENT
        self.changed = False  # the data

    def event(self) -> Envelope:
        if self.env is None:
            self.env = Envelope()
            self.env.CopyFrom(self.source)
        return self.env

    def root(self) -> Any:
        if self.data is _ABSENT:
            try:
                shared = self.getter(self.source)
            except Rejected as exc:
                raise TransformError(exc.reason) from None
            if shared is NOT_JSON:
                if self.source.WhichOneof("data") not in (None, "binary_data") or self.source.binary_data:
                    raise TransformError("the data is not JSON")
                shared = {}  # no data yet: operations that add fields start from an empty object
            # A private copy: the parsed value is shared with the other destinations and the stages. The
            # getter parsed these very bytes, so parsing them again is the cheapest deep copy (1 KiB: ~1.5 us,
            # against ~25 us for copy.deepcopy).
            if isinstance(shared, dict | list) and shared:
                self.data = orjson.loads(data_bytes(self.source))
            else:
                self.data = type(shared)() if isinstance(shared, dict | list) else shared
        return self.data

    def obj(self) -> dict[str, Any]:
        root = self.root()
        if not isinstance(root, dict):
            raise TransformError(f"the data is a JSON {type(root).__name__}, not an object")
        return root

    def get(self, path: _Path) -> Any:
        if path.attribute is not None:
            if path.attribute == "data":
                return _ABSENT
            value = _native(self.env or self.source, path.attribute)
            return _ABSENT if value is None else value
        node: Any = self.obj()
        for key in path.keys:
            if not isinstance(node, dict) or key not in node:
                return _ABSENT
            node = node[key]
        return node

    def put(self, path: _Path, value: Any) -> None:
        if path.attribute is not None:
            try:
                set_attribute(self.event(), path.attribute, _as_string(value))
            except Rejected as exc:
                raise TransformError(exc.reason) from None
            return
        node = self.obj()
        for key in path.keys[:-1]:
            nxt = node.get(key, _ABSENT)
            if nxt is _ABSENT:
                nxt = node[key] = {}
            elif not isinstance(nxt, dict):
                raise TransformError(f"{path}: data.{key} is a {type(nxt).__name__}, not an object")
            node = nxt
        node[path.keys[-1]] = value
        self.changed = True

    def delete(self, path: _Path) -> None:
        if path.attribute is not None:
            env = self.env or self.source
            if path.attribute in env.attributes:
                del self.event().attributes[path.attribute]
            return
        node: Any = self.obj()
        for key in path.keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path.keys[-1] in node:
            del node[path.keys[-1]]
            self.changed = True


class _Value:
    """A configured value: a template rendered per event, or a JSON literal (copied per use)."""

    __slots__ = ("literal", "template")

    def __init__(self, raw: JsonValue) -> None:
        self.template = Template.compile(raw) if isinstance(raw, str) else None
        self.literal = raw

    def make(self, env: Envelope) -> Any:
        if self.template is not None:
            try:
                return self.template.render(env)
            except TemplateError as exc:
                raise TransformError(str(exc)) from None
        return copy.deepcopy(self.literal) if isinstance(self.literal, dict | list) else self.literal


class Transform:
    """A compiled ``TransformConfig``. ``keyrings`` are the loaded ``[encryption.NAME]`` rings; the one
    ``encrypt``/``decrypt`` use must be there (``mediator.config`` checks the name first)."""

    def __init__(self, cfg: TransformConfig, keyrings: Mapping[str, KeyRing] | None = None) -> None:
        self.config = cfg
        self._ring: KeyRing | None = None
        if cfg.crypto:
            self._ring = resolve_keyring(cfg, keyrings or {})
        self._decrypt = [_Path.parse(p) for p in cfg.decrypt]
        self._encrypt = [_Path.parse(p) for p in cfg.encrypt]
        self._remove = [_Path.parse(p) for p in cfg.remove]
        self._rename = [(_Path.parse(a), _Path.parse(b)) for a, b in cfg.rename.items()]
        self._replace = [(_Path.parse(p), _Value(v)) for p, v in cfg.replace.items()]
        self._add = [(_Path.parse(p), _Value(v)) for p, v in cfg.add.items()]
        self._promote = [(_Path.parse(a), _Path.parse(b)) for a, b in cfg.promote.items()]
        self._jsonata = JsonataProgram(cfg.jsonata, cfg.jsonata_timeout_s) if cfg.jsonata else None

    @property
    def encrypted_pointers(self) -> tuple[str, ...]:
        """The JSON pointers (RFC 6901) of the fields ``encrypt`` names: what a reason must not quote."""
        return tuple(
            "/" + "/".join(k.replace("~", "~0").replace("/", "~1") for k in path.keys) for path in self._encrypt
        )

    def seal(self, env: Envelope, data: DataGetter = parsed) -> Envelope:
        """``env`` with only the ``encrypt`` operations applied (an event kept before the transform ran, as
        a schema's dead letter is, must not hold the clear values either). Raises TransformError."""
        work = _Work(env, data)
        self._encrypt_fields(work)
        if work.changed:
            work.event().binary_data = orjson.dumps(work.data)
        return work.env if work.env is not None else env

    def _encrypt_fields(self, work: _Work) -> None:
        ring = self._ring
        for path in self._encrypt:
            assert ring is not None
            value = work.get(path)
            if value is not _ABSENT:
                try:
                    work.put(path, ring.encrypt(value))
                except JweError as exc:
                    raise TransformError(f"encrypt {path}: {exc}") from None

    def apply(self, env: Envelope, data: DataGetter = parsed) -> Envelope:
        """The transformed event: a copy, or ``env`` itself when nothing changed. Raises TransformError."""
        work = _Work(env, data)
        ring = self._ring
        for path in self._decrypt:  # first: the other operations see the clear value
            assert ring is not None
            value = work.get(path)
            if value is not _ABSENT:
                try:
                    work.put(path, ring.decrypt(value))
                except JweError as exc:
                    raise TransformError(f"decrypt {path}: {exc}") from None
        for path in self._remove:
            work.delete(path)
        for src, dst in self._rename:
            value = work.get(src)
            if value is not _ABSENT:
                work.delete(src)
                work.put(dst, value)
        for path, val in self._replace:
            if work.get(path) is not _ABSENT:
                work.put(path, val.make(work.env or env))
        for path, val in self._add:
            if work.get(path) is _ABSENT:
                work.put(path, val.make(work.env or env))
        for src, dst in self._promote:
            value = work.get(src)
            if value is not _ABSENT:
                work.put(dst, value)
        if self._jsonata is not None:
            current = work.env or env
            bindings = {"event": _event_binding(current)}
            result = self._jsonata.evaluate(work.root(), bindings)
            if result is None:
                raise TransformError("the jsonata expression gave no value")
            work.data = _plain(result)
            work.changed = True
        self._encrypt_fields(work)  # last: nothing after it sees the clear value
        if work.changed:
            out = work.event()
            try:
                out.binary_data = orjson.dumps(work.data)
            except TypeError as exc:
                raise TransformError(f"the result is not JSON: {exc}") from None
        return work.env if work.env is not None else env


def resolve_keyring(cfg: TransformConfig, keyrings: Mapping[str, KeyRing]) -> KeyRing:
    """The ring a transform's encrypt/decrypt use; raises ValueError naming what is missing."""
    if cfg.keyring is not None:
        ring = keyrings.get(cfg.keyring)
        if ring is None:
            raise ValueError(f"keyring: no [encryption.{cfg.keyring}]")
        return ring
    if len(keyrings) != 1:
        names = ", ".join(sorted(keyrings)) or "none"
        raise ValueError(f"encrypt/decrypt: name the keyring ([encryption.NAME] rings: {names})")
    return next(iter(keyrings.values()))


def _plain(value: Any) -> Any:
    """JSONata's results use list subclasses (a lazy range among them, which orjson would write as [])."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _event_binding(env: Envelope) -> dict[str, Any]:
    """``$event`` in a JSONata expression: the context attributes, ``inbound`` and ``topic``."""
    out: dict[str, Any] = {"id": env.id, "source": env.source, "specversion": env.spec_version, "type": env.type}
    for name in env.attributes:
        out[name] = _native(env, name)
    out["inbound"] = env.provenance.inbound
    out["topic"] = env.provenance.topic
    return out
