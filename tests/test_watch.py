"""The data watcher: new complete files once per content, half-written files never, the same
bytes never twice (across names and restarts), local directories and S3 prefixes alike."""

import uuid
from pathlib import Path

import pytest

from loraflow.data.watch import Watcher, hash_source, state_path


def collect(watcher: Watcher) -> list[str]:
    return [landed.uri for landed in watcher.poll(lambda landed: None)]


def test_a_file_lands_once_when_its_size_is_stable(tmp_path: Path):
    inbox, state = tmp_path / "inbox", tmp_path / "state.json"
    inbox.mkdir()
    watcher = Watcher(str(inbox), state)
    data = inbox / "a.jsonl"
    data.write_text('{"instruction": "x", "output": "y"}\n')
    assert collect(watcher) == []  # first sight: maybe still being written
    with data.open("a") as f:  # still growing
        f.write('{"instruction": "x2", "output": "y2"}\n')
    assert collect(watcher) == []
    (landed,) = watcher.poll(lambda landed: None)  # same size as last poll: complete
    assert landed.uri == str(data) and landed.sha256 == hash_source(str(data))
    assert collect(watcher) == []  # reported once

    # a restart reads the state: the same bytes under another name are not new data
    again = Watcher(str(inbox), state)
    (inbox / "copy.jsonl").write_bytes(data.read_bytes())
    (inbox / "notes.txt").write_text("ignored: not *.jsonl")
    (inbox / ".hidden.jsonl").write_text("ignored: hidden (an upload in progress)")
    assert collect(again) == [] and collect(again) == []
    copies = []
    assert again.poll(lambda landed: None, lambda landed, first: copies.append(first)) == []
    assert copies == [] and again.state["copies"] == {str(inbox / "copy.jsonl"): str(data)}
    # changed bytes are new data
    data.write_text('{"instruction": "new", "output": "data"}\n')
    assert collect(again) == []
    assert collect(again) == [str(data)]


def test_marker_file_means_complete_and_a_failed_emit_is_retried(tmp_path: Path):
    watcher = Watcher(str(tmp_path), tmp_path / ".state" / "s.json", marker=".done")
    (tmp_path / "b.jsonl").write_text("{}\n")
    assert collect(watcher) == []  # no marker yet, however stable
    assert collect(watcher) == []
    (tmp_path / "b.jsonl.done").touch()

    def fail(landed):
        raise ConnectionError("server down")

    with pytest.raises(ConnectionError):
        watcher.poll(fail)
    assert collect(watcher) == [str(tmp_path / "b.jsonl")]  # not lost: comes again


def test_s3_prefix(s3_env, monkeypatch, tmp_path: Path):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.put_object(Bucket="models", Key="incoming/a.jsonl", Body=b'{"a": 1}\n')
    s3.put_object(Bucket="models", Key="elsewhere/b.jsonl", Body=b'{"b": 1}\n')
    watcher = Watcher("s3://models/incoming", tmp_path / "s.json")
    assert collect(watcher) == []
    (landed,) = watcher.poll(lambda landed: None)
    assert landed.uri == "s3://models/incoming/a.jsonl" and landed.size == 9
    s3.put_object(Bucket="models", Key="incoming/c.jsonl", Body=b'{"a": 1}\n')  # same bytes
    assert collect(watcher) == [] and collect(watcher) == []


def test_a_missing_directory_is_created_and_a_file_is_refused(tmp_path: Path):
    watcher = Watcher(str(tmp_path / "new" / "inbox"), tmp_path / "s.json")
    assert (tmp_path / "new" / "inbox").is_dir() and watcher.location == str(tmp_path / "new/inbox")
    (tmp_path / "file.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Watcher(str(tmp_path / "file.jsonl"), tmp_path / "s.json")
    assert state_path(tmp_path, "s3://b/p/") == state_path(tmp_path, "s3://b/p")


def test_a_relative_location_is_reported_as_an_absolute_uri(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    watcher = Watcher("in", tmp_path / "s.json")
    (tmp_path / "in" / "a.jsonl").write_text("{}\n")
    assert collect(watcher) == [] and collect(watcher) == [str(tmp_path / "in" / "a.jsonl")]


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("{inbox}/a.jsonl", True),
        ("{inbox}/sub/a.jsonl", True),
        ("file://{inbox}/a.jsonl", True),
        ("{inbox}", False),  # the directory itself is no data file
        ("{inbox}/../secret.jsonl", False),
        ("{inbox}-evil/a.jsonl", False),  # a sibling that shares the name's start
        ("{tmp}/link/a.jsonl", False),  # a symlink from outside into... somewhere else
        ("/etc/passwd", False),
        ("relative/a.jsonl", False),
        ("s3://data/incoming/a.jsonl", True),
        ("s3://data/incoming/../private/a.jsonl", False),
        ("s3://data/incoming-evil/a.jsonl", False),
        ("s3://other/incoming/a.jsonl", False),
    ],
)
def test_data_uris_are_accepted_only_under_the_allowed_prefixes(tmp_path: Path, uri, ok):
    from loraflow.data.watch import DataLocationError, check_data_uri

    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (inbox / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    allowed = [str(inbox), "s3://data/incoming/"]
    uri = uri.format(inbox=inbox, tmp=tmp_path)
    if ok:
        assert check_data_uri(uri, allowed) == uri
    else:
        with pytest.raises(DataLocationError, match=f"not under any location.*{inbox}, s3://data"):
            check_data_uri(uri, allowed)


def test_a_symlink_inside_the_allowed_directory_cannot_reach_outside(tmp_path: Path):
    from loraflow.data.watch import DataLocationError, check_data_uri

    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "out").symlink_to("/etc")
    with pytest.raises(DataLocationError):
        check_data_uri(str(tmp_path / "inbox" / "out" / "passwd"), [str(tmp_path / "inbox")])
    with pytest.raises(DataLocationError, match="allows no data locations"):
        check_data_uri(str(tmp_path / "inbox" / "a.jsonl"), [])


