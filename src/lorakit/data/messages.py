"""Records to chat messages: the fields each data format reads, checked, as the list of
{role, content} turns that `formats` renders with the chat template and masks.

- instruction: a field pair (``instruction``/``output`` with an optional ``input`` or Dolly's
  ``context``, or an alias pair) as one user turn and one assistant turn; TRL's conversational prompt/completion (both
  lists of turns) as the prompt's turns, whose assistant turns are history (marked UNTRAINED),
  then the completion's.
- chat: ``messages`` ({role, content}; content a string or OpenAI's text parts) or ShareGPT
  ``conversations`` ({from, value}).
An optional ``system`` column becomes a system turn first. Errors name the record and the field.
"""

from __future__ import annotations

from typing import Any, Protocol

from lorakit.errors import DataError

UNTRAINED = "lorakit_untrained"  # on an assistant turn that is context, not a reply to learn
CONTEXT_FIELDS = ("input", "context")  # an instruction's optional text (Alpaca's, Dolly's), after it
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                "gpt": "assistant"}
# the tool-use turns of OpenAI's format (role tool, an assistant's tool_calls or function_call) and
# of ShareGPT's variants (LLaMA-Factory's function_call / observation)
TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation")
TOOL_CALL_KEYS = ("tool_calls", "function_call")


class Reader(Protocol):
    """What the functions here need from the tokenising pass: its format, the columns it reads,
    and where a record came from (for the error messages)."""

    fmt: str
    fields: tuple[str, ...]

    def where(self, index: int) -> str: ...


def field_text(row: dict, name: str, index: int, enc: Reader, label: bool = False) -> str:
    """The field's string; `label`: an answer, where an integer (a class label) reads as its digits."""
    value = row.get(name)
    if label and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        kind = type(value).__name__
        article = "an" if kind[0] in "aeiou" else "a"
        got = "is missing or null" if value is None else f"is {article} {kind}, not a string"
        raise DataError(
            f"{enc.where(index)}: field '{name}' {got}; format {enc.fmt} expects the fields "
            f"{', '.join(enc.fields)}{_fields_of_another_format(row, enc)}"
        )
    return value


def _fields_of_another_format(row: dict, enc: Reader) -> str:
    """A record without any of the format's fields: say which it has. The format is chosen from
    the columns of all the records, so a file mixing formats blames the first record of another."""
    present = [key for key, value in row.items() if value is not None]
    if not present or any(field in present for field in enc.fields):
        return ""
    return (f" (this record has {', '.join(map(repr, present))}: records of different formats in one set; "
            "give every record the same fields)")


def instruction_messages(row: dict, index: int, enc: Reader) -> list[dict]:
    prompt_field, answer_field = enc.fields
    if isinstance(row.get(prompt_field), list) and isinstance(row.get(answer_field), list):
        return _conversational_pair(row, index, enc)
    prompt = with_context(row, prompt_field, field_text(row, prompt_field, index, enc))
    messages = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": field_text(row, answer_field, index, enc, label=True)}]
    return _with_system(row, messages)


def with_context(row: dict, prompt_field: str, prompt: str) -> str:
    """An instruction followed by each context field the record gives (Alpaca's input, Dolly's context)."""
    if prompt_field != "instruction":
        return prompt
    given = [row[c] for c in CONTEXT_FIELDS if isinstance(row.get(c), str) and row[c].strip()]
    return "\n\n".join([prompt, *given])


def _conversational_pair(row: dict, index: int, enc: Reader) -> list[dict]:
    """TRL's conversational prompt/completion: the prompt's turns (an earlier assistant turn is
    history, not trained) followed by the completion's assistant turns."""
    prompt_field, answer_field = enc.fields
    prompt = [_one_turn(turn, n, index, enc) for n, turn in enumerate(row[prompt_field], 1)]
    answer = [_one_turn(turn, n, index, enc) for n, turn in enumerate(row[answer_field], len(prompt) + 1)]
    if not prompt or not answer or any(m["role"] != "assistant" for m in answer):
        raise DataError(f"{enc.where(index)}: as lists of turns, '{prompt_field}' needs at least one turn and "
                        f"'{answer_field}' the assistant's reply (turns with role assistant only)")
    if prompt[0]["role"] == "assistant":
        raise DataError(f"{enc.where(index)}: the conversation starts with the assistant's turn; start it with a "
                        "system or user turn (the answer needs something to answer)")
    history = [{**m, UNTRAINED: True} if m["role"] == "assistant" else m for m in prompt]
    return _with_system(row, history + answer)


def _with_system(row: dict, messages: list[dict]) -> list[dict]:
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def chat_messages(row: dict, index: int, enc: Reader) -> list[dict]:
    column = enc.fields[0]
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{enc.where(index)}: '{column}' must be a non-empty list of turns"
                        f"{_fields_of_another_format(row, enc)}")
    messages = [_one_turn(turn, number, index, enc) for number, turn in enumerate(turns, 1)]
    if messages[0]["role"] == "assistant":
        raise DataError(f"{enc.where(index)}: the conversation starts with the assistant's turn; start it with a "
                        "system or user turn (the answer needs something to answer)")
    return _with_system(row, messages)


def _text_parts_joined(content: Any) -> Any:
    """OpenAI's content parts ([{"type": "text", "text": ...}, ...]) as one string; anything else
    (a string, or parts that are not all text, which the caller then refuses) as it is."""
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return content


def _refuse_tool_use(turn: dict, role: Any, number: int, index: int, enc: Reader) -> None:
    """Tool calls and their results are not rendered (their chat-template arguments are not passed
    through): refused by name, rather than as an unknown role or an empty assistant turn."""
    call = next((key for key in TOOL_CALL_KEYS if turn.get(key)), None)
    if call is None and role not in TOOL_ROLES:
        return
    what = f"an assistant's '{call}'" if call else f"a tool turn (role {role!r})"
    raise DataError(f"{enc.where(index)}: turn {number} is {what}: lorakit trains on text conversations and does "
                    "not render tool calls; leave out the records that use tools, or write the calls and their "
                    "results into the turns' text")


def _one_turn(turn: Any, number: int, index: int, enc: Reader) -> dict:
    turn = turn if isinstance(turn, dict) else {}
    sharegpt = turn.get("from") is not None  # ShareGPT {from, value}, else {role, content}
    role = turn.get("from") if sharegpt else turn.get("role")
    content = turn.get("value") if sharegpt else _text_parts_joined(turn.get("content"))
    _refuse_tool_use(turn, role, number, index, enc)
    if not isinstance(role, str) or role not in ROLE_ALIASES:
        raise DataError(
            f"{enc.where(index)}: turn {number} has unknown role {role!r}; expected one of "
            f"{', '.join(ROLE_ALIASES)} (as 'role' with 'content', or ShareGPT 'from' with 'value')"
        )
    if isinstance(content, list):
        raise DataError(f"{enc.where(index)}: turn {number} ({role}) has content parts other than text "
                        "(images, audio, ...); lorakit trains on text: keep the {\"type\": \"text\"} parts only")
    if not isinstance(content, str):
        raise DataError(
            f"{enc.where(index)}: turn {number} ({role}) has no text in "
            f"'{'value' if sharegpt else 'content'}'"
        )
    return {"role": ROLE_ALIASES[role], "content": content}
