"""Assemble benchmarks/RESULTS.md from the header and the per-topic section files.

Each benchmark writes or documents its own ``RESULTS_<topic>.md``; this script concatenates
them (headings demoted one level below the header's) so that RESULTS.md holds everything.
Usage: ``python benchmarks/assemble_results.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["app", "layer", "data", "methods", "perf", "deploy", "secagg", "robust", "text", "edge", "paper_scale"]


def demote(text: str) -> str:
    """Make every section start at level 2 (## ...), keeping relative depth; fenced code
    (where "# " starts a shell comment) is left alone."""
    lines = text.splitlines()
    fenced, in_code = [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            in_code = not in_code
        fenced.append(in_code)
    heads = [len(m.group(1)) for line, code in zip(lines, fenced)
             if not code and (m := re.match(r"^(#+) ", line))]
    shift = 2 - min(heads) if heads else 0
    out = []
    for line, code in zip(lines, fenced):
        m = None if code else re.match(r"^(#+) ", line)
        out.append("#" * (len(m.group(1)) + shift) + line[len(m.group(1)):] if m else line)
    return "\n".join(out) + "\n"


def main() -> None:
    parts = [(HERE / "RESULTS_header.md").read_text().rstrip() + "\n"]
    for topic in ORDER:
        path = HERE / f"RESULTS_{topic}.md"
        if path.exists():
            parts.append(f"<!-- from {path.name} -->\n" + demote(path.read_text()).rstrip() + "\n")
    (HERE / "RESULTS.md").write_text("\n---\n\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
