"""A LoRA adapter as vLLM serves it: the adapter in PEFT layout whose adapter_config.json names
the base it was trained on (as the lineage records it), linted against what vLLM accepts, and a
README with the exact `vllm serve` command and a request body.

The bundle is loadable by plain PEFT alone (AutoPeftModelForCausalLM reads the base from
adapter_config.json): that is how its answers are checked where vLLM is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors import safe_open

from loraflow.data.prompts import PromptTemplate
from loraflow.evaluation.vllm_backend import MAX_LORA_RANKS, max_lora_rank
from loraflow.release.lineage import LINEAGE_FILE, Lineage, read_manifest

# Llama's LoRA-capable linear layers in vLLM: q/k/v packed as qkv_proj, gate/up as
# gate_up_proj (LlamaForCausalLM.packed_modules_mapping), o_proj, down_proj.
VLLM_LLAMA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj"})
BUNDLE_FILES = ("adapter_config.json", "adapter_model.safetensors", LINEAGE_FILE)


class VllmLintError(ValueError):
    """vLLM would refuse this adapter; the message lists every reason and the fix."""


def served_base(lineage: Lineage) -> str:
    """The base vLLM must load, as recorded: a hub id or directory as configured; for a base
    made from a GGUF file (package:..., *.gguf) the dequantized directory trained on, since
    the adapter learned against those weights, not the original checkpoint's."""
    source = lineage.base_source
    if source and not source.startswith("package:") and not source.endswith(".gguf"):
        return source
    if lineage.base_path is None:
        raise VllmLintError("the adapter's lineage records no base to serve it on")
    return lineage.base_path


def lint(bundle: Path) -> list[str]:
    """Why vLLM would refuse the adapter in `bundle` (vllm #9280, #3404); empty when it loads."""
    config = json.loads((Path(bundle) / "adapter_config.json").read_text(encoding="utf-8"))
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: vLLM loads LoRA deltas "
                        "only, not fully trained copies of modules")
    modules = _adapted_modules(Path(bundle))
    unsupported = sorted(modules - VLLM_LLAMA_MODULES)
    if unsupported:
        problems.append(f"target modules {unsupported} are not among vLLM's Llama LoRA modules "
                        f"({', '.join(sorted(VLLM_LLAMA_MODULES))}); embedding and lm_head "
                        "deltas included")
    if config.get("use_dora"):
        problems.append("use_dora: vLLM serves plain LoRA, not DoRA")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']}: vLLM loads no LoRA biases")
    if max_lora_rank(int(config.get("r", 0))) is None:
        problems.append(f"r={config.get('r')} is above vLLM's largest --max-lora-rank "
                        f"({MAX_LORA_RANKS[-1]})")
    return problems


def _adapted_modules(bundle: Path) -> set[str]:
    """The module names the saved weights adapt (what vLLM reads), not the config's pattern."""
    modules = set()
    with safe_open(str(bundle / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            stem = key.rsplit(".weight", 1)[0]
            for part in (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B"):
                stem = stem.removesuffix(part)
            modules.add(stem.rsplit(".", 1)[-1])
    return modules


def write_bundle(adapter_dir: Path, out_dir: Path, name: str, max_new_tokens: int) -> Path:
    """The adapter's files with adapter_config.json naming its served base, and README.md;
    refused (VllmLintError) when vLLM would refuse it."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    lineage = read_manifest(adapter_dir)
    base = served_base(lineage)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for file in BUNDLE_FILES:
        shutil.copy(adapter_dir / file, out_dir / file)
    config_file = out_dir / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    problems = lint(out_dir)
    if problems:
        shutil.rmtree(out_dir)
        raise VllmLintError(
            f"vLLM would refuse adapter {adapter_dir}:\n" + "\n".join(f"  - {p}" for p in problems)
            + "\nFix: train with lora.target_modules among vLLM's, no modules_to_save, "
            f"lora.r <= {MAX_LORA_RANKS[-1]}; or leave vllm out of export.formats.")
    (out_dir / "README.md").write_text(readme(lineage, base, config, name, max_new_tokens))
    return out_dir


def serve_command(base: str, name: str, rank: int) -> str:
    """Run in the bundle's folder ($PWD: vLLM takes the adapter's path)."""
    return (f"vllm serve {base} --enable-lora --lora-modules {name}=$PWD "
            f"--max-lora-rank {max_lora_rank(rank)}")


def request_body(name: str, template: PromptTemplate, max_new_tokens: int) -> dict[str, Any]:
    """An OpenAI-style request vLLM answers as evaluation did: greedy, the model's chat template
    for kind chat; for the alpaca / Jinja layouts the client sends the rendered prompt."""
    if template.kind == "chat":
        return {"model": name, "temperature": 0, "max_tokens": max_new_tokens,
                "messages": [{"role": "user", "content": "Extract the order as JSON.\n\n"
                              "2 mugs to Oslo"}]}
    return {"model": name, "temperature": 0, "max_tokens": max_new_tokens,
            "prompt": "<the prompt rendered with the template in loraflow.json>"}


def readme(lineage: Lineage, base: str, config: dict[str, Any], name: str,
           max_new_tokens: int) -> str:
    body = request_body(name, lineage.template, max_new_tokens)
    endpoint = "chat/completions" if "messages" in body else "completions"
    return f"""# {name}: LoRA adapter for vLLM

Trained by loraflow on base `{lineage.base_model}` (sha256 {lineage.base_sha256}); this
adapter learned against exactly those weights, so serve it on them:

    {base}

In this folder:

    {serve_command(base, name, int(config["r"]))}

Ask it (greedy, as it was evaluated):

    curl http://127.0.0.1:8000/v1/{endpoint} -H 'Content-Type: application/json' \\
      -d '{json.dumps(body)}'

Prompt template: {lineage.template.kind} (loraflow.json holds it). Rank r={config["r"]}, target
modules {sorted(config.get("target_modules") or [])}.
"""
