"""A merged Llama-architecture model as one GGUF file (llama.cpp, Ollama) and the Ollama
Modelfile beside it, written with the `gguf` package: weights (f16 or q8_0) under the tensor
names llama.cpp reads, the tokenizer, the chat template and the EOS / end-of-turn ids.

The chat template and the stop tokens are derived from the PromptTemplate the model was
trained with, never copied by hand, so a server renders the prompts the gate scored and stops
where training taught the model to stop. The inverse of base_model._from_gguf: transformers'
GGUF reader must give back the same model (tests/test_export.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraflow.data.prompts import PromptTemplate, special_strings, turn_end

GgufFormat = Literal["gguf-f16", "gguf-q8_0"]
# 2-D weights in the format's type; norms (1-D) stay f32 as llama.cpp's converter keeps them.
WEIGHT_TYPES = {"gguf-f16": gguf.GGMLQuantizationType.F16,
                "gguf-q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"gguf-f16": gguf.LlamaFileType.MOSTLY_F16,
              "gguf-q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_MARK = "\x02loraflow-answer\x03"


class ExportError(ValueError):
    """The model cannot be exported in this format; the message says why and the fix."""


def chat_template_of(template: PromptTemplate, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Jinja chat template a server must apply to render the prompts the model was trained
    and evaluated with. Servers pass only `messages`, so only kind "chat" has one."""
    if template.kind != "chat" or not tokenizer.chat_template:
        raise ExportError(
            f"a GGUF export carries the chat template a server renders prompts with; this model "
            f"was trained with data.template={template.kind}, which servers cannot reproduce "
            "from chat messages (the instruction and input are separate fields there). Fix: "
            "train with data.template=chat, or export.formats=[vllm] (the client sends the "
            "rendered prompt)."
        )
    return tokenizer.chat_template


def prompt_frame(tokenizer: PreTrainedTokenizerBase, chat_template: str) -> tuple[str, str]:
    """(text before, text after) the user's message in a one-turn prompt with the generation
    prompt: how the template lays out the prompts the test set asks."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                         add_generation_prompt=True, chat_template=chat_template)
    if text.count(_MARK) != 1:
        raise ExportError("the chat template does not write the user's message once as it is; "
                          "an Ollama TEMPLATE cannot be derived from it")
    before, after = text.split(_MARK)
    return before, after


def stop_tokens(tokenizer: PreTrainedTokenizerBase, chat_template: str) -> dict[str, int]:
    """The tokens generation must stop at: EOS, and the end-of-turn token the template writes
    after an assistant answer (what training taught the model to emit; ollama #8363 is a
    server that never stops because it did not know it)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}],
        tokenize=False, chat_template=chat_template)
    at = text.index(_MARK) + len(_MARK)
    end = text[at:turn_end(text, at, special_strings(tokenizer))].strip()
    stops = {tokenizer.eos_token: tokenizer.eos_token_id}
    if end and end in tokenizer.get_vocab():
        stops[end] = tokenizer.convert_tokens_to_ids(end)
    return stops


