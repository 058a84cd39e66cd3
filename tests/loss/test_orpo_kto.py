"""ORPO and KTO against TRL 1.16's own trainers on a real (tiny) model and batch.

The oracle runs TRL's trainer code itself (``ORPOTrainer.get_batch_loss_metrics``) on a PEFT
model holding the same LoRA weights as ours, with the same token ids: the batch tunelab
collates, laid out the way TRL's collator does (unshifted labels, attention masks). fp32; 1e-5:
the same math, only summation orders differ.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from tunelab.data import load_tokenizer, preference_collate, preference_dataset
from tunelab.models.adapters import _hf_module, save_adapter
from tunelab.models.checkpoint import from_pretrained
from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
from tunelab.training import dpo

TINY_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "tiny" / "tokenizer.model"
TARGETS = ["q_proj", "v_proj", "down_proj"]
TOL = dict(rtol=1e-5, atol=1e-5)
CPU = torch.device("cpu")


def _pairs(tmp_path: Path) -> Path:
    rows = [{"prompt": "Name a colour.", "chosen": "Blue is a colour.", "rejected": "Seven."},
            {"prompt": "Say hello twice.", "chosen": "hello hello", "rejected": "goodbye, and a longer wrong answer"},
            {"prompt": "Reverse: a b c", "chosen": "c b a", "rejected": "a b c"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _models(ckpt, load_hf_model, tmp_path):
    """Our LoRA model (random non-zero B) and PEFT's model of the same adapter, both trainable."""
    from peft import PeftModel

    torch.manual_seed(0)  # the A matrices' kaiming init
    model = apply_lora(from_pretrained(ckpt, dtype=torch.float32), TARGETS, 4, 8.0, adapter_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in get_adapter_params(model).items():
            if name.endswith("lora_b.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    set_trainable_params(model)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(ckpt))
    peft_model = PeftModel.from_pretrained(load_hf_model(ckpt), adapter, is_trainable=True)
    return model.eval(), peft_model.eval()  # eval: no dropout anywhere


def _trl_layout(tokens: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our [rows, s] pre-shifted labels as TRL's (aligned with the input ids, -100 first)."""
    unshifted = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    return {"input_ids": tokens, "attention_mask": mask, "labels": unshifted}


def _grads_equal(model, peft_model):
    peft_params = dict(peft_model.named_parameters())
    for name, p in get_adapter_params(model).items():
        module, _, leaf = name.rpartition(".lora_")
        peft_name = f"base_model.model.{_hf_module(module, model.args)}.lora_{leaf[0].upper()}.default.weight"
        torch.testing.assert_close(p.grad, peft_params[peft_name].grad, **TOL, msg=name)


# ------------------------------------------------------------------------------ ORPO
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_equals_trl_orpo_trainer(tmp_path, make_hf_checkpoint, load_hf_model, beta):
    """``loss.type: orpo`` on a batch of 3 pairs: the loss (token-mean NLL of the chosen rows
    over prompt and response, minus beta times the mean log-sigmoid of the log odds ratio of
    length-averaged response log-probs), TRL's nll_loss, rewards and the LoRA gradients equal
    TRL's ORPOTrainer on the same model and token ids."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    ckpt = make_hf_checkpoint("llama3")
    model, peft_model = _models(ckpt, load_hf_model, tmp_path)
    tok = load_tokenizer(TINY_TOKENIZER)
    ds = preference_dataset(tok, source=_pairs(tmp_path), max_seq_len=64)
    batch = preference_collate([ds[i] for i in range(len(ds))], tok.pad_id)
    cfg = types.SimpleNamespace(loss=dpo.LossConfig(type="orpo", beta=beta, label_smoothing=0.0, gamma=0.0))
    losses, chosen, rejected, _ = dpo.pair_losses(model, batch, cfg, CPU)
    losses.mean().backward()

    b = len(ds)
    chosen_side = _trl_layout(batch["tokens"][:b], batch["labels"][:b], batch["lengths"][:b])
    rejected_side = _trl_layout(batch["tokens"][b:], batch["labels"][b:], batch["lengths"][b:])
    trl_batch = {f"{side}_{k}": v for side, d in (("chosen", chosen_side), ("rejected", rejected_side))
                 for k, v in d.items()}
    trainer = types.SimpleNamespace(
        is_encoder_decoder=False, padding_value=tok.pad_id, aux_loss_enabled=False, beta=beta,
        accelerator=types.SimpleNamespace(device=CPU, gather_for_metrics=lambda x: x))
    for method in ("concatenated_forward", "odds_ratio_loss"):
        setattr(trainer, method, types.MethodType(getattr(ORPOTrainer, method), trainer))
    trainer.concatenated_inputs, trainer.get_batch_logps = ORPOTrainer.concatenated_inputs, ORPOTrainer.get_batch_logps
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(trainer, peft_model, trl_batch)
    loss.backward()

    torch.testing.assert_close(losses.mean(), loss, **TOL)
    torch.testing.assert_close(chosen.mean().item(), metrics["rewards/chosen"], **TOL)
    torch.testing.assert_close(rejected.mean().item(), metrics["rewards/rejected"], **TOL)
    _grads_equal(model, peft_model)


def test_orpo_config_checks():
    from tunelab.errors import ConfigError

    def cfg(**loss):
        return types.SimpleNamespace(loss=dpo.LossConfig(**{"type": "orpo", "beta": 0.1, "label_smoothing": 0.0,
                                                            "gamma": 0.0, **loss}),
                                     precompute_ref_log_probs=False)

    dpo.check_loss_settings(cfg())
    with pytest.raises(ConfigError, match="label_smoothing is not used by loss.type=orpo"):
        dpo.check_loss_settings(cfg(label_smoothing=0.1))
    with pytest.raises(ConfigError, match="precompute_ref_log_probs: orpo uses no reference"):
        dpo.check_loss_settings(types.SimpleNamespace(loss=cfg().loss, precompute_ref_log_probs=True))


# ------------------------------------------------------------------------------ KTO
def _kto_rows(tmp_path: Path) -> Path:
    rows = [{"prompt": "Name a colour.", "completion": "Blue.", "label": True},
            {"prompt": "Say hello twice.", "completion": "goodbye, and a longer wrong answer", "label": False},
            {"prompt": "Reverse: a b c", "chosen": "c b a", "rejected": "a b c"}]  # a pair: unpaired into two rows
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """TRL's completion mask (1 on completion tokens) from our pre-shifted labels."""
    return torch.cat([torch.zeros_like(labels[:, :1]), (labels[:, :-1] != -100).long()], dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_equals_trl_kto_trainer(tmp_path, make_hf_checkpoint, load_hf_model, weights):
    """``loss.type: kto`` on 4 unpaired rows (2 desirable, 2 not; one pair unpaired): the KL
    estimate from the rows' mismatched completions (prompt i + completion i - 1, policy and
    reference, batch mean, clamped at 0, detached), the loss, the rewards and the LoRA
    gradients equal TRL's KTOTrainer._compute_loss on the same model and token ids."""
    from collections import defaultdict

    from trl import KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from tunelab.data import kto_collate, kto_dataset

    ckpt = make_hf_checkpoint("llama3")
    model, peft_model = _models(ckpt, load_hf_model, tmp_path)
    add_fused_lm_head(peft_model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits"))
    tok = load_tokenizer(TINY_TOKENIZER)
    ds = kto_dataset(tok, source=_kto_rows(tmp_path), max_seq_len=64)
    assert [ds[i]["desirable"] for i in range(len(ds))] == [True, False, True, False]
    batch = kto_collate([ds[i] for i in range(len(ds))], tok.pad_id, 64)
    desirable_weight, undesirable_weight = weights
    cfg = types.SimpleNamespace(loss=dpo.LossConfig(type="kto", beta=0.1, label_smoothing=0.0, gamma=0.0,
                                                    desirable_weight=desirable_weight,
                                                    undesirable_weight=undesirable_weight))
    out = dpo.pair_losses(model, batch, cfg, CPU)
    out.losses.mean().backward()
    assert out.kl > 0  # the clamp does not hide the estimate here

    b = len(ds)
    mask = (torch.arange(batch["tokens"].shape[1])[None] < batch["lengths"][:, None]).long()
    inputs = {"input_ids": batch["tokens"][:b], "attention_mask": mask[:b],
              "completion_mask": _completion_mask(batch["labels"][:b]),
              "KL_input_ids": batch["tokens"][b:], "KL_attention_mask": mask[b:],
              "KL_completion_mask": _completion_mask(batch["labels"][b:]), "label": batch["desirable"]}
    trainer = types.SimpleNamespace(
        model=peft_model, ref_model=None, precompute_ref_logps=False, calculate_KL=True, loss_type="kto", beta=0.1,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=types.SimpleNamespace(device=CPU, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m))
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    loss = KTOTrainer._compute_loss(trainer, peft_model, inputs, return_outputs=False)
    loss.backward()

    metrics = trainer._metrics["eval"]  # both models are in eval mode (no dropout)
    torch.testing.assert_close(out.losses.mean(), loss, **TOL)
    torch.testing.assert_close(out.kl.item(), metrics["kl"][0], **TOL)
    torch.testing.assert_close(out.chosen.mean().item(), metrics["rewards/chosen"][0], **TOL)
    torch.testing.assert_close(out.rejected.mean().item(), metrics["rewards/rejected"][0], **TOL)
    _grads_equal(model, peft_model)


def test_kto_rows_and_their_kl_rows(tmp_path):
    """kto_collate: the b rows, then prompt i + the completion of row i - 1 (cyclic), scored on
    that completion only; a too long KL row is cut to max_seq_len."""
    from tunelab.data import kto_collate, kto_dataset

    tok = load_tokenizer(TINY_TOKENIZER)
    ds = kto_dataset(tok, source=_kto_rows(tmp_path), max_seq_len=64)
    items = [ds[i] for i in range(len(ds))]
    batch = kto_collate(items, tok.pad_id, 64)
    for i, item in enumerate(items):
        other = items[i - 1]
        kl = batch["tokens"][len(items) + i, : batch["lengths"][len(items) + i]].tolist()
        assert kl == item["tokens"][: item["prompt_len"]] + other["tokens"][other["prompt_len"]:]
        scored = [t for t, y in zip(kl[1:], batch["labels"][len(items) + i].tolist()) if y != -100]
        assert scored == [t for t, y in zip(other["tokens"][1:], other["labels"]) if y != -100]
    short = kto_collate(items, tok.pad_id, 12)
    assert int(short["lengths"][len(items):].max()) <= 12
