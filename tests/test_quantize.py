"""QLoRA on CPU: a tiny Llama loaded in 4 bits (NF4) and 8 bits (LLM.int8) with bitsandbytes.

Loading, LoRA training on the quantised layers, adapters that move between quantised and dense
bases, and merging into a checked dense folder, with negative controls: merging into the
unquantised weights (the dequantisation skipped) must be refused.
"""

import json

import pytest
import torch

from lorakit import LoraConfig, apply_lora, load_adapter, save_adapter
from lorakit.cli import main
from lorakit.errors import ConfigError, MergeError

from tiny_models import randomize_lora, save_tiny_chat_model

KINDS = ("4bit", "8bit")


def _bitsandbytes_problem() -> str | None:
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    except Exception as exc:  # missing, or no backend for this machine
        return f"bitsandbytes cannot run a 4-bit layer here ({type(exc).__name__}: {exc})"
    return None


BNB_PROBLEM = _bitsandbytes_problem()
needs_bnb = pytest.mark.skipif(BNB_PROBLEM is not None, reason=BNB_PROBLEM or "")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("qlora") / "base")


def load(base_dir, kind):
    from lorakit.quantize import load_quantized

    model, _, _ = load_quantized(base_dir, kind)
    return model


def dense(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).eval()


IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@needs_bnb
def test_bitsandbytes_hub_kernel_advice_is_left_out_and_its_other_warnings_kept(caplog):
    """bitsandbytes, imported on a CPU with AVX512-BF16, warned on every QLoRA run that it could
    not fetch a 4-bit GEMM from the Hugging Face Hub (lorakit fetches no Hub kernels)."""
    import logging
    import subprocess
    import sys

    from lorakit.quantize import BNB_CPU_LOGGER, require_bitsandbytes

    code = "from lorakit.quantize import require_bitsandbytes; require_bitsandbytes()"  # a fresh import
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels-community" not in imported.stderr  # where this CPU has AVX512-BF16, it was printed
    require_bitsandbytes()
    logger = logging.getLogger(BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_LOGGER):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "no kernels")
        logger.warning("another warning")
    assert [record.getMessage() for record in caplog.records] == ["another warning"]


# ---- errors a user can cause ----------------------------------------------------------------

def test_missing_bitsandbytes_is_a_clear_error(monkeypatch, base_dir):
    from lorakit.quantize import load_quantized

    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        load_quantized(base_dir, "4bit")
    from lorakit.quantize import load_for_inference  # eval of a QLoRA run's adapter: the bits were the run's

    with pytest.raises(ConfigError, match=r"pip install bitsandbytes.*The 4bit base is the one the adapter's run "
                                          r"trained on \(its config.yaml\): --quantize none loads the full-precision"):
        load_for_inference(base_dir, "4bit", "cpu", "auto", chosen_by_run=True)


def test_unknown_quantize_value(base_dir):
    from lorakit.quantize import load_quantized

    with pytest.raises(ConfigError, match="4bit, 8bit"):
        load_quantized(base_dir, "3bit")


@needs_bnb
def test_gguf_is_refused_with_the_converted_folder_named(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(  # read first: a causal LM's adapter
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}')
    code = main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out"),
                 "--model", str(gguf), "--quantize", "4bit"])
    err = capsys.readouterr().err
    assert code == 2 and "already quantised by llama.cpp" in err and "--model " in err and "model-" in err


# ---- loading and LoRA on quantised layers ---------------------------------------------------

