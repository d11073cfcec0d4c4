"""Where an embedded run keeps its state, and the environment that wires Prefect and MLflow to it.

Call `configure()` before importing prefect or mlflow: both read their settings at import.
Variables the user already set (a real Prefect API, a tracking server) are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from loraflow.config import loraflow_home
from loraflow.credentials import load_credentials

EPHEMERAL_STARTUP_SECONDS = 180


def configure(home: Path | None = None) -> Path:
    home = Path(home) if home else loraflow_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["LORAFLOW_HOME"] = str(home)
    defaults = {
        # Prefect: its database, logs and cached task results live in the home too, so the
        # Prefect UI can be opened on a finished run's data (make ui-prefect).
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # The temporary server `loraflow run` starts when no PREFECT_API_URL is set: Prefect
        # waits 20 s for it, which a loaded 2-core machine missed (cli.run.start_prefect says
        # what to do when even this is not enough).
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(EPHEMERAL_STARTUP_SECONDS),
        # A Prefect server restarted mid-run: its API calls wait up to ~4 min (2 + 4 + ... +
        # 128 s) for it to come back instead of ~1 min (Prefect's 5 tries).
        "PREFECT_CLIENT_MAX_RETRIES": "7",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",  # nothing is downloaded at run time
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    load_credentials()  # $LORAFLOW_CREDENTIALS_FILE, if set, before prefect/mlflow read them
    return home
