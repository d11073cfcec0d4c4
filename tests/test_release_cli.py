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
