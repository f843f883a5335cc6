"""Formats, masking, stats and eval split, with tiny tokenizers built offline."""

import json

import datasets
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lorakit.data.examples import split_eval
from lorakit.data.formats import (
    IGNORE_INDEX, detect_format, generation_prompt_ids, pad_token_id, render_marked, tokenize_records,
)
from lorakit.data.reading import read_records
from lorakit.errors import ConfigError, DataError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]


def _bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world what is the answer", "the user says hello"] * 5, trainer)
    return tok


@pytest.fixture(scope="module")
def chatml():
    """ChatML template, eos = <|im_end|>, no BOS."""
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


@pytest.fixture(scope="module")
def plain():
    """No chat template; adds <s> in front like Llama tokenizers; eos = </s>."""
    tok = _bpe()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def ds(rows):
    return datasets.Dataset.from_list(rows)


def one(tokenized):
    assert len(tokenized.dataset) == 1
    return tokenized.dataset[0]


def trained_ids(example):
    return [t for t in example["labels"] if t != IGNORE_INDEX]


# ---------------------------------------------------------------- text


def test_text_trains_every_token_and_appends_eos(plain):
    ex = one(tokenize_records(ds([{"text": "hello world"}]), plain, fmt="text"))
    ids = ex["input_ids"]
    assert ids[0] == plain.bos_token_id and ids[-1] == plain.eos_token_id
    assert ids[1:-1] == plain("hello world", add_special_tokens=False)["input_ids"]
    assert ex["labels"] == [IGNORE_INDEX] + ids[1:]
    assert ex["length"] == len(ids) and ex["num_labels"] == len(ids) - 1
    assert render_marked(ex, plain) == "<s>[[hello world</s>]]"


@pytest.mark.parametrize("tokenizer", ["plain", "chatml"])  # with a BOS (Llama-like) and without
def test_a_blank_text_is_dropped_not_trained_to_stop_at_once(tokenizer, request):
    """"" gave [BOS, EOS] with the EOS trained, " " and "\\n" their token then EOS: each taught the
    model to end a text at once (a hunt found it)."""
    tok = request.getfixturevalue(tokenizer)
    tokenized = tokenize_records(ds([{"text": t} for t in ("", " ", "\n", "\t \n", "hello world")]), tok, fmt="text")
    assert tokenized.stats.dropped == 4 and len(tokenized.dataset) == 1
    assert trained_ids(tokenized.dataset[0])[-1] == tok.eos_token_id


def test_an_example_that_loses_only_untrained_tokens_is_not_counted_as_cut(chatml):
    """One token past seq_len in ChatML is the newline after the last <|im_end|>: every trained
    token is there, and 'raise --seq-len to train on their ends' was a false warning (a hunt)."""
    data = ds([{"messages": [{"role": "user", "content": "what is the answer"},
                             {"role": "assistant", "content": "hello world"}]}])
    whole = one(tokenize_records(data, chatml, fmt="chat", seq_len=512))
    assert whole["labels"][-1] == IGNORE_INDEX  # the template's trailing newline: not trained
    tokenized = tokenize_records(data, chatml, fmt="chat", seq_len=whole["length"] - 1)
    assert one(tokenized)["num_labels"] == whole["num_labels"] and tokenized.stats.truncated == 0
    assert not any("were cut" in warning for warning in tokenized.stats.warnings)
    assert tokenize_records(data, chatml, fmt="chat", seq_len=whole["length"] - 2).stats.truncated == 1


# ---------------------------------------------------------------- instruction


@pytest.mark.parametrize("prompt_field,answer_field", [
    ("instruction", "output"), ("prompt", "response"), ("question", "answer"), ("prompt", "completion"),
    ("instruction", "response"), ("query", "response"), ("input", "output")])
def test_instruction_aliases_use_the_chat_template(chatml, prompt_field, answer_field):
    data = ds([{prompt_field: "what is it", answer_field: "the answer"}])
    tokenized = tokenize_records(data, chatml)
    assert tokenized.format == "instruction" and answer_field in tokenized.stats.format_note
    ex = one(tokenized)
    assert render_marked(ex, chatml) == (
        "<|im_start|>user\nwhat is it<|im_end|>\n<|im_start|>assistant\n[[the answer<|im_end|>]]\n")
    assert chatml.eos_token_id in trained_ids(ex)


