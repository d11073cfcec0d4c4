"""Data preparation, loraflow vs the guide, on the same generated JSONL file, in one run.

    python benchmarks/data_bench.py --n 1000000 [--tokenizer tests/assets/tiny-tokenizer]

- guide: `load_dataset("json")` then `dataset.map(tokenize)` with the guide's function verbatim
  (alpaca layout, truncation=True, padding="max_length", max_length=1024), one process.
- loraflow: `validate_splits` (every line checked, cleaned, deduplicated, quarantine written)
  then `tokenize_splits` (alpaca layout, max_length 1024, no padding stored, zstd Parquet);
  loraflow-minhash: the same with data.clean.dedup=minhash.
- loraflow-jsonl-gz, loraflow-parquet: loraflow on the same examples stored as .jsonl.gz (the
  JSONL file's bytes, gzip level 6) and as Parquet (zstd, row groups of 16,384; the bad lines
  cannot be stored in Parquet and are left out). "validate us/record" compares the formats:
  validation's wall time and CPU time (this process) per record read; tokenization does not
  see the source format.
Each contender runs in its own child process; the table shows wall time, the CPU seconds it
used (all threads: more than the wall time means it used more than one core), how many cores
other processes on the machine kept busy meanwhile, on average, the child's peak
resident memory, the bytes of the tokenized dataset and every byte the contender wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = (  # noqa: SIM905 - a sentence of words reads better than a 35-item list
    "order ship customer quantity invoice deliver package address street city price total "
    "refund return warehouse status pending express standard priority note gift box item "
    "please confirm before friday thanks regards team account number reference urgent"
).split()


def generate(path: Path, n: int, seed: int = 0) -> None:
    """n instruction examples, log-normal lengths (median line ~1 KB), a few bad lines."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = min(400, max(8, int(rng.lognormvariate(4.6, 0.5))))
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            record = {
                "instruction": f"Summarise request #{i} in one sentence and extract the amount.",
                "input": f"ticket {i}: {text}",
                "output": f"Customer {i} asks about {' '.join(rng.choices(WORDS, k=12))}; "
                f"amount {rng.randint(1, 999)}.{rng.randint(0, 99):02d} EUR.",
            }
            f.write(json.dumps(record) + "\n")
            if i % 1000 == 999:
                f.write('{"instruction": "broken", "output": \n')  # 0.1% bad lines


def convert(data: Path, fmt: str) -> Path:
    """The JSONL file's examples as .jsonl.gz (its bytes) or Parquet (its good lines), once."""
    out = data.with_suffix(".jsonl.gz" if fmt == "jsonl-gz" else ".parquet")
    if out.is_file():
        return out
    partial = out.with_name(out.name + ".partial")
    if fmt == "jsonl-gz":
        import gzip
        import shutil

        with open(data, "rb") as src, gzip.open(partial, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(n, pa.string()) for n in ("instruction", "input", "output")])
        with pq.ParquetWriter(partial, schema, compression="zstd") as writer, open(data) as f:
            rows: list[dict] = []
            for line in f:
                if line.startswith('{"instruction": "broken"'):
                    continue
                rows.append(json.loads(line))
                if len(rows) == 16384:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    rows = []
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    partial.rename(out)
    return out


def run_guide(data: Path, tokenizer_dir: str, work: Path) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # the guide's own fix
    # the guide's load_dataset cannot read a file with a bad line: give it the good lines
    clean = work / "guide-input.jsonl"
    with open(data, "rb") as src, open(clean, "wb") as dst:
        dst.writelines(line for line in src if not line.startswith(b'{"instruction": "broken"'))
    dataset = load_dataset("json", data_files={"train": str(clean)}, cache_dir=str(work / "hf"))

    def tokenize(example):  # the guide, section "Tokenization Strategy", verbatim
        return tokenizer(
            f"### Instruction:\n{example['instruction']}\n\n### Input:\n{example['input']}\n\n"
            f"### Output:\n{example['output']}",
            truncation=True,
            padding="max_length",
            max_length=1024,
        )

    tokenized = dataset.map(tokenize)
    files = [Path(f["filename"]) for f in tokenized["train"].cache_files]
    return {
        "examples": len(tokenized["train"]),
        "dataset_bytes": sum(f.stat().st_size for f in files),
        "written_bytes": _tree_bytes(work / "hf") + clean.stat().st_size,
    }


