"""Write docs/config-reference.md from the pydantic models: every key of config.toml, its type, default and
description, so the reference cannot drift from the code (tests/firsthour/test_config_reference.py
regenerates it and compares).

`python scripts/gen_config_reference.py` rewrites the committed copy (`make docs`);
`python scripts/gen_config_reference.py --check` exits 1 when it differs.

Sections come from the models themselves: every field of ``RootConfig`` (so a root section added there
appears here without touching this script), every adapter's listener / broker / inbound / outbound model
from the registry, and every table nested in them. A field's description is its ``Field(description=...)``,
else the comment on its line or just above it in the model's source.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mediator.config import RootConfig  # noqa: E402
from mediator.core.patterns import Template  # noqa: E402
from mediator.registry import load_specs  # noqa: E402
from mediator.reloadable import DAEMON_KEYS, LIVE, SECTIONS  # noqa: E402

OUT = ROOT / "docs" / "config-reference.md"
ADAPTER_SECTIONS = {
    "listeners": "listener_model",
    "brokers": "broker_model",
    "inbound": "inbound_model",
    "outbound": "outbound_model",
}

HEADER = """# config.toml reference

Generated from the config models by `scripts/gen_config_reference.py` (`make docs`); do not edit by hand.
Every key is validated strictly: an unknown key is an error (`mediator check` suggests the closest one).
Durations are seconds (`*_s`). NAME is a name you choose; it appears unchanged in logs and metrics.
Secrets are never inline: keys ending in `_env` name an environment variable, `*_file` a path relative to
the config file.
"""


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _members(tp: Any) -> list[Any]:
    tp = _unwrap(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [_unwrap(m) for m in typing.get_args(tp)]
    return [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def type_name(tp: Any) -> str:
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a.value if isinstance(a, Enum) else a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(tp) if m is not type(None)]
        names = " \\| ".join(type_name(m) for m in members)
        return f"{names} (optional)" if len(members) < len(typing.get_args(tp)) else names
    if origin in (list, tuple, set, frozenset):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"table of {type_name(typing.get_args(tp)[1])}"
    if tp is Template:
        return "template"
    if _is_model(tp):
        return "table"
    if tp is typing.Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def constraints(info: FieldInfo) -> str:
    out = []
    for m in info.metadata:
        for cls, attr, sign in (
            (annotated_types.Gt, "gt", ">"),
            (annotated_types.Ge, "ge", ">="),
            (annotated_types.Lt, "lt", "<"),
            (annotated_types.Le, "le", "<="),
        ):
            if isinstance(m, cls):
                out.append(f"{sign} {getattr(m, attr)}")
        if isinstance(m, annotated_types.MinLen) and m.min_length:
            out.append(f"at least {m.min_length}")
        if isinstance(m, annotated_types.MaxLen):
            out.append(f"at most {m.max_length}")
    return ", ".join(out)


def default_of(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    value = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return "**required**"
    if isinstance(value, BaseModel):
        return "(see below)"
    if isinstance(value, Template):
        value = value.text
    if value is None:
        return "none"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, frozenset | set | tuple):
        value = sorted(value) if isinstance(value, frozenset | set) else list(value)
    return f"`{json.dumps(value)}`"


def source_comments(model: type[BaseModel]) -> dict[str, str]:
    """The comment on each field's line, else the comment lines just above it, in the model's source."""
    try:
        lines = inspect.getsource(model).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if match and match.group(1) in model.model_fields:
            out[match.group(1)] = match.group(2) or " ".join(above)
        above = []
    return out


def description_of(model: type[BaseModel], name: str, info: FieldInfo, comments: dict[str, str]) -> str:
    text = info.description or comments.get(name, "")
    return " ".join(text.split()).replace("|", "\\|")


def doc_of(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    inherited = [inspect.getdoc(b) for b in model.__mro__[1:] if _is_model(b)]
    if doc in inherited:
        return ""
    return " ".join(doc.split("\n\n")[0].split())


class Writer:
    def __init__(self) -> None:
        self.lines: list[str] = [HEADER]
        self.done: set[tuple[str, type[BaseModel]]] = set()

    def section(self, path: str, model: type[BaseModel], *, array: bool = False, kind: str | None = None) -> None:
        """One table's keys, then the tables nested in it (``path.key``, ``[[path.key]]``, ``path.key.NAME``)."""
        if (path, model) in self.done:
            return
        self.done.add((path, model))
        heading = f"[[{path}]]" if array else f"[{path}]"
        where = f" (kind = {json.dumps(kind)})" if kind else ""
        self.lines.append(f"### `{heading}`{where}\n")
        intro = doc_of(model)
        if intro:
            self.lines.append(intro + "\n")
        comments: dict[str, str] = {}
        for cls in reversed(model.__mro__):
            if _is_model(cls) and cls is not BaseModel:
                comments.update(source_comments(cls))
        nested: list[tuple[str, type[BaseModel], bool]] = []
        self.lines.append("| key | type | default | description |")
        self.lines.append("|---|---|---|---|")
        for name, info in model.model_fields.items():
            key = info.alias or name
            kind_text = type_name(info.annotation)
            limits = constraints(info)
            if limits:
                kind_text += f" ({limits})"
            self.lines.append(
                f"| `{key}` | {kind_text} | {default_of(info)} | {description_of(model, name, info, comments)} |"
            )
            for member in _members(info.annotation):
                origin = typing.get_origin(member)
                if _is_model(member):
                    nested.append((f"{path}.{key}", member, False))
                elif origin in (list, dict):
                    for m in _members(typing.get_args(member)[-1]):
                        if _is_model(m):
                            nested.append((f"{path}.{key}" + (".NAME" if origin is dict else ""), m, origin is list))
        self.lines.append("")
        for sub_path, sub, sub_array in nested:
            self.section(sub_path, sub, array=sub_array)  # shared by kinds (retry, tls): no kind named


