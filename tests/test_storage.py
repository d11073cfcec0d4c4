import json
from pathlib import Path

import pytest

from loraflow.hashing import sha256_file
from loraflow.release.storage import MANIFEST, StoragePermanentError, open_store, push_tree


@pytest.fixture
def model_dirs(tmp_path):
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    (model / "sub").mkdir(parents=True)
    adapter.mkdir()
    (model / "model.safetensors").write_bytes(b"weights" * 1000)
    (model / "sub" / "config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    return {"model": model, "adapter": adapter}


def test_local_push_writes_files_and_a_manifest_of_their_hashes(tmp_path, model_dirs):
    store = open_store((tmp_path / "store").as_uri())
    pushed = push_tree(store, model_dirs, "m/1", {"version": "1"})
    root = tmp_path / "store" / "m" / "1"
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["version"] == "1"
    assert set(manifest["files"]) == {
        "model/model.safetensors",
        "model/sub/config.json",
        "adapter/adapter_model.safetensors",
    }
    for key, digest in manifest["files"].items():
        assert sha256_file(root / key) == digest
    assert pushed["uploaded"] == 3 and pushed["uri"] == f"{store.root}/m/1"


def test_repush_of_identical_files_uploads_nothing(tmp_path, model_dirs):
    store = open_store((tmp_path / "store").as_uri())
    push_tree(store, model_dirs, "m/1", {})
    assert push_tree(store, model_dirs, "m/1", {})["uploaded"] == 0
    (model_dirs["adapter"] / "adapter_model.safetensors").write_bytes(b"lora v2")
    assert push_tree(store, model_dirs, "m/1", {})["uploaded"] == 1


def test_s3_push_is_verified_idempotent_and_pullable(tmp_path, model_dirs, s3_env):
    store = open_store("s3://models/prod", endpoint_url=s3_env)
    pushed = push_tree(store, model_dirs, "m/7", {"version": "7"})
    assert pushed["uri"] == "s3://models/prod/m/7" and pushed["uploaded"] == 3
    manifest = store.read_json("m/7/manifest.json")
    for key, digest in manifest["files"].items():
        store.get(f"m/7/{key}", tmp_path / "pulled" / key)
        assert sha256_file(tmp_path / "pulled" / key) == digest
    assert push_tree(store, model_dirs, "m/7", {"version": "7"})["uploaded"] == 0


def test_missing_bucket_is_a_permanent_error(model_dirs, s3_env):
    store = open_store("s3://no-such-bucket/x", endpoint_url=s3_env)
    with pytest.raises(StoragePermanentError, match="NoSuchBucket"):
        push_tree(store, model_dirs, "m/1", {})


def test_a_large_file_goes_up_in_parts_and_is_verified_by_the_servers_sha256(tmp_path, s3_env):
    import boto3

    from loraflow.release.storage import pull_tree

    big = tmp_path / "big" / "model.safetensors"
    big.parent.mkdir()
    big.write_bytes(bytes(range(256)) * (11 * 4096))  # 11 MiB: parts of 5, 5 and 1 MiB
    store = open_store("s3://models/p", endpoint_url=s3_env, multipart_threshold_mb=5,
                       multipart_chunk_mb=5)  # fmt: skip
    seen = []
    pushed = push_tree(store, {"model": big.parent}, "m/1", {}, progress=seen.append)
    assert pushed["uploaded"] == 1 and sum(seen) == big.stat().st_size
    head = boto3.client("s3", endpoint_url=s3_env).head_object(
        Bucket="models", Key="p/m/1/model/model.safetensors"
    )
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert push_tree(store, {"model": big.parent}, "m/1", {})["uploaded"] == 0

    pulled = pull_tree(store, "m/1", tmp_path / "pulled")
    assert pulled["downloaded"] == 1
    assert sha256_file(tmp_path / "pulled" / "model" / "model.safetensors") == sha256_file(big)
    assert pull_tree(store, "m/1", tmp_path / "pulled")["downloaded"] == 0  # already verified


def test_an_upload_whose_stored_bytes_differ_is_caught(tmp_path, model_dirs, s3_env):
    from loraflow.release.storage import StorageIntegrityError

    store = open_store("s3://models/v", endpoint_url=s3_env)
    push_tree(store, model_dirs, "m/1", {})
    other = tmp_path / "other.bin"
    other.write_bytes(b"not the weights")
    with pytest.raises(StorageIntegrityError, match="the server.s SHA-256 .* is not that of"):
        store._verify(other, "m/1/model/model.safetensors", sha256_file(other), 15)


def test_a_pull_stops_at_a_corrupted_file_and_names_it(tmp_path, model_dirs):
    from loraflow.release.storage import StorageIntegrityError, pull_tree

    store = open_store((tmp_path / "store").as_uri())
    push_tree(store, model_dirs, "m/1", {})
    (tmp_path / "store" / "m" / "1" / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(
        StorageIntegrityError, match="adapter/adapter_model.safetensors: downloaded"
    ):
        pull_tree(store, "m/1", tmp_path / "pulled")
    assert not (tmp_path / "pulled" / "adapter" / "adapter_model.safetensors").exists()


def _tamper(store, prefix: str, key: str, body: bytes) -> None:
    """Add key -> sha256(body) to a pushed manifest and store body under it, as an attacker
    with write access to the store would (so the hash check alone would pass)."""
    import hashlib

    from loraflow.release.storage import _join

    manifest = store.read_json(_join(prefix, MANIFEST))
    manifest["files"][key] = hashlib.sha256(body).hexdigest()
    if hasattr(store, "client"):  # S3: the raw client, below the store's own key checks
        store.client.put_object(Bucket=store.bucket, Key=store._key(f"{prefix}/{MANIFEST}"),
                                Body=json.dumps(manifest).encode())  # fmt: skip
        store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{prefix}/{key}",
                                Body=body)  # fmt: skip
    else:
        (store.base / prefix / MANIFEST).write_text(json.dumps(manifest))
        if key.startswith("/"):
            return  # base / "/abs" is "/abs" itself: nothing to store for it
        target = store.base / prefix / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)


