"""Create, or update the password of, the MLflow users of the stack through the tracking
server's auth REST API, signed in as the admin. Safe to run again: rotation is "change the
password in server.env, run this again".

  python infra/mlflow-users.py [--models NAME ...] [--experiments NAME ...]

Reads from the environment (infra/new-credentials.sh writes them to server.env):
  MLFLOW_TRACKING_URI                             the tracking server
  MLFLOW_AUTH_ADMIN_USERNAME, _PASSWORD           the admin (made by the server on first start)
  MLFLOW_AUTH_ADMIN_NEW_PASSWORD                  optional: rotate the admin's own password
  MLFLOW_PIPELINE_USERNAME, _PASSWORD             workers and the CLI: create runs, register
                                                  versions, move aliases (MANAGE on what it
                                                  creates, and on --models / --experiments)
  MLFLOW_READER_USERNAME, _PASSWORD               dashboards: read only (the server's
                                                  default_permission READ; no alias moves)
No password is printed.
"""

from __future__ import annotations

import argparse
import os
import sys


def need(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        sys.exit(f"infra/mlflow-users.py: {name} is not set (source the stack's server.env)")
    return value


def ensure_user(client, username: str, password: str) -> str:  # noqa: ANN001
    from mlflow.exceptions import RestException

    try:
        client.get_user(username)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(username, password)
        return "created"
    client.update_user_password(username, password)  # as admin: no current password needed
    return "password set"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[], help="grant pipeline MANAGE on these")
    parser.add_argument("--experiments", nargs="*", default=[], help="grant pipeline MANAGE")
    args = parser.parse_args()
    uri = need("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_USERNAME"] = need("MLFLOW_AUTH_ADMIN_USERNAME")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = need("MLFLOW_AUTH_ADMIN_PASSWORD")
    os.environ.pop("MLFLOW_TRACKING_TOKEN", None)
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient

    client = AuthServiceClient(uri)
    admin = os.environ["MLFLOW_TRACKING_USERNAME"]
    if new := os.environ.get("MLFLOW_AUTH_ADMIN_NEW_PASSWORD"):
        current = os.environ["MLFLOW_TRACKING_PASSWORD"]
        client.update_user_password(admin, new, current_password=current)
        os.environ["MLFLOW_TRACKING_PASSWORD"] = new
        print(f"{admin}: password rotated (now put MLFLOW_AUTH_ADMIN_PASSWORD = the new one)")
    pipeline = need("MLFLOW_PIPELINE_USERNAME")
    for role in ("PIPELINE", "READER"):
        user = need(f"MLFLOW_{role}_USERNAME")
        print(f"{user}: {ensure_user(client, user, need(f'MLFLOW_{role}_PASSWORD'))}")
    tracking = MlflowClient(uri)
    for name in args.experiments:
        experiment = tracking.get_experiment_by_name(name)
        if experiment is None:
            print(f"experiment {name!r} does not exist yet: {pipeline} owns it once it makes it")
            continue
        client.grant_user_permission(pipeline, "experiment", experiment.experiment_id, "MANAGE")
        print(f"{pipeline}: MANAGE on experiment {name!r}")
    for name in args.models:
        client.grant_user_permission(pipeline, "registered_model", name, "MANAGE")
        print(f"{pipeline}: MANAGE on registered model {name!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
