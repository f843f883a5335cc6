"""lorakit analyze: spectra of s·BA from the factors, the verdict, the heatmap, the CLI."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.plan.analyze import (
    analyze_adapter,
    energy_rank,
    make_verdict,
    parse_module_name,
    plot_effective_rank,
    stable_rank,
    update_singular_values,
)

PREFIX = "base_model.model."


def write_adapter(folder, factors: dict, **config):
    """factors: module name -> (A (r x in), B (out x r)); config: adapter_config.json entries."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": False, "rank_pattern": {},
                "alpha_pattern": {}, "target_modules": ["q_proj"]}
    settings.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


def low_rank_factors(out, inp, r, singular, seed=0):
    """Factors with r columns whose product is U diag(singular) Vᵀ exactly (rank len(singular))."""
    gen = torch.Generator().manual_seed(seed)
    k = len(singular)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=gen, dtype=torch.float64))
    mix = torch.randn(k, r, generator=gen, dtype=torch.float64)  # full row rank
    b = u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ mix  # (out, r)
    a = torch.linalg.pinv(mix) @ v.T  # (r, in); mix @ pinv(mix) = I
    return a.float(), b.float()


def random_factors(out, inp, r, seed=0, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen) * scale


# ---- the maths ----------------------------------------------------------------------------

def test_rank_three_product_of_rank_sixteen_factors(tmp_path):
    a, b = low_rank_factors(48, 40, 16, [3.0, 2.0, 1.0])
    write_adapter(tmp_path, {"model.layers.0.self_attn.q_proj": (a, b)}, r=16, lora_alpha=16)  # scale 1
    module = analyze_adapter(tmp_path).modules[0]
    assert module.rank_at(0.99) == 3  # energies 9, 4, 1 of 14: 99% needs all three
    assert module.rank_at(0.9) == 2  # 13/14 > 0.9
    assert module.singular_values[:3] == pytest.approx([3.0, 2.0, 1.0], rel=1e-4)
    assert max(module.singular_values[3:]) < 1e-5
    assert module.stable_rank == pytest.approx(14 / 9, rel=1e-4)
    assert module.frobenius_norm == pytest.approx(math.sqrt(14), rel=1e-4)


@pytest.mark.parametrize("out,inp,r", [(24, 40, 8), (40, 24, 8), (6, 30, 8), (30, 5, 8)])
def test_singular_values_match_the_full_product(out, inp, r):
    a, b = random_factors(out, inp, r, seed=out + inp, scale=1.0)
    scale = 0.37
    expected = torch.linalg.svdvals(scale * (b.double() @ a.double()))[: min(out, inp, r)]
    got = update_singular_values(a, b, scale)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)


def test_energy_rank_and_stable_rank_edges():
    assert energy_rank(torch.zeros(4), 0.9) == 0
    assert energy_rank(torch.tensor([1.0, 0, 0]), 0.99) == 1
    assert energy_rank(torch.ones(4), 0.9) == 4  # 3/4 < 0.9
    assert energy_rank(torch.ones(4), 0.75) == 3  # exactly 3/4 counts
    assert stable_rank(torch.ones(5)) == pytest.approx(5.0)
    assert stable_rank(torch.zeros(3)) == 0.0


def test_layer_and_type_are_parsed_from_names():
    assert parse_module_name("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert parse_module_name("transformer.h.11.attn.c_attn") == (11, "attn.c_attn")
    assert parse_module_name("bert.encoder.layer.2.attention.output.dense") == (2, "attention.output.dense")
    assert parse_module_name("lm_head") == (None, "lm_head")


# ---- config: rsLoRA, patterns ----------------------------------------------------------------

def test_rslora_scale_and_rank_alpha_patterns(tmp_path):
    q = random_factors(32, 32, 16, seed=1)
    v = random_factors(16, 32, 4, seed=2)
    write_adapter(tmp_path, {"model.layers.0.self_attn.q_proj": q, "model.layers.0.self_attn.v_proj": v},
                  r=16, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 8})
    modules = {m.module_type: m for m in analyze_adapter(tmp_path).modules}
    assert (modules["q_proj"].r, modules["q_proj"].scale) == (16, pytest.approx(16 / 4))  # alpha / sqrt(16)
    assert (modules["v_proj"].r, modules["v_proj"].alpha, modules["v_proj"].scale) == (4, 8, pytest.approx(8 / 2))
    expected = torch.linalg.svdvals(4.0 * (v[1].double() @ v[0].double()))[:4]
    assert modules["v_proj"].singular_values == pytest.approx(expected.tolist(), rel=1e-6)


