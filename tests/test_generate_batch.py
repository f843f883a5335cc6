"""`lorakit generate` beyond one argument: PROMPT - (stdin), --prompts FILE (.txt, .jsonl) with one
load of the model, --output, --use all, and every bad input as one error line with exit code 2."""

import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from lorakit.cli import main

from tiny_models import randomize_lora, save_tiny_chat_model

PROMPT = "Define the word apple."
TOKENS = ["--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    """A tiny chat model and two random adapters for it, "first" and "second" (trained, as it were,
    under a system turn)."""
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, apply_lora, save_adapter

    root = tmp_path_factory.mktemp("generate-batch")
    model_dir = save_tiny_chat_model(root / "model")
    for seed, name in ((1, "first"), (2, "second")):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        system = "Answer as a pirate." if name == "second" else None
        save_adapter(randomize_lora(model, seed=seed, std=0.5), root / name, system_turn=system)
    return model_dir, root / "first", root / "second"


@pytest.fixture
def generate(base_and_adapters, capsys):
    """`lorakit generate --model M --adapter first ARGS...` in this process: (exit code, stdout, stderr)."""
    model_dir, first, _ = base_and_adapters

    def call(*args, adapters=(first,)):
        capsys.readouterr()
        flags = [f for a in adapters for f in ("--adapter", str(a))]
        code = main(["generate", "--model", str(model_dir), *flags, *TOKENS, *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err
    return call


def stdin_of(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def answers(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_greedy_answers_alike_from_the_argument_stdin_and_each_kind_of_file(generate, tmp_path, monkeypatch):
    code, streamed, _ = generate(PROMPT)
    assert code == 0 and streamed.strip()
    stdin_of(monkeypatch, f"{PROMPT}\n".encode())  # echo's line break is not part of the prompt
    assert generate("-")[:2] == (0, streamed)
    records = [{"prompt": PROMPT}, {"instruction": PROMPT, "output": "apple: a fruit"},
               {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "a fruit"}]},
               {"conversations": [{"from": "human", "value": PROMPT}]}]
    files = [write(tmp_path / "p.txt", f"\n  {PROMPT}  \n\n"),
             write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in records))]
    for path in files:
        code, out, _ = generate("--prompts", path)
        assert code == 0
        assert [a["completion"] for a in answers(out)] == [streamed.strip()] * (1 if path.suffix == ".txt" else 4)
    assert answers(generate("--prompts", files[0])[1])[0] == {"prompt": PROMPT, "completion": streamed.strip(),
                                                              "adapter": "first", "line": 2}


def test_a_records_system_field_is_its_system_turn(generate, tmp_path):
    code, streamed, _ = generate("--system", "Answer as a pirate.", PROMPT)
    path = write(tmp_path / "p.jsonl", json.dumps({"prompt": PROMPT, "system": "Answer as a pirate."}) + "\n")
    code, out, _ = generate("--system", "Be brief.", "--prompts", path)  # the record's comes first
    assert code == 0 and answers(out)[0]["completion"] == streamed.strip()
    assert answers(out)[0]["system"] == "Answer as a pirate."


def test_the_model_loads_once_for_every_prompt_and_adapter(generate, base_and_adapters, tmp_path, monkeypatch):
    import lorakit.quantize

    loads, load = [], lorakit.quantize.load_for_inference
    monkeypatch.setattr(lorakit.quantize, "load_for_inference", lambda *a, **k: loads.append(a) or load(*a, **k))
    path = write(tmp_path / "p.txt", "Define the word apple.\nDefine the word river.\nDefine the word stone.\n")
    code, out, err = generate("--use", "all", "--prompts", path, adapters=base_and_adapters[1:])
    assert code == 0 and len(loads) == 1
    assert err.count("system turn of second: the one all its training records opened with") == 1
    got = answers(out)
    expected = [(name, line) for name in ("first", "second") for line in (1, 2, 3)]  # one adapter after the other
    assert [(a["adapter"], a["line"]) for a in got] == expected
    assert [a["completion"] for a in got[:3]] != [a["completion"] for a in got[3:]]  # each adapter answered
    code, streamed, err = generate("--use", "all", PROMPT, adapters=base_and_adapters[1:])
    assert code == 0 and len(loads) == 2 and "adapter first:" in err and "adapter second:" in err
    first, second = got[0]["completion"], got[3]["completion"]  # line 1 is PROMPT
    assert first in streamed and second in streamed[streamed.index(first) + len(first):]
    code, alone, _ = generate("--system", "Answer as a pirate.", PROMPT, adapters=base_and_adapters[2:])
    assert alone.strip() == second  # the batch answered under the second adapter's own system turn


def test_output_is_written_whole_and_replaced_only_when_asked(generate, tmp_path):
    prompts = write(tmp_path / "p.txt", "Define the word apple.\nDefine the word river.\n")
    code, printed, _ = generate("--prompts", prompts)
    output = tmp_path / "new" / "answers.jsonl"
    code, out, _ = generate("--prompts", prompts, "--output", output)
    assert code == 0 and output.read_text(encoding="utf-8") == printed and f"wrote 2 answers to {output}" in out
    write(output, "mine\n")
    code, _, err = generate("--prompts", prompts, "--output", output)
    assert code == 2 and "already exists; pass --overwrite" in err and output.read_text() == "mine\n"
    assert generate("--prompts", prompts, "--output", output, "--overwrite")[0] == 0
    assert output.read_text(encoding="utf-8") == printed
    assert sorted(p.name for p in output.parent.iterdir()) == ["answers.jsonl"]  # no temp file left beside it


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_model_loads(generate, tmp_path, monkeypatch):
    from lorakit.cli import generate as generate_cli

    prompts = write(tmp_path / "p.txt", "Define the word apple.\n")
    monkeypatch.setattr(generate_cli, "_load", lambda args: pytest.fail("the model was loaded"))
    code, _, err = generate("--prompts", prompts, "--output", "/proc/no-such-folder/answers.jsonl")
    assert code == 2 and err.count("error:") == 1 and "/proc/no-such-folder" in err and "Traceback" not in err


# prompts of very different lengths (2 to ~200 tokens), so that a batch pads most of its rows
UNEVEN = ["hi", "Define the word apple.", "Define the word river. " * 20, "What is a stone?",
          "define the word apple: a round fruit " * 6, "Define the word cloud.", "x", "a large natural stream " * 3]


def test_batched_greedy_answers_are_the_one_at_a_time_answers_in_the_files_order(generate, tmp_path):
    """In float32: in a 16-bit dtype a padded batch's products round otherwise than a row's alone
    (on a CPU with native bf16, "auto"'s choice there, 1 of these 8 answers changed in batches of 8)."""
    path = write(tmp_path / "p.txt", "\n".join(UNEVEN) + "\n")
    flags = ("--dtype", "float32", "--max-new-tokens", "24", "--prompts", path)
    alone = answers(generate("--batch-size", "1", *flags)[1])
    assert [a["line"] for a in alone] == list(range(1, len(UNEVEN) + 1))
    assert len({a["completion"] for a in alone}) > 4  # the prompts are answered apart, not all alike
    for size in ("3", "8", "100"):  # a short last batch; the default; all in one
        code, out, _ = generate("--batch-size", size, *flags)
        assert code == 0 and answers(out) == alone, size
    output = tmp_path / "answers.jsonl"  # sorted over the whole file, not a few batches at a time
    assert generate("--batch-size", "3", *flags, "--output", output)[0] == 0
    assert answers(output.read_text(encoding="utf-8")) == alone


@pytest.fixture(scope="module")
def tiny_chat(base_and_adapters):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = base_and_adapters[0]
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def test_each_row_stops_at_its_own_stop_token_and_padding_leaves_the_tokenizer_as_it_was(tiny_chat, monkeypatch):
    """A token the model writes often made a stop token, so that rows end at different steps;
    a tokenizer without a pad token pads with EOS, and still has none afterwards."""
    import torch

    from lorakit.generate import complete_batch, complete_ids, prompt_ids

    model, tokenizer = tiny_chat
    prompts = [prompt_ids(model, tokenizer, text, 30) for text in UNEVEN]
    with torch.no_grad():
        written = model.generate(torch.tensor([prompts[1]]), max_new_tokens=30, do_sample=False)[0, len(prompts[1]):]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, int(written[4])])
    monkeypatch.setattr(tokenizer, "pad_token", None)
    alone = [complete_ids(model, tokenizer, ids, 30) for ids in prompts]
    assert len({len(text) for text in alone}) > 3  # the rows stopped at different steps
    assert complete_batch(model, tokenizer, prompts, 30) == alone
    assert tokenizer.pad_token is None


