"""The lineage manifest that travels with every adapter and model, and the check that an
adapter meets the base it is about to be loaded on (before PEFT loads it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from loraflow.artifacts import AlignedOn, SftParent
from loraflow.base_model import BaseModelRef, load_tokenizer
from loraflow.config import LoraSettings, TrainConfig
from loraflow.data.prompts import PromptTemplate
from loraflow.data.tokenization import TokenizeSettings
from loraflow.hashing import code_version, library_versions, sha256_file_cached

LINEAGE_FILE = "loraflow.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# The parts of a base's config.json that decide whether an adapter's tensors fit it.
ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


class LineageError(ValueError):
    """An adapter does not fit the base it is about to be loaded on; the message says why."""


class Lineage(BaseModel):
    """The manifest (loraflow.json) beside every adapter and merged model: the base trained on
    (its files, architecture, tokenizer), how (LoRA, training, data, template, tokenization)
    and with what (code and library versions); an aligned adapter's adds its SFT parent, a
    merged model's the merge. Built by adapter_manifest only; the stages add their fields.

    Every field but the template may be missing from a stored manifest (one written before
    the field existed): it reads as not recorded. Keys this version does not know are kept
    (extra="allow"), so a manifest copied onto a merged model loses nothing."""

    model_config = ConfigDict(extra="allow")

    format: int = 2
    base_model: str | None = None  # the base's name
    base_source: str | None = None  # model.base as configured; adapter_config.json names it too
    base_path: str | None = None  # the local copy trained on, identified by base_sha256
    base_sha256: str | None = None
    base_revision: str | None = None  # the commit of a Hugging Face cache snapshot
    base_files: dict[str, str] | None = None  # weight file -> SHA-256
    base_config: dict[str, Any] | None = None  # ARCHITECTURE_KEYS of its config.json
    base_quantized_on_disk: bool | None = None
    tokenizer_sha256: str | None = None
    chat_template_sha256: str | None = None
    base_quantization: str = "none"  # how the base was loaded for training: none, 4bit, 8bit
    chat_template: str | None = None
    template: PromptTemplate  # what every render of a prompt for this model uses
    data_sha256: str | None = None
    lora: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    code_version: str | None = None
    libraries: dict[str, str] | None = None  # package -> version trained with
    tokenize: dict[str, Any] | None = None  # the tokenization settings
    # an aligned adapter's (and its merged model's): what it was trained on top of
    sft_parent: SftParent | None = None
    preference_data_sha256: str | None = None
    align_objective: str | None = None
    # a merged model's: the merge's report, the adapter folded in, the dtype saved
    merge: dict[str, Any] | None = None
    adapter_sha256: str | None = None
    merged_dtype: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _template_record(cls, data: Any) -> Any:
        """Models registered before the template record kept its kind in "template" and a
        Jinja template's text in "prompt_template"."""
        if isinstance(data, dict) and isinstance(data.get("template"), str):
            return data | {"template": PromptTemplate.recorded(data)}
        return data

    def updated(self, **fields: Any) -> Lineage:
        """This manifest with a stage's fields added (validated)."""
        return Lineage.model_validate(self.model_dump() | fields)

    def write(self, directory: Path) -> Path:
        """As directory/loraflow.json: sorted keys; a stage's fields only once it added them."""
        absent = {name for name in STAGE_FIELDS if getattr(self, name) is None}
        path = Path(directory) / LINEAGE_FILE
        path.write_text(json.dumps(self.model_dump(mode="json", exclude=absent), indent=2,
                                   sort_keys=True))
        return path


STAGE_FIELDS = ("tokenize", "sft_parent", "preference_data_sha256", "align_objective", "merge",
                "adapter_sha256", "merged_dtype")



def base_fingerprint(base_dir: Path) -> dict[str, Any]:
    """What identifies a base: its weight files' SHA-256, architecture, vocabulary, tokenizer."""
    from loraflow.hashing import tokenizer_sha256

    base_dir = Path(base_dir)
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    template_file = base_dir / "chat_template.jinja"
    chat_template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    if chat_template is None:
        tokenizer_config = base_dir / "tokenizer_config.json"
        if tokenizer_config.is_file():
            chat_template = json.loads(tokenizer_config.read_text()).get("chat_template")
    return {
        "base_revision": _hf_revision(base_dir),
        "base_files": {
            p.name: sha256_file_cached(p)
            for p in sorted(base_dir.iterdir())
            if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
        },
        "base_config": {k: config.get(k) for k in ARCHITECTURE_KEYS},
        "base_quantized_on_disk": "quantization_config" in config,
        "tokenizer_sha256": tokenizer_sha256(base_dir),
        "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest()
        if chat_template
        else None,
    }