def test_standard_scale_is_alpha_over_r(tmp_path):
    write_adapter(tmp_path, {"model.layers.0.mlp.up_proj": random_factors(32, 16, 8)}, r=8, lora_alpha=32)
    assert analyze_adapter(tmp_path).modules[0].scale == pytest.approx(4.0)


def test_adapter_saved_by_peft_matches_its_delta_weights(tmp_path):
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    model.save_pretrained(tmp_path)
    analysis = analyze_adapter(tmp_path)
    assert len(analysis.modules) == 2 * 7
    assert {m.module_type for m in analysis.modules} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    expected = torch.linalg.svdvals(layer.get_delta_weight("default").double())[:8]
    module = next(m for m in analysis.modules if m.name == "model.layers.1.mlp.down_proj")
    assert module.layer == 1
    assert module.singular_values == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-7)


# ---- verdicts --------------------------------------------------------------------------------

def _modules(rank_singulars, r, count=8):
    return {f"model.layers.{i}.self_attn.q_proj": low_rank_factors(64, 64, r, rank_singulars, seed=i) for i in range(count)}


def test_oversized_rank_suggests_a_smaller_r(tmp_path):
    write_adapter(tmp_path, _modules([3.0, 2.0, 1.0], 64), r=64, lora_alpha=64)
    verdict = analyze_adapter(tmp_path).verdict
    assert (verdict.kind, verdict.percentile_rank, verdict.suggested_r) == ("oversized", 2, 4)
    assert "r=64, but 95% of modules use at most 2 dimensions (90% energy): r=4 would likely do" == verdict.message


def test_saturated_rank_says_so(tmp_path):
    write_adapter(tmp_path, _modules([1.0] * 8, 8), r=8, lora_alpha=8)
    verdict = analyze_adapter(tmp_path).verdict
    assert (verdict.kind, verdict.percentile_rank, verdict.suggested_r) == ("saturated", 8, 16)
    assert ("with a flat spectrum (median smallest/largest singular value 1.00): rank is saturated: consider a "
            "larger r (e.g. 16), unless it trained only briefly") in verdict.message


def test_most_of_the_rank_at_90_percent_energy_is_no_saturation_when_the_spectrum_decays(tmp_path):
    """The spectrum a one-step run left (lorakit train --max-steps 1, r=8): 90% of its energy takes 6 of
    8 directions, yet its smallest value is 0.3 of its largest: a larger r would add little."""
    decaying = [1.0, 0.73, 0.56, 0.53, 0.39, 0.38, 0.33, 0.30]
    write_adapter(tmp_path, _modules(decaying, 8), r=8, lora_alpha=8)
    verdict = analyze_adapter(tmp_path).verdict
    assert (verdict.kind, verdict.percentile_rank, verdict.suggested_r) == ("fits", 6, 8)
    assert verdict.message == ("r=8 fits: 95% of modules use at most 6 dimensions (90% energy), but the spectrum "
                               "decays within r (median smallest/largest singular value 0.30)")


def test_a_rank_pattern_is_judged_by_the_modules_own_rank(tmp_path):
    """r=32 in the config, every module at 8 by rank_pattern, and all 8 used: saturated at 8, not
    'r=32 is oversized, r=8 would do' (the rank it already has)."""
    write_adapter(tmp_path, _modules([1.0] * 8, 8), r=32, lora_alpha=32, rank_pattern={"q_proj": 8})
    analysis = analyze_adapter(tmp_path)
    assert analysis.r == 8 and analysis.verdict.kind == "saturated"


