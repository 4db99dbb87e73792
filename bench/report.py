"""The one table `make bench` prints, from the results dict (also written as bench/results.json)."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    ("path", 28),
    ("system", 26),
    ("msgs/s", 8),
    ("/ceil", 6),
    ("/peer", 6),
    ("e2e@1k p50/p99/max ms", 22),
    ("e2e@sat p50/p99/max ms", 23),
    ("accept p50/p99 ms", 17),
    ("CPU%", 5),
    ("us/msg", 6),
    ("RSS MB", 6),
    ("loss", 5),
    ("dup", 4),
)


def _f(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _lat(lat: dict[str, Any] | None, with_max: bool = True) -> str:
    if not lat:
        return "-"
    parts = [lat["p50_ms"], lat["p99_ms"]] + ([lat["max_ms"]] if with_max else [])
    return "/".join(f"{p:.1f}" if p < 100 else f"{p:.0f}" for p in parts)


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}"


def _row(path: str, system: str, cell: dict[str, Any] | None, ceil: float | None, peer: float | None) -> list[str]:
    if not cell:
        return [path, system] + ["-"] * (len(COLUMNS) - 2)
    if "error" in cell:
        return [path, system, "ERROR: " + cell["error"].splitlines()[0][:100]]
    thr = cell.get("throughput_msgs_s")
    return [
        path,
        system,
        _f(thr),
        _ratio(thr, ceil),
        _ratio(thr, peer),
        _lat(cell.get("latency_fixed_load")) + ("*" if thr is not None and thr < 1050 else ""),
        _lat(cell.get("latency_saturation")),
        _lat(cell.get("accept_latency_wrk"), with_max=False),
        _f(cell.get("cpu_percent")),
        _f(cell.get("cpu_us_per_msg")),
        _f(cell.get("peak_rss_mb")),
        str(cell.get("loss", "-")),
        str(cell.get("duplicates", "-")),
    ]


def _short_system(cell: dict[str, Any] | None, default: str) -> str:
    if not cell or "system" not in cell:
        return default
    s = str(cell["system"])
    if s.startswith("RabbitMQ"):
        return "rabbitmq_mqtt plugin"
    return s[:26]


def table(results: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    ceilings = results.get("ceilings", {})
    for entry in results.get("paths", {}).values():
        title = f"{entry['title']}"
        cks = [ceilings.get(k) for k in entry.get("ceilings", [])]
        cvals = [c.get("throughput_msgs_s") for c in cks if c and c.get("throughput_msgs_s")]
        ceil = min(cvals) if cvals else None
        peers = entry.get("peers", {})
        peer_vals = [p.get("throughput_msgs_s") for p in peers.values() if p and p.get("throughput_msgs_s")]
        peer = max(peer_vals) if peer_vals else None
        med = entry.get("mediator")
        rows.append(_row(title, "mediator (sqlite outbox)", med, ceil, peer))
        if entry.get("mediator_memory"):
            rows.append(_row("", "mediator (memory outbox)", entry["mediator_memory"], ceil, peer))
        for kind, c in zip(entry.get("ceilings", []), cks, strict=False):
            rows.append(_row("", f"ceiling: {kind} direct", c, None, None))
        for pname, p in peers.items():
            rows.append(_row("", _short_system(p, pname), p, None, None))
    widths = [w for _, w in COLUMNS]
    lines = []
    header = [h for h, _ in COLUMNS]
    lines.append(
        "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    )
    lines.append("-" * len(lines[0]))
    for r in rows:
        if len(r) == 3:  # error row
            lines.append(f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}")
            continue
        lines.append(
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    meta = results.get("meta", {})
    notes = [
        "",
        f"1 KiB payloads. msgs/s = distinct sequence numbers counted at the consumer / (last arrival - first send),"
        f" median of {meta.get('settings', {}).get('sat_runs', '?')} saturation runs;"
        " /ceil = mediator / the slower direct broker round trip the path involves; /peer = mediator / best peer.",
        "e2e = consumer arrival - producer send time (CLOCK_MONOTONIC), median over runs of each run's p50/p99/max;"
        " @1k = open-loop 1,000 msgs/s (* = the system's saturated rate is below 1,000 msgs/s, so the backlog and"
        " the latency grow with the run's length); @sat = during saturation"
        " (HTTP: 50 msgs/s Python probes beside wrk).",
        "accept = wrk's request latency (HTTP 202 after the outbox commit; Node-RED answers 202 before publishing)."
        " CPU%/us per msg/RSS = the daemon's (or peer's) process from /proc; ceilings: broker cost not attributed.",
        f"HTTP load: {meta.get('wrk', 'wrk')}, 2 threads, 64 connections. loss = accepted (202 / PUBACK / confirm /"
        " ack) - distinct received; dup = repeats of a sequence number. Both summed over all runs of the cell.",
        f"AMQP: {meta.get('amqp', '')}. Mosquitto: {meta.get('mosquitto', '')}.",
    ]
    for s in results.get("skipped", []):
        notes.append(f"SKIPPED {s}")
    for p in results.get("problems", []):
        notes.append(f"PROBLEM {p.get('cell')}: {str(p.get('log') or p.get('error') or p.get('exit'))[:300]}")
    return "\n".join(lines + notes)
