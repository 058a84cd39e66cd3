"""generate(): greedy decoding vs transformers, stop tokens, sampling options."""

from __future__ import annotations

import pytest
import torch

from tunelab.models import from_pretrained
from tunelab.modules.generation import generate, sample_next_token


@pytest.mark.parametrize("kind", ["llama3_1", "gemma3", "qwen2", "phi3_longrope", "gpt_oss"])
def test_greedy_matches_transformers(make_hf_checkpoint, load_hf_model, kind):
    """llama3_1: past original_max_position_embeddings (64); gemma3: past its window (16), so
    the cached decoding runs the sliding layers' window mask and local RoPE; phi3_longrope:
    decoding steps past 32 positions switch to the long factors, as transformers' do."""
    path = make_hf_checkpoint(kind)
    native, hf = from_pretrained(path), load_hf_model(path)
    prompt = torch.randint(3, 1024, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    n = 70
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0
        )[0, len(prompt):].tolist()
    assert generate(native, prompt, max_new_tokens=n) == ref
    assert not native.caches_are_enabled()  # generate cleans up the caches it made

    # A stop token ends generation and is not returned.
    stop = ref[5]
    out = generate(native, prompt, max_new_tokens=n, stop_tokens=[stop])
    assert out == ref[: ref.index(stop)]


def test_sampling_is_reproducible_and_filters(make_hf_checkpoint):
    native = from_pretrained(make_hf_checkpoint("llama3"))
    prompt = [1, 10, 20, 30]
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(native, prompt, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(native, prompt, generator=torch.Generator().manual_seed(0), **kw)
    assert a == b and len(a) == 12
    # top_k=1 is greedy whatever the temperature.
    greedy = generate(native, prompt, max_new_tokens=12)
    assert generate(native, prompt, max_new_tokens=12, temperature=2.0, top_k=1) == greedy


def test_sample_next_token_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    seen = {sample_next_token(logits, temperature=1.0, top_p=0.7, generator=gen) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is cut
    assert sample_next_token(logits) == 0


def _greedy_without_cache(model, prompt, n, stop):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            if nxt in stop:
                break
    return ids[len(prompt):]


def test_group_generation_greedy_equals_generation_without_cache(make_hf_checkpoint):
    """generate_group at temperature 0: every row is the greedy continuation computed with full
    forwards and no cache (the stop id kept, padding after it); sampling is reproducible from
    the generator and the rows differ."""
    from tunelab.models import from_pretrained
    from tunelab.modules.generation import generate_group

    model = from_pretrained(make_hf_checkpoint("llama3")).eval()
    prompt = [1, 17, 243, 5, 99]
    want = _greedy_without_cache(model, prompt, 12, stop=())
    out, lengths = generate_group(model, prompt, 3, max_new_tokens=12, temperature=0.0)
    assert out.shape == (3, 12) and lengths.tolist() == [12] * 3
    assert all(row == want for row in out.tolist())
    stop = want[4]  # a stop id the greedy path draws at step 5
    out, lengths = generate_group(model, prompt, 2, max_new_tokens=12, temperature=0.0, stop_tokens=[stop])
    assert lengths.tolist() == [5, 5] and out[0, :5].tolist() == want[:5] and out.shape[1] == 5
    a = generate_group(model, prompt, 4, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate_group(model, prompt, 4, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and len({tuple(r) for r in a[0].tolist()}) > 1
    assert not model.caches_are_enabled()
