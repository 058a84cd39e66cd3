"""Chat templates rendered by tunelab vs transformers' ``apply_chat_template`` (the oracle), on
tiny tokenizers carrying each family's template, special tokens and split regex
(tests/data/chat_templates.py), and the loss masks derived from the render."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tunelab.data.tokenizers import Message, load_tokenizer  # noqa: E402
from tunelab.data.tokenizers.chat_template import ChatTemplateError, render_chat_template  # noqa: E402
from tunelab.errors import DataError  # noqa: E402

from .chat_templates import (  # noqa: E402
    FAMILIES,
    SENTENCEPIECE_FAMILIES,
    write_family_tokenizer,
    write_sentencepiece_tokenizer,
)

SYSTEM = {"role": "system", "content": "You are terse.\n"}
TURNS = [
    {"role": "user", "content": "  What is 2+2? Answer like it's 2024.\n\n"},
    {"role": "assistant", "content": "4 🙂"},
    {"role": "user", "content": "2024"},  # also in the Llama 3.1 template's own date line
    {"role": "assistant", "content": "  Twenty twenty-four, café.\n"},
]
CONVERSATIONS = {
    "with_system": [SYSTEM, *TURNS],
    "without_system": TURNS,
    "prompt_only": [SYSTEM, TURNS[0]],
}
# what ends an assistant turn in each family's template
END_OF_TURN = {"qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3_1": "<|eot_id|>", "mistral_nemo": "</s>",
               "phi4": "<|im_end|>", "generation_tagged": "<|im_end|>"}
TRIMS = {"llama3_1"}  # templates that render content | trim


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    cache = {}

    def make(family):
        if family not in cache:
            cache[family] = write_family_tokenizer(tmp_path_factory.mktemp(family), family)
        return cache[family]

    return make


def _oracle(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    tokens = {k: v for k, v in config.items() if k.endswith("_token") and v is not None}
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **tokens), config


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_ids_equal_apply_chat_template(family_folder, family, name, generation_prompt):
    folder = family_folder(family)
    hf, config = _oracle(folder)
    tok = load_tokenizer(folder)
    assert tok.renders_template()
    convo = CONVERSATIONS[name]
    if family == "mistral_nemo" and generation_prompt:
        pytest.skip("Mistral's template has no generation prompt: [/INST] ends the user turn")
    text = hf.apply_chat_template(convo, chat_template=config["chat_template"], tokenize=False,
                                  add_generation_prompt=generation_prompt)
    ids, mask = tok.tokenize_messages(convo, add_generation_prompt=generation_prompt)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids)
    # trained: each assistant's content (as the template writes it) and its end-of-turn token
    want = "".join((m["content"].strip() if family in TRIMS else m["content"]) + END_OF_TURN[family]
                   for m in convo if m["role"] == "assistant")
    assert tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False) == want


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen3_switches_and_think_blocks(family_folder, enable_thinking):
    """``enable_thinking`` reaches the template; the last turn's empty think block is masked
    (only content + <|im_end|> trained); a reasoning turn written out in full trains on all of it."""
    folder = family_folder("qwen3")
    hf, config = _oracle(folder)
    tok = load_tokenizer(folder)
    convo = [TURNS[0]]
    text = hf.apply_chat_template(convo, chat_template=config["chat_template"], tokenize=False,
                                  add_generation_prompt=True, enable_thinking=enable_thinking)
    ids, _ = tok.tokenize_messages(convo, add_generation_prompt=True, enable_thinking=enable_thinking)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert text.endswith("<think>\n\n</think>\n\n") != enable_thinking

    answer = [TURNS[0], {"role": "assistant", "content": "Four."}]
    ids, mask = tok.tokenize_messages(answer)
    assert "<think>\n\n</think>\n\n" in tok.decode(ids, skip_special_tokens=False)
    assert tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False) == "Four.<|im_end|>"
    reasoning = [TURNS[0], {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nFour."}]
    ids, mask = tok.tokenize_messages(reasoning)
    assert tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False) == (
        "<think>\nadd them\n</think>\n\nFour.<|im_end|>")


def test_train_on_input_trains_the_user_turn_with_its_header(family_folder):
    tok = load_tokenizer(family_folder("qwen2_5"))
    msgs = [Message("user", "Hi there", masked=False), Message("assistant", "Hello")]
    ids, mask = tok.tokenize_messages(msgs)
    trained = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    # the default system turn stays masked; the user turn from its header on is trained
    assert trained == "\n<|im_start|>user\nHi there<|im_end|>Hello<|im_end|>"


def test_template_errors_are_one_line(family_folder):
    tok = load_tokenizer(family_folder("mistral_nemo"))
    with pytest.raises(ChatTemplateError, match="roles must alternate") as info:
        tok.tokenize_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="does not parse"):
        render_chat_template("{% for %}", [])
    with pytest.raises(ChatTemplateError, match="failed on the conversation"):
        render_chat_template("{{ messages[5].content }}", [])


def test_sandbox_and_helpers():
    """The environment HF templates expect: tojson without HTML escaping, loop controls,
    namespace, strftime_now, trim/lstrip blocks; and a sandbox (no Python internals)."""
    out = render_chat_template(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}{% endfor %}|{{ ns.n }}|{{ strftime_now('%Y') | length }}",
        [{"role": "user", "content": "<b>é</b>"}, {"role": "skip", "content": ""}])
    assert out == '{"role": "user", "content": "<b>é</b>"}|1|4'
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [])


def test_generation_config_eos_ids_stop_generation(family_folder):
    folder = family_folder("qwen3")
    tok = load_tokenizer(folder)
    for name in ("<|im_end|>", "<|endoftext|>"):
        assert tok.special_id(name) in tok.stop_tokens


def test_folder_without_template_keeps_the_builtin_format(family_folder, tmp_path):
    import shutil

    folder = tmp_path / "plain"
    shutil.copytree(family_folder("llama3_1"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert not tok.renders_template() and tok.chat_format == "llama3"
    ids, _ = tok.tokenize_messages(TURNS[:2])
    assert "Cutting Knowledge" not in tok.decode(ids, skip_special_tokens=False)


def test_chat_dataset_renders_the_template_and_skips_rows_it_refuses(family_folder, tmp_path, caplog):
    """chat_dataset on a Mistral-Nemo tokenizer: rows go through the template (labels are the
    assistant's text and </s>); a row whose roles do not alternate is skipped and counted."""
    import logging

    from tunelab.data.datasets import IGNORE_INDEX, chat_dataset

    tok = load_tokenizer(family_folder("mistral_nemo"))
    good = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    with caplog.at_level(logging.INFO, logger="tunelab"):
        ds = chat_dataset(tok, source=str(path), max_seq_len=64)
    assert len(ds) == 2 and ds.skip_reasons == {"template": 1}
    assert "1 skipped (1 refused by the chat template)" in caplog.text
    sample = ds[0]
    assert tok.decode(sample["tokens"], skip_special_tokens=False) == "<s>[INST]What is 2+2?[/INST]Four.</s>"
    assert tok.decode([t for t in sample["labels"] if t != IGNORE_INDEX], skip_special_tokens=False) == "Four.</s>"


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    cache = {}

    def make(family):
        if family not in cache:
            cache[family] = write_sentencepiece_tokenizer(tmp_path_factory.mktemp(family), family)
        return cache[family]

    return make


@pytest.mark.parametrize("family", sorted(SENTENCEPIECE_FAMILIES))
@pytest.mark.parametrize("name", ["with_system", "without_system"])
def test_sentencepiece_templates_equal_apply_chat_template(sentencepiece_folder, family, name):
    """Mistral v0.3's [INST] control tokens and Llama 2's text [INST] through a sentencepiece
    model: ids equal transformers' (its tokenizer converted from the same model, with the
    folder's ``legacy`` flag deciding the "▁" after special tokens); the assistant's trimmed
    content and </s> (with the space Llama 2 puts before it) are what is trained."""
    pytest.importorskip("google.protobuf", reason="transformers converts sentencepiece models with protobuf")
    folder = sentencepiece_folder(family)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    tok = load_tokenizer(folder)
    assert tok.renders_template()
    convo = CONVERSATIONS[name]
    text = hf.apply_chat_template(convo, tokenize=False)
    ids, mask = tok.tokenize_messages(convo)
    assert ids == hf(text, add_special_tokens=False)["input_ids"], (
        hf.convert_ids_to_tokens(hf(text, add_special_tokens=False)["input_ids"]), hf.convert_ids_to_tokens(ids))
    gap = " " if family.startswith("llama2") else ""
    eot = {"gemma3": "<end_of_turn>", "phi3_5": "<|end|>"}.get(family, "</s>")
    trims = family != "phi3_5"  # Phi's template writes the content as it is
    want = "".join((m["content"].strip() if trims else m["content"]) + gap + eot
                   for m in convo if m["role"] == "assistant")
    trained = [i for i, m in zip(ids, mask) if not m]
    # (spaces compared loosely: sentencepiece's decode drops the space a leading "▁" piece holds)
    assert tok.decode(trained, skip_special_tokens=False).replace(" ", "") == want.replace(" ", "")
