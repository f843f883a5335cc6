"""Several adapters on one base; generate and eval through the CLI."""

import json

import pytest
import torch

from lorakit import LoraConfig, apply_lora, save_adapter
from lorakit.adapters import AdapterSet
from lorakit.cli import main
from lorakit.errors import AdapterMismatchError, ConfigError, LorakitError

from tiny_models import randomize_lora, save_tiny_chat_model, tiny_llama, write_define_data

IDS = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def saved_adapter(path, seed, targets):
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize_lora(model, seed=seed)
    expected = logits(model)
    save_adapter(model, path)
    return expected


def test_switch_between_adapters_without_reloading(tmp_path):
    first = saved_adapter(tmp_path / "first", 1, ["q_proj", "v_proj"])
    second = saved_adapter(tmp_path / "second", 2, "all-linear")
    base = tiny_llama()
    reference = logits(base)
    weight_before = base.model.layers[0].self_attn.q_proj.weight
    adapters = AdapterSet(base)
    assert adapters.add(tmp_path / "first") == "first" and adapters.add(tmp_path / "second") == "second"
    for name, expected in [("first", first), ("second", second), ("first", first)]:
        adapters.activate(name)
        assert (logits(base) - expected).abs().max() <= 1e-6
    adapters.deactivate()
    assert torch.equal(logits(base), reference)
    assert base.model.layers[0].self_attn.q_proj.weight is weight_before  # the base was never reloaded
    with pytest.raises(ConfigError, match="no adapter named"):
        adapters.activate("third")


def test_two_adapter_folders_of_one_name_are_told_apart_by_path(tmp_path):
    first = saved_adapter(tmp_path / "runs" / "a" / "adapter", 1, ["q_proj"])
    second = saved_adapter(tmp_path / "old" / "a" / "adapter", 2, ["q_proj"])
    adapters = AdapterSet(tiny_llama())
    assert adapters.add(tmp_path / "runs" / "a" / "adapter") == "a"
    assert adapters.add(tmp_path / "old" / "a" / "adapter") == str((tmp_path / "old" / "a" / "adapter").resolve())
    assert (logits(adapters.activate(f"{tmp_path}/old/./a/adapter/")) - second).abs().max() <= 1e-6  # any spelling
    assert (logits(adapters.activate("a")) - first).abs().max() <= 1e-6
    assert (logits(adapters.activate(f"{tmp_path}/old/a")) - second).abs().max() <= 1e-6  # the run's folder


def test_adapter_for_another_base_is_refused(tmp_path):
    saved_adapter(tmp_path / "a", 1, ["q_proj"])
    with pytest.raises(AdapterMismatchError):
        AdapterSet(tiny_llama(layers=3)).add(tmp_path / "a")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = save_tiny_chat_model(root / "model")
    data = write_define_data(root / "d.jsonl", 32)
    out = root / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "4",
                 "--batch-size", "4", "--seq-len", "64", "--r", "4", "--lr", "1e-2", "--eval-split", "0"]) == 0
    return model, data, out / "adapter"


def test_generate_streams_text(trained, capsys):
    model, _, adapter = trained
    capsys.readouterr()
    assert main(["generate", "--adapter", str(adapter), "--model", str(model), "--max-new-tokens", "5",
                 "Define the word apple."]) == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_generate_and_eval_take_the_threads_asked_for(trained, monkeypatch, command):
    import torch

    model, data, adapter = trained
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # this process keeps its own
    rest = ["--data", str(data)] if command == "eval" else ["--max-new-tokens", "3", "Define the word apple."]
    assert main([command, "--adapter", str(adapter), "--model", str(model), "--threads", "1", *rest]) == 0
    assert threads == [1]


@pytest.mark.parametrize("command, value", [("generate", "0"), ("eval", "two")])
def test_a_bad_thread_count_is_one_line_and_exit_2(capsys, command, value):
    rest = ["--data", "d.jsonl"] if command == "eval" else ["hello"]
    with pytest.raises(SystemExit) as stopped:  # argparse's own exit, as for every flag it refuses
        main([command, "--adapter", "a", "--threads", value, *rest])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert f"argument --threads: {value!r} is not a thread count" in err and "Traceback" not in err


