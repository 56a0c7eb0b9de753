"""Turn a raw record into an `Example`: field mapping (Alpaca, chat messages, named columns), plain
format-string templates, and the multiple-choice rendering.

Multiple-choice rendering (used by every MC built-in and by user tasks with ``options_field``):
the prompt is the question followed by one lettered option per line and ``"Answer:"``; the response
starts with a space (so that prompt + response reads naturally and BPE tokenizers see `` B``):

    <question>
    A. <option 0>
    B. <option 1>
    Answer:                       response, by ``mc_response``:  "letter_text" -> " B. <option 1>"
                                                                 "letter"      -> " B"
                                                                 "text"        -> " <option 1>"

``"cloze"`` leaves the options out of the prompt (``<question>`` then ``"Answer:"``) and the response is
the option's text: the cloze formulation lm-eval and OLMES use for small models (HellaSwag, PIQA, ARC),
where a model that cannot yet bind letters or copy from a list still ranks the options by likelihood.

The default is ``"letter_text"``: the model learns both the letter (what MMLU-style scoring reads)
and the option text. The tokenizer's chat template, when chosen, is applied at tokenization time
(`metalora.data.tokenize`), on top of the prompt/response built here.
"""

from __future__ import annotations

import string
from typing import Any

from metalora.data.errors import MetaloraDataError
from metalora.data.example import Example

LETTERS = string.ascii_uppercase
MC_RESPONSES = ("letter_text", "letter", "text", "cloze")
SCHEMAS = ("columns", "alpaca", "messages")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def get_field(record: dict[str, Any], name: str, where: str) -> Any:
    """``record[name]``; a dotted name walks nested dicts (``"choices.text"``).

    A missing field raises naming the field, ``where`` (file/task) and the available fields.
    """
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            available = sorted(value) if isinstance(value, dict) else []
            raise MetaloraDataError(f"{where}: missing field {name!r}; available fields: {available}")
        value = value[part]
    return value


def get_text(record: dict[str, Any], name: str, where: str) -> str:
    """``get_field`` for a field that holds text: a string, or a number written as text. A list or a dict
    (a nested record) raises rather than being templated as its Python repr."""
    value = get_field(record, name, where)
    if isinstance(value, (list, dict, tuple)) or value is None:
        raise MetaloraDataError(
            f"{where}: field {name!r} holds {type(value).__name__ if value is not None else 'null'}, "
            "expected text (a string or a number)"
        )
    return str(value)


def fill_template(template: str, record: dict[str, Any], where: str) -> str:
    """``template.format(**record)``; a placeholder with no matching field raises like `get_field`, and a
    placeholder whose whole value is a list or a dict raises like `get_text` (use ``{field[0]}`` to index)."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as e:
        raise MetaloraDataError(f"{where}: bad template {template!r}: {e}") from None
    for name in names:
        if name in record:
            get_text(record, name, where)
    try:
        return template.format_map(record)
    except KeyError as e:
        raise MetaloraDataError(
            f"{where}: template {template!r} uses missing field {e.args[0]!r}; available fields: {sorted(record)}"
        ) from None
    except (IndexError, ValueError) as e:
        raise MetaloraDataError(f"{where}: bad template {template!r}: {e}") from None


def format_mc_prompt(question: str, options: list[str], style: str = "letter_text") -> str:
    """The question, one lettered option per line (none for ``cloze``), then ``"Answer:"`` (see the module
    docstring)."""
    if len(options) > len(LETTERS):
        raise MetaloraDataError(f"at most {len(LETTERS)} options are supported, got {len(options)}")
    listed = [] if style == "cloze" else [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    lines = [question.rstrip(), *listed, "Answer:"]
    return "\n".join(lines)


def format_mc_response(options: list[str], answer: int, style: str = "letter_text") -> str:
    """The gold response for a multiple-choice example in ``style`` (see the module docstring)."""
    if style == "letter_text":
        return f" {LETTERS[answer]}. {options[answer]}"
    if style == "letter":
        return f" {LETTERS[answer]}"
    if style in ("text", "cloze"):
        return f" {options[answer]}"
    raise MetaloraDataError(f"unknown mc_response {style!r}; choose one of {list(MC_RESPONSES)}")


def parse_answer(value: Any, options: list[str], where: str) -> int:
    """An answer given as an index (int or digit string), a letter (``"B"``) or the option text itself."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        idx = LETTERS.index(value.strip().upper())
    elif isinstance(value, str) and value in options:
        idx = options.index(value)
    else:
        raise MetaloraDataError(
            f"{where}: cannot read answer {value!r} as an option index, a letter or one of the options"
        )
    if not 0 <= idx < len(options):
        raise MetaloraDataError(f"{where}: answer {value!r} is out of range for {len(options)} options")
    return idx


