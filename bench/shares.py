"""``python -m bench.shares FILE.folded[.gz] [NAME ...]``: the share of samples each function appears in.

Reads py-spy's raw output (``py-spy record -f raw``: one folded stack a line, then its sample count) and prints,
for each NAME (a function's qualified name, e.g. ``Schema.load``) or else for the 25 most frequent, the share of
samples with it anywhere on the stack.  This is how the table in ``docs/profile.md`` was made.
"""
from __future__ import annotations

import collections
import gzip
import re
import sys
from pathlib import Path

_FRAME = re.compile(r" \(.*$")  # "Schema.load (marshmallow/schema.py:123)" -> "Schema.load"


def shares(path: Path) -> tuple[collections.Counter[str], int]:
    """Samples per function (each counted once per stack) and the total number of samples."""
    opener = gzip.open if path.suffix == ".gz" else open
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            stack, _, samples = line.rstrip().rpartition(" ")
            if not stack:
                continue
            total += int(samples)
            frames = {_FRAME.sub("", frame) for frame in stack.split(";")}  # once per stack, even if recursive
            counts.update(dict.fromkeys(frames, int(samples)))
    return counts, total


def main(argv: list[str]) -> int:
    """Print the shares; 2 on bad usage."""
    if not argv:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    counts, total = shares(Path(argv[0]))
    names = argv[1:] or [name for name, _ in counts.most_common(25)]
    for name in names:
        print(f"{100 * counts[name] / max(total, 1):5.1f} %  {name}")
    print(f"({total} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
