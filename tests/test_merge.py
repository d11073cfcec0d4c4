"""Merging: lineage is checked first, the merged model answers like base + adapter, and the
saved directory is a plain transformers model in the requested precision."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from tiny import make_adapter, make_base
from transformers import AutoModelForCausalLM

from loraflow.base_model import load_model, load_tokenizer
from loraflow.data.prompts import PromptTemplate
from loraflow.release.lineage import LINEAGE_FILE, LineageError
from loraflow.release.merge import MergeError, _compare, _greedy, _with_logits, merge_adapter

ALPACA = PromptTemplate(kind="alpaca")  # what make_adapter records
PROMPTS = ["Say hello.", "List three colours.", "Extract the order: 2 mugs to Oslo."]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("merge") / "adapter")


def test_float32_merge_reproduces_base_plus_adapter_and_loads_as_plain_transformers(
    adapter, tiny_model_dir, tmp_path
):
    out = tmp_path / "merged"
    report = merge_adapter(tiny_model_dir, adapter, out, "fp32", PROMPTS, 8)
    assert report.check.passed and report.check.identical_outputs == 3
    assert report.check.max_logit_diff < 1e-4
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("adapter_*"))  # a standalone model, no PEFT files

    merged = AutoModelForCausalLM.from_pretrained(out)
    reference = PeftModel.from_pretrained(load_model(tiny_model_dir), adapter)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        diff = (merged(ids).logits - reference(ids).logits).abs().max()
    assert diff < 1e-4

    lineage = json.loads((out / LINEAGE_FILE).read_text())
    assert lineage["merge"]["check"]["identical_outputs"] == 3
    assert lineage["merge"]["dtype"] == "fp32" and lineage["base_files"]


def test_bfloat16_merge_saves_bfloat16_weights(adapter, tiny_model_dir, tmp_path):
    report = merge_adapter(tiny_model_dir, adapter, tmp_path / "m", "bf16", PROMPTS[:1], 4)
    assert report.check.passed
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}


def test_a_wrong_base_stops_the_merge_before_anything_is_saved(adapter, tmp_path):
    other = make_base(tmp_path / "other", hidden=32)
    with pytest.raises(LineageError, match="different base"):
        merge_adapter(other, adapter, tmp_path / "merged", "fp32", PROMPTS, 4)
    assert not (tmp_path / "merged").exists()


def test_an_adapter_trained_on_a_4bit_base_merges_onto_the_unquantized_base_when_asked(
    tiny_model_dir, tmp_path
):
    """merge.onto=original merges anywhere; the default (the nf4 weights it learned against)
    needs bitsandbytes on a GPU, and says so without saving anything."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "qlora", base_quantization="nf4")
    report = merge_adapter(tiny_model_dir, adapter, tmp_path / "m", "fp32", PROMPTS[:1], 4,
                           onto="original")
    assert "nf4-quantized base; merged onto the unquantized fp32 weights" in report.note
    lineage = json.loads((tmp_path / "m" / LINEAGE_FILE).read_text())
    assert lineage["merge"]["base_quantization"] == "nf4"
    if not torch.cuda.is_available():
        fix = "on a CUDA GPU.*none is here.*Fix: .*merge.onto=original"
        with pytest.raises(MergeError, match=fix):
            merge_adapter(tiny_model_dir, adapter, tmp_path / "m2", "fp32", PROMPTS[:1], 4)
        assert not (tmp_path / "m2").exists()


def test_a_base_stored_quantized_is_refused_with_the_fix(adapter, tiny_model_dir, tmp_path):
    quantized = shutil.copytree(tiny_model_dir, tmp_path / "bnb")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="stores quantized weights.*Fix: point model.base"):
        merge_adapter(quantized, adapter, tmp_path / "m", "fp32", PROMPTS, 4)


