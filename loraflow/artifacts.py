"""What tasks hand each other: where bytes are (an MLflow artifact URI or a local path), the
SHA-256 that identifies them, and what the next step needs to know about them, typed; never
the objects themselves. Caches key on `sha256` alone (tasks/caching.py)."""

from __future__ import annotations

from pydantic import BaseModel

from loraflow.data.prompts import PromptTemplate
from loraflow.data.tokenization import TokenizeReport


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


class Champion(ArtifactRef):
    """The champion version's files, when it answers the same test sets as the candidate."""

    version: str


class SftParent(BaseModel):
    """The registered SFT version an aligned model is trained on top of, as its lineage and its
    version tags name it."""

    version: str
    adapter_sha256: str
    model_sha256: str


class AlignedOn(BaseModel):
    """What an align-stage adapter's lineage adds: the SFT parent and the preference data."""

    sft_parent: SftParent
    preference_data_sha256: str
    align_objective: str
