import json

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
