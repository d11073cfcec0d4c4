import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loraflow.base_model import load_model
from loraflow.config import LoraSettings, TrainConfig
from loraflow.engine.batches import read_examples
from loraflow.engine.config import EngineConfig
from loraflow.engine.loop import fit, lr_factor
from loraflow.engine.model import add_lora


def test_training_moves_only_adapter_weights(tmp_path, tiny_model_dir, tokenized):
    model = add_lora(load_model(tiny_model_dir), LoraSettings())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(max_steps=3, micro_batch_size=4, learning_rate=1e-2, warmup_steps=0)
    fit(model, train_set=read_examples(tokenized, "train"), val_set=[], t=cfg, out=tmp_path,
        pad_id=3, dtype=torch.float32)
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    frozen = [n for n in before if "lora_" not in n]
    assert lora and frozen
    assert all(torch.equal(before[n], after[n]) for n in frozen), "a base weight moved"
    assert all(not after[n].requires_grad for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)


def test_engine_process_writes_metrics_adapter_and_learns(tmp_path, tiny_model_dir, tokenized):
    out = tmp_path / "run"
    cfg = EngineConfig(
        base_path=tiny_model_dir,
        data_dir=tokenized,
        output_dir=out,
        lora=LoraSettings(target_modules=["all-linear"], dropout=0.0),
        train=TrainConfig(
            max_steps=25, micro_batch_size=8, learning_rate=5e-2, warmup_steps=2, eval_every=10
        ),
    )
    (tmp_path / "engine.json").write_text(cfg.model_dump_json())
    done = subprocess.run(
        [sys.executable, "-m", "loraflow.engine", "--config", str(tmp_path / "engine.json")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 26))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= records[0].keys()
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 25]
    # it learns: a random 2-layer model starts near ln(512) = 6.24 and moves slowly, so the bar
    # is a clear drop in training loss and a validation loss that falls at every evaluation
    assert records[-1]["loss"] < records[0]["loss"] - 0.1
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[0] > val[1] > val[2]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.partial"))
    assert json.loads((out / "result.json").read_text())["steps"] == 25


def test_engine_imports_neither_prefect_nor_mlflow():
    code = (
        "import sys, loraflow.engine.__main__, loraflow.engine.launch; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr_schedule="cosine")
    factors = [lr_factor(s, cfg) for s in range(10)]
    assert factors[0] == 0.5 and factors[1] == 1.0
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert lr_factor(10, cfg) == pytest.approx(0.0)


def test_packed_rows_give_each_example_the_loss_it_has_alone(tiny_model_dir, tokenized):
    """Attention stays inside each packed example: per-example losses match unpacked ones."""
    from loraflow.engine.batches import collate
    from loraflow.engine.loss import completion_loss

    model = add_lora(load_model(tiny_model_dir), LoraSettings(dropout=0.0)).eval()
    examples = read_examples(tokenized, "train")[:5]
    alone = []
    with torch.no_grad():
        for example in examples:
            batch = collate([[example]], pad_id=3)
            n = int((batch["labels"][:, 1:] != -100).sum())
            alone.append(float(completion_loss(model, batch, n, "sdpa")) * n)
        width = sum(len(e[0]) for e in examples) + 7  # some padding at the end too
        packed = collate([examples], pad_id=3, width=width)
        n_all = int((packed["labels"][:, 1:] != -100).sum())
        together = float(completion_loss(model, packed, n_all, "sdpa")) * n_all
        # and with the isolation removed, the same row gives a different loss
        leaky = dict(packed, doc_ids=torch.where(packed["doc_ids"] >= 0, 0, -1))
        crossed = float(completion_loss(model, leaky, n_all, "sdpa")) * n_all
    assert together == pytest.approx(sum(alone), rel=1e-5)
    assert abs(crossed - sum(alone)) > 1e-3


def engine_run(tmp_path, tiny_model_dir, tokenized, name, **train):
    out = tmp_path / name
    cfg = EngineConfig(base_path=tiny_model_dir, data_dir=tokenized, output_dir=out,
                       lora=LoraSettings(dropout=0.1),
                       train=TrainConfig(micro_batch_size=4, learning_rate=1e-2,
                                         warmup_steps=1, **train))
    config_file = tmp_path / f"{name}.json"
    config_file.write_text(cfg.model_dump_json())
    return out, [sys.executable, "-m", "loraflow.engine", "--config", str(config_file)]


# The engine's own entry point with a fault installed (tests/faulty_engine.py).
TESTS_ON_PATH = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])}


