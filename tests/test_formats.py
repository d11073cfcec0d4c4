"""Every source format gives the same cleaned examples, every record accounted for with where
it came from; a file that is not what its name says stops validation with one message."""

import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest
import zstandard
from dataformats import FORMATS, write_records

from loraflow.config import DataConfig
from loraflow.data.records import DataError
from loraflow.data.sources import source_fingerprint
from loraflow.data.validation import validate_splits
from loraflow.hashing import sha256_file, sha256_tree

RECORDS = [
    {"instruction": f"Add {i}.", "input": f"{i} + 1", "output": f"{i + 1}"} for i in range(7)
]
RECORDS[3] = {"instruction": "Say nothing.", "output": "   "}  # quarantined: empty
RECORDS.append(
    {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\u0007"},  # a BEL: cleaned by strip_control
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]}
)  # fmt: skip


def validate(tmp_path: Path, sources: list[str], **data) -> tuple:
    cfg = DataConfig.model_validate({"min_kept_fraction": 0.5} | data)
    report = validate_splits({"train": sources}, tmp_path / "out", cfg, progress=False)
    c = report.splits["train"]
    assert c.read == c.blank + c.kept + c.cleaned + c.quarantined
    return report, tmp_path / "out"


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_the_examples_of_the_same_records_in_jsonl(tmp_path, fmt):
    reference, ref_out = validate(
        tmp_path / "ref", [str(write_records(tmp_path / "ref", "train", "jsonl", RECORDS))]
    )
    path = write_records(tmp_path, "train", fmt, RECORDS)
    report, out = validate(tmp_path, [str(path)])
    c = report.splits["train"]
    assert (c.read, c.kept, c.cleaned, c.quarantined) == (8, 6, 1, 1)
    assert c.reasons == {"empty": 1} and c.rules == {"strip_control": 1}
    assert (out / "train.jsonl").read_bytes() == (ref_out / "train.jsonl").read_bytes()
    assert report.sha256 == reference.sha256  # the cleaned data: the same examples
    # the quarantined record, as a JSON line to fix and resubmit, and where it came from
    quarantined = (out / "quarantine" / "train.jsonl").read_bytes()
    assert json.loads(quarantined) == RECORDS[3] and quarantined.count(b"\n") == 1
    row = (out / "quarantine" / "train.tsv").read_text().splitlines()[1].split("\t")
    if fmt.startswith("jsonl"):
        assert row[1:4] == [str(path), "4", "empty"]
    elif fmt == "json":  # the line the element starts on
        starts = [n for n, text in enumerate(path.read_text().splitlines(), 1) if text == "  {"]
        assert row[1:4] == [str(path), str(starts[3]), "empty"]
    elif fmt == "datasets":  # the Arrow file and its row
        assert row[1].startswith(str(path) + "/data-0000") and row[1].endswith(".arrow")
        assert row[2].startswith("row ") and row[3] == "empty"
    else:
        assert row[1:4] == [str(path), "row 4", "empty"]
    # lineage: the bytes as stored (a folder: its files)
    expected = sha256_tree(path) if path.is_dir() else sha256_file(path)
    assert source_fingerprint(str(path)) == expected
    if path.is_file():
        digest = hashlib.sha256(f"train\0{path}\0".encode() + bytes.fromhex(expected))
        assert report.source_sha256 == digest.hexdigest()


