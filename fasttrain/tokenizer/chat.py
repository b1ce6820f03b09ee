"""The chat format and the SFT mask rule, in one place: the special tokens a conversation is
rendered with, `check_conversation` (what a valid chat is), and `render_conversation` /
`render_prompt` (its ids, and which of them are scored)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from fasttrain.tokenizer.core import Tokenizer

# The chat format's special tokens (after <|bos|>, which starts every rendered chat); their
# order fixes their ids (fasttrain.tokenizer.core.SPECIAL_TOKENS).
CHAT_TOKENS = ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")


def render_conversation(tokenizer: Tokenizer, messages: Sequence[dict], max_len: int | None = None
                        ) -> tuple[list[int], list[int]]:
    """Ids and loss mask of a chat; the one place the SFT mask rule lives.

    ids: <|bos|>, then per turn <|user_start|> text <|user_end|> or
    <|assistant_start|> text <|assistant_end|>. mask[j] = 1 iff token j is assistant text
    or <|assistant_end|> (so the model learns to stop); 0 for <|bos|>, user turns and
    <|assistant_start|>. A first "system" message is prepended to the first user message
    (system text, a blank line, user text). The chat must start with a user message,
    alternate user/assistant and end with an assistant message. max_len keeps the first
    max_len tokens (ids and mask cut alike).
    """
    turns = _validated_turns(messages, ending="assistant")
    ids, mask = [tokenizer.bos_id], [0]
    for role, text in turns:
        start, end = (("<|user_start|>", "<|user_end|>") if role == "user"
                      else ("<|assistant_start|>", "<|assistant_end|>"))
        body = tokenizer.encode(text)
        scored = 1 if role == "assistant" else 0
        ids += [tokenizer.special_tokens[start], *body, tokenizer.special_tokens[end]]
        mask += [0] + [scored] * len(body) + [scored]
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len={max_len}; it must be at least 1 (or None)")
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids of a chat ending with a user message, then <|assistant_start|>: a sampling prompt."""
    turns = _validated_turns(messages, ending="user")
    ids = [tokenizer.bos_id]
    for role, text in turns:
        start, end = (("<|user_start|>", "<|user_end|>") if role == "user"
                      else ("<|assistant_start|>", "<|assistant_end|>"))
        ids += [tokenizer.special_tokens[start], *tokenizer.encode(text), tokenizer.special_tokens[end]]
    return ids + [tokenizer.special_tokens["<|assistant_start|>"]]


class ConversationError(ValueError):
    """A chat that breaks the rules of `check_conversation`; the message says which message and why.

    A ValueError: called with a bad chat, the renderers have a bug in their caller. Readers of
    chat files call `check_conversation` themselves and report the file and line instead."""


def check_conversation(messages: Sequence[dict], ending: str = "assistant") -> None:
    """Raise ConversationError unless `messages` is a chat the renderers take: a non-empty list of
    {"role", "content"} dicts with non-blank string content; an optional first "system" message;
    then "user" and "assistant" alternating, starting with "user" and ending with `ending`
    ("assistant" for training, where the reply is what is scored; "user" for a sampling prompt).

    The one place these rules live: `render_conversation` and `render_prompt` call it, and so do
    the chat file readers (fasttrain/data/sources.py), so a bad record is reported with its file
    and line when the data is read, not as a crash halfway through training."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationError("a conversation is a non-empty list of {\"role\", \"content\"} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ConversationError(f"message {i} is {m!r}; each message is a dict with \"role\" and a "
                                    "string \"content\"")
        if not m["content"].strip():
            raise ConversationError(f"message {i} ({m['role']}) has empty content; give it text or drop "
                                    "the message")
    first = 1 if messages[0]["role"] == "system" else 0
    for i in range(first, len(messages)):
        role = messages[i]["role"]
        want = "user" if (i - first) % 2 == 0 else "assistant"
        if role != want:
            if role == "system":
                where = "only the first message may be system"
            elif i == first:
                where = (f"a conversation starts with a user message{' after the system message' if first else ''}; "
                         "add the user turn the reply answers, or drop this message")
            else:
                where = "roles must alternate user/assistant, starting with user; merge or drop the repeated turn"
            raise ConversationError(f"message {i} has role {role!r}, expected {want!r}: {where}")
    if first == len(messages):
        raise ConversationError("the conversation has a system message but no user message; add one")
    last = messages[-1]["role"]
    if last != ending:
        what = ("training needs a conversation ending with an assistant message (a trailing user turn "
                "has nothing to score); add the assistant's reply or drop the last user turn"
                if ending == "assistant" else
                "a sampling prompt needs a conversation ending with a user message (the model answers it)")
        raise ConversationError(f"message {len(messages) - 1} is the last and has role {last!r}: {what}")


def _validated_turns(messages: Sequence[dict], ending: str) -> list[tuple[str, str]]:
    """(role, text) per turn after `check_conversation`; a leading system message joins turn 0."""
    check_conversation(messages, ending)
    first = 1 if messages[0]["role"] == "system" else 0
    turns = [(m["role"], m["content"]) for m in messages[first:]]
    if first:
        turns[0] = ("user", messages[0]["content"] + "\n\n" + turns[0][1])
    return turns

