"""loraflow generate: answers from a registered or local model, with its recorded template.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraflow.cli.run import USER_ERRORS
from loraflow.environment import configure
from loraflow.evaluation.generation import Decoding, Prompt


def add_generate_command(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser(
        "generate",
        help="answer prompts with a registered model (models:/<name>@champion) or a model dir",
        description="Load a model loraflow made, apply the prompt template recorded with it, "
        "and print its answers.",
    )
    gen.add_argument(
        "model", help="models:/<name>@<alias>, models:/<name>/<version> or a model directory"
    )
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the instruction to answer")
    source.add_argument(
        "--prompts", type=Path, help='JSONL file of {"instruction": ..., "input": ...}'
    )
    gen.add_argument("--input", default="", help="input text that goes with --prompt")
    gen.add_argument("--output", type=Path, help="write JSONL answers here (default: stdout)")
    defaults = Decoding()  # eval's defaults
    gen.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    gen.add_argument("--decoding", choices=["greedy", "beam"], default=defaults.strategy)
    gen.add_argument(
        "--num-beams", type=int, default=defaults.num_beams, help="beams when --decoding beam"
    )
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--quantize",
        choices=["none", "int8", "nf4"],
        default="none",
        help="load the weights in 8 bits (int8) or 4 (nf4), as train.precision names them "
        "(CUDA GPU and bitsandbytes only)",
    )
    gen.add_argument(
        "--template",
        choices=["chat", "alpaca"],
        help="override the template recorded with the model",
    )
    gen.add_argument(
        "--batch-size",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help="prompts generated together; auto: by free GPU memory, 64 on CPU",
    )
    gen.set_defaults(handler=generate_command)


def generate_command(args: argparse.Namespace) -> int:
    """`loraflow generate`: one answer to stdout, or one JSON line per prompt of a file."""
    configure()  # the registry of the embedded default, unless MLFLOW_TRACKING_URI is set
    from loraflow.release.inference import InferenceError, generate_answers, read_prompts

    try:
        prompts = (
            read_prompts(args.prompts)
            if args.prompts
            else [Prompt(instruction=args.prompt, input=args.input)]
        )
        decoding = Decoding(
            max_new_tokens=args.max_new_tokens,
            strategy=args.decoding,
            num_beams=args.num_beams,
            stop=args.stop,
        )
        answers = generate_answers(
            args.model, prompts, decoding, args.quantize, args.template, args.batch_size
        )
    except (*USER_ERRORS, InferenceError) as exc:
        print(f"loraflow generate: {exc}", file=sys.stderr)
        return 1
    if args.prompt and not args.output:
        print(answers[0])
        return 0
    lines = [
        json.dumps(p.model_dump() | {"answer": a}, ensure_ascii=False) + "\n"
        for p, a in zip(prompts, answers, strict=True)
    ]
    if args.output:
        args.output.write_text("".join(lines), encoding="utf-8")
    else:
        sys.stdout.writelines(lines)
    return 0
