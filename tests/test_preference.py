"""The preference losses against TRL's own code paths, on fixed batches of the tiny random
Llama with a LoRA adapter: the loss and every LoRA gradient must agree within 1e-5.

DPO and KTO: a real DPOTrainer / KTOTrainer is built on the same PEFT model (its reference is
the model with the adapter disabled, as ours), its collator pads a batch and its compute_loss
gives the loss; ours gets the very token ids TRL produced, laid out as the engine lays them
(a pair, or a KTO example with its mismatched KL completion, in one row with per-example
attention; or all units packed in one row) and goes through loraflow.engine.loss.preference_loss.
ORPO: TRL's ORPOTrainer.odds_ratio_loss and get_batch_logps, called on our model's logits.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from loraflow.config import PreferenceLoss, TrainConfig  # noqa: E402
from loraflow.engine.batches import Unit, collate  # noqa: E402
from loraflow.engine.loss import (  # noqa: E402
    preference_counts,
    preference_loss,
    preference_record,
)

TOL = 1e-5
PAIRS = [
    {"prompt": "Extract the order: two mugs to Oslo.", "chosen": ' {"qty": 2, "city": "Oslo"}',
     "rejected": ' {"qty": "two"}'},
    {"prompt": "Say hi to Bob.", "chosen": " hi Bob", "rejected": " bye now, friend"},
    {"prompt": "Count to three please.", "chosen": " 1 2 3", "rejected": " 1 2"},
]
KTO_ROWS = [
    {"prompt": "Extract the order: two mugs to Oslo.", "completion": ' {"qty": 2}', "label": True},
    {"prompt": "Say hi to Bob.", "completion": " bye", "label": False},
    {"prompt": "Count to three please.", "completion": " 1 2 3", "label": True},
    {"prompt": "Name a colour.", "completion": " 42", "label": False},
]


@pytest.fixture
def policy(tiny_model_dir):
    """The tiny Llama in fp32 with a LoRA adapter whose B is non-zero (policy != reference),
    no dropout (TRL's forward and ours must see the same network)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.train()
    return model


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_grads(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert ours.keys() == theirs.keys() and ours
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in ours)
    scale = max(float(theirs[n].abs().max()) for n in theirs)
    assert scale > 1e-4, "TRL's gradients are zero: the test would prove nothing"
    assert worst <= TOL, f"largest gradient difference {worst:.3g} (largest gradient {scale:.3g})"
    return worst


def same_loss_and_grads(loss, theirs, model, trl_grads) -> float:
    ours, reference = float(loss.detach()), float(theirs.detach())
    assert abs(ours - reference) <= TOL, (ours, reference)
    return assert_same_grads(lora_grads(model), trl_grads)


def trainer_of(kind: str, model, tokenizer, tmp_path, rows, **config):
    from datasets import Dataset

    cls, cfg_cls = ((trl.DPOTrainer, trl.DPOConfig) if kind == "dpo"
                    else (trl.KTOTrainer, trl.KTOConfig))
    args = cfg_cls(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows),
                   report_to=[], use_cpu=True, bf16=False, fp16=False, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer)
    # TRL keeps a copy of an adapter that is already trained as "ref" and uses it as the
    # reference; without it TRL's reference is the model with the adapter disabled, as ours
    # (for a fresh adapter both are the base model).
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")
    return trainer


def ours(model, rows, t: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    batch = collate(rows, pad_id=3)
    loss, sums = preference_loss(model, batch, preference_counts(rows), t, "sdpa")
    return loss, preference_record(sums.tolist(), t.objective)


def test_a_units_shared_prompt_is_laid_out_once_and_each_sequence_keeps_its_logps(
    policy, tiny_model_dir
):
    """collate lays a unit's prompt out once (its sequences branch off after it): the row is
    shorter by the prompt less one token per extra sequence, and every answer's
    log-probability is the one the sequence gets alone in a plain forward."""
    from transformers import AutoTokenizer

    from loraflow.engine.batches import item_len
    from loraflow.engine.loss import sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    units = []
    for pair in PAIRS:
        prompt = tokenizer(pair["prompt"])["input_ids"]
        sides = [tokenizer(pair[k], add_special_tokens=False)["input_ids"] + [2]
                 for k in ("chosen", "rejected")]
        units.append(Unit(tuple((prompt + side, len(prompt)) for side in sides)))
    batch = collate([units], pad_id=3)
    unshared = sum(len(ids) for u in units for ids, _ in u.examples)
    prompts = sum(p - 1 for u in units for _, p in u.examples[1:])
    assert batch["input_ids"].shape[1] == sum(map(item_len, units)) == unshared - prompts
    policy.eval()
    with torch.no_grad():
        logps, tokens = sequence_logps(policy, batch, "sdpa")
        alone = []
        for ids, prompt_len in (e for u in units for e in u.examples):
            logits = policy(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
            picked = logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])
            alone.append(float(picked[prompt_len - 1 :].sum()))
    assert tokens.tolist() == [len(ids) - p for u in units for ids, p in u.examples]
    assert logps.tolist() == pytest.approx(alone, abs=TOL)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "sigmoid+sft"])
