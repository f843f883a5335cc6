"""`lorakit bench` on a 2-layer tiny shape: figures present, FLOPs by hand, correctness check.

Timings are never asserted: the machine is shared.
"""

import json

import pytest
import torch
from torch import nn

from lorakit import bench, bench_children, bench_settings, bench_variants
from lorakit.bench import BenchSettings, flops_per_token, resolve, run_bench
from lorakit.bench_inputs import make_inputs
from lorakit.bench_check import check_against_peft
from lorakit.errors import ConfigError, OutputError

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


def _settings(**overrides) -> BenchSettings:
    options = dict(preset="tiny", steps=1, warmup=0, variants=["lorakit", "peft"], peak_tflops=1.0,
                   isolate=False, threads=1)
    return BenchSettings(**{**options, **overrides})


def test_flops_per_token_by_hand():
    # head_dim 16, h_q 64, h_kv 32; per layer q 64*64, k,v 64*32, o 64*64, gate,up,down 64*128
    n_mm = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192) + 256 * 64  # + lm_head
    n_lora = 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))  # r = 4
    flops = flops_per_token(TINY, r=4, context=32)
    assert (flops["n_mm"], flops["n_lora"]) == (90112, 8192) == (n_mm, n_lora)
    assert flops["per_token"] == 4 * 90112 + 6 * 8192 + 6 * 2 * 32 * 64 == 434176


def test_flops_counts_match_the_built_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.lora import LoraConfig, apply_lora

    model = LlamaForCausalLM(LlamaConfig(**TINY))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # lm_head included
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=bench_variants.TARGETS))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = flops_per_token(TINY, r=4, context=32)
    assert (flops["n_mm"], flops["n_lora"]) == (linear, lora)


def test_bench_in_process_reports_every_figure():
    result = run_bench(_settings(), log=lambda line: None)
    json.dumps(result)  # JSON-ready
    for key in ("settings", "shape", "environment", "flops", "peak", "memory_note", "variants", "check"):
        assert key in result
    rows = {r["variant"]: r for r in result["variants"]}
    assert set(rows) == {"lorakit", "peft"}
    for row in rows.values():
        assert "error" not in row, row
        for key in ("step_ms", "min_step_ms", "cpu_ms", "page_faults", "tokens_per_s", "peak_gib", "mfu",
                    "speed_vs_peft", "memory_vs_peft", "first_loss", "last_loss"):
            assert row[key] is not None, key
        # MFU = F * tokens/s / peak, peak given as 1 TFLOP/s
        assert row["mfu"] == pytest.approx(result["flops"]["per_token"] * row["tokens_per_s"] / 1e12)
    assert rows["peft"]["speed_vs_peft"] == 1.0
    # same base, B = 0 at the start: both begin at the base model's loss
    assert rows["lorakit"]["first_loss"] == pytest.approx(rows["peft"]["first_loss"], rel=1e-5)


@pytest.mark.parametrize("mode", [[], ["--sequential"]])
def test_cli_json_runs_a_child_process_per_variant(capsys, mode):
    from lorakit.cli import main

    code = main(["bench", "--preset", "tiny", "--steps", "1", "--warmup", "1", "--variants", "lorakit",
                 "--threads", "1", "--peak-tflops", "1", "--json", *mode])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = result["variants"]
    assert "error" not in row, row
    assert row["peak_rss_gib"] > 0 and row["saved_gib"] > 0
    assert "child process" in result["memory_note"]
    assert ("lockstep" in result["memory_note"]) == (not mode)


@pytest.mark.parametrize("packing", [False, True])
def test_check_matches_peft_from_identical_weights(packing):
    plan = resolve(_settings(check_steps=3, packing=packing, seq_len=48))
    check = check_against_peft(plan, make_inputs(plan))
    assert check["tensors"] == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    assert check["min_grad_cosine"] >= 0.999
    assert check["max_loss_rel_diff"] < 1e-3
    assert check["passed"]
    assert len({round(a, 6) for a, _ in check["losses"]}) > 1  # training moved the loss


def test_check_catches_a_wrong_loss(monkeypatch):
    def wrong_loss(model, plan, chunked):  # predicts the current token instead of the next
        from lorakit.kernels.causal_loss import causal_lm_loss

        return lambda batch: causal_lm_loss(model, {**batch, "labels": torch.roll(batch["labels"], 1, -1)})

    monkeypatch.setattr(bench_variants, "lorakit_loss", wrong_loss)
    plan = resolve(_settings(check_steps=2))
    check = check_against_peft(plan, make_inputs(plan))
    assert check["min_grad_cosine"] < 0.999
    assert not check["passed"]


