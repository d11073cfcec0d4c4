"""Exports answer like the evaluated model, read back by runtimes loraflow did not write:
transformers' GGUF reader for the GGUF files, plain PEFT for the vLLM bundle, and llama.cpp
itself for the GGUF files (marker llamacpp: needs the extra loraflow[llamacpp]; .ci/run)."""

import json
import shutil
from pathlib import Path

import pytest
from tiny import make_adapter

from loraflow.config import EvalConfig, ExportConfig
from loraflow.data.prompts import PromptTemplate

CHAT = PromptTemplate(kind="chat")
OTHER_TEMPLATE = ("{% for message in messages %}{{ '### ' + message['role'] + ':\n' + "
                  "message['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}"
                  "{{ '### assistant:\n' }}{% endif %}")


@pytest.fixture(scope="module")
def evaluated(chatty_model_dir, tmp_path_factory):
    """The chatty tiny Llama with a chat-template adapter, merged and evaluated as the pipeline
    does: (merged dir, adapter dir, test sets, eval config, the evaluated result)."""
    return merged_and_evaluated(chatty_model_dir, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def text_evaluated(chatty_model_dir, tmp_path_factory):
    """`evaluated` from the chatty Llama made never to answer a byte token that is not UTF-8
    on its own (its tied embedding row zeroed: a logit of 0 never wins against ~380 random
    ones). A random model answers such bytes often; transformers shows one as U+FFFD while
    llama-cpp-python drops it and generates past max_tokens to complete it, so those answers
    would differ in text while the tokens agree (seen here: 5 of 6, every one of that kind)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("export-text")
    tokenizer = AutoTokenizer.from_pretrained(chatty_model_dir)
    model = AutoModelForCausalLM.from_pretrained(chatty_model_dir)
    lone_bytes = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    assert 100 < len(lone_bytes) < 200  # the 128 bytes >= 0x80, and pieces of them
    with torch.no_grad():
        model.get_input_embeddings().weight[lone_bytes] = 0.0
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return merged_and_evaluated(root / "base", root)


def merged_and_evaluated(model_dir: Path, root: Path):
    from loraflow.evaluation.evaluate import load_sets
    from loraflow.release.merge import merge_and_evaluate

    adapter = make_adapter(model_dir, root / "adapter", template="chat")
    data = Path(__file__).resolve().parents[1] / "data" / "orders" / "test.jsonl"
    test = root / "test.jsonl"
    test.write_text("".join(data.read_text().splitlines(keepends=True)[:6]))
    cfg = EvalConfig(max_new_tokens=8, batch_size=6)
    sets = load_sets(cfg, test)
    _, tuned, _ = merge_and_evaluate(model_dir, adapter, root / "merged", sets, CHAT, cfg, "fp32")
    return root / "merged", adapter, sets, cfg, tuned


def export(evaluated, out: Path, formats: list[str], merged: Path | None = None,
           llama_cpp: str = "off"):
    """export_version as the task calls it; llama.cpp off unless asked, so the tests without
    the marker read the same whether or not the extra is installed."""
    from loraflow.release.exports import export_version

    merged_dir, adapter, sets, cfg, tuned = evaluated
    return export_version(merged or merged_dir, adapter, out,
                          ExportConfig(formats=formats, llama_cpp=llama_cpp), sets, cfg, tuned,
                          "tiny")


def test_each_export_read_back_by_another_runtime_answers_like_the_evaluated_model(
    evaluated, tmp_path
):
    formats = ["gguf-f16", "gguf-q8_0", "vllm"]
    reports = {r.check.format: r.check for r in export(evaluated, tmp_path, formats)}
    assert reports["gguf-f16"].answers == 6
    assert reports["gguf-f16"].agreement == 1.0 and reports["gguf-f16"].passed
    assert "GGUF reader" in reports["gguf-f16"].runtime
    assert reports["vllm"].agreement == 1.0
    assert "AutoPeftModelForCausalLM" in reports["vllm"].runtime
    # q8_0 rounds every weight: on a random model (near-ties everywhere) half the answers
    # flip (measured: 3 of 6); the gate reads the rate against its own, lower, bar
    q8 = reports["gguf-q8_0"]
    assert q8.answers == 6 and q8.passed == (q8.agreement >= q8.min_agreement == 0.8)
    assert set(reports["gguf-f16"].files) == {"tiny-f16.gguf", "Modelfile"}
    assert reports["gguf-q8_0"].files["tiny-q8_0.gguf"] < reports["gguf-f16"].files["tiny-f16.gguf"]


def test_answers_evaluated_in_another_arithmetic_are_made_again_here_as_the_reference(
    evaluated, tmp_path
):
    """In a deployment the merge is evaluated on a GPU worker (bf16) and the exports are checked
    on a CPU worker (fp32): near-ties round apart there without any fault of the export. The
    merged model then answers here first and is what the exports are compared with. Planted:
    answers recorded as made in bf16 on cuda, every one of them wrong; the f16 export still
    agrees with the merged model answered here, and the same wrong answers said to be made here
    are taken as they are (and disagree)."""
    merged_dir, adapter, sets, cfg, tuned = evaluated
    wrong = tuned.model_copy(deep=True)
    for examples in wrong.examples.values():
        for example in examples:
            example["answer"] = "not what the model says"
    elsewhere = wrong.model_copy(update={"device": "cuda", "dtype": "bf16"})
    here = export((merged_dir, adapter, sets, cfg, elsewhere), tmp_path / "a", ["gguf-f16"])
    assert here[0].check.agreement == 1.0
    taken = export((merged_dir, adapter, sets, cfg, wrong), tmp_path / "b", ["gguf-f16"])
    assert taken[0].check.agreement == 0.0


def test_the_gguf_file_carries_the_trained_chat_template_and_stop_ids(evaluated, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    merged_dir = evaluated[0]
    export(evaluated, tmp_path, ["gguf-f16"])
    reader = gguf.GGUFReader(tmp_path / "gguf-f16" / "tiny-f16.gguf")
    trained = AutoTokenizer.from_pretrained(merged_dir)
    assert reader.fields["tokenizer.chat_template"].contents() == trained.chat_template
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == trained.eos_token_id
    assert reader.fields["general.architecture"].contents() == "llama"
    # llama.cpp's name for GPT-2's split (its model is "gpt2"; a "gpt2" pre-tokenizer is
    # refused on load, which only llama.cpp itself showed: transformers' reader ignores it)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    modelfile = (tmp_path / "gguf-f16" / "Modelfile").read_text()
    assert "FROM ./tiny-f16.gguf" in modelfile
    assert f'PARAMETER stop "{trained.eos_token}"' in modelfile
    # TEMPLATE is the trained template's own layout around the prompt
    before, _, rest = modelfile.partition('TEMPLATE """')[2].partition("{{ .Prompt }}")
    rendered = trained.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert rendered == before + "hi" + rest.partition('"""')[0]


def test_an_export_with_another_chat_template_fails_its_parity_check(evaluated, tmp_path):
    planted = tmp_path / "planted"
    shutil.copytree(evaluated[0], planted)
    (planted / "chat_template.jinja").write_text(OTHER_TEMPLATE)
    [report] = export(evaluated, tmp_path / "out", ["gguf-f16"], merged=planted)
    assert not report.check.passed and report.check.agreement < 0.95
    assert report.parity.differing == 6 - round(report.check.agreement * 6)

    # ... and blocks a promotion the paired test allowed, naming the export
    from loraflow.evaluation.gate import GateDecision, with_exports
    from loraflow.release.registry import decision_tags

    allowed = GateDecision(promote=True, verdict="promoted: exact_match +0.500 against base "
                           "model", metric="exact_match", set_name="test",
                           reference_name="base model", primary=None)
    blocked = with_exports(allowed, [report.check])
    assert not blocked.promote and blocked.failed_exports == ["gguf-f16"]
    assert blocked.verdict.startswith("not promoted (export gguf-f16 answered ")
    assert "export.min_agreement 0.95" in blocked.verdict
    assert blocked.verdict.endswith("exact_match +0.500 against base model")
    tags = decision_tags(blocked, blocked.verdict)
    assert tags["loraflow.export.gguf-f16.agreement"] == f"{report.check.agreement:.6g}"
    assert tags["loraflow.gate.failed_exports"] == "gguf-f16"
    assert with_exports(allowed, []).promote


def test_a_gguf_export_of_a_model_trained_without_a_chat_template_is_refused_at_config():
    from loraflow.config import PipelineConfig

    with pytest.raises(ValueError, match="export.formats=\\[vllm\\]"):
        PipelineConfig.model_validate({"data": {"template": "alpaca"}})
    PipelineConfig.model_validate({"data": {"template": "alpaca"},
                                   "export": {"formats": ["vllm"]}})


def test_the_vllm_bundle_names_its_base_and_the_serve_command(evaluated, tmp_path):
    from loraflow.release.vllm_bundle import write_bundle

    _, adapter, *_ = evaluated
    bundle = write_bundle(adapter, tmp_path / "vllm", "tiny", 8)
    config = json.loads((bundle / "adapter_config.json").read_text())
    lineage = json.loads((adapter / "loraflow.json").read_text())
    assert config["base_model_name_or_path"] == lineage["base_path"]
    readme = (bundle / "README.md").read_text()
    assert (f"vllm serve {lineage['base_path']} --enable-lora --lora-modules tiny=$PWD "
            "--max-lora-rank 8") in readme
    assert '"temperature": 0' in readme


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning",
                            "ignore:Setting `save_embedding_layers`:UserWarning")
