"""Plain-text tables for the benchmarks' and evaluations' console output."""

from __future__ import annotations

import sys
from typing import Any


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """Prints a titled table, columns right-aligned, floats with two decimals."""
    print(f"\n{title}")
    cols = [header] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    w = [max(len(c[i]) for c in cols) for i in range(len(header))]
    for i, c in enumerate(cols):
        print("  " + "  ".join(s.rjust(w[j]) for j, s in enumerate(c)))
        if i == 0:
            print("  " + "  ".join("-" * x for x in w))
    sys.stdout.flush()
