"""Writes the "Every field" tables of docs/config.md from src/tinygpt/config.py.

The field docstrings are `--help`'s text, so the page is generated rather than copied by hand:
`python docs/config_table.py` rewrites the tables in place, `--check` exits 1 when they are stale
(tests/test_config.py runs the check).
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from tinygpt import config
from tinygpt.presets import DEFAULT_PRESET

PAGE = Path(__file__).with_name("config.md")
MARKER = "## Every field"


def cell(value: typing.Any) -> str:
    return "empty" if value in (None, "") else f"`{value}`"


def tables() -> str:
    """One table per section: field, type, dataclass default, the default preset's value, help."""
    default, preset = config.Config(), config.resolve(DEFAULT_PRESET)
    out = []
    for section, cls in config.SECTIONS.items():
        doc = " ".join((cls.__doc__ or "").split()).replace("``", "`")
        out += [f"### `{section}`: {doc}", "",
                f"| field | type | default | `{DEFAULT_PRESET}` | what it does |", "|---|---|---|---|---|"]
        for key, f, tp, help_text in config.iter_fields():
            if not key.startswith(section + "."):
                continue
            ours = getattr(getattr(default, section), f.name)
            theirs = getattr(getattr(preset, section), f.name)
            kind = config.type_name(tp).replace("|", "\\|")
            out.append(f"| `{f.name}` | {kind} | {cell(ours)} | {'=' if ours == theirs else cell(theirs)} "
                       f"| {help_text.replace('|', chr(92) + '|')} |")
        out.append("")
    return "\n".join(out)


def rendered() -> str:
    """The page with everything after the intro paragraph of MARKER regenerated."""
    text = PAGE.read_text()
    head, _, rest = text.partition(MARKER)
    intro = rest.split("\n### ", 1)[0].rstrip("\n")
    return f"{head}{MARKER}{intro}\n\n{tables()}"


if __name__ == "__main__":
    new = rendered()
    if "--check" in sys.argv[1:]:
        sys.exit(0 if new == PAGE.read_text() else 1)
    PAGE.write_text(new)
