import json
import random
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from loraflow.config import DataConfig
from loraflow.data.cleaning import FOLD, fold, strip_html
from loraflow.data.records import DataError, read_jsonl
from loraflow.data.validation import REASONS, validate_splits

ASSETS = Path(__file__).parent / "assets"
GOOD = {"instruction": "Extract the order.", "input": "3 x AB-100 for Ann", "output": '{"sku": 1}'}


def line(**fields) -> bytes:
    return json.dumps(GOOD | fields).encode() + b"\n"


def config(**fields) -> DataConfig:
    clean = fields.pop("clean", {})
    return DataConfig.model_validate(fields | {"clean": clean})


def validate(tmp_path: Path, train: bytes, cfg: DataConfig | None = None, **splits: bytes):
    tmp_path.mkdir(parents=True, exist_ok=True)
    sources = {}
    for split, raw in {"train": train, **splits}.items():
        (tmp_path / f"{split}.jsonl").write_bytes(raw)
        sources[split] = [str(tmp_path / f"{split}.jsonl")]
    out = tmp_path / "out"
    cfg = cfg or config()
    counter = None
    if cfg.clean.min_output_tokens:
        tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
        counter = lambda texts: [len(t) for t in tok(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    report = validate_splits(sources, out, cfg, count_tokens=counter, progress=False)
    for split, c in report.splits.items():  # every line is accounted for, in every test
        assert c.read == c.blank + c.kept + c.cleaned + c.quarantined
        assert sum(c.reasons.values()) == c.quarantined
        assert len(list(read_jsonl(out / f"{split}.jsonl"))) == c.kept + c.cleaned
    return report, out


def test_valid_lines_are_kept_as_is_and_written_out(tmp_path):
    report, out = validate(tmp_path, line() + line(input="2 x CD-1") + line(input="9 x Q"))
    c = report.splits["train"]
    assert (c.read, c.kept, c.cleaned, c.quarantined) == (3, 3, 0, 0)
    assert [e.input for e in read_jsonl(out / "train.jsonl")][1] == "2 x CD-1"
    report.check(out)  # passes


def test_bom_crlf_blank_lines_and_extra_keys_are_tolerated(tmp_path):
    one = json.dumps(GOOD | {"source": "web"}).encode()
    two = json.dumps(GOOD | {"input": "other"}).encode()
    report, _ = validate(tmp_path, b"\xef\xbb\xbf" + one + b"\r\n\r\n  \n" + two + b"\r\n")
    c = report.splits["train"]
    assert (c.read, c.blank, c.kept, c.quarantined) == (4, 2, 2, 0)


# one line that triggers each quarantine reason (after a good first line), and the config
QUARANTINED = {
    "invalid_utf8": (b'{"instruction": "\xff", "output": "y"}', {}),
    "too_long": (line(input="x" * 2000).strip(), {"max_line_bytes": 1024}),
    "not_json": (b'{"instruction": "x", "output": ', {}),
    "not_object": (b"[1, 2]", {}),
    "unknown_shape": (b'{"question": "q", "answer": "a"}', {}),
    "preference_record": (b'{"prompt": "q", "chosen": "a", "rejected": "b"}', {}),
    "missing_field": (b'{"instruction": "x", "input": ""}', {}),
    "wrong_type": (b'{"instruction": "x", "output": 5}', {}),
    "empty": (line(output="   ").strip(), {}),
    "too_short": (line(input="other", output="ok").strip(), {"clean": {"min_output_tokens": 3}}),
    "instruction_like_input": (line(input="extract the ORDER").strip(), {}),
    "duplicate": (line().strip(), {}),
    "near_duplicate": (line(input="3 X ab-100, for ann!").strip(), {}),
}


@pytest.mark.parametrize("reason", sorted(QUARANTINED))
def test_each_bad_line_is_quarantined_byte_for_byte_with_file_line_and_reason(tmp_path, reason):
    bad, fields = QUARANTINED[reason]
    report, out = validate(tmp_path, line() + bad + b"\r\n", config(**fields))
    c = report.splits["train"]
    assert c.reasons == {reason: 1} and c.kept + c.cleaned == 1
    assert (out / "quarantine" / "train.jsonl").read_bytes() == bad + b"\r\n"
    row = (out / "quarantine" / "train.tsv").read_text().splitlines()[1].split("\t")
    assert row[:4] == ["1", str(tmp_path / "train.jsonl"), "2", reason]
    assert report.problems[0].startswith(f"{tmp_path / 'train.jsonl'}:2: ")


def test_every_reason_has_a_test():
    assert set(QUARANTINED) | {"leak"} == set(REASONS)


def test_a_validation_example_seen_in_training_is_a_leak(tmp_path):
    leaked = line(input="3 x ab-100 for ann.", output="different")
    report, out = validate(tmp_path, line(), validation=line(input="new") + leaked)
    assert report.splits["validation"].reasons == {"leak": 1}
    assert (out / "quarantine" / "validation.jsonl").read_bytes() == leaked
    off, _ = validate(tmp_path / "off", line(), config(clean={"leakage": False}), validation=leaked)
    assert off.splits["validation"].quarantined == 0


@pytest.mark.parametrize(
    ("rule", "clean", "raw", "cleaned"),
    [
        ("strip_html", {"strip_markup": "html"}, "<p>Tom &amp; <b>Ann</b></p>", "Tom & Ann"),
        (
            "strip_markdown",
            {"strip_markup": "html+markdown"},
            "## Note\n**bold** and *it* [link](http://x) `code`",
            "Note\nbold and it link code",
        ),
        (
            "normalize_punctuation",
            {},
            "\u201cyes\u201d \u2014 it\u2019s 1\u20132",
            '"yes" - it\'s 1-2',
        ),
        ("trim_whitespace", {}, "  padded \n", "padded"),
    ],
)
def test_each_cleaning_rule_changes_the_text_and_is_counted_and_switchable(
    tmp_path, rule, clean, raw, cleaned
):
    report, out = validate(tmp_path, line(output=raw), config(clean=clean))
    c = report.splits["train"]
    assert c.cleaned == 1 and c.kept == 0 and c.rules == {rule: 1}
    assert next(read_jsonl(out / "train.jsonl")).output == cleaned

    off = {"strip_markup": "none", "normalize_punctuation": False, "trim_whitespace": False}
    report, out = validate(tmp_path / "off", line(output=raw), config(clean=off))
    assert report.splits["train"].kept == 1 and report.splits["train"].rules == {}
    assert next(read_jsonl(out / "train.jsonl")).output == raw


def test_cleaning_rules_and_dedup_can_be_switched_off(tmp_path):
    off = config(clean={"dedup": "off", "instruction_like_input": None})
    report, _ = validate(tmp_path, line() + line() + line(input="Extract the order"), off)
    assert report.splits["train"].quarantined == 0
    exact = config(clean={"dedup": "exact"})
    report, _ = validate(tmp_path / "e", line() + line(input="3 X AB-100 for Ann"), exact)
    assert report.splits["train"].quarantined == 0


def reworded(words: int, seed: int, change: int | None = None) -> bytes:
    """An example with a long input; `change`: the same with that one word replaced."""
    rng = random.Random(seed)
    text = [rng.choice(["ship", "box", "red", "blue", "order", "late", "soon", "gift", "note",
                        "paid", "card", "city", "road", "fast"]) + str(rng.randint(0, 99))
            for _ in range(words)]  # fmt: skip
    if change is not None:
        text[change] = "CHANGED"
    return line(input=" ".join(text))


@pytest.mark.parametrize("chunk", [2048, 2])  # the copy in the same chunk, and in a later one
def test_minhash_quarantines_a_copy_with_a_word_changed_naming_the_first(
    tmp_path, monkeypatch, chunk
):
    monkeypatch.setattr("loraflow.data.validation.CHUNK", chunk)
    raw = reworded(80, 1) + reworded(30, 2) + reworded(30, 3) + reworded(80, 1, change=40)
    report, out = validate(tmp_path, raw, config(clean={"dedup": "minhash"}))
    c = report.splits["train"]
    assert (c.kept, c.reasons) == (3, {"near_duplicate": 1})
    row = (out / "quarantine" / "train.tsv").read_text().splitlines()[1].split("\t")
    assert row[2:4] == ["4", "near_duplicate"]
    assert f"near duplicate of {tmp_path / 'train.jsonl'}:1" in row[4]
    # folded equality alone does not see it; a threshold above its similarity keeps it
    for clean in ({"dedup": "near"}, {"dedup": "minhash", "near_threshold": 0.99}):
        report, _ = validate(tmp_path / str(len(clean)), raw, config(clean=clean))
        assert report.splits["train"].quarantined == 0


def test_chat_messages_prompt_completion_and_mapped_columns_are_read(tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    raw = (
        json.dumps(chat) + "\n" + json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n"
    ).encode()
    report, out = validate(tmp_path, raw)
    first, second = read_jsonl(out / "train.jsonl")
    assert (first.instruction, first.output) == ("Hi", "Hello")
    assert first.messages == [{"role": "system", "content": "Be brief."}]
    assert (second.instruction, second.input, second.output) == ("2+2?", "", "4")

    mapped = config(columns={"instruction": "question", "output": "answer"})
    report, out = validate(tmp_path / "m", b'{"question": "Why?", "answer": "Because."}\n', mapped)
    assert next(read_jsonl(out / "train.jsonl")).output == "Because."


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "Hi"}], "the last of 'messages' must be the assistant"),
        ([{"role": "robot", "content": "x"}], "messages[0].role must be one of"),
        ("hello", "must be a non-empty list"),
    ],
)
def test_malformed_chat_records_are_quarantined_with_what_is_wrong(tmp_path, messages, expected):
    report, _ = validate(tmp_path, line() + json.dumps({"messages": messages}).encode() + b"\n")
    assert expected in report.problems[0]