@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_load_quantizes_decoder_linears_only(base_dir, kind):
    import bitsandbytes as bnb

    model = load(base_dir, kind)
    cls = bnb.nn.Linear4bit if kind == "4bit" else bnb.nn.Linear8bitLt
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, cls) and isinstance(model.model.layers[1].mlp.down_proj, cls)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16  # no fp32 upcast of the whole model
    assert not any(p.requires_grad for p in model.parameters())
    # input grads flow exactly when checkpointing is on in training (reentrant checkpoints need them)
    embed = model.get_input_embeddings()
    model.train()
    assert not embed(IDS).requires_grad
    model.model.gradient_checkpointing = True  # the flag alone: transformers' own hook not installed
    assert embed(IDS).requires_grad
    assert not model.eval().get_input_embeddings()(IDS).requires_grad


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_lora_forward_on_a_quantized_layer_matches_plain_pytorch(base_dir, kind):
    from lorakit.lora.layer import dequantize_weight

    model = apply_lora(load(base_dir, kind), LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        got = layer(x).float()
        w = dequantize_weight(layer.base_layer).float()
        a, b = layer.lora_A.weight.bfloat16().float(), layer.lora_B.weight.bfloat16().float()
        expected = x.float() @ w.T + layer.scaling * (x.float() @ a.T @ b.T)
    # 4-bit: bf16 rounding only; 8-bit eval also rounds x to int8 per row (LLM.int8)
    rtol = 0.01 if kind == "4bit" else 0.03
    assert (got - expected).norm() <= rtol * expected.norm()


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_one_step_trains_only_the_adapter(base_dir, kind):
    model = apply_lora(load(base_dir, kind), LoraConfig(r=4, alpha=8))
    randomize_lora(model, std=0.05)  # B != 0, so A gets a gradient too
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert set(map(id, trainable)) == set(map(id, lora.values())) and len(lora) == 4 * 7
    # reentrant checkpointing backpropagates through a layer only if its input requires grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in after if ".lora_" in k}


@needs_bnb
def test_rank_check_and_fingerprint_use_logical_shapes(base_dir):
    from lorakit.lora import base_fingerprint

    model = load(base_dir, "4bit")  # packed: q_proj.weight is (2048, 1) uint8
    with pytest.raises(ConfigError, match=r"k_proj \(64 -> 32\) cannot take rank 33"):
        apply_lora(model, LoraConfig(r=33, alpha=33, target_modules="all"))  # all-linear would leave k, v out
    assert base_fingerprint(model) == base_fingerprint(dense(base_dir)) == base_fingerprint(load(base_dir, "8bit"))


@needs_bnb
def test_the_parameter_count_is_the_bases_whichever_way_it_is_stored(base_dir):
    from lorakit.lora.model import lora_report

    # a 4-bit weight holds two values a byte: the count read 36,864 fewer of the tiny model's (the summary's total)
    counts = {lora_report(apply_lora(model, LoraConfig(r=4, alpha=8))).total_params
              for model in (load(base_dir, "4bit"), load(base_dir, "8bit"), dense(base_dir))}
    assert len(counts) == 1


@needs_bnb
def test_dora_reads_the_dequantized_weight(base_dir):
    from lorakit.lora.layer import dequantize_weight
    from lorakit.merge import _logits
    from lorakit.quantize import dequantize_model

    model = apply_lora(load(base_dir, "4bit"), LoraConfig(r=4, alpha=8, use_dora=True))
    layer = model.model.layers[0].self_attn.v_proj
    norms = dequantize_weight(layer.base_layer).float().norm(dim=1)
    assert torch.allclose(layer.lora_magnitude_vector, norms)
    randomize_lora(model)
    quantized = _logits(model, IDS)
    dequantize_model(model)  # the same DoRA model on dense bf16 copies of the kernels' weights
    assert (quantized - _logits(model, IDS)).abs().max() <= 0.02 * quantized.abs().max()


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_adapters_move_between_quantized_and_dense_bases(base_dir, tmp_path, kind):
    from safetensors import safe_open

    quantized = apply_lora(load(base_dir, kind), LoraConfig(r=4, alpha=8))
    randomize_lora(quantized, seed=3)
    save_adapter(quantized, tmp_path / "from_q")
    plain = apply_lora(dense(base_dir), LoraConfig(r=4, alpha=8))
    save_adapter(plain, tmp_path / "from_dense")

    def layout(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        config = json.loads((folder / "adapter_config.json").read_text())
        return shapes, {k: v for k, v in config.items() if k != "base_model_name_or_path"}

    assert layout(tmp_path / "from_q") == layout(tmp_path / "from_dense")  # PEFT layout, same fingerprint
    onto_dense = load_adapter(dense(base_dir), tmp_path / "from_q")
    onto_quantized = load_adapter(load(base_dir, kind), tmp_path / "from_dense")
    for source, target in ((quantized, onto_dense), (plain, onto_quantized)):
        source_lora = {k: v for k, v in source.state_dict().items() if ".lora_" in k}
        target_lora = {k: v for k, v in target.state_dict().items() if ".lora_" in k}
        assert source_lora.keys() == target_lora.keys()
        assert all(torch.equal(source_lora[k].float(), target_lora[k].float()) for k in source_lora)


# ---- merging a quantised base ---------------------------------------------------------------

def _trained_adapter(base_dir, folder, kind):
    model = apply_lora(load(base_dir, kind), LoraConfig(r=4, alpha=8))
    randomize_lora(model, seed=4)
    save_adapter(model, folder, base_model_name=str(base_dir))
    return model


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_merge_writes_a_dense_folder_that_reproduces_the_quantized_model(base_dir, tmp_path, capsys, kind):
    from transformers import AutoModelForCausalLM

    from lorakit.merge import _logits

    adapted = _trained_adapter(base_dir, tmp_path / "adapter", kind)
    code = main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged"),
                 "--quantize", kind, "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and result["dequantized_layers"] == 14
    assert result["max_abs_logit_difference"] <= result["tolerance"]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert not any("lora" in k or "SCB" in k or "quant" in k for k in merged.state_dict())
    # independently of merge.py's own checks: the folder computes what the adapted 4/8-bit model does
    reference = _logits(adapted, IDS)
    assert (_logits(merged, IDS) - reference).abs().max() <= 0.02 * reference.abs().max()


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_merge_refuses_the_unquantized_weights(base_dir, tmp_path, monkeypatch, kind):
    """Negative control: if the merge used the original weights instead of dequantising, the
    layer check refuses (both kinds), and for NF4 so does the logit check on its own."""
    import lorakit.lora.layer as layer_module
    import lorakit.quantize as quantize_module
    from lorakit.merge import merge_to_folder

    _trained_adapter(base_dir, tmp_path / "adapter", kind)
    originals = [m.weight.detach().float() for m in dense(base_dir).modules() if isinstance(m, torch.nn.Linear)]
    real_dequantize = layer_module.dequantize_weight

    def skip_dequantization(layer, dtype=None):
        # the original a quantised layer came from is the nearest one (quantisation error ~10%,
        # another random matrix ~140%)
        weight = real_dequantize(layer, torch.float32)
        same_shape = [w for w in originals if w.shape == weight.shape]
        return min(same_shape, key=lambda w: float((w - weight).norm()))

    monkeypatch.setattr(layer_module, "dequantize_weight", skip_dequantization)
    with pytest.raises(MergeError, match="differs from what its 4/8-bit kernel computes"):
        merge_to_folder(tmp_path / "adapter", tmp_path / "merged", quantize=kind)
    assert not (tmp_path / "merged").exists()
    if kind == "4bit":  # NF4's error is far above bf16 rounding: the logits alone catch it too
        monkeypatch.setattr(quantize_module, "check_dequantized", lambda *args, **kwargs: 0.0)
        with pytest.raises(MergeError, match="differ from the 4bit base"):
            merge_to_folder(tmp_path / "adapter", tmp_path / "merged", quantize=kind)
        assert not (tmp_path / "merged").exists()


@needs_bnb
def test_a_peft_adapter_saving_a_layer_that_is_quantised_here_is_refused_in_one_line(base_dir, tmp_path, capsys):
    # bitsandbytes refused the gradient with a traceback, from `merge --quantize`
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    peft_model = get_peft_model(dense(base_dir).float(), PeftConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  modules_to_save=["model.layers.0.mlp.down_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--model", str(base_dir), "--output",
                 str(tmp_path / "merged"), "--quantize", "4bit"]) == 2
    err = capsys.readouterr().err
    assert "a quantised (4- or 8-bit) layer of this base" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


@needs_bnb
def test_merging_a_quantised_runs_adapter_into_other_weights_says_so(base_dir, tmp_path, capsys):
    # a plain merge of a QLoRA adapter gave another model than training saw, without a word
    run = tmp_path / "run"
    _trained_adapter(base_dir, run / "adapter", "4bit")
    (run / "config.yaml").write_text("model:\n  quantize: 4bit\n")
    merge = ["merge", "--adapter", str(run), "--model", str(base_dir)]
    assert main([*merge, "--output", str(tmp_path / "plain")]) == 0
    assert "trained on the 4bit base" in capsys.readouterr().err
    assert main([*merge, "--output", str(tmp_path / "as-trained"), "--quantize", "4bit"]) == 0
    assert "trained on the 4bit base" not in capsys.readouterr().err


# ---- eval and generate on a quantised base ------------------------------------------------

@needs_bnb
def test_eval_and_generate_load_a_qlora_runs_base_as_it_trained(base_dir, tmp_path, capsys):
    """A QLoRA run's adapter was scored (in training) and trained against the 4-bit base; eval
    and generate loaded the full-precision one, so eval did not reproduce the run's eval loss."""
    run = tmp_path / "run"
    _trained_adapter(base_dir, run / "adapter", "4bit")
    (run / "config.yaml").write_text("model:\n  quantize: 4bit\n")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog"}) + "\n"
                            for i in range(4)))

    def scores(*flags):
        assert main(["eval", "--adapter", str(run), "--model", str(base_dir), "--data", str(data), "--json",
                     *flags]) == 0
        return json.loads(capsys.readouterr().out)

    as_trained, in_4bit, dense_base = scores(), scores("--quantize", "4bit"), scores("--quantize", "none")
    assert any("base in 4bit, as the run trained" in note for note in as_trained["notes"])
    assert (as_trained["base_loss"], as_trained["adapter_loss"]) == (in_4bit["base_loss"], in_4bit["adapter_loss"])
    assert abs(dense_base["adapter_loss"] - in_4bit["adapter_loss"]) > 1e-4  # NF4 is another model
    assert any("where the run trained on the 4bit base" in note for note in dense_base["notes"])

    assert main(["generate", "--adapter", str(run), "--model", str(base_dir), "--max-new-tokens", "3", "hi"]) == 0
    assert "base in 4bit, as the run trained" in capsys.readouterr().err