def with_fault(command: list[str], *fault: str) -> list[str]:
    """`python -m loraflow.engine ARGS` as `python -m faulty_engine FAULT ARGS`."""
    at = command.index("loraflow.engine")
    return [*command[:at], "faulty_engine", *fault, *command[at + 1 :]]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_run_resumes_from_its_checkpoint_on_the_same_loss_curve(
    tmp_path, tiny_model_dir, tokenized
):
    whole, command = engine_run(tmp_path, tiny_model_dir, tokenized, "whole", max_steps=12,
                                checkpoint_every=4, batching="packed", seq_len=512)
    subprocess.run(command, check=True, capture_output=True)

    cut, command = engine_run(tmp_path, tiny_model_dir, tokenized, "cut", max_steps=12,
                              checkpoint_every=4, batching="packed", seq_len=512)
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (cut / "checkpoints" / "step-0000008").is_dir():  # let two checkpoints land
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cut / "adapter").exists()
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    assert json.loads((cut / "result.json").read_text())["resumed_from"] >= 8
    assert losses(cut) == pytest.approx(losses(whole), rel=1e-4)  # dropout RNG restored too
    assert len(list((cut / "checkpoints").glob("step-*"))) == 2  # retention


def test_checkpoints_are_on_by_default_and_a_run_killed_by_process_group_resumes_by_time(
    tmp_path, tiny_model_dir, tokenized
):
    """The default config checkpoints by time (no checkpoint_every needed). With a short
    interval, killing the engine's whole process group mid-run and starting it again resumes
    from the last time checkpoint and ends on the same losses as a run never killed."""
    assert TrainConfig().checkpoint_minutes == 15.0 and TrainConfig().checkpoint_every == 0
    settings = {"max_steps": 16, "batching": "packed", "seq_len": 512, "checkpoint_every": 0}
    whole, command = engine_run(tmp_path, tiny_model_dir, tokenized, "whole",
                                checkpoint_minutes=0, **settings)
    from loraflow.engine.run import train

    train(EngineConfig.model_validate_json(Path(command[-1]).read_text()))  # in this process
    assert not (whole / "checkpoints").exists()  # neither rule on: none taken

    # 0.001 min = 60 ms: longer than a few of the tiny model's steps, so not at every step
    cut, command = engine_run(tmp_path, tiny_model_dir, tokenized, "cut",
                              checkpoint_minutes=0.001, **settings)
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((cut / "checkpoints").glob("step-*")) or len(losses(cut)) < 6:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the whole group, as a crashed worker would lose it
    process.wait()
    assert not (cut / "adapter").exists()
    taken = sorted(int(p.name.split("-")[1]) for p in (cut / "checkpoints").glob("step-*"))
    assert taken and taken[-1] < 16

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    assert json.loads((cut / "result.json").read_text())["resumed_from"] >= taken[-1]
    assert losses(cut) == pytest.approx(losses(whole), rel=1e-4)