def test_instruction_input_and_system(chatml):
    data = ds([{"instruction": "say", "input": "hello", "output": "world", "system": "be brief"}])
    text = render_marked(one(tokenize_records(data, chatml)), chatml)
    assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsay\n\nhello<|im_end|>\n"
                    "<|im_start|>assistant\n[[world<|im_end|>]]\n")


def test_dollys_context_is_the_instruction_s_input_and_unread_columns_are_named(chatml):
    """Dolly's instruction/context/response was refused; with `output` its context was dropped
    without a word, as every column a format does not read was (LLaMA-Factory's `history`)."""
    data = ds([{"instruction": "say", "context": "hello", "response": "world", "category": "qa"}])
    tokenized = tokenize_records(data, chatml)
    assert render_marked(one(tokenized), chatml) == (
        "<|im_start|>user\nsay\n\nhello<|im_end|>\n<|im_start|>assistant\n[[world<|im_end|>]]\n")
    assert tokenized.stats.format_note == ("auto-detected instruction from columns 'instruction', 'response', "
                                           "'context'; columns not read: 'category'")
    unread = tokenize_records(ds([{"instruction": "a", "output": "b", "history": [["q", "r"]]}]), chatml)
    assert unread.stats.format_note.endswith("; columns not read: 'history'")
    both = tokenize_records(ds([{"instruction": "say", "input": "x", "context": "y", "output": "z"}]), chatml)
    assert "user\nsay\n\nx\n\ny<|im_end|>" in render_marked(one(both), chatml)  # neither dropped
    from lorakit.data.formats import _detect

    assert _detect(["input", "output", "text"])[0] == "text"  # a text column still wins over input/output
    assert _detect(["instruction", "prompt", "response"])[1].endswith("columns 'prompt', 'response'")  # as before


def test_instruction_fallback_template_without_chat_template(plain):
    data = ds([{"instruction": "say", "input": "", "output": "world", "system": "be brief"}])
    ex = one(tokenize_records(data, plain))
    assert render_marked(ex, plain) == (
        "<s>### System:\nbe brief\n\n### User:\nsay\n\n### Assistant:\n[[world</s>]]")
    assert trained_ids(ex)[-1] == plain.eos_token_id
    assert ex["input_ids"].count(plain.bos_token_id) == 1  # the template's BOS, not a second one


def test_generation_prompt_matches_the_trained_prefix(chatml, plain):
    data = ds([{"instruction": "what is it", "output": "the answer"}])
    for tok in (chatml, plain):
        ex = one(tokenize_records(data, tok))
        first_trained = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX)
        assert generation_prompt_ids(tok, "what is it") == ex["input_ids"][:first_trained]
    text = one(tokenize_records(ds([{"text": "hello"}]), plain))
    assert generation_prompt_ids(plain, "hello", fmt="text") == text["input_ids"][:-1]
    tok = _bpe()  # a tokenizer that ends every text with EOS itself (generate continued after it)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    ending = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    text = one(tokenize_records(ds([{"text": "hello"}]), ending))
    assert text["input_ids"][-1] == ending.eos_token_id and text["input_ids"].count(ending.eos_token_id) == 1
    assert generation_prompt_ids(ending, "hello", fmt="text") == text["input_ids"][:-1]


def test_train_on_inputs_trains_everything_but_the_first_token(chatml):
    data = ds([{"instruction": "what is it", "output": "the answer"}])
    ex = one(tokenize_records(data, chatml, train_on_inputs=True))
    assert ex["labels"] == [IGNORE_INDEX] + ex["input_ids"][1:]


# ---------------------------------------------------------------- chat


def test_messages_multi_turn_trains_only_assistant_turns(chatml):
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}]
    ex = one(tokenize_records(ds([{"messages": messages}]), chatml))
    assert render_marked(ex, chatml) == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        "[[hello<|im_end|>]]\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n[[a<|im_end|>]]\n")
    assert trained_ids(ex).count(chatml.eos_token_id) == 2  # each turn's <|im_end|> is learned


