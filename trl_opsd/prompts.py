"""How privileged context enters the teacher's prompt.

The teacher sees the student's chat with extra text (the gold answer, a worked solution, feedback)
added to the last user turn. Rows can instead carry a full ``teacher_messages`` chat, which wins.
"""

from __future__ import annotations

import copy

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
