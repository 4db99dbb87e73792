"""The one table `make bench` prints, from the results dict (also written as bench/results.json)."""

from __future__ import annotations

from typing import Any

from bench.runner import lat_summary, median

COLUMNS = (
    ("path", 28),
    ("system", 30),
    ("msgs/s", 8),
    ("/ceil", 6),
    ("/peer", 6),
    ("/gen", 5),
    ("/plain", 7),
    ("e2e@1k p50/p99/max ms", 22),
    ("e2e@sat p50/p99/max ms", 23),
    ("accept p50/p99 ms", 17),
    ("CPU%", 5),
    ("us/msg", 6),
    ("RSS MB 1k/peak", 14),
    ("loss", 5),
    ("dup", 4),
)


# ------------------------------------------------------------------------------------- rounds -> table


_SUMMED = ("loss", "duplicates", "refused", "in_flight_at_stop", "garbage", "messages")


def combine(cells: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One cell from its rounds: medians of the rates, latencies and CPU, the peak of the RSS peaks, the sums
    of loss and duplicates. A cell that failed in every round is that failure."""
    ok = [c for c in cells if c and "error" not in c]
    if not ok:
        return next((c for c in cells if c), None)
    out = dict(ok[0])
    out["throughput_msgs_s"] = median([c.get("throughput_msgs_s") for c in ok])
    out["throughput_runs"] = [t for c in ok for t in c.get("throughput_runs", [])]
    for key in ("latency_fixed_load", "latency_saturation", "accept_latency_wrk"):
        out[key] = lat_summary([c.get(key) for c in ok])
    out["cpu_percent"] = median([c.get("cpu_percent") for c in ok])
    out["cpu_us_per_msg"] = median([c.get("cpu_us_per_msg") for c in ok])
    out["wrk_cpu_percent"] = median([c.get("wrk_cpu_percent") for c in ok])
    out["peak_rss_mb"] = max((c["peak_rss_mb"] for c in ok if c.get("peak_rss_mb") is not None), default=None)
    out["steady_rss_mb"] = median([c.get("steady_rss_mb") for c in ok])
    for key in _SUMMED:
        out[key] = sum(c.get(key, 0) for c in ok)
    out["runs"] = [c.get("runs") for c in ok]
    out["rounds_ok"] = len(ok)
    out["rounds_failed"] = len([c for c in cells if c and "error" in c])
    return out


def _thr(cell: dict[str, Any] | None) -> float | None:
    if not cell or "error" in cell:
        return None
    value: float | None = cell.get("throughput_msgs_s")
    return value


GENERATOR_CEILING = "mqtt-gen"
"""The ceiling kind that is the C load generator straight into a subscriber (bench.paths)."""


def _generator(res: dict[str, Any], name: str) -> float | None:
    """One round's rate of the path's load generator into a direct subscriber, if the path has one."""
    entry = res["paths"].get(name, {})
    if GENERATOR_CEILING not in entry.get("ceilings", []):
        return None
    return _thr(res["ceilings"].get(GENERATOR_CEILING))


def _gen_ratios(cell: dict[str, Any], cells: list[dict[str, Any] | None], gens: list[float | None]) -> None:
    """``ratio_gen``: the median over rounds of the cell's msgs/s / the generator's own rate that round."""
    ratios = [t / g for c, g in zip(cells, gens, strict=True) if (t := _thr(c)) and g]
    if ratios:
        cell["ratio_gen"] = median(ratios)
        cell["ratio_gen_rounds"] = [round(x, 3) for x in ratios]


def _references(res: dict[str, Any], name: str) -> tuple[float | None, float | None]:
    """One round's ceiling (the slower direct path) and best peer for a path."""
    entry = res["paths"].get(name, {})
    ceils = [_thr(res["ceilings"].get(k)) for k in entry.get("ceilings", [])]
    peers = [_thr(p) for p in entry.get("peers", {}).values()]
    ceil = min((c for c in ceils if c), default=None)
    peer = max((p for p in peers if p), default=None)
    return ceil, peer


def _us(cell: dict[str, Any] | None) -> float | None:
    if not cell or "error" in cell:
        return None
    value: float | None = cell.get("cpu_us_per_msg")
    return value


def _plain_reference(entry: dict[str, Any], figure: Any) -> float | None:
    """A variant's reference in one round: the plain row's figure, or the mean of the plain runs before and
    after the variants where the round ran it twice (``plain_after``)."""
    values = [v for v in (figure(entry.get("mediator")), figure(entry.get("plain_after"))) if v]
    return sum(values) / len(values) if values else None


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``ceilings`` and ``paths`` of the table from the rounds; each mediator cell also gets
    ``ratio_ceil`` / ``ratio_peer``: the median over rounds of the ratio measured within each round. An
    variant cell (authenticated, content stages) also gets ``ratio_plain`` (its msgs/s / the plain mediator
    row's) and ``us_per_msg_over_plain`` (its daemon CPU per message minus that row's), each the median of the
    within-round figures."""
    kinds = sorted({k for r in rounds for k in r["ceilings"]})
    ceilings = {k: combine([r["ceilings"].get(k) for r in rounds]) for k in kinds}
    paths: dict[str, Any] = {}
    names = list(dict.fromkeys(n for r in rounds for n in r["paths"]))
    for name in names:
        entries = [r["paths"].get(name, {}) for r in rounds]
        entry: dict[str, Any] = {"title": entries[0]["title"], "ceilings": entries[0]["ceilings"]}
        refs = [_references(r, name) for r in rounds]
        gens = [_generator(r, name) for r in rounds]
        keys = list(dict.fromkeys(k for e in entries for k in e if k.startswith("mediator")))
        for key in keys:
            cells = [e.get(key) for e in entries]
            cell = combine(cells)
            if cell is None:
                continue
            if "error" not in cell:
                per_round = [(_thr(c), ceil, peer) for c, (ceil, peer) in zip(cells, refs, strict=True)]
                ceil_ratios = [t / c for t, c, _ in per_round if t and c]
                peer_ratios = [t / p for t, _, p in per_round if t and p]
                cell["ratio_ceil"] = median(ceil_ratios)
                cell["ratio_ceil_rounds"] = [round(x, 3) for x in ceil_ratios]
                cell["ratio_peer"] = median(peer_ratios)
                cell["ratio_peer_rounds"] = [round(x, 3) for x in peer_ratios]
                _gen_ratios(cell, cells, gens)
                if "variant" in cell:
                    plain = [_plain_reference(e, _thr) for e in entries]
                    plain_us = [_plain_reference(e, _us) for e in entries]
                    thr_ratios = [t / n for c, n in zip(cells, plain, strict=True) if (t := _thr(c)) and n]
                    extra_us = [u - n for c, n in zip(cells, plain_us, strict=True) if (u := _us(c)) and n]
                    cell["ratio_plain"] = median(thr_ratios)
                    cell["ratio_plain_rounds"] = [round(x, 3) for x in thr_ratios]
                    cell["us_per_msg_over_plain"] = median(extra_us)
                    cell["us_per_msg_over_plain_rounds"] = [round(x, 1) for x in extra_us]
            entry[key] = cell
        peer_names = list(dict.fromkeys(p for e in entries for p in e.get("peers", {})))
        if peer_names:
            entry["peers"] = {}
            for p in peer_names:
                peer_cells = [e.get("peers", {}).get(p) for e in entries]
                peer = combine(peer_cells)
                if peer is not None and "error" not in peer:
                    _gen_ratios(peer, peer_cells, gens)
                entry["peers"][p] = peer
        paths[name] = entry
    return {"ceilings": ceilings, "paths": paths}


def aggregate_intake(rounds: list[dict[str, Any]], paths: dict[str, str]) -> dict[str, Any]:
    """Per inbound kind: the median intake rate over rounds, and the median of its ratio to the end-to-end
    rate of the path with that inbound (``paths``: kind -> path name) measured in the same round."""
    out: dict[str, Any] = {}
    for kind, name in paths.items():
        cells = [r.get("intake", {}).get(kind) for r in rounds]
        rates = [c["throughput_msgs_s"] for c in cells if c and "error" not in c and c.get("throughput_msgs_s")]
        if not rates:
            continue
        ratios = []
        for r, c in zip(rounds, cells, strict=True):
            e2e = _thr(r["paths"].get(name, {}).get("mediator"))
            if c and "error" not in c and c.get("throughput_msgs_s") and e2e:
                ratios.append(c["throughput_msgs_s"] / e2e)
        out[kind] = {
            "path": name,
            "throughput_msgs_s": median(rates),
            "rounds": [round(x) for x in rates],
            "ratio_e2e": median(ratios),
            "ratio_e2e_rounds": [round(x, 2) for x in ratios],
        }
    return out


def intake_table(results: dict[str, Any]) -> str:
    summary = results.get("intake") or {}
    if not summary:
        return ""
    lines = [
        "",
        "Intake (receive -> commit -> acknowledge, the outbound stalled; bench/intake.py):",
        f"{'inbound':10}{'msgs/s':>10}{'x e2e':>8}  of the path",
    ]
    for kind, cell in summary.items():
        title = results.get("paths", {}).get(cell["path"], {}).get("title", cell["path"])
        ratio = "-" if cell["ratio_e2e"] is None else f"{cell['ratio_e2e']:.2f}"
        lines.append(f"{kind:10}{_f(cell['throughput_msgs_s']):>10}{ratio:>8}  {title}")
    return "\n".join(lines)


def _f(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _lat(lat: dict[str, Any] | None, with_max: bool = True) -> str:
    if not lat:
        return "-"
    parts = [lat["p50_ms"], lat["p99_ms"]] + ([lat["max_ms"]] if with_max else [])
    return "/".join(f"{p:.1f}" if p < 100 else f"{p:.0f}" for p in parts)


def _ratio(a: float | None, b: float | None, given: float | None = None) -> str:
    if given is not None:
        return f"{given:.2f}"
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
        _ratio(thr, ceil, cell.get("ratio_ceil")),
        _ratio(thr, peer, cell.get("ratio_peer")),
        _ratio(None, None, cell.get("ratio_gen")),
        _ratio(None, None, cell.get("ratio_plain")),
        _lat(cell.get("latency_fixed_load")) + ("*" if thr is not None and thr < 1050 else ""),
        _lat(cell.get("latency_saturation")),
        _lat(cell.get("accept_latency_wrk"), with_max=False),
        _f(cell.get("cpu_percent")),
        _f(cell.get("cpu_us_per_msg")),
        f"{_f(cell.get('steady_rss_mb'))}/{_f(cell.get('peak_rss_mb'))}" if cell.get("peak_rss_mb") else "-",
        str(cell.get("loss", "-")),
        str(cell.get("duplicates", "-")),
    ]


def _short_system(cell: dict[str, Any] | None, default: str) -> str:
    if not cell or "system" not in cell:
        return default
    s = str(cell["system"])
    if s.startswith("RabbitMQ"):
        return "rabbitmq_mqtt plugin"
    return s[:30]


def store_note(results: dict[str, Any]) -> str:
    """The event store's size per event after each round's store-on cell (bench.__main__.store_figures)."""
    figures = [
        cell["store"]
        for r in results.get("rounds", [])
        for entry in r.get("paths", {}).values()
        if isinstance(cell := entry.get("mediator_store"), dict) and isinstance(cell.get("store"), dict)
    ]
    if not figures:
        return ""
    parts = [
        f"{f['events']} events: {_f(f['envelope_bytes_per_event'])} B envelope, {_f(f['disk_bytes_per_event'])} B"
        " on disk with its indexes"
        for f in figures
    ]
    return "store on (SQLite, [store] retention = 7d): per event after each round's cell: " + "; ".join(parts) + "."


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
        for key, cell in entry.items():
            if key.startswith("mediator_") and cell:  # variant rows (auth, content), then the memory outbox
                rows.append(_row("", _short_system(cell, key), cell, ceil, peer))
        for kind, c in zip(entry.get("ceilings", []), cks, strict=False):
            label = "generator: mosquitto_pub->sub" if kind == GENERATOR_CEILING else f"ceiling: {kind} direct"
            rows.append(_row("", label, c, None, None))
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
        f"1 KiB payloads. {meta.get('rounds', 1)} round(s): the whole suite ran that many times, each cell once per"
        " round; figures are medians over rounds. msgs/s = distinct sequence numbers counted at the consumer /"
        " (last arrival - first send), at saturation. /ceil = mediator / the slower direct broker round trip the"
        " path involves, /peer = mediator / the best peer, /plain = a variant row / the plain mediator row (where"
        " the round ran the plain row again after the variants, the mean of both runs: later cells of a round"
        " ran slower on this machine whatever they were)"
        ' (JWT / API key: every request carries one RS256 JWT or API key; "no cache" = JWT cache_size 0, the'
        " signature checked per event; content: a JSON Schema check, a CEL route and a field transform per"
        " event; workers = 2: one supervisor and two worker processes sharing the load, CPU and RSS summed over"
        " the three): each the median of the ratios measured within a round.",
        "e2e = consumer arrival - producer send time (CLOCK_MONOTONIC), median over runs of each run's p50/p99/max;"
        " @1k = open-loop 1,000 msgs/s (* = the system's saturated rate is below 1,000 msgs/s, so the backlog and"
        " the latency grow with the run's length); @sat = during saturation"
        " (HTTP: 50 msgs/s Python probes beside wrk).",
        "accept = wrk's request latency (HTTP 202 after the outbox commit; Node-RED answers 202 before publishing)."
        " CPU%/us per msg/RSS = the daemon's (or peer's) process from /proc; RSS 1k = after the 1,000 msgs/s run"
        " (steady state), peak = over the cell, the saturation run's backlog included; ceilings: broker cost not"
        " attributed.",
        f"HTTP load: {meta.get('wrk', 'wrk')}, 2 threads, 64 connections. loss = accepted (202 / PUBACK / confirm /"
        " ack) - distinct received; dup = repeats of a sequence number. Both summed over all runs and rounds.",
        f"AMQP: {meta.get('amqp', '')}. Mosquitto: {meta.get('mosquitto', '')}.",
    ]
    gen = ceilings.get(GENERATOR_CEILING)
    if gen and "error" not in gen:
        notes.append(
            f"MQTT load ({meta.get('mqtt_generator') or 'mosquitto_pub'}): the saturation runs of the paths from"
            " MQTT, of their peers and of the generator row pipe payload lines into `mosquitto_pub -l -q 1 -M 100"
            " --nodelay` (C); /gen = a row's msgs/s / the generator's rate into mosquitto_sub in the same round"
            f" (its own publish rate, acknowledged by the broker: {_f(gen.get('generator_msgs_s'))} msgs/s at"
            f" {_f(gen.get('generator_cpu_percent'))}% of a core). It cannot stamp each message with its send time:"
            " e2e@sat there comes from 50 msgs/s paho probes beside it, and e2e@1k from the paho producer."
        )
    store = store_note(results)
    if store:
        notes.append(store)
    intake = intake_table(results)
    if intake:
        notes.append(intake)
    for s in results.get("skipped", []):
        notes.append(f"SKIPPED {s}")
    for p in results.get("problems", []):
        notes.append(f"PROBLEM {p.get('cell')}: {str(p.get('log') or p.get('error') or p.get('exit'))[:300]}")
    return "\n".join(lines + notes)