def test_trl_conversational_prompt_completion_trains_the_completion_only(chatml):
    row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "q"}],
           "completion": [{"role": "assistant", "content": "a"}]}
    tokenized = tokenize_records(ds([row]), chatml)
    assert render_marked(one(tokenized), chatml) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\n[[a<|im_end|>]]\n")
    for bad in ({**row, "completion": [{"role": "user", "content": "a"}]}, {**row, "prompt": []},
                {**row, "prompt": row["completion"]}):
        with pytest.raises(DataError, match="record 1"):
            tokenize_records(ds([bad]), chatml)


def test_sharegpt_conversations_and_system_column(chatml, plain):
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    data = ds([{"conversations": conv, "system": "sys"}])
    assert detect_format(data) == "chat"
    assert render_marked(one(tokenize_records(data, chatml)), chatml) == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        "[[hello<|im_end|>]]\n")
    assert render_marked(one(tokenize_records(data, plain)), plain) == (
        "<s>### System:\nsys\n\n### User:\nhi\n\n### Assistant:\n[[hello</s>]]")


def _chat(system, question="hi", answer="hello"):
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": ([{"role": "system", "content": system}] if system is not None else []) + turns}


def test_the_system_turn_every_record_opens_with_is_kept(chatml, tmp_path):
    assert tokenize_records(ds([_chat("Be brief."), _chat("Be brief.", "what")]), chatml).system_turn == "Be brief."
    assert tokenize_records(ds([_chat("Be brief."), _chat("Be long.")]), chatml).system_turn is None
    assert tokenize_records(ds([_chat("Be brief."), _chat(None)]), chatml).system_turn is None
    assert tokenize_records(ds([_chat(None), _chat(None)]), chatml).system_turn is None
    assert tokenize_records(ds([_chat(" "), _chat(" ")]), chatml).system_turn is None  # empty: the template's own
    pairs = [{"instruction": "hi", "output": "hello", "system": "Answer as a pirate."}] * 2
    assert tokenize_records(ds(pairs), chatml).system_turn == "Answer as a pirate."  # the system column
    assert tokenize_records(ds([{"text": "hello world"}] * 2), chatml).system_turn is None
    for name, system in (("a.jsonl", "Be brief."), ("b.jsonl", "Be brief.")):  # across files
        (tmp_path / name).write_text(json.dumps(_chat(system)) + "\n")
    assert tokenize_records(read_records([tmp_path / "a.jsonl", tmp_path / "b.jsonl"]), chatml).system_turn == "Be brief."
    (tmp_path / "b.jsonl").write_text(json.dumps(_chat("Be long.")) + "\n")
    assert tokenize_records(read_records([tmp_path / "a.jsonl", tmp_path / "b.jsonl"]), chatml).system_turn is None


def test_a_dropped_record_neither_gives_nor_breaks_the_shared_system_turn(chatml):
    untrainable = _chat("Something else.", question="what is the answer " * 40)  # cut before its answer: dropped
    tokenized = tokenize_records(ds([untrainable, _chat("Be brief."), _chat("Be brief.")]), chatml, seq_len=64)
    assert tokenized.stats.dropped == 1 and tokenized.system_turn == "Be brief."
    train, held_out = split_eval(tokenized, 1, seed=0)
    assert train.system_turn == held_out.system_turn == "Be brief."


class _SlowView:
    """The chatml tokenizer seen as a slow one (no offsets), to test the other masking path."""

    is_fast = False

    def __init__(self, fast):
        self._fast = fast

    def __getattr__(self, name):
        return getattr(self._fast, name)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self._fast(text, add_special_tokens=add_special_tokens)["input_ids"]}


def test_slow_tokenizer_path_gives_the_same_mask(chatml):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"},
                {"role": "user", "content": "q"}, {"role": "assistant", "content": "the answer"}]
    data = ds([{"messages": messages}])
    fast = one(tokenize_records(data, chatml))
    slow = one(tokenize_records(data, _SlowView(chatml)))
    assert slow["labels"] == fast["labels"] and slow["input_ids"] == fast["input_ids"]


