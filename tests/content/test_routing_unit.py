"""The pure pieces of content-based routing: CEL ``when`` compile errors with their key paths, the
functions list against the library, which data fields an expression reads, the router's first-match,
``final`` and predicate failures, and ``mediator check`` over a bad ``when``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import cel
import pytest

from mediator.config import Config, parse
from mediator.core.envelope import Envelope, new_event
from mediator.core.errors import ConfigError
from mediator.core.patterns import Template
from mediator.core.predicate import FUNCTIONS, Predicate, PredicateError, data_fields
from mediator.core.router import DestinationSpec, Router, RouteSpec
from mediator.registry import load_specs

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = (ROOT / "config.toml").read_text()


def config(extra: str) -> Config:
    return parse(tomllib.loads(SHIPPED + "\n" + extra), load_specs(), "config.toml")


def problems(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config(extra)
    return exc.value.problems


def route_toml(when: str, name: str = "big") -> str:
    return f"""
[[routes]]
name = "{name}"
when = {when!r}
to = [{{ outbound = "orders-exchange", address = "x" }}]
"""


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("data.total >", 'routes["big"].when: 1:13: Syntax error'),
        ("frobnicate(data.total)", 'routes["big"].when: unknown function(s) frobnicate'),
        ("data.name.lowerAscii() == 'a'", "unknown function(s) lowerAscii"),
        ("subject > 5", 'routes["big"].when: type error: No such overload'),
        ("1 + 2", "must be a boolean expression, not one of type int"),
        ("'yes'", "must be a boolean expression, not one of type str"),
    ],
)
def test_when_errors_name_the_route(when: str, expected: str) -> None:
    found = problems(route_toml(when))
    assert any(expected in p for p in found), found


def test_when_errors_of_an_unnamed_position_and_a_good_when() -> None:
    cfg = config(route_toml("data.total > 1000.0 && subject.startsWith('premium')"))
    (spec,) = [r for r in cfg.routes if r.name == "big"]
    assert spec.when is not None
    assert spec.when.variables == ("data", "subject")
    assert spec.when.fields == ("total",)
    assert not spec.final


def test_routing_mode_first_makes_every_route_final() -> None:
    cfg = config('[routing]\nmode = "first"\n' + route_toml("true"))
    assert all(r.final for r in cfg.routes)
    assert not any(r.final for r in config(route_toml("true")).routes)
    assert any("routing.mode" in p for p in problems('[routing]\nmode = "some"\n'))


def test_mediator_check_reports_a_bad_when(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(SHIPPED + route_toml("data.total >"))
    result = subprocess.run(
        [sys.executable, "-m", "mediator", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    assert 'routes["big"].when: 1:13: Syntax error' in result.stderr


def test_every_listed_function_is_defined_and_others_are_not() -> None:
    probes = ["{f}('a')", "{f}(1)", "'a'.{f}()", "'a'.{f}('a')", "[1].{f}()", "timestamp('2020-01-01T00:00:00Z').{f}()"]

    def defined(name: str) -> bool:
        for probe in probes:
            try:
                cel.compile(probe.format(f=name)).execute({})
                return True
            except Exception as exc:
                if f"Undefined variable or function: '{name}'" not in str(exc):
                    return True
        return False

    assert [f for f in sorted(FUNCTIONS) if not defined(f)] == []
    assert not defined("lowerAscii")
    assert not defined("frobnicate")


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ("data.total > 1.0", ("total",)),
        ("data.a.b == 1 && has(data.c) && data.a.x == 2", ("a", "c")),
        ("data.total > 1.0 && 'data.secret' == subject", ("total",)),  # inside a string: not a read
        ("data.total > 1.0 // data.everything\n", ("total",)),  # a comment
        ("size(data) > 1", None),
        ("data['total'] > 1", None),
        ("data.exists(k, k == 'a')", None),
        ("x.data.total == 1", None),
        ("type == 'a'", ()),
    ],
)
def test_data_fields_an_expression_reads(source: str, fields: tuple[str, ...] | None) -> None:
    cel.compile(source)
    assert data_fields(source) == fields


def event(data: bytes = b'{"total": 1500.0, "tier": "gold"}', subject: str | None = "web-1") -> Envelope:
    env = new_event(type="t.order", source="/s", data=data, content_type="application/json", subject=subject)
    env.provenance.inbound = "orders-http"
    env.provenance.topic = "orders"
    return env


def route(name: str, when: str | None = None, final: bool = False) -> RouteSpec:
    dest = DestinationSpec("out", Template.compile(name))
    return RouteSpec(name, (dest,), when=Predicate.compile(when) if when else None, final=final)


def test_router_first_match_final_and_catch_all() -> None:
    router = Router(
        [
            route("vip", "subject.startsWith('vip')", final=True),
            route("big", "data.total > 1000.0", final=True),
            route("all", final=True),
            route("never"),
        ]
    )
    assert [d.route for d in router.route(event(subject="vip-1"))[0]] == ["vip"]
    assert [d.route for d in router.route(event())[0]] == ["big"]
    assert [d.route for d in router.route(event(b'{"total": 5}'))[0]] == ["all"]


def test_a_failing_predicate_is_no_match_reported_and_others_still_deliver() -> None:
    failed: list[tuple[str, str, str]] = []
    router = Router(
        [
            route("needs-subject", "subject == 'x'"),
            route("tier", "data.tier == 'gold'"),
            route("big", "data.total > 1000.0"),
        ]
    )
    deliveries, failures = router.route(event(subject=None), None, lambda r, e, why: failed.append((r, e.id, why)))
    assert [d.route for d in deliveries] == ["tier", "big"]
    assert failures == []
    assert [r for r, _, _ in failed] == ["needs-subject"]
    assert failed[0][2].startswith("Undefined variable or function: 'subject'")
    # Data that is not JSON: `data` is undefined; data that says JSON and is not: the reason.
    failed.clear()
    text = new_event(type="t", source="/s", data=b"plain", content_type="text/plain")
    assert router.route(text, None, lambda r, e, why: failed.append((r, e.id, why)))[0] == []
    assert {r for r, _, _ in failed} == {"needs-subject", "tier", "big"}
    failed.clear()
    broken = event(b'{"total": ')
    router.route(broken, None, lambda r, e, why: failed.append((r, e.id, why)))
    assert any("not valid JSON" in why for _, _, why in failed), failed


def test_the_data_is_parsed_once_for_every_route_and_only_when_needed() -> None:
    calls: list[str] = []

    def getter(env: Envelope) -> Any:
        calls.append(env.id)
        return {"total": 1500.0, "tier": "gold"}

    router = Router(
        [route("a", "data.total > 1.0"), route("b", "data.tier == 'gold'"), route("c", "type == 't.order'")]
    )
    assert len(router.route(event(), getter)[0]) == 3
    assert len(calls) == 1
    calls.clear()
    Router([route("c", "type == 't.order'"), route("d")]).route(event(), getter)
    assert calls == []


def test_integer_and_boolean_extensions_are_cel_ints_and_bools() -> None:
    env = event()
    env.attributes["priority"].ce_integer = 7
    env.attributes["urgent"].ce_boolean = True
    pred = Predicate.compile("priority > 5 && urgent && time.startsWith('20')")
    router = Router([RouteSpec("r", (DestinationSpec("out", Template.compile("x")),), when=pred)])
    assert len(router.route(env)[0]) == 1
    with pytest.raises(PredicateError):
        Predicate.compile("data.x > 1").evaluate({"data": {"x": "a"}})