def test_the_vllm_lint_refuses_modules_to_save_and_embedding_deltas(evaluated, tmp_path):
    from loraflow.release.vllm_bundle import VllmLintError, write_bundle

    _, adapter, *_ = evaluated
    saving = tmp_path / "saving"
    shutil.copytree(adapter, saving)
    config = json.loads((saving / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    (saving / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(VllmLintError, match="modules_to_save"):
        write_bundle(saving, tmp_path / "out", "tiny", 8)
    assert not (tmp_path / "out").exists()

    embedding = make_adapter(evaluated[0], tmp_path / "emb", targets=("q_proj", "embed_tokens"))
    with pytest.raises(VllmLintError, match="embed_tokens"):
        write_bundle(embedding, tmp_path / "out", "tiny", 8)


def test_a_template_servers_cannot_reproduce_is_refused_with_the_fix(evaluated, tmp_path):
    from loraflow.release.gguf_export import ExportError, write_gguf

    with pytest.raises(ExportError, match="data.template=chat"):
        write_gguf(evaluated[0], tmp_path / "x.gguf", "gguf-f16", PromptTemplate(kind="alpaca"),
                   "tiny")


def test_without_llama_cpp_the_run_says_it_skipped_that_check_and_how_to_run_it(monkeypatch):
    from loraflow.release import exports
    from loraflow.release.gguf_export import ExportError

    monkeypatch.setattr(exports, "llama_cpp_version", lambda: None)
    greedy = EvalConfig()
    note = exports.llama_cpp_skipped(ExportConfig(), greedy)
    assert note.startswith("the llama.cpp check of the GGUF exports was skipped "
                           "(llama-cpp-python is not installed)")
    assert "pip install 'loraflow[llamacpp]'" in note and "export.llama_cpp=off" in note
    assert not exports.llama_cpp_runs(ExportConfig(), greedy)  # a note, not an error
    # nothing to say where nothing asked for it
    assert exports.llama_cpp_skipped(ExportConfig(llama_cpp="off"), greedy) is None
    assert exports.llama_cpp_skipped(ExportConfig(formats=["vllm"]), greedy) is None
    with pytest.raises(ExportError, match="export.llama_cpp=required, but llama-cpp-python is "
                       "not installed. Fix: pip install 'loraflow\\[llamacpp\\]'"):
        exports.llama_cpp_runs(ExportConfig(llama_cpp="required"), greedy)


def test_the_summary_shows_each_runtime_of_a_format_and_the_skipped_note():
    from loraflow.artifacts import ExportCheck
    from loraflow.summary import sft_lines

    def check(via, agreement):
        return ExportCheck(format="gguf-f16", via=via, agreement=agreement, min_agreement=0.95,
                           answers=64, runtime=via or "transformers GGUF reader",
                           files={"m.gguf": 270_900_000}, write_seconds=1.0, check_seconds=2.0)

    summary = {"model_name": "m", "model_version": "1", "aliases": [], "gate": "promoted",
               "storage_uri": "file:///s", "metrics": {"base": {}, "tuned": {}},
               "exports": [check(None, 1.0).model_dump(), check("llama.cpp", 0.96875).model_dump()],
               "export_notes": ["the llama.cpp check ... was skipped"]}
    lines = sft_lines(summary)
    assert "  gguf-f16               1.000   0.950    270.9  transformers GGUF reader" in lines
    assert "  gguf-f16/llama.cpp     0.969   0.950    270.9  llama.cpp" in lines
    assert lines[-1] == "  note: the llama.cpp check ... was skipped"


# llama.cpp itself: the GGUF file alone, its own chat template and stop ids, as llama-server and
# Ollama use it. Opt in: pytest -m llamacpp (needs pip install -e '.[llamacpp]'; .ci/run).


@pytest.mark.llamacpp
def test_llama_cpp_answers_each_gguf_export_like_the_evaluated_model(text_evaluated, tmp_path):
    from loraflow.evaluation.gate import GateDecision, with_exports
    from loraflow.release.registry import decision_tags

    reports = export(text_evaluated, tmp_path, ["gguf-f16", "gguf-q8_0"], llama_cpp="required")
    checks = {r.check.name: r.check for r in reports}
    assert list(checks) == ["gguf-f16", "gguf-f16/llama.cpp", "gguf-q8_0",
                            "gguf-q8_0/llama.cpp"]
    f16 = checks["gguf-f16/llama.cpp"]
    assert f16.runtime == "llama.cpp (llama-cpp-python 0.3.36)" and f16.answers == 6
    # the tiny model's answers are not one degenerate string repeated: agreeing means something
    answers = [row["answer"] for row in text_evaluated[4].examples["test"]]
    assert len(set(answers)) == 6 and all(answers)
    assert f16.agreement == 1.0 and f16.passed, reports[1].parity.examples
    assert f16.files == checks["gguf-f16"].files  # the same file, answered by another runtime
    # q8_0 rounds every weight (and llama.cpp the activations too): on a random model near-ties
    # flip; measured 3 of 6 in both runtimes. The gate reads the rate against q8_0's bar.
    q8 = checks["gguf-q8_0/llama.cpp"]
    assert q8.answers == 6 and q8.passed == (q8.agreement >= q8.min_agreement == 0.8)
    # the gate and the version's tags carry every runtime of every format
    allowed = GateDecision(promote=True, verdict="promoted: exact_match +0.500 against base "
                           "model", metric="exact_match", set_name="test",
                           reference_name="base model", primary=None)
    decided = with_exports(allowed, list(checks.values()))
    tags = decision_tags(decided, decided.verdict)
    assert tags["loraflow.export.gguf-f16/llama.cpp.agreement"] == "1"
    assert tags["loraflow.export.gguf-q8_0/llama.cpp.agreement"] == f"{q8.agreement:.6g}"
    assert decided.promote == all(c.passed for c in checks.values())


@pytest.mark.llamacpp
def test_llama_cpp_renders_with_the_files_own_template_and_a_wrong_one_blocks_promotion(
    text_evaluated, tmp_path
):
    """Planted: another chat template written into the export. llama.cpp, which renders with
    the template in the file, answers otherwise; the check fails and the version is not
    promoted, the verdict naming gguf-f16/llama.cpp."""
    from loraflow.evaluation.gate import GateDecision, with_exports
    from loraflow.release.exports import llama_cpp_answers
    from loraflow.release.registry import decision_tags

    planted = tmp_path / "planted"
    shutil.copytree(text_evaluated[0], planted)
    (planted / "chat_template.jinja").write_text(OTHER_TEMPLATE)
    reports = export(text_evaluated, tmp_path / "out", ["gguf-f16"], merged=planted,
                     llama_cpp="required")
    checks = {r.check.name: r.check for r in reports}
    in_llama_cpp = checks["gguf-f16/llama.cpp"]
    assert in_llama_cpp.agreement < 0.95 and not in_llama_cpp.passed

    # the answers really changed with the template: the right file, answered the same way,
    # agrees on every prompt, and the planted one differs on most
    right = export(text_evaluated, tmp_path / "right", ["gguf-f16"], llama_cpp="required")
    assert right[1].check.agreement == 1.0
    sets, cfg = text_evaluated[2], text_evaluated[3]
    wrong = llama_cpp_answers(tmp_path / "out" / "gguf-f16" / "tiny-f16.gguf", sets, cfg, 400)[0]
    good = llama_cpp_answers(tmp_path / "right" / "gguf-f16" / "tiny-f16.gguf", sets, cfg, 400)[0]
    changed = sum(w["answer"] != g["answer"]
                  for w, g in zip(wrong.examples["test"], good.examples["test"], strict=True))
    assert changed == 6 - round(in_llama_cpp.agreement * 6) >= 4

    allowed = GateDecision(promote=True, verdict="promoted: exact_match +0.500 against base "
                           "model", metric="exact_match", set_name="test",
                           reference_name="base model", primary=None)
    blocked = with_exports(allowed, list(checks.values()))
    assert not blocked.promote and "gguf-f16/llama.cpp" in blocked.failed_exports
    assert "export gguf-f16/llama.cpp answered " in blocked.verdict
    assert "(llama.cpp (llama-cpp-python 0.3.36))" in blocked.verdict
    tags = decision_tags(blocked, blocked.verdict)
    assert "gguf-f16/llama.cpp" in tags["loraflow.gate.failed_exports"].split(",")
