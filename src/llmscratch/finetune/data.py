"""Reading fine-tuning data: labeled text (TSV/CSV/JSONL/JSON) and instruction records.

Every problem with a file becomes a one-line `UserError` naming the file and the line
(or record), so a bad row is found in seconds, not via a traceback.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from ..data.corpora import dataset_names, dataset_path
from ..errors import UserError
from ..utils import parse_json, read_text

# Named datasets that hold labeled text, and how to read them: sms-spam is the UCI file,
# headerless `label<TAB>message`, where a message may start with a quote character.
LABELED_DATASETS = {"sms-spam": {"text_column": "1", "label_column": "0", "format": "tsv"}}
INSTRUCTION_DATASETS = ("alpaca-1100", "alpaca-preference")


def _source_path(source: str, task_datasets, kind: str, extensions: str) -> tuple[Path, bool]:
    """The file behind `--data`: one of this task's datasets (downloaded and verified), or a
    local path. An existing local file wins over a dataset of the same name.

    Returns:
        `(path, named)`, where `named` says it is the dataset `source`.
    """
    if not Path(source).exists():
        if source in task_datasets:
            return dataset_path(source), True
        if source in dataset_names():
            raise UserError(f"--data {source}: not a {kind} dataset (choose {', '.join(task_datasets)} "
                            f"or a {extensions} file)")
        raise UserError(f"--data {source}: no such file, and not a dataset name "
                        f"({kind} datasets: {', '.join(task_datasets)})")
    return Path(source), False


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = path.suffix.lower()
    formats = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".txt": "tsv"}
    if suffix not in formats:
        raise UserError(f"{path}: cannot tell the format from the extension {suffix!r}; "
                        "use .tsv, .csv, .jsonl or .json (or pass --format)")
    return formats[suffix]


def _read_lines(path: Path) -> list[str]:
    return read_text(path).splitlines()


def _column_index(header: list[str] | None, column: str, path: Path, which: str) -> int:
    """The position of `column`: a header name, or a 0-based index for a headerless file."""
    if header is None:
        return int(column)
    if column not in header:
        raise UserError(f"{path}: no {which} column {column!r}; the header has {header} "
                        f"(choose with --{which}-column, or give 0-based indices for a file without header)")
    return header.index(column)


def read_labeled(source: str, text_column: str | None = None, label_column: str | None = None,
                 fmt: str | None = None) -> list[tuple[str, str, str]]:
    """Read a labeled-text file or named dataset.

    Args:
        source: a dataset name (`sms-spam`) or a `.tsv`/`.csv`/`.jsonl`/`.json` path.
            TSV files are split on tabs with no quote handling (a message may begin with
            `"`); CSV files use standard CSV quoting; JSONL holds one object per line and
            JSON an array of objects.
        text_column / label_column: column names (default `text` / `label`). For a TSV or
            CSV file without a header line, give 0-based column indices instead ("1", "0").
        fmt: force the format (`tsv`, `csv`, `jsonl`, `json`) instead of the extension's.

    Returns:
        `(text, label, where)` triples; `where` is `file:line` for error messages.

    Raises:
        UserError: missing file, wrong columns, a short row, an empty field, bad JSON.
    """
    path, named = _source_path(source, LABELED_DATASETS, "labeled-text", ".tsv/.csv/.jsonl")
    if named:
        spec = LABELED_DATASETS[source]
        text_column = text_column or spec["text_column"]
        label_column = label_column or spec["label_column"]
        fmt = fmt or spec["format"]
    text_column = text_column or "text"
    label_column = label_column or "label"
    fmt = _format_of(path, fmt)
    if fmt in ("jsonl", "json"):
        rows = read_json_rows(path, fmt)
        out = []
        for where, obj in rows:
            for col, which in ((text_column, "text"), (label_column, "label")):
                if col not in obj:
                    raise UserError(f"{where}: no {which} field {col!r} (fields: {sorted(obj)}); "
                                    f"choose with --{which}-column")
            out.append((text_field(obj[text_column], where, "text"), text_field(obj[label_column], where, "label"), where))
        return _nonempty(out, path)
    return _nonempty(_read_delimited(path, fmt, text_column, label_column), path)


def _nonempty(rows: list, path: Path) -> list:
    if not rows:
        raise UserError(f"{path}: holds no examples")
    return rows


def text_field(value, where: str, which: str) -> str:
    """A record's `which` field as a string (a numeric label becomes its text), or a
    UserError naming `where` (file and line or record)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and which == "label":
        value = str(value)
    if not isinstance(value, str):
        raise UserError(f"{where}: the {which} field must be a string, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where}: empty {which}")
    return value.strip() if which == "label" else value