def test_mixed_ranks_are_each_judged_against_their_own(tmp_path):
    """r=8 with one module raised to 64 by rank_pattern, every module using 8 dimensions: the rank-8
    modules are saturated (and so the adapter), the rank-64 one oversized, not 'r=64 would do'."""
    factors = _modules([1.0] * 8, 8)
    factors["model.layers.0.self_attn.o_proj"] = low_rank_factors(64, 64, 64, [1.0] * 8, seed=9)
    write_adapter(tmp_path, factors, r=8, lora_alpha=8, rank_pattern={"o_proj": 64})
    analysis = analyze_adapter(tmp_path)
    assert analysis.r == 8 and analysis.verdict.kind == "saturated"
    assert [(v.r, v.module_types, v.kind, v.suggested_r) for v in analysis.rank_verdicts] == [
        (8, ["q_proj"], "saturated", 16), (64, ["o_proj"], "oversized", 8)]
    assert analysis.verdict.message.startswith("modules of 2 ranks, each judged against its own: q_proj: r=8, and ")
    assert "; o_proj: r=64, but 95% of modules use at most 8 dimensions (90% energy): r=8 would likely do" in \
        analysis.verdict.message


def test_a_rank_16_module_is_not_judged_by_the_configs_r_8(tmp_path):
    """One percentile over every module compared with the config's r=8 said 'r=8 fits' of an adapter
    whose rank-16 modules use 11 dimensions, more than 8 can hold (a review found it)."""
    factors = _modules([3.0, 2.0, 1.0, 0.5], 8)
    decaying = [2.0 * 0.93 ** i for i in range(16)]
    factors.update({f"model.layers.{i}.mlp.down_proj": low_rank_factors(64, 64, 16, decaying, seed=20 + i)
                    for i in range(8)})
    write_adapter(tmp_path, factors, r=8, lora_alpha=16, rank_pattern={"down_proj": 16})
    analysis = analyze_adapter(tmp_path)
    down = analysis.rank_verdicts[1]
    assert (down.r, down.module_types, down.kind) == (16, ["down_proj"], "fits")
    assert down.percentile_rank > 8 and f"r=16 fits: 95% of modules use at most {down.percentile_rank}" in down.message
    assert analysis.rank_verdicts[0].kind == "oversized" and analysis.verdict.kind == "fits"
    assert "r=8 fits" not in analysis.verdict.message


def test_rank_that_fits(tmp_path):
    write_adapter(tmp_path, _modules([1.0] * 10, 16), r=16, lora_alpha=16)  # 90% of a flat 10: 9 dims
    verdict = analyze_adapter(tmp_path).verdict
    assert (verdict.kind, verdict.percentile_rank, verdict.suggested_r) == ("fits", 9, 16)
    assert verdict.message.startswith("r=16 fits: 95% of modules use at most 9 dimensions")


def test_untrained_adapter_gets_a_verdict_not_a_crash(tmp_path):
    write_adapter(tmp_path, {f"model.layers.{i}.mlp.down_proj": (torch.randn(8, 32), torch.zeros(32, 8)) for i in range(2)}, r=8)
    analysis = analyze_adapter(tmp_path)
    assert analysis.verdict.kind == "untrained" and "no update yet" in analysis.verdict.message
    assert all(m.rank_at(0.9) == 0 and m.stable_rank == 0 for m in analysis.modules)
    assert plot_effective_rank(analysis, tmp_path / "h.png").stat().st_size > 0


def test_partly_untrained_adapter_counts_idle_modules(tmp_path):
    factors = _modules([2.0, 1.0], 16, count=3)
    factors["model.layers.3.self_attn.q_proj"] = (torch.randn(16, 64), torch.zeros(64, 16))
    write_adapter(tmp_path, factors)
    verdict = analyze_adapter(tmp_path).verdict
    assert verdict.kind == "oversized" and "1 module has no update" in verdict.message


# ---- heatmap and CLI -------------------------------------------------------------------------

