"""Batched generation, shared by evaluation, the merge check, `loraflow generate` and the served
pyfunc model: one prompt template and one decoding configuration, whatever model answers, so
base, tuned and champion are asked the same way.

How a batch is decoded (greedy answers are the same as plain `model.generate` on each prompt
alone; tests/test_generation.py checks it):
- prompts are sorted by length and neighbours batched, so a short prompt is not padded to a long
  one; answers come back in the order of the prompts;
- on a CUDA GPU, greedy decoding runs on transformers' StaticCache with the model's forward
  compiled as `model.generate` compiles it (`get_compiled_call`: torch.compile, CUDA graphs), so
  a decode step is bound by memory bandwidth, not by Python and kernel launches. The loop is
  ours for one reason: `generate` waits for the GPU after every step to test whether all rows
  have ended, and the GPU idles while the host prepares the next step. Here each step's tokens
  are copied to the host as the GPU makes them and read a few steps later (EOS and stop strings
  are checked there), so the host queues steps ahead of the GPU. Every batch has the same shape
  (the last is padded with copies) and one cache is reused, so it compiles once;
- on CPU, greedy decoding drops a row from the batch as soon as it is finished (EOS, a stop
  string): compute there grows with the rows, and `model.generate` keeps computing finished rows
  until the longest answer of the batch ends;
- beam search runs `model.generate` as is.

This module imports only torch, transformers and pydantic (loraflow.data.prompts where prompts
are rendered): the pyfunc model ships it as its code (loraflow.release.registry.package_model), and
benchmarks/eval_bench.py runs it on a GPU machine that has no more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from pydantic import BaseModel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from loraflow.config import EvalConfig
    from loraflow.data.prompts import PromptTemplate

BatchSize = int | Literal["auto"]
# eval.batch_size=auto on CPU: rows leave the batch when finished, so a large batch costs no
# padded work; measured on SmolLM2-135M, 2 cores: see docs/benchmarks.md.
CPU_BATCH = 64
# The most prompts one GPU batch takes when sized from free memory: past ~256 rows a 7B decode
# step is bound by reading the KV cache, not the weights, and gains little.
GPU_MAX_BATCH = 256
# Share of free GPU memory the KV cache and activations of a batch may take (the rest: the
# compiler's workspace, CUDA graphs, fragmentation).
GPU_MEMORY_SHARE = 0.6


class Prompt(BaseModel):
    instruction: str
    input: str = ""


class Decoding(BaseModel):
    """How answers are decoded; every field is part of an evaluation's cache key. The defaults
    are eval's (EvalConfig's): `loraflow generate`, inference and the served model take them
    from here, the pipeline from its config (Decoding.of)."""

    max_new_tokens: int = 96
    strategy: Literal["greedy", "beam"] = "greedy"  # the config's eval.decoding
    num_beams: int = 4
    stop: list[str] = []
    # Tokens generated before EOS may end an answer (benchmarks on random weights force the
    # full length with min_new_tokens=max_new_tokens); 0: EOS may come first.
    min_new_tokens: int = 0

    @classmethod
    def of(cls, cfg: EvalConfig) -> Decoding:
        """The decoding the eval section configures."""
        return cls(
            max_new_tokens=cfg.max_new_tokens,
            strategy=cfg.decoding,
            num_beams=cfg.num_beams,
            stop=cfg.stop,
        )


def generation_config(decoding: Decoding, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """An explicit config, so a model's own generation_config.json (sampling, temperature)
    never changes how it is evaluated."""
    return GenerationConfig(
        max_new_tokens=decoding.max_new_tokens,
        min_new_tokens=decoding.min_new_tokens or None,
        do_sample=False,
        num_beams=decoding.num_beams if decoding.strategy == "beam" else 1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=decoding.stop or None,
    )


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The answer up to the first stop string."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, prompts: list[Prompt]
) -> list[list[int]]:
    """Token ids of each prompt rendered with `template`, exactly as in training."""
    from loraflow.data.prompts import encode_prompt, render_prompt  # only where prompts are

    return [
        encode_prompt(
            tokenizer, template, render_prompt(tokenizer, template, p.instruction, p.input)
        )
        for p in prompts
    ]


def encode_answers(tokenizer: PreTrainedTokenizerBase, answers: list[str]) -> list[list[int]]:
    """Token ids of each expected answer + EOS: the tokens training takes its loss on."""
    return [
        tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for answer in answers
    ]


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """Bytes of KV cache one token of context takes (all layers, keys and values)."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = torch.tensor([], dtype=model.dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