def test_the_check_fails_a_merge_that_changed_the_answers(adapter, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = PeftModel.from_pretrained(load_model(tiny_model_dir), adapter).eval()
    prompts = [torch.tensor(tokenizer(p)["input_ids"]) for p in PROMPTS]
    reference = [_with_logits(model, _greedy(model, tokenizer, p, 8)) for p in prompts]
    broken = load_model(tiny_model_dir)  # a merge that lost the adapter's delta
    check = _compare(broken, tokenizer, prompts, reference, 8, "fp32")
    assert not check.passed and check.identical_outputs < 3 and check.max_logit_diff > 0.1


@pytest.mark.gpu
def test_a_qlora_adapter_merges_onto_the_nf4_weights_it_learned_against_on_gpu(tmp_path):
    """On a GPU with bitsandbytes: LoRA saved from a 4-bit NF4 base (loaded as training loads
    it), merged by default onto those NF4 weights dequantized to bf16: the merged model answers
    like the quantized base + adapter it was trained as, closer than the same adapter merged
    onto the unquantized weights (merge.onto=original), and its files hold no quantization."""
    pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from peft import LoraConfig, get_peft_model

    from loraflow.base_model import quantization_config
    from loraflow.hashing import sha256_tree
    from loraflow.release.lineage import adapter_manifest

    base = make_base(tmp_path / "base", hidden=256)
    quantized = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.bfloat16, device_map={"": 0},
        quantization_config=quantization_config("nf4", torch.bfloat16))
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    model = get_peft_model(
        quantized, LoraConfig(r=4, lora_alpha=8, target_modules=lora["target_modules"])
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # as after training
    adapter = tmp_path / "qlora"
    model.save_pretrained(adapter)
    manifest = adapter_manifest(
        base, "tiny", sha256_tree(base), lora=lora, train={}, data_sha256="0" * 64,
        template={"kind": "alpaca", "jinja": None}, chat_template=None, base_quantization="nf4",
    )  # fmt: skip
    manifest.write(adapter)

    report = merge_adapter(base, adapter, tmp_path / "merged", "bf16", PROMPTS, 8)
    assert report.device == "cuda" and report.check.passed
    assert report.base_quantization == "nf4"
    assert "merged onto those nf4 weights dequantized to bf16" in report.note
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merge_adapter(base, adapter, tmp_path / "original", "bf16", PROMPTS, 8, onto="original")

    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]], device="cuda")
    gaps = {}
    with torch.no_grad():
        trained = model.eval()(ids).logits.float()
        for name in ("merged", "original"):
            merged = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.bfloat16)
            gaps[name] = (merged.cuda()(ids).logits.float() - trained).abs().max().item()
    assert gaps["merged"] < gaps["original"], gaps
    assert gaps["merged"] < 0.5, gaps  # bf16 rounding of the merged weights only


@pytest.fixture(scope="module")
def chatty_adapter(chatty_model_dir, tmp_path_factory) -> Path:
    return make_adapter(chatty_model_dir, tmp_path_factory.mktemp("chatty") / "adapter")


def heldout(small_data):
    from loraflow.config import EvalConfig
    from loraflow.evaluation.evaluate import load_sets

    cfg = EvalConfig(max_new_tokens=8, batch_size=4)
    return load_sets(cfg, small_data["test"]), cfg


def test_the_merged_model_is_evaluated_and_checked_against_base_plus_adapter_answers(
    chatty_model_dir, chatty_adapter, small_data, tmp_path
):
    from loraflow.release.merge import merge_and_evaluate

    sets, cfg = heldout(small_data)
    out = tmp_path / "merged"
    report, tuned, reference = merge_and_evaluate(
        chatty_model_dir, chatty_adapter, out, sets, ALPACA, cfg, "fp32"
    )
    assert (tuned.label, reference.label) == ("tuned", "adapter")
    assert report.parity.answers == 4 and report.parity.differing == 0 and report.parity.passed
    assert tuned.dtype == reference.dtype == report.parity.reference_dtype == "fp32"
    assert [r["answer"] for r in tuned.examples["test"]] == [
        r["answer"] for r in reference.examples["test"]
    ]
    # what was scored is what was saved: the saved files give the same answers
    from loraflow.evaluation.evaluate import ModelSource, evaluate

    again = evaluate(ModelSource(path=out), sets, ALPACA, cfg, label="tuned")
    assert [r["answer"] for r in again.examples["test"]] == [
        r["answer"] for r in tuned.examples["test"]
    ]
    lineage = json.loads((out / LINEAGE_FILE).read_text())
    assert lineage["merge"]["parity"]["differing"] == 0
    assert "examples" not in lineage["merge"]["parity"]


