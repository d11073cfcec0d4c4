from pathlib import Path

import pytest

from loraflow.config import ConfigError, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_default_config_is_valid_and_matches_the_built_in_defaults():
    assert load_config(ROOT / "configs" / "default.yaml") == PipelineConfig()


def test_overrides_are_parsed_as_yaml_and_validated():
    cfg = load_config(
        None,
        [
            "train.max_steps=7",
            "lora.target_modules=[q_proj, k_proj]",
            "storage.root=s3://bucket/models",
        ],
    )
    assert cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.storage.root == "s3://bucket/models"


def test_every_problem_is_reported_at_once_with_field_value_and_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n  learning_rate: -1\ndata:\n  template: fancy\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "train.max_stepz: unknown key" in message and "max_steps" in message  # what exists
    assert "train.learning_rate = -1" in message
    assert "data.template = 'fancy'" in message and "'chat', 'alpaca' or 'jinja'" in message
    assert str(bad) in message


def test_missing_config_file_and_bad_override_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["train.max_steps"])


def test_storage_root_must_name_a_scheme():
    with pytest.raises(ConfigError, match="file:// or s3://"):
        load_config(None, ["storage.root=/tmp/models"])


def test_data_sources_take_one_path_or_several_and_template_choices_are_checked(tmp_path):
    cfg = load_config(None, ["data.train=[a.jsonl, s3://bucket/b.jsonl]", "data.test=t.jsonl"])
    assert cfg.data.train == ["a.jsonl", "s3://bucket/b.jsonl"] and cfg.data.test == ["t.jsonl"]
    with pytest.raises(ConfigError, match="template=jinja needs jinja_template"):
        load_config(None, ["data.template=jinja"])
    with pytest.raises(ConfigError, match=r"unknown name\(s\) \['question'\]"):
        load_config(None, ["data.columns={question: q}"])