def auto_batch_size(
    model: PreTrainedModel, longest_prompt: int, decoding: Decoding, prompts: int
) -> int:
    """Prompts per batch for eval.batch_size=auto: on a GPU as many sequences as the free
    memory holds (KV cache of the longest context + prefill activations), up to GPU_MAX_BATCH;
    on CPU, CPU_BATCH. Never more than there are prompts, and batches of even size."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        limit = CPU_BATCH
    else:
        free, _ = torch.cuda.mem_get_info(device)
        config = model.config.get_text_config()
        itemsize = torch.tensor([], dtype=model.dtype).element_size()
        rows = decoding.num_beams if decoding.strategy == "beam" else 1
        context = longest_prompt + decoding.max_new_tokens
        cache = kv_bytes_per_token(model) * context
        # prefill: a few hidden-size and MLP-size activations per prompt token, and fp32 logits
        # of the last position
        intermediate = getattr(config, "intermediate_size", 4 * config.hidden_size)
        prefill = longest_prompt * (4 * config.hidden_size + 3 * intermediate) * itemsize
        per_sequence = rows * (cache + prefill) + 2 * 4 * config.vocab_size
        limit = max(1, min(GPU_MAX_BATCH, int(free * GPU_MEMORY_SHARE // per_sequence)))
    batches = -(-prompts // limit)  # ceil
    return max(1, -(-prompts // batches))


def batch_size_for(
    setting: BatchSize, model: PreTrainedModel, encoded: list[list[int]], decoding: Decoding
) -> int:
    """The batch size as a number: eval.batch_size or `--batch-size`, and for auto the size
    auto_batch_size picks for these prompts on this model's device (no prompts: 1). The one
    place "auto" is resolved; everything below takes the number."""
    if setting != "auto":
        return setting
    longest = max(map(len, encoded), default=0)
    return auto_batch_size(model, longest, decoding, max(1, len(encoded)))


def length_batches(encoded: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of the prompts, longest first, in batches of neighbours in length."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def left_padded(
    rows: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, left-padded so every prompt ends where generation starts."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


class Generated(NamedTuple):
    ids: list[list[int]]  # the new token ids of each prompt, EOS included where it ended one
    losses: list[tuple[float, int]] | None  # each target's (summed NLL, tokens); None: no targets


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: list[list[int]],
    decoding: Decoding,
    batch_size: int,
    compiled: bool | None = None,
    progress: Callable[[int], None] | None = None,
    targets: list[list[int]] | None = None,
) -> Generated:
    """The answers' token ids, in the order of `encoded`. `compiled`: a static, compiled KV
    cache for greedy decoding (None: on CUDA). With `targets` (encode_answers) also each
    target's loss given its prompt: on the CPU's greedy path from the same prompt forward as
    the answer (the prompt forwards are most of an evaluation's compute there), elsewhere by
    answer_losses after generating."""
    if not encoded:
        return Generated([], [] if targets is not None else None)
    model.eval()
    device = next(model.parameters()).device
    compiled = device.type == "cuda" if compiled is None else compiled
    cache_len = max(len(e) for e in encoded) + decoding.max_new_tokens  # one for every batch
    out: dict[int, list[int]] = {}
    fused = targets is not None and decoding.strategy == "greedy" and not compiled
    losses: dict[int, tuple[float, int]] = {}
    for rows in length_batches(encoded, batch_size):
        batch = [encoded[i] for i in rows]
        if fused:
            new, found = _greedy_dropping_finished(
                model, tokenizer, batch, decoding, device, [targets[i] for i in rows]
            )
            losses |= dict(zip(rows, found, strict=True))
        elif decoding.strategy == "beam":
            new = _hf_generate(model, tokenizer, batch, decoding, device)
        elif compiled:
            # one shape for every batch: one compile
            filler = [batch[-1]] * (batch_size - len(batch))
            new = _greedy_static(model, tokenizer, batch + filler, decoding, cache_len)
            new = new[: len(batch)]
        else:
            new, _ = _greedy_dropping_finished(model, tokenizer, batch, decoding, device)
        out |= dict(zip(rows, new, strict=True))
        if progress is not None:
            progress(len(rows))
    ids = [out[i] for i in range(len(encoded))]
    if targets is None:
        return Generated(ids, None)
    if fused:
        return Generated(ids, [losses[i] for i in range(len(encoded))])
    return Generated(ids, answer_losses(model, tokenizer, encoded, targets, batch_size))


def _hf_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[list[int]],
    decoding: Decoding,
    device: torch.device,
) -> list[list[int]]:
    """`model.generate` on one batch (beam search)."""
    input_ids, attention_mask = left_padded(batch, tokenizer.pad_token_id, device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=generation_config(decoding, tokenizer),
        tokenizer=tokenizer,  # needed by stop strings
    )
    return [_until_eos(row, tokenizer.eos_token_id) for row in output[:, input_ids.shape[1] :]]


# Steps the host reads the GPU's tokens behind it: the GPU has that many steps queued while the
# host checks EOS and stop strings; a batch runs at most that many steps past its last answer.
GPU_LAG_STEPS = 3


def _static_cache(model: PreTrainedModel, rows: int, cache_len: int) -> object:
    """A StaticCache for `rows` sequences of `cache_len` tokens, kept on the transformers model
    and reset for the next batch of the same shape (as `model.generate` keeps its own): the
    compiled decode step and its CUDA graphs read the cache at fixed addresses. Kept under a PEFT
    wrapper, not on it, so base + adapter and the model merged from it share one cache."""
    from transformers import StaticCache

    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = (rows, cache_len, model.dtype)
    kept = getattr(owner, "_loraflow_static_cache", None)
    if kept is not None and kept[0] == key:
        kept[1].reset()
        return kept[1]
    owner._loraflow_static_cache = None  # free the old cache before allocating the new one
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    owner._loraflow_static_cache = (key, cache)
    return cache


def _greedy_static(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[list[int]],
    decoding: Decoding,
    cache_len: int,
    lag: int | None = None,
) -> list[list[int]]:
    """Greedy decoding as `model.generate` does it on a static cache (the prompt forward eager,
    positions from the mask, the decode steps through `get_compiled_call` on a GPU, EOS held back
    for min_new_tokens, the argmax of the float32 logits), without waiting for the GPU between
    steps. The host reads each step's tokens `lag` steps late (None: GPU_LAG_STEPS on a GPU, 0
    on CPU) and ends a row at EOS or a stop string; tokens a row makes after its end are
    dropped, as `generate` pads them."""
    eos, device = tokenizer.eos_token_id, next(model.parameters()).device
    gpu = device.type == "cuda"
    input_ids, mask = left_padded(batch, tokenizer.pad_token_id, device)
    rows, width = input_ids.shape
    cache = _static_cache(model, rows, cache_len)
    # the whole cache's mask, fixed for the batch: pads are 0, the positions still to be written
    # 1 (the causal mask hides them until then), so every decode step has the same inputs' shapes
    full_mask = torch.ones((rows, cache_len), dtype=mask.dtype, device=device)
    full_mask[:, :width] = mask
    positions = _positions(mask, width)
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    quantizer = getattr(model, "hf_quantizer", None)  # generate's test: not all of them compile
    compile_ = gpu and getattr(quantizer, "is_compileable", True)
    forward = model.get_compiled_call(None) if compile_ else model.__call__
    position = positions[:, -1:]
    lag = (GPU_LAG_STEPS if gpu else 0) if lag is None else lag
    ring = [torch.empty(rows, dtype=torch.long, pin_memory=gpu) for _ in range(lag + 1)]
    events = [torch.cuda.Event() if gpu else None for _ in range(lag + 1)]
    answers = _Answers(tokenizer, decoding, rows)

    def take(made: int) -> None:
        """Hand the host the tokens of step `made` (waiting for their copy if need be)."""
        slot = made % len(ring)
        if gpu:
            events[slot].synchronize()
        host = ring[slot].tolist()
        answers.add([host[row] for row in answers.open])

    step = -1
    for step in range(decoding.max_new_tokens):
        scores = logits.float()  # a copy: the next step's CUDA graph overwrites its outputs
        if step < decoding.min_new_tokens and eos is not None:
            scores[:, eos] = -float("inf")
        tokens = scores.argmax(-1)
        slot = step % len(ring)
        ring[slot].copy_(tokens, non_blocking=gpu)
        if gpu:
            events[slot].record()
        if step >= lag:  # the tokens of step - lag are on the host (or nearly)
            take(step - lag)
        if answers.all_ended or step + 1 == decoding.max_new_tokens:
            break
        position = position + 1
        if compile_:
            torch.compiler.cudagraph_mark_step_begin()
        logits = forward(
            input_ids=tokens[:, None],
            attention_mask=full_mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
    for late in range(max(0, step - lag + 1), step + 1):  # the steps still in flight
        take(late)
    return answers.ids


class _Answers:
    """The new tokens of each row of a batch, step by step, until the row's answer ends: at EOS
    (kept, as `generate` returns it) or at a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, decoding: Decoding, rows: int) -> None:
        self.tokenizer, self.decoding = tokenizer, decoding
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.open = list(range(rows))

    @property
    def all_ended(self) -> bool:
        return not self.open

    def add(self, tokens: list[int]) -> list[int]:
        """Append one token to each open row (tokens[i] to the i-th row still open); the
        indices i of the rows that stay open."""
        kept, still, stop = [], [], self.decoding.stop
        for index, (row, token) in enumerate(zip(self.open, tokens, strict=True)):
            self.ids[row].append(token)
            if token != self.tokenizer.eos_token_id and not (
                stop and _has_stop(self.tokenizer, self.ids[row], stop)
            ):
                kept.append(index)
                still.append(row)
        self.open = still
        return kept