def test_zero_usable_examples_fail_clearly(tmp_path):
    report, out = validate(tmp_path, b"oops\n[]\n")
    with pytest.raises(DataError) as err:
        report.check(out)
    message = str(err.value)
    assert "train: no usable examples (2 lines read)" in message
    assert (
        "train.jsonl:1: not JSON" in message and "train.jsonl:2: expected a JSON object" in message
    )
    assert "quarantine/<split>.jsonl" in message and '"instruction"' in message  # the fix


def test_kept_fraction_under_the_threshold_fails_and_over_it_passes(tmp_path):
    raw = line() + line(input="b") + line(input="c") + b"broken\n"
    report, out = validate(tmp_path, raw, config(min_kept_fraction=0.8))
    with pytest.raises(DataError, match=r"kept 3 of 4 lines \(75.0%\)"):
        report.check(out)
    report, out = validate(tmp_path / "ok", raw, config(min_kept_fraction=0.75))
    report.check(out)


def test_content_hash_follows_the_cleaned_bytes_not_the_path(tmp_path):
    a, _ = validate(tmp_path / "a", line())
    b, _ = validate(tmp_path / "b", line())
    c, _ = validate(tmp_path / "c", line(output='{"sku":1}'))
    d, _ = validate(tmp_path / "d", line(output=' {"sku": 1}'))  # trimmed to the same example
    assert a.sha256 == b.sha256 == d.sha256 != c.sha256
    assert a.source_sha256 != d.source_sha256