def _read_delimited(path: Path, fmt: str, text_column: str, label_column: str) -> list[tuple[str, str, str]]:
    headerless = text_column.isdigit() and label_column.isdigit()
    if fmt == "tsv":
        lines = _read_lines(path)
        numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
        header = None
        if not headerless:
            if not numbered:
                raise UserError(f"{path}: holds no examples")
            header = numbered[0][1].split("\t")
            if text_column not in header or label_column not in header:
                raise UserError(
                    f"{path}: wrong columns: expected a header with {text_column!r} and {label_column!r}, "
                    f"first line has {header[:6]}; choose with --text-column/--label-column "
                    "(0-based indices for a file without header)")
            numbered = numbered[1:]
        ti = _column_index(header, text_column, path, "text")
        li = _column_index(header, label_column, path, "label")
        n_fields = len(header) if header else max(ti, li) + 1
        rows = []
        for lineno, line in numbered:
            # No quote handling, and the last column takes any further tabs: a message that
            # begins with `"` or holds a tab stays exactly as written.
            fields = line.split("\t", n_fields - 1)
            where = f"{path}:{lineno}"
            if len(fields) < n_fields:
                raise UserError(f"{where}: expected {n_fields} tab-separated fields, found {len(fields)}")
            rows.append((text_field(fields[ti], where, "text"), text_field(fields[li], where, "label"), where))
        return rows
    # CSV: standard quoting, so a field may hold commas and newlines.
    try:
        f = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    rows = []
    with f:
        reader = csv.reader(f)
        try:
            header = None if headerless else next(reader, None)
            if not headerless:
                if header is None:
                    raise UserError(f"{path}: holds no examples")
                if text_column not in header or label_column not in header:
                    raise UserError(
                        f"{path}: wrong columns: expected a header with {text_column!r} and "
                        f"{label_column!r}, first line has {header[:6]}; choose with "
                        "--text-column/--label-column")
            ti = _column_index(header, text_column, path, "text")
            li = _column_index(header, label_column, path, "label")
            for fields in reader:
                where = f"{path}:{reader.line_num}"
                if not any(x.strip() for x in fields):
                    continue
                if len(fields) <= max(ti, li):
                    raise UserError(f"{where}: expected at least {max(ti, li) + 1} fields, found {len(fields)}")
                rows.append((text_field(fields[ti], where, "text"), text_field(fields[li], where, "label"), where))
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    return rows


def read_json_rows(path: Path, fmt: str) -> list[tuple[str, dict]]:
    """`(where, object)` pairs from a JSONL file (one object a line) or a JSON array."""
    if fmt == "jsonl":
        return [(f"{path}:{i}", parse_json(line, str(path), dict, line=i))
                for i, line in enumerate(_read_lines(path), start=1) if line.strip()]
    data = parse_json("\n".join(_read_lines(path)), str(path), list)
    rows = []
    for i, obj in enumerate(data):
        where = f"{path}: record {i + 1}"
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        rows.append((where, obj))
    return rows


def json_records(source: str, datasets, kind: str, layout: str = "an array") -> tuple[Path, list[tuple[str, dict]]]:
    """The file and the records of a `.json` array or `.jsonl` file of `kind` data (a name in
    `datasets` is downloaded or read from `LLMSCRATCH_DATA_DIR` first), each record with its
    `file:line` (or `file[index]`) for messages. UserError for another format or bad JSON."""
    path, _ = _source_path(source, datasets, kind, ".json/.jsonl")
    fmt = _format_of(path, None)
    if fmt not in ("json", "jsonl"):
        raise UserError(f"{path}: {kind} data must be .json ({layout}) or .jsonl")
    return path, read_json_rows(path, fmt)