@pytest.mark.parametrize("key", ["../escaped.txt", "model/../../escaped.txt", "/tmp/abs.txt"])
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_tampered_manifest_writes_nothing_outside_the_destination(
    tmp_path, model_dirs, key, kind, request
):
    from loraflow.release.storage import UnsafeKeyError, pull_tree

    if kind == "s3":
        store = open_store("s3://models/t", endpoint_url=request.getfixturevalue("s3_env"))
    else:
        store = open_store((tmp_path / "store").as_uri())
    push_tree(store, model_dirs, "m/1", {})
    if key.startswith("/"):
        key = str(tmp_path / "abs.txt")
    _tamper(store, "m/1", key, b"owned")
    dest = tmp_path / "deep" / "pulled"
    with pytest.raises(UnsafeKeyError, match="refused key") as err:
        pull_tree(store, "m/1", dest)
    assert "manifest.json" in str(err.value)
    assert not (tmp_path / "deep" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "abs.txt").exists()
    assert not dest.exists() or not any(dest.rglob("*"))  # refused before any byte was written


def test_a_symlink_in_the_destination_cannot_carry_a_pull_outside(tmp_path, model_dirs):
    from loraflow.release.storage import UnsafeKeyError, pull_tree

    store = open_store((tmp_path / "store").as_uri())
    push_tree(store, model_dirs, "m/1", {})
    dest, outside = tmp_path / "pulled", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "model").symlink_to(outside)  # planted: model/... would land in outside/
    with pytest.raises(UnsafeKeyError, match="outside"):
        pull_tree(store, "m/1", dest)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_push_refuses_keys_that_would_leave_the_store_root(tmp_path, model_dirs, kind, request):
    from loraflow.release.storage import UnsafeKeyError

    if kind == "s3":
        store = open_store("s3://models/t", endpoint_url=request.getfixturevalue("s3_env"))
    else:
        store = open_store((tmp_path / "store").as_uri())
    for prefix in ("../m/1", "/m/1", "m/../../x"):
        with pytest.raises(UnsafeKeyError, match="refused key"):
            push_tree(store, model_dirs, prefix, {})
    with pytest.raises(UnsafeKeyError, match="refused key"):
        push_tree(store, {"../up": model_dirs["model"]}, "m/1", {})
    with pytest.raises(UnsafeKeyError):
        store.put(model_dirs["adapter"] / "adapter_model.safetensors", "../x", "0" * 64)
    assert not (tmp_path / "x").exists() and not (tmp_path / "m").exists()


def test_check_key_takes_plain_relative_paths_only():
    from loraflow.release.storage import UnsafeKeyError, check_key

    assert check_key("model/sub/config.json", "t") == "model/sub/config.json"
    for bad in ["", "/a", "a/../b", "..", "./a", "a//b", "a/", "a\\..\\b", "C:/x", "a\0b"]:
        with pytest.raises(UnsafeKeyError):
            check_key(bad, "t")


def test_an_unreachable_endpoint_is_named_not_a_raw_botocore_error(unused_port, monkeypatch):
    from loraflow.release.storage import StorageUnreachableError, pull_tree

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    dead = f"http://127.0.0.1:{unused_port}"
    store = open_store("s3://models/x", endpoint_url=dead)
    for action in (store.check, lambda: pull_tree(store, "m/1", Path("/nonexistent"))):
        with pytest.raises(StorageUnreachableError, match=f"object storage at {dead} cannot be"):
            action()
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)  # the endpoint in use, whichever way it came
    assert open_store("s3://models/x").endpoint == dead


def test_check_names_a_missing_bucket(s3_env):
    store = open_store("s3://no-such-bucket/x", endpoint_url=s3_env)
    with pytest.raises(StoragePermanentError, match="bucket 'no-such-bucket' does not exist"):
        store.check()
    open_store("s3://models/x", endpoint_url=s3_env).check()