def _until_eos(row: torch.Tensor, eos: int | None) -> list[int]:
    ids = row.tolist()
    return ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix every row shares (the system prompt and a repeated
    instruction, typically), leaving each row at least one token of its own."""
    first, limit = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def _prefilled_cache(model: PreTrainedModel, rows: list[list[int]], device: torch.device) -> (
    tuple[object, int]
):
    """A DynamicCache holding the rows' common prefix, computed once and repeated per row; and
    the prefix length. On CPU the prompt forward passes are most of an evaluation's compute,
    and a test set's prompts share most of their tokens (the template, the instruction)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    shared = common_prefix(rows) if len(rows) > 1 else 0
    if shared:
        model(
            input_ids=torch.tensor([rows[0][:shared]], device=device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(len(rows))
    return cache, shared


def _positions(attention_mask: torch.Tensor, last: int) -> torch.Tensor:
    """Position ids as `model.generate` derives them from the mask: pads do not count."""
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    return positions[:, -last:]


def _greedy_dropping_finished(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[list[int]],
    decoding: Decoding,
    device: torch.device,
    targets: list[list[int]] | None = None,
) -> tuple[list[list[int]], list[tuple[float, int]]]:
    """Greedy decoding as `model.generate` does it (positions from the mask, a KV cache),
    except that the prompts' common prefix is computed once and a finished row leaves the batch
    with its KV cache. The cache then holds [prefix | pads | own prompt tokens | answer].
    With `targets`, each target's (summed NLL, tokens) given the prompt is taken from the same
    prompt forward: the target is fed after the prompt, then cut from the cache again."""
    eos = tokenizer.eos_token_id
    cache, shared = _prefilled_cache(model, batch, device)
    step_ids, mask = left_padded([ids[shared:] for ids in batch], tokenizer.pad_token_id, device)
    attention_mask = torch.cat([mask.new_ones((len(batch), shared)), mask], 1)
    answers = _Answers(tokenizer, decoding, len(batch))  # its open rows: those in the tensors
    for step in range(decoding.max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=_positions(attention_mask, step_ids.shape[1]),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1].float()
        if step == 0 and targets is not None:
            losses = _target_losses(model, logits, cache, attention_mask, targets, tokenizer)
        if step < decoding.min_new_tokens and eos is not None:
            logits[:, eos] = -float("inf")
        tokens = logits.argmax(-1)
        keep = answers.add(tokens.tolist())
        if answers.all_ended or step + 1 == decoding.max_new_tokens:
            break
        if len(keep) < len(tokens):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            tokens, attention_mask = tokens[index], attention_mask[index]
        step_ids = tokens[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(keep), 1))], 1)
    return answers.ids, losses if targets is not None else []


