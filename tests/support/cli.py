"""The real command line, in a subprocess, while the test's event loop keeps serving upstreams."""

from __future__ import annotations

import asyncio
import sys

__all__ = ["cli"]


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``mirrorgen ARGS`` (in ``env``, else this process's environment): exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirrorgen.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
