"""Preference data: every line accounted for, its own quarantine reasons, the wrong kind of
data stopped before training, and tokenized ids the engine reads back as pairs."""

from __future__ import annotations

import json

import pytest

from loraflow.config import DataConfig
from loraflow.data.preference import KTO, PAIRS, tokenize_preference_splits
from loraflow.data.prompts import PromptTemplate
from loraflow.data.records import DataError
from loraflow.data.tokenization import TokenizeSettings
from loraflow.data.validation import SFT, validate_splits

GOOD = [
    {"prompt": "Two mugs to Oslo.", "chosen": '{"qty": 2}', "rejected": '{"qty": "two"}'},
    {"instruction": "Extract the order.", "input": "three cups to Rome",
     "chosen": '{"qty": 3}', "rejected": '{"quantity": 3}'},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "One plate to Bergen."}],
     "chosen": [{"role": "assistant", "content": '{"qty": 1}'}], "rejected": '{"qty": "one"}'},
]


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


HELD_OUT = [{"prompt": "Four bowls to Paris.", "chosen": '{"qty": 4}', "rejected": "{}"},
            {"prompt": "Five forks to Turin.", "chosen": '{"qty": 5}', "rejected": "5"}]


def sources(tmp_path, train, validation=(), test=()):
    return {split: [str(write(tmp_path / "in" / f"{split}.jsonl", rows))]
            for split, rows in (("train", train), ("validation", validation or HELD_OUT[:1]),
                                ("test", test or HELD_OUT[1:]))}


def test_every_line_is_accounted_for_with_its_own_reasons(tmp_path):
    bad = [
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "  Yes. "},  # equal after trimming
        {"prompt": "Case?", "chosen": "Oslo", "rejected": "oslo"},  # case is a real mistake
        {"prompt": "Empty side", "chosen": "   ", "rejected": "no"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "Wrong type", "chosen": 3, "rejected": "b"},
        {"prompt": "Only one", "chosen": "a"},
        "not json",
        GOOD[0],  # a repeat
    ]
    out = tmp_path / "valid"
    report = validate_splits(sources(tmp_path, GOOD + bad + [""]), out,
                             DataConfig(min_kept_fraction=0.0), kind=PAIRS, progress=False)
    train = report.splits["train"]
    assert train.read == 12 and train.blank == 1 and train.usable == 4
    assert train.reasons == {"not_json": 1, "missing_field": 1, "wrong_type": 1, "empty": 1,
                             "empty_side": 1, "chosen_equals_rejected": 1, "duplicate": 1}
    assert train.usable + train.quarantined + train.blank == train.read
    tsv = (out / "quarantine" / "train.tsv").read_text().splitlines()
    assert len(tsv) == 1 + 7 and tsv[1].split("\t")[2] == "4"  # file line 4: chosen == rejected
    kept = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert kept[2]["messages"][-1]["content"] == "Hello" and kept[2]["chosen"] == '{"qty": 1}'
    assert kept[2]["instruction"] == "One plate to Bergen."
    report.check(out)  # min_kept_fraction 0: passes


def test_kto_records_need_a_boolean_label(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "label": True},
            {"prompt": "c", "completion": "d", "label": False},
            {"prompt": "e", "completion": "f", "label": "yes"},
            {"prompt": "g", "completion": "h", "label": 1}]
    report = validate_splits(
        sources(tmp_path, rows, validation=rows[:1], test=rows[1:2]), tmp_path / "v",
        DataConfig(min_kept_fraction=0.0, clean={"leakage": False}), kind=KTO, progress=False)
    assert report.splits["train"].reasons == {"label_not_boolean": 2}
    kept = (tmp_path / "v" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["desirable"] for line in kept] == [True, False]


def test_sft_data_given_as_preference_data_stops_naming_file_line_and_fix(tmp_path):
    rows = GOOD + [{"instruction": "x", "output": "y"}]
    report = validate_splits(sources(tmp_path, rows), tmp_path / "v",
                             DataConfig(min_kept_fraction=0.0), kind=PAIRS, progress=False)
    with pytest.raises(DataError) as err:
        report.check(tmp_path / "v")
    message = str(err.value)
    assert f"{tmp_path / 'in' / 'train.jsonl'}:4" in message
    assert "an SFT example" in message and "data.train" in message
    assert '"chosen"' in message  # the shapes a preference line must have


