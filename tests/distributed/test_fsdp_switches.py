"""The FSDP switches of ``shard_model``: ``fsdp.prefetch_layers`` (same numbers, the all-gathers
issued k layers ahead) and ``fsdp.shard_frozen`` (same numbers, the frozen base replicated),
and the config keys in both distributed recipes.

The model-level test launches THIS file under torchrun (2 CPU ranks, gloo; ``worker`` below):
one process group builds the sharded LoRA model through the recipes' ``setup_sharded_model``
once per switch setting and runs the recipes' step pattern on it (activation checkpointing, a
no-grad adapters-off forward first as DPO's reference, gradient accumulation 2 with
``set_requires_gradient_sync``, AdamW), recording losses, the gathered adapter and the order
in which all-gathers are issued relative to the layers' compute.

Tolerance: exact (``torch.equal``). Prefetching only moves when an all-gather is issued, not
what it gathers nor the order of any arithmetic: on CPU the all-gather is a copy and the
reduce of the two ranks' gradients adds the same two numbers in the same order, so any
difference at all would be a bug (e.g. a layer computing with stale gathered weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

N_LAYERS = 4  # > 1 + the largest prefetch tested, so k = 1 and k = 2 differ
# (reshard_after_forward, prefetch_layers, shard_frozen); the first is the default behaviour, the baseline
SETTINGS = [(True, 0, True), (True, 1, True), (True, 2, True), (False, 0, True), (False, 2, True), (True, 1, False)]
# the head too (as tiny/dpo_distributed): the root then has adapters to reduce as well
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "output"]


# ------------------------------------------------------------------------ torchrun worker
def _run_setting(ckpt: str, args, device, reshard: bool, prefetch: int, shard_frozen: bool) -> dict:
    """Build the sharded model with one switch setting, train 3 steps, return what rank 0 saw."""
    from types import SimpleNamespace

    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.tensor import DTensor

    from tunelab.modules.peft import disable_adapters, get_adapter_params
    from tunelab.training import process_group, sharded_io, spine

    cfg = SimpleNamespace(
        lora=SimpleNamespace(rank=8, alpha=16, dropout=0.0, targets=TARGETS, use_dora=False), quantize=None,
        activation_checkpointing=True, checkpoint_dir=ckpt, mlp_tile_tokens=None, offload_host_gib=None,
        fsdp=SimpleNamespace(reshard_after_forward=reshard, cpu_offload=False, prefetch_layers=prefetch,
                             shard_frozen=shard_frozen))
    torch.manual_seed(0)  # the LoRA init draws from it, as in the recipes
    model = spine.build_sharded_model(cfg, args, device, torch.float32, compile_layers=False)
    params = list(get_adapter_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-2)

    # event log of (phase, "ag", layer) when a layer's all-gather is issued and (phase, "compute",
    # layer) when its forward (or its recompute in backward) starts, only while a phase is set.
    # FSDP2 has no public "all-gather issued" hook: this wraps FSDPParamGroup.unshard (private)
    log: list[tuple[str, str, int]] = []
    phase = {"name": None}
    unshard = FSDPParamGroup.unshard

    def logged_unshard(group, *a, **kw):
        issued_before = group._all_gather_result is not None or group.is_unsharded
        unshard(group, *a, **kw)
        fqn = group._module_fqn or ""
        if phase["name"] and not issued_before and group._all_gather_result is not None and fqn.startswith("layers."):
            log.append((phase["name"], "ag", int(fqn.split(".")[1])))

    for i, layer in enumerate(model.layers):
        layer.attn_norm.register_forward_pre_hook(
            lambda m, a, i=i: log.append((phase["name"], "compute", i)) if phase["name"] else None)

    losses, resharded = [], []
    FSDPParamGroup.unshard = logged_unshard
    try:
        for step in range(3):
            for micro in range(2):
                g = torch.Generator().manual_seed(100 * step + 10 * micro + process_group.rank())
                tokens = torch.randint(1, args.vocab_size, (2, 16), generator=g)
                labels = torch.randint(1, args.vocab_size, (2, 16), generator=g)
                record = step == 1 and micro == 0  # steady state: after FSDP's lazy init
                phase["name"] = "ref" if record else None
                with torch.no_grad(), disable_adapters(model):
                    model(tokens)  # like DPO's reference: every layer runs, no backward follows
                phase["name"] = "fwd" if record else None
                model.set_requires_gradient_sync(micro == 1)
                logits = model(tokens)  # (b, s, vocab)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
                phase["name"] = "bwd" if record else None
                loss.backward()
                phase["name"] = None
                losses.append(process_group.all_reduce_sum([loss.item()], device)[0])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # every layer back to its shard: a prefetched layer left gathered would compute the
            # next step with stale (pre-step) weights (frozen weights left out of FSDP are plain)
            resharded.append(all(isinstance(p, DTensor) == (p.requires_grad or shard_frozen)
                                 for p in model.parameters()))
    finally:
        FSDPParamGroup.unshard = unshard
    adapter = sharded_io.gather_full_state(model, trainable_only=True)
    return {"losses": losses, "adapter": adapter, "log": log, "resharded": resharded}


def _saved_dtypes_after_no_grad_forward(ckpt: str, args, device) -> dict | None:
    """bf16 mixed precision, nothing resharded after forward: a no-grad forward (an eval before
    the final save) leaves the gathered bf16 compute copies in place; the saved adapter must
    still be the fp32 master weights."""
    from types import SimpleNamespace

    from tunelab.training import sharded_io, spine

    cfg = SimpleNamespace(
        lora=SimpleNamespace(rank=4, alpha=8, dropout=0.0, targets=TARGETS, use_dora=False), quantize=None,
        activation_checkpointing=False, checkpoint_dir=ckpt, mlp_tile_tokens=None, offload_host_gib=None,
        fsdp=SimpleNamespace(reshard_after_forward=False, cpu_offload=False, prefetch_layers=0, shard_frozen=True))
    model = spine.build_sharded_model(cfg, args, device, torch.bfloat16, compile_layers=False)
    with torch.no_grad():
        model(torch.randint(1, args.vocab_size, (1, 8)))
    adapter = sharded_io.gather_full_state(model, trainable_only=True)
    return None if adapter is None else {name: t.dtype for name, t in adapter.items()}


def worker(ckpt: str, out: str) -> None:
    """torchrun entry: every setting of SETTINGS on one process group; rank 0 saves the results."""
    from tunelab.models.checkpoint import read_hf_config
    from tunelab.models.hf_config import args_from_hf_config
    from tunelab.training import process_group

    device = process_group.init_distributed("cpu", timeout_s=60, recipe="test_fsdp_switches")
    args = args_from_hf_config(read_hf_config(ckpt))
    results = {setting: _run_setting(ckpt, args, device, *setting) for setting in SETTINGS}
    results["bf16_after_no_grad_forward"] = _saved_dtypes_after_no_grad_forward(ckpt, args, device)
    if process_group.is_rank0():
        torch.save(results, out)
    process_group.destroy_distributed()


# ------------------------------------------------------------------------ helpers
def _leads(log: list[tuple[str, str, int]], phase: str) -> dict[int, int]:
    """For each layer gathered in ``phase``: how many other layers computed between the issue
    of its all-gather and its own compute (0 = issued just before it was needed)."""
    events = [(kind, i) for p, kind, i in log if p == phase]
    computes = [pos for pos, (kind, _) in enumerate(events) if kind == "compute"]
    leads = {}
    for pos, (kind, i) in enumerate(events):
        if kind == "ag":
            own = next(c for c in computes if c > pos and events[c][1] == i)
            leads[i] = sum(1 for c in computes if pos < c < own)
    return leads


# ------------------------------------------------------------------------ tests
def test_prefetch_keeps_numbers_exact_and_gathers_k_layers_ahead(tmp_path, make_hf_checkpoint, dt):
    """2 ranks, LoRA + activation checkpointing + accumulation 2 + a no-grad reference forward:
    prefetch_layers 1 and 2 (reshard_after_forward true and false), and the frozen base left
    out of FSDP (shard_frozen false: every rank a plain whole copy, only the adapters sharded),
    give exactly the losses and adapter of prefetch 0 (reshard true, the default), every layer is sharded again after
    each step, and the all-gathers are issued k layers ahead in forward and in backward. Also:
    a save after a no-grad forward gathers the fp32 adapter, not bf16 compute copies."""
    ckpt = make_hf_checkpoint("llama3", num_hidden_layers=N_LAYERS)
    out = tmp_path / "results.pt"
    run = dt.torchrun(2, Path(__file__), str(ckpt), str(out), timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(out, weights_only=False)

    saved = results.pop("bf16_after_no_grad_forward")
    assert saved and set(saved.values()) == {torch.float32}, saved  # not the bf16 compute copies
    base = results[(True, 0, True)]
    assert len(base["losses"]) == 6 and len(set(base["losses"])) == 6  # it trained: every loss differs
    for setting in SETTINGS:
        r = results[setting]
        assert r["resharded"] == [True, True, True], setting
        assert r["losses"] == base["losses"], setting
        assert set(r["adapter"]) == set(base["adapter"])
        for name, t in r["adapter"].items():
            assert torch.equal(t, base["adapter"][name]), (setting, name)

    last = N_LAYERS - 1
    for (reshard, k, _), r in results.items():
        # forward: layer j's all-gather is issued before layer j - k computes (the root starts
        # the chain); k = 0: right before its own compute. Without resharding, the reference
        # forward leaves every layer gathered, so the training forward that follows gathers none.
        ahead = {j: min(j, k) for j in range(N_LAYERS)}
        assert _leads(r["log"], "ref") == ahead, (reshard, k)
        assert _leads(r["log"], "fwd") == (ahead if reshard else {}), (reshard, k)
        if reshard:
            # backward: layer i is gathered again while the k layers above it compute (recompute
            # + backward); FSDP2's own order (k = 0) already gathers one layer ahead
            expected = {i: min(last - i, max(k, 1)) for i in range(N_LAYERS)}
            assert _leads(r["log"], "bwd") == expected, (reshard, k)
        else:
            assert _leads(r["log"], "bwd") == {}, k  # kept gathered from forward: nothing to gather


@pytest.mark.parametrize("recipe_name,config", [("lora_finetune_distributed", "tiny/lora_distributed"),
                                                ("lora_dpo_distributed", "tiny/dpo_distributed")])
def test_recipes_take_prefetch_layers_and_refuse_negative(recipe_name, config, tmp_path, monkeypatch):
    """Both recipes parse fsdp.prefetch_layers; a negative value fails before any launch with
    one line naming the key."""
    import importlib

    from tunelab.errors import ConfigError
    from tunelab.training.config import parse_recipe_args

    recipe = importlib.import_module(f"tunelab.recipes.{recipe_name}")
    cfg = parse_recipe_args(["--config", config, f"output_dir={tmp_path}", "fsdp.prefetch_layers=2"],
                            recipe.RecipeConfig)
    assert cfg.fsdp.prefetch_layers == 2
    assert parse_recipe_args(["--config", config], recipe.RecipeConfig).fsdp.prefetch_layers == 0  # default off

    for var in ("RANK", "WORLD_SIZE"):  # not under torchrun: the settings check comes before that one
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError) as err:
        recipe.main(["--config", config, f"output_dir={tmp_path}", "fsdp.prefetch_layers=-1"])
    message = str(err.value)
    assert "fsdp.prefetch_layers" in message and "-1" in message and "\n" not in message


if __name__ == "__main__":  # torchrun runs this file as the worker of the first test
    worker(*sys.argv[1:3])
