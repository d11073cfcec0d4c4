"""The MLflow pyfunc model of a registered loraflow model: instructions in, greedy answers out.

MLflow stores this file as the model's code ("models from code") and runs it at load time, so
`mlflow.pyfunc.load_model("models:/<name>@champion")` needs only mlflow, torch, transformers
and the loraflow modules shipped inside the model (code/loraflow/): the prompt module and the
generation path evaluation uses (loraflow.evaluation.generation), so a served model answers
exactly as it was evaluated. The prompt is rendered with the template recorded in loraflow.json.

Input, as MLflow users pass it by habit: a DataFrame with `instruction` (and optionally `input`)
columns, or with one column of instructions; a list of instructions (strings); a list of
{"instruction": ..., "input": ...} records; one instruction string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

MAX_NEW_TOKENS = 64
# base_model.LOAD_OPTIONS, written out: the served model ships without loraflow.base_model
# (tests/test_serving.py holds the two equal)
SERVED_LOAD_OPTIONS = {"use_safetensors": True, "use_kernels": False}
INPUT_HELP = (
    "pass a DataFrame with an 'instruction' column (and optionally 'input'), a list of "
    "instruction strings, or a list of {'instruction': ..., 'input': ...} records"
)


def prompts_of(model_input: Any) -> list[dict[str, str]]:
    """Every accepted input shape as [{"instruction", "input"}]; a ValueError names the fix."""
    if isinstance(model_input, str):
        model_input = [model_input]
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a DataFrame
        columns = list(model_input.columns)
        if "instruction" not in columns and len(columns) == 1:
            model_input = model_input[columns[0]].tolist()
        else:
            model_input = model_input.to_dict("records")
    elif hasattr(model_input, "tolist"):  # a numpy array or a Series
        model_input = model_input.tolist()
    # {"inputs": "one string"} over HTTP arrives as a 0-d array, whose tolist() is the string
    # itself: one prompt, not one per character
    if isinstance(model_input, (str, dict)):
        model_input = [model_input]
    rows = []
    for number, item in enumerate(model_input):
        item = _plain(item)
        if isinstance(item, list) and len(item) == 1:
            item = item[0]
        if isinstance(item, str):
            rows.append({"instruction": item, "input": ""})
        elif isinstance(item, dict) and isinstance(item.get("instruction"), str):
            given = item.get("input")
            rows.append({"instruction": item["instruction"], "input": given or ""})
        else:
            raise ValueError(f"input row {number}: {item!r} holds no instruction; {INPUT_HELP}")
    return rows


def _plain(value: Any) -> Any:
    """numpy values as Python ones: MLflow's scoring server, with no input schema, hands a
    JSON record's strings over as 0-d numpy arrays."""
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    return value.tolist() if hasattr(value, "tolist") else value


class TextGenerator(PythonModel):
    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from loraflow.data.prompts import PromptTemplate

        path = Path(context.artifacts["model"])
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, **SERVED_LOAD_OPTIONS).eval()
        lineage = json.loads((path / "loraflow.json").read_text(encoding="utf-8"))
        self.template = PromptTemplate.recorded(lineage)

    # No type hints on predict: MLflow would infer a schema from them; the signature is explicit.
    def predict(self, context, model_input, params=None):  # noqa: ANN001
        from loraflow.evaluation.generation import Decoding, Prompt, generate

        prompts = [Prompt(**row) for row in prompts_of(model_input)]
        decoding = Decoding(
            max_new_tokens=int((params or {}).get("max_new_tokens", MAX_NEW_TOKENS))
        )
        return generate(
            self.model, self.tokenizer, self.template, prompts, decoding, desc="predict"
        )


mlflow.models.set_model(TextGenerator())