def _bf16_plan(**overrides):
    """The GPU's bf16 check, run on the CPU (`--dtype bfloat16`)."""
    return resolve(_settings(dtype="bfloat16", **overrides))


def test_bf16_check_judges_lorakit_and_peft_against_an_fp32_reference():
    plan = _bf16_plan(check_steps=3)
    check = check_against_peft(plan, make_inputs(plan))
    ref = check["reference"]
    assert ref is not None and ref["matmul"] == "fp32"  # TF32 only on CUDA
    assert len(ref["losses"]) == 3 and ref["losses"][0] != ref["losses"][-1]
    cos, rel = ref["min_grad_cosine"], ref["max_loss_rel_diff"]
    # bf16 rounding is visible against fp32 but small, for both
    assert 0.99 < cos["peft"] < 1.0 and 0.99 < cos["lorakit"] < 1.0
    assert 0 < rel["peft"] < 1e-2 and rel["lorakit"] < 1e-2
    assert ref["cosine_bound"] == pytest.approx(min(0.999, cos["peft"] - 0.002))
    assert check["passed"] and ref["passed"]


def test_bf16_check_catches_a_wrong_loss(monkeypatch):
    def wrong_loss(model, plan, chunked):  # predicts the current token instead of the next
        from lorakit.kernels.causal_loss import causal_lm_loss

        return lambda batch: causal_lm_loss(model, {**batch, "labels": torch.roll(batch["labels"], 1, -1)})

    monkeypatch.setattr(bench_variants, "lorakit_loss", wrong_loss)
    plan = _bf16_plan(check_steps=2)
    check = check_against_peft(plan, make_inputs(plan))
    assert check["reference"]["min_grad_cosine"]["lorakit"] < check["reference"]["cosine_bound"]
    assert not check["passed"]


def test_a_failing_variant_or_check_keeps_the_other_results(monkeypatch, capsys):
    from lorakit import bench_check
    from lorakit.cli import main

    real = bench.prepare_variant

    def broken_peft(name, plan):
        if name == "peft":
            raise RuntimeError("a kernel failed to compile\nsecond line")
        return real(name, plan)

    def broken_check(plan, inputs):
        raise ValueError("the check broke")

    monkeypatch.setattr(bench, "prepare_variant", broken_peft)
    monkeypatch.setattr(bench_check, "check_against_peft", broken_check)
    result = run_bench(_settings(check=True), log=lambda line: None)
    rows = {r["variant"]: r for r in result["variants"]}
    assert rows["peft"]["error"] == "RuntimeError: a kernel failed to compile"
    assert "error" not in rows["lorakit"] and rows["lorakit"]["tokens_per_s"] > 0
    assert result["check"] == {"error": "ValueError: the check broke", "passed": False}
    capsys.readouterr()
    code = main(["bench", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--check", "--sequential",
                 "--variants", "lorakit", "--threads", "1", "--peak-tflops", "1"])
    out = capsys.readouterr().out
    assert code == 1 and "check FAILED: it did not run to the end (ValueError: the check broke)" in out
    failed = {"variants": [{"variant": "lorakit", "error": "RuntimeError: can't allocate"}], "check": None}
    monkeypatch.setattr(bench, "run_bench", lambda settings, log, partial: failed)  # a shape no variant could run
    code = main(["bench", "--preset", "tiny", "--variants", "lorakit", "--json"])
    assert code == 1 and "every variant failed (above); nothing was measured" in capsys.readouterr().err


def test_a_run_stopped_part_way_keeps_the_rows_it_measured(monkeypatch):
    """A GPU step killed by its time limit, or a fault no variant guard catches: what was measured
    before is handed to `partial` (the CLI's --json-file) after every variant."""
    real, written = bench.prepare_variant, []

    def killed_at_peft(name, plan):
        if name == "peft":
            raise KeyboardInterrupt  # not an Exception: no variant guard catches it
        return real(name, plan)

    monkeypatch.setattr(bench, "prepare_variant", killed_at_peft)
    with pytest.raises(KeyboardInterrupt):
        run_bench(_settings(), log=lambda line: None, partial=written.append)
    assert [len(r["variants"]) for r in written] == [0, 1]
    assert written[-1]["variants"][0]["variant"] == "lorakit" and written[-1]["variants"][0]["tokens_per_s"] > 0


