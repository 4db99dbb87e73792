"""One target under atheris, in a process of its own: ``python -m fuzz.run TARGET [libFuzzer flags] CORPUS``.

The modules under test are imported inside ``atheris.instrument_imports`` so their bytecode reports
coverage (and comparisons) to libFuzzer; the libraries that decode for them (paho's properties, pamqp's
frames, PyJWT, tomllib, aio-pika's message) are instrumented too, so coverage guides the fuzzer through
them. ``python -m fuzz`` starts this once per target.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import atheris

INSTRUMENTED = ["mediator", "adapters", "fuzz", "jwt", "paho", "pamqp", "aio_pika", "aiomqtt", "tomllib", "email"]


def main() -> None:
    name, flags = sys.argv[1], sys.argv[2:]
    with atheris.instrument_imports(include=INSTRUMENTED):
        from fuzz.targets import TARGETS
    target = TARGETS[name]
    prefix = next((f.split("=", 1)[1] for f in flags if f.startswith("-artifact_prefix=")), "./")

    def one_input(data: bytes) -> None:
        try:
            target.one_input(data)
        except BaseException:
            # libFuzzer writes the failing input on its way out, but not on every path out of an uncaught
            # Python exception (seen in the final round): the input is kept here first, either way.
            path = f"{prefix}crash-{hashlib.sha1(data).hexdigest()}"
            Path(path).write_bytes(data)
            print(f"fuzz: Test unit written to {path}", file=sys.stderr, flush=True)
            raise

    atheris.Setup([sys.argv[0], *flags], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
