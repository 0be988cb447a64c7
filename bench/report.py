"""Result rows, targets, and the markdown report with the machine's facts."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cryptography
import psutil
import pymongo
import tornado

from ots.logs import mask_uri

Comparison = Literal["<", "<=", ">="]


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal for a row's value or ratio, such as "ratio >= 0.90"."""

    on: Literal["value", "ratio"]
    comparison: Comparison
    limit: float
    unit: str = ""

    def met(self, value: float, ratio: float | None) -> bool | None:
        """Return whether the row meets the target; None when the figure is missing."""
        figure = value if self.on == "value" else ratio
        if figure is None or math.isnan(figure):
            return None
        if self.comparison == "<":
            return figure < self.limit
        if self.comparison == "<=":
            return figure <= self.limit
        return figure >= self.limit

    def describe(self) -> str:
        """Return the target as table text."""
        symbol = {"<": "<", "<=": "≤", ">=": "≥"}[self.comparison]
        subject = "" if self.on == "value" else "ratio "
        unit = f" {self.unit}" if self.unit else ""
        return f"{subject}{symbol} {_number(self.limit)}{unit}"


@dataclasses.dataclass(frozen=True)
class Row:
    """One figure of one case: its value, its ratio against a baseline, its target."""

    case: str
    figure: str
    value: float
    unit: str
    ratio: float | None = None
    baseline: str = ""
    target: Target | None = None

    def verdict(self) -> str:
        """Return "met", "missed", or "—" when the row has no target."""
        if self.target is None:
            return "—"
        met = self.target.met(self.value, self.ratio)
        if met is None:
            return "missed (no figure)"
        return "met" if met else "missed"


@dataclasses.dataclass(frozen=True)
class Failure:
    """A case that raised instead of producing its rows."""

    case: str
    error: str


def render(
    rows: Sequence[Row],
    failures: Sequence[Failure],
    *,
    header: Sequence[tuple[str, str]],
    notes: Sequence[str],
) -> str:
    """Build the markdown report: run facts, the table, failures and notes."""
    lines = ["# ots benchmark", ""]
    lines += [f"- {name}: {value}" for name, value in header]
    lines += [
        "",
        "| case | figure | value | ratio vs baseline | target | met/missed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ratio = "—" if row.ratio is None else f"{_number(row.ratio)} {row.baseline}".strip()
        target = "—" if row.target is None else row.target.describe()
        value = f"{_number(row.value)} {row.unit}".strip()
        lines.append(
            f"| {row.case} | {row.figure} | {value} | {ratio} | {target} | {row.verdict()} |"
        )
    for failure in failures:
        lines.append(f"| {failure.case} | did not run: {failure.error} | — | — | — | failed |")
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def machine_facts() -> list[tuple[str, str]]:
    """Return the CPU, cores, memory, OS, Python and library versions of this machine."""
    memory = psutil.virtual_memory().total / 2**30
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        ("CPU", cpu_model()),
        ("cores", str(os.cpu_count())),
        ("memory", f"{memory:.1f} GiB"),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("libraries", library_versions()),
        ("load average at start (1, 5, 15 min)", load),
    ]


def library_versions() -> str:
    """Return the versions of the libraries the service's speed depends on."""
    return (
        f"tornado {tornado.version}, pymongo {pymongo.version}, "
        f"cryptography {cryptography.__version__}, psutil {psutil.__version__}"
    )


def cpu_model() -> str:
    """Return the CPU model name (from /proc/cpuinfo on Linux)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def command_line(argv: Sequence[str]) -> str:
    """Return the command line as typed, with any password in a MongoDB URI masked."""
    masked = []
    for argument in argv:
        option, equals, value = argument.partition("=")
        if "://" not in argument:
            masked.append(argument)
        elif option.startswith("--") and equals:
            masked.append(f"{option}={mask_uri(value)}")
        else:
            masked.append(mask_uri(argument))
    return " ".join(["python -m bench", *masked])


def timestamp() -> str:
    """Return the current UTC time in RFC 3339 form."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(value: float) -> str:
    """Format a figure with about three significant digits."""
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞"
    magnitude = abs(value)
    if magnitude >= 100 or value == int(value):
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"