def test_answer_token_that_starts_on_the_prompts_last_space_is_trained(chatml):
    # the prefix "Answer: " ends in a space that the answer's first token " the" starts on
    spaced = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}"
              "Answer: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}Answer: {% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=chatml.backend_tokenizer, eos_token="<|im_end|>",
                                  chat_template=spaced)
    data = ds([{"instruction": "hello", "output": "the answer"}])
    for tokenizer in (tok, _SlowView(tok)):
        example = one(tokenize_records(data, tokenizer))
        assert tok.decode(trained_ids(example)) == " the answer<|im_end|>"


class _SlowViewWithoutRoundTrip(_SlowView):
    """A slow tokenizer whose decode does not give the text back (as SentencePiece's may not)."""

    def decode(self, ids, **kwargs):
        return self._fast.decode(ids, **kwargs).upper()


def test_slow_tokenizer_mask_does_not_train_a_prompt_token_the_prefix_tokenizes_differently():
    # byte-level BPE: "\n\n" alone is one token, before a word it is "\n" + "\n"; counting the prompt's
    # tokens alone trained both newlines of the prompt
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Q: hello world\n\nthe answer is here\n\n", "what\n\nthe user says hello"] * 5, trainer)
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n\n{% else %}"
                "{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", chat_template=template)
    assert fast.tokenize("Q: hello\n\n")[-1] == "ĊĊ" and fast.tokenize("Q: hello\n\nthe")[-3:] == ["Ċ", "Ċ", "the"]
    data = ds([{"instruction": "hello", "output": "the answer"}])
    for tokenizer in (fast, _SlowView(fast)):
        assert fast.decode(trained_ids(one(tokenize_records(data, tokenizer)))) == "the answer<|im_end|>"
    # where decoding does not give the text back, the prefix's own tokens still place the span
    example = one(tokenize_records(data, _SlowViewWithoutRoundTrip(fast)))
    assert fast.decode(trained_ids(example)).endswith("the answer<|im_end|>")


