"""The release commands' errors: a message that says what is wrong and what to do, exit 1;
a bad override is a config error, exit 2. (The happy paths run against real servers in
test_servers.py.)"""

from loraflow.cli import main as cli


def test_models_of_an_unknown_name_says_so(capsys):
    assert cli(["models", "no-such-model"]) == 1
    assert "no registered model 'no-such-model'" in capsys.readouterr().err


def test_rollback_without_a_champion_says_so(capsys):
    assert cli(["promote", "no-such-model", "--rollback"]) == 1
    assert "has no champion to roll back" in capsys.readouterr().err


def test_promote_of_a_missing_version_fails_without_moving_anything(capsys):
    assert cli(["promote", "no-such-model", "--version", "7"]) == 1
    assert "loraflow promote:" in capsys.readouterr().err


def test_pull_with_a_bad_override_is_a_config_error(capsys, tmp_path):
    code = cli(["pull", "--dest", str(tmp_path), "--set", "storage.multipart_chunk_mb=1"])
    assert code == 2
    assert "storage.multipart_chunk_mb = 1" in capsys.readouterr().err


def test_help_lists_the_release_commands(capsys):
    try:
        cli(["--help"])
    except SystemExit as exit:
        assert exit.code == 0
    out = capsys.readouterr().out
    for command in ("models", "promote", "pull", "versions"):
        assert command in out


def test_versions_names_each_library_that_differs_from_what_the_version_trained_with(
    capsys, tmp_path
):
    """`loraflow versions` reads the lineage's libraries off a registered version: exit 0 when
    this environment has them all, 1 with the differing ones and the pins that restore them."""
    import json

    from mlflow import MlflowClient

    from loraflow.hashing import library_versions

    client, name = MlflowClient(), "versions-check"
    client.create_registered_model(name)
    here = library_versions()
    for libraries in (here, here | {"transformers": "5.17.0", "peft": "0.21.0+local"}):
        client.create_model_version(name, str(tmp_path), tags={
            "loraflow.libraries": json.dumps(libraries)})
    assert cli(["versions", name, "--version", "1"]) == 0
    assert "the same versions" in capsys.readouterr().out
    assert cli(["versions", name, "--version", "2"]) == 1
    out = capsys.readouterr().out
    assert f"transformers  5.17.0            {here['transformers']}" in out
    assert out.count("differs") == 2
    assert "pip install transformers==5.17.0 peft==0.21.0" in out


def _version(client, name: str, tmp_path, tags: dict[str, str]) -> str:
    import contextlib

    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # the second version of the same model
        client.create_registered_model(name)
    return client.create_model_version(name, str(tmp_path), tags=tags).version


def test_models_shows_each_metric_once_within_the_terminal(capsys, tmp_path, monkeypatch):
    """Every metric was printed twice (bare and test.*), wider than a terminal."""
    from mlflow import MlflowClient

    client, name = MlflowClient(), "models-table"
    metrics = {"exact_match": 0.672, "json_valid": 1.0, "json_structure": 0.98, "fuzzy": 0.91,
               "fuzzy_p10": 0.5, "fuzzy_p50": 0.95, "fuzzy_p90": 1.0, "loss": 0.41,
               "perplexity": 1.51}  # fmt: skip
    for version in ("1", "2"):
        tags = {f"metric.{k}": str(v) for k, v in metrics.items()}
        tags |= {f"metric.test.{k}": str(v) for k, v in metrics.items()}
        tags["loraflow.storage_uri"] = f"s3://models/loraflow/{name}/{version * 64}"
        _version(client, name, tmp_path, tags)
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "challenger", "2")
    monkeypatch.setenv("COLUMNS", "80")
    assert cli(["models", name]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines[1:]) <= 80, lines
    assert "test." not in "\n".join(lines)
    header = lines[1].split()
    assert header[:3] == ["version", "aliases", "exact_match"]  # the gate metric first
    assert lines[2].split()[:3] == ["2", "challenger", "0.672"]
    assert lines[3].split()[:3] == ["1", "champion", "0.672"]
    pushed = f"pushed to s3://models/loraflow/{name}/<merged model's SHA-256>"
    assert pushed in lines
    note = " ".join(lines[lines.index(pushed) + 1:])
    assert note.startswith("not shown (too wide): ")
    assert set(header[2:]) | set(note.split(": ", 1)[1].split(";")[0].split(", ")) == set(metrics)
    monkeypatch.setenv("COLUMNS", "200")
    assert cli(["models", name]) == 0
    assert "not shown" not in capsys.readouterr().out  # room for all of them


