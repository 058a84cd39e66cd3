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
        chat_template: the Jinja ``chat_template`` from tokenizer_config.json (or
            chat_template.jinja) when one sits next to the tokenizer; ``tokenize_messages``
            renders it where the tokenizer can (``encode_rendered``).
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

    def decode_generated(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """``decode`` of model output: ids past ``vocab_size`` (a model vocabulary padded beyond
        the tokenizer's, which the model can still emit) are dropped instead of failing."""
        return self.decode([t for t in ids if t < self.vocab_size], skip_special_tokens=skip_special_tokens)

    def split_at_special(self, ids: Iterable[int]) -> tuple[list[list[int]], list[int]]:
        """``ids`` as runs of ordinary ids and the special ids between them: ``runs[i]`` comes
        before ``specials[i]``, so there is one more run than special (runs may be empty)."""
        special = self.special_token_ids()
        runs, specials, run = [], [], []
        for t in ids:
            if t in special:
                runs.append(run)
                specials.append(t)
                run = []
            else:
                run.append(t)
        runs.append(run)
        return runs, specials

    def special_id(self, name: str) -> int:
        """Id of the special token spelled ``name`` (e.g. ``"<|eot_id|>"``)."""
        raise NotImplementedError

    def encode_rendered(self, text: str) -> tuple[list[int], list[int]]:
        """Ids of a rendered chat template, where special-token text IS the special token (as
        transformers tokenizes ``apply_chat_template``'s text), and each id's length in UTF-8
        bytes of ``text``. Tokenizers that cannot say where each id sits raise NotImplementedError
        (their chats use the built-in ``chat_format``)."""
        raise NotImplementedError

    def template_tokens(self) -> dict[str, str]:
        """The special-token strings a chat template may read (``bos_token``, ``eos_token``...)."""
        return {}

    def special_texts(self) -> list[str]:
        """The text of every special token."""
        return []

    def special_token_ids(self) -> set[int]:
        """The ids of the special (control / added) tokens."""
        return set()

    def renders_template(self) -> bool:
        """True when ``tokenize_messages`` renders ``chat_template`` (the tokenizer has one and
        implements ``encode_rendered``); else the built-in ``chat_format`` is used."""
        return self.chat_template is not None and type(self).encode_rendered is not BaseTokenizer.encode_rendered

    def tokenize_messages(
        self, messages: Sequence[Message | dict], add_generation_prompt: bool = False, **template_variables
    ) -> tuple[list[int], list[bool]]:
        """Ids and loss mask for a conversation: the checkpoint's own chat template rendered
        (see ``tunelab.data.tokenizers.chat_template``) where the tokenizer can, else its
        built-in chat format (Llama 3 headers, Llama 2 ``[INST]``).

        Args:
            messages: ``Message`` objects (or dicts with role/content[/masked]).
            add_generation_prompt: end with the header that opens an assistant turn.
            template_variables: extra chat-template variables (``enable_thinking``, ``tools``...);
                ignored by the built-in formats.

        Returns:
            ``(ids, mask)`` of equal length; ``mask[i]`` True means position i is NOT trained
            on. The assistant's content and its end-of-turn token are trainable, the rest is
            masked (unless ``Message.masked`` says otherwise).

        Raises:
            ChatTemplateError: the template refused or could not render this conversation.
            DataError: no template and no built-in chat format.
        """
        msgs = [m if isinstance(m, Message) else _to_message(m) for m in messages]
        if self.renders_template():
            from tunelab.data.tokenizers.chat_template import tokenize_with_template

            return tokenize_with_template(self, msgs, add_generation_prompt, **template_variables)
        if self.chat_format is None:
            raise DataError(
                f"tokenizer {self.path} has no chat template and no known chat format (Llama 3 header "
                "tokens or a sentencepiece model); add tokenizer_config.json with its chat_template, or use "
                "a text-completion dataset"
            )
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