def test_template_that_renders_prefixes_differently_is_an_error(chatml):
    weird = CHATML.replace("{{ m['content'] }}", "{{ m['content'] }}{% if loop.last %}!{% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=chatml.backend_tokenizer, eos_token="<|im_end|>",
                                  chat_template=weird)
    data = ds([{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="renders a conversation prefix differently"):
        tokenize_records(data, tok)
    assert one(tokenize_records(data, tok, train_on_inputs=True))["num_labels"] > 0


def test_template_exception_is_a_data_error(chatml):
    strict = "{{ raise_exception('roles must alternate') }}"
    tok = PreTrainedTokenizerFast(tokenizer_object=chatml.backend_tokenizer, chat_template=strict)
    with pytest.raises(DataError, match="record 1.*roles must alternate"):
        tokenize_records(ds([{"instruction": "a", "output": "b"}]), tok)


def test_no_eos_in_trained_tokens_is_warned(chatml):
    no_end = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
             "{% if add_generation_prompt %}assistant: {% endif %}"
    tok = PreTrainedTokenizerFast(tokenizer_object=chatml.backend_tokenizer, chat_template=no_end)
    stats = tokenize_records(ds([{"instruction": "a", "output": "b"}]), tok).stats
    assert any("EOS" in w for w in stats.warnings)
    good = tokenize_records(ds([{"instruction": "a", "output": "b"}]), chatml).stats
    assert not any("EOS" in w for w in good.warnings)


# ---------------------------------------------------------------- detection and record errors


@pytest.mark.parametrize("row,expected", [
    ({"messages": [], "text": "x"}, "chat"),
    ({"conversations": []}, "chat"),
    ({"question": "q", "answer": "a"}, "instruction"),
    ({"prompt": "q", "completion": "a", "text": "x"}, "instruction"),
    ({"text": "x", "id": 3}, "text"),
])
def test_detect_format(row, expected):
    assert detect_format(ds([row])) == expected


def test_the_detection_note_names_every_column_it_reads():
    from lorakit.data.formats import _detect

    assert _detect(["instruction", "input", "output"])[1].endswith("columns 'instruction', 'output', 'input'")
    assert _detect(["instruction", "output"])[1].endswith("columns 'instruction', 'output'")


def test_undetectable_columns_are_named():
    with pytest.raises(DataError, match=r"\['foo', 'bar'\]"):
        detect_format(ds([{"foo": "x", "bar": "y"}]))


def test_files_of_different_formats_are_named_together(chatml, tmp_path):
    instruction, chat, more = tmp_path / "i.jsonl", tmp_path / "c.jsonl", tmp_path / "i2.jsonl"
    instruction.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    more.write_text(json.dumps({"instruction": "c", "input": "d", "output": "e"}) + "\n")
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(DataError, match=r"different formats \(.*i.jsonl: instruction \(instruction, output\), "
                                        r".*c.jsonl: chat \(messages\)\)"):
        tokenize_records(read_records([instruction, chat]), chatml)
    assert len(tokenize_records(read_records([instruction, more]), chatml).dataset) == 2  # extra fields are fine


def test_instruction_files_that_name_their_fields_differently_are_each_read_through_their_own(chatml, tmp_path):
    dolly, alpaca = tmp_path / "dolly.jsonl", tmp_path / "alpaca.jsonl"
    dolly.write_text(json.dumps({"instruction": "Name a colour.", "context": "Sky.", "response": "Blue."}) + "\n")
    alpaca.write_text(json.dumps({"instruction": "Name a fruit.", "input": "", "output": "Pear."}) + "\n")
    both = tokenize_records(read_records([dolly, alpaca]), chatml)
    alone = [tokenize_records(read_records(path), chatml) for path in (dolly, alpaca)]
    assert both.dataset["input_ids"] == [ids for one in alone for ids in one.dataset["input_ids"]]
    assert both.dataset["labels"] == [labels for one in alone for labels in one.dataset["labels"]]
    assert both.stats.format_note == "; ".join(f"{name}: {one.stats.format_note}"
                                               for name, one in zip(("dolly.jsonl", "alpaca.jsonl"), alone))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Name a tree.", "answer": "Oak."}) + "\n")
    chosen = tokenize_records(read_records([qa, alpaca]), chatml, fmt="instruction")  # a chosen format, too
    assert len(chosen.dataset) == 2 and all(sum(x != -100 for x in labels) for labels in chosen.dataset["labels"])


def test_files_with_nothing_to_train_name_every_files_fields(chatml, tmp_path):
    """Nothing trained in any file (chats without a reply): the message names each file's field."""
    messages, conversations = tmp_path / "m.jsonl", tmp_path / "c.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    conversations.write_text(json.dumps({"conversations": [{"role": "user", "content": "hello"}]}) + "\n")
    with pytest.raises(DataError, match=r"none of the 2 examples has a trained token .*no assistant turn\); check "
                                        r"the messages, conversations fields"):
        tokenize_records(read_records([messages, conversations]), chatml)


def test_chosen_format_needs_its_columns(chatml):
    with pytest.raises(DataError, match="format chat needs .*'messages'.*'text'"):
        tokenize_records(ds([{"text": "x"}]), chatml, fmt="chat")


def test_bad_arguments(chatml):
    with pytest.raises(ConfigError, match="unknown data format"):
        tokenize_records(ds([{"text": "x"}]), chatml, fmt="alpaca")
    with pytest.raises(ConfigError, match="seq_len"):
        tokenize_records(ds([{"text": "x"}]), chatml, seq_len=1)


def _jsonl(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return read_records(path, cache_dir=tmp_path / "cache"), path


def test_missing_field_names_record_line_and_expected_fields(tmp_path, chatml):
    records, path = _jsonl(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError) as err:
        tokenize_records(records, chatml)
    message = str(err.value)
    assert f"record 2 ({path} line 2)" in message
    assert "'output' is missing" in message and "instruction, output" in message


def test_an_integer_label_is_its_digits_and_other_types_are_named(tmp_path, chatml):
    labels = tokenize_records(ds([{"instruction": "which class?", "output": 1}]), chatml)  # was "is a int"
    assert render_marked(one(labels), chatml).endswith("<|im_start|>assistant\n[[1<|im_end|>]]\n")
    with pytest.raises(DataError, match="field 'output' is a float, not a string"):
        tokenize_records(ds([{"instruction": "a", "output": 0.5}]), chatml)
    with pytest.raises(DataError, match="field 'output' is missing or null"):
        tokenize_records(ds([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]), chatml)


def test_a_record_of_another_format_says_the_set_mixes_formats(tmp_path, chatml):
    records, path = _jsonl(tmp_path, [{"text": "plain prose"}, {"instruction": "a", "output": "b"}])
    with pytest.raises(DataError) as err:
        tokenize_records(records, chatml)  # auto picks instruction from the columns of both
    message = str(err.value)
    assert f"record 1 ({path} line 1): field 'instruction' is missing" in message
    assert "this record has 'text': records of different formats in one set" in message
    chats, _ = _jsonl(tmp_path, [{"instruction": "a", "output": "b"}, {"messages": [{"role": "user", "content": "c"}]}])
    with pytest.raises(DataError, match="this record has 'instruction', 'output': records of different formats"):
        tokenize_records(chats, chatml)  # auto picks chat from the messages column


def test_wrong_field_type_is_named(chatml):
    with pytest.raises(DataError, match="record 1: field 'text' is an int, not a string"):
        tokenize_records(ds([{"text": 5}]), chatml, fmt="text")


def test_unknown_role_names_role_and_line(tmp_path, chatml):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}]
    records, path = _jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=rf"{path} line 2\): turn 2 has unknown role 'robot'"):
        tokenize_records(records, chatml)