def test_watch_command_needs_a_prefect_server(tmp_path: Path, monkeypatch, capsys):
    from loraflow.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["watch", str(tmp_path), "--once"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


class FakePrefect:
    """Prefect's sync client as the watcher uses it: POST /events, recorded; `down` refuses."""

    def __init__(self, down: bool = False):
        self.posted: list[dict] = []
        self.down = down

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def request(self, method: str, path: str, json: list[dict]):
        import httpx

        if self.down:
            raise httpx.ConnectError("connection refused")
        assert (method, path) == ("POST", "/events")
        self.posted.extend(json)


def fake_prefect(monkeypatch, client: FakePrefect) -> None:
    import prefect.client.orchestration

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda **kw: client)
    # no server here: the check that a Prefect server answers (test_credentials) is stubbed out
    monkeypatch.setattr("loraflow.credentials.check_prefect", lambda *args, **kwargs: None)


@pytest.mark.parametrize("feedback", [False, True])
def test_watch_emits_data_or_feedback_events(tmp_path: Path, monkeypatch, capsys, feedback):
    """--feedback: loraflow.feedback.landed on loraflow.feedback.<sha256> (prefect.yaml's align
    trigger); otherwise loraflow.data.landed (the finetune trigger). The id derives from the
    content, so a second watcher of the same data sends the same event."""
    from loraflow.cli import main
    from loraflow.cli.watch import EVENT_NAMESPACE
    from loraflow.data.watch import DATA_LANDED, FEEDBACK_LANDED

    client = FakePrefect()
    fake_prefect(monkeypatch, client)
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))
    watched = tmp_path / "in"
    watched.mkdir()
    (watched / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    args = ["watch", str(watched), "--once", "--interval", "0"] + (["--feedback"] * feedback)
    assert main(args) == 0
    (event,) = client.posted
    kind = "feedback" if feedback else "data"
    payload, resource = event["payload"], event["resource"]
    assert event["event"] == (FEEDBACK_LANDED if feedback else DATA_LANDED)
    assert resource["prefect.resource.id"] == f"loraflow.{kind}.{payload['sha256']}"
    assert payload["uri"].endswith("pairs.jsonl")
    assert event["id"] == str(uuid.uuid5(EVENT_NAMESPACE, payload["sha256"]))


def test_an_event_the_server_did_not_take_is_sent_again_on_a_later_poll(
    tmp_path: Path, monkeypatch, capsys
):
    """The Prefect server down past the client's retries: the watcher says so, keeps polling,
    exits 1 under --once, and the file is not remembered, so the next watch sends it."""
    from loraflow.cli import main

    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))
    watched = tmp_path / "in"
    watched.mkdir()
    (watched / "orders.jsonl").write_text('{"instruction": "i", "output": "o"}\n')
    args = ["watch", str(watched), "--once", "--interval", "0"]
    fake_prefect(monkeypatch, FakePrefect(down=True))
    assert main(args) == 1
    assert "was not delivered" in capsys.readouterr().err
    client = FakePrefect()
    fake_prefect(monkeypatch, client)
    assert main(args) == 0
    (event,) = client.posted
    assert event["payload"]["uri"] == str(watched / "orders.jsonl")


def test_a_second_watcher_on_the_same_state_file_is_refused(tmp_path: Path, monkeypatch, capsys):
    """Two watchers of one location on one home would overwrite each other's state: the second
    is told to use a home of its own."""
    import fcntl

    from loraflow.cli import main
    from loraflow.data.watch import state_path

    home = tmp_path / "home"
    monkeypatch.setenv("LORAFLOW_HOME", str(home))
    fake_prefect(monkeypatch, FakePrefect())
    watched = tmp_path / "in"
    watched.mkdir()
    lock_file = state_path(home, str(watched)).with_suffix(".lock")
    lock_file.parent.mkdir(parents=True)
    with lock_file.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first watcher
        assert main(["watch", str(watched), "--once", "--interval", "0"]) == 2
    assert "run a second watcher with a LORAFLOW_HOME of its own" in capsys.readouterr().err
