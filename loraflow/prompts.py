"""Prompt templates: one function renders a prompt for training, evaluation and inference alike,
so what the model was trained on is exactly what it is asked at serving time."""

from __future__ import annotations

from typing import Literal

from transformers import PreTrainedTokenizerBase

Template = Literal["chat", "alpaca"]

# The guide's layout (its section 4), kept byte for byte.
ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n"


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, template: Template, instruction: str, input: str
) -> str:
    """The text the model sees before its answer."""
    if template == "alpaca":
        return ALPACA.format(instruction=instruction, input=input)
    if not tokenizer.chat_template:
        raise ValueError(
            "template 'chat' needs a tokenizer with a chat template; this one has none. "
            "Fix: set data.template=alpaca."
        )
    content = f"{instruction}\n\n{input}" if input else instruction
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, template: Template, prompt: str) -> list[int]:
    """Token ids of a rendered prompt: a chat template writes its own special tokens, the
    alpaca layout gets whatever the tokenizer adds by default (Llama: BOS)."""
    return tokenizer(prompt, add_special_tokens=template == "alpaca")["input_ids"]
