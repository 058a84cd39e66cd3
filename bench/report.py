"""The README's speed tables, generated from bench/results/*.jsonl (never typed by hand).

    python bench/report.py            # print the tables
    python bench/report.py --write    # replace the README section between the bench markers

For each profile the newest line (last in its file) counts. Throughput is also given as a
fraction of the workload's physical limit from ../shared/docs/performance.md (bf16 GEMM peak of
the H200): 24.5k tok/s without activation recompute, 16.5k with full recompute (the limit of
the profile's own mode). tests/test_readme_tables.py keeps the README in sync with this output.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START, END = "<!-- bench:start (bench/report.py --write) -->", "<!-- bench:end -->"
LIMIT_NO_RECOMPUTE, LIMIT_RECOMPUTE = 24_500, 16_500

R, N = LIMIT_RECOMPUTE, LIMIT_NO_RECOMPUTE
# (profile, label, the physical limit of its mode; None where the limit above does not apply:
# DPO adds a reference forward per step) in table order
SINGLE_GPU = [
    ("lora_lean", "tunelab LoRA, checkpointing + compile", R),
    ("lora_lean_eager", "tunelab LoRA, same, eager", R),
    ("lora_lean_offload", "tunelab LoRA, checkpointing + compile + offload_activations (fits 16.7 GiB)", R),
    ("lora_lean_graph", "tunelab LoRA, checkpointing + compile + the step as one CUDA graph", R),
    ("lora_lean_offload_graph", "tunelab LoRA, checkpointing + compile + offload_activations + CUDA graph", R),
    ("lora_fast", "tunelab LoRA fast (compile, no checkpointing)", N),
    ("lora_fast_graph", "tunelab LoRA fast + CUDA graph", N),
    ("qlora_lean", "tunelab QLoRA (NF4, checkpointing, eager)", R),
    ("qlora_lean_offload", "tunelab QLoRA + offload_activations (fits 7.0 GiB)", R),
    ("qlora_lean_compile", "tunelab QLoRA, compiled per layer", R),
    ("qlora_lean_compile_offload", "tunelab QLoRA, compiled + offload_activations", R),
    ("qlora_lean_compile_graph", "tunelab QLoRA, compiled + CUDA graph", R),
    ("qlora_lean_compile_offload_graph", "tunelab QLoRA, compiled + offload_activations + CUDA graph", R),
    ("recipe_lean", "tunelab recipe end to end (bench/finetune.py), 8B LoRA config as shipped at that commit", R),
    ("recipe_offload", "tunelab recipe, + offload_activations", R),
    ("recipe_packed", "tunelab recipe, packed alpaca-like rows (real tokens only)", R),
    ("recipe_graph", "tunelab recipe, 8B LoRA config as shipped then + cuda_graph: true", R),
    ("recipe_packed_graph", "tunelab recipe, packed rows + cuda_graph: true", R),
    ("recipe_offload_graph", "tunelab recipe, 8B LoRA config + offload_activations + cuda_graph: true", R),
    ("recipe_qlora_offload_graph", "tunelab recipe, 8B QLoRA config + compile + offload + cuda_graph", R),
    ("dpo_lean", "tunelab DPO, 2 pairs x (512 + 512) tokens per step", None),
    ("peer_hf_lora", "HF transformers + PEFT", R),
    ("peer_unsloth_lora", "Unsloth 2026.10.9 LoRA", R),
    ("peer_unsloth_qlora", "Unsloth 2026.10.9 QLoRA", R),
    ("peer_torchtune_lora_compile", "torchtune 0.6.1 + compile", R),
    ("peer_torchtune_lora_compile_no_ac", "torchtune 0.6.1 + compile, no checkpointing", N),
    ("peer_trl_dpo", "TRL 1.15 DPOTrainer + PEFT", None),
]
FSDP = [("fsdp_lora_8b_ac", "8B"), ("fsdp_lora_8b_ac_compile", "8B, compiled layers"),
        ("fsdp_lora_8b_ac_replicated_compile", "8B, compiled layers, fsdp.shard_frozen: false (base whole on each GPU)"),
        ("fsdp_lora_70b_ac", "70B shape (80 layers)"),
        ("fsdp_qlora_70b_ac_replicated", "70B-shape QLoRA (NF4 base whole on each GPU, eager)"),
        ("peer_torchtune_fsdp_lora_8b_ac", "torchtune 0.6.1 8B")]


def load(pattern: str) -> list[dict]:
    rows = []
    for path in sorted(RESULTS.glob(pattern)):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def newest(rows: list[dict], **match) -> dict | None:
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return hits[-1] if hits else None


def _commit(row: dict) -> str:
    return row.get("commit") or "peer"


def _label(label: str, row: dict) -> str:
    """A peer row says where its figure comes from: measured beside tunelab in one device call
    (``same_run_as``: that call's tunelab commit) or copied from the shared notes (``source``)."""
    if row.get("same_run_as"):
        return f"{label} (same run as {row['same_run_as']})"
    if row.get("source"):
        return f"{label} (shared notes)"
    return label


def single_gpu_table(rows: list[dict]) -> list[str]:
    lines = ["| system / profile | tokens/s | peak GiB | of the limit | commit |", "|---|---|---|---|---|"]
    for profile, label, limit in SINGLE_GPU:
        row = newest(rows, profile=profile)
        if row is None:
            continue
        of_limit = f"{row['tokens_per_s'] / limit:.0%}" if limit else "—"
        lines.append(f"| {_label(label, row)} | {row['tokens_per_s']:,.0f} | {row['peak_gib']:.2f} | {of_limit} | {_commit(row)} |")
    return lines


def fsdp_table(rows: list[dict]) -> list[str]:
    lines = ["| run | world size | tokens/s per GPU | peak GiB per GPU | efficiency | commit |",
             "|---|---|---|---|---|---|"]
    for profile, label in FSDP:
        one = newest(rows, profile=profile, world_size=1)
        for ws in (1, 2):
            row = newest(rows, profile=profile, world_size=ws)
            if row is None:
                continue
            # efficiency: per-GPU throughput at world 2 over world 1 of the same device call (the
            # line's own field), else over the newest world-1 line of the same commit
            if ws > 1 and row.get("efficiency"):
                eff = f"{row['efficiency']:.0%}"
            elif ws > 1 and one is not None and one.get("commit") == row.get("commit"):
                eff = f"{row['tokens_per_s'] / one['tokens_per_s']:.0%}"
            else:
                eff = "—"
            peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else "—"
            lines.append(f"| {_label(label, row)} | {ws} | {row['tokens_per_s']:,.0f} | {peak} | {eff} | {_commit(row)} |")
    return lines


def efficiency_spread(rows: list[dict], profile: str, what: str) -> str | None:
    """One line on every recorded 2-GPU efficiency of ``profile`` (each against the 1-GPU run of
    its own device call): the figure moves from call to call, so the newest alone says little."""
    effs = sorted(r["efficiency"] for r in rows if r.get("profile") == profile and r.get("efficiency"))
    if not effs:
        return None
    line = (f"Every recorded 8B efficiency ({what}, each against the 1-GPU run(s) of its own device "
            f"call): {len(effs)} runs, {effs[0]:.0%} to {effs[-1]:.0%}, median {statistics.median(effs):.0%}.")
    by_commit: dict[str, list[float]] = {}
    for r in rows:
        if r.get("profile") == profile and r.get("world_size") == 1 and r.get("commit"):
            by_commit.setdefault(r["commit"], []).append(r["tokens_per_s"])
    repeats = [(c, v) for c, v in by_commit.items() if len(v) > 1]
    if repeats:  # the same code's 1-GPU step measured more than once: how far it moves by itself
        commit, runs = max(repeats, key=lambda cv: max(cv[1]) / min(cv[1]))
        line += (f" The 1-GPU step of one commit alone moved {max(runs) / min(runs) - 1:.0%} between runs "
                 f"({commit}: {', '.join(f'{v:,.0f}' for v in runs)} tok/s).")
    return line


def render() -> str:
    # the shared notes first: a peer measured here later (newest) replaces its shared figure
    single = load("peers_shared.jsonl") + load("h200.jsonl")
    multi = load("peers_shared.jsonl") + load("h200_x2.jsonl")
    out = [START, "", "One H200 (`bench/results/h200.jsonl`, `peers_shared.jsonl`):", "",
           *single_gpu_table(single), "", "Two H200s, FSDP2 (`bench/results/h200_x2.jsonl`):", "",
           *fsdp_table(multi), ""]
    for profile, what in [("fsdp_lora_8b_ac", "default switches, eager"), ("fsdp_lora_8b_ac_compile", "compiled layers"),
                          ("fsdp_lora_8b_ac_replicated_compile", "compiled layers, base replicated")]:
        if spread := efficiency_spread(multi, profile, what):
            out += [spread, ""]
    out.append(END)
    return "\n".join(out)


def readme_section(text: str) -> str:
    """The README's current generated section (markers included)."""
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} section")
    return text[text.index(START): text.index(END) + len(END)]


def main(argv: list[str]) -> int:
    table = render()
    if "--write" in argv:
        text = README.read_text()
        README.write_text(text.replace(readme_section(text), table))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
