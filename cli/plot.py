"""`tune plot OUTPUT_DIR [OUTPUT_DIR ...] [--out loss.png]`: a run's curves as a PNG.

The same panels as `tune board` (loss with eval loss, lr, tokens/s, grad norm, for DPO the
reward accuracy and margins, for GRPO the mean reward, and the KL where logged), read from each OUTPUT_DIR's metrics.jsonl; several runs are
overlaid. Needs the optional ``plot`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunelab.errors import ConfigError

__all__ = ["PANELS", "add_parser", "cmd_plot", "plot_runs"]

# (title, [(metrics key, line style)]) — a panel is drawn when any run logged one of its keys
PANELS = [
    ("loss", [("loss", "-"), ("eval_loss", "--")]),
    ("learning rate", [("lr", "-")]),
    ("tokens / s", [("tokens_per_s", "-")]),
    ("grad norm", [("grad_norm", "-")]),
    ("reward accuracy", [("rewards/accuracy", "-"), ("eval_rewards/accuracy", "--")]),
    ("reward margins", [("rewards/margins", "-"), ("eval_rewards/margins", "--")]),
    ("reward (GRPO)", [("reward/mean", "-")]),
    ("KL estimate", [("kl", "-")]),
]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="draw a run's metrics (loss, lr, tokens/s, grad norm) to a PNG",
                              description=__doc__.split("\n\n", 1)[1])
    p.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="run folder(s) holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default OUTPUT_DIR/loss.png of the first run)")
    p.add_argument("--dpi", type=int, default=100, help="resolution (default 100)")
    p.set_defaults(func=cmd_plot)


def plot_runs(output_dirs: list[str | Path], out: str | Path, dpi: int = 100) -> Path:
    """Write the panels for the runs' metrics.jsonl files to ``out`` (PNG); returns the path.

    Raises:
        ConfigError: a folder has no metrics.jsonl or no rows, or matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise ConfigError("tune plot needs matplotlib: pip install 'tunelab[plot]'") from None
    from tunelab.training.metrics import read_metrics

    runs = []
    for d in output_dirs:
        path = Path(d).expanduser() / "metrics.jsonl"
        if not path.is_file():
            raise ConfigError(f"{path} not found; pass a run's output_dir (it holds metrics.jsonl)")
        rows = [r for r in read_metrics(path) if isinstance(r.get("step"), int)]
        if not rows:
            raise ConfigError(f"{path} has no metric rows yet; plot again once the run logged a step")
        runs.append((Path(d).name or str(d), rows))

    panels = [(t, keys) for t, keys in PANELS
              if any(r.get(k) is not None for _, rows in runs for r in rows for k, _ in keys)]
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes.flat, panels):
        for i, (name, rows) in enumerate(runs):
            for key, style in keys:
                pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    label = name if len(runs) > 1 else key
                    if len(runs) > 1 and key != keys[0][0]:
                        label = f"{name} ({key})"
                    ax.plot(xs, ys, style, color=colors[i % len(colors)], label=label,
                            marker="o" if len(xs) == 1 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def cmd_plot(args: argparse.Namespace) -> int:
    out = args.out or Path(args.output_dirs[0]).expanduser() / "loss.png"
    path = plot_runs(args.output_dirs, out, dpi=args.dpi)
    print(f"wrote {path}")
    return 0