@pytest.mark.parametrize("layout", ["pair_per_row", "packed"])
def test_dpo_loss_and_gradients_equal_trls(policy, tiny_model_dir, tmp_path, loss_type, layout):
    """sigmoid+sft: DPO plus 0.7 x the chosen answers' NLL per token (our train.sft_weight;
    TRL's loss_type [sigmoid, sft] with loss_weights [1, 0.7])."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sft_weight = 0.7 if loss_type == "sigmoid+sft" else 0.0
    theirs_type = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} \
        if sft_weight else {"loss_type": loss_type}
    loss_type = loss_type.split("+")[0]
    trainer = trainer_of("dpo", policy, tokenizer, tmp_path, PAIRS, beta=0.3, **theirs_type)
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    theirs.backward()
    trl_grads = lora_grads(policy)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    units = [Unit(((e["prompt_ids"] + e["chosen_ids"], len(e["prompt_ids"])),
                   (e["prompt_ids"] + e["rejected_ids"], len(e["prompt_ids"]))))
             for e in examples]
    rows = [units] if layout == "packed" else [[u] for u in units]
    loss, metrics = ours(policy, rows, TrainConfig(objective="dpo", preference=PreferenceLoss(
        beta=0.3, loss_type=loss_type, sft_weight=sft_weight)))
    loss.backward()
    worst = same_loss_and_grads(loss, theirs, policy, trl_grads)
    print(f"dpo {loss_type} {layout}: loss {float(loss.detach()):.6f} vs TRL "
          f"{float(theirs.detach()):.6f}, largest gradient difference {worst:.2e}")
    for name, key in [("chosen_reward", "rewards/chosen"), ("rejected_reward",
                      "rewards/rejected"), ("margin", "rewards/margins"),
                      ("reward_accuracy", "rewards/accuracies")]:
        assert metrics[name] == pytest.approx(trl_metrics[key], abs=1e-5), name


@pytest.mark.parametrize("layout", ["unit_per_row", "packed"])
def test_kto_loss_and_gradients_equal_trls(policy, tiny_model_dir, tmp_path, layout):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = trainer_of("kto", policy, tokenizer, tmp_path, KTO_ROWS, beta=0.5,
                         desirable_weight=1.0, undesirable_weight=1.3)
    examples = [trainer.train_dataset[i] for i in range(len(KTO_ROWS))]
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    theirs.backward()
    trl_grads = lora_grads(policy)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert trl_metrics["kl"] >= 0

    units = [Unit(((e["prompt_ids"] + e["completion_ids"], len(e["prompt_ids"])),
                   (e["prompt_ids"] + e["KL_completion_ids"], len(e["prompt_ids"]))),
                  bool(e["label"])) for e in examples]
    rows = [units] if layout == "packed" else [[u] for u in units]
    loss, metrics = ours(policy, rows, TrainConfig(objective="kto", preference=PreferenceLoss(
        beta=0.5, kto_undesirable_weight=1.3)))
    loss.backward()
    worst = same_loss_and_grads(loss, theirs, policy, trl_grads)
    print(f"kto {layout}: loss {float(loss.detach()):.6f} vs TRL "
          f"{float(theirs.detach()):.6f}, largest gradient difference {worst:.2e}")
    assert metrics["kl"] == pytest.approx(trl_metrics["kl"], abs=1e-5)
    assert metrics["chosen_reward"] == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5)
    assert metrics["rejected_reward"] == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5)


def test_orpo_loss_and_gradients_equal_trls(policy, tiny_model_dir):
    """TRL's ORPO averages log-probabilities per answer token for the odds ratio (as ours) and
    adds the chosen NLL; both sides get the same answer-only NLL here (TRL's trainer takes it
    over prompt and answer, ours over the answer: the odds-ratio part is what is compared)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token_id
    units = []
    for pair in PAIRS:
        prompt = tokenizer(pair["prompt"])["input_ids"]
        chosen = tokenizer(pair["chosen"], add_special_tokens=False)["input_ids"] + [eos]
        rejected = tokenizer(pair["rejected"], add_special_tokens=False)["input_ids"] + [eos]
        units.append(Unit(((prompt + chosen, len(prompt)), (prompt + rejected, len(prompt)))))
    beta = 0.25

    # TRL: padded rows [chosen..., rejected...], logits of the whole vocabulary
    seqs = [u.examples[0] for u in units] + [u.examples[1] for u in units]
    batch = collate([[s] for s in seqs], pad_id=3)
    logits = policy(input_ids=batch["input_ids"], attention_mask=(batch["doc_ids"] >= 0).long(),
                    use_cache=False).logits.float()
    logps = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    this = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=logits.device))
    n = len(units)
    ratio_losses, chosen_r, rejected_r, _, _ = ORPOTrainer.odds_ratio_loss(this, logps[:n],
                                                                          logps[n:])
    summed = ORPOTrainer.get_batch_logps(logits[:n], batch["labels"][:n])
    chosen_tokens = sum(len(ids) - p for ids, p in seqs[:n])
    nll = -summed.sum() / chosen_tokens
    theirs = nll - ratio_losses.mean()
    theirs.backward()
    trl_grads = lora_grads(policy)

    loss, metrics = ours(policy, [[u] for u in units],
                         TrainConfig(objective="orpo", preference=PreferenceLoss(beta=beta)))
    loss.backward()
    worst = same_loss_and_grads(loss, theirs, policy, trl_grads)
    print(f"orpo: loss {float(loss.detach()):.6f} vs TRL "
          f"{float(theirs.detach()):.6f}, largest gradient difference {worst:.2e}")
    assert metrics["chosen_reward"] == pytest.approx(float(chosen_r.mean()), abs=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(
        float((chosen_r > rejected_r).float().mean()), abs=1e-6)


def test_the_losses_as_plain_functions_match_their_definitions():
    from loraflow.engine.preference import dpo_loss, kto_loss, orpo_loss

    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -4.5]), torch.tensor([-3.5, -4.5])
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    delta = torch.tensor([(-3 + 3.5) - (-4 + 3.5), (-5 + 4.5) - (-4 + 4.5)])
    assert torch.allclose(out.losses, torch.log1p(torch.exp(-0.5 * delta)))
    assert torch.equal(out.chosen_rewards > out.rejected_rewards, torch.tensor([True, False]))
    hinge = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge").losses
    assert torch.allclose(hinge, torch.relu(1 - 0.5 * delta))
    with pytest.raises(ValueError, match="ipo needs"):
        dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    # ORPO with equal sides: log odds 0, loss beta * log 2
    same = orpo_loss(pc, pc, torch.tensor([2.0, 2.0]), torch.tensor([2.0, 2.0]), beta=0.2)
    assert torch.allclose(same.losses, torch.full((2,), 0.2 * torch.log(torch.tensor(2.0))))
    # KTO: a desirable answer far above the reference point has a loss near 0
    k = kto_loss(torch.tensor([0.0, -50.0]), torch.tensor([-50.0, 0.0]),
                 torch.tensor([True, False]), torch.tensor(-1.0), beta=1.0)
    assert float(k.losses.max()) < 1e-6