@pytest.mark.parametrize("settings", [
    {}, {"top_k": 20, "top_p": 0.9}, {"top_k": 0, "min_p": 0.05}, {"top_k": 0, "typical_p": 0.5},
    # the tiny model's next-token probabilities are near 1/347: cutoffs that drop about half of them
    {"top_k": 0, "epsilon_cutoff": 2.8e-3}, {"top_k": 0, "eta_cutoff": 0.9}, {"top_k": 0, "top_h": 0.5}])
def test_a_rows_sampler_draws_what_transformers_sampling_draws_from_a_generator_seeded_alike(
        tiny_chat, monkeypatch, settings):
    """The generation config's sampling settings (none: transformers' top-k of 50) warp the scores
    as transformers' sampling does; each case fails where its warper is left out."""
    from lorakit.generate import complete_batch, stop_token_ids

    model, tokenizer = tiny_chat
    for name, value in settings.items():
        monkeypatch.setattr(model.generation_config, name, value)
    ids = tokenizer("Define the word apple.")["input_ids"]
    torch.manual_seed(7)  # transformers' sampling draws from the global generator
    with torch.no_grad():
        drawn = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=True, temperature=0.7,
                               eos_token_id=stop_token_ids(model, tokenizer))[0, len(ids):]
    expected = tokenizer.decode(drawn, skip_special_tokens=True).strip()
    assert complete_batch(model, tokenizer, [ids], 20, temperature=0.7, seeds=[7]) == [expected]
    assert complete_batch(model, tokenizer, [ids], 20, temperature=0.7, seeds=[8]) != [expected]