def test_a_list_as_role_and_an_assistant_first_conversation_are_named(chatml):
    listed = ds([{"messages": [{"role": ["user"], "content": "a"}, {"role": ["assistant"], "content": "b"}]}])
    with pytest.raises(DataError, match=r"turn 1 has unknown role \['user'\]"):
        tokenize_records(listed, chatml)
    first = ds([{"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}])
    with pytest.raises(DataError, match="starts with the assistant's turn"):
        tokenize_records(first, chatml)


def test_openai_text_parts_are_joined_and_other_parts_refused(chatml, tmp_path):
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
    as_parts = [{"role": "user", "content": parts}, {"role": "assistant", "content": "a"}]  # mixed, as files hold them
    as_text = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "a"}]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    tokenized = tokenize_records(_jsonl(tmp_path / "a", [{"messages": as_parts}])[0], chatml)
    assert one(tokenized) == one(tokenize_records(ds([{"messages": as_text}]), chatml))
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, as_text[1]]
    with pytest.raises(DataError, match=r"turn 1 \(user\) has content parts other than text"):
        tokenize_records(_jsonl(tmp_path / "b", [{"messages": image}])[0], chatml)


@pytest.mark.parametrize("turn, what", [
    ({"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
     "turn 2 is an assistant's 'tool_calls'"),
    ({"role": "tool", "content": "12 degrees"}, "turn 2 is a tool turn \\(role 'tool'\\)"),
    ({"from": "observation", "value": "12 degrees"}, "turn 2 is a tool turn \\(role 'observation'\\)")])
def test_tool_use_is_refused_by_name(chatml, turn, what):
    messages = [{"role": "user", "content": "weather?"}, turn, {"role": "assistant", "content": "12 degrees"}]
    with pytest.raises(DataError, match=what + ": lorakit trains on text conversations"):
        tokenize_records(ds([{"messages": messages}]), chatml)


def test_unknown_sharegpt_role(chatml):
    conv = [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]
    with pytest.raises(DataError, match="unknown role 'bot'"):
        tokenize_records(ds([{"conversations": conv}]), chatml)


def test_turn_without_content(chatml):
    messages = [{"role": "user", "content": None}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match="turn 1 \\(user\\) has no text in 'content'"):
        tokenize_records(ds([{"messages": messages}]), chatml)


# ---------------------------------------------------------------- truncation, dropping, stats


def test_truncation_and_dropping_are_counted(chatml):
    long_prompt = " ".join(["hello"] * 40)
    rows = [{"instruction": "hi", "output": "world"},
            {"instruction": "hi", "output": " ".join(["world"] * 40)},  # cut inside its response
            {"instruction": long_prompt, "output": "world"}]  # cut before its response: dropped
    tokenized = tokenize_records(ds(rows), chatml, seq_len=24)
    stats = tokenized.stats
    assert (stats.records, stats.examples, stats.dropped, stats.truncated) == (3, 2, 1, 2)
    assert stats.length_max == 24 and max(tokenized.lengths()) == 24
    lengths = [len(ex["input_ids"]) for ex in tokenized.dataset]
    assert stats.total_tokens == sum(lengths) and stats.length_min == min(lengths)
    labels = sum(len(trained_ids(ex)) for ex in tokenized.dataset)
    assert stats.label_tokens == labels
    assert stats.masked_fraction == pytest.approx(1 - labels / sum(lengths))
    assert any("cut at --seq-len 24" in w for w in stats.warnings)
    assert "1 record with no trained token skipped (1 cut at --seq-len 24 before the response)" in stats.warnings


def test_the_training_part_of_a_split_keeps_what_reading_found(chatml):
    long_prompt = " ".join(["hello"] * 40)
    rows = ([{"instruction": "hi", "output": "world"}] * 8 + [{"instruction": "hi", "output": "w " * 40}] * 4
            + [{"instruction": long_prompt, "output": "world"}] * 3 + [{"instruction": "hi", "output": ""}])
    train, evaluation = split_eval(tokenize_records(ds(rows), chatml, seq_len=24), 4, seed=0)
    cut_in_eval = evaluation.stats.truncated
    assert train.stats.dropped == 3 and train.stats.truncated == 3 + 4 - cut_in_eval
    assert "3 records with no trained token skipped (3 cut at --seq-len 24 before the response)" in train.stats.warnings
    assert evaluation.stats.dropped == 0  # the eval part's own figures


def test_a_record_with_nothing_to_train_is_not_said_to_be_cut(chatml):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
            {"messages": [{"role": "user", "content": "only a question"}]}]
    stats = tokenize_records(ds(rows), chatml, seq_len=64).stats
    assert stats.warnings == ["1 record with no trained token skipped (1 with nothing to train)"]
    with pytest.raises(DataError, match="the others have nothing to train: no assistant turn"):
        tokenize_records(ds(rows[1:] * 2), chatml, seq_len=64)


