"""The trainer's loss on a mixture-of-experts model whose config asks for the router's
load-balancing loss: transformers' own loss is the oracle."""

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from lorakit.kernels.causal_loss import causal_lm_loss, chunked_loss_blocker
from lorakit.lora import LoraConfig, apply_lora
from lorakit.train.loop import LoopSettings, Trainer

COEFFICIENT = 0.5  # large, so that a loss without it is far off


def _moe(output_router_logits: bool = True) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=output_router_logits, router_aux_loss_coef=COEFFICIENT)
    model = MixtralForCausalLM(config)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return model.train()


def _batch(seed: int, rows: int = 2, length: int = 12) -> dict:
    ids = torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _loss_and_grads(model, compute) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return float(loss), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_training_adds_the_routers_loss_as_transformers_does_and_eval_leaves_it_out():
    model, batch = _moe(), _batch(3)
    assert "load-balancing" in chunked_loss_blocker(model)
    expected, expected_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    loss, grads = _loss_and_grads(model, lambda: causal_lm_loss(model, batch, router_aux=True))
    assert loss == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        aux = float(model(**batch).aux_loss)
        assert float(causal_lm_loss(model, batch)) == pytest.approx(expected - COEFFICIENT * aux, rel=1e-6)


def test_micro_batches_sharing_a_normalizer_take_the_token_weighted_mean_of_the_routers_loss():
    model = _moe()
    short, long = _batch(4, rows=1, length=6), _batch(5, rows=2, length=12)
    labelled = [int(b["labels"][:, 1:].numel()) for b in (short, long)]  # every shifted label counts
    total = sum(labelled)
    with torch.no_grad():
        summed = sum(float(causal_lm_loss(model, b, normalizer=total, router_aux=True)) for b in (short, long))
        cross_entropy = sum(float(causal_lm_loss(model, b, normalizer=total)) for b in (short, long))
        aux = [float(model(**b).aux_loss) for b in (short, long)]
    weighted = sum(n * a for n, a in zip(labelled, aux)) / total
    assert summed == pytest.approx(cross_entropy + COEFFICIENT * weighted, rel=1e-6)


def test_the_trainers_steps_train_on_the_routers_loss():
    model, batch = _moe(), _batch(6)
    settings = LoopSettings(lr=1e-3, total_steps=1, warmup_steps=0, schedule="constant", grad_accum=1,
                            max_grad_norm=0, max_bad_steps=1, batch_size=2, seq_len=12, packing=False, seed=0,
                            pad_id=0, device=torch.device("cpu"))
    trainer = Trainer(model, None, settings, None)
    with torch.no_grad():
        expected = float(model(**batch).loss)
        assert float(trainer._loss(batch, normalizer=int(batch["labels"][:, 1:].numel()))) == pytest.approx(expected)


def test_a_model_without_the_routers_loss_keeps_the_chunked_loss():
    assert chunked_loss_blocker(_moe(output_router_logits=False)) is None


def test_a_run_on_such_a_model_trains_and_scores_on_unpacked_rows(tmp_path, capsys):
    """transformers' router loss reads a 2D padding mask: packed rows (a 4D mask) are left off."""
    import json

    from lorakit.cli import main
    from tiny_models import tiny_tokenizer, write_define_data

    tokenizer = tiny_tokenizer()
    model = MixtralForCausalLM(MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    data, held_out = write_define_data(tmp_path / "d.jsonl", count=24), write_define_data(tmp_path / "e.jsonl", 8, 1)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "moe"), "--data", str(data), "--output", str(run), "--max-steps",
                 "2", "--batch-size", "4", "--seq-len", "64", "--eval-data", str(held_out), "--lr", "1e-2"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps its lines
    assert "router load-balancing loss (output_router_logits) needs each row's own padding mask" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", "--adapter", str(run), "--data", str(held_out), "--batch-size", "4", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)  # the run's own eval, without the router loss, reproduced
    assert scored["adapter_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    assert scored["base_loss"] == pytest.approx(summary["base_eval_loss"], rel=1e-6)
    assert scored["adapter_loss"] != pytest.approx(scored["base_loss"], rel=1e-4)  # the adapter trained