def test_preference_data_given_as_sft_data_stops_naming_file_line_and_fix(tmp_path):
    sft = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)]
    rows = sft + [GOOD[0]]  # one line in 31: under the kept-fraction bar, still a hard stop
    report = validate_splits(sources(tmp_path, rows, validation=sft[:1], test=sft[1:2]),
                             tmp_path / "v", DataConfig(clean={"leakage": False}),
                             progress=False)
    assert report.splits["train"].reasons == {"preference_record": 1}
    with pytest.raises(DataError) as err:
        report.check(tmp_path / "v")
    assert f"{tmp_path / 'in' / 'train.jsonl'}:31" in str(err.value)
    assert "align.train" in str(err.value)


def test_the_one_runner_rejects_the_same_faults_the_same_way_for_every_kind(tmp_path):
    """Decoding, dedup and leakage are the split runner's, not a kind's: an SFT file and a
    pairs file with the same faults on the same lines are quarantined alike."""
    sft = {"prompt": "Two mugs to Oslo.", "completion": '{"qty": 2}'}
    pair = {"prompt": "Two mugs to Oslo.", "chosen": '{"qty": 2}', "rejected": '{"qty": "two"}'}

    def faults(good: dict) -> list[bytes]:
        near = {k: v.upper().replace(".", "!") for k, v in good.items()}
        return [json.dumps(x).encode() for x in (good, good, near)] + [
            b'{"prompt": "\xff"}', b'{"prompt": ', b"[1, 2]",
            json.dumps(good | {"prompt": "x" * 2000}).encode()]

    rows = {}
    for kind, good in (("sft", sft), ("pairs", pair)):
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "train.jsonl").write_bytes(b"\n".join(faults(good)) + b"\n")
        leak = good | {k: "another answer" for k in ("completion", "chosen") if k in good}
        (folder / "validation.jsonl").write_text(json.dumps(leak) + "\n")
        splits = {s: [str(folder / f"{s}.jsonl")] for s in ("train", "validation")}
        config = DataConfig(min_kept_fraction=0.0, max_line_bytes=1024)
        report = validate_splits(splits, folder / "out", config,
                                 kind=PAIRS if kind == "pairs" else SFT, progress=False)
        assert report.splits["train"].usable == 1 and report.splits["validation"].usable == 0
        rows[kind] = [row.split("\t")[2:] for split in ("train", "validation") for row in
                      (folder / "out" / "quarantine" / f"{split}.tsv").read_text().splitlines()[1:]]
    assert [(line, reason) for line, reason, _ in rows["sft"]] == [
        ("2", "duplicate"), ("3", "near_duplicate"), ("4", "invalid_utf8"), ("5", "not_json"),
        ("6", "not_object"), ("7", "too_long"), ("1", "leak")]
    assert rows["sft"] == rows["pairs"]  # the same lines, reasons and details


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
@pytest.mark.parametrize("kind", [PAIRS, KTO], ids=["pairs", "kto"])
def test_columnar_preference_files_give_the_records_of_the_same_lines(tmp_path, fmt, kind):
    """Of a Parquet or Arrow file the kind's own columns are read (chosen, rejected, label):
    the same cleaned records and digest as the JSON lines (they were left out, so every
    record was quarantined)."""
    from dataformats import write_records

    pairs = GOOD[:2] + HELD_OUT
    rows = pairs if kind is PAIRS else [
        {"prompt": r.get("prompt") or r["instruction"], "completion": r["chosen"],
         "label": i % 2 == 0} for i, r in enumerate(pairs)]
    config = DataConfig(clean={"leakage": False})
    reports = {}
    for f in ("jsonl", fmt):
        path = write_records(tmp_path / f, "train", f, rows)
        reports[f] = validate_splits({"train": [str(path)]}, tmp_path / f / "out", config,
                                     kind=kind, progress=False)
    assert reports[fmt].splits["train"].usable == len(rows)
    assert reports[fmt].sha256 == reports["jsonl"].sha256
    assert (tmp_path / fmt / "out" / "train.jsonl").read_bytes() == (
        tmp_path / "jsonl" / "out" / "train.jsonl").read_bytes()


