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
    losses, chosen, rejected = dpo.pair_losses(model, batch, cfg, CPU)
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
