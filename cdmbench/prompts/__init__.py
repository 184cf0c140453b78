"""Evaluation prompt sets: a backbone's bundled set and prompt files in the formats benchmarks ship.

A prompt's identity is its id (style.md principle 8): ``<file stem>-<index>`` for files, where the
index is the 0-based line (txt, jsonl), data row (csv, tsv) or list position (json) in the file, so an
id never depends on ``--num-prompts``, on blank lines elsewhere or on the process count.

File formats (the caption column is the first of ``CAPTION_COLUMNS`` present, case-insensitive):
- ``.txt``: one prompt per line; blank lines are skipped (CDM's pickscore/drawbench test.txt).
- ``.jsonl``: one JSON object per line with a caption field (HPS v2 / Pick-a-Pic / GenEval metadata
  styles), or one JSON string per line.
- ``.json``: a list of strings (HPS v2 benchmark files), a list of objects with a caption field, a
  COCO captions file (``annotations[].caption``), or an object of lists of strings (HPS v2's
  ``{style: [prompts]}``; ids ``<stem>-<style>-<index>``).
- ``.csv`` / ``.tsv``: a header row with a caption column (DrawBench ``Prompts``, PartiPrompts
  ``Prompt``, Pick-a-Pic ``caption``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from cdmbench.errors import CdmbenchError
from cdmbench.types import Prompt

__all__ = ["Prompt", "load_prompt_set", "bundled_sets", "read_prompt_file", "CAPTION_COLUMNS", "SUFFIXES"]

CAPTION_COLUMNS = ("prompt", "prompts", "caption", "text")
SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv")


def bundled_sets() -> list[str]:
    """Names of the bundled sets: "default" (the evaluated backbone's own set) and the name of every
    registered backbone that bundles one (its set, on any backbone)."""
    from cdmbench.backbones import BACKBONES

    return ["default", *(n for n in BACKBONES.names() if BACKBONES.get(n).prompt_set() is not None)]


def load_prompt_set(name_or_path: str | Path, backbone_name: str) -> list[Prompt]:
    """The prompts of a bundled set or a prompt file, in file order.

    Args:
        name_or_path: "default" (the backbone's bundled set, ``Backbone.prompt_set``), the name of a backbone
            that bundles a set (e.g. "toy": the fixed, versioned toy grammar set), or a path to a
            .txt/.jsonl/.json/.csv/.tsv file.
        backbone_name: the backbone the prompts are for; it attaches its metadata to file prompts
            (``Backbone.annotate_prompts``; the toy adds attribute labels to captions in its grammar).

    Raises:
        CdmbenchError: an unknown name, a backbone without a bundled set asked for "default", or an empty or
            malformed file (one line naming the file and the problem).
    """
    from cdmbench.backbones import BACKBONES

    backbone = BACKBONES.get(backbone_name)
    name = str(name_or_path)
    if name == "default" or name in BACKBONES:
        prompts = (backbone if name == "default" else BACKBONES.get(name)).prompt_set()
        if prompts is not None:
            return prompts
        if name == "default":
            raise CdmbenchError(
                f"backbone {backbone_name!r} has no bundled default prompt set; pass a prompt file with "
                f"--prompts FILE ({', '.join(SUFFIXES)}), e.g. PartiPrompts.tsv, DrawBench.csv or a COCO captions json"
            )
    path = Path(name).expanduser()
    if not path.is_file():
        hint = "" if path.suffix in SUFFIXES else f", or a prompt file ({', '.join(SUFFIXES)})"
        raise CdmbenchError(f"prompts: {name!r} is neither an existing file nor a bundled set "
                            f"({', '.join(bundled_sets())}{hint})")
    return backbone.annotate_prompts(read_prompt_file(path))


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts of one file (format by suffix), ids ``<stem>-<index>``; raises on empty or malformed files."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise CdmbenchError(f"prompt file {path}: unsupported suffix {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise CdmbenchError(f"prompt file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise CdmbenchError(f"prompt file {path} is empty")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-") or "prompts"
    reader = {".txt": _txt, ".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".tsv": _csv}[path.suffix.lower()]
    pairs = reader(text, path)  # (id suffix, caption)
    if not pairs:
        raise CdmbenchError(f"prompt file {path} holds no prompts")
    return [Prompt(f"{stem}-{key}", caption) for key, caption in pairs]


# --------------------------------------------------------------------------------------------------
# One reader per format: text → [(id suffix, caption)]


def _txt(text: str, path: Path) -> list[tuple[str, str]]:
    return [(str(i), line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]


def _jsonl(text: str, path: Path) -> list[tuple[str, str]]:
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CdmbenchError(f"prompt file {path} line {i + 1}: not valid JSON ({e.msg})") from e
        out.append((str(i), _caption(record, path, f"line {i + 1}")))
    return out


def _json(text: str, path: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CdmbenchError(f"prompt file {path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):  # COCO captions
        return [(str(i), _caption(a, path, f"annotations[{i}]")) for i, a in enumerate(data["annotations"])]
    if isinstance(data, list):
        return [(str(i), _caption(r, path, f"item {i}")) for i, r in enumerate(data)]
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):  # {style: [prompts]}
        return [(f"{_safe(k)}-{i}", _caption(r, path, f"{k}[{i}]")) for k, v in data.items() for i, r in enumerate(v)]
    raise CdmbenchError(
        f"prompt file {path}: expected a list of prompts, a COCO captions object with 'annotations', "
        f"or an object of prompt lists; got {type(data).__name__}"
    )


def _csv(text: str, path: Path) -> list[tuple[str, str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as e:
        raise CdmbenchError(f"prompt file {path} line {reader.line_num}: malformed {path.suffix[1:]} ({e})") from e
    header = [h.strip() for h in rows[0]]
    col = _caption_column(header, path)
    out = []
    for i, row in enumerate(rows[1:]):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise CdmbenchError(f"prompt file {path} row {i + 1}: {len(row)} fields, the header has {len(header)}")
        caption = row[col].strip()
        if not caption:
            raise CdmbenchError(f"prompt file {path} row {i + 1}: empty {header[col]!r}")
        out.append((str(i), caption))
    return out


def _caption_column(columns: list[str], path: Path) -> int:
    lower = [c.lower() for c in columns]
    for name in CAPTION_COLUMNS:
        if name in lower:
            return lower.index(name)
    raise CdmbenchError(
        f"prompt file {path}: no prompt column; found {', '.join(map(repr, columns))}, "
        f"expected one of {', '.join(CAPTION_COLUMNS)}"
    )


def _caption(record, path: Path, where: str) -> str:
    """The caption of a JSON record: a string, or an object's first caption field."""
    if isinstance(record, dict):
        keys = list(record)
        value = record[keys[_caption_column(keys, path)]]
    else:
        value = record
    if not isinstance(value, str):
        raise CdmbenchError(f"prompt file {path} {where}: the prompt must be a string, got {type(value).__name__}")
    if not value.strip():
        raise CdmbenchError(f"prompt file {path} {where}: empty prompt")
    return value.strip()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-")
