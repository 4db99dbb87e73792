"""The committed generated code must match what the .proto files generate today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc generated nothing"
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "mediator" / "v1").glob("*_pb2*"))
    assert generated == committed, "generated file set differs: run `make proto` and commit"
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), f"{rel} drifted: run `make proto`"


def test_envelope_is_wire_compatible_with_cloudevents_field_numbers() -> None:
    from mediator.v1.envelope_pb2 import AttributeValue, Envelope

    fields = {f.name: f.number for f in Envelope.DESCRIPTOR.fields}
    assert fields["id"] == 1
    assert fields["source"] == 2
    assert fields["spec_version"] == 3
    assert fields["type"] == 4
    assert fields["attributes"] == 5
    assert fields["binary_data"] == 6
    assert fields["text_data"] == 7
    assert fields["proto_data"] == 8
    attr = {f.name: f.number for f in AttributeValue.DESCRIPTOR.fields}
    assert attr == {
        "ce_boolean": 1,
        "ce_integer": 2,
        "ce_string": 3,
        "ce_bytes": 4,
        "ce_uri": 5,
        "ce_uri_ref": 6,
        "ce_timestamp": 7,
    }
