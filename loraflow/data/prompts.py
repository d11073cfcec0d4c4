"""Prompt templates: one function renders a prompt for training, evaluation and inference alike,
so what the model was trained on is exactly what it is asked at serving time. For a
conversation, `assistant_spans` finds where each earlier assistant turn lies in that same
prompt, from the template's own rendering, so that training can learn those turns too.

A template is a typed record: its kind ("chat": the model's own chat template, "alpaca": the
guide's layout, "jinja": a user template) and, for "jinja", the template's source text. That
record is what tokenization records, what the adapter's and the merged model's loraflow.json keep,
and what evaluation, the merge check, `loraflow generate` and the served model render with.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, model_validator
from transformers import PreTrainedTokenizerBase

from loraflow.data.records import Example

TemplateKind = Literal["chat", "alpaca", "jinja"]


class PromptTemplate(BaseModel, frozen=True):
    """How a prompt is laid out: one record, so the kind is never mistaken for the text."""

    kind: TemplateKind = "chat"
    jinja: str | None = None  # the Jinja source, for kind "jinja" only

    @model_validator(mode="after")
    def _jinja_text(self) -> PromptTemplate:
        if (self.kind == "jinja") != (self.jinja is not None):
            raise ValueError("a jinja template carries its source text; chat and alpaca none")
        return self

    @classmethod
    def recorded(cls, manifest: dict[str, Any]) -> PromptTemplate:
        """The template in a loraflow.json; models registered before the record existed kept
        the kind in "template" and the text in "prompt_template"."""
        recorded = manifest["template"]
        if isinstance(recorded, dict):
            return cls.model_validate(recorded)
        if recorded in ("chat", "alpaca"):
            return cls(kind=recorded)
        return cls(kind="jinja", jinja=manifest["prompt_template"])

# The guide's layout (its section 4), kept byte for byte.
ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n"
_PROBE = "\x00loraflow-content\x00"


def prompt_template(kind: TemplateKind, jinja_file: Path | None = None) -> PromptTemplate:
    """The template record for a config: its kind, and the Jinja file's text for "jinja"."""
    if kind != "jinja":
        return PromptTemplate(kind=kind)
    if jinja_file is None or not Path(jinja_file).is_file():
        raise ValueError(
            f"data.jinja_template {jinja_file} does not exist. Fix: point it at a Jinja file."
        )
    source = Path(jinja_file).read_text(encoding="utf-8")
    _compile(source)  # fail now, naming the file, rather than at the first example
    return PromptTemplate(kind="jinja", jinja=source)


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


def render_example(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, example: Example
) -> str:
    """The text the model sees before its answer."""
    if template.kind == "alpaca":
        history = "".join(f"{m['role']}: {m['content']}\n\n" for m in example.messages or [])
        return ALPACA.format(instruction=history + example.instruction, input=example.input)
    if template.kind == "chat":
        if not tokenizer.chat_template:
            raise ValueError(
                "template 'chat' needs a tokenizer with a chat template; this one has none. "
                "Fix: set data.template=alpaca."
            )
        return tokenizer.apply_chat_template(
            chat_messages(example), tokenize=False, add_generation_prompt=True
        )
    return _compile(template.jinja).render(
        instruction=example.instruction,
        input=example.input,
        messages=chat_messages(example),
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
    )


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, instruction: str, input: str
) -> str:
    return render_example(
        tokenizer, template, Example(instruction=instruction, input=input, output="")
    )


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, prompt: str
) -> list[int]:
    """Token ids of a rendered prompt: chat and Jinja templates write their own special tokens,
    the alpaca layout gets whatever the tokenizer adds by default (Llama: BOS)."""
    return tokenizer(prompt, add_special_tokens=template.kind == "alpaca")["input_ids"]


def prompt_renderer(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate
) -> Callable[[Example], str]:
    """render_example for many examples. A chat template is rendered once around a marker and
    reused as prefix + content + suffix when two probes show that is exact; the slow path
    (one Jinja render per example) stays for templates that transform the content and for
    multi-turn examples."""
    if template.kind != "chat":
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


class TurnTemplateError(ValueError):
    """The template cannot be used as asked; the message names it and says the fix."""


def _marker(i: int) -> str:
    return f"\x02loraflow-turn-{i}\x03"


def special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text of the tokenizer's special tokens, longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if t.special}
    return sorted((n for n in names if n), key=len, reverse=True)


def turn_end(text: str, at: int, specials: list[str]) -> int:
    """Where an assistant turn whose content ends at `at` ends: after the special token the
    template writes next (its end-of-turn token, maybe after whitespace), else at `at`."""
    after = at + len(text[at:]) - len(text[at:].lstrip(" \t\r\n"))
    token = next((s for s in specials if text.startswith(s, after)), None)
    return after + len(token) if token is not None else at


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, example: Example,
    prompt: str, turn_ends: list[str] | None = None,
) -> list[tuple[int, int]]:
    """[start, end) character spans, in `prompt` (= render_example of the example), of each
    earlier assistant turn's content and the end-of-turn token that follows it (one of
    `turn_ends`, default: any special token). Found by
    rendering the example again with each assistant content replaced by a marker: the
    template's own layout, so any template works that writes the contents unchanged; one that
    changes them (trims, drops or rewrites earlier turns' content) is a TurnTemplateError. A turn
    the template does not render at all has no span."""
    messages = example.messages or []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        return []
    marked = example.model_copy(update={"messages": [
        {"role": m["role"], "content": _marker(i)} if i in turns else m
        for i, m in enumerate(messages)
    ]})  # fmt: skip
    text = render_example(tokenizer, template, marked)
    rebuilt, spans, pos = [], [], 0
    for i in turns:
        at = text.find(_marker(i), pos)
        if at < 0:
            continue
        if text.count(_marker(i)) != 1:
            raise _changed(template, "writes an assistant turn's content more than once")
        rebuilt.append(text[pos:at])
        start = sum(map(len, rebuilt))
        rebuilt.append(messages[i]["content"])
        spans.append((start, start + len(messages[i]["content"])))
        pos = at + len(_marker(i))
    rebuilt.append(text[pos:])
    if "".join(rebuilt) != prompt:
        raise _changed(template, "changes the content of earlier assistant turns (it trims, "
                       "drops or rewrites them)")
    ends = special_strings(tokenizer) if turn_ends is None else turn_ends
    return [(start, turn_end(prompt, end, ends)) for start, end in spans]


def _changed(template: PromptTemplate, what: str) -> TurnTemplateError:
    shown = template.kind
    if template.kind == "chat":
        shown = "the tokenizer's chat template"
    elif template.jinja is not None:
        shown = f"jinja {template.jinja[:400]!r}"
    return TurnTemplateError(
        f"the prompt template {what}, so the earlier assistant turns cannot be found in the "
        f"prompt the model is trained and served with. Template: {shown}. Fix: "
        "data.train_on=last_turn (learn the final answer only), or a template that writes "
        "each message's content as it is."
    )