def test_all_examples_too_long_is_an_error(chatml):
    rows = [{"instruction": " ".join(["hello"] * 40), "output": "x"}] * 12
    with pytest.raises(DataError, match="all 12 examples are longer than --seq-len 16.*raise --seq-len"):
        tokenize_records(ds(rows), chatml, seq_len=16)


def test_mostly_masked_is_warned(chatml):
    rows = [{"instruction": " ".join(["hello world"] * 20), "output": "a"}]
    stats = tokenize_records(ds(rows), chatml).stats
    assert stats.masked_fraction > 0.9
    assert any("masked" in w and "train with --train-on-inputs" in w for w in stats.warnings)  # the flag's name


def test_pad_token_id(chatml, plain):
    assert pad_token_id(chatml) == chatml.pad_token_id
    assert pad_token_id(plain) == plain.eos_token_id


# ---------------------------------------------------------------- eval split


def test_split_eval_is_deterministic_and_disjoint(chatml):
    rows = [{"text": "hello " * (i + 1)} for i in range(20)]
    tokenized = tokenize_records(ds(rows), chatml)
    train, evals = split_eval(tokenized, 0.25, seed=3)
    assert (len(train), len(evals)) == (15, 5)
    again_train, again_eval = split_eval(tokenized, 0.25, seed=3)
    assert evals.dataset["length"][:] == again_eval.dataset["length"][:]
    both = train.dataset["length"][:] + evals.dataset["length"][:]
    assert sorted(both) == sorted(tokenized.dataset["length"][:])
    other = split_eval(tokenized, 0.25, seed=4)[1]
    assert other.dataset["length"][:] != evals.dataset["length"][:]
    assert evals.stats.examples == 5 and evals.stats.total_tokens == sum(evals.dataset["length"][:])
    assert len(split_eval(tokenized, 3, seed=0)[1]) == 3