def test_result_json_reports_the_config_the_engine_trained_with(
    tmp_path, tiny_model_dir, tokenized
):
    """The engine adjusts the TrainConfig it is given (train.epochs becomes max_steps; a resume
    keeps the checkpoint's rows per step; on a GPU preflight fits the micro-batch): result.json's
    `config` is the one it trained with, every other field as asked."""
    from loraflow.engine.run import train

    def run(name, **settings):
        out, command = engine_run(tmp_path, tiny_model_dir, tokenized, name, **settings)
        asked = EngineConfig.model_validate_json(Path(command[-1]).read_text())
        train(asked)
        trained = json.loads((out / "result.json").read_text())["config"]
        return asked.train, TrainConfig.model_validate(trained), losses(out)

    asked, trained, curve = run("epochs", epochs=1, grad_accum_steps=2)
    assert trained.max_steps == len(curve) != asked.max_steps
    assert trained == asked.model_copy(update={"max_steps": len(curve)})

    asked, trained, _ = run("resumed", max_steps=2, grad_accum_steps=2, checkpoint_every=2)
    assert trained == asked
    # the same run directory asked for 4 rows a step: the checkpoint trained 8, so 8 it stays
    asked, trained, _ = run("resumed", max_steps=4, grad_accum_steps=1, checkpoint_every=2)
    assert (asked.grad_accum_steps, trained.grad_accum_steps) == (1, 2)
    assert trained == asked.model_copy(update={"grad_accum_steps": 2})


def test_the_time_rule_waits_for_the_interval_and_skips_the_last_step():
    from loraflow.engine.checkpoints import checkpoint_due

    by_time = TrainConfig(checkpoint_minutes=15)
    assert not checkpoint_due(by_time, 7, False, 14.9 * 60)
    assert checkpoint_due(by_time, 8, False, 15 * 60)
    assert not checkpoint_due(by_time, 40, True, 60 * 60)  # the adapter is saved anyway
    by_steps = TrainConfig(checkpoint_every=10, checkpoint_minutes=0)
    assert [s for s in range(1, 26) if checkpoint_due(by_steps, s, s == 25, 1e9)] == [10, 20, 25]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_model_dir, tokenized
):
    out, command = engine_run(tmp_path, tiny_model_dir, tokenized, "nan", max_steps=20,
                              checkpoint_every=2, spike_patience=1, spike_factor=1.5)
    done = subprocess.run(with_fault(command, "--nan-at-step", "5"), capture_output=True,
                          text=True, env=TESTS_ON_PATH)
    assert done.returncode == 4, done.stderr[-2000:]
    failure = json.loads((out / "failure.json").read_text())
    assert failure["kind"] == "diverged" and failure["step"] == 5
    assert "step-0000004" in failure["message"]
    assert (out / "checkpoints" / "step-0000004").is_dir()
    assert not (out / "adapter").exists()


def test_the_watchdog_ends_a_run_that_makes_no_progress(tmp_path, tiny_model_dir, tokenized):
    out, command = engine_run(tmp_path, tiny_model_dir, tokenized, "hang", max_steps=5,
                              watchdog_seconds=2.0)
    start = time.monotonic()
    done = subprocess.run(with_fault(command, "--stall-seconds", "30"), capture_output=True,
                          text=True, env=TESTS_ON_PATH)
    assert done.returncode == 5, done.stderr[-2000:]
    assert time.monotonic() - start < 25
    assert "no progress for" in done.stderr and "after step 2" in done.stderr
    assert json.loads((out / "failure.json").read_text())["kind"] == "hung"


def test_a_spike_that_recovers_is_ignored_and_one_that_stays_stops_the_run():
    from loraflow.engine.guards import Diverged, SpikeGuard

    guard = SpikeGuard(TrainConfig(spike_factor=3.0, spike_patience=3))
    for step, loss in enumerate([2.0, 1.9, 1.8, 9.0, 9.0, 1.7, 1.6], start=1):
        guard.check(loss, step)  # two spiked steps, then back: no stop
    with pytest.raises(Diverged, match="step 10 has stayed above"):
        for step, loss in enumerate([9.0, 9.0, 9.0], start=8):
            guard.check(loss, step)
    with pytest.raises(Diverged, match="loss is inf at step 1"):
        SpikeGuard(TrainConfig()).check(float("inf"), 1)