def mc_example(
    task: str,
    id: str,
    question: str,
    options: list[str],
    answer: int,
    mc_response: str = "letter_text",
    **meta: Any,
) -> Example:
    """A multiple-choice `Example` rendered as generative SFT (the prompt lists the options unless
    ``mc_response`` is ``cloze``)."""
    return Example(
        prompt=format_mc_prompt(question, options, mc_response),
        response=format_mc_response(options, answer, mc_response),
        task=task,
        id=id,
        options=list(options),
        answer=answer,
        meta=dict(meta),
    )


def _messages_example(record: dict[str, Any], field: str, task: str, id: str, where: str) -> Example:
    messages = get_field(record, field, where)
    if not isinstance(messages, list) or not messages:
        raise MetaloraDataError(
            f"{where}: field {field!r} must be a non-empty list of {{role, content}} messages"
        )
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MetaloraDataError(f"{where}: each message needs 'role' and 'content', got {m!r}")
    if messages[-1]["role"] != "assistant":
        raise MetaloraDataError(f"{where}: the last message must be the assistant's (the response to learn)")
    context = [{"role": m["role"], "content": str(m["content"])} for m in messages[:-1]]
    prompt = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in context) + "\nAssistant:"
    return Example(
        prompt=prompt.lstrip("\n"),
        response=" " + str(messages[-1]["content"]),
        task=task,
        id=id,
        meta={"messages": context},
    )


def _options_and_answer(
    record: dict[str, Any], options_field: str | list[str] | None, answer_field: str | None, where: str
) -> tuple[list[str] | None, int | None]:
    """The record's options (one list column, or one column per option) and the gold option's index."""
    if options_field is None:
        return None, None
    if isinstance(options_field, str):
        options = get_field(record, options_field, where)
    else:  # one column per option
        options = [get_field(record, f, where) for f in options_field]
    if not isinstance(options, list) or not options:
        raise MetaloraDataError(f"{where}: field {options_field!r} must be a non-empty list of options")
    options = [str(o) for o in options]
    if answer_field is None:
        raise MetaloraDataError(f"{where}: options_field is set but answer_field is not")
    return options, parse_answer(get_field(record, answer_field, where), options, where)


def record_to_example(
    record: dict[str, Any],
    *,
    task: str,
    id: str,
    where: str,
    schema: str = "columns",
    prompt_field: str = "prompt",
    response_field: str | None = "response",
    options_field: str | list[str] | None = None,
    answer_field: str | None = None,
    messages_field: str = "messages",
    prompt_template: str | None = None,
    response_template: str | None = None,
    mc_response: str = "letter_text",
) -> Example:
    """Map one raw record to an `Example` according to ``schema``.

    * ``"alpaca"``: ``instruction``, optional ``input``, ``output`` -> the Alpaca prompt and the output.
    * ``"messages"``: a chat list; the last (assistant) message is the response, the earlier ones the
      prompt (kept in ``meta["messages"]`` so the tokenizer's chat template can render them).
    * ``"columns"``: ``prompt_template`` (a ``str.format`` string over the record) or ``prompt_field``;
      ``response_template`` or ``response_field``. With ``options_field`` (one list column, or a list
      of columns, one per option) + ``answer_field`` the
      example is multiple choice; if no response field/template is set, prompt and response are the
      MC rendering of the module docstring.
    """
    if schema == "alpaca":
        instruction = get_text(record, "instruction", where)
        output = get_text(record, "output", where)
        inp = str(record.get("input") or "")
        tpl = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
        return Example(tpl.format(instruction=instruction, input=inp), output, task, id)
    if schema == "messages":
        return _messages_example(record, messages_field, task, id, where)
    if schema != "columns":
        raise MetaloraDataError(f"unknown schema {schema!r}; choose one of {list(SCHEMAS)}")

    if prompt_template is not None:
        prompt = fill_template(prompt_template, record, where)
    else:
        prompt = get_text(record, prompt_field, where)
    options, answer = _options_and_answer(record, options_field, answer_field, where)
    if response_template is not None:
        response = fill_template(response_template, record, where)
    elif response_field is not None and (options is None or response_field in record):
        response = get_text(record, response_field, where)
    elif options is not None and answer is not None:
        return mc_example(task, id, prompt, options, answer, mc_response)
    else:
        raise MetaloraDataError(
            f"{where}: set response_field or response_template (or options/answer fields)"
        )
    return Example(prompt, response, task, id, options=options, answer=answer)
