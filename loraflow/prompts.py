"""Prompt templates: one function renders a prompt for training, evaluation and inference alike,
so what the model was trained on is exactly what it is asked at serving time.

A template is named by a string: "chat" (the model's own chat template), "alpaca" (the guide's
layout) or the source text of a user Jinja template. That string is what tokenization records,
what the adapter's loraflow.json keeps and what evaluation renders with.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Literal

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import PreTrainedTokenizerBase

from loraflow.data import Example

Template = Literal["chat", "alpaca", "jinja"]

# The guide's layout (its section 4), kept byte for byte.
ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n"
_PROBE = "\x00loraflow-content\x00"


def prompt_template(kind: Template, jinja_file: Path | None = None) -> str:
    """The template string for a config: "chat", "alpaca", or the Jinja file's text."""
    if kind != "jinja":
        return kind
    if jinja_file is None or not Path(jinja_file).is_file():
        raise ValueError(
            f"data.jinja_template {jinja_file} does not exist. Fix: point it at a Jinja file."
        )
    source = Path(jinja_file).read_text(encoding="utf-8")
    _compile(source)  # fail now, naming the file, rather than at the first example
    return source


@lru_cache(maxsize=8)
def _compile(source: str):  # noqa: ANN202 - a jinja2 Template
    try:  # sandboxed: a template from a data file must not reach Python internals
        env = ImmutableSandboxedEnvironment(keep_trailing_newline=True, undefined=StrictUndefined)
        return env.from_string(source)
    except TemplateError as exc:
        raise ValueError(f"the Jinja prompt template does not compile: {exc}") from exc


def chat_messages(example: Example) -> list[dict[str, str]]:
    content = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
    return [*(example.messages or []), {"role": "user", "content": content}]


def render_example(tokenizer: PreTrainedTokenizerBase, template: str, example: Example) -> str:
    """The text the model sees before its answer."""
    if template == "alpaca":
        history = "".join(f"{m['role']}: {m['content']}\n\n" for m in example.messages or [])
        return ALPACA.format(instruction=history + example.instruction, input=example.input)
    if template == "chat":
        if not tokenizer.chat_template:
            raise ValueError(
                "template 'chat' needs a tokenizer with a chat template; this one has none. "
                "Fix: set data.template=alpaca."
            )
        return tokenizer.apply_chat_template(
            chat_messages(example), tokenize=False, add_generation_prompt=True
        )
    return _compile(template).render(
        instruction=example.instruction,
        input=example.input,
        messages=chat_messages(example),
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
    )


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, template: str, instruction: str, input: str
) -> str:
    return render_example(
        tokenizer, template, Example(instruction=instruction, input=input, output="")
    )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, template: str, prompt: str) -> list[int]:
    """Token ids of a rendered prompt: chat and Jinja templates write their own special tokens,
    the alpaca layout gets whatever the tokenizer adds by default (Llama: BOS)."""
    return tokenizer(prompt, add_special_tokens=template == "alpaca")["input_ids"]


def prompt_renderer(tokenizer: PreTrainedTokenizerBase, template: str) -> Callable[[Example], str]:
    """render_example for many examples. A chat template is rendered once around a marker and
    reused as prefix + content + suffix when two probes show that is exact; the slow path
    (one Jinja render per example) stays for templates that transform the content and for
    multi-turn examples."""
    if template != "chat":
        return lambda example: render_example(tokenizer, template, example)
    marked = render_example(tokenizer, template, Example(instruction=_PROBE, output=""))
    if marked.count(_PROBE) != 1:
        return lambda example: render_example(tokenizer, template, example)
    prefix, suffix = marked.split(_PROBE)
    probes = [
        Example(instruction="Probe  one.", output=""),
        Example(instruction=" Two ", input="lines\n\nand {{ braces }} ", output=""),
    ]
    if any(
        render_example(tokenizer, template, p) != prefix + chat_messages(p)[-1]["content"] + suffix
        for p in probes
    ):
        return lambda example: render_example(tokenizer, template, example)

    def fast(example: Example) -> str:
        if example.messages:
            return render_example(tokenizer, template, example)
        return prefix + chat_messages(example)[-1]["content"] + suffix

    return fast
