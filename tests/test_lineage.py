"""The lineage manifest stops an adapter from being loaded on a base it was not trained on,
naming what differs, before PEFT fails with a tensor-shape error."""

import json
import shutil
from pathlib import Path

import pytest
from peft import PeftModel
from tiny import make_adapter, make_base
from transformers import AutoTokenizer

from loraflow.base_model import load_model
from loraflow.release.lineage import LINEAGE_FILE, LineageError, check_adapter_matches_base


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


def test_the_manifest_records_base_files_tokenizer_lora_and_versions(adapter, tiny_model_dir):
    manifest = json.loads((adapter / LINEAGE_FILE).read_text())
    assert set(manifest["base_files"]) == {"model.safetensors"}
    assert len(manifest["base_files"]["model.safetensors"]) == 64
    assert manifest["base_config"]["hidden_size"] == 64
    assert manifest["base_config"]["vocab_size"] == len(
        AutoTokenizer.from_pretrained(tiny_model_dir)
    )
    assert manifest["chat_template_sha256"] and len(manifest["tokenizer_sha256"]) == 64
    assert manifest["lora"]["r"] == 4 and manifest["base_quantization"] == "none"
    assert {"torch", "transformers", "peft"} <= set(manifest["libraries"])
    assert manifest["code_version"]
    # and the right base passes
    assert (
        check_adapter_matches_base(adapter, tiny_model_dir).base_model == manifest["base_model"]
    )


def test_a_base_with_another_hidden_size_is_named_before_peft_fails(adapter, tmp_path):
    other = make_base(tmp_path / "wider", hidden=32)
    with pytest.raises(RuntimeError, match="size mismatch"):  # what users saw without the check
        PeftModel.from_pretrained(load_model(other), adapter)
    with pytest.raises(LineageError) as err:
        check_adapter_matches_base(adapter, other)
    message = str(err.value)
    assert "different base: hidden_size is 32" in message and "trained on 64" in message
    assert "tensor shape(s) differ" in message and "Fix:" in message


def test_a_base_with_the_same_shapes_but_other_weights_is_refused(adapter, tmp_path):
    other = make_base(tmp_path / "reseeded", seed=7)
    with pytest.raises(LineageError, match=r"different base: the weight files of .* are not those"):
        check_adapter_matches_base(adapter, other)


def test_a_base_with_another_vocabulary_is_refused(adapter, tmp_path):
    other = make_base(tmp_path / "more-tokens", extra_tokens=8)
    with pytest.raises(LineageError) as err:
        check_adapter_matches_base(adapter, other)
    assert "different vocabulary: the base has" in str(err.value)
    assert "tokenizer files hash to" in str(err.value)


def test_a_different_rank_or_target_modules_is_named(adapter, tiny_model_dir, tmp_path):
    with pytest.raises(
        LineageError, match=r"different rank: adapter_config.json has r=4, the config says r=8"
    ):
        check_adapter_matches_base(
            adapter, tiny_model_dir, {"r": 8, "target_modules": ["q_proj", "v_proj"]}
        )
    with pytest.raises(
        LineageError, match=r"different target modules: .* the config says \['k_proj'"
    ):
        check_adapter_matches_base(
            adapter, tiny_model_dir, {"r": 4, "target_modules": ["k_proj", "q_proj"]}
        )

    # adapter files edited behind the manifest's back: config says r=8, tensors have r=4
    tampered = shutil.copytree(adapter, tmp_path / "tampered")
    config = json.loads((tampered / "adapter_config.json").read_text())
    (tampered / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load_model(tiny_model_dir), tampered)
    with pytest.raises(LineageError) as err:
        check_adapter_matches_base(tampered, tiny_model_dir)
    assert "different rank: adapter_config.json has r=8, its manifest says r=4" in str(err.value)
    assert "lora_A.weight has rank 4" in str(err.value)


def test_an_adapter_module_the_base_lacks_is_named(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", targets=("gate_proj",))
    # a base where the MLP has another name: rename the tensors in its weight file
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_model_dir / "model.safetensors")
    renamed = {k.replace("gate_proj", "w1"): v for k, v in weights.items()}
    other = shutil.copytree(tiny_model_dir, tmp_path / "renamed")
    save_file(renamed, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        LineageError, match=r"different target modules: 2 adapted module\(s\) do not exist"
    ):
        check_adapter_matches_base(adapter, other)


def test_an_adapter_without_a_manifest_is_refused_with_the_fix(adapter, tiny_model_dir, tmp_path):
    bare = shutil.copytree(adapter, tmp_path / "bare")
    (bare / LINEAGE_FILE).unlink()
    with pytest.raises(LineageError, match="has no loraflow.json.*Fix:"):
        check_adapter_matches_base(bare, tiny_model_dir)


def test_a_manifest_reads_as_typed_fields_and_writes_back_the_same_json(adapter, tmp_path):
    from loraflow.release.lineage import read_manifest

    lineage = read_manifest(adapter)
    assert lineage.lora["r"] == 4 and lineage.template.kind == "alpaca"
    assert lineage.tokenize is None and lineage.merge is None  # no stage added them
    lineage.write(tmp_path)
    assert (tmp_path / LINEAGE_FILE).read_text() == (adapter / LINEAGE_FILE).read_text()


def test_an_older_manifest_still_loads_and_keeps_the_keys_it_does_not_know(adapter, tmp_path):
    """Stored manifests (format 2) from before the template record and before base_source:
    the template's kind and text as two keys, and a key this version does not know."""
    from loraflow.data.prompts import PromptTemplate
    from loraflow.release.lineage import read_manifest

    old = json.loads((adapter / LINEAGE_FILE).read_text())
    old = {k: v for k, v in old.items() if k not in ("base_source", "base_path")}
    old |= {"template": "jinja", "prompt_template": "{{ instruction }}", "made_by": "v0.1"}
    (tmp_path / LINEAGE_FILE).write_text(json.dumps(old))
    lineage = read_manifest(tmp_path)
    assert lineage.template == PromptTemplate(kind="jinja", jinja="{{ instruction }}")
    assert lineage.base_source is None and lineage.base_files == old["base_files"]
    (tmp_path / "merged").mkdir()
    lineage.updated(merged_dtype="float32").write(tmp_path / "merged")
    written = json.loads((tmp_path / "merged" / LINEAGE_FILE).read_text())
    assert written["made_by"] == "v0.1" and written["merged_dtype"] == "float32"
    assert "merge" not in written and "sft_parent" not in written