def test_pairs_tokenize_to_prompt_and_answer_ids_the_engine_reads_as_units(
    tmp_path, tiny_model_dir
):
    from loraflow.base_model import load_tokenizer
    from loraflow.data.records import Example
    from loraflow.data.tokenization import encode_example
    from loraflow.engine.batches import Unit, read_items

    alpaca = PromptTemplate(kind="alpaca")

    report = validate_splits(sources(tmp_path, GOOD), tmp_path / "v",
                             DataConfig(clean={"leakage": False}), kind=PAIRS, progress=False)
    report.check(tmp_path / "v")
    tokenizer = load_tokenizer(tiny_model_dir)
    tokens = tokenize_preference_splits(tmp_path / "v", tokenizer, alpaca,
                                        TokenizeSettings(max_length=512), tmp_path / "t",
                                        "pairs", progress=False)
    assert tokens.counts == {"train": 3, "validation": 1, "test": 1}
    units = read_items(tmp_path / "t", "train", "dpo")
    assert len(units) == 3 and all(isinstance(u, Unit) for u in units)
    # each side is exactly what SFT tokenization gives the same prompt and answer
    for unit, record in zip(units, GOOD[:2], strict=False):
        prompt = record.get("prompt") or record["instruction"]
        example = Example(instruction=prompt, input=record.get("input", ""),
                          output=record["chosen"])
        assert unit.examples[0] == encode_example(tokenizer, alpaca, example)[:2]
        rejected = example.model_copy(update={"output": record["rejected"]})
        assert unit.examples[1] == encode_example(tokenizer, alpaca, rejected)[:2]
    with pytest.raises(ValueError, match="holds pairs data but train.objective=sft"):
        read_items(tmp_path / "t", "train", "sft")
    with pytest.raises(ValueError, match="train.objective=kto"):
        read_items(tmp_path / "t", "train", "kto")


def test_preference_tokens_are_cached_like_sft_tokens_and_never_left_half_written(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The one cache of tokenized folders: reused on the same content key, and a run that
    fails leaves neither the folder nor its staging copy."""
    from loraflow.base_model import load_tokenizer
    from loraflow.data import preference
    from loraflow.data.preference import tokenize_preference_cached

    report = validate_splits(sources(tmp_path, GOOD), tmp_path / "v",
                             DataConfig(clean={"leakage": False}), kind=PAIRS, progress=False)
    report.check(tmp_path / "v")
    tokenizer, alpaca = load_tokenizer(tiny_model_dir), PromptTemplate(kind="alpaca")
    settings = TokenizeSettings(max_length=512)
    args = (tmp_path / "cache", tmp_path / "v", report.sha256, tokenizer, "tok", alpaca,
            settings)
    first, tokens, reused = tokenize_preference_cached(*args, "pairs", progress=False)
    assert not reused and tokens.counts["train"] == 3
    again, tokens2, reused = tokenize_preference_cached(*args, "pairs", progress=False)
    assert reused and again == first and tokens2 == tokens

    def fails(*_args, **_kwargs):
        raise OSError("the disk went away")

    monkeypatch.setattr(preference, "tokenize_preference_splits", fails)
    with pytest.raises(OSError, match="went away"):
        tokenize_preference_cached(*args, "kto", progress=False)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]


def test_sft_tokens_refused_by_a_preference_objective(tokenized):
    from loraflow.engine.batches import read_items

    with pytest.raises(ValueError, match="holds sft data but train.objective=dpo.*Fix"):
        read_items(tokenized, "train", "dpo")


def test_the_shipped_preference_config_loads_and_align_keys_are_checked():
    from pathlib import Path

    from loraflow.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "preference.yaml")
    assert cfg.align is not None and cfg.align.objective == "dpo"
    for split in ("train", "validation", "test"):
        assert all((root / p).is_file() for p in getattr(cfg.align, split))
    assert load_config(None).align is None  # off unless set
    with pytest.raises(ConfigError, match="align.objectiv: unknown key. Allowed here: train, "):
        load_config(None, ["align.objectiv=dpo"])
