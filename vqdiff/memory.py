"""Returning free heap pages to the OS in a long-running process (the service's workers): glibc's
``malloc_trim``, run while work goes on (`trim_heap`)."""

from __future__ import annotations

import asyncio


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # int malloc_trim(size_t); called with 0
    except (OSError, AttributeError):
        return None


async def trim_heap(interval_s: float, activity) -> None:
    """Give free heap pages back to the OS every ``interval_s`` s while ``activity()`` (engine calls) changes:
    batches of 1 to 64 groups allocate ever-different sizes that glibc never returns (torch engine: RSS 251 ->
    787 MB over 30 batches; trimmed every 2 s it stays level, at no measurable cost). Off: ``interval_s <= 0``."""
    if (trim := _malloc_trim() if interval_s > 0 else None) is None:
        return
    seen = activity()
    while True:
        await asyncio.sleep(interval_s)
        if activity() != seen:  # an idle worker's heap does not grow
            seen = activity()
            await asyncio.get_running_loop().run_in_executor(None, trim, 0)