@pytest.mark.parametrize("value,error", [(20, DataError), (0, ConfigError), (1.5, ConfigError),
                                         (-0.1, ConfigError), (True, ConfigError)])
def test_split_eval_rejects_bad_sizes(chatml, value, error):
    tokenized = tokenize_records(ds([{"text": "hello"}] * 20), chatml)
    with pytest.raises(error):
        split_eval(tokenized, value, seed=0)


def test_txt_file_end_to_end(tmp_path, plain):
    path = tmp_path / "book.txt"
    path.write_text("hello world\nwhat is it\n\nthe answer\n", encoding="utf-8")
    tokenized = tokenize_records(read_records(path, cache_dir=tmp_path / "cache"), plain)
    assert tokenized.format == "text" and tokenized.stats.records == 2
    assert [render_marked(ex, plain) for ex in tokenized.dataset] == [
        "<s>[[hello world\nwhat is it</s>]]", "<s>[[the answer</s>]]"]


def test_files_whose_unread_fields_differ_in_type_train_together(chatml, tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    files = {"a.jsonl": [{"messages": turns, "id": 1}],
             "b.jsonl": [{"messages": [{**turns[0], "name": "ann"}, turns[1]], "id": "b-1"}],  # a key per turn
             "c.jsonl": [{"messages": turns}, {"messages": 3}]}
    for name, rows in files.items():
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = read_records([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], cache_dir=tmp_path / "cache")
    tokenized = tokenize_records(records, chatml, seq_len=64)
    assert len(tokenized) == 2 and tokenized.dataset[0]["labels"] == tokenized.dataset[1]["labels"]
    with pytest.raises(DataError, match=r"record 4 \(.*c.jsonl line 2\)"):  # numbered across the files
        tokenize_records(read_records([tmp_path / name for name in files], cache_dir=tmp_path / "cache"),
                         chatml, seq_len=64)


def test_a_text_longer_than_seq_len_becomes_pieces_that_predict_each_token_once(plain):
    words = " ".join(f"word{i % 7} hello" for i in range(40))
    whole = one(tokenize_records(ds([{"text": words}]), plain, fmt="text", seq_len=4096))["input_ids"]
    tokenized = tokenize_records(ds([{"text": "hello"}, {"text": words}]), plain, fmt="text", seq_len=16)
    pieces = [ex for ex in tokenized.dataset if ex["record"] == 1]
    assert len(pieces) > 2 and all(1 < len(ex["input_ids"]) <= 16 for ex in pieces)
    # each piece starts on the previous one's last token, whose prediction the previous piece trained
    assert [t for ex in pieces for t in ex["input_ids"][1:]] == whole[1:]
    predicted = [t for ex in pieces for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    assert predicted == whole[1:]
    stats = tokenized.stats
    assert (stats.records, stats.examples, stats.split, stats.truncated) == (2, len(pieces) + 1, 1, 0)
    assert f"1 text longer than --seq-len 16 became several examples each ({len(pieces) + 1} examples from 2 " \
           "records)" in stats.warnings


def test_the_eval_split_keeps_a_texts_pieces_together(plain):
    rows = [{"text": " ".join(["hello world"] * (3 + 9 * (i % 2)))} for i in range(20)]
    tokenized = tokenize_records(ds(rows), plain, fmt="text", seq_len=12)
    assert tokenized.stats.split == 10 and len(tokenized) > 20
    train, evaluation = split_eval(tokenized, 0.25, seed=1)
    train_records, eval_records = ({ex["record"] for ex in part.dataset} for part in (train, evaluation))
    assert len(eval_records) == 5 and not train_records & eval_records
    assert len(train) + len(evaluation) == len(tokenized)
    split_in_train = sum(1 for r in train_records if sum(ex["record"] == r for ex in train.dataset) > 1)
    assert train.stats.records == 15 and train.stats.split == split_in_train < 10  # the training part's own