def test_non_finite_gradients_stop_the_run_before_the_update(tmp_path, tiny_model_dir, tokenized):
    """A finite loss with NaN gradients (seen with zero-embedding tokens in a 7B, bf16): the run
    stops at that step, and the adapter keeps its last good weights."""
    from loraflow.engine.guards import Diverged

    model = add_lora(load_model(tiny_model_dir), LoraSettings())
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    lora_b.register_hook(lambda grad: grad * float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    cfg = TrainConfig(max_steps=3, micro_batch_size=4, learning_rate=1e-2, warmup_steps=0)
    with pytest.raises(Diverged, match="gradients are not finite at step 1"):
        fit(model, train_set=read_examples(tokenized, "train"), val_set=[], t=cfg,
            out=tmp_path, pad_id=3, dtype=torch.float32)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before), "the NaN update was applied"
    assert json.loads((tmp_path / "failure.json").read_text())["kind"] == "diverged"


def test_after_out_of_memory_the_micro_batch_halves_and_the_effective_batch_stays():
    from loraflow.engine.config import halve_micro_batch

    cfg = TrainConfig(micro_batch_size=8, grad_accum_steps=2)
    once, twice = halve_micro_batch(cfg, 1), halve_micro_batch(cfg, 2)
    assert (once.micro_batch_size, once.grad_accum_steps) == (4, 4)
    assert (twice.micro_batch_size, twice.grad_accum_steps) == (2, 8)
    with pytest.raises(ValueError, match="micro_batch_size=1"):
        halve_micro_batch(TrainConfig(micro_batch_size=1), 1)


def test_out_of_memory_at_micro_batch_one_is_a_training_failure_that_is_not_retried(tmp_path):
    """A sweep records a failed trial and goes on for a TrainingError; a ValueError from the
    halving stopped the whole sweep. It is not retried either (nothing left to halve)."""
    from loraflow.engine.launch import TrainingError, TrainingOOM, after_oom
    from tasks.model import retry_training

    (tmp_path / "adapt.json").write_text(json.dumps({"halvings": 1}))
    with pytest.raises(TrainingError, match="even at micro_batch_size=1") as caught:
        after_oom(TrainConfig(micro_batch_size=1), tmp_path)
    assert not isinstance(caught.value, TrainingOOM)

    class State:
        def result(self):
            raise caught.value

    assert retry_training(None, None, State()) is False


def test_recomputing_the_logits_in_backward_gives_the_same_loss_and_gradients(
    tiny_model_dir, tokenized
):
    from loraflow.engine.batches import collate
    from loraflow.engine.loss import completion_loss

    model = add_lora(load_model(tiny_model_dir), LoraSettings(dropout=0.0))
    batch = collate([[e] for e in read_examples(tokenized, "train")[:4]], pad_id=3)
    results = []
    for recompute in (False, True):
        model.zero_grad()
        loss = completion_loss(model, batch, 10, "sdpa", recompute_logits=recompute)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((float(loss.detach()), grads))
    (plain, plain_grads), (again, again_grads) = results
    assert again == pytest.approx(plain, rel=1e-6)
    pairs = zip(plain_grads, again_grads, strict=True)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in pairs)
    assert any(float(g.abs().sum()) > 0 for g in plain_grads)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "settings",
    [
        {"precision": "bf16", "batching": "packed", "compile": True},  # speed mode (bf16)
        {"precision": "fp8", "batching": "packed", "compile": True},  # speed mode
        {"precision": "nf4", "batching": "packed", "compile": True,  # memory mode
         "gradient_checkpointing": True},
        {"precision": "fp16", "batching": "padded"},  # loss scaling
    ],
    ids=["bf16-compile", "fp8-compile", "nf4-checkpointed-compile", "fp16-padded"],
)
def test_the_engine_learns_on_a_gpu_in_each_mode(tmp_path, tiny_model_dir, tokenized, settings):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out, command = engine_run(tmp_path, tiny_model_dir, tokenized, "gpu", max_steps=12,
                              seq_len=512, lr_schedule="constant", **settings)
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    curve = losses(out)
    assert all(map(math.isfinite, curve)) and min(curve[-3:]) < curve[0]
    assert "preflight: about" in done.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def count_compilations(monkeypatch):
    """Swap the engine's compile backend for one that counts the graphs it is given."""
    import torch._dynamo

    import loraflow.engine.loop as engine

    graphs = []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    monkeypatch.setattr(engine, "COMPILE_BACKEND", counting)
    torch._dynamo.reset()
    return graphs


