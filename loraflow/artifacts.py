"""What tasks hand each other: where bytes are (an MLflow artifact URI or a local path), the
SHA-256 that identifies them, and what the next step needs to know about them, typed; never
the objects themselves. Caches key on `sha256` alone (tasks/caching.py).

The steps that load the full model (train, evaluate, merge) take one request each and return
one result, the same wherever they run: in the pipeline's process or on the gpu work pool,
whose deployments receive the request as their parameter (tasks/deployments.py)."""

from __future__ import annotations

from pydantic import BaseModel, computed_field

from loraflow.base_model import BaseModelRef
from loraflow.config import EvalConfig, LaunchConfig, LoraSettings, MergeConfig, TrainConfig
from loraflow.data.prompts import PromptTemplate
from loraflow.data.tokenization import TokenizeReport
from loraflow.hashing import sha256_json


class ArtifactIntegrityError(RuntimeError):
    """Stored bytes no longer hash to the SHA-256 their reference recorded (corrupted or
    replaced in the artifact store): refused before anything loads them."""


class ArtifactRef(BaseModel):
    uri: str
    sha256: str


class ValidatedData(ArtifactRef):
    """The cleaned splits with their report and quarantine (MLflow artifact data/)."""

    counts: dict[str, int]  # usable examples per split
    source_sha256: str  # the raw sources, before cleaning
    split_sha256: dict[str, str]  # each cleaned split's own bytes (<split>.jsonl)


class HeldoutSplit(ArtifactRef):
    """The cleaned test split alone (test.jsonl under a ValidatedData's URI), identified by its
    own bytes: what evaluation reads and is keyed on, not the training data beside it."""


class TokenizedData(ArtifactRef):
    """Prompt + answer ids as Parquet (artifact tokenized/), and how they were made."""

    template: PromptTemplate  # what every later render uses: evaluation, merge check, serving
    data_sha256: str  # the ValidatedData they come from
    tokenizer_sha256: str
    report: TokenizeReport  # counts, truncation and the settings


class Adapter(ArtifactRef):
    """A trained LoRA adapter with its lineage manifest (artifact adapter/)."""

    result: dict[str, float]  # the engine's result.json: steps, losses, tokens, seconds
    trained: TrainConfig  # the config the engine trained with (result.json's `config`)


class Evaluation(ArtifactRef):
    """One model's scored answers (artifact eval/<label>/)."""

    label: str  # base, tuned, champion
    metrics: dict[str, float]


class MergedModel(ArtifactRef):
    """The merged model inside its MLflow logged (pyfunc) model: what is registered and pushed."""

    model_id: str  # the MLflow LoggedModel
    dtype: str
    device: str
    note: str  # what was merged onto what, in words


class ExportCheck(BaseModel):
    """One export format and how often it answered the test prompts as the evaluated model did,
    in a runtime loraflow did not write (loraflow.release.exports)."""

    format: str  # export.formats: gguf-f16, gguf-q8_0, vllm
    # a second runtime answering the same files ("llama.cpp" for a GGUF); None: the format's own
    via: str | None = None
    agreement: float  # the fraction of test answers identical to the evaluated model's
    min_agreement: float  # export.min_agreement for the format
    answers: int
    runtime: str  # what answered: "transformers 5.25.0 GGUF reader", "peft 0.21.2 ..."
    files: dict[str, int]  # file -> bytes, in the format's folder
    write_seconds: float
    check_seconds: float

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement

    @computed_field
    @property
    def name(self) -> str:
        """What the summary, the verdict and the tags call it: gguf-f16, gguf-f16/llama.cpp."""
        return f"{self.format}/{self.via}" if self.via else self.format


class Exports(ArtifactRef):
    """Every export of a merged model (artifact exports/<format>/), checked."""

    checks: list[ExportCheck]
    notes: list[str] = []  # checks that were not run, and how to run them


class Champion(ArtifactRef):
    """The champion version's files, when it answers the same test sets as the candidate."""

    version: str


class SftParent(BaseModel):
    """The registered SFT version an aligned model is trained on top of, as its lineage and its
    version tags name it."""

    version: str
    adapter_sha256: str
    model_sha256: str


class SftModel(BaseModel):
    """The SFT model the align stage starts from: the one the pipeline just registered, or the
    champion an align-only run looks up (loraflow.release.registry.champion_to_align)."""

    model: ArtifactRef  # its merged model's files
    parent: SftParent
    metrics: dict[str, float]  # its task metrics
    template: PromptTemplate  # the prompt template it was trained with
    evaluation: Evaluation | None = None  # its answers to the test sets in this run (the gate)


class AlignedOn(BaseModel):
    """What an align-stage adapter's lineage adds: the SFT parent and the preference data."""

    sft_parent: SftParent
    preference_data_sha256: str
    align_objective: str


class TrainRequest(BaseModel):
    """Train a LoRA adapter: the tokenized data, the base, the settings and how to launch."""

    tokens: TokenizedData
    base: BaseModelRef
    lora: LoraSettings
    train: TrainConfig
    launch: LaunchConfig
    aligned_on: AlignedOn | None = None  # the align stage's adapter: its lineage's parent

    @property
    def step(self) -> str:
        """The pipeline step (task) it is for; its result is handed back under this name."""
        return "train_adapter"

    def run_key(self) -> str:
        """The training's identity, 16 hex digits: data, base and settings but not where it
        runs (launch), so a retry or rerun on another GPU count resumes the same run
        directory's checkpoints."""
        return sha256_json([self.tokens.sha256, self.base.sha256, self.lora.model_dump(),
                            self.train.model_dump()])[:16]


class EvaluateRequest(BaseModel):
    """A model answers the held-out test sets: the base, or the champion's files."""

    model: BaseModelRef | Champion
    test: HeldoutSplit
    template: PromptTemplate
    cfg: EvalConfig

    @property
    def label(self) -> str:
        """base or champion: the prefix of its metrics and where its answers are logged."""
        return "base" if isinstance(self.model, BaseModelRef) else "champion"

    @property
    def step(self) -> str:
        return f"evaluate_{self.label}"


class MergeRequest(BaseModel):
    """Fold the adapter into the base, and score the merged model against base + adapter."""

    base: BaseModelRef
    adapter: Adapter
    test: HeldoutSplit
    template: PromptTemplate
    eval_cfg: EvalConfig
    cfg: MergeConfig

    @property
    def step(self) -> str:
        return "merge_adapter"


class MergeResult(BaseModel):
    """The merged model and its evaluation (label tuned: the score the promotion gate reads)."""

    model: MergedModel
    evaluation: Evaluation