def read_instruction_records(source: str) -> list[dict]:
    """Read instruction data as conversations.

    Args:
        source: `alpaca-1100` (or `alpaca-preference`), an Alpaca-style `.json` array or
            `.jsonl` file (`instruction`, optional `input`, `output`), or a chat-style
            `.jsonl` file with `messages: [{"role": "system"|"user"|"assistant",
            "content": ...}, ...]` that ends with an assistant message.

    Returns:
        One dict per example: `{"messages": [...], "where": "file:line"}`; an Alpaca
        record becomes `[{"role": "user", "content": instruction, "input": input},
        {"role": "assistant", "content": output}]`.

    Raises:
        UserError: malformed JSON (file and line), missing or empty fields, bad roles.
    """
    path, rows = json_records(source, INSTRUCTION_DATASETS, "instruction", "an Alpaca array")
    records = []
    for where, obj in rows:
        if "messages" in obj:
            records.append({"messages": _check_messages(obj["messages"], where), "where": where})
            continue
        for key in ("instruction", "output"):
            if key not in obj:
                raise UserError(f"{where}: no {key!r} field (an Alpaca record needs instruction, "
                                "input and output; a chat record needs messages)")
        instruction = text_field(obj["instruction"], where, "instruction")
        output = text_field(obj["output"], where, "output")
        inp = obj.get("input", "") or ""
        if not isinstance(inp, str):
            raise UserError(f"{where}: the input field must be a string, got {type(inp).__name__}")
        records.append({"messages": [{"role": "user", "content": instruction, "input": inp},
                                     {"role": "assistant", "content": output}], "where": where})
    if not records:
        raise UserError(f"{path}: holds no examples")
    return records


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages, start=1):  # numbered from 1, as lines and records are
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {j} needs a role and a content")
        if m["role"] not in ("system", "user", "assistant"):
            raise UserError(f"{where}: message {j} has role {m['role']!r}; use system, user or assistant")
        if m["role"] == "system" and j != 1:
            raise UserError(f"{where}: message {j}: a system message may only come first")
        out.append({"role": m["role"], "content": text_field(m["content"], where, f"message {j} content")})
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's response")
    if not any(m["role"] == "user" for m in out):
        raise UserError(f"{where}: no user message")
    return out


# ------------------------------------------------------------------ splits


def balance_classes(examples: list, seed: int) -> list:
    """Undersample every class to the size of the smallest one.

    Args:
        examples: `(text, label, ...)` tuples.
        seed: which examples of the larger classes are kept.

    Returns:
        The kept examples, in their original order.
    """
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex[1], []).append(i)
    n = min(len(v) for v in by_label.values())
    keep = set()
    for label in sorted(by_label):
        keep.update(rng.sample(by_label[label], n))
    return [ex for i, ex in enumerate(examples) if i in keep]


def stratified_split(examples: list, fractions: tuple[float, float, float], seed: int):
    """Split into train/val/test with each class in the same proportions in every part.

    Args:
        examples: `(text, label, ...)` tuples.
        fractions: `(train, val, test)`, summing to 1, e.g. `(0.7, 0.1, 0.2)`.
        seed: shuffling seed.

    Returns:
        `(train, val, test)` lists, each shuffled.

    Raises:
        UserError: a class too small to put at least one example in every part.
    """
    rng = random.Random(seed)
    by_label: dict[str, list] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    parts: tuple[list, list, list] = ([], [], [])
    for label in sorted(by_label):
        items = by_label[label][:]
        rng.shuffle(items)
        n = len(items)
        n_train = int(round(n * fractions[0]))
        n_val = int(round(n * fractions[1]))
        n_test = n - n_train - n_val
        if min(n_train, n_val, n_test) < 1:
            need = max(3, int(1 / max(1e-9, min(fractions))) + 1)
            raise UserError(
                f"dataset too small: class {label!r} has {n} example(s), too few for a "
                f"{'/'.join(f'{round(f * 100)}' for f in fractions)} split (needs about {need} per class "
                "so every split gets one)")
        parts[0].extend(items[:n_train])
        parts[1].extend(items[n_train:n_train + n_val])
        parts[2].extend(items[n_train + n_val:])
    for p in parts:
        rng.shuffle(p)
    return parts


def parse_split(spec: str | tuple) -> tuple[float, float, float]:
    """`"0.7,0.1,0.2"` (or a tuple) -> `(0.7, 0.1, 0.2)`, checked to be positive and sum to 1."""
    try:
        values = tuple(float(x) for x in (spec.split(",") if isinstance(spec, str) else spec))
    except ValueError:
        raise UserError(f"--split {spec!r}: expected three numbers like 0.7,0.1,0.2") from None
    if len(values) != 3 or min(values) <= 0 or abs(sum(values) - 1) > 1e-6:
        raise UserError(f"--split {spec!r}: expected three positive fractions summing to 1, like 0.7,0.1,0.2")
    return values  # type: ignore[return-value]