def test_heatmap_png_is_written(tmp_path):
    write_adapter(tmp_path / "a", {**_modules([2.0, 1.0], 16, count=3), "lm_head": random_factors(50, 64, 16)})
    path = plot_effective_rank(analyze_adapter(tmp_path / "a"), tmp_path / "out" / "rank.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_parses_and_writes_the_default_heatmap(tmp_path, capsys):
    write_adapter(tmp_path, _modules([3.0, 2.0, 1.0], 16, count=2))
    assert main(["analyze", str(tmp_path), "--json", "--energy", "0.9,0.99"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"]["kind"] == "oversized"
    assert report["modules"][0]["energy_ranks"] == {"0.9": 2, "0.99": 3}
    assert report["by_type"][0]["module_type"] == "q_proj"
    assert (tmp_path / "effective_rank.png").exists() and report["heatmap"] == str(tmp_path / "effective_rank.png")


def test_cli_takes_the_adapter_as_other_commands_do_and_refuses_none_or_two(tmp_path, capsys):
    write_adapter(tmp_path / "a", _modules([3.0, 2.0, 1.0], 16, count=2))
    assert main(["analyze", "--adapter", str(tmp_path / "a"), "--no-heatmap", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"]["kind"] == "oversized"
    assert main(["analyze", "--no-heatmap"]) == 2 and "no adapter given" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "a"), "--adapter", str(tmp_path / "b")]) == 2
    assert "two adapters given" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:  # a heatmap asked for and declined: which one was meant?
        main(["analyze", str(tmp_path / "a"), "--heatmap", str(tmp_path / "h.png"), "--no-heatmap"])
    assert exit.value.code == 2 and "--no-heatmap: not allowed with argument --heatmap" in capsys.readouterr().err
    assert not (tmp_path / "h.png").exists()


def test_cli_heatmap_must_be_an_image_name(tmp_path, capsys):
    write_adapter(tmp_path, _modules([3.0, 2.0, 1.0], 16, count=2))
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["analyze", str(tmp_path), "--heatmap", str(tmp_path / "notes.txt")]) == 2
    assert "must end in .png" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"
    for flags in (["--top", "-1"], ["--energy", "0.9,,0.99"]):
        assert main(["analyze", str(tmp_path), "--no-heatmap", *flags]) == 2


def test_cli_heatmap_replaces_its_own_picture_only(tmp_path, capsys):
    write_adapter(tmp_path / "a", _modules([3.0, 2.0, 1.0], 16, count=2))
    mine, heatmap = tmp_path / "loss.png", tmp_path / "rank.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n a picture of the user's")
    assert main(["analyze", str(tmp_path / "a"), "--heatmap", str(mine)]) == 2
    assert "is not a heatmap lorakit analyze wrote" in capsys.readouterr().err
    assert mine.read_bytes().endswith(b"a picture of the user's")
    for _ in range(2):  # the second run replaces the first one's heatmap
        assert main(["analyze", str(tmp_path / "a"), "--heatmap", str(heatmap)]) == 0
    assert heatmap.read_bytes()[:4] == b"\x89PNG"
    default = tmp_path / "a" / "effective_rank.png"  # the default path is checked the same way
    default.write_bytes(mine.read_bytes())
    assert main(["analyze", str(tmp_path / "a")]) == 2
    assert "the heatmap's default path" in capsys.readouterr().err and default.read_bytes() == mine.read_bytes()
    default.unlink()
    for _ in range(2):
        assert main(["analyze", str(tmp_path / "a")]) == 0


def test_cli_heatmap_write_error_names_heatmap_not_output(tmp_path, capsys, monkeypatch):
    from lorakit.errors import OutputError
    from lorakit.plan import analyze

    write_adapter(tmp_path, _modules([3.0, 2.0, 1.0], 16, count=2))

    def read_only(analysis, path):
        raise OutputError(f"read-only file system while writing {path}: choose a writable --output")

    monkeypatch.setattr(analyze, "plot_effective_rank", read_only)
    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "read-only file system" in err and "--no-heatmap" in err and "--output" not in err