@pytest.fixture
def preference_tokens(tmp_path, tiny_model_dir):
    """24/8 shipped preference pairs validated and tokenized (chat template) for the tiny
    model."""
    import json
    from pathlib import Path

    from loraflow.base_model import load_tokenizer
    from loraflow.config import DataConfig
    from loraflow.data.preference import PAIRS, tokenize_preference_splits
    from loraflow.data.prompts import PromptTemplate
    from loraflow.data.tokenization import TokenizeSettings
    from loraflow.data.validation import validate_splits

    root = Path(__file__).resolve().parents[1] / "data" / "orders" / "preference"
    sources = {}
    for split, n in {"train": 24, "validation": 8, "test": 4}.items():
        lines = (root / f"{split}.jsonl").read_text().splitlines()[:n]
        path = tmp_path / "pref" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(json.loads(x)) + "\n" for x in lines))
        sources[split] = [str(path)]
    report = validate_splits(sources, tmp_path / "valid", DataConfig(), kind=PAIRS,
                             progress=False)
    report.check(tmp_path / "valid")
    tokenize_preference_splits(tmp_path / "valid", load_tokenizer(tiny_model_dir),
                               PromptTemplate(kind="chat"),
                               TokenizeSettings(max_length=512), tmp_path / "tokens", "pairs",
                               progress=False)
    return tmp_path / "tokens"


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_the_engine_trains_dpo_in_its_one_loop_and_reports_rewards(
    tmp_path, tiny_model_dir, preference_tokens, batching
):
    import json

    from loraflow.config import LoraSettings
    from loraflow.engine.config import EngineConfig
    from loraflow.engine.run import train

    out = tmp_path / "run"
    cfg = EngineConfig(
        base_path=tiny_model_dir, data_dir=preference_tokens, output_dir=out,
        lora=LoraSettings(target_modules=["all-linear"], dropout=0.0),
        train=TrainConfig(objective="dpo", preference=PreferenceLoss(beta=0.5), max_steps=8,
                          micro_batch_size=4, grad_accum_steps=1, learning_rate=5e-2,
                          warmup_steps=1, eval_every=4, checkpoint_every=4, batching=batching,
                          seq_len=1024),
    )
    result = train(cfg)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    first, last = records[0], records[-1]
    assert {"loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin"} <= first.keys()
    # a fresh adapter: policy = reference at the first step, so the loss is exactly log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and first["margin"] == 0
    # 4 pairs a step at a high learning rate: one step's accuracy moves in quarters, so
    # judge the second half of the run
    late = records[4:]
    assert last["loss"] < 0.6 and last["margin"] > 0
    assert sum(r["reward_accuracy"] for r in late) / len(late) > 0.5
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 8]
    # held-out pairs of a random 2-layer model after 8 steps: reported, not yet better
    assert 0 <= val[-1]["val_reward_accuracy"] <= 1
    assert all(math.isfinite(val[-1][k]) for k in ("val_loss", "val_margin", "val_chosen_reward"))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004",
                                                                       "step-0000008"]
    assert result["steps"] == 8


