"""The MLflow pyfunc model of a registered loraflow model: instructions in, greedy answers out.

MLflow stores this file as the model's code ("models from code") and runs it at load time, so
`mlflow.pyfunc.load_model("models:/<name>@champion")` needs only mlflow, torch, transformers
and the loraflow prompt module, which is shipped inside the model (code/loraflow/).
The prompt is rendered exactly as in training, with the template recorded in loraflow.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

MAX_NEW_TOKENS = 64


class TextGenerator(PythonModel):
    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(context.artifacts["model"])
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # generation continues every row from its end
        self.model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        lineage = json.loads((path / "loraflow.json").read_text(encoding="utf-8"))
        from loraflow.data.prompts import PromptTemplate

        self.template = PromptTemplate.recorded(lineage)

    # No type hints on predict: MLflow would infer a schema from them; the signature is explicit.
    def predict(self, context, model_input, params=None):  # noqa: ANN001
        import torch

        from loraflow.data.prompts import encode_prompt, render_prompt

        rows = model_input.to_dict("records")
        max_new_tokens = int((params or {}).get("max_new_tokens", MAX_NEW_TOKENS))
        prompts = [
            encode_prompt(
                self.tokenizer,
                self.template,
                render_prompt(
                    self.tokenizer, self.template, row["instruction"], row.get("input") or ""
                ),
            )
            for row in rows
        ]
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        with torch.no_grad():
            output = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        width = batch["input_ids"].shape[1]
        answers = self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        return [answer.strip() for answer in answers]


mlflow.models.set_model(TextGenerator())
