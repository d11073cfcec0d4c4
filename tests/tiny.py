"""Builders of tiny random bases and adapters for tests that need more than conftest's one."""

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loraflow.base_model import load_model
from loraflow.hashing import sha256_tree
from loraflow.release.lineage import adapter_manifest

ASSETS = Path(__file__).parent / "assets"


def make_base(path: Path, seed: int = 0, hidden: int = 64, extra_tokens: int = 0) -> Path:
    """A tiny random Llama like the conftest one; hidden size, seed and vocabulary vary."""
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    if extra_tokens:
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapter(
    base: Path,
    out: Path,
    r: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    template: str = "alpaca",  # the kind of a chat or alpaca PromptTemplate
    base_quantization: str = "none",
) -> Path:
    """A LoRA adapter with non-zero B (as after training) and its lineage manifest."""
    torch.manual_seed(1)
    model = get_peft_model(
        load_model(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets))
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(out)
    manifest = adapter_manifest(
        base,
        base.name,
        sha256_tree(base),
        lora={"r": r, "alpha": 2 * r, "target_modules": list(targets)},
        train={"max_steps": 1},
        data_sha256="0" * 64,
        template={"kind": template, "jinja": None},
        chat_template=None,
        base_quantization=base_quantization,
    )
    manifest.write(out)
    return out