@pytest.mark.parametrize("mode", [{"batching": "packed"},
                                  {"batching": "padded", "gradient_checkpointing": True}],
                         ids=["whole-decoder-packed", "per-layer-padded"])
def test_compiling_costs_only_the_first_step_not_validation(
    tmp_path, tiny_model_dir, tokenized, monkeypatch, mode
):
    """train.compile=true: a run of several steps, each validated, compiles the graphs one
    step without validation does (on an H200 validation used to recompile for 227 s)."""
    train_set = read_examples(tokenized, "train")
    val_set = read_examples(tokenized, "validation")
    counts = []
    for steps in (1, 3):
        graphs = count_compilations(monkeypatch)
        model = add_lora(load_model(tiny_model_dir), LoraSettings())
        cfg = TrainConfig(max_steps=steps, micro_batch_size=3, seq_len=512, warmup_steps=0,
                          eval_every=1, compile=True, **mode)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        (tmp_path / f"{steps}").mkdir()
        result = fit(model, train_set=train_set, val_set=val_set if steps > 1 else [], t=cfg,
                     out=tmp_path / f"{steps}", pad_id=3, dtype=torch.float32,
                     packed=mode["batching"] == "packed")
        assert result["compiled"] is True
        counts.append(len(graphs))
    assert counts[0] >= 1
    assert counts[1] == counts[0], f"steps 2-3 and validation compiled more: {counts}"


def test_a_compile_that_makes_no_graph_says_so_and_trains_eagerly(
    tmp_path, tiny_model_dir, tokenized, monkeypatch, capsys
):
    """A torch.compile that falls back to eager everywhere (transformers 5.25's Hub kernels did
    so under checkpointing) is named in the log and the metrics, not a silent loss of speed."""
    import loraflow.engine.loop as engine

    count_compilations(monkeypatch)
    monkeypatch.setattr(engine, "compiled_decoder",  # a decoder torch.compile never reaches
                        lambda model, t, packed: model.get_base_model().model)
    model = add_lora(load_model(tiny_model_dir), LoraSettings())
    cfg = TrainConfig(max_steps=2, micro_batch_size=3, warmup_steps=0, compile=True)
    result = fit(model, train_set=read_examples(tokenized, "train"), val_set=[], t=cfg,
                 out=tmp_path, pad_id=3, dtype=torch.float32)
    assert result["compiled"] is False
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["compile_graphs"] == 0
    assert "torch.compile made no graph" in capsys.readouterr().err


def test_compile_auto_never_compiles_on_cpu_and_pays_only_on_long_runs(
    tmp_path, tiny_model_dir, tokenized, monkeypatch
):
    from loraflow.engine.loop import compile_pays

    graphs = count_compilations(monkeypatch)
    model = add_lora(load_model(tiny_model_dir), LoraSettings())
    cfg = TrainConfig(max_steps=4, micro_batch_size=4, warmup_steps=0)
    assert cfg.compile == "auto"
    result = fit(model, train_set=read_examples(tokenized, "train"), val_set=[], t=cfg,
                 out=tmp_path, pad_id=3, dtype=torch.float32)
    assert result["compiled"] is False and not graphs
    # SmolLM2 on an H200: 57 steps left at 0.53 s stay eager; a 7B epoch of 20k examples
    # (~1,300 steps at ~0.5 s) compiles; fp8 gains twice as much, so compiles sooner.
    assert not compile_pays(0.53, 57, "bf16")
    assert compile_pays(0.5, 1300, "bf16")
    assert not compile_pays(1.0, 300, "bf16") and compile_pays(1.0, 300, "fp8")
