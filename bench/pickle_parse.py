"""Time the restricted unpickler alone on a torch.save file's ``data.pkl``: min of 50, in ms.

``PYTHONPATH=<tree> python bench/pickle_parse.py FILE.pt`` runs the fastfuse of ``<tree>``, so two
trees (before and after a change) can be compared on the same pickle.
"""

from __future__ import annotations

import sys
import time
import zipfile

from fastfuse.formats import unpickler


def main(path: str, rounds: int = 50) -> str:
    with zipfile.ZipFile(path) as archive:
        raw = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        unpickler.unpickle(raw, "x")
        best = min(best, time.perf_counter() - start)
    return f"{unpickler.__file__}: {len(raw)} bytes, {best * 1e3:.2f} ms"


if __name__ == "__main__":
    print(main(sys.argv[1]))