def test_the_pipelines_merge_takes_the_base_a_quantized_adapter_learned_against(
    chatty_model_dir, small_data, tmp_path
):
    """merge_and_evaluate (the pipeline's merge step) loads the base as merge_adapter does: for
    an nf4-trained adapter, by default the nf4 weights dequantized (bitsandbytes on a GPU; here
    the error with the fix, nothing saved), with merge.onto=original the unquantized weights.
    Before, it merged onto the unquantized weights whatever merge.onto said."""
    from loraflow.release.merge import merge_and_evaluate

    adapter = make_adapter(chatty_model_dir, tmp_path / "qlora", base_quantization="nf4")
    sets, cfg = heldout(small_data)
    report, _, _ = merge_and_evaluate(chatty_model_dir, adapter, tmp_path / "m", sets, ALPACA,
                                      cfg, "fp32", max_differing=1.0, onto="original")
    assert "nf4-quantized base; merged onto the unquantized fp32 weights" in report.note
    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="on a CUDA GPU.*none is here.*merge.onto=original"):
            merge_and_evaluate(chatty_model_dir, adapter, tmp_path / "m2", sets, ALPACA, cfg,
                               "fp32", max_differing=1.0)
        assert not (tmp_path / "m2").exists()


def test_on_cpu_the_merged_model_is_saved_in_its_dtype_and_answers_as_cpu_scores_any_model(
    chatty_model_dir, chatty_adapter, small_data, tmp_path
):
    """Saved in bf16; scored from those bf16 weights in fp32 arithmetic, as evaluate_champion
    and the export checks score a model on CPU, so one model has one score on this device."""
    from loraflow.evaluation.evaluate import ModelSource, evaluate
    from loraflow.release.merge import merge_and_evaluate

    sets, cfg = heldout(small_data)
    report, tuned, reference = merge_and_evaluate(
        chatty_model_dir, chatty_adapter, tmp_path / "m", sets, ALPACA, cfg, "bf16",
        max_differing=1.0,
    )
    assert reference.dtype == tuned.dtype == "fp32"  # no CUDA here
    assert report.parity.reference_dtype == "fp32"
    again = evaluate(ModelSource(path=tmp_path / "m"), sets, ALPACA, cfg, label="champion")
    assert [e["answer"] for e in again.examples["test"]] == \
        [e["answer"] for e in tuned.examples["test"]]
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118


def test_a_merge_that_lost_the_adapter_is_refused_with_the_differing_answers(
    chatty_model_dir, chatty_adapter, small_data, tmp_path, monkeypatch
):
    from loraflow.release.merge import merge_and_evaluate

    # a merge that lost the delta: the LoRA layers removed, nothing folded in
    monkeypatch.setattr(PeftModel, "merge_and_unload", lambda self: self.unload(), raising=False)
    sets, cfg = heldout(small_data)
    with pytest.raises(MergeError, match=r"[34] of 4 test answers differ.*Nothing was saved"):
        merge_and_evaluate(chatty_model_dir, chatty_adapter, tmp_path / "m", sets, ALPACA, cfg,
                           "fp32")
    assert not (tmp_path / "m").exists()


@pytest.mark.gpu
def test_on_a_gpu_both_answer_in_bfloat16_from_one_load(
    chatty_model_dir, chatty_adapter, small_data, tmp_path
):
    if not torch.cuda.is_available() or not torch.cuda.is_bf16_supported():
        pytest.skip("needs a CUDA GPU with bf16")
    from loraflow.evaluation.evaluate import ModelSource, evaluate
    from loraflow.release.merge import merge_and_evaluate

    sets, cfg = heldout(small_data)
    report, tuned, reference = merge_and_evaluate(
        chatty_model_dir, chatty_adapter, tmp_path / "m", sets, ALPACA, cfg, "bf16",
        max_differing=1.0,
    )
    assert report.device == "cuda" and tuned.device == reference.device == "cuda"
    assert reference.dtype == tuned.dtype == "bf16"
    base = evaluate(ModelSource(path=chatty_model_dir), sets, ALPACA, cfg, label="base")
    assert (base.device, base.dtype) == ("cuda", "bf16")
