"""The child process of :func:`fastfuse.kernels.kernel_cache.fill`: compile kernels into numba's
cache in this process's main thread, then exit.

``python -m fastfuse.kernels.cache_filler --package FOLDER copy-2 widen-2 ...``: ``FOLDER`` is
the ``fastfuse/kernels`` folder the parent imported (another fastfuse first on ``sys.path``
would fill another cache: exit 4). Exit 0 when filled, ``kernel_cache.NO_CACHE`` when numba
has nowhere to write. Nothing imports this module (``-m`` warns about a module imported by its
own package).
"""

from __future__ import annotations

import os
import sys

from fastfuse.kernels import kernel_cache


def _parse(name: str) -> kernel_cache.Spec:
    kind, _, width = name.partition("-")
    if kind not in ("copy", "widen") or width not in ("1", "2", "4", "8"):
        raise SystemExit(f"cache_filler: {name!r}: expected copy-N or widen-N, N one of 1, 2, 4, 8")
    return (int(kind == "widen"), int(width))


def main(argv: list[str]) -> int:
    """``--package FOLDER name...``: see the module's docstring."""
    if len(argv) < 2 or argv[0] != "--package":
        raise SystemExit("usage: python -m fastfuse.kernels.cache_filler --package FOLDER copy-2 widen-2 ...")
    if (
        os.path.abspath(argv[1]) != kernel_cache.PACKAGE
    ):  # another fastfuse came first on sys.path: its cache is not ours
        print(f"cache_filler: imported from {kernel_cache.PACKAGE}, expected {argv[1]}", file=sys.stderr)
        return 4
    specs = [_parse(name) for name in argv[2:]]
    if kernel_cache.location() is None:
        return kernel_cache.NO_CACHE
    kernel_cache.compile_here(specs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