def test_json_file_holds_the_final_result_and_bad_paths_are_refused(tmp_path, capsys):
    from lorakit.cli import main

    from lorakit.cli.bench import _checked_json_file

    target = tmp_path / "bench.json"
    target.write_text(json.dumps({"environment": {}, "settings": {}, "variants": []}))  # an earlier result
    args = ["bench", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--sequential", "--variants", "lorakit",
            "--threads", "1", "--peak-tflops", "1"]
    assert main([*args, "--json-file", str(target)]) == 0  # one real bench: each run starts a child process
    assert [r["variant"] for r in json.loads(target.read_text())["variants"]] == ["lorakit"]
    empty = tmp_path / "mktemp.json"
    empty.touch()
    assert _checked_json_file(str(empty)) == empty and _checked_json_file(str(target)) == target
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    for bad, message in ((tmp_path, "is a folder"), (tmp_path / "no" / "b.json", "does not exist"),
                         (notes, "is not a lorakit bench result")):
        assert main([*args, "--json-file", str(bad)]) == 2
        assert message in capsys.readouterr().err
    assert notes.read_text() == '{"mine": 1}'


def test_a_json_file_on_a_full_disk_names_the_flag_to_change(tmp_path, monkeypatch):
    import errno

    from lorakit import safe_io
    from lorakit.cli.bench import _write_json_file

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safe_io.os, "fsync", full)
    with pytest.raises(OutputError, match=r"disk full while writing .*b.json: choose another --json-file"):
        _write_json_file(tmp_path / "b.json", {"variants": []})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("packing", [False, True])
def test_prompt_fraction_masks_the_start_of_each_example_and_matches_peft(packing):
    plan = resolve(_settings(check_steps=2, packing=packing, seq_len=48, prompt_fraction=0.75))
    inputs = make_inputs(plan)
    labels = inputs["peft"]["labels"]
    assert (labels[:, :36 if not packing else 4] == -100).all()  # packed: the shortest example has 48/8 = 6 tokens
    assert 0.15 < inputs["labelled"] < 0.35
    check = check_against_peft(plan, inputs)  # the head skips the prompt rows: the same loss and gradients
    assert check["passed"], check
    head = TINY["vocab_size"] * TINY["hidden_size"]
    full, masked = flops_per_token(TINY, 4, 32), flops_per_token(TINY, 4, 32, labelled=0.25)
    assert full["per_token"] - masked["per_token"] == 4 * 0.75 * head


def test_max_doc_len_packs_several_short_examples_per_row():
    plan = resolve(_settings(packing=True, batch=2, seq_len=64, max_doc_len=16))
    inputs = make_inputs(plan)
    lengths = inputs["lorakit"]["cu_seq_lens_q"].diff()
    assert int(lengths.max()) <= 16 and len(lengths) >= 2 * 64 // 16
    assert inputs["context"] <= 16 and inputs["peft"]["input_ids"].shape[1] <= 16  # padded to the longest
    for bad in (dict(packing=False, max_doc_len=16), dict(packing=True, seq_len=64, max_doc_len=65)):
        with pytest.raises(ConfigError, match="--max-doc-len"):
            resolve(_settings(**bad))


def test_packed_inputs_hold_the_same_examples_as_the_padded_ones():
    plan = resolve(_settings(packing=True, batch=2, seq_len=64))
    inputs = make_inputs(plan)
    packed, masked, padded = inputs["lorakit"], inputs["lorakit-4d"], inputs["peft"]
    assert "attention_mask" not in packed and packed["cu_seq_lens_q"][-1] == packed["input_ids"].numel()
    assert masked["attention_mask"].shape == (2, 1, masked["input_ids"].shape[1], masked["input_ids"].shape[1])
    assert torch.equal(packed["input_ids"], masked["input_ids"]) and torch.equal(packed["labels"], masked["labels"])
    assert padded["attention_mask"].dim() == 2 and padded["input_ids"].shape[0] > 2
    assert inputs["tokens"] == int(padded["attention_mask"].sum())
    real = packed["labels"] != -100
    assert int(real.sum()) == int((padded["labels"] != -100).sum())
    assert 64 / 8 <= inputs["context"] <= 64


def test_packed_bench_runs_varlen_and_4d_alike():
    result = run_bench(_settings(packing=True, seq_len=48, steps=2, variants=["lorakit", "lorakit-4d", "peft"]),
                       log=lambda line: None)
    rows = {r["variant"]: r for r in result["variants"]}
    assert "error" not in rows["lorakit-4d"], rows["lorakit-4d"]
    assert rows["lorakit"]["last_loss"] == pytest.approx(rows["lorakit-4d"]["last_loss"], rel=1e-5)
    assert rows["lorakit"]["last_loss"] == pytest.approx(rows["peft"]["last_loss"], rel=1e-5)