@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_generate_refuses_more_tokens_than_a_position_table_holds(tmp_path, capsys, arch):
    """GPT-2's positions are a table of n_positions rows, GPT-J's precomputed sin/cos too: a longer
    sequence indexes past it (an IndexError). Models computing RoPE for any length are not refused."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM

    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    sizes = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tokenizer), n_positions=32,
                 eos_token_id=tokenizer.eos_token_id)
    model = (GPT2LMHeadModel(GPT2Config(**sizes)) if arch == "gpt2" else GPTJForCausalLM(GPTJConfig(rotary_dim=8, **sizes)))
    model.save_pretrained(tmp_path / arch)
    tokenizer.save_pretrained(tmp_path / arch)
    assert main(["generate", "--model", str(tmp_path / arch), "--max-new-tokens", "40", "--raw", "hello"]) == 2
    assert "exceed the model's context of 32 positions; lower --max-new-tokens to" in capsys.readouterr().err


def test_a_seed_makes_sampling_repeat(trained, capsys):
    model, _, adapter = trained
    texts = []
    for seed in (5, 5, 6):
        capsys.readouterr()
        assert main(["generate", "--adapter", str(adapter), "--model", str(model), "--max-new-tokens", "12",
                     "--temperature", "1.5", "--seed", str(seed), "hello"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_generate_stops_at_every_end_token_of_the_generation_config(trained, monkeypatch):
    """Chat models end a turn with a token listed only in generation_config (Llama 3's <|eot_id|>)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.generate import generate_text

    model_dir, _, _ = trained
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    model.generation_config.eos_token_id = [7, tokenizer.eos_token_id, 9]
    seen = {}
    monkeypatch.setattr(model, "generate", lambda inputs, **options: seen.update(options) or inputs)
    generate_text(model, tokenizer, "hello", max_new_tokens=3)
    assert seen["eos_token_id"] == [tokenizer.eos_token_id, 7, 9]


def test_generate_takes_the_system_turn_the_data_was_trained_with(trained, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.generate import generate_text

    model_dir, _, _ = trained
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    seen = []
    monkeypatch.setattr(model, "generate", lambda inputs, **options: seen.append(inputs[0].tolist()) or inputs)
    generate_text(model, tokenizer, "hello", max_new_tokens=3, system="Answer in one word.")
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Answer in one word."},
                                          {"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    assert seen == [tokenizer(text, add_special_tokens=False)["input_ids"]]


def test_generate_answers_under_the_system_turn_the_adapter_was_trained_with(tmp_path, capsys, monkeypatch):
    model = save_tiny_chat_model(tmp_path / "model")
    records = [{"messages": [{"role": "system", "content": "Answer as a pirate."},
                             {"role": "user", "content": f"Define the word {w}."},
                             {"role": "assistant", "content": f"{w}: a short definition"}]} for w in ("apple", "river") * 4]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["train", "--model", str(model), "--data", str(tmp_path / "chats.jsonl"), "--output", str(tmp_path / "run"),
                 "--max-steps", "1", "--batch-size", "2", "--seq-len", "64", "--r", "4", "--eval-split", "0"]) == 0
    seen = []
    monkeypatch.setattr("lorakit.generate.generate_text", lambda *args, system=None, **kw: seen.append(system))
    for flags in ([], ["--system", "Be brief."], ["--system", ""]):
        capsys.readouterr()
        assert main(["generate", "--adapter", str(tmp_path / "run" / "adapter"), *flags, "Define the word stone."]) == 0
        told = "system turn: the one all its training records opened with ('Answer as a pirate.')" in capsys.readouterr().err
        assert told == (flags == [])
    assert seen == ["Answer as a pirate.", "Be brief.", ""]  # "": the chat template's own
    assert main(["export", "--adapter", str(tmp_path / "run"), "--format", "vllm", "--output", str(tmp_path / "v")]) == 0
    assert "trained with every record opening on the system turn 'Answer as a pirate.'; the result does not keep it" \
        in capsys.readouterr().err


def test_a_template_that_refuses_a_system_turn_is_one_clear_error():
    from lorakit.data.formats import generation_prompt_ids
    from lorakit.errors import ConfigError

    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert generation_prompt_ids(tokenizer, "hello")  # no system turn: rendered
    with pytest.raises(ConfigError, match="chat template refused this prompt: System role not supported; leave "
                                          "out --system"):
        generation_prompt_ids(tokenizer, "hello", system="be brief")


def test_stop_tokens_take_any_form_and_none_means_none():
    from types import SimpleNamespace

    import torch

    from lorakit.generate import stop_token_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=torch.tensor([5, 6])))
    assert stop_token_ids(model, SimpleNamespace(eos_token_id=3)) == [3, 5, 6]
    assert stop_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=(5, 3))),
                          SimpleNamespace(eos_token_id=3)) == [3, 5]
    assert stop_token_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) is None