def _target_losses(
    model: PreTrainedModel,
    last_logits: torch.Tensor,
    cache: object,
    attention_mask: torch.Tensor,
    targets: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
) -> list[tuple[float, int]]:
    """(summed NLL, tokens) of each target after its prompt, whose KV cache and last logits the
    prefill left: the first target token is scored on those logits, the rest by feeding the
    target (right-padded) after the prompt; the cache is cut back to the prompt afterwards."""
    device = last_logits.device
    first = torch.tensor([t[0] for t in targets], device=device)
    nll = torch.nn.functional.cross_entropy(last_logits, first, reduction="none").tolist()
    width = max(len(t) for t in targets) - 1
    if width > 0:
        feed = torch.full((len(targets), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(targets), width), dtype=torch.long)
        for row, target in enumerate(targets):
            feed[row, : len(target) - 1] = torch.tensor(target[:-1], dtype=torch.long)
            mask[row, : len(target) - 1] = 1
        full_mask = torch.cat([attention_mask, mask.to(device)], 1)
        logits = model(
            input_ids=feed.to(device),
            attention_mask=full_mask,
            position_ids=_positions(full_mask, width),
            past_key_values=cache,
            use_cache=True,
        ).logits
        for row, target in enumerate(targets):  # row by row: one vocabulary-wide float copy
            rest = torch.tensor(target[1:], dtype=torch.long, device=device)
            nll[row] += float(
                torch.nn.functional.cross_entropy(
                    logits[row, : len(rest)].float(), rest, reduction="sum"
                )
            )
        del logits
        cache.crop(-width)  # the answers are generated from the prompt alone
    return [(value, len(t)) for value, t in zip(nll, targets, strict=True)]