def test_settings_errors_and_dropped_variants():
    with pytest.raises(ConfigError, match="preset"):
        resolve(BenchSettings(preset="huge"))
    with pytest.raises(ConfigError, match="unknown variant"):
        resolve(_settings(variants=["lorakit", "unsloth"]))
    with pytest.raises(ConfigError, match="--steps"):
        resolve(_settings(steps=0))
    for peak in (0.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--peak-tflops must be a positive number"):
            resolve(_settings(peak_tflops=peak))
    plan = resolve(_settings(variants=["peft-liger", "peft-bf16", "lorakit"]))
    assert plan.settings.variants == ["lorakit"]  # both are GPU-only
    assert len(plan.notices) == 2
    assert resolve(BenchSettings()).settings.variants == ["lorakit", "peft"]  # CPU defaults
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--preset gpu-1b runs on a CUDA GPU"):
            resolve(BenchSettings(preset="gpu-1b"))
        with pytest.raises(ConfigError, match="--device cuda runs on a CUDA GPU"):
            resolve(BenchSettings(preset="tiny", device="cuda"))


def test_lockstep_children_take_turns_from_the_same_start():
    plan = resolve(_settings(steps=2, warmup=1, interleave=True))
    lines = []
    raws = {raw["variant"]: raw for raw in bench_children.run_lockstep(plan, log=lines.append)}
    assert set(raws) == {"lorakit", "peft"} and not any("error" in raw for raw in raws.values()), raws
    assert len(lines) == 3 and all("lorakit" in line and "peft" in line for line in lines)  # turns, per step
    for raw in raws.values():
        assert raw["memory"]["peak_rss"] > raw["memory"]["rss_built"] > 0 and raw["saved_bytes"] > 0
        assert len(raw["wall_s"]) == len(raw["cpu_s"]) == len(raw["faults"]) == 2 and len(raw["losses"]) == 3
        assert all(isinstance(n, int) and n >= 0 for n in raw["faults"])  # minor page faults per timed step
    # both start at the base model (B = 0) and take the same AdamW steps
    assert raws["lorakit"]["losses"] == pytest.approx(raws["peft"]["losses"], rel=1e-5)


def test_cpu_runs_interleave_by_default_and_sequential_is_a_choice():
    assert resolve(BenchSettings(preset="tiny")).settings.interleave is True
    assert resolve(BenchSettings(preset="tiny", interleave=False)).settings.interleave is False
    assert resolve(BenchSettings(preset="tiny", isolate=False)).settings.interleave is False  # in-process tests
    assert resolve(BenchSettings(preset="tiny")).settings.chunk_size is None  # sized by bytes at run time


def test_offload_variant_is_cuda_only_and_is_wired_in_when_forced():
    # a smoke test: on a CPU no tensor moves; the GPU run (scripts/gpu_check.sh) measures offload
    from lorakit.bench import train_step
    from lorakit.bench_variants import prepare_variant

    plan = resolve(_settings(variants=["lorakit", "lorakit-offload"], grad_checkpointing=True))
    assert plan.settings.variants == ["lorakit"] and "lorakit-offload skipped" in plan.notices[0]
    inputs = make_inputs(plan)
    losses = {}
    for name in ("lorakit", "lorakit-offload"):  # on a CPU its hooks keep tensors where they are
        prepared = prepare_variant(name, plan)
        offloaded = {getattr(layer._gradient_checkpointing_func, "__qualname__", "").startswith("offloaded_checkpoint")
                     for layer in prepared.model.model.layers}
        assert offloaded == {name == "lorakit-offload"}
        losses[name] = [train_step(prepared, inputs["lorakit"], "cpu")[2] for _ in range(2)]
    assert losses["lorakit-offload"] == pytest.approx(losses["lorakit"], rel=1e-6)


def test_cpu_bench_in_bf16_adds_the_peft_bf16_row_and_measures_a_bf16_peak(monkeypatch):
    import lorakit.bench as bench

    plan = resolve(_settings(dtype="bfloat16", variants=None))
    assert plan.dtype == "bfloat16" and plan.settings.variants == ["lorakit", "peft", "peft-bf16"]
    assert resolve(_settings(variants=None)).settings.variants == ["lorakit", "peft"]  # fp32: peft-bf16 = peft
    peaks = []
    real_peak = bench.measure_matmul_peak
    monkeypatch.setattr(bench, "measure_matmul_peak", lambda device, dtype="float32": peaks.append(dtype)
                        or real_peak(device, dtype))
    result = run_bench(_settings(dtype="bfloat16", variants=None, peak_tflops=None), log=lambda line: None)
    assert set(peaks) == {"bfloat16"} and "bf16 2048^3" in result["peak"]["source"]
    with pytest.raises(ConfigError, match="--dtype must be one of float32, bfloat16"):
        resolve(_settings(dtype="float16"))
    rows = {r["variant"]: r for r in result["variants"]}
    assert all("error" not in r for r in rows.values()) and rows["peft-bf16"]["speed_vs_peft_bf16"] == 1.0
    # bf16 weights everywhere; lorakit and PEFT start at the same loss
    assert rows["lorakit"]["first_loss"] == pytest.approx(rows["peft-bf16"]["first_loss"], rel=1e-3)


@pytest.mark.parametrize("flags,message", [(["--prompt-fraction", "1"], "--prompt-fraction"),
                                           (["--max-doc-len", "64"], "--max-doc-len"),
                                           (["--batch", "0"], "--batch must be at least 1"),  # was the default
                                           (["--seq-len", "1"], "--seq-len must be at least 2"),
                                           (["--variants", ""], "--variants is empty"),
                                           (["--variants", "lorakit-native"], "none of the asked variants runs here"),
                                           (["--r", "1000"], "above the smallest projection side"),
                                           (["--dropout", "1"], "--dropout must be at least 0 and below 1"),
                                           (["--dropout", "0.1", "--check"], "each draws its own dropout masks")])
def test_bad_new_flags_exit_2_with_one_message(capsys, flags, message):
    from lorakit.cli import main

    assert main(["bench", "--preset", "tiny", "--steps", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_dropout_reaches_every_variant_and_lorakit_stays_fused():
    from lorakit.bench_variants import prepare_variant

    plan = resolve(_settings(dropout=0.1))
    prepared = {name: prepare_variant(name, plan) for name in ("lorakit", "peft")}
    for name, variant in prepared.items():
        rates = [m.p for n, m in variant.model.named_modules()
                 if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
        assert rates == [0.1] * 7 * plan.settings.layers, name
    lorakit = prepared["lorakit"]
    assert lorakit.notices == [] and "forward" in lorakit.model.model.layers[0].mlp.__dict__  # fused, no fallback
    result = run_bench(_settings(dropout=0.1, steps=2), log=lambda line: None)
    assert result["settings"]["dropout"] == 0.1 and all("error" not in r for r in result["variants"])


def test_eager_variant_keeps_transformers_norm_and_rope_and_trains_alike():
    from lorakit.bench_variants import prepare_variant

    result = run_bench(_settings(steps=3, variants=["lorakit", "lorakit-eager"]), log=lambda line: None)
    rows = {r["variant"]: r for r in result["variants"]}
    assert rows["lorakit-eager"]["last_loss"] == pytest.approx(rows["lorakit"]["last_loss"], rel=1e-5)
    plan = resolve(_settings())
    patched_norms = {name: sum("forward" in m.__dict__ for m in prepare_variant(name, plan).model.modules()
                               if type(m).__name__ == "LlamaRMSNorm")
                     for name in ("lorakit", "lorakit-eager")}
    assert patched_norms == {"lorakit": 2 * TINY["num_hidden_layers"] + 1, "lorakit-eager": 0}
    plan.settings.device = "cuda"  # no GPU here: only the rule is checked
    assert "CPU tensors only" in bench_settings._skip_reason("lorakit-eager", plan)


def test_perdoc_variant_is_cuda_only_and_keeps_torch_varlen_kernel_out():
    from lorakit.bench_variants import prepare_variant
    from lorakit.kernels.varlen_attention import PER_DOCUMENT_ONLY

    plan = resolve(_settings(variants=["lorakit", "lorakit-perdoc"], packing=True, seq_len=48))
    assert plan.settings.variants == ["lorakit"] and "lorakit-perdoc skipped" in plan.notices[0]
    flags = {name: {m.__dict__.get(PER_DOCUMENT_ONLY, False) for m in prepare_variant(name, plan).model.modules()
                    if hasattr(m, "head_dim")}
             for name in ("lorakit", "lorakit-perdoc")}
    assert flags == {"lorakit": {False}, "lorakit-perdoc": {True}}


def test_memory_budget_checkpoints_the_fewest_earliest_layers_the_estimate_needs(capsys):
    from lorakit.bench_settings import budget_checkpoint_layers
    from lorakit.bench_variants import prepare_variant
    from lorakit.cli import main
    from lorakit.plan.estimate import TrainShape, estimate_memory
    from lorakit.train.memory_plan import checkpointable_layers

    plan = resolve(_settings(layers=4))
    step = dict(batch_size=plan.settings.batch, seq_len=plan.settings.seq_len, r=16, targets=bench_variants.TARGETS,
                fused_loss=True, dtype="fp32", device="cpu", cpu_attention=True, fused_mlp=True)
    peaks = [estimate_memory(plan.shape, TrainShape(**step, grad_checkpointing=k > 0, checkpoint_layers=k or None)).total
             for k in range(5)]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[4]  # each checkpointed layer saves memory
    budget = (peaks[2] + peaks[3]) / 2 / 2**30 / 0.9  # 90% of it between 2 and 3 layers: 3 are needed
    plan = resolve(_settings(layers=4, memory_budget_gib=budget, variants=["lorakit", "peft"]))
    assert plan.checkpoint_layers == {"lorakit": 3} and "lorakit checkpoints the first 3 of 4 layers" in plan.notices[-1]
    assert budget_checkpoint_layers(resolve(_settings(layers=4, memory_budget_gib=1e-3)))[0] == 4  # never fits
    flags = {name: [layer.gradient_checkpointing for layer in checkpointable_layers(prepare_variant(name, plan).model)]
             for name in ("lorakit", "peft")}
    assert flags == {"lorakit": [True, True, True, False], "peft": [False] * 4}
    assert main(["bench", "--preset", "tiny", "--memory-budget", "1", "--grad-checkpointing"]) == 2
    assert "drop --grad-checkpointing" in capsys.readouterr().err
    for bad in ("0", "nan", "inf"):
        assert main(["bench", "--preset", "tiny", "--memory-budget", bad]) == 2
        assert "--memory-budget must be a positive number of GiB" in capsys.readouterr().err


def test_bench_takes_the_dtype_and_size_spellings_train_takes():
    from lorakit.cli import build_parser
    from lorakit.cli.bench import bench_settings

    args = build_parser().parse_args(["bench", "--dtype", "bf16", "--memory-budget", "512MiB"])
    settings = bench_settings(args)
    assert settings.dtype == "bfloat16" and settings.memory_budget_gib == 0.5
    assert bench_settings(build_parser().parse_args(["bench", "--memory-budget", "1.5"])).memory_budget_gib == 1.5
    with pytest.raises(ConfigError, match="--memory-budget"):
        bench_settings(build_parser().parse_args(["bench", "--memory-budget", "8 apples"]))


def test_bench_names_an_unmeasured_dtype_as_it_was_spelled(capsys):
    from lorakit.cli import main

    with pytest.raises(SystemExit) as stopped:  # argparse's own error: one line and exit 2
        main(["bench", "--dtype", "fp16"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "'fp16': the bench measures bf16 or fp32" in err and "float16'" not in err
    with pytest.raises(SystemExit):
        main(["bench", "--dtype", "float64"])
    assert "'float64': the bench measures bf16 or fp32\n" in capsys.readouterr().err  # no float16 reason


# the tiny 4-layer shape's estimated peaks with the fast paths' savings and costs (the fused MLP,
# the CPU attention's probabilities): 2.71, 2.51, 2.30, 2.08, 2.00 MiB with 0-4 layers checkpointed
# (2.96, 2.70, 2.42, 2.14, 2.07 without the fused MLP). 90% of each budget below fits 0, 1 and 3
# layers, and the last fits none (all 4); without the fused MLP the first three would need one more
@pytest.mark.parametrize("budget_gib,layers", [(0.0030, 0), (0.0028, 1), (0.00228, 3), (0.002, 4)])
def test_bench_budget_plans_as_the_trainer_does(monkeypatch, budget_gib, layers):
    import argparse

    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.bench_settings import budget_checkpoint_layers
    from lorakit.config import add_flags, lora_config
    from lorakit.config import resolve as resolve_config
    from lorakit.kernels.llama_patch import enable_fast_paths
    from lorakit.lora import apply_lora
    from lorakit.train import memory_plan

    plan = resolve(_settings(layers=4, memory_budget_gib=budget_gib))
    parser = argparse.ArgumentParser()
    add_flags(parser)
    argv = ["--data", "unused.jsonl", "--batch-size", str(plan.settings.batch), "--seq-len", str(plan.settings.seq_len),
            "--r", str(plan.settings.r), "--memory-budget", repr(budget_gib)]
    config = resolve_config(None, vars(parser.parse_args(argv)))
    model = LlamaForCausalLM(LlamaConfig(**plan.shape))
    apply_lora(model, lora_config(config))
    enable_fast_paths(model)  # as the trainer does before planning: the plan counts the kept attention probabilities
    monkeypatch.setattr(memory_plan, "memory_budget", lambda model, device: memory_plan.Budget(2**40, "roomy device"))
    trainer = memory_plan.choose_checkpointing(model, config, torch.device("cpu"))
    assert budget_checkpoint_layers(plan)[0] == layers
    assert trainer.layers == tuple(range(layers))


def test_bench_budget_plans_each_variant_with_the_fast_paths_it_runs():
    # at 2.8 MiB (see above) lorakit needs 1 layer, and the ablations without the fused MLP and
    # chunked loss save more per layer, so they need more
    variants = ["lorakit", "lorakit-plain", "lorakit-ce", "lorakit-fused", "peft"]
    plan = resolve(_settings(layers=4, memory_budget_gib=0.0028, variants=variants))
    assert plan.checkpoint_layers["lorakit"] == 1 and set(plan.checkpoint_layers) == set(variants) - {"peft"}
    assert all(plan.checkpoint_layers[v] > 1 for v in ("lorakit-plain", "lorakit-ce"))
    assert "lorakit-plain checkpoints the first" in plan.notices[-1]


def test_the_report_says_whose_gemms_each_variant_ran(monkeypatch):
    from lorakit.kernels import cpu_gemm

    if not cpu_gemm._onednn_runs(torch.float32):
        pytest.skip("oneDNN cannot run fp32 products here")
    monkeypatch.setenv(cpu_gemm.ENV_VAR, "onednn")
    result = run_bench(_settings(steps=1, variants=["lorakit", "lorakit-plain", "lorakit-aten", "peft"]),
                       log=lambda line: None)
    ran = {r["variant"]: r["cpu_gemm"] for r in result["variants"]}
    assert ran["lorakit"].startswith("onednn (") and ran["lorakit"].endswith(" products per step)")
    assert ran["lorakit-plain"] == ran["lorakit-aten"] == ran["peft"] == "aten"


def test_the_aten_variant_names_cpu_gemms_own_backend():
    """The variants' table is torch-free (bench --help), so it spells the backend: it must be cpu_gemm's."""
    from lorakit.bench_table import VARIANTS
    from lorakit.kernels import cpu_gemm

    assert VARIANTS["lorakit-aten"].gemm_backend == cpu_gemm.ATEN


def test_fullrecompute_variant_keeps_transformers_checkpointing_and_the_same_losses(monkeypatch):
    # the recompute skip's share: the same model under transformers' checkpoint, whose recompute
    # computes every MLP's output
    from lorakit.bench import train_step
    from lorakit.bench_variants import prepare_variant
    from lorakit.kernels import fused_lora

    plan = resolve(_settings(variants=["lorakit", "lorakit-fullrecompute"]))
    assert plan.settings.variants == ["lorakit"] and "needs --grad-checkpointing" in plan.notices[0]
    plan = resolve(_settings(variants=["lorakit", "lorakit-fullrecompute"], grad_checkpointing=True))
    inputs = make_inputs(plan)
    skipped, losses = [], {}
    real = fused_lora._shared_forward
    monkeypatch.setattr(fused_lora, "_shared_forward",
                        lambda *a, outputs=True: skipped.append(not outputs) or real(*a, outputs=outputs))
    for name in ("lorakit", "lorakit-fullrecompute"):
        prepared = prepare_variant(name, plan)
        skipped.clear()
        losses[name] = [train_step(prepared, inputs["lorakit"], "cpu")[2] for _ in range(2)]
        assert any(skipped) == (name == "lorakit")
    assert losses["lorakit-fullrecompute"] == pytest.approx(losses["lorakit"], rel=1e-6)


def test_directlaunch_variant_is_cuda_only_and_sets_the_launch_mode_for_its_steps_only():
    from lorakit.bench import train_step
    from lorakit.bench_variants import prepare_variant
    from lorakit.kernels import triton_launch

    plan = resolve(_settings(variants=["lorakit", "lorakit-directlaunch"]))
    assert plan.settings.variants == ["lorakit"] and "lorakit-directlaunch skipped" in plan.notices[0]
    prepared = prepare_variant("lorakit-directlaunch", plan)  # forced: the rule is checked, no kernel runs here
    seen = []
    real_loss = prepared.loss_fn
    prepared.loss_fn = lambda batch: seen.append(triton_launch.launch_mode()) or real_loss(batch)
    before = triton_launch.launch_mode()
    train_step(prepared, make_inputs(plan)["lorakit"], plan.device)
    assert seen == ["direct"] and triton_launch.launch_mode() == before


def test_unstacked_variant_is_cuda_only_and_keeps_each_weight_in_its_storage():
    from lorakit.bench_variants import prepare_variant

    plan = resolve(_settings(variants=["lorakit", "lorakit-unstacked"]))
    assert plan.settings.variants == ["lorakit"] and "lorakit-unstacked skipped" in plan.notices[0]
    for name in ("lorakit", "lorakit-unstacked"):  # on a CPU neither stacks (forced here: only the rule)
        mlp = prepare_variant(name, plan).model.model.layers[0].mlp
        assert len({getattr(mlp, p).base_layer.weight.untyped_storage().data_ptr()
                    for p in ("gate_proj", "up_proj")}) == 2


def test_graphed_variant_is_cuda_only_and_its_steps_leave_the_replayed_gradients_in_place():
    from lorakit.bench import train_step
    from lorakit.bench_variants import prepare_variant

    plan = resolve(_settings(variants=["lorakit", "lorakit-graphed"]))
    assert plan.settings.variants == ["lorakit"] and "lorakit-graphed skipped" in plan.notices[0]
    for flags in (dict(grad_checkpointing=True), dict(packing=True)):  # a capture takes plain rows only
        assert "lorakit-graphed skipped" in resolve(_settings(variants=["lorakit", "lorakit-graphed"],
                                                              **flags)).notices[0]
    prepared = prepare_variant("lorakit", plan)
    replays = []

    def replay(batch):  # a replay writes its gradients into the tensors .grad holds
        loss = prepared.loss_fn(batch)
        loss.backward()
        replays.append(1)
        return loss.detach()

    prepared.captured = replay
    train_step(prepared, make_inputs(plan)["lorakit"], plan.device)
    params = [p for p in prepared.model.parameters() if p.requires_grad]
    assert replays == [1] and all(p.grad is not None for p in params)  # not set to None after the step


def test_a_graphed_row_reports_its_losses_against_lorakit_s():
    raw = [{"variant": "lorakit", "losses": [2.0, 1.5, 1.0]},
           {"variant": "lorakit-graphed", "graphed": True, "losses": [2.0, 1.5, 1.001]}]
    rows = [{"variant": r["variant"], "notices": []} for r in raw]
    bench._compare_replayed_losses(raw, rows)
    assert rows[0]["notices"] == [] and rows[1]["loss_vs_lorakit"] == pytest.approx(1e-3)
    assert "max relative difference 1.0e-03" in rows[1]["notices"][0]


def test_a_graphed_row_whose_losses_are_not_numbers_is_infinitely_off():
    raw = [{"variant": "lorakit", "losses": [2.0, 1.5, 1.0]},
           {"variant": "lorakit-graphed", "graphed": True, "losses": [2.0, float("nan"), float("nan")]}]
    rows = [{"variant": r["variant"], "notices": []} for r in raw]
    bench._compare_replayed_losses(raw, rows)
    assert rows[1]["loss_vs_lorakit"] == float("inf")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cpu_peak_times_each_backend_that_runs_and_stops_at_its_time_budget(monkeypatch, dtype):
    """Five tries after a warm-up through each backend that takes the dtype here (oneDNN has no
    bf16 kernel on an AVX2-only CPU); products slower than the budget in all are not repeated."""
    from lorakit.kernels import cpu_gemm

    runs = (cpu_gemm.ATEN, cpu_gemm.ONEDNN) if cpu_gemm._onednn_runs(getattr(torch, dtype)) else (cpu_gemm.ATEN,)
    assert bench._backends_that_run(torch.zeros(2, 2, dtype=getattr(torch, dtype))) == runs
    tried = []
    monkeypatch.setattr(cpu_gemm, "matmul", lambda a, b: tried.append(cpu_gemm.backend_for(a)))
    assert bench.measure_matmul_peak("cpu", dtype) > 0
    assert tried == [backend for backend in runs for _ in range(6)]
    tried.clear()
    monkeypatch.setattr(bench, "PEAK_TIMING_BUDGET_S", 0.0)  # every product over it: one try each
    bench.measure_matmul_peak("cpu", dtype)
    assert tried == list(runs)


def test_peft_variants_import_peft_with_bitsandbytes_hub_advice_filtered(monkeypatch):
    """PEFT imports bitsandbytes, which on an AVX512-BF16 CPU warns at import that it fetched no Hub
    kernel: the bench's PEFT variants install quantize.quiet_hub_kernel_advice's filter (their own
    code calls it just before importing PEFT; here PEFT is imported already)."""
    from lorakit import quantize

    calls = []
    monkeypatch.setattr(quantize, "quiet_hub_kernel_advice", lambda: calls.append("quiet"))
    plan = resolve(_settings())
    model = bench_variants.add_peft_adapters(bench_variants.build_model(plan), plan)
    assert calls == ["quiet"] and hasattr(model, "get_base_model")
