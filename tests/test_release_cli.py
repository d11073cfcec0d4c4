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
    for command in ("models", "promote", "pull"):
        assert command in out
