"""A checkpoint's own Jinja ``chat_template``: rendered as transformers renders it, then
tokenized with a loss mask.

Rendering: a sandboxed Jinja2 environment (no attribute access to Python internals, immutable
containers) with what HF templates use: ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols``
extension, ``namespace``, ``raise_exception(msg)``, ``strftime_now(fmt)``, ``tojson`` as
``json.dumps`` without HTML escaping, and the ``{% generation %}...{% endgeneration %}`` block
(rendered as its body). Variables: ``messages``, ``add_generation_prompt``, the special-token
strings (``bos_token``, ``eos_token``, ...) and whatever the caller adds (``tools``,
``enable_thinking``...). The ids are the rendered text tokenized with the special tokens it
spells out recognised, which is what ``apply_chat_template(..., tokenize=True)`` returns.

Loss mask, from renders of the whole conversation: each message's content is located in the
rendered text (as given, or stripped: templates often ``trim`` it), by aligning the render with
a second one in which every content is a marker (so a content that also occurs in the
template's own text, "2023" in a date line, is not mistaken for it). An assistant
message trains on its content plus the special token right after it (its end of turn:
``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``..., spaces before it included);
everything else is masked. A
message with ``masked=False`` trains on everything from the end of the previous message (for
the first message: the end of the preamble's last end-of-turn token, if any) up to its own end
of turn (headers included: ``train_on_input``). Rendering prefixes of the
conversation instead would be wrong for templates that render a turn differently when it is
last (Qwen3's think blocks), so it is never done. A token is trained when its first byte lies in
a trained span (a token straddling the start of the content stays masked).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tunelab.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from tunelab.data.tokenizers.base import BaseTokenizer
    from tunelab.data.tokenizers.messages import Message


class ChatTemplateError(DataError):
    """The template refused a conversation (``raise_exception``) or could not render it, or a
    message's content cannot be found in the render: the row is skipped, not the run."""


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # json.dumps as HF's templates expect it: no HTML escaping (Jinja's own tojson escapes < > &)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}body{% endgeneration %}`` renders ``body`` (HF marks assistant text
        with it; tunelab finds the content itself, see the module docstring)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.TemplateError as e:
        raise DataError(f"the tokenizer's chat_template does not parse ({e}); fix tokenizer_config.json "
                        "or chat_template.jinja") from None


def render_chat_template(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                         **variables: Any) -> str:
    """The text ``template`` renders for ``messages``.

    Args:
        template: the Jinja source (tokenizer_config.json ``chat_template``).
        messages: dicts with ``role`` and ``content`` (and any keys the template reads).
        add_generation_prompt: end with the opening of an assistant turn.
        variables: the special-token strings (``bos_token``...) and template switches
            (``tools``, ``enable_thinking``...).

    Raises:
        ChatTemplateError: the template raised or failed on this conversation.
        DataError: the template does not parse.
    """
    import jinja2

    compiled = _compiled(template)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ChatTemplateError(f"the chat template failed on the conversation: {first}") from None


def _marker(i: int) -> str:
    # private-use characters: no template trims, splits on or escapes them
    return f"\ue000{i}\ue001"


def _content_spans(render, messages: Sequence["Message"], text: str) -> list[tuple[int, int] | None]:
    """(start, end) character span of each message's content in ``text`` (the full render), or
    None for a message the template leaves out (Mistral's system prompt goes only into the
    last user turn).

    The conversation is rendered a second time with each content replaced by a marker, which
    gives the template's own text around every message; the real render must be that text with
    each content (as given, or stripped) in place of its marker. Where the template treats the
    markers differently from the contents, each content is searched for in order instead.

    Raises:
        ChatTemplateError: a message that is trained on cannot be found.
    """
    try:
        marked = render([_marker(i) for i in range(len(messages))])
    except ChatTemplateError:  # a template that inspects the contents: search for them below
        marked = ""
    present, pieces, cursor = [], [], 0
    for i in range(len(messages)):
        at = marked.find(_marker(i), cursor)
        if at >= 0:
            present.append(i)
            pieces.append(marked[cursor:at])
            cursor = at + len(_marker(i))
    pieces.append(marked[cursor:])
    spans: list[tuple[int, int] | None] = [None] * len(messages)
    aligned = _aligned(text, [messages[i] for i in present], pieces) if marked else None
    if aligned is not None:
        for i, span in zip(present, aligned):
            spans[i] = span
        return _check_trained_found(spans, messages)
    cursor = 0
    for i, m in enumerate(messages):
        for content in dict.fromkeys((m.content, m.content.strip())):
            found = text.find(content, cursor) if content else cursor
            if found >= 0:
                spans[i] = (found, found + len(content))
                cursor = found + len(content)
                break
    return _check_trained_found(spans, messages)


