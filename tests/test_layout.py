"""Grep guard: no branching on a method or backbone name outside its own file (style.md principle 2)."""

import re
from pathlib import Path

from cdmbench.backbones import BACKBONES
from cdmbench.methods import METHODS

ROOT = Path(__file__).resolve().parents[1] / "cdmbench"


def test_no_name_branches_outside_own_files():
    names = METHODS.names() + BACKBONES.names() + ["longcat", "sd3"]
    alt = "|".join(sorted(set(names), key=len, reverse=True))
    pattern = re.compile(rf"""(==|!=|\bin\b)\s*\(?\s*["']({alt})["']|["']({alt})["']\s*(==|!=)""")
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = pattern.search(line)
            if not m:
                continue
            name = m.group(2) or m.group(3)
            if rel.parts[0] in ("methods", "backbones") and rel.stem == name:
                continue
            offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "name branches:\n" + "\n".join(offenders)
