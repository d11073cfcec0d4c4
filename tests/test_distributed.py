"""The engine under torchrun, for real: several CPU processes joined by gloo (one host), and a
two-node rendezvous on one host. The same code runs one process a GPU with NCCL."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from loraflow.config import LaunchConfig, LoraSettings, PipelineConfig, TrainConfig
from loraflow.engine.batches import (
    ExampleStream,
    answer_tokens,
    collate,
    next_micro_batch,
    read_examples,
    row_counts,
)
from loraflow.engine.config import EngineConfig
from loraflow.engine.launch import launch_command
from loraflow.engine.loop import steps_for_epochs


def engine(tmp_path, tiny_model_dir, tokenized, name, processes=1, nodes=1, port=0,
           parallelism="ddp", **train):
    """The run directory and the launch command the train task would use."""
    out = tmp_path / name
    settings = dict(micro_batch_size=2, learning_rate=2e-2, warmup_steps=0, batching="packed",
                    seq_len=512, lr_schedule="constant", watchdog_seconds=0, seed=3) | train
    cfg = EngineConfig(base_path=tiny_model_dir, data_dir=tokenized, output_dir=out,
                       lora=LoraSettings(dropout=0.0), train=TrainConfig(**settings),
                       launch=LaunchConfig(parallelism=parallelism))
    config_file = tmp_path / f"{name}.json"
    config_file.write_text(cfg.model_dump_json())
    return out, launch_command(["--config", str(config_file)], processes, nodes,
                               f"127.0.0.1:{port}", name)


def run(command, **env):
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return done


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rows_counts_without_collating_agree_with_the_collated_labels(tokenized):
    stream = ExampleStream(read_examples(tokenized, "train"), seed=0)
    for packed in (True, False):
        rows = next_micro_batch(stream, TrainConfig(micro_batch_size=3, seq_len=512), packed)
        batch = collate(rows, pad_id=0)
        assert row_counts(rows) == (answer_tokens(batch), int((batch["doc_ids"] >= 0).sum()))


def test_epochs_count_the_steps_that_show_every_example_once(tokenized):
    examples = read_examples(tokenized, "train")
    padded = TrainConfig(micro_batch_size=4, grad_accum_steps=2, epochs=2)
    assert steps_for_epochs(examples, padded, packed=False) == -(-2 * len(examples) // 8)
    packed = TrainConfig(micro_batch_size=2, seq_len=512, epochs=1)
    steps = steps_for_epochs(examples, packed, packed=True)
    stream, seen = ExampleStream(examples, seed=0), []
    for _ in range(steps):
        assert stream.position < len(examples)  # no step beyond the epoch
        seen += [e for row in next_micro_batch(stream, packed, True) for e in row]
    assert stream.position >= len(examples)
    assert sorted(seen[: len(examples)]) == sorted(examples)  # each example once


def test_two_processes_train_exactly_as_one_with_double_accumulation(
    tmp_path, tiny_model_dir, tokenized
):
    one, command = engine(tmp_path, tiny_model_dir, tokenized, "one", grad_accum_steps=2,
                          max_steps=4, eval_every=2)
    assert run(command).returncode == 0
    two, command = engine(tmp_path, tiny_model_dir, tokenized, "two", processes=2,
                          max_steps=4, eval_every=2, checkpoint_every=2)
    assert command[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in command
    done = run(command)
    assert done.returncode == 0, done.stderr[-3000:]

    for a, b in zip(records(one), records(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["tokens"] == a["tokens"]  # both ranks' tokens counted once
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # summed, not averaged
        assert b.get("val_loss", 0) == pytest.approx(a.get("val_loss", 0), rel=1e-4)
    assert json.loads((two / "result.json").read_text())["world_size"] == 2
    state = json.loads((two / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["rows_per_step"] == 4
    # rank 0 alone wrote: one metrics line per step, no per-rank files
    assert len(records(two)) == 4
    assert sorted(p.name for p in two.iterdir()) == [
        "adapter", "checkpoints", "metrics.jsonl", "result.json"]

    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


def test_a_checkpoint_from_two_processes_resumes_on_one_with_the_same_effective_batch(
    tmp_path, tiny_model_dir, tokenized
):
    whole, command = engine(tmp_path, tiny_model_dir, tokenized, "whole", grad_accum_steps=2,
                            max_steps=6)
    assert run(command).returncode == 0
    # 3 steps on two processes (checkpoint at 3), then the same run directory on one process
    # with accumulation 1: the engine raises it to 2 to keep 4 rows per step.
    moved, command = engine(tmp_path, tiny_model_dir, tokenized, "moved", processes=2,
                            max_steps=3, checkpoint_every=3)
    assert run(command).returncode == 0
    moved, command = engine(tmp_path, tiny_model_dir, tokenized, "moved", max_steps=6,
                            checkpoint_every=3)
    done = run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "grad_accum_steps becomes 2" in done.stderr
    assert [r["loss"] for r in records(moved)] == pytest.approx(
        [r["loss"] for r in records(whole)], rel=1e-4)


def assert_half_held(stderr, base):
    """The engine's fsdp line says rank 0 holds half of every weight but the output head's
    (whole on each rank)."""
    match = re.search(r"fsdp: rank 0 holds ([\d,]+) of the model's ([\d,]+) weights", stderr)
    assert match, stderr[-3000:]
    held, total = (int(n.replace(",", "")) for n in match.groups())
    config = json.loads((base / "config.json").read_text())
    head = config["vocab_size"] * config["hidden_size"]
    assert held - head == pytest.approx((total - head) / 2, rel=0.01)


def test_fsdp_on_two_processes_trains_exactly_as_one_with_double_accumulation(
    tmp_path, tiny_model_dir, tokenized
):
    # 5 validation examples, 2 a pass: rank 0 makes two passes, rank 1 (with 2) one and a
    # spare, as every forward under FSDP needs all ranks
    data = tmp_path / "five"
    data.mkdir()
    shutil.copy(tokenized / "train.parquet", data)
    (data / "validation.jsonl").write_text("".join(
        json.dumps({"input_ids": ids, "prompt_len": n}) + "\n"
        for ids, n, _ in read_examples(tokenized, "validation")[:5]))
    one, command = engine(tmp_path, tiny_model_dir, data, "one", grad_accum_steps=2,
                          max_steps=4, eval_every=2, max_grad_norm=0.2)
    assert run(command).returncode == 0
    two, command = engine(tmp_path, tiny_model_dir, data, "fsdp", processes=2,
                          max_steps=4, eval_every=2, checkpoint_every=2, parallelism="fsdp",
                          gradient_checkpointing=True, max_grad_norm=0.2)
    done = run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_half_held(done.stderr, tiny_model_dir)

    for a, b in zip(records(one), records(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["tokens"] == a["tokens"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # summed, all shards
        assert b.get("val_loss", 0) == pytest.approx(a.get("val_loss", 0), rel=1e-4)
    assert any(r["grad_norm"] > 0.2 for r in records(one))  # clipping took part
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


def test_checkpoints_move_between_ddp_and_fsdp(tmp_path, tiny_model_dir, tokenized):
    whole, command = engine(tmp_path, tiny_model_dir, tokenized, "whole", grad_accum_steps=2,
                            max_steps=6)
    assert run(command).returncode == 0
    # steps 1-2 on one process, 3-4 under fsdp on two (loads a whole checkpoint into shards,
    # saves its shards whole), 5-6 on one process again (loads what fsdp wrote)
    moved = tmp_path / "moved"
    for steps, more in ((2, dict(grad_accum_steps=2)),
                        (4, dict(processes=2, parallelism="fsdp")),
                        (6, dict(grad_accum_steps=1))):
        moved, command = engine(tmp_path, tiny_model_dir, tokenized, "moved", max_steps=steps,
                                checkpoint_every=2, **more)
        done = run(command)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"resuming from {moved / 'checkpoints'}" in done.stderr or steps == 2
    assert [r["loss"] for r in records(moved)] == pytest.approx(
        [r["loss"] for r in records(whole)], rel=1e-4)
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(moved / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


def test_fsdp_refuses_quantized_or_fp16_weights():
    for precision in ("fp8", "nf4", "int8", "fp16"):
        with pytest.raises(ValidationError, match=f"parallelism=fsdp cannot use precision="
                                                  f"{precision}"):
            PipelineConfig(launch={"parallelism": "fsdp"}, train={"precision": precision})
        with pytest.raises(ValidationError, match=f"precision={precision}"):  # align's too
            PipelineConfig(launch={"parallelism": "fsdp"},
                           align={"training": {"precision": precision}})
    cfg = PipelineConfig(launch={"parallelism": "fsdp"}, train={"precision": "bf16"})
    assert cfg.launch.parallelism == "fsdp"


@pytest.mark.gpu
def test_fsdp_on_two_gpus_trains_as_one_gpu_and_holds_a_share_of_the_weights(
    tmp_path, tiny_model_dir, tokenized
):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    one, command = engine(tmp_path, tiny_model_dir, tokenized, "one", grad_accum_steps=2,
                          max_steps=4, eval_every=2)
    done = run(command, CUDA_VISIBLE_DEVICES="0")
    assert done.returncode == 0, done.stderr[-3000:]
    two, command = engine(tmp_path, tiny_model_dir, tokenized, "fsdp", processes=2,
                          max_steps=4, eval_every=2, checkpoint_every=2, parallelism="fsdp")
    done = run(command, CUDA_VISIBLE_DEVICES="0,1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_half_held(done.stderr, tiny_model_dir)
    for a, b in zip(records(one), records(two), strict=True):  # bf16: sums in another order
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2)
        assert b.get("val_loss", 0) == pytest.approx(a.get("val_loss", 0), rel=2e-2)
    # and the fsdp checkpoint resumes on one GPU
    more, command = engine(tmp_path, tiny_model_dir, tokenized, "fsdp", max_steps=6,
                           grad_accum_steps=2, checkpoint_every=2)
    done = run(command, CUDA_VISIBLE_DEVICES="0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and len(records(more)) == 6


def test_two_node_ranks_meet_at_a_rendezvous_endpoint(
    tmp_path, tiny_model_dir, tokenized, unused_port
):
    one, command = engine(tmp_path, tiny_model_dir, tokenized, "one", grad_accum_steps=2,
                          max_steps=3)
    assert run(command).returncode == 0
    out, command = engine(tmp_path, tiny_model_dir, tokenized, "nodes", nodes=2,
                          port=unused_port, max_steps=3)
    assert command[command.index("--nnodes"):][:2] == ["--nnodes", "2"]
    assert f"127.0.0.1:{unused_port}" in command
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torch.cuda.is_available():  # each "machine" has its own GPU, as two hosts would
        if torch.cuda.device_count() < 2:
            pytest.skip("two node ranks on one host need two GPUs (NCCL: one rank a GPU)")
        visible = [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(2)]
    else:
        visible = [{}, {}]
    # Two launches, as two machines would start them: the same command, nothing else shared.
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env | visible[i]) for i in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    assert [r["loss"] for r in records(out)] == pytest.approx(
        [r["loss"] for r in records(one)], rel=1e-4)


def test_the_watchdog_names_the_rank_that_stopped(tmp_path, tiny_model_dir, tokenized):
    out, command = engine(tmp_path, tiny_model_dir, tokenized, "hang", processes=2,
                          max_steps=6, watchdog_seconds=3.0)
    start = time.monotonic()
    at = command.index("loraflow.engine")  # the engine's entry point with a stalled rank 1
    command = [*command[:at], "faulty_engine", "--stall-seconds", "120", "--stall-rank", "1",
               *command[at + 1 :]]
    done = run(command, PYTHONPATH=str(Path(__file__).parent))
    assert done.returncode != 0
    assert time.monotonic() - start < 100
    failure = json.loads((out / "failure.json").read_text())
    assert failure["kind"] == "hung" and failure["rank"] == 0
    assert "after step 2 on rank 0" in failure["message"]
    assert "Stopped: rank 1" in failure["message"] and "phase 'compute'" in failure["message"]


def test_the_launch_is_plain_python_for_one_process():
    assert launch_command(["--config", "x.json"], 1, 1, "h:1", "r") == [
        sys.executable, "-m", "loraflow.engine", "--config", "x.json"]


# One rank of the fsdp benchmark's path (benchmarks/train_bench.py, fsdp70b) on a tiny
# architecture: built on the meta device, sharded, filled with random weights, trained by fit.
RANDOM_FSDP_RANK = """
import json, math, random, sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loraflow.config import LoraSettings, TrainConfig
from loraflow.engine import distributed
from loraflow.engine.loop import fit

