"""The pauses ``bench/gc_pauses/sitecustomize.py`` logged, per process: full collections and slow young ones.

python bench/gc_pauses/summary.py FOLDER [--after EPOCH_SECONDS]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument(
        "--after", type=float, default=0.0, help="only pauses after this wall time (the steady state)"
    )
    args = ap.parse_args(argv)
    for path in sorted(args.folder.glob("gc-*.txt")):
        full: list[float] = []
        young: list[float] = []
        command = ""
        for line in path.read_text().splitlines():
            at, generation, ms, _collected, command = line.split(" ", 4)
            if float(at) < args.after:
                continue
            (full if generation == "2" else young).append(float(ms))
        if full or young:
            span = f"{min(full):.0f}-{max(full):.0f} ms" if full else "-"
            print(
                f"{path.stem}: {len(full)} full collections ({span}), {len(young)} young over 20 ms  [{command}]"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
