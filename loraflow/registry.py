"""The MLflow model registry: versions, aliases and the promotion gate.

Every new version gets alias `challenger`; `champion` moves to it only when the gate passes
against the current champion (or, for the first model, against the base model).
"""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

CHALLENGER, CHAMPION = "challenger", "champion"
METRIC_TAG = "metric."  # version tags holding evaluation metrics, e.g. metric.exact_match


class Decision(BaseModel):
    promote: bool
    metric: str
    candidate: float
    reference: float
    reference_name: str  # "champion v3" or "base model"
    margin: float
    reason: str


def register_version(
    client: MlflowClient, name: str, source: str, run_id: str, tags: dict[str, str]
) -> str:
    """Create a version of `name` from artifacts that are already complete at `source`."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="LoRA fine-tunes made by loraflow")
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    return str(version.version)


def champion(client: MlflowClient, name: str) -> tuple[str, dict[str, float]] | None:
    """(version, metrics) of the current champion, or None when there is none."""
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    metrics = {
        k.removeprefix(METRIC_TAG): float(v)
        for k, v in version.tags.items()
        if k.startswith(METRIC_TAG)
    }
    return str(version.version), metrics


def decide(
    metric: str,
    candidate: dict[str, float],
    base: dict[str, float],
    current: tuple[str, dict[str, float]] | None,
    margin: float,
) -> Decision:
    """The promotion gate: the candidate must beat the reference by at least `margin`."""
    if current is None:
        reference, reference_name = base[metric], "base model"
    else:
        reference, reference_name = current[1].get(metric, 0.0), f"champion v{current[0]}"
    delta = candidate[metric] - reference
    promote = delta >= margin and delta > 0
    verdict = "beats" if promote else "does not beat"
    reason = (
        f"{metric} {candidate[metric]:.3f} {verdict} {reference_name} "
        f"{reference:.3f} by the margin {margin:.3f} (delta {delta:+.3f})"
    )
    return Decision(
        promote=promote,
        metric=metric,
        candidate=candidate[metric],
        reference=reference,
        reference_name=reference_name,
        margin=margin,
        reason=reason,
    )


def aliases(client: MlflowClient, name: str, version: str) -> list[str]:
    return sorted(client.get_model_version(name, version).aliases)


def metric_tags(metrics: dict[str, Any]) -> dict[str, str]:
    return {f"{METRIC_TAG}{k}": f"{v:.6g}" for k, v in metrics.items()}
