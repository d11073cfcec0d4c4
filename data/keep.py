"""The "keep" set: general prompts, nothing to do with the task, whose expected answers are the
base model's own (greedy, with the pipeline's prompt template and decoding). A tuned model that
still answers them as the base did has not forgotten what it could do; lost agreement shows
forgetting, and as a test set in eval.sets it is one of the promotion gate's guards
(registry.guards: extra_sets) against the reference's agreement.

    python data/keep.py [--config configs/default.yaml] [--out data/keep/keep.jsonl]

The shipped data/keep/keep.jsonl was made this way from SmolLM2-135M-Instruct (the default base)
on CPU in float32. Another base model needs its own: run this with its config. Needs the project
installed (make run's environment).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about autumn leaves.",
    "Translate 'thank you very much' into Spanish.",
    "Give one tip for sleeping better.",
    "What is 12 times 7?",
    "Explain in one sentence what photosynthesis is.",
    "Suggest a name for a small black cat.",
    "List two benefits of regular exercise.",
    "What is the opposite of 'generous'?",
    "Write a short greeting for a birthday card.",
    "Which planet is closest to the sun?",
    "Describe the colour of the sky on a clear day.",
    "Give a synonym for 'happy'.",
    "What do bees make?",
    "Finish the sentence: The early bird ...",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE.parent / "configs" / "default.yaml")
    parser.add_argument("--out", type=Path, default=HERE / "keep" / "keep.jsonl")
    args = parser.parse_args()

    from loraflow.base_model import resolve_base_model
    from loraflow.config import EvalSetConfig, load_config, loraflow_home
    from loraflow.data.prompts import prompt_template
    from loraflow.evaluation.evaluate import EvalExample, EvalSet, ModelSource, evaluate

    cfg = load_config(args.config)
    base = resolve_base_model(cfg.model.base, loraflow_home() / "models")
    keep = EvalSet(cfg=EvalSetConfig(name="keep", metrics=["exact_match"]), source=args.out,
                   examples=[EvalExample(instruction=p, output="") for p in PROMPTS])
    template = prompt_template(cfg.data.template, cfg.data.jinja_template)
    start = time.perf_counter()
    result = evaluate(ModelSource(path=base.path), [keep], template, cfg.eval, label="base")
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for prompt, row in zip(PROMPTS, result.examples["keep"], strict=True):
            f.write(json.dumps({"instruction": prompt, "input": "", "output": row["answer"]},
                               ensure_ascii=False) + "\n")
    print(f"{len(PROMPTS)} answers of {base.name} written to {args.out} "
          f"(one evaluation of the set: {seconds:.1f} s, loading included)")


if __name__ == "__main__":
    main()