def test_batches_hold_prompts_of_like_lengths_longest_first_within_each_window():
    from lorakit.generate import length_sorted_batches

    lengths = [5, 50, 7, 40, 6, 60]
    assert length_sorted_batches(lengths, 2) == [[5, 1], [3, 2], [4, 0]]
    assert length_sorted_batches(lengths, 2, window=3) == [[1, 2], [0], [5, 3], [4]]
    assert length_sorted_batches([], 4) == []


def test_a_prompts_sampled_answer_is_the_same_in_any_batch_and_written_or_printed(generate, tmp_path):
    path = write(tmp_path / "p.txt", "\n".join(UNEVEN) + "\n")
    # float32, as the greedy test: a 16-bit batch's rounding could tip a near tie of the draws
    sampled = ("--temperature", "0.8", "--seed", "3", "--max-new-tokens", "24", "--dtype", "float32", "--prompts",
               path)
    alone = answers(generate("--batch-size", "1", *sampled)[1])
    assert [a["line"] for a in alone] == list(range(1, len(UNEVEN) + 1))
    greedy = answers(generate("--batch-size", "1", *sampled[4:])[1])  # the same flags without the sampling
    assert sum(a != g for a, g in zip(alone, greedy)) > 4  # sampled: most answers are not the greedy ones
    for size in ("3", "100"):  # the seeds go with the prompts, not with the batches' rows
        code, out, _ = generate("--batch-size", size, *sampled)
        assert code == 0 and answers(out) == alone, size
    output = tmp_path / "answers.jsonl"  # batched otherwise (sorted over the whole file)
    assert generate("--batch-size", "3", *sampled, "--output", output)[0] == 0
    assert answers(output.read_text(encoding="utf-8")) == alone
    reseeded = answers(generate("--batch-size", "1", *sampled[:3], "4", *sampled[4:])[1])
    assert sum(a != b for a, b in zip(alone, reseeded)) > 4


def test_every_adapter_of_use_all_samples_a_prompt_as_it_would_alone(generate, base_and_adapters, tmp_path):
    _, first, second = base_and_adapters
    path = write(tmp_path / "p.txt", "\n".join(UNEVEN[:4]) + "\n")
    sampled = ("--temperature", "0.8", "--seed", "5", "--max-new-tokens", "12", "--prompts", path)
    both = answers(generate(*sampled, "--use", "all", adapters=(first, second))[1])
    for name in ("first", "second"):
        alone = answers(generate(*sampled, "--use", name, adapters=(first, second))[1])
        assert [a["completion"] for a in both if a["adapter"] == name] == [a["completion"] for a in alone], name