def test_kto_and_orpo_run_in_the_same_loop(tmp_path, tiny_model_dir, preference_tokens):
    """orpo on the pairs; kto on the same answers as desirable/undesirable records."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from loraflow.config import LoraSettings
    from loraflow.engine.config import EngineConfig
    from loraflow.engine.run import train

    kto = tmp_path / "kto-tokens"
    kto.mkdir()
    for split in ("train", "validation"):
        t = pq.read_table(preference_tokens / f"{split}.parquet").to_pydict()
        n = len(t["prompt_ids"])
        pq.write_table(pa.table({"prompt_ids": t["prompt_ids"] * 2,
                                 "completion_ids": t["chosen_ids"] + t["rejected_ids"],
                                 "desirable": [True] * n + [False] * n}), kto / f"{split}.parquet")
    for objective, data in (("orpo", preference_tokens), ("kto", kto)):
        out = tmp_path / objective
        train(EngineConfig(
            base_path=tiny_model_dir, data_dir=data, output_dir=out,
            lora=LoraSettings(dropout=0.0),
            train=TrainConfig(objective=objective, max_steps=4, micro_batch_size=4,
                              learning_rate=1e-2, warmup_steps=0, batching="packed",
                              seq_len=1024)))
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
        assert "val_loss" in records[-1] and "margin" in records[-1]
        assert ("kl" in records[0]) == (objective == "kto")


def test_an_sft_adapter_merged_in_is_the_reference(tmp_path, tiny_model_dir):
    """EngineConfig.merge_adapter: base + SFT adapter folded into the weights, then a new
    adapter; with the new adapter off the model answers exactly as base + SFT adapter."""
    from peft import PeftModel
    from tiny import make_adapter

    from loraflow.base_model import load_model
    from loraflow.config import LoraSettings
    from loraflow.engine.model import add_lora, merge_into_base

    sft = make_adapter(tiny_model_dir, tmp_path / "sft")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_model(tiny_model_dir), sft)(ids).logits
        plain = load_model(tiny_model_dir)(ids).logits
        model = add_lora(merge_into_base(load_model(tiny_model_dir), sft, TrainConfig(), "ddp"),
                         LoraSettings())
        with model.disable_adapter():
            reference = model(ids).logits
    assert not torch.allclose(plain, expected, atol=1e-3)  # the SFT adapter does something
    assert torch.allclose(reference, expected, atol=1e-5)
    with pytest.raises(Exception, match="cannot be folded into nf4"):
        merge_into_base(load_model(tiny_model_dir), sft, TrainConfig(precision="nf4"), "ddp")


def test_held_out_pairs_score_win_rate_margins_and_rewards(tmp_path, tiny_model_dir,
                                                           preference_tokens):
    """evaluation.preference: the model alone (win rate, log-likelihood margin) and with an
    adapter against it as reference (reward accuracy and margin, which are 0 / all-equal
    for the model against itself)."""
    from tiny import make_adapter

    from loraflow.evaluation.preference import evaluate_pairs

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    got = evaluate_pairs(tiny_model_dir, preference_tokens, pad_id=3, adapter=adapter,
                         beta=0.5, split="validation")
    alone = evaluate_pairs(tiny_model_dir, preference_tokens, pad_id=3, split="validation")
    assert got["model"] == pytest.approx(alone["model"], abs=1e-5)  # adapter off = the model
    assert got["model"]["pairs"] == 8 and 0 <= got["model"]["win_rate"] <= 1
    adapted = got["adapted"]
    assert {"win_rate", "logp_margin", "reward_accuracy", "reward_margin"} <= adapted.keys()
    # the rewards are beta x the change of each side's log-likelihood against the reference
    expected = 0.5 * (adapted["logp_margin"] - got["model"]["logp_margin"])
    assert adapted["reward_margin"] == pytest.approx(expected, abs=1e-4)