def _hf_revision(base_dir: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot (.../snapshots/<commit>), else None."""
    resolved = Path(base_dir).resolve()
    return resolved.name if resolved.parent.name == "snapshots" else None


def adapter_manifest(
    base_dir: Path,
    base_name: str,
    base_sha256: str,
    *,
    lora: dict[str, Any],
    train: dict[str, Any],
    data_sha256: str,
    template: dict[str, Any],
    chat_template: str | None,
    base_quantization: str = "none",
    base_source: str | None = None,
    tokenize: dict[str, Any] | None = None,
    aligned_on: AlignedOn | None = None,
) -> Lineage:
    """The manifest written as adapter/loraflow.json beside every adapter.

    base_quantization: how the base was loaded for training ("none", "nf4", "int8"); a
    quantized-trained adapter is merged onto the unquantized weights of the same base files.
    base_source: model.base as configured, which adapter_config.json names too; base_path is
    the local copy trained on, identified by base_sha256.
    """
    return Lineage.model_validate({
        "format": 2,
        "base_model": base_name,
        "base_source": base_source,
        "base_path": str(base_dir),
        "base_sha256": base_sha256,
        **base_fingerprint(base_dir),
        "base_quantization": base_quantization,
        "chat_template": chat_template,
        "template": template,
        "data_sha256": data_sha256,
        "lora": lora,
        "train": train,
        "code_version": code_version(),
        "libraries": library_versions(),
        "tokenize": tokenize,
    } | (aligned_on.model_dump() if aligned_on else {}))


def adapter_lineage(
    base: BaseModelRef,
    *,
    lora: LoraSettings,
    train: TrainConfig,
    data_sha256: str,
    template: PromptTemplate,
    tokenize: TokenizeSettings,
    aligned_on: AlignedOn | None = None,
) -> Lineage:
    """The manifest of an adapter the pipeline trained: on `base` with these settings, on the
    data tokenized with `tokenize` (the align stage's adapter: on top of `aligned_on`)."""
    return adapter_manifest(
        base.path,
        base.name,
        base.sha256,
        lora=lora.model_dump(),
        train=train.model_dump(),
        data_sha256=data_sha256,
        template=template.model_dump(),
        chat_template=load_tokenizer(base.path).chat_template,
        base_quantization=train.precision if train.precision in ("nf4", "int8") else "none",
        base_source=base.source,
        tokenize=tokenize.model_dump(),
        aligned_on=aligned_on,
    )


def library_differences(recorded: dict[str, str]) -> list[tuple[str, str, str]]:
    """(package, version trained with, version here) for each library a lineage records, in
    its order; the same version on both sides where nothing changed."""
    here = library_versions()
    return [(name, version, here.get(name, "not recorded here")) for name, version
            in recorded.items()]


def read_manifest(model_dir: Path) -> Lineage:
    path = Path(model_dir) / LINEAGE_FILE
    if not path.is_file():
        raise LineageError(
            f"{model_dir} has no {LINEAGE_FILE}: loraflow cannot tell which base it was trained "
            "on, so it will not load it. Fix: use an adapter made by `loraflow run` (its MLflow "
            "artifact adapter/ carries the file), or retrain it."
        )
    return Lineage.model_validate_json(path.read_text(encoding="utf-8"))


def _safetensors_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Tensor name -> shape from safetensors headers only (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[key] = list(f.get_slice(key).get_shape())
    return shapes


def check_adapter_matches_base(
    adapter_dir: Path, base_dir: Path, expected_lora: dict[str, Any] | None = None
) -> Lineage:
    """Stop before PEFT's tensor-shape errors: compare an adapter's manifest, config and tensor
    shapes with the base it is about to be loaded on. Every difference is reported at once,
    named (different base / vocabulary / target modules / rank). Returns the manifest.

    expected_lora: the LoRA settings the caller expects (r, target_modules), if any.
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    manifest = read_manifest(adapter_dir)
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    problems: list[str] = []

    # The adapter's own files against its manifest, and against what the caller expects.
    rank = peft_config.get("r")
    targets = sorted(_as_list(peft_config.get("target_modules")))
    for source, lora in (("its manifest", manifest.lora), ("the config", expected_lora)):
        if not lora:
            continue
        if lora.get("r") is not None and lora["r"] != rank:
            problems.append(
                f"different rank: adapter_config.json has r={rank}, {source} says r={lora['r']}"
            )
        wanted = sorted(_as_list(lora.get("target_modules")))
        if wanted and wanted != ["all-linear"] and wanted != targets:
            problems.append(
                f"different target modules: adapter_config.json adapts {targets}, "
                f"{source} says {wanted}"
            )

    # Architecture: the fields that decide tensor shapes.
    trained_on = manifest.base_config or {}
    for key in ARCHITECTURE_KEYS:
        if key == "vocab_size" or key not in trained_on:
            continue
        if trained_on[key] != base_config.get(key):
            problems.append(
                f"different base: {key} is {base_config.get(key)!r} in {base_dir}/config.json, "
                f"the adapter was trained on {trained_on[key]!r}"
            )

    # Vocabulary: size and the tokenizer's bytes.
    from loraflow.hashing import tokenizer_sha256

    trained_vocab = trained_on.get("vocab_size")
    if trained_vocab is not None and trained_vocab != base_config.get("vocab_size"):
        problems.append(
            f"different vocabulary: the base has {base_config.get('vocab_size')} tokens, the "
            f"adapter was trained with {trained_vocab}"
        )
    tokenizer_now = tokenizer_sha256(base_dir)
    if manifest.tokenizer_sha256 and manifest.tokenizer_sha256 != tokenizer_now:
        problems.append(
            f"different vocabulary: the base's tokenizer files hash to {tokenizer_now[:12]}, the "
            f"adapter was trained with {manifest.tokenizer_sha256[:12]}"
        )

    # Tensor shapes: every LoRA pair against the base weight it adapts, and against its rank.
    problems += _shape_problems(adapter_dir, base_dir, rank)

    # The base's weight bytes: same shapes but other weights is still another model.
    if not problems and manifest.base_files:
        now = {
            name: sha256_file_cached(base_dir / name)
            for name in manifest.base_files
            if (base_dir / name).is_file()
        }
        if now != manifest.base_files:
            problems.append(
                f"different base: the weight files of {base_dir} ({_short(now)}) are not those "
                f"the adapter was trained on ({manifest.base_model}: "
                f"{_short(manifest.base_files)})"
            )

    if problems:
        raise LineageError(
            f"adapter {adapter_dir} does not fit base {base_dir}:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\nFix: load it on the base it was trained on ({manifest.base_model}, "
            f"sha256 {str(manifest.base_sha256)[:12]}), or retrain the adapter on this "
            "base with matching lora settings."
        )
    return manifest


def _shape_problems(adapter_dir: Path, base_dir: Path, rank: int | None) -> list[str]:
    adapter_files = sorted(adapter_dir.glob("*.safetensors"))
    base_files = sorted(base_dir.glob("*.safetensors"))
    if not adapter_files or not base_files:
        return []  # .bin checkpoints: no cheap header to read; PEFT's own check remains
    adapter = _safetensors_shapes(adapter_files)
    base = _safetensors_shapes(base_files)
    missing: list[str] = []
    wrong: list[str] = []
    wrong_rank: list[str] = []
    for key, shape in adapter.items():
        for part in (".lora_A.", ".lora_B."):
            if part not in key:
                continue
            module = key.split(part)[0].removeprefix("base_model.model.")
            weight = base.get(f"{module}.weight")
            if weight is None:
                missing.append(module)
                continue
            r_axis, feature_axis = (0, 1) if part == ".lora_A." else (1, 0)
            if rank is not None and shape[r_axis] != rank:
                wrong_rank.append(f"{key} has rank {shape[r_axis]}")
            if shape[feature_axis] != weight[feature_axis]:
                side = "in" if part == ".lora_A." else "out"
                wrong.append(
                    f"{module}: the adapter expects {side}_features {shape[feature_axis]}, "
                    f"the base weight is {weight}"
                )
    problems = []
    if missing:
        modules = sorted(set(missing))
        problems.append(
            f"different target modules: {len(modules)} adapted module(s) do not exist in the "
            f"base, e.g. {modules[:3]}"
        )
    if wrong:
        problems.append(f"different base: {len(wrong)} tensor shape(s) differ, e.g. {wrong[:2]}")
    if wrong_rank:
        problems.append(f"different rank: adapter_config.json says r={rank}, but {wrong_rank[:2]}")
    return problems


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _short(files: dict[str, str]) -> str:
    return ", ".join(f"{name} {digest[:12]}" for name, digest in sorted(files.items()))
