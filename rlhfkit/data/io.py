"""Reading records from JSONL (plain or gzipped), JSON arrays, plain text (one record per line), CSV/TSV with a
header row, Hugging Face `datasets` objects and lists of dicts.

Every record comes with `where`, a location such as `prefs.jsonl:12` that error messages name. Bad input
(malformed JSON, non-UTF-8 bytes, a line that is not an object, an empty file, a huge line) raises a `UserError`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from rlhfkit.errors import UserError

MAX_LINE_BYTES = 64 * 1024 * 1024
"""A single JSONL line larger than this is rejected (a file with no newlines, say) instead of exhausting memory."""


@dataclass
class Record:
    where: str
    """file:line (or name[index]) of the record, for error messages."""
    data: dict
    table: bool = False
    """From a CSV/TSV row: every value is a string, so numeric fields are read with `number`."""


def field_value(rec: Record, key: str, default: Any = None) -> Any:
    """rec.data.get(key, default) for an optional field; a CSV/TSV cell is stripped, and a blank one is absent."""
    value = rec.data.get(key, default)
    if rec.table and isinstance(value, str):
        return value.strip() or default
    return value


def number(rec: Record, key: str) -> Any:
    """rec.data[key] for a field that should hold a number, or None when absent. A CSV/TSV cell is a string: a
    blank cell counts as absent and one that reads as a number (" 4", "0.5", "1e-3") as that float; any other value
    is returned as it is, for the caller's type check to name."""
    value = field_value(rec, key)
    if rec.table and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _open_binary(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _iter_lines(path: Path) -> Iterable[tuple[int, bytes]]:
    try:
        with _open_binary(path) as fh:
            lineno = 0
            while True:
                line = fh.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                lineno += 1
                if len(line) > MAX_LINE_BYTES:
                    raise UserError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES // 2**20} MiB")
                yield lineno, line
    except (gzip.BadGzipFile, EOFError, OSError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{path}: cannot read ({err})") from None


def _decode(path: Path, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                        ) from None


def read_records(source: Any, name: str | None = None) -> list[Record]:
    """Load records from a path (.jsonl, .json, .txt, .csv, .tsv, each optionally .gz), a `datasets.Dataset`, or a
    list of dicts. A .txt line becomes {"text": line}; a CSV/TSV row a dict keyed by the header row."""
    if isinstance(source, (str, os.PathLike)):
        return _read_file(resolve_data_path(source))
    label = name or type(source).__name__
    try:
        rows = list(source)
    except TypeError:
        raise UserError(f"{label}: expected a file path, a datasets.Dataset or a list of dicts") from None
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{label}[{i}]: expected an object (dict), got {type(row).__name__}")
        records.append(Record(f"{label}[{i}]", dict(row)))
    if not records:
        raise UserError(f"{label}: no records")
    return records


def resolve_data_path(source: str | os.PathLike) -> Path:
    """`bundled:NAME` names a file shipped in rlhfkit/assets/data; anything else is a path."""
    text = str(source)
    if text.startswith("bundled:"):
        from importlib import resources

        path = Path(str(resources.files("rlhfkit") / "assets" / "data" / text[len("bundled:"):]))
        if not path.is_file():
            raise UserError(f"{text}: no such bundled file (see rlhfkit/assets/data/README.md)")
        return path
    return Path(text)


def _read_file(path: Path) -> list[Record]:
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a .jsonl or .json file")
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    if stem.endswith(".json"):
        return _read_json_array(path)
    if stem.endswith(".txt"):
        return _read_text_lines(path)
    if stem.endswith((".csv", ".tsv")):
        return _read_table(path, "\t" if stem.endswith(".tsv") else ",")
    records = []
    for lineno, raw in _iter_lines(path):
        text = _decode(path, lineno, raw).strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(Record(f"{path}:{lineno}", obj))
    if not records:
        raise UserError(f"{path}: empty file (no records)")
    return records


def _read_text_lines(path: Path) -> list[Record]:
    """One record {"text": line} per non-blank line (trailing newline and spaces removed; use JSONL for text
    that spans lines)."""
    records = [Record(f"{path}:{lineno}", {"text": text})
               for lineno, raw in _iter_lines(path) if (text := _decode(path, lineno, raw).rstrip("\r\n ")).strip()]
    if not records:
        raise UserError(f"{path}: empty file (no records)")
    return records


def _read_table(path: Path, delimiter: str) -> list[Record]:
    """CSV/TSV with a header row: one record per row, keyed by the header (values are strings; the formats read
    numeric fields with `number`). A record's line is the last physical line of its row (quoted fields may span
    lines)."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO("".join(_decode(path, n, raw) for n, raw in _iter_lines(path))),
                        delimiter=delimiter)
    header, records = None, []
    try:
        for row in reader:
            if header is None:
                header = [h.strip() for h in row]
                if not any(header):
                    break
            elif any(cell.strip() for cell in row):
                if len(row) != len(header):
                    raise UserError(f"{path}:{reader.line_num}: {len(row)} columns, the header has {len(header)}")
                records.append(Record(f"{path}:{reader.line_num}", dict(zip(header, row)), table=True))
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed {kind} ({err})") from None
    if not header or not any(header):
        raise UserError(f"{path}: empty file (no header row)")
    if not records:
        raise UserError(f"{path}: no records after the header row")
    return records


def _read_json_array(path: Path) -> list[Record]:
    raw = b"".join(line for _, line in _iter_lines(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column})") from None
    if not text.strip():
        raise UserError(f"{path}: empty file (no records)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON array of objects")
    records = []
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            raise UserError(f"{path}[{i}]: expected an object, got {type(row).__name__}")
        records.append(Record(f"{path}[{i}]", row))
    if not records:
        raise UserError(f"{path}: empty JSON array (no records)")
    return records


READ_AS = {".csv": "CSV", ".tsv": "TSV", ".txt": "plain text (a record per line)", ".json": "one JSON array"}
"""Names that `read_records` reads as something other than JSON Lines."""


def check_jsonl_output(path: str | os.PathLike, key: str = "path") -> None:
    """Refuse a JSONL output whose name `read_records` would read back as another format (say `out.csv`: each line
    would become a CSV row). Call it when a config is validated, before any work, with the key that gave the path."""
    name = Path(path).name
    gz = ".gz" if name.endswith(".gz") else ""
    stem = name[: len(name) - len(gz)]
    for suffix, kind in READ_AS.items():
        if stem.endswith(suffix):
            raise UserError(f"{key}: {os.fspath(path)!r} would be read back as {kind}, but rlhfkit writes JSON Lines; "
                            f"name it {stem[: -len(suffix)]}.jsonl{gz}")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically (temp file, then rename); gzip when the name ends in .gz. Returns the count.
    A name that would be read back as another format (.csv, .tsv, .txt, .json) is refused (`check_jsonl_output`)."""
    check_jsonl_output(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(tmp, "wt", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n