@needs_bnb
@pytest.mark.parametrize("flags, bf16_instructions, computes_in", [
    ([], True, torch.bfloat16),
    (["--dtype", "float32"], True, torch.float32),
    ([], False, torch.float32),  # bf16 products would be emulated: 46x float32's time on one such CPU
    (["--dtype", "float16"], True, torch.float16),  # auto's choice on a GPU without bf16 (a T4): the loss scaled
])
def test_a_qlora_run_records_its_bits_and_eval_reproduces_its_eval_loss(base_dir, tmp_path, capsys, monkeypatch,
                                                                         flags, bf16_instructions, computes_in):
    from lorakit import quantize
    from lorakit.kernels import cpu_gemm
    from lorakit.train import loop

    monkeypatch.setattr(cpu_gemm, "widened_dtypes", lambda: frozenset() if bf16_instructions else
                        frozenset({torch.bfloat16}))
    monkeypatch.setattr("lorakit.models.cpu_has_native_bf16", lambda: bf16_instructions)
    loaded, prepare = [], quantize.prepare_for_kbit_training
    monkeypatch.setattr(quantize, "prepare_for_kbit_training", lambda model: loaded.append(model) or prepare(model))
    scales, loss_scale = [], loop.Trainer._loss_scale
    monkeypatch.setattr(loop.Trainer, "_loss_scale", lambda trainer: scales.append(loss_scale(trainer)) or scales[-1])
    train, held_out = tmp_path / "t.jsonl", tmp_path / "e.jsonl"
    lines = [json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog number {7 * i}"}) + "\n"
             for i in range(24)]
    train.write_text("".join(lines[8:]))
    held_out.write_text("".join(lines[:8]))
    run = tmp_path / "run"
    assert main(["train", "--model", str(base_dir), "--data", str(train), "--eval-data", str(held_out),
                 "--quantize", "4bit", "--max-steps", "3", "--seq-len", "32", "--output", str(run), *flags]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["quantize"] == "4bit" and summary["dtype"] == str(computes_in).removeprefix("torch.")
    printed = " ".join(capsys.readouterr().out.split())
    assert ("--quantize on a CPU without bf16 instructions" in printed) == (not bf16_instructions)
    assert (max(scales) > 1) == (computes_in == torch.float16)
    assert main(["eval", "--adapter", str(run), "--data", str(held_out), "--json"]) == 0
    for model in loaded:  # the run's and eval's: every layer in one dtype, the 4-bit ones computing in it
        four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
        assert four_bit and all(m.compute_dtype == computes_in for m in four_bit)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {computes_in, torch.uint8}
    assert len(loaded) == 2
    scored = json.loads(capsys.readouterr().out)
    assert scored["adapter_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)
    assert scored["base_loss"] == pytest.approx(summary["base_eval_loss"], abs=1e-5)