def _check_trained_found(spans: list, messages: Sequence["Message"]) -> list:
    for i, (span, m) in enumerate(zip(spans, messages)):
        if span is None and not (m.is_masked and m.masked is not False):
            raise ChatTemplateError(f"message {i} ({m.role}) does not appear in the rendered chat template; "
                                    "the template rewrites it, so its loss mask cannot be derived")
    return spans


def _aligned(text: str, messages: Sequence["Message"], pieces: list[str]) -> list[tuple[int, int]] | None:
    """Spans of the contents when ``text`` is ``pieces[0] + c0 + pieces[1] + c1 + ...`` with each
    ``ci`` a message's content as given or stripped; None when it is not."""
    if not text.startswith(pieces[0]):
        return None
    pos, spans = len(pieces[0]), []
    for m, after in zip(messages, pieces[1:]):
        for content in dict.fromkeys((m.content, m.content.strip())):
            end = pos + len(content)
            if text.startswith(content, pos) and text.startswith(after, end):
                break
        else:
            return None
        spans.append((pos, end))
        pos = end + len(after)
    return spans if pos == len(text) else None


def _end_of_turn(text: str, end: int, specials: Sequence[str]) -> int:
    """``end`` moved past the special token that starts there, or after spaces (Llama 2 writes
    ``content </s>``), if one does."""
    at = len(text) - len(text[end:].lstrip(" "))
    for s in specials:  # longest first
        if text.startswith(s, at):
            return at + len(s)
    return end


def tokenize_with_template(tok: "BaseTokenizer", messages: Sequence["Message"], add_generation_prompt: bool,
                           **variables: Any) -> tuple[list[int], list[bool]]:
    """(ids, mask) of ``messages`` rendered by ``tok.chat_template`` (mask True = not trained).

    Args:
        tok: a tokenizer with ``chat_template`` and ``encode_rendered`` (byte-level BPE or
            sentencepiece).
        messages: the conversation.
        add_generation_prompt: end with the opening of an assistant turn.
        variables: extra template variables (``tools``, ``enable_thinking``...).
    """
    def render(contents: Sequence[str]) -> str:
        return render_chat_template(
            tok.chat_template, [{"role": m.role, "content": c} for m, c in zip(messages, contents)],
            add_generation_prompt=add_generation_prompt, **tok.template_tokens(), **variables)

    rendered = render([m.content for m in messages])
    specials = sorted(tok.special_texts(), key=len, reverse=True)
    spans = _content_spans(render, messages, rendered)
    # where each rendered message's turn ends: after the special token that follows its content
    ends = [None if span is None else _end_of_turn(rendered, span[1], specials) for span in spans]
    enders = {rendered[span[1]:end] for span, end in zip(spans, ends) if span is not None and end > span[1]}
    trained: list[tuple[int, int]] = []
    previous_end = None
    for m, span, end in zip(messages, spans, ends):
        if span is None:  # left out by the template (and not trained on)
            continue
        if m.masked is False:  # the whole turn: from where the previous one ended (its header too)
            if previous_end is None:  # the first: after the preamble's last end of turn, if any
                previous_end = max((rendered.rfind(e, 0, span[0]) + len(e) for e in enders
                                    if rendered.rfind(e, 0, span[0]) >= 0), default=0)
            trained.append((previous_end, end))
        elif not m.is_masked:
            trained.append((span[0], end))
        previous_end = end
    ids, lengths = tok.encode_rendered(rendered)

    def byte_at(i: int) -> int:  # character offset -> offset in the UTF-8 bytes the lengths count
        return len(rendered[:i].encode("utf-8", "surrogatepass"))

    byte_spans = [(byte_at(s), byte_at(e)) for s, e in trained]
    mask, pos = [], 0
    for n in lengths:
        mask.append(not any(s <= pos < e for s, e in byte_spans))
        pos += n
    return ids, mask

