"""Tool-lending ledger for the Fennimore Street Garden Co-op.

The co-op owns a shared set of tools that live in the shed. Members may take them home,
but every loan is written to a small CSV ledger so that we know where the loppers went.

Borrowed tools must be returned within 72 hours, or the borrower is flagged as overdue.

Usage::

    python tools/inventory.py lend "long-handled loppers" "Samir Haddad"
    python tools/inventory.py return "long-handled loppers"
    python tools/inventory.py overdue
    python tools/inventory.py list

The ledger file defaults to ``tool-ledger.csv`` next to this script; set the environment
variable ``COOP_LEDGER`` to use another path.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

LOAN_LIMIT = timedelta(hours=72)
LEDGER_FIELDS = ("tool", "borrower", "lent_at", "returned_at")

# The shared tools, by shelf. Personal tools kept in the shed are not listed here.
TOOLS: dict[str, list[str]] = {
    "top shelf": ["hand trowel (x4)", "hand fork (x3)", "bulb planter", "soil thermometer"],
    "middle shelf": ["secateurs (x2)", "hedge shears", "pruning saw", "long-handled loppers"],
    "floor": ["spade (x3)", "garden fork (x2)", "rake", "hoe", "wheelbarrow", "sieve"],
    "wall hooks": ["compost fork", "leaf rake", "edging iron", "watering can (x4)"],
}


@dataclass
class Loan:
    """One line of the ledger: who has which tool, since when, and whether it came back."""

    tool: str
    borrower: str
    lent_at: datetime
    returned_at: datetime | None = None

    @property
    def is_out(self) -> bool:
        """True while the tool has not been signed back in."""
        return self.returned_at is None

    def is_overdue(self, now: datetime) -> bool:
        """True when the tool is still out and the loan is older than LOAN_LIMIT."""
        return self.is_out and now - self.lent_at > LOAN_LIMIT


def ledger_path() -> Path:
    """Where the ledger lives: $COOP_LEDGER, or tool-ledger.csv beside this script."""
    return Path(os.environ.get("COOP_LEDGER", Path(__file__).with_name("tool-ledger.csv")))


def all_tools() -> list[str]:
    """Every shared tool name, shelf by shelf, without the '(xN)' counts."""
    return [name.split(" (x")[0] for shelf in TOOLS.values() for name in shelf]


def read_ledger(path: Path) -> list[Loan]:
    """Load every loan from the ledger; a missing file is an empty ledger."""
    if not path.exists():
        return []
    loans = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            returned = row.get("returned_at") or ""
            loans.append(Loan(
                tool=row["tool"],
                borrower=row["borrower"],
                lent_at=datetime.fromisoformat(row["lent_at"]),
                returned_at=datetime.fromisoformat(returned) if returned else None,
            ))
    return loans


def write_ledger(path: Path, loans: list[Loan]) -> None:
    """Write the whole ledger back, oldest loan first."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(LEDGER_FIELDS)
        for loan in sorted(loans, key=lambda item: item.lent_at):
            writer.writerow([
                loan.tool,
                loan.borrower,
                loan.lent_at.isoformat(timespec="minutes"),
                loan.returned_at.isoformat(timespec="minutes") if loan.returned_at else "",
            ])


def lend(loans: list[Loan], tool: str, borrower: str, now: datetime) -> Loan:
    """Record a new loan; refuse a tool we do not own or one that is already out."""
    if tool not in all_tools():
        raise ValueError(f"unknown tool {tool!r}; known tools: {', '.join(all_tools())}")
    if any(loan.tool == tool and loan.is_out for loan in loans):
        raise ValueError(f"{tool!r} is already lent out")
    loan = Loan(tool=tool, borrower=borrower, lent_at=now)
    loans.append(loan)
    return loan


def give_back(loans: list[Loan], tool: str, now: datetime) -> Loan:
    """Mark the open loan of `tool` as returned."""
    for loan in loans:
        if loan.tool == tool and loan.is_out:
            loan.returned_at = now
            return loan
    raise ValueError(f"{tool!r} is not lent out")


def overdue(loans: list[Loan], now: datetime) -> list[Loan]:
    """Open loans older than the limit, longest overdue first."""
    return sorted((loan for loan in loans if loan.is_overdue(now)), key=lambda item: item.lent_at)


def main(argv: list[str]) -> int:
    """Command-line entry point; returns the process exit status."""
    if not argv:
        print(__doc__)
        return 2
    path, now = ledger_path(), datetime.now().replace(second=0, microsecond=0)
    loans = read_ledger(path)
    command, args = argv[0], argv[1:]
    try:
        if command == "lend" and len(args) == 2:
            loan = lend(loans, args[0], args[1], now)
            write_ledger(path, loans)
            print(f"{loan.tool} lent to {loan.borrower}; due back by {(now + LOAN_LIMIT):%A %d %B, %H:%M}")
        elif command == "return" and len(args) == 1:
            loan = give_back(loans, args[0], now)
            write_ledger(path, loans)
            print(f"{loan.tool} returned by {loan.borrower}")
        elif command == "overdue" and not args:
            for loan in overdue(loans, now):
                print(f"OVERDUE {loan.tool}: {loan.borrower}, out since {loan.lent_at:%d %B %H:%M}")
        elif command == "list" and not args:
            out = {loan.tool: loan.borrower for loan in loans if loan.is_out}
            for shelf, names in TOOLS.items():
                print(f"{shelf}:")
                for name in names:
                    base = name.split(" (x")[0]
                    print(f"  {name:<24} {'out with ' + out[base] if base in out else 'in the shed'}")
        else:
            print(__doc__)
            return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