def write_gguf(merged_dir: Path, out_file: Path, fmt: GgufFormat, template: PromptTemplate,
               name: str) -> Path:
    """merged_dir (a transformers LlamaForCausalLM directory in safetensors) as one GGUF file."""
    merged_dir = Path(merged_dir)
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise ExportError(f"GGUF export writes the llama architecture; {merged_dir} is "
                          f"{config.get('model_type')!r}. Fix: export.formats=[vllm].")
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"rope scaling {rope.get('rope_type')!r} is not written yet; only "
                          "plain RoPE. Fix: export.formats=[vllm].")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    chat_template = chat_template_of(template, tokenizer)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    layers = config["num_hidden_layers"]

    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(FILE_TYPES[fmt])
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _add_tokenizer(writer, merged_dir, tokenizer, config["vocab_size"])
    writer.add_chat_template(chat_template)
    stops = stop_tokens(tokenizer, chat_template)
    if (end := list(stops.values())[-1]) != tokenizer.eos_token_id:
        writer.add_eot_token_id(end)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for hf_name, weights in _weights(merged_dir):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"tensor {hf_name} of {merged_dir} has no llama.cpp name")
        # llama.cpp's RoPE pairs q/k rows differently from transformers': its converter
        # permutes them, transformers' reader undoes it (LlamaTensorProcessor).
        if ".attn_q." in gguf_name:
            weights = _permute(weights, heads, heads)
        elif ".attn_k." in gguf_name:
            weights = _permute(weights, heads, kv_heads)
        if weights.ndim == 1:
            writer.add_tensor(gguf_name, weights.astype(np.float32))
        else:
            kind = WEIGHT_TYPES[fmt]
            writer.add_tensor(gguf_name, gguf.quants.quantize(weights, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out_file)  # a half-written file is never found under the final name
    return out_file


def _weights(merged_dir: Path):  # -> Iterator[tuple[str, np.ndarray]]
    files = sorted(merged_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{merged_dir} has no safetensors weights to export")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, f.get_tensor(key).float().numpy()


def _permute(weights: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute (the reader's _reverse_permute_weights)."""
    if heads != kv_heads:
        heads = kv_heads
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


# tokenizers' byte-level pre-tokenizers, as llama.cpp names the same splits (its
# tokenizer.ggml.pre): "gpt-2" is GPT-2's regex (hyphenated: "gpt2" is the tokenizer model's
# name, and llama.cpp refuses a file whose pre-tokenizer it does not know); "smollm" splits
# digits one by one first.
def _pre_tokenizer(spec: dict | None) -> str:
    def byte_level(step: dict) -> bool:
        return step.get("type") == "ByteLevel" and step.get("use_regex", True)

    if spec and byte_level(spec):
        return "gpt-2"
    steps = (spec or {}).get("pretokenizers", [])
    if (len(steps) == 2 and steps[0].get("type") == "Digits"
            and steps[0].get("individual_digits") and byte_level(steps[1])):
        return "smollm"
    raise ExportError(f"the tokenizer's pre-tokenizer {json.dumps(spec)[:300]} has no "
                      "llama.cpp name known here (gpt-2, smollm); a GGUF written with a guess "
                      "would split text unlike training. Fix: export.formats=[vllm].")


def _add_tokenizer(writer: gguf.GGUFWriter, merged_dir: Path,
                   tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """A byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer: tokens in the byte
    alphabet, merges, token types (control for special added tokens), special ids."""
    spec = json.loads((merged_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError("GGUF export writes byte-level BPE vocabularies (GPT-2, Llama 3, "
                          f"SmolLM); this one is {model.get('type')}. Fix: export.formats=[vllm].")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows the tokenizer never produces
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in model["vocab"].items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = (gguf.TokenType.CONTROL if added["special"]
                              else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    # What the tokenizer does to plain text: llama.cpp adds BOS when told to.
    adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(False)


def ollama_modelfile(gguf_file: str, tokenizer: PreTrainedTokenizerBase,
                     template: PromptTemplate, max_new_tokens: int) -> str:
    """An Ollama Modelfile for the GGUF file beside it: TEMPLATE is the trained template's
    one-turn layout (the test prompts' shape), stop parameters are its stop tokens, and
    decoding is greedy, as evaluated."""
    chat_template = chat_template_of(template, tokenizer)
    before, after = prompt_frame(tokenizer, chat_template)

    def go(text: str) -> str:  # literal text inside a Go template
        return text.replace("{{", '{{ "{{" }}')

    stops = "".join(f"PARAMETER stop {json.dumps(s)}\n"
                    for s in stop_tokens(tokenizer, chat_template))
    return (
        "# Written by loraflow from the prompt template the model was trained with.\n"
        f"FROM ./{gguf_file}\n"
        f'TEMPLATE """{go(before)}{{{{ .Prompt }}}}{go(after)}"""\n'
        f"{stops}"
        "PARAMETER temperature 0\n"
        f"PARAMETER num_predict {max_new_tokens}\n"
    )