root, out = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(root / "benchmarks"))
from train_bench import random_base_sharded, run_fsdp_random

arch = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0)
ranks = distributed.init("cpu", 120)
rng = random.Random(0)
examples = []
for _ in range(100):
    n = rng.randrange(16, 100)
    examples.append(([1] + [rng.randrange(3, 256) for _ in range(n - 2)] + [2], n // 2))
cfg = TrainConfig(precision="fp32", batching="packed", seq_len=256,
                  micro_batch_size=2, max_steps=3, warmup_steps=0, learning_rate=1e-2,
                  lr_schedule="constant", gradient_checkpointing=True, watchdog_seconds=0)
model = random_base_sharded(LlamaConfig(**arch), cfg, LoraSettings(dropout=0.0), "cpu", "sdpa",
                            ranks)
fresh = LlamaForCausalLM(LlamaConfig(**arch))
built, expected = list(model.buffers()), list(fresh.buffers())
rotary = len(built) == len(expected) > 0 and all(
    torch.equal(a, b) for a, b in zip(built, expected))

def lora():
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.clone() for k, v in distributed.full_tensors(trainable).items()}

head = model.get_base_model().lm_head.weight
q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.to_local()
facts = {"held": distributed.held_weights(model),
         "total": sum(p.numel() for p in model.parameters()), "head": head.numel(),
         "head_sum": float(head.double().sum()), "q_std": float(q.std()), "rotary": rotary}
before = lora()
(out / "fit").mkdir(exist_ok=True)
fit(model, train_set=examples, val_set=[], t=cfg, out=out / "fit", pad_id=0, dtype=torch.float32,
    attn_impl="sdpa", packed=True, ranks=ranks)
after = lora()
facts["b_zero_before"] = all(not v.any() for k, v in before.items() if "lora_B" in k)
facts["lora_changed"] = all(not torch.equal(before[k], after[k]) for k in before
                            if "lora_B" in k)
if ranks.main:
    lines = (out / "fit" / "metrics.jsonl").read_text().splitlines()
    facts["losses"] = [json.loads(line)["loss"] for line in lines]
facts["bench"] = run_fsdp_random(examples, 1, ranks, arch, micro_batch=2, seq_len=256,
                                 device="cpu")
(out / f"rank{ranks.rank}.json").write_text(json.dumps(facts))
distributed.shutdown(ranks)
"""


def test_the_fsdp_benchmark_builds_random_shards_on_each_rank_and_trains(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANDOM_FSDP_RANK)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", str(script), root, str(tmp_path)],
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for facts in ranks:
        # each rank holds half of every weight but the head's, whole on both (and the same)
        assert facts["held"] - facts["head"] == pytest.approx(
            (facts["total"] - facts["head"]) / 2, rel=0.01)
        assert facts["head_sum"] == ranks[0]["head_sum"]
        assert facts["rotary"]  # computed, not what to_empty left
        assert 0.015 < facts["q_std"] < 0.025  # the random fill: normal(0, 0.02)
        assert facts["b_zero_before"] and facts["lora_changed"]
    losses = ranks[0]["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # small random weights predict about uniformly over the 256 tokens (to_empty's garbage
    # left in any weight would not)
    assert losses[0] == pytest.approx(math.log(256), abs=0.05)
    bench = ranks[0]["bench"]  # the benchmark's own numbers on the same path
    assert bench["held_per_rank"] == [ranks[0]["held"], ranks[1]["held"]]
    assert bench["weights"] == ranks[0]["total"] and bench["real_tokens_per_s"] > 0
    assert len(bench["losses"]) == 3 and all(math.isfinite(x) for x in bench["losses"])
    assert ranks[1]["bench"] == {}
