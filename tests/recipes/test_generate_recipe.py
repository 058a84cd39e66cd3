"""generate recipe: JSON output, and greedy ids equal to transformers' generate."""

import json

import torch

from tunelab.recipes import generate as recipe


def _argv(ckpt, rt, *extra):
    return ["--config", "generate", f"checkpoint_dir={ckpt}", f"tokenizer={rt.TINY_TOKENIZER}", "device=cpu",
            "chat=false", "max_new_tokens=12", *extra]


def test_greedy_matches_transformers_and_writes_json(tmp_path, make_hf_checkpoint, load_hf_model, rt, capsys):
    ckpt = make_hf_checkpoint("llama3_1")
    out_file = tmp_path / "gen" / "out.json"
    result = recipe.main(_argv(ckpt, rt, "prompt=The river and the stone", f"output_file={out_file}"))
    saved = json.loads(out_file.read_text())
    assert saved == result and set(saved) == {"prompt", "completion", "prompt_token_ids", "token_ids", "stop_reason"}
    assert saved["prompt"] == "The river and the stone"
    assert saved["completion"] in capsys.readouterr().out

    from tunelab.data.tokenizers import load_tokenizer

    tok = load_tokenizer(rt.TINY_TOKENIZER)
    hf = load_hf_model(ckpt)
    prompt = torch.tensor([saved["prompt_token_ids"]])
    with torch.no_grad():
        ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                          eos_token_id=list(tok.stop_tokens), pad_token_id=tok.pad_id)
    expected = [t for t in ids[0, prompt.shape[1]:].tolist() if t not in tok.stop_tokens]
    assert saved["token_ids"] == expected


def test_chat_prompt_and_adapter(tmp_path, make_hf_checkpoint, rt):
    """chat=true wraps the prompt in the chat format; an adapter changes the model."""
    from tunelab.data.tokenizers import Message, load_tokenizer
    from tunelab.models import from_pretrained
    from tunelab.models.adapters import save_adapter
    from tunelab.modules.peft import apply_lora

    ckpt = make_hf_checkpoint("llama3")
    tok = load_tokenizer(rt.TINY_TOKENIZER)
    chat = recipe.main(_argv(ckpt, rt, "chat=true", "prompt=hi"))
    expected_prompt, _ = tok.tokenize_messages([Message(role="user", content="hi")], add_generation_prompt=True)
    assert chat["prompt_token_ids"] == expected_prompt

    model = apply_lora(from_pretrained(ckpt), ["q_proj", "v_proj", "output"], rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(ckpt))
    plain = recipe.main(_argv(ckpt, rt, "prompt=hi"))
    adapted = recipe.main(_argv(ckpt, rt, "prompt=hi", f"adapter_dir={tmp_path / 'adapter'}"))
    assert plain["token_ids"] != adapted["token_ids"]


def test_says_why_it_stopped_and_shows_the_prompt_as_seen(tmp_path, make_hf_checkpoint, rt, capsys):
    """The prompt is echoed with its special tokens; the stop reason names max_new_tokens, a stop
    string (the completion cut before it) or the stop token; an empty completion names its cause."""
    from tunelab.data.tokenizers import load_tokenizer
    from tunelab.modules.generation import Generated

    ckpt = make_hf_checkpoint("llama3_1")
    full = recipe.main(_argv(ckpt, rt, "prompt=The river and the stone"))
    err = capsys.readouterr().err
    assert "prompt, as the model sees it (" in err and "<|begin_of_text|>The river and the stone" in err
    assert full["stop_reason"] == "stopped: max_new_tokens=12 reached" and len(full["token_ids"]) == 12

    cut = full["completion"][3:6]  # a piece of the greedy completion: generation ends there
    stopped = recipe.main(_argv(ckpt, rt, "prompt=The river and the stone", f"stop_strings=[{cut!r}]"))
    assert stopped["stop_reason"].startswith(f"stopped: a stop string ({cut!r}) after ")
    assert stopped["completion"] == full["completion"][: full["completion"].find(cut)]

    tok = load_tokenizer(rt.TINY_TOKENIZER)
    eot = tok.special_id("<|eot_id|>")
    cfg = recipe.parse_recipe_args(_argv(ckpt, rt, "prompt=x"), recipe.RecipeConfig)
    assert recipe.stop_reason(tok, Generated([5, 6], "stop_token", eot), cfg) == (
        f"stopped: stop token '<|eot_id|>' (id {eot}) after 2 tokens")
    assert recipe.empty_cause(tok, Generated([], "stop_token", eot)).startswith(
        "nothing generated: the first token drawn was the stop token")
    header = tok.special_id("<|start_header_id|>")
    assert "decode to no visible text: '<|start_header_id|>'" in recipe.empty_cause(tok, Generated([header], "x"))