def run_loraflow(data: Path, tokenizer_dir: str, work: Path, dedup: str) -> dict:
    from transformers import AutoTokenizer

    from loraflow.config import DataConfig
    from loraflow.data.prompts import PromptTemplate
    from loraflow.data.tokenization import TokenizeSettings, tokenize_splits
    from loraflow.data.validation import validate_splits

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = DataConfig(train=[str(data)], min_kept_fraction=0.9, clean={"dedup": dedup})
    start, cpu = time.perf_counter(), time.process_time()
    report = validate_splits({"train": [str(data)]}, work / "validated", cfg)
    validate_seconds, validate_cpu = time.perf_counter() - start, time.process_time() - cpu
    report.check(work / "validated")
    settings = TokenizeSettings(max_length=1024, truncation="truncate")
    tok = tokenize_splits(work / "validated", tokenizer, PromptTemplate(kind="alpaca"), settings,
                          work / "tokenized", splits=("train",))
    return {
        "examples": tok.counts["train"],
        "quarantined": report.splits["train"].quarantined,
        "records_read": report.splits["train"].read,
        "validate_seconds": validate_seconds,
        "validate_cpu_seconds": validate_cpu,
        "dataset_bytes": (work / "tokenized" / "train.parquet").stat().st_size,
        "written_bytes": _tree_bytes(work),
    }


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _cpu_seconds() -> float:
    """User + system CPU of this process (all its threads) and of its finished children."""
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in used)


def _machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def child(args: argparse.Namespace) -> None:
    """One contender in this process; prints its numbers as JSON on the last line."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.child}-", dir=args.workdir))
    # imports are not data work: load them before timing (transformers' are lazy: AutoTokenizer
    # pulls in torch, ~1 s, on first use, for both contenders alike)
    from transformers import AutoTokenizer  # noqa: F401

    if args.child == "guide":
        import datasets  # noqa: F401
    else:
        import pyarrow.parquet  # noqa: F401 - imported by loraflow on first write

        import loraflow.data.tokenization  # noqa: F401
    cpu_before, busy_before = _cpu_seconds(), _machine_busy_seconds()
    start = time.perf_counter()
    if args.child == "guide":
        result = run_guide(args.data, args.tokenizer, work)
    else:
        dedup = "minhash" if args.child == "loraflow-minhash" else "near"
        result = run_loraflow(args.data, args.tokenizer, work, dedup)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["cpu_seconds"] = _cpu_seconds() - cpu_before
    # what the rest of the machine used meanwhile (a shared machine): cores, on average
    others = _machine_busy_seconds() - busy_before - result["cpu_seconds"]
    result["other_cores"] = max(0.0, others) / result["seconds"]
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="examples to generate")
    parser.add_argument("--tokenizer", default=str(ROOT / "tests" / "assets" / "tiny-tokenizer"))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--contenders", default="guide,loraflow")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    data = args.workdir / f"bench-{args.n}.jsonl"
    if not data.is_file():
        print(f"generating {args.n} examples -> {data}", file=sys.stderr)
        generate(data, args.n)
    print(f"input: {data} ({data.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)
    rows = {}
    for name in args.contenders.split(","):
        source = data
        if name in ("loraflow-jsonl-gz", "loraflow-parquet"):
            source = convert(data, name.removeprefix("loraflow-"))
            print(f"{name}: {source} ({source.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)
        done = subprocess.run(
            [sys.executable, __file__, "--child", name, "--data", str(source),
             "--tokenizer", args.tokenizer, "--workdir", str(args.workdir)],
            stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, rows[name], file=sys.stderr)
    guide = rows.get("guide")
    size_mib = data.stat().st_size / 2**20
    print(f"\n{args.n} examples, {size_mib:.0f} MiB JSONL, tokenizer {args.tokenizer}")
    print(
        "| contender | examples | wall s | CPU s | other jobs' cores | peak RSS MiB "
        "| tokenized dataset MiB | all written MiB | speed vs guide | smaller vs guide "
        "| validate us/record (wall, CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        speed = f"{guide['seconds'] / r['seconds']:.1f}x" if guide else "-"
        size = f"{guide['dataset_bytes'] / r['dataset_bytes']:.1f}x" if guide else "-"
        print(
            f"| {name} | {r['examples']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
            f"{r['other_cores']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['dataset_bytes'] / 2**20:.1f} | {r['written_bytes'] / 2**20:.1f} | "
            f"{speed} | {size} | {per_record(r)} |"
        )


def per_record(result: dict) -> str:
    if "validate_seconds" not in result:
        return "-"
    n = result["records_read"]
    return (f"{1e6 * result['validate_seconds'] / n:.0f}, "
            f"{1e6 * result['validate_cpu_seconds'] / n:.0f}")


if __name__ == "__main__":
    main()