def _kind_of(model: type[BaseModel]) -> str | None:
    kind = model.model_fields.get("kind")
    if kind is None:
        return None
    args = typing.get_args(_unwrap(kind.annotation))
    return str(args[0]) if args else None


def render() -> str:
    w = Writer()
    specs = load_specs()
    w.lines.append("## What a reload applies\n")

    def heading(k: str) -> str:
        origin = typing.get_origin(_unwrap(RootConfig.model_fields[k].annotation))
        return f"`[[{k}]]`" if origin is list else f"`[{k}.NAME]`" if origin is dict else f"`[{k}]`"

    names = [heading(k) for k in SECTIONS if k != "daemon"]
    kinds = [SECTIONS[k] for k in SECTIONS if k != "daemon"]
    keys = [f"`daemon.{k}`" for k in DAEMON_KEYS]
    live = [n for n, how in zip(names, kinds, strict=True) if how == LIVE]
    live += [n for n, how in zip(keys, DAEMON_KEYS.values(), strict=True) if how == LIVE]
    restart = [n for n, how in zip(names, kinds, strict=True) if how != LIVE]
    restart += [n for n, how in zip(keys, DAEMON_KEYS.values(), strict=True) if how != LIVE]
    w.lines.append(
        "`mediator reload` (SIGHUP, or an edit of the file) applies these at once: "
        + ", ".join(live)
        + ". These keep the value the daemon started with, and every reload names them in its outcome's "
        "`restart_required` until the daemon is restarted: " + ", ".join(restart) + " (`mediator/reloadable.py`).\n"
    )
    w.lines.append("## Root sections\n")
    adapter_fields = []
    for name, info in RootConfig.model_fields.items():
        if name in ADAPTER_SECTIONS:
            adapter_fields.append(name)
            continue
        tp = _unwrap(info.annotation)
        origin = typing.get_origin(tp)
        if _is_model(tp):
            w.section(name, tp)
        elif origin is list:
            for m in _members(typing.get_args(tp)[0]):
                if _is_model(m):
                    w.section(name, m, array=True)
        elif origin is dict:
            for m in _members(typing.get_args(tp)[1]):
                if _is_model(m):
                    w.section(f"{name}.NAME", m, kind=_kind_of(m))
    w.lines.append("## Adapter sections\n")
    w.lines.append(
        "Listeners, brokers, inbounds and outbounds are typed by their `kind`; each adapter (`adapters/<kind>/`) "
        "brings its own models.\n"
    )
    for section in adapter_fields:
        for kind, spec in sorted(specs.items()):
            model = getattr(spec, ADAPTER_SECTIONS[section])
            if model is not None:
                w.section(f"{section}.NAME", model, kind=kind)
    return "\n".join(w.lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
