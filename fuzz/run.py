"""One target under atheris, in a process of its own: ``python -m fuzz.run TARGET [libFuzzer flags] CORPUS``.

The modules under test are imported inside ``atheris.instrument_imports`` so their bytecode reports
coverage (and comparisons) to libFuzzer; the libraries that decode for them (paho's properties, pamqp's
frames, PyJWT, tomllib, aio-pika's message) are instrumented too, so coverage guides the fuzzer through
them. ``python -m fuzz`` starts this once per target.
"""

from __future__ import annotations

import sys

import atheris

INSTRUMENTED = ["mediator", "adapters", "fuzz", "jwt", "paho", "pamqp", "aio_pika", "aiomqtt", "tomllib", "email"]


def main() -> None:
    name, flags = sys.argv[1], sys.argv[2:]
    with atheris.instrument_imports(include=INSTRUMENTED):
        from fuzz.targets import TARGETS
    target = TARGETS[name]
    atheris.Setup([sys.argv[0], *flags], target.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