def test_missing_files_fail_before_anything_is_read(tmp_path):
    with pytest.raises(DataError, match="absent.jsonl does not exist"):
        validate_splits({"train": [str(tmp_path / "absent.jsonl")]}, tmp_path, config())


def test_several_files_and_s3_objects_make_one_split(tmp_path, s3_env, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    boto3.client("s3", endpoint_url=s3_env).put_object(
        Bucket="models", Key="data/part2.jsonl", Body=line(input="from s3") + b"nope\n"
    )
    (tmp_path / "part1.jsonl").write_bytes(line())
    sources = {"train": [str(tmp_path / "part1.jsonl"), "s3://models/data/part2.jsonl"]}
    report = validate_splits(sources, tmp_path / "out", config(), progress=False)
    c = report.splits["train"]
    assert (c.read, c.kept, c.quarantined) == (3, 2, 1)
    assert report.problems[0].startswith("s3://models/data/part2.jsonl:2: not JSON")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
records = st.fixed_dictionaries(
    {},
    optional={
        "instruction": st.text(max_size=20) | json_values,
        "input": st.text(max_size=20) | json_values,
        "output": st.text(max_size=20) | json_values,
        "messages": json_values,
        "prompt": st.text(max_size=10),
        "completion": st.text(max_size=10),
    },
)
lines = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")),
    json_values.map(lambda v: json.dumps(v).encode()),
    records.map(lambda r: json.dumps(r, ensure_ascii=False).encode()),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    train=st.lists(lines, max_size=12),
    validation=st.lists(lines, max_size=4),
    dedup=st.sampled_from(["near", "minhash"]),
)
def test_arbitrary_bytes_and_json_never_crash_and_every_line_is_counted(
    tmp_path_factory, train, validation, dedup
):
    tmp = tmp_path_factory.mktemp("prop")
    cfg = config(min_kept_fraction=0.0, clean={"dedup": dedup})
    try:
        report, out = validate(tmp, b"\n".join(train), cfg, validation=b"\r\n".join(validation))
    except DataError as exc:  # a whole file diagnosed (empty, binary, ...), named, nothing read
        assert str(exc).startswith("data files cannot be read") and str(tmp) in str(exc)
        assert not (tmp / "out" / "train.jsonl").exists()
        return
    raw = b"\n".join(train)
    assert report.splits["train"].read == len(raw.split(b"\n")) - raw.endswith(b"\n") - (not raw)
    for split, c in report.splits.items():
        quarantined = (out / "quarantine" / f"{split}.jsonl").read_bytes()
        assert quarantined.count(b"\n") == c.quarantined


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(max_codepoint=127), max_size=40))
def test_folding_ascii_text_fast_equals_the_unicode_rules(text):
    # fold() takes a bytes.translate shortcut for ASCII; it must equal the general path
    expected = FOLD.sub(" ", unicodedata.normalize("NFKC", strip_html(text)).casefold()).strip()
    assert fold(text) == expected