def test_formats_mix_in_one_split_and_columns_are_mapped(tmp_path):
    renamed = [{"question": r["instruction"], "answer": r["output"]} for r in RECORDS[:3]]
    sources = [
        str(write_records(tmp_path, "a", "parquet", renamed)),
        str(write_records(tmp_path, "b", "csv", [
            {"question": "Add 10.", "answer": "11"}, {"question": "Add 11.", "answer": "12"}
        ])),
        str(write_records(tmp_path, "c", "jsonl.gz", [{"question": "Add 12.", "answer": "13"}])),
    ]  # fmt: skip
    report, out = validate(tmp_path, sources, columns={"instruction": "question",
                                                       "output": "answer"})
    c = report.splits["train"]
    assert (c.read, c.kept, c.quarantined) == (6, 6, 0)
    assert [json.loads(x)["output"] for x in (out / "train.jsonl").read_text().splitlines()] == [
        "1", "2", "3", "11", "12", "13"
    ]  # fmt: skip


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_columnar_file_without_our_columns_is_named_with_its_columns(tmp_path, fmt):
    path = write_records(tmp_path, "train", fmt, [{"q": "a", "a": "b"}])
    with pytest.raises(DataError, match=r"has none of the columns .* \(its columns: 'q', 'a'\)"):
        validate(tmp_path, [str(path)])


def test_a_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",\n\n]\n')
    with pytest.raises(DataError, match=r"train.json:5: not JSON"):
        validate(tmp_path, [str(path)])


def test_a_json_file_of_json_lines_is_read_as_lines(tmp_path):
    path = write_records(tmp_path, "train", "jsonl", RECORDS).rename(tmp_path / "train.json")
    report, _ = validate(tmp_path, [str(path)])
    assert report.splits["train"].usable == 7


def test_a_large_json_array_streams_elements_longer_than_the_read_window(tmp_path, monkeypatch):
    monkeypatch.setattr("loraflow.data.formats.READ", 64)  # elements span many windows
    records = [{"instruction": f"Q{i} " + "x" * 300, "output": str(10**i)} for i in range(30)]
    path = write_records(tmp_path, "train", "json", records)
    report, out = validate(tmp_path, [str(path)])
    assert report.splits["train"].kept == 30
    assert [json.loads(x)["output"] for x in (out / "train.jsonl").read_text().splitlines()] == [
        str(10**i) for i in range(30)
    ]


def test_control_characters_are_a_rule_counted_and_switchable(tmp_path):
    line = json.dumps({"instruction": "Ring\u0000 the\u001b bell\u0007.", "output": "a\tb\nc"})
    (tmp_path / "train.jsonl").write_text(line + "\n")
    report, out = validate(tmp_path, [str(tmp_path / "train.jsonl")])
    assert report.splits["train"].rules == {"strip_control": 1}
    kept = json.loads((out / "train.jsonl").read_text())
    assert kept["instruction"] == "Ring the bell." and kept["output"] == "a\tb\nc"
    report, _ = validate(tmp_path / "off", [str(tmp_path / "train.jsonl")],
                         clean={"strip_control": False})
    assert report.splits["train"].rules == {} and report.splits["train"].kept == 1


