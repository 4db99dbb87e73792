"""Issue 19, item 12 (the table): ``mediator dead-letters list`` folds a long or multi-line reason (a
protobuf conversion error) inside the reason column, each continuation line indented under it, instead of
breaking the table; ``--json`` keeps the reason as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mediator.client import describe_rows, table
from mediator.core.envelope import new_event
from mediator.core.router import Delivery
from mediator.outbox import SqliteOutbox
from mediator.outbox.base import Accepted
from tests.cli.support import cli
from tests.support.daemon import Quickstart

pytestmark = pytest.mark.timeout(60)

# What a JSON -> Protobuf conversion failure looks like (google.protobuf.json_format), as dead-lettered.
REASON = (
    "convert: JSON -> protobuf demo.Order failed: Failed to parse total field: "
    'Message type "demo.Money" has no field named "curency" at "Order.total".\n'
    " Available Fields(except extensions): \"['units', 'nanos', 'currency']\"\n"
    "\tat Order.total.curency"
)


async def bury(path: Path, reason: str, event_id: str) -> None:
    outbox = SqliteOutbox(path)
    await outbox.open()
    try:
        event = new_event(type="com.example.order.created", source="/t", data=b"{}", id=event_id)
        [pending] = await outbox.commit([Accepted(event, [Delivery("orders", "orders-exchange", "orders", "binary")])])
        pending.attempts = 1
        await outbox.dead_letter(pending, reason)
    finally:
        await outbox.close()


async def test_a_multi_line_reason_is_folded_under_its_column(tmp_path: Path) -> None:
    quickstart = Quickstart(tmp_path)  # not started: the CLI reads the outbox file
    config = str(quickstart.write())
    await bury(quickstart.outbox_file, REASON, "ev-multi")
    await bury(quickstart.outbox_file, "unroutable", "ev-short")

    code, out, err = await cli("dead-letters", "list", "--config", config, "--table", env={"COLUMNS": "180"})
    assert code == 0, err
    lines = out.splitlines()
    header = lines[0]
    column = header.index("REASON")
    rows = [i for i, line in enumerate(lines) if line[:1].isdigit()]
    assert len(rows) == 2, out
    multi = next(i for i in rows if "ev-multi" in lines[i])
    following = lines[multi + 1 : next((i for i in rows if i > multi), len(lines))]
    assert len(following) >= 3, out  # three lines of reason, folded to what the terminal leaves
    for line in following:
        assert line[:column].strip() == "", f"a continuation line leaves the reason column: {line!r}\n{out}"
        assert line[column:].strip(), out
    assert all(len(line) <= 180 for line in lines), out
    folded = " ".join(line[column:].strip() for line in [lines[multi], *following])
    assert folded.split() == REASON.split(), folded  # every word, in order, nothing lost
    short = next(i for i in rows if "ev-short" in lines[i])
    assert lines[short].endswith("unroutable")

    # A terminal too narrow for the reason beside the other columns: the reason goes under its row.
    code, out, err = await cli("dead-letters", "list", "--config", config, "--table", env={"COLUMNS": "80"})
    assert code == 0, err
    lines = out.splitlines()
    rows = [i for i, line in enumerate(lines) if line[:1].isdigit()]
    multi = next(i for i in rows if "ev-multi" in lines[i])
    below = lines[multi + 1 : next(i for i in rows if i > multi)]
    assert lines[multi].split()[-2:] == ["1", "terminal"], out  # the row ends with ATTEMPTS and CLASS
    assert all(line.startswith("    ") and len(line) <= 80 for line in below), out
    assert " ".join(below).split() == REASON.split(), out

    code, out, err = await cli("dead-letters", "list", "--config", config, "--json")
    assert code == 0, err
    reasons = {dl["event_id"]: dl["reason"] for dl in json.loads(out)["dead_letters"]}
    assert reasons == {"ev-multi": REASON, "ev-short": "unroutable"}


def test_other_cells_stay_on_their_line() -> None:
    rows = describe_rows([{"id": 1, "at": 0, "event_id": "a\nb", "type": "t\tx", "attempts": 2, "reason": "r"}])
    text = table(rows, fold=True, width=120)
    assert text.splitlines()[1].split() == ["1", "1970-01-01T00:00:00Z", "a\\nb", "t\\tx", "-", "-", "2", "-", "r"]
    assert len(text.splitlines()) == 2
