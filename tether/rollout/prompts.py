"""Prompts as the sampler reads them: a string, or a conversation (a list of chat messages), rendered with the
tokenizer's chat template and `add_generation_prompt`, so that the model's turn comes next."""

from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")


def prompt_problem(prompt) -> str | None:
    """None if `prompt` is a usable prompt (a non-empty string, or a list of {"role", "content"} messages
    whose last one is not the assistant's), else what is wrong with it."""
    if isinstance(prompt, str):
        return None if prompt.strip() else ("empty prompt" if not prompt else "prompt is only whitespace")
    if not isinstance(prompt, list) or not prompt:
        return f"prompt is a {type(prompt).__name__}, not a string or a list of chat messages"
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return (f"message {i} of the conversation must be {{'role': one of {', '.join(ROLES)}, 'content': "
                    f"a string}}, got {m!r}")
    if prompt[-1]["role"] == "assistant":
        return "the conversation ends with an assistant message: the model's turn must come next"
    return None


def messages(prompt, system_prompt: str | None = None) -> list[dict]:
    """The conversation a prompt stands for: a string is one user turn. `system_prompt` (when not None)
    replaces the conversation's system message, or the template's default one; "" leaves an empty one."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt is not None:
        turns = [{"role": "system", "content": system_prompt}] + [t for t in turns if t["role"] != "system"]
    return turns


def render(tokenizer, prompt, *, chat_template: bool, system_prompt: str | None = None) -> tuple[str, bool]:
    """(text, add_special_tokens) to tokenize for `prompt`: through the chat template when it is on (always for
    a conversation), else the plain string with the tokenizer's own special tokens."""
    if not chat_template:
        if isinstance(prompt, str) and system_prompt is None:
            return prompt, True
        raise ValueError("conversational prompts and model.system_prompt need model.chat_template=true")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("model.chat_template=true but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True)
    return text, False
