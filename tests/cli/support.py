"""The CLI as an operator runs it: ``python -m mediator ...`` in a subprocess."""

from __future__ import annotations

import asyncio
import os
import sys

from tests.support.daemon import ROOT


async def cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 30.0) -> tuple[int, str, str]:
    """Run ``mediator ARGS`` to its end: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediator", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    async with asyncio.timeout(timeout_s):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
