"""Bad input to the LoRA recipe fails before any work with one line naming the fix."""

import subprocess
import sys

import pytest

from tunelab.errors import CheckpointError, ConfigError, DataError, TunelabError
from tunelab.recipes import lora_finetune_single_device as recipe


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg.strip(), msg
    return msg


def test_missing_checkpoint_dir(tmp_path, small_jsonl, rt):
    with pytest.raises(CheckpointError) as info:
        recipe.main(rt.lora_argv(tmp_path / "nope", tmp_path / "out", small_jsonl))
    assert "checkpoint_dir" in _one_line(info.value) and "does not exist" in str(info.value)


def test_dataset_without_usable_rows(tmp_path, make_hf_checkpoint, rt):
    data = rt.write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"instruction": "", "input": "", "output": ""}])
    with pytest.raises(DataError) as info:
        recipe.main(rt.lora_argv(make_hf_checkpoint("llama3"), tmp_path / "out", data))
    _one_line(info.value)


def test_dataset_smaller_than_one_step(tmp_path, make_hf_checkpoint, rt):
    data = rt.write_jsonl(tmp_path / "few.jsonl", rt.alpaca_rows(3))
    with pytest.raises(DataError, match="batch_size x gradient_accumulation_steps") as info:
        recipe.main(rt.lora_argv(make_hf_checkpoint("llama3"), tmp_path / "out", data))
    _one_line(info.value)


def test_unknown_key_and_wrong_type(tmp_path, small_jsonl, make_hf_checkpoint, rt):
    ckpt = make_hf_checkpoint("llama3")
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        recipe.main(rt.lora_argv(ckpt, tmp_path / "out", small_jsonl, "batch_sise=2"))
    with pytest.raises(ConfigError, match="batch_size") as info:
        recipe.main(rt.lora_argv(ckpt, tmp_path / "out", small_jsonl, "batch_size=lots"))
    _one_line(info.value)
    with pytest.raises(ConfigError, match="save_merged"):
        recipe.main(rt.lora_argv(ckpt, tmp_path / "out", small_jsonl, "save_merged=sometimes"))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be >= 1"):
        recipe.main(rt.lora_argv(ckpt, tmp_path / "out", small_jsonl, "gradient_accumulation_steps=0"))
    with pytest.raises(ConfigError, match="quantize"):
        recipe.main(rt.lora_argv(ckpt, tmp_path / "out", small_jsonl, "quantize=nf8"))
    with pytest.raises(ConfigError, match="activation_checkpointing: -2 is negative") as info:
        recipe.main(rt.lora_argv(ckpt, tmp_path / "out", small_jsonl, "activation_checkpointing=-2"))
    _one_line(info.value)


def test_output_dir_not_writable(tmp_path, small_jsonl, make_hf_checkpoint, rt):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a file where a folder should be (root ignores chmod, this is not)
    with pytest.raises(ConfigError, match="not writable") as info:
        recipe.main(rt.lora_argv(make_hf_checkpoint("llama3"), blocker / "out", small_jsonl))
    assert "output_dir" in _one_line(info.value)


def test_never_overwrites_finished_work(tmp_path, small_jsonl, make_hf_checkpoint, rt):
    ckpt = make_hf_checkpoint("llama3")
    argv = rt.lora_argv(ckpt, tmp_path / "out", small_jsonl, "max_steps=1", "save_merged=never")
    recipe.main(argv)
    before = (tmp_path / "out" / "step_1" / "state" / "trainable.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="resume=true") as info:
        recipe.main(argv)
    _one_line(info.value)
    assert (tmp_path / "out" / "step_1" / "state" / "trainable.safetensors").read_bytes() == before


def test_cli_prints_one_line_and_exits_1(tmp_path, small_jsonl, rt):
    """Through the script entry point: no traceback, one ``error:`` line, exit code 1."""
    proc = subprocess.run(
        [sys.executable, str(rt.LORA_RECIPE), *rt.lora_argv(tmp_path / "nope", tmp_path / "out", small_jsonl)],
        capture_output=True, text=True, env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"}, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint_dir"), proc.stderr
    assert issubclass(CheckpointError, TunelabError)


def test_cuda_graph_with_dropout(tmp_path, small_jsonl, make_hf_checkpoint, rt):
    argv = rt.lora_argv(make_hf_checkpoint("llama3"), tmp_path / "out", small_jsonl, "cuda_graph=true",
                        "lora.dropout=0.1")
    with pytest.raises(ConfigError, match="lora.dropout: 0") as info:
        recipe.main(argv)
    _one_line(info.value)