@pytest.mark.parametrize("flags,words", [(["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                                         (["--temperature", "nan"], "--temperature must be 0"),
                                         (["--temperature", "-1"], "--temperature must be 0"),
                                         (["--temperature", "1e-300"], "below it the logits overflow"),
                                         (["--raw", ""], "the prompt is empty"),
                                         (["--use", "zzz"], "none is loaded"),
                                         (["--raw", "--system", "be brief"], "--system is a chat turn"),
                                         (["--seed", "3"], "--temperature 0 is greedy, without one"),
                                         (["--seed", str(2**64), "--temperature", "0.7"], "--seed must be in [0, 2**32)"),
                                         (["--seed", "-5", "--temperature", "0.7"], "--seed must be in [0, 2**32)")])
def test_generate_refuses_bad_sampling_values_before_loading(capsys, flags, words):
    assert main(["generate", *flags] + ([] if flags[-1] == "" else ["hello"])) == 2
    assert words in capsys.readouterr().err


def test_eval_reports_base_and_adapter(trained, capsys):
    model, data, adapter = trained
    capsys.readouterr()
    assert main(["eval", "--adapter", str(adapter), "--model", str(model), "--data", str(data), "--seq-len", "64",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter_loss"] < result["base_loss"] and result["tokens"] > 0


def test_eval_scores_a_merged_model_alone_as_the_adapter_scored(trained, tmp_path, capsys):
    model, data, adapter = trained
    assert main(["merge", "--adapter", str(adapter), "--model", str(model), "--output", str(tmp_path / "merged")]) == 0
    scored = {}
    for flags in (["--adapter", str(adapter), "--model", str(model)], ["--model", str(tmp_path / "merged")]):
        capsys.readouterr()
        assert main(["eval", *flags, "--data", str(data), "--seq-len", "64", "--dtype", "fp32", "--json"]) == 0
        scored.update(json.loads(capsys.readouterr().out))
    assert scored["model_loss"] == pytest.approx(scored["adapter_loss"], abs=1e-5)  # both in fp32 (eval of an adapter takes its run's dtype)
    assert main(["eval", "--model", str(tmp_path / "merged"), "--data", str(data), "--seq-len", "64"]) == 0
    assert "model " in capsys.readouterr().out
    assert main(["eval", "--data", str(data)]) == 2
    assert "eval needs --adapter (base and adapter scored), or --model" in capsys.readouterr().err
    assert main(["eval", "--model", str(adapter.parent), "--data", str(data)]) == 2
    assert "it holds a training run: pass the folder as the adapter" in capsys.readouterr().err


def test_every_command_that_reads_an_adapter_takes_a_training_runs_folder_for_it(trained, tmp_path, capsys):
    model, data, adapter = trained
    run = adapter.parent
    results = []
    for folder in (adapter, run):
        assert main(["eval", "--adapter", str(folder), "--model", str(model), "--data", str(data), "--seq-len", "64",
                     "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out)["adapter_loss"])
    assert results[0] == results[1]
    for use in (run.name, str(run), str(adapter)):  # its name, or the folder as --adapter took it
        assert main(["generate", "--adapter", str(run), "--model", str(model), "--max-new-tokens", "2", "--use",
                     use, "hi"]) == 0
    assert main(["export", "--adapter", str(run), "--format", "vllm", "--output", str(tmp_path / "vllm")]) == 0
    assert (tmp_path / "vllm" / "adapter_model.safetensors").is_file()
    assert main(["merge", "--adapter", str(run), "--model", str(model), "--output", str(tmp_path / "merged")]) == 0
    before, _ = sorted(p.name for p in adapter.iterdir()), capsys.readouterr()
    assert main(["analyze", str(run), "--json"]) == 0  # a run's heatmap goes beside its loss.png
    assert json.loads(capsys.readouterr().out)["heatmap"] == str(run / "effective_rank.png")
    assert sorted(p.name for p in adapter.iterdir()) == before  # the adapter folder is left as trained
    for command in (["eval", "--data", str(data)], ["merge", "--output", str(tmp_path / "m2")], ["analyze"],
                    ["export", "--format", "vllm", "--output", str(tmp_path / "v2")], ["generate", "hi"]):
        with pytest.raises(SystemExit) as stop:  # argparse's error, not "." taken for the adapter
            main([*command, "--adapter", ""])
        assert stop.value.code == 2 and "--adapter is empty" in capsys.readouterr().err
    assert main(["analyze", ""]) == 2 and "the adapter folder is empty" in capsys.readouterr().err
    from lorakit.lora.adapter_folder import read_adapter_folder

    with pytest.raises(LorakitError, match=f"this looks like a training run's folder: pass its adapter, {adapter}"):
        read_adapter_folder(run)  # the library reads what it is given


@pytest.mark.parametrize("flags, message", [(["--seq-len", "1"], "--seq-len must be at least 2"),
                                           (["--batch-size", "0"], "--batch-size must be at least 1")])
def test_eval_refuses_sizes_it_cannot_run_before_loading(capsys, flags, message):
    assert main(["eval", "--adapter", "nowhere", "--data", "nothing.jsonl", *flags]) == 2
    assert message in capsys.readouterr().err


def test_eval_as_a_library_call(trained):
    from lorakit.evaluate import evaluate_adapter

    model, data, adapter = trained
    result = evaluate_adapter(str(adapter), str(data), model=str(model), seq_len=64)  # one path, not a list
    assert result["adapter_loss"] < result["base_loss"] and result["tokens"] > 0


@pytest.mark.parametrize("dtype, eval_dtype", [("auto", "auto"), ("float32", "float32"), ("float32", "auto")])
def test_eval_reproduces_the_training_runs_own_eval(tmp_path, capsys, dtype, eval_dtype):
    """`lorakit eval` reports the losses of the run's summary, in bf16 too: it loads the base in
    the dtype training picked and evaluates through the trainer's fast paths, whose 16-bit
    roundings differ from transformers' ops. With --dtype auto it takes the run's recorded dtype
    (a --dtype float32 run on a CPU where auto is bf16)."""
    model = save_tiny_chat_model(tmp_path / "model")
    data, held_out = write_define_data(tmp_path / "d.jsonl", 32), write_define_data(tmp_path / "e.jsonl", 8, seed=1)
    common = ["--seq-len", "64", "--batch-size", "4"]
    assert main(["train", "--model", str(model), "--data", str(data), "--eval-data", str(held_out), "--output",
                 str(tmp_path / "run"), "--max-steps", "3", "--r", "4", "--lr", "1e-2", "--dtype", dtype, *common]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--model", str(model), "--data", str(held_out),
                 "--dtype", eval_dtype, "--json", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert any("as the run trained" in note for note in result["notes"]) == (eval_dtype == "auto")
    assert result["base_loss"] == pytest.approx(summary["base_eval_loss"], rel=1e-6)
    assert result["adapter_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-6)


def test_eval_scores_with_the_runs_labels_and_cut_and_refuses_a_loss_that_is_no_number(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = save_tiny_chat_model(tmp_path / "model")
    data, held_out = write_define_data(tmp_path / "d.jsonl", 32), write_define_data(tmp_path / "e.jsonl", 8, seed=1)
    assert main(["train", "--model", str(model), "--data", str(data), "--eval-data", str(held_out), "--output",
                 str(tmp_path / "run"), "--max-steps", "3", "--r", "4", "--lr", "1e-2", "--dtype", "float32",
                 "--seq-len", "48", "--batch-size", "4", "--train-on-inputs"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    capsys.readouterr()
    adapter = tmp_path / "run" / "adapter"
    assert main(["eval", "--adapter", str(adapter), "--data", str(held_out), "--batch-size", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # no --seq-len: the run's 48, and its train_on_inputs
    assert "seq_len 48, train_on_inputs True: the run's own (its config.yaml)" in result["notes"]
    assert result["adapter_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    assert main(["eval", "--adapter", str(adapter), "--data", str(held_out), "--no-train-on-inputs", "--json"]) == 0
    responses = json.loads(capsys.readouterr().out)  # the flag's choice, not the run's: fewer scored tokens
    assert responses["tokens"] < result["tokens"] and "seq_len 48: the run's own (its config.yaml)" in responses["notes"]
    assert "train_on_inputs False, where the run trained with True: other labels than its eval loss's" in \
        responses["notes"]
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    capsys.readouterr()  # a merged model has no run to take the labels from: the flags give them
    assert main(["eval", "--model", str(tmp_path / "merged"), "--data", str(held_out), "--seq-len", "48",
                 "--train-on-inputs", "--dtype", "float32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v * 1e25 for k, v in load_file(weights).items()}, weights)  # finite factors that overflow
    assert main(["eval", "--adapter", str(adapter), "--data", str(held_out), "--json"]) == 2
    assert "the adapter's loss on this data is nan" in capsys.readouterr().err


def _run_then_its_eval(tmp_path, capsys, record, *train_flags):
    """A one-step run on four records (evaluated on them too), then `eval --json` of its adapter on
    the same file, which must give the run's final eval loss: (data, adapter, eval's result)."""
    model = save_tiny_chat_model(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(record(w)) + "\n" for w in ("apple", "river", "stone", "cloud")))
    assert main(["train", "--model", str(model), "--data", str(data), "--eval-data", str(data), *train_flags,
                 "--output", str(tmp_path / "run"), "--max-steps", "1", "--r", "4", "--seq-len", "64",
                 "--dtype", "float32"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    capsys.readouterr()
    adapter = str(tmp_path / "run" / "adapter")
    assert main(["eval", "--adapter", adapter, "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    return data, adapter, result


def test_eval_reads_the_data_in_the_runs_format(tmp_path, capsys):
    """A run trained with --format text on records that also hold prompt and completion: eval's own
    detection read them as instruction records, other tokens and labels than the run's (a hunt)."""
    data, adapter, result = _run_then_its_eval(tmp_path, capsys, lambda w: {
        "prompt": f"define the word {w}", "completion": f"a {w}", "text": f"the {w} is a word people use often"},
        "--format", "text")
    assert any("format text" in note and "the run's own" in note for note in result["notes"])
    assert main(["eval", "--adapter", adapter, "--data", str(data), "--format", "instruction", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert "format instruction, where the run read its data as text: other examples than its eval loss's" in notes


def test_eval_reads_the_data_through_the_runs_columns(tmp_path, capsys):
    data, adapter, result = _run_then_its_eval(tmp_path, capsys, lambda w: {
        "q_text": f"define the word {w}", "target": f"a {w}"}, "--columns", "instruction=q_text", "output=target")
    assert any("columns ['instruction=q_text', 'output=target']" in note and "the run's own" in note
               for note in result["notes"])
    assert main(["eval", "--adapter", adapter, "--data", str(data), "--columns", "prompt=q_text",
                 "completion=target", "--json"]) == 0  # the caller's own, instead
    assert not any("columns" in note for note in json.loads(capsys.readouterr().out)["notes"])
    assert main(["eval", "--adapter", adapter, "--data", str(data), "--columns", "output=nothing"]) == 2
    assert "no data file has a column 'nothing'" in capsys.readouterr().err
    doubled = tmp_path / "doubled.jsonl"  # the run's instruction=q_text would make a second 'instruction'
    doubled.write_text(json.dumps({"q_text": "define the word apple", "instruction": "x", "target": "a"}) + "\n")
    assert main(["eval", "--adapter", adapter, "--data", str(doubled)]) == 2
    assert ("the run's columns instruction=q_text (its config.yaml) would give it two; pass --columns"
            in capsys.readouterr().err)
    assert main(["generate", "--adapter", adapter, "--prompts", str(doubled)]) == 2
    assert ("line 1 already has a field 'instruction': the run's columns instruction=q_text (its config.yaml)"
            in capsys.readouterr().err)


def test_generate_reads_a_prompts_file_through_the_runs_columns(tmp_path, capsys):
    """A run trained with --columns is asked its own test file's prompts (eval scores it so), and a
    file in lorakit's names is read as it is; --columns replaces the run's mapping."""
    words = ("apple", "river", "stone", "cloud")
    data, adapter, _ = _run_then_its_eval(tmp_path, capsys, lambda w: {
        "q_text": f"define the word {w}", "target": f"a {w}"}, "--columns", "instruction=q_text", "output=target")
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"instruction": f"define the word {w}"}) + "\n" for w in words))
    asked = ["generate", "--adapter", adapter, "--max-new-tokens", "5", "--prompts"]
    answers = []
    for path, flags in ((renamed, []), (data, []), (data, ["--columns", "prompt=q_text"])):
        assert main([*asked, str(path), *flags]) == 0
        out, err = capsys.readouterr()
        answers.append([json.loads(line)["completion"] for line in out.splitlines()])
        said = "note: --columns instruction=q_text output=target: the run's own (its config.yaml)" in err
        assert said == (not flags)
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) == len(words)



def test_generate_use_all_reads_the_prompts_through_each_adapters_own_run_columns(tmp_path, capsys):
    """Two runs on one base, each trained through other columns of the same file: under --use all
    each adapter is asked its own run's prompts, as it is alone with its mapping given."""
    model = save_tiny_chat_model(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    words = ("apple", "river", "stone", "cloud")
    data.write_text("".join(json.dumps({"q_text": f"define the word {w}", "question": f"what is a {w}?",
                                        "target": f"a {w}"}) + "\n" for w in words))
    adapters = {}
    for name, column in (("a", "q_text"), ("b", "question")):
        assert main(["train", "--model", str(model), "--data", str(data), "--columns", f"instruction={column}",
                     "output=target", "--output", str(tmp_path / name), "--max-steps", "1", "--r", "4",
                     "--seq-len", "64", "--dtype", "float32", "--eval-split", "0"]) == 0
        adapters[name] = (str(tmp_path / name / "adapter"), column)
    capsys.readouterr()
    asked = ["--max-new-tokens", "5", "--prompts", str(data)]
    assert main(["generate", "--adapter", adapters["a"][0], "--adapter", adapters["b"][0], "--use", "all", *asked]) == 0
    together = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for adapter, column in adapters.values():
        assert main(["generate", "--adapter", adapter, *asked, "--columns", f"instruction={column}"]) == 0
        alone = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        mine = [answer for answer in together if answer["adapter"] == alone[0]["adapter"]]
        assert [(a["prompt"], a["completion"]) for a in mine] == [(a["prompt"], a["completion"]) for a in alone]
        asked_as = {"q_text": "define the word", "question": "what is a"}[column]
        assert len(alone) == len(words) and all(asked_as in answer["prompt"] for answer in alone)

@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_load_the_base_as_train_does(monkeypatch, capsys, command):
    from lorakit import models

    loads = []

    def record(spec, **options):
        loads.append(options)
        raise ConfigError("stop here")

    monkeypatch.setattr(models, "load_model_and_tokenizer", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto: the CPU, also on a GPU machine
    argv = [command, "--adapter", "unused", "--model", "unused"] + (["--data", "x.jsonl"] if command == "eval" else ["hi"])
    for extra in ([], ["--dtype", "float32"], ["--device", "cpu", "--dtype", "bfloat16"]):
        assert main(argv + extra) == 2
    picked = models.training_dtype("auto", "cpu")  # bf16 on a CPU with native bf16, else fp32
    assert [(o["device"], o["dtype"]) for o in loads] == [("cpu", picked), ("cpu", "float32"), ("cpu", "bfloat16")]
    assert main(argv + ["--device", "cuda"]) == 2
    assert "CUDA is not available; use --device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "analyze", "merge"])
def test_a_checkpoint_given_as_the_adapter_is_pointed_to_the_runs_adapter(trained, tmp_path, capsys, command):
    _, _, adapter = trained
    checkpoint = next((adapter.parent / "checkpoints").iterdir())  # the training state: for --resume
    argv = {"generate": ["generate", "--adapter", str(checkpoint), "hello"], "analyze": ["analyze", str(checkpoint)],
            "merge": ["merge", "--adapter", str(checkpoint), "--output", str(tmp_path / "m")]}[command]
    assert main(argv) == 2
    assert (f"this is a training checkpoint (for --resume), not an adapter folder: pass the run's adapter, {adapter}"
            in capsys.readouterr().err)


def test_a_refusal_with_json_also_answers_in_json(capsys):
    assert main(["eval", "--adapter", "nowhere", "--data", "nothing.jsonl", "--seq-len", "1", "--json"]) == 2
    captured = capsys.readouterr()
    answer = json.loads(captured.out)
    assert answer["exit_code"] == 2 and "--seq-len must be at least 2" in answer["error"]
    assert captured.err.startswith("error: --seq-len must be at least 2")
    assert main(["eval", "--adapter", "nowhere", "--data", "nothing.jsonl", "--seq-len", "1"]) == 2
    assert capsys.readouterr().out == ""  # without --json: stderr only


def test_the_runs_dtype_is_read_beside_its_adapter_only(tmp_path):
    from lorakit.evaluate import _dtype_of, _run_summary

    def run_dtype_of(adapter):
        return _dtype_of(_run_summary(adapter), "none", adapter)

    (tmp_path / "run" / "adapter").mkdir(parents=True)
    summary = tmp_path / "run" / "summary.json"
    summary.write_text(json.dumps({"adapter": "runs/x/adapter", "dtype": "float32"}))  # --output given relative
    assert run_dtype_of(tmp_path / "run" / "adapter") == "float32"
    summary.write_text(json.dumps({"adapter": "runs/x/adapter", "dtype": "int8"}))
    assert run_dtype_of(tmp_path / "run" / "adapter") is None
    (tmp_path / "run" / "checkpoints" / "step-000002" / "adapter").mkdir(parents=True)
    assert run_dtype_of(tmp_path / "run" / "checkpoints" / "step-000002" / "adapter") is None
    summary.write_text("not json")
    assert run_dtype_of(tmp_path / "run" / "adapter") is None
    # a quantised base takes a 16-bit dtype only where the run asked for it (its config.yaml)
    adapter, config = tmp_path / "run" / "adapter", tmp_path / "run" / "config.yaml"
    for trained, asked, taken in (("bfloat16", "auto", None), ("float16", "auto", None), ("float16", "float16",
                                  "float16"), ("float32", "auto", "float32"), ("bfloat16", None, None)):
        summary.write_text(json.dumps({"adapter": "runs/x/adapter", "dtype": trained}))
        config.write_text(f"model:\n  dtype: {asked}\n" if asked else "")
        assert _dtype_of(_run_summary(adapter), "4bit", adapter) == taken
        assert _dtype_of(_run_summary(adapter), "none", adapter) == trained  # a dense base: as it trained


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A model whose embeddings have rows for 200 ids, saved with a 347-token tokenizer."""
    from tiny_models import tiny_tokenizer

    folder = tmp_path_factory.mktemp("vocab") / "model"
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab_size=200, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", ["train", "eval", "generate", "recommend"])
def test_token_ids_past_the_models_embeddings_are_refused_before_anything_is_written(
        small_vocab_model, trained, tmp_path, capsys, command):
    """Such ids would raise an IndexError in the embedding lookup (a device-side assert on a GPU)."""
    data = write_define_data(tmp_path / "d.jsonl", 16)
    argv = {"train": ["train", "--data", str(data), "--output", str(tmp_path / "run"), "--max-steps", "1"],
            "eval": ["eval", "--adapter", str(trained[2]), "--data", str(data)],
            "generate": ["generate", "--raw", "define the word apple: a short definition"],
            "recommend": ["recommend", "--data", str(data), "--device", "cpu", "--memory", "4GiB", "--output",
                          str(tmp_path / "run.yaml")]}[command]
    assert main(argv + ["--model", str(small_vocab_model)]) == 2
    error = capsys.readouterr().err
    assert "but the model has rows for ids below 200 only" in error and "(347 tokens) does not match" in error
    assert "Traceback" not in error and not (tmp_path / "run").exists() and not (tmp_path / "run.yaml").exists()


def test_a_tokenizer_larger_than_the_model_is_fine_while_the_ids_fit():
    from lorakit.errors import ModelLoadError
    from lorakit.model_limits import check_token_ids, token_rows

    from tiny_models import tiny_tokenizer

    model, tokenizer = tiny_llama(vocab_size=200), tiny_tokenizer()
    check_token_ids(token_rows(model), tokenizer, 199)
    with pytest.raises(ModelLoadError, match=r"the prompt holds token id 200 \("):
        check_token_ids(token_rows(model), tokenizer, 200, "the prompt holds")
    model.lm_head = torch.nn.Linear(64, 150, bias=False)  # the output layer's rows count too
    assert token_rows(model) == 150


def test_a_pad_token_added_past_the_models_embeddings_is_refused(tmp_path, capsys):
    """The data may never hold it: batches are padded with it (an IndexError at the first step)."""
    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    rows = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # added after the model was saved
    tiny_llama(vocab_size=rows, eos_token_id=tokenizer.eos_token_id).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = write_define_data(tmp_path / "d.jsonl", 16)
    assert main(["train", "--model", str(tmp_path / "model"), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--max-steps", "1"]) == 2
    assert f"the pad token is token id {rows} ('<pad>'), but the model has rows for ids below {rows}" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()