def _has_stop(tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: list[str]) -> bool:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(s in text for s in stop)


def answers_of(
    tokenizer: PreTrainedTokenizerBase, new_ids: list[list[int]], decoding: Decoding
) -> list[str]:
    """The text of each answer: special tokens dropped, cut before the first stop string."""
    texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
    return [cut_at_stop(text, decoding.stop).strip() for text in texts]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    prompts: list[Prompt],
    decoding: Decoding,
    batch_size: BatchSize = "auto",
    desc: str = "generate",
    compiled: bool | None = None,
) -> list[str]:
    """Answers in the order of `prompts`."""
    encoded = encode_prompts(tokenizer, template, prompts)
    size = batch_size_for(batch_size, model, encoded, decoding)
    with progress_bar(len(prompts), desc) as update:
        new = generate_ids(model, tokenizer, encoded, decoding, size, compiled, update).ids
    return answers_of(tokenizer, new, decoding)


@contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """A tqdm bar's update where tqdm is installed (the served model may run without it)."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield lambda n: None
        return
    with tqdm(total=total, desc=desc, unit="prompt") as bar:
        yield bar.update


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def answer_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    targets: list[list[int]],
    batch_size: int,
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, tokens) of each target (encode_answers: an expected
    answer + EOS, the tokens training takes its loss on) given its prompt (encode_prompts).
    Like generation, the prompts' common prefix is computed once per batch, and logits are
    taken only at the last positions (the answers)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for rows in _batches(list(range(len(prompts))), batch_size):
        cache, shared = _prefilled_cache(model, [prompts[i] for i in rows], device)
        input_ids, mask = left_padded(
            [prompts[i][shared:] + targets[i] for i in rows], tokenizer.pad_token_id, device
        )
        attention_mask = torch.cat([mask.new_ones((len(rows), shared)), mask], 1)
        keep = max(len(targets[i]) for i in rows) + 1  # every row's answer ends at the right
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_positions(attention_mask, input_ids.shape[1]),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits
        for row, i in enumerate(rows):  # row by row: one more vocabulary-wide tensor, not B
            target = torch.tensor(targets[i], device=device)
            predicting = logits[row, keep - 1 - len(target) : keep - 1].float()
            nll = torch.nn.functional.cross_entropy(predicting, target, reduction="sum")
            out.append((float(nll), len(target)))
    return out
