"""Results on stdout as a table (people), JSON or YAML (programs).

``--format`` defaults to a table when stdout is a terminal and to JSON when it is piped. Tables
are plain (no box), and rich writes no colour codes when stdout is not a terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import Enum
from typing import Any, Literal, Protocol

import yaml
from hypeman import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hypeman_cli.units import human_bytes

Format = Literal["table", "json", "yaml"]
FORMATS: tuple[str, ...] = ("auto", "table", "json", "yaml")


def choose_format(requested: str) -> Format:
    if requested == "auto":
        return "table" if sys.stdout.isatty() else "json"
    if requested in ("table", "json", "yaml"):
        return requested  # type: ignore[return-value]
    raise ValueError(requested)


def to_data(value: Any) -> Any:
    """SDK models, lists and dicts as plain JSON-able data (fields the server sent, API names)."""
    if isinstance(value, BaseModel):
        return value.to_dict(mode="json")
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_data(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    return value


def stdout_console() -> Console:
    # Piped tables are not cut to 80 columns.
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 4096)


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict[str, Any]], Any]


def _cell(value: Any) -> str:
    if value is None or value == "" or value == {} or value == []:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> None:
    table = Table(box=None, header_style="bold", pad_edge=False, show_edge=False, expand=False)
    for column in columns:
        table.add_column(column.header, overflow="fold")
    for row in rows:
        table.add_row(*(escape(_cell(column.cell(row))) for column in columns))
    stdout_console().print(table)


def _field_value(key: str, value: Any) -> Any:
    if key.endswith("_bytes") and isinstance(value, int) and not isinstance(value, bool):
        return human_bytes(value)
    return value


def print_fields(record: dict[str, Any]) -> None:
    """One object as FIELD/VALUE rows; sizes for people, nested values as compact JSON."""
    print_table([{"k": k, "v": _field_value(k, v)} for k, v in record.items()],
                [Column("FIELD", lambda r: r["k"]), Column("VALUE", lambda r: r["v"])])


def print_data(data: Any, fmt: Format) -> None:
    if fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    else:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def emit(value: Any, fmt: Format, columns: Sequence[Column] | None = None) -> None:
    """A record or a list of records in the chosen format; lists need ``columns`` for a table."""
    data = to_data(value)
    if fmt != "table":
        print_data(data, fmt)
    elif isinstance(data, list):
        print_table(data, columns or [Column("VALUE", lambda r: r)])
    elif isinstance(data, dict):
        if columns:
            print_table([data], columns)
        else:
            print_fields(data)
    else:
        print(_cell(data))


def emit_lines(lines: Iterable[str]) -> None:
    for line in lines:
        print(line)
    sys.stdout.flush()


def emit_names(names: list[str], fmt: Format) -> None:
    """Ids or names: one per line in table format, else a JSON/YAML list."""
    if fmt == "table":
        emit_lines(names)
    else:
        print_data(names, fmt)


class _Identified(Protocol):
    id: str


def emit_listing(items: Sequence[Any], fmt: Format, columns: Sequence[Column], quiet: bool) -> None:
    """A list command's answer: ids only (``--quiet``), else the records."""
    if quiet:
        emit_lines(item.id for item in items)
    else:
        emit(items, fmt, columns)


def delete_each(refs: Iterable[str], get: Callable[[str], _Identified], delete: Callable[[str], object],
                fmt: Format) -> None:
    """Delete every reference in turn (each resolved by the server first, so a name or a prefix
    works) and print the ids deleted."""
    deleted = []
    for ref in refs:
        found = get(ref)
        delete(found.id)
        deleted.append(found.id)
    emit_names(deleted, fmt)