def test_promoting_the_champion_again_says_nothing_changed(capsys, tmp_path):
    """It said "champion is now v1 (was v1)" and exited 0, also to a user who may not write."""
    from mlflow import MlflowClient

    client, name = MlflowClient(), "promote-again"
    _version(client, name, tmp_path, {})
    assert cli(["promote", name, "--version", "1"]) == 0
    assert "champion is now v1" in capsys.readouterr().out
    tags = client.get_model_version(name, "1").tags
    assert cli(["promote", name, "--version", "1"]) == 0
    assert capsys.readouterr().out == f"{name}: v1 is already the champion; nothing changed\n"
    assert client.get_model_version(name, "1").tags == tags  # nothing written


def test_pull_without_dest_downloads_into_the_home_not_the_checkout(capsys, tmp_path, home):
    """`loraflow pull --dest ./model`, as documented, left an untracked model/ in the checkout;
    without --dest a version lands under $LORAFLOW_HOME/pulled, which make clean removes."""
    from mlflow import MlflowClient

    from loraflow.release.storage import open_store, push_tree

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    name = "pull-home"
    root = (tmp_path / "store").as_uri()
    push_tree(open_store(f"{root}/{name}/1"), {"model": model}, "", {"version": "1"})
    client = MlflowClient()
    _version(client, name, tmp_path, {"loraflow.storage_uri": f"{root}/{name}/1"})
    client.set_registered_model_alias(name, "champion", "1")
    assert cli(["pull", name]) == 0
    dest = home / "pulled" / f"{name}-v1"
    assert f"1 files verified in {dest}" in capsys.readouterr().out
    assert (dest / "model" / "config.json").read_text() == "{}"


def test_pull_format_downloads_that_export_alone_and_names_the_missing_ones(capsys, tmp_path,
                                                                           home):
    """`loraflow pull --format gguf-f16` fetches the version's GGUF export (checked against the
    manifest) and not the model beside it; a format the version was not exported in is refused
    with the formats it has."""
    from mlflow import MlflowClient

    from loraflow.release.storage import open_store, push_tree

    model, export = tmp_path / "model", tmp_path / "gguf"
    model.mkdir()
    export.mkdir()
    (model / "config.json").write_text("{}")
    (export / "model.gguf").write_bytes(b"GGUF" + bytes(64))
    (export / "Modelfile").write_text("FROM ./model.gguf\n")
    name = "pull-format"
    root = (tmp_path / "store").as_uri()
    push_tree(open_store(f"{root}/{name}/1"), {"model": model, "exports/gguf-f16": export}, "",
              {"version": "1"})
    client = MlflowClient()
    _version(client, name, tmp_path, {"loraflow.storage_uri": f"{root}/{name}/1",
                                      "loraflow.export.gguf-f16.agreement": "0.984375",
                                      "loraflow.export.gguf-f16/llama.cpp.agreement": "1"})
    dest = tmp_path / "pulled"
    assert cli(["pull", name, "--version", "1", "--format", "gguf-f16", "--dest", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"2 files verified in {dest / 'exports/gguf-f16'}" in out
    assert ("gguf-f16 answered 98.4% of the test prompts as the evaluated model did (in "
            "llama.cpp: 100.0%)") in out
    assert (dest / "exports" / "gguf-f16" / "model.gguf").read_bytes() == b"GGUF" + bytes(64)
    assert not (dest / "model").exists()  # only the export asked for

    assert cli(["pull", name, "--version", "1", "--format", "vllm", "--dest", str(dest)]) == 1
    err = capsys.readouterr().err
    assert "has no vllm export (exported: gguf-f16). Fix: add it to export.formats" in err
