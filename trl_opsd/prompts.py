"""How privileged context enters the teacher's prompt.

The teacher sees the student's chat with extra text (the gold answer, a worked solution, feedback)
added to the last user turn. Rows can instead carry a full ``teacher_messages`` chat, which wins.
"""

from __future__ import annotations

import copy
import string

DEFAULT_TEACHER_PROMPT_TEMPLATE = "{prompt}\n\n{privileged_context}"
"""Applied to the last user message: ``{prompt}`` is its content, ``{privileged_context}`` the hint."""

DEFAULT_ANSWER_CONTEXT_TEMPLATE = "The final answer is {answer}."
"""Turns a row's ``answer`` into privileged context when ``privileged_from="answer"``."""


def insert_privileged_context(
    messages: list[dict], privileged_context: str, template: str = DEFAULT_TEACHER_PROMPT_TEMPLATE
) -> list[dict]:
    """A copy of ``messages`` whose last user turn is rewritten with ``template``.

    Raises ``ValueError`` when the chat has no user turn to attach the context to.
    """
    teacher_messages = copy.deepcopy(list(messages))
    for message in reversed(teacher_messages):
        if message.get("role") == "user":
            message["content"] = template.format(prompt=message["content"], privileged_context=privileged_context)
            return teacher_messages
    raise ValueError("cannot insert privileged context: the chat has no user message")


def template_fields(template: str, key: str) -> set[str]:
    """The placeholder names of a ``str.format`` template; ``ValueError`` naming ``key`` when it is malformed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"{key}={template!r} is not a valid format template ({error}); write literal braces "
                         "as '{{' and '}}'") from None
    fields = set()
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = name.split(".", 1)[0].split("[", 1)[0]
        if not base or base.isdigit():
            raise ValueError(f"{key}={template!r} has a positional placeholder {{{name}}}; name it")
        fields.add(base)
    return fields


def check_templates(teacher_prompt_template: str, answer_context_template: str, privileged_from: str | None) -> None:
    """Refuse, before anything loads, templates whose placeholders the rows cannot fill (``KeyError`` at step 1)."""
    allowed = {"prompt", "privileged_context"}
    fields = template_fields(teacher_prompt_template, "teacher_prompt_template")
    if fields != allowed:
        raise ValueError(
            f"teacher_prompt_template={teacher_prompt_template!r} must use exactly the placeholders {{prompt}} and "
            f"{{privileged_context}}; it has {sorted(fields)}" + (f" (unknown: {sorted(fields - allowed)})"
                                                                  if fields - allowed else "")
        )
    if privileged_from is None:
        return
    fields = template_fields(answer_context_template, "answer_context_template")
    unknown = sorted(fields - {privileged_from})
    if unknown:
        raise ValueError(
            f"answer_context_template={answer_context_template!r} has placeholders {unknown} that no row fills: the "
            f"only one it may use is {{{privileged_from}}} (privileged_from={privileged_from!r}). Change the template "
            "or privileged_from"
        )