def test_a_batch_size_that_is_not_a_whole_number_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--batch-size", "2.5", "--prompts", "p.txt"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("error:") == 1 and "--batch-size: invalid int value: '2.5'" in err


def test_columns_rename_a_jsonl_files_fields(generate, tmp_path):
    plain = write(tmp_path / "plain.jsonl", json.dumps({"prompt": PROMPT, "system": "Be brief."}) + "\n")
    mine = write(tmp_path / "mine.jsonl", json.dumps({"q": PROMPT, "sys": "Be brief.", "a": "a fruit"}) + "\n")
    expected = answers(generate("--prompts", plain)[1])
    code, out, _ = generate("--prompts", mine, "--columns", "prompt=q", "system=sys", "output=a")
    assert code == 0 and answers(out) == expected
    code, out, _ = generate("--prompts", mine, "--columns", "prompt=q", "system=sys", "output=answer")
    assert code == 0 and answers(out) == expected  # an answer's column, unread, may be missing (train's pairs)


@pytest.mark.parametrize("lines, columns, problem, fix", [
    ([{"q": "a"}], ["prompt=qq"], "--columns prompt=qq: no line of", "its lines' fields: 'q'"),
    ([{"q": "a", "prompt": "b"}], ["prompt=q"], "line 1 already has a field 'prompt'", "leave that pair out"),
    ([{"q": "a"}], ["prompt"], "--columns takes FIELD=COLUMN pairs", "instruction=question output=answer"),
    ([{"q": "a"}], ["prompt_text=q"], "'prompt_text' is not a field lorakit reads", "map to one of"),
    (None, ["prompt=q"], "holds one prompt per line, without fields for --columns", "leave --columns out"),
])
def test_bad_columns_for_a_prompts_file_are_one_error_line(lines, columns, problem, fix, generate, tmp_path):
    path = write(tmp_path / "p.txt", "hello\n") if lines is None else \
        write(tmp_path / "p.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    assert_one_error(generate("--prompts", path, "--columns", *columns), problem, fix)


def test_columns_without_a_prompts_file_are_refused(generate):
    assert_one_error(generate("--columns", "prompt=q", "--", PROMPT), "--columns renames the fields of a --prompts",
                     "leave --columns out")


def test_stdin_is_the_whole_prompt_less_its_closing_line_breaks():
    from lorakit.data.prompts import read_stdin_prompt

    piped = io.BytesIO(b"\xef\xbb\xbfFirst line.\n\nSecond line.\r\n\n")  # a BOM, as PowerShell may send
    assert read_stdin_prompt(piped) == "First line.\n\nSecond line."
    assert read_stdin_prompt(io.StringIO("  indented\n")) == "  indented"
    assert read_stdin_prompt(io.BytesIO(b"line one\r\nline two\rthree\r\n")) == "line one\nline two\nthree"


def test_a_byte_order_mark_before_a_blank_first_line_is_no_prompt(tmp_path):
    from lorakit.data.prompts import read_prompt_file

    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbf\r\nDefine apple.\r\n")
    assert [prompt.content for prompt in read_prompt_file(tmp_path / "p.txt")] == ["Define apple."]


BAD_FILES = {  # name: (contents, what the message names: the problem, the fix)
    "empty.txt": ("", "holds no prompt", "one prompt per line"),
    "blank.jsonl": ("\n  \n", "holds no prompt", '{"prompt": "..."}'),
    "bad.jsonl": ('{"prompt": "a"}\n{"prompt": "b",\n', "bad.jsonl line 2 is not valid JSON", "one JSON object"),
    "list.jsonl": ('["a"]\n', "line 1 is a JSON list, not an object", '{"prompt": "..."}'),
    "answer-only.jsonl": ('{"prompt": "a"}\n{"output": "b"}\n', "line 2 has no field to read a prompt from (its "
                          "fields: 'output')", "'messages', 'conversations' (a chat) or 'instruction', 'prompt'"),
    "number.jsonl": ('{"prompt": 7}\n', "line 1: field 'prompt' is an int, not a string", "give it the prompt's text"),
    "blank-prompt.jsonl": ('{"prompt": " "}\n', "line 1: field 'prompt' is empty", "give it the text to answer"),
    "no-user.jsonl": ('{"messages": [{"role": "system", "content": "s"}]}\n', "has no user turn", "end it with"),
    "role.jsonl": ('{"messages": [{"role": "robot", "content": "s"}]}\n', "turn 1 has unknown role 'robot'",
                   "expected one of"),
    "system.jsonl": ('{"prompt": "a", "system": ["s"]}\n', "field 'system' is a list", "or leave it out"),
    "latin1.txt": (None, "line 2 is not valid UTF-8", "re-save the file as UTF-8"),
    "prompts.csv": ("prompt\na\n", "unsupported extension '.csv'", "use .txt (one prompt per line) or .jsonl"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_prompts_file_is_one_error_line_and_exit_2(name, generate, tmp_path):
    text, problem, fix = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(b"ok\ncaf\xe9\n" if text is None else text.encode())
    output = tmp_path / "answers.jsonl"
    assert_one_error(generate("--prompts", path, "--output", output), problem, fix)
    assert not output.exists()


@pytest.mark.parametrize("args, problem, fix", [
    (["--prompts", "missing.txt"], "prompts file missing.txt does not exist", "check the path"),
    (["--prompts", "p.txt", "hi"], "both a prompt ('hi') and --prompts p.txt were given", "pass one"),
    ([], "no prompt given", "- to read it from stdin, or --prompts FILE"),
    (["--output", "a.jsonl", "hi"], "--output writes the JSON lines of --prompts", "redirect the answer"),
    (["--overwrite", "hi"], "--overwrite replaces an existing --output file", "leave it out"),
    (["--prompts", "p.txt", "--output", "a.txt"], "--output a.txt must be a file name ending in .jsonl", ".jsonl"),
    (["--prompts", "p.txt", "--output", "."], "must be a file name ending in .jsonl", ".jsonl"),
    (["--prompts", "p.jsonl", "--output", "p.jsonl", "--overwrite"], "--output p.jsonl is the --prompts file",
     "write the answers to another file"),
    (["--prompts", "p.txt", "--output", "p.txt/a.jsonl"], "p.txt is a file, where its folder would be",
     "choose another path"),
    (["--prompts", "p.txt", "--batch-size", "0"], "--batch-size must be at least 1", "got 0"),
    (["--prompts", "p.txt", "--batch-size", "-4"], "--batch-size must be at least 1", "got -4"),
])
def test_bad_prompt_options_are_one_error_line_and_exit_2(args, problem, fix, generate, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "p.txt", "hello\n")
    write(tmp_path / "p.jsonl", '{"prompt": "hello"}\n')
    before = sorted(os.listdir(tmp_path))
    stdin_of(monkeypatch, b"never read\n")
    assert_one_error(generate(*args), problem, fix)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("data, problem, fix", [
    (b"\n\n", "stdin held no prompt", "pipe the text in"),
    (b"caf\xe9\n", "stdin line 1 is not valid UTF-8", "send the prompt as UTF-8")])
def test_bad_stdin_is_one_error_line_and_exit_2(data, problem, fix, generate, monkeypatch):
    stdin_of(monkeypatch, data)
    assert_one_error(generate("-"), problem, fix)


def test_a_bad_prompt_after_good_ones_stops_the_batch_before_any_answer(generate, tmp_path):
    """Every prompt is rendered and checked before the first is answered: no half-written stdout."""
    path = write(tmp_path / "p.jsonl", '{"prompt": "hello"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    code, out, err = generate("--raw", "--prompts", path)
    assert_one_error((code, out, err), f"{path} line 2 is a chat (a list of turns), and --raw continues plain text",
                     "leave out --raw")
    assert out == ""


def assert_one_error(result, problem: str, fix: str) -> None:
    code, out, err = result
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert "Traceback" not in out + err and len(errors) == 1, err[-2000:]
    assert problem in errors[0] and fix in errors[0], errors[0]
