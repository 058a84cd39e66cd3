"""Chat messages and the prompt formats that turn them into (token ids, loss mask).

Two formats are built in, chosen by the tokenizer:

* ``llama3`` (tiktoken files and Llama-3-style tokenizer.json)::

      <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...

* ``llama2`` (sentencepiece models)::

      <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] ...

Masking (mask[i] True = position i is NOT trained on): the leading BOS and every header or
``[INST]`` block is masked; an assistant message's content and its end-of-turn token
(``<|eot_id|>`` / ``</s>``) are trained on. ``Message.masked`` overrides the default per
message: ``masked=False`` trains on the whole message including its header (what
``train_on_input`` wants for user turns), ``masked=True`` masks it all.

Content is stripped of surrounding whitespace before encoding, as Meta's reference code and
the official chat templates do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunelab.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from tunelab.data.tokenizers.base import BaseTokenizer

ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    """One turn of a conversation.

    Args:
        role: "system", "user" or "assistant" (the Llama 3 format also accepts "ipython"
            and "tool", rendered verbatim in the header).
        content: the text of the turn.
        masked: True = not trained on, False = trained on; None (default) = trained on only
            when role == "assistant".
    """

    role: str
    content: str
    masked: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.content, str):
            raise DataError(
                f"message content must be a string, got {type(self.content).__name__} for role "
                f"{self.role!r}; convert it to text first"
            )

    @property
    def is_masked(self) -> bool:
        """Whether the message's content is left out of the loss."""
        if self.masked is None:
            return self.role != "assistant"
        return bool(self.masked)


def _check_role(message: Message, allowed: tuple[str, ...], fmt: str) -> None:
    if message.role not in allowed:
        raise DataError(
            f"message role {message.role!r} is not supported by the {fmt} chat format; "
            f"use one of {', '.join(allowed)}"
        )


def _prefix_len(tok: "BaseTokenizer", ids: list[int], n_chars: int) -> int:
    """Smallest k such that ids[:k] decodes to at least n_chars characters."""
    for k in range(1, len(ids) + 1):
        if len(tok.decode(ids[:k], skip_special_tokens=False)) >= n_chars:
            return k
    return len(ids)


def tokenize_llama3(
    tok: "BaseTokenizer", messages: list[Message], add_generation_prompt: bool
) -> tuple[list[int], list[bool]]:
    """Llama 3 header format. See the module docstring for the masking rules."""
    start = tok.special_id("<|start_header_id|>")
    end = tok.special_id("<|end_header_id|>")
    eot = tok.special_id("<|eot_id|>")
    ids: list[int] = []
    mask: list[bool] = []
    if tok.bos_id is not None:
        ids.append(tok.bos_id)
        mask.append(True)

    newlines = tok.encode("\n\n", add_bos=False)

    def header(role: str) -> list[int]:
        return [start, *tok.encode(role, add_bos=False), end]

    for m in messages:
        _check_role(m, ROLES + ("ipython", "tool"), "llama3")
        # "\n\n" and the content are encoded as one string, as a rendered chat template is.
        # With Llama 3's split regex the newlines are always their own pieces; for other
        # regexes a token that straddles them stays on the (masked) header side.
        joint = tok.encode("\n\n" + m.content.strip(), add_bos=False)
        k = len(newlines) if joint[: len(newlines)] == newlines else _prefix_len(tok, joint, 2)
        head = header(m.role) + joint[:k]
        body = joint[k:] + [eot]
        # The header is prompt unless the caller explicitly asked to train on this message.
        ids += head
        mask += [m.masked is not False] * len(head)
        ids += body
        mask += [m.is_masked] * len(body)
    if add_generation_prompt:
        head = header("assistant") + newlines
        ids += head
        mask += [True] * len(head)
    return ids, mask


def tokenize_llama2(
    tok: "BaseTokenizer", messages: list[Message], add_generation_prompt: bool
) -> tuple[list[int], list[bool]]:
    """Llama 2 ``[INST]`` format (Meta's ``chat_completion`` layout).

    The system prompt is folded into the next user turn's ``[INST]`` block and shares that
    block's mask. Each user turn starts with BOS; each assistant turn is
    ``" {content} "`` + EOS. A prompt that ends with a user turn already ends in ``[/INST]``,
    so ``add_generation_prompt`` adds nothing in this format.
    """
    del add_generation_prompt  # the [/INST] closing the user turn is the generation prompt
    ids: list[int] = []
    mask: list[bool] = []
    system: Message | None = None

    def inst_block(user: Message | None) -> None:
        nonlocal system
        text = "[INST] "
        if system is not None:
            text += f"<<SYS>>\n{system.content}\n<</SYS>>\n\n"
        text += (user.content.strip() if user is not None else "") + " [/INST]"
        chunk = tok.encode(text, add_bos=True)
        ids.extend(chunk)
        mask.extend([(user or system).is_masked] * len(chunk))
        system = None

    for m in messages:
        _check_role(m, ROLES, "llama2")
        if m.role == "system":
            if system is not None:
                system = Message("system", system.content + "\n" + m.content, system.masked)
            else:
                system = m
            continue
        if m.role == "user":
            inst_block(m)
            continue
        if system is not None:  # a system prompt with no user turn gets its own block
            inst_block(None)
        # assistant: sentencepiece's dummy prefix supplies the space after [/INST], and the
        # trailing space matches Meta's f"{answer} " before EOS.
        if not ids and tok.bos_id is not None:
            ids.append(tok.bos_id)
            mask.append(True)
        chunk = tok.encode(m.content.strip() + " ", add_bos=False, add_eos=True)
        ids += chunk
        mask += [m.is_masked] * len(chunk)
    if system is not None:
        inst_block(None)
    if not ids and tok.bos_id is not None:
        ids, mask = [tok.bos_id], [True]
    return ids, mask


CHAT_FORMATS = {"llama3": tokenize_llama3, "llama2": tokenize_llama2}