GOOD = "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(5))
# name, bytes, what the message must say (the file is named in it, always)
BROKEN = {
    "utf16.jsonl": (GOOD.encode("utf-16"), r"UTF-16 \(byte-order mark FF FE\).*iconv -f UTF-16 "),
    "utf16le.jsonl": (GOOD.encode("utf-16-le"), r"UTF-16 \(little-endian.*iconv -f UTF-16LE "),
    "utf32.jsonl": (GOOD.encode("utf-32"), r"UTF-32 .*iconv -f UTF-32 "),
    "latin1.jsonl": (GOOD.replace("q", "caf\u00e9").encode("latin-1"), "iconv -f WINDOWS-1252"),
    "binary.jsonl": (bytes(range(256)) * 4, "is a binary file"),
    "gzipped.jsonl": (gzip.compress(GOOD.encode()), r"gzip-compressed.*mv \S+gzipped.jsonl "
                                                    r"\S+gzipped.jsonl.gz"),
    "zstded.jsonl": (zstandard.ZstdCompressor().compress(GOOD.encode()),
                     r"zstd-compressed.*\.jsonl\.zst"),
    "plain.jsonl.gz": (GOOD.encode(), r"named .gz but is UTF-8 text.*mv \S+ \S+plain.jsonl$"),
    "empty.jsonl": (b"", r"is empty \(0 bytes\)"),
    "empty.jsonl.gz": (gzip.compress(b""), "decompresses to nothing"),
    "array.jsonl": (json.dumps([{"instruction": "q", "output": "a"}] * 2, indent=2).encode(),
                    r"JSON array of records.*mv \S+ \S+array.json "),
    "table.jsonl": (b"PAR1" + bytes(64), r"Parquet file.*\S+table.parquet"),
    "sheet.jsonl": (b"instruction,input,output\nAdd.,\"1, 1\",2\nSay hi.,,hi\n",
                    r"CSV table \(header row: instruction, input, output\).*mv \S+sheet.jsonl "
                    r"\S+sheet.csv "),
    "sheet.ndjson": (b"instruction\tinput\toutput\nAdd.\t1 + 1\t2\n", r"TSV table.*\S+sheet.tsv "),
    "text.parquet": (GOOD.encode(), r"no PAR1 magic.*\S+text.jsonl \(it looks like JSON Lines"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_whole_file_problem_is_one_message_with_the_fix_before_any_line(tmp_path, name):
    raw, expected = BROKEN[name]
    (tmp_path / name).write_bytes(raw)
    (tmp_path / "fine.jsonl").write_text(GOOD)
    with pytest.raises(DataError) as caught:
        validate(tmp_path, [str(tmp_path / "fine.jsonl"), str(tmp_path / name)])
    message = str(caught.value)
    problems = [x for x in message.splitlines() if x.startswith("  - ")]
    assert len(problems) == 1 and str(tmp_path / name) in problems[0], message
    assert re.search(expected, problems[0]) and " Fix: " in problems[0], problems[0]
    assert not (tmp_path / "out").exists()  # nothing read, nothing written


def test_a_datasetdict_folder_says_to_point_at_a_split(tmp_path):
    from datasets import Dataset, DatasetDict

    d = Dataset.from_list(RECORDS[:2])
    DatasetDict({"train": d, "test": d}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict: point each split at its own folder"):
        validate(tmp_path, [str(tmp_path / "dd")])


def test_s3_sources_in_every_format(tmp_path, s3_env, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    s3 = boto3.client("s3", endpoint_url=s3_env)
    sources = []
    for fmt in ("jsonl.gz", "parquet", "csv", "json", "datasets"):
        path = write_records(tmp_path / fmt, "part", fmt, RECORDS)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            key = f"data/{fmt}/{file.relative_to(tmp_path / fmt)}"
            s3.put_object(Bucket="models", Key=key, Body=file.read_bytes())
        sources.append(f"s3://models/data/{fmt}/{path.name}")
    report, out = validate(tmp_path, sources, clean={"dedup": "off"})
    c = report.splits["train"]
    assert (c.read, c.kept + c.cleaned, c.quarantined) == (40, 35, 5)
    fingerprint = source_fingerprint(sources[-1])  # a folder: its objects' ETags
    assert fingerprint.count("s3:") == 3  # state.json and two Arrow files
    (tmp_path / "empty.jsonl").write_bytes(b"")
    s3.put_object(Bucket="models", Key="data/empty.jsonl", Body=b"")
    with pytest.raises(DataError, match=r"s3://models/data/empty.jsonl is empty"):
        validate(tmp_path, ["s3://models/data/empty.jsonl"])


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_a_compressed_file_cut_short_is_named_as_damaged(tmp_path, fmt):
    path = write_records(tmp_path, "train", fmt, RECORDS * 50)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=rf"{path}:? cannot be decompressed.*damaged or cut short"):
        validate(tmp_path, [str(path)])


def test_a_stray_nul_byte_is_one_bad_line_not_a_binary_file(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(GOOD.encode() + b'{"instruction": "a\x00", "output":')
    report, out = validate(tmp_path, [str(tmp_path / "train.jsonl")])
    assert report.splits["train"].reasons == {"not_json": 1}
    assert report.splits["train"].kept == 5
