"""The interface every tunelab tokenizer implements (see CONTRACTS.md, "Tokenizers")."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tunelab.data.tokenizers.messages import CHAT_FORMATS, Message
from tunelab.errors import DataError


class BaseTokenizer:
    """Common surface: encode/decode, special ids, and chat tokenization.

    Subclasses set ``bos_id``, ``eos_id``, ``pad_id``, ``stop_tokens``, ``vocab_size``,
    ``chat_format`` (a key of ``CHAT_FORMATS`` or None) and implement ``encode``, ``decode``
    and ``special_id``.

    Attributes:
        bos_id: id prepended by ``encode(add_bos=True)`` (None if the vocabulary has none).
        eos_id: id appended by ``encode(add_eos=True)``.
        pad_id: an id that is safe to pad with (labels use -100, so it is never trained on).
        stop_tokens: ids that end generation.
        vocab_size: number of ids, special tokens included (max id + 1).
        chat_template: the Jinja ``chat_template`` from tokenizer_config.json when one sits
            next to the tokenizer. Informational only: tunelab formats chats natively.
        path: the file the tokenizer was read from.
    """

    bos_id: int | None
    eos_id: int | None
    pad_id: int
    stop_tokens: list[int]
    vocab_size: int
    chat_format: str | None = None
    chat_template: str | None = None
    path: str | None = None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids for ``text``; special-token text inside it is encoded as plain text.

        Args:
            text: the text to encode.
            add_bos: prepend ``bos_id``.
            add_eos: append ``eos_id``.
        """
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``.

        Args:
            ids: token ids.
            skip_special_tokens: drop control/special tokens instead of rendering their text.
        """
        raise NotImplementedError

    def special_id(self, name: str) -> int:
        """Id of the special token spelled ``name`` (e.g. ``"<|eot_id|>"``)."""
        raise NotImplementedError

    def tokenize_messages(
        self, messages: Sequence[Message | dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Ids and loss mask for a conversation in this tokenizer's chat format.

        Args:
            messages: ``Message`` objects (or dicts with role/content[/masked]).
            add_generation_prompt: end with the header that opens an assistant turn.

        Returns:
            ``(ids, mask)`` of equal length; ``mask[i]`` True means position i is NOT trained
            on. The sequence starts with BOS; the assistant's content and its end-of-turn token
            are trainable, the rest is masked (unless ``Message.masked`` says otherwise).
        """
        if self.chat_format is None:
            raise DataError(
                f"tokenizer {self.path} has no known chat format (needs Llama 3 header tokens "
                "or a sentencepiece model); use a text-completion dataset instead"
            )
        msgs = [m if isinstance(m, Message) else _to_message(m) for m in messages]
        return CHAT_FORMATS[self.chat_format](self, msgs, add_generation_prompt)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, chat_format={self.chat_format!r})"
        )


def _to_message(m) -> Message:
    """A ``Message`` from a {"role", "content"[, "masked"]} mapping (extra keys ignored)."""
    try:
        return Message(role=m["role"], content=m["content"], masked=m.get("masked"))
    except (KeyError, TypeError, AttributeError):
        raise DataError(
            f"chat message {str(m)[:80]!r} needs 'role' and 'content' keys"
        ) from None
