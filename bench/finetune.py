"""The performance.md workload through the real recipe: ``lora_finetune_single_device.main``.

Unlike ``lora_step.py`` (the step alone), this runs the shipped 8B config end to end with
overrides: a random Llama-3.1-8B-shaped checkpoint (written once per machine into the cache
folder; no download is possible on the GPU box, and compute and memory equal the real
model's), a generated dataset, ``max_steps = warmup + steps``, ``log_every_n_steps=1``. Each
logged step's ``tokens_per_s`` (real tokens only: packed rows do not count their padding
tail) comes from metrics.jsonl; the result is the median over the timed steps, the peak is the
recipe's own ``peak_mem_gib`` (torch.cuda.max_memory_allocated since the start of the run).

Profiles (``--profile``):
  lean     the 8B LoRA config as shipped (checkpointing + compile + offload_activations), 2 x 2048 tokens
  eager    lean without compile
  offload  lean + offload_activations (the shipped default since the 8B configs turned it on)
  no_offload  lean without offload_activations
  fast     compile, no activation checkpointing
  qlora    the 8B QLoRA config as shipped (NF4 base, compile + offload_activations)
  packed   lean with packing on alpaca-like lengths (log-normal, median ~200 tokens, 40-2048)
  long     the long-context QLoRA config as shipped (llama3_1/8B_qlora_long_context), batch 1:
           give the row length with --seq (rows of exactly that many tokens, one per step)
  graph, offload_graph, qlora_graph, qlora_offload_graph, packed_graph: the same with
           cuda_graph=true (QLoRA ones also compiled)

    python bench/finetune.py --profile lean                 # GPU
    python bench/finetune.py --profile long --seq 131072 --batch 1 --workload qlora_1x131k --run-id R
    python bench/finetune.py --shape tiny --steps 2 --warmup 1 --profile packed   # CPU smoke
    Env: TUNELAB_BENCH_CACHE (default /tmp/tunelab-bench), BENCH_OUT (append the line there too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from tunelab.models import save_pretrained
from tunelab.recipes import lora_finetune_single_device as recipe
from tunelab.training.builtin import tiny_data_dir
from tunelab.training.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py (see its docstring)
from _common import device_name, emit, random_model  # noqa: E402

PROFILES = {
    "lean": ("llama3_1/8B_lora_single_device", []),
    "eager": ("llama3_1/8B_lora_single_device", ["compile=false"]),
    "offload": ("llama3_1/8B_lora_single_device", ["offload_activations=true"]),
    "no_offload": ("llama3_1/8B_lora_single_device", ["offload_activations=false"]),
    "fast": ("llama3_1/8B_lora_single_device", ["activation_checkpointing=false"]),
    "qlora": ("llama3_1/8B_qlora_single_device", []),
    "packed": ("llama3_1/8B_lora_single_device", ["packing=true"]),
    "graph": ("llama3_1/8B_lora_single_device", ["cuda_graph=true"]),
    "offload_graph": ("llama3_1/8B_lora_single_device", ["offload_activations=true", "cuda_graph=true"]),
    "qlora_graph": ("llama3_1/8B_qlora_single_device", ["compile=true", "cuda_graph=true"]),
    "qlora_offload_graph": ("llama3_1/8B_qlora_single_device", ["compile=true", "offload_activations=true",
                                                                "cuda_graph=true"]),
    "packed_graph": ("llama3_1/8B_lora_single_device", ["packing=true", "cuda_graph=true"]),
    # the bench's rows are all max_seq_len long already: one per step, nothing to pack
    "long": ("llama3_1/8B_qlora_long_context", ["packing=false"]),
}
# overrides that only fit the config to the bench's data and shape: a profile with none besides
# these runs the config "as shipped" (result lines say shipped: true)
SHAPE_ONLY = {"long": ["packing=false"]}
WORDS = [f"w{i}" for i in range(300)]


def random_checkpoint(shape: str, cache: Path) -> Path:
    """A random bf16 checkpoint folder of the shape, written once (built on the GPU if any)."""
    folder = cache / f"random-{shape}"
    if (folder / "config.json").is_file():
        return folder
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(shape, device, torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    save_pretrained(model, tmp)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tmp.rename(folder)  # complete folders only
    return folder


def write_dataset(path: Path, packed: bool, rows: int, seq: int) -> None:
    """Dense: texts longer than ``seq`` tokens (truncated to exactly ``seq``). Packed: alpaca-like
    instruction rows whose lengths follow a log-normal distribution."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            if packed:
                n = min(max(int(rng.lognormvariate(5.3, 0.7)), 40), seq)  # total tokens, median ~200
                k = max(n // 3, 1)  # a third instruction, the rest response
                row = {"instruction": " ".join(rng.choices(WORDS, k=k)), "input": "",
                       "output": " ".join(rng.choices(WORDS, k=n - k))}
            else:
                row = {"text": " ".join(rng.choices(WORDS, k=seq * 2))}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="lean")
    ap.add_argument("--shape", choices=["8b", "tiny"], default="8b")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, help="tokens per row (default 2048 for 8b, 64 for tiny)")
    ap.add_argument("--batch", type=int, help="rows per step (default 2; the long profile 1)")
    ap.add_argument("--workload", help="the result line's workload name (e.g. qlora_1x32k)")
    ap.add_argument("--run-id", default=os.environ.get("BENCH_RUN_ID", ""),
                    help="one id shared by every line of one device call (default $BENCH_RUN_ID)")
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides (the line is then not 'shipped')")
    args = ap.parse_args()

    cache = Path(os.environ.get("TUNELAB_BENCH_CACHE", "/tmp/tunelab-bench"))
    cache.mkdir(parents=True, exist_ok=True)
    config, overrides = PROFILES[args.profile]
    overrides = [*overrides, *args.extra]
    seq = args.seq or (2048 if args.shape == "8b" else 64)
    batch = args.batch or (1 if args.profile == "long" else 2)
    packed = args.profile.startswith("packed")
    total_steps = args.warmup + args.steps
    data = cache / f"data-{'packed' if packed else 'dense'}-{seq}.jsonl"
    if not data.is_file():  # packed rows average ~200 tokens: enough for 10 rows of 2048 per step
        write_dataset(data, packed, rows=(40 if packed else 1) * batch * total_steps * 2, seq=seq)
    out = Path(tempfile.mkdtemp(prefix=f"run-{args.profile}-", dir=cache))
    dataset = (["dataset._component_=tunelab.data.instruct_dataset"] if packed else
               ["dataset._component_=tunelab.data.text_completion_dataset"])
    argv = ["--config", config, f"checkpoint_dir={random_checkpoint(args.shape, cache)}",
            f"tokenizer={tiny_data_dir() / 'tokenizer.model'}", f"output_dir={out}", *dataset,
            f"dataset.source={data}", f"max_seq_len={seq}", f"batch_size={batch}", "gradient_accumulation_steps=1",
            f"max_steps={total_steps}", "log_every_n_steps=1", "save_merged=never", "validation=null",
            "lr_scheduler.warmup_steps=1", *overrides]
    if args.shape == "tiny":
        argv += ["dtype=fp32", "compile=false"]
    recipe.main(argv)

    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    timed = [r for r in rows if r["step"] > args.warmup]
    quantized = "qlora" in config
    host = torch.cuda.host_memory_stats() if torch.cuda.is_available() else {}
    host_peak = host.get("reserved_bytes.peak") or host.get("allocated_bytes.peak")
    emit({
        "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "torch": torch.__version__,
        "system": "tunelab",
        "workload": args.workload or f"{'qlora' if quantized else 'lora'}_{batch}x{seq}",
        "run_id": args.run_id,
        "shipped": overrides == SHAPE_ONLY.get(args.profile, []),
        "max_seq_len": seq,
        "bench": "finetune",
        "profile": f"recipe_{args.profile}",
        "config": f"{args.shape} {config} bs{batch} seq{seq} {' '.join(overrides) or 'defaults'} (recipe main)",
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
        "peak_gib": round(max(r.get("peak_mem_gib") or 0.0 for r in rows), 2) or None,
        "host_gib": round(host_peak / 2**30, 2) if host_peak else None,  # pinned host memory (offload)
        "cap_gib": (round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
                    if torch.cuda.is_available() else None),
        "loss": round(timed[-1]["loss"], 4),
        "steps": args.steps,
    })


if __name__ == "__main__":
    main()
