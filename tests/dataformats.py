"""The same records written in every source format loraflow reads, for the format tests."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "json", "parquet", "csv", "tsv", "datasets")


def write_records(folder: Path, stem: str, fmt: str, records: list[dict[str, Any]]) -> Path:
    """`records` as folder/stem.<fmt> (a folder for datasets' save_to_disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (stem if fmt == "datasets" else f"{stem}.{fmt}")
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if fmt == "jsonl":
        path.write_bytes(lines)
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress(lines))
    elif fmt == "jsonl.zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif fmt == "json":  # pretty-printed: elements span lines
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = list(dict.fromkeys(k for r in records for k in r))
        table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in records])
        pq.write_table(table, path, row_group_size=3)
    elif fmt in ("csv", "tsv"):
        names = list(dict.fromkeys(k for r in records for k in r))
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, names, delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(
                {k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                for r in records
            )
    elif fmt == "datasets":
        from datasets import Dataset

        names = list(dict.fromkeys(k for r in records for k in r))
        dataset = Dataset.from_list([{k: r.get(k) for k in names} for r in records])
        dataset.save_to_disk(str(path), num_shards=2)
    else:
        raise ValueError(fmt)
    return path
