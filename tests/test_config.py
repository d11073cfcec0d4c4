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


def test_the_align_stage_trains_with_its_own_kto_weights_and_the_sft_runs_other_settings():
    """align.training sets only what differs from train (the KTO weights too: a hand mapping
    of AlignConfig onto TrainConfig used to drop them, so align's KTO ran with train's)."""
    cfg = load_config(ROOT / "configs" / "preference.yaml", [
        "align.training.objective=kto", "align.training.preference.kto_desirable_weight=2.5",
        "align.training.preference.kto_undesirable_weight=0.5", "train.precision=bf16",
        "train.preference.beta=0.3", "train.spike_patience=3"])
    aligned = cfg.align.train_config(cfg.train)
    assert (aligned.preference.kto_desirable_weight,
            aligned.preference.kto_undesirable_weight) == (2.5, 0.5)
    assert aligned.preference.beta == 0.1  # configs/preference.yaml's align value
    assert aligned.objective == "kto" and cfg.align.objective == "kto"
    assert (aligned.max_steps, aligned.learning_rate) == (16, 3e-4)  # the shipped align stage
    assert (aligned.precision, aligned.spike_patience) == ("bf16", 3)  # the SFT run's
    assert cfg.train.objective == "sft" and cfg.train.preference.kto_desirable_weight == 1.0
    # unset, the align stage's own defaults; warmup at most a quarter of its steps
    default = PipelineConfig(align={}).align.train_config(cfg.train)
    assert (default.objective, default.max_steps, default.warmup_steps) == ("dpo", 30, 4)


def test_moved_keys_are_refused_with_their_replacement():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.beta=0.2", "train.nodes=2", "align.max_steps=5",
                           "align.kto_desirable_weight=2"])
    text = str(err.value)
    assert "train.beta: no longer here. Fix: " in text and "set train.preference.beta" in text
    assert "set launch.nodes" in text and "set align.training.max_steps" in text
    assert "set align.training.preference.kto_desirable_weight" in text
    with pytest.raises(ConfigError, match="align.training.objective=sft: the align stage"):
        load_config(None, ["align.training.objective=sft"])


def test_a_rule_across_sections_reads_as_one_sentence():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["launch.parallelism=fsdp", "train.precision=nf4"])
    assert "  - launch.parallelism=fsdp cannot use precision=nf4" in str(err.value)
    assert "<root>" not in str(err.value)


def test_one_vocabulary_for_precision_old_merge_dtypes_name_their_replacement():
    assert PipelineConfig().merge.dtype == "bf16"
    with pytest.raises(ConfigError, match=r"merge.dtype = 'bfloat16'.*bf16, not bfloat16 "
                                          r"\(Fix: merge.dtype=bf16\)"):
        load_config(None, ["merge.dtype=bfloat16"])


def test_the_shipped_sweep_config_searches_on_validation_losses_it_reports():
    cfg = load_config(ROOT / "configs" / "sweep.yaml")
    assert cfg.sweep is not None and cfg.sweep.objective == "val_loss"
    assert cfg.train.eval_every > 0 and cfg.sweep.pruner
    assert cfg.lora == PipelineConfig().lora  # only what the sweep searches differs


def test_a_sweep_config_reports_every_bad_parameter_at_once():
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=["train.eval_every=0", "sweep.sampler=grid",
                               "sweep.parameters={lora.r: [0, 8], train.seed: [1], "
                               "train.learning_rate: {low: 0.001, high: 0.01}}"])
    message = str(caught.value)
    assert "lora.r=0" in message and "'train.seed' cannot be searched" in message
    assert "sampler=grid needs a list of choices" in message


def test_the_pruner_needs_validation_losses_during_training():
    with pytest.raises(ConfigError, match="Fix: train.eval_every="):
        load_config(overrides=["sweep.n_trials=2"])
