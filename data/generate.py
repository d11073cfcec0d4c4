"""Generate the shipped order-extraction dataset (deterministic: same seed, same bytes).

Each example asks for one nested JSON record with a fixed schema and normalised values
(title-case names, lower-case emails, quantities as integers, ISO dates) pulled from a short,
informal message. Usage: python data/generate.py [--out data/orders] [--seed 1234]

The preference pairs of the align stage (out/preference/) come from a model's own mistakes on
more messages of this generator: data/model_pairs.py.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

INSTRUCTION = (
    "Extract the order as compact JSON with exactly this schema: "
    '{"customer": {"name": str, "email": str}, "order": {"sku": str, "quantity": int, '
    '"ship_by": "YYYY-MM-DD"}}. Write names in title case and emails in lower case.'
)

FIRST = [
    "maria",
    "john",
    "aisha",
    "kenji",
    "olga",
    "pedro",
    "fatima",
    "liam",
    "chen",
    "sara",
    "tomas",
    "nina",
    "omar",
    "grace",
    "ivan",
    "lucia",
    "noah",
    "elena",
    "yusuf",
    "anna",
]
LAST = [
    "lopez",
    "smith",
    "khan",
    "tanaka",
    "petrova",
    "alves",
    "haddad",
    "murphy",
    "wang",
    "berg",
    "novak",
    "rossi",
    "farouk",
    "okafor",
    "ivanov",
    "garcia",
    "miller",
    "costa",
    "demir",
    "schmidt",
]
DOMAINS = ["example.com", "mail.test", "shop.example", "corp.test"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NUMBER_WORDS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]
TEMPLATES = [
    "Hi, {name} here ({email}). Please ship {qty} of {sku} by {date}.",
    "{name} <{email}> wants {qty} units of item {sku}, needed before {date}.",
    "order from {name}, email {email}: sku {sku}, qty {qty}, deliver by {date}",
    "Can you send {qty} x {sku} to {name}? Deadline {date}. Contact: {email}",
    "Please book {qty} of {sku} for {name} ({email}); it must ship by {date}.",
]


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def make_example(rng: random.Random) -> dict[str, str]:
    """One message and the record it asks for."""
    first, last = rng.choice(FIRST), rng.choice(LAST)
    email = f"{first}.{last}@{rng.choice(DOMAINS)}"
    quantity = rng.randint(1, 12)
    year, month, day = rng.choice([2024, 2025, 2026]), rng.randint(1, 12), rng.randint(1, 28)
    sku = (
        f"{rng.choice('ABCDEFGHKMNPRSTX')}{rng.choice('ABCDEFGHKMNPRSTX')}-{rng.randint(100, 9999)}"
    )
    shown_name = rng.choice(
        [f"{first} {last}", f"{first.upper()} {last.upper()}", f"{first.title()} {last.title()}"]
    )
    shown_email = rng.choice([email, email.upper(), email.title()])
    shown_qty = rng.choice([str(quantity), NUMBER_WORDS[quantity - 1]])
    shown_date = rng.choice(
        [
            f"{MONTHS[month - 1]} {ordinal(day)}, {year}",
            f"{day} {MONTHS[month - 1][:3]} {year}",
            f"{month}/{day}/{year}",
        ]
    )
    text = rng.choice(TEMPLATES).format(
        name=shown_name, email=shown_email, qty=shown_qty, sku=sku, date=shown_date
    )
    record = {
        "customer": {"name": f"{first.title()} {last.title()}", "email": email},
        "order": {"sku": sku, "quantity": quantity, "ship_by": f"{year:04d}-{month:02d}-{day:02d}"},
    }
    return {
        "instruction": INSTRUCTION,
        "input": text,
        "output": json.dumps(record, separators=(",", ":")),
    }


def unseen(
    make: Callable[[random.Random], dict[str, str]], rng: random.Random, size: int, seen: set[str]
) -> list[dict[str, str]]:
    """`size` rows from `make`, each with an input text no earlier row had (added to `seen`)."""
    rows: list[dict[str, str]] = []
    while len(rows) < size:
        row = make(rng)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "orders")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--sizes", type=int, nargs=3, default=[800, 64, 64], metavar=("TRAIN", "VALIDATION", "TEST")
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()  # no input text appears in two splits
    for split, size in zip(("train", "validation", "test"), args.sizes, strict=True):
        path = args.out / f"{split}.jsonl"
        write_jsonl(path, unseen(make_example, rng, size, seen))
        print(f"{split}: {size} examples -> {path}")


if __name__ == "__main__":
    main()