def test_cli_table_output(tmp_path, capsys):
    write_adapter(tmp_path, _modules([3.0, 2.0, 1.0], 16, count=2))
    assert main(["analyze", str(tmp_path), "--no-heatmap", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "verdict" in out and "by module type" in out and "top 1 of 2 modules" in out
    assert not (tmp_path / "effective_rank.png").exists()


# ---- bad input -------------------------------------------------------------------------------

def _good(tmp_path):
    return write_adapter(tmp_path / "adapter", _modules([1.0], 8, count=1), r=8)


def test_missing_folder_exits_2(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    assert "no adapter folder" in capsys.readouterr().err


def test_bad_json_exits_2_naming_the_file(tmp_path, capsys):
    folder = _good(tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    assert main(["analyze", str(folder)]) == 2
    assert "adapter_config.json is not valid JSON" in capsys.readouterr().err


def test_truncated_safetensors_is_an_adapter_file_error(tmp_path):
    folder = _good(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        analyze_adapter(folder)


def test_missing_factor_names_the_key(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    save_file({f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(AdapterFileError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight is missing"):
        analyze_adapter(folder)


def test_mismatched_factor_shapes(tmp_path):
    write_adapter(tmp_path, {"model.layers.0.self_attn.q_proj": (torch.randn(4, 8), torch.randn(8, 5))})
    with pytest.raises(AdapterFileError, match="do not multiply"):
        analyze_adapter(tmp_path)


def test_no_lora_tensors(tmp_path):
    save_file({"base_model.model.lm_head.weight": torch.randn(4, 4)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterFileError, match="no LoRA tensors"):
        analyze_adapter(tmp_path)


def test_other_peft_types_are_refused(tmp_path):
    folder = _good(tmp_path)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterFileError, match="IA3"):
        analyze_adapter(folder)


def test_pickle_weights_need_allow_pickle(tmp_path, capsys):
    folder = _good(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    assert main(["analyze", str(folder), "--no-heatmap"]) == 2
    assert "pickle" in capsys.readouterr().err
    assert main(["analyze", str(folder), "--no-heatmap", "--allow-pickle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"][0]["r"] == 8


def test_bad_energy_levels(tmp_path):
    folder = _good(tmp_path)
    with pytest.raises(ConfigError, match="fractions"):
        analyze_adapter(folder, energies=[90])
    assert main(["analyze", str(folder), "--energy", "ninety"]) == 2


def test_adapter_saved_by_lorakit_matches_its_delta_weights(tmp_path):
    from lorakit.lora import LoraConfig, apply_lora, lora_layers, save_adapter
    from tiny_models import randomize_lora, tiny_llama

    model = randomize_lora(apply_lora(tiny_llama(), LoraConfig(r=4, alpha=8, scaling="rslora")), std=0.3)
    save_adapter(model, tmp_path)
    modules = {m.name: m for m in analyze_adapter(tmp_path).modules}
    layers = dict(lora_layers(model))
    assert set(modules) == set(layers)
    for name, layer in layers.items():
        expected = torch.linalg.svdvals(layer.delta_weight().double())[:4]
        assert modules[name].scale == pytest.approx(layer.scaling)
        assert modules[name].singular_values == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-7)


def test_non_numeric_config_values(tmp_path):
    folder = _good(tmp_path)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": "sixteen"}))
    with pytest.raises(AdapterFileError, match="lora_alpha must be a number"):
        analyze_adapter(folder)


def test_a_lorakit_pissa_adapter_is_judged_against_the_rank_it_trained_with(tmp_path):
    """PiSSA is saved as rank 2r against the original base; the user chose r, and the verdict
    and the report say r, with a warning that says why the tensors hold 2r."""
    from lorakit.lora import LoraConfig, apply_lora, save_adapter

    from tiny_models import tiny_llama

    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, init="pissa"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    save_adapter(model, tmp_path / "pissa")
    analysis = analyze_adapter(tmp_path / "pissa")
    assert json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())["r"] == 8  # as saved
    assert analysis.r == 4 and analysis.verdict.r == 4 and analysis.verdict.message.startswith("r=4")
    assert any("PiSSA adapter: trained with r=4, saved as rank 8" in w for w in analysis.warnings)
    apply_lora(plain := tiny_llama(), LoraConfig(r=4, alpha=8))
    save_adapter(plain, tmp_path / "plain")
    assert analyze_adapter(tmp_path / "plain").r == 4
    # its change can span 2r: 5 dimensions of r=4 is not saturation there, as it is for plain LoRA
    five = [dataclasses.replace(m, energy_ranks={k: 5 for k in m.energy_ranks}, singular_values=[1.0] * 8)
            for m in analysis.modules]  # flat
    assert make_verdict(five, 4, 0.9).kind == "saturated"
    pissa = make_verdict(five, 4, 0.9, capacity=8)
    assert pissa.kind == "fits" and "at most 5 dimensions (90% energy) of the 8 a PiSSA change can span" in pissa.message
