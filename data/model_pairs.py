"""Preference pairs from a model's own mistakes: new order messages (data/generate.py's
generator, inputs unseen in every shipped split), answered greedily by a model with the
pipeline's prompt template and decoding; each wrong answer becomes a pair with the right record
as "chosen" and the model's answer as "rejected" (reviewers correcting what the model said).

    python data/model_pairs.py --model <merged SFT model dir> [--out data/orders/preference]

The shipped data/orders/preference splits were made this way (seed 4321, 640 messages asked,
240 answered right, the first 384 wrong answers kept) from the SFT stage of
`loraflow run --config configs/preference.yaml` (its merged model as pushed to storage:
.loraflow/storage/loraflow-orders-aligned/<version>/model), so the align stage trains on the
mistakes that model really makes. Needs the project installed (make run's environment).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from generate import make_example, unseen, write_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a merged model directory")
    parser.add_argument("--out", type=Path, default=HERE / "orders" / "preference")
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--sizes", type=int, nargs=3, default=[320, 32, 32],
                        metavar=("TRAIN", "VALIDATION", "TEST"))
    args = parser.parse_args()

    from loraflow.base_model import load_model, load_tokenizer
    from loraflow.config import load_config
    from loraflow.data.prompts import prompt_template
    from loraflow.evaluation.generation import Decoding, Prompt, generate

    cfg = load_config(HERE.parent / "configs" / "preference.yaml", [])
    template = prompt_template(cfg.data.template, cfg.data.jinja_template)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    seen = {json.loads(line)["input"] for path in (HERE / "orders").glob("*.jsonl")
            for line in path.read_text().splitlines() if line.strip()}
    rng, wanted, pairs, asked = random.Random(args.seed), sum(args.sizes), [], 0
    while len(pairs) < wanted:
        batch = unseen(make_example, rng, 64, seen)
        answers = generate(model, tokenizer, template,
                           [Prompt(instruction=e["instruction"], input=e["input"]) for e in batch],
                           Decoding.of(cfg.eval), desc="answer")
        asked += len(batch)
        pairs += [{"instruction": e["instruction"], "input": e["input"], "chosen": e["output"],
                   "rejected": answer} for e, answer in zip(batch, answers, strict=True)
                  if answer.strip() != e["output"]]
        print(f"{asked} asked, {len(pairs)} wrong answers", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, size in zip(("train", "validation", "test"), args.sizes, strict=True):
        write_jsonl(args.out / f"{split}.jsonl", pairs[start : start + size])
        print(f"preference {split}: {size} pairs -> {args.out / f'{split}.jsonl'}")
        start += size
    print(f"the model answered {asked - len(pairs)}/{asked} right "
          f"({1 - len(pairs) / asked:.1%}); kept the first {wanted} wrong answers")


if __name__ == "__main__":
    main()
