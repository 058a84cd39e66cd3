"""`tune download REPO_ID --output-dir DIR`: fetch a model (or dataset) repo from the Hub.

Uses ``huggingface_hub.snapshot_download`` into a plain folder (no cache symlinks). The
token is ``--hf-token`` or the ``HF_TOKEN`` environment variable (else the one saved by
``hf auth login``); the endpoint is ``HF_ENDPOINT`` read when the command runs (mirrors, tests).
By default the second copies of the weights in the publisher's own format are skipped: Meta's
``original/consolidated*.pth`` and Mistral's ``consolidated.safetensors``; ``--include-original``
keeps them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tunelab.errors import CheckpointError

__all__ = ["DEFAULT_IGNORE", "add_parser", "cmd_download", "download"]

DEFAULT_IGNORE = ["original/consolidated*.pth", "consolidated.safetensors"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "download",
        help="download a model (or dataset) repo from the Hugging Face Hub",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("repo_id", metavar="REPO_ID", help="e.g. meta-llama/Llama-3.1-8B-Instruct")
    p.add_argument("--output-dir", required=True, help="folder to download into")
    p.add_argument("--hf-token", default=None, help="Hub token (default: $HF_TOKEN)")
    p.add_argument("--repo-type", choices=["model", "dataset"], default="model")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument(
        "--include", nargs="+", metavar="PATTERN", default=None,
        help="only files matching these glob patterns",
    )
    p.add_argument(
        "--exclude", nargs="+", metavar="PATTERN", default=None,
        help=f"skip files matching these glob patterns (default: {' '.join(DEFAULT_IGNORE)})",
    )
    p.add_argument(
        "--include-original", action="store_true",
        help="also download the second copies of the weights (original/consolidated*.pth, consolidated.safetensors)",
    )
    p.set_defaults(func=cmd_download)


def download(
    repo_id: str,
    output_dir: str | Path,
    *,
    token: str | None = None,
    repo_type: str = "model",
    revision: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> Path:
    """Download a Hub repo into ``output_dir``; returns the folder.

    Raises:
        CheckpointError: repo not found, gated/unauthorized, revision missing, network down,
            with a one-line fix.
    """
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = token or os.environ.get("HF_TOKEN") or None
    # huggingface_hub reads HF_ENDPOINT once at import; read it now so a later change counts.
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    where = f"{repo_type} repo '{repo_id}'" + (f" on {endpoint}" if endpoint else "")
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            local_dir=str(output_dir),
            token=token,
            allow_patterns=include,
            ignore_patterns=exclude,
            endpoint=endpoint,
        )
    except GatedRepoError:
        raise CheckpointError(
            f"{where} is gated: accept its license on the model page, then pass --hf-token "
            "or set HF_TOKEN to a token of that account"
        ) from None
    except RepositoryNotFoundError:
        hint = "" if token else "; if it is private or gated, pass --hf-token or set HF_TOKEN"
        hint += "; for a dataset pass --repo-type dataset" if repo_type == "model" else ""
        raise CheckpointError(f"{where} not found: check the id{hint}") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"revision '{revision}' not found in {where}") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise CheckpointError(
                f"not authorized to download {where} (HTTP {status}): pass --hf-token or set "
                "HF_TOKEN to a token with read access (and accept the license if it is gated)"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"download of {where} failed: {first}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot reach the Hub to download {where}: check the network connection"
            + (" and HF_ENDPOINT" if endpoint else "")
            + " (HF_HUB_OFFLINE must be unset)"
        ) from None
    except ValueError as e:  # invalid repo id / type
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid input"
        raise CheckpointError(f"cannot download '{repo_id}': {first}") from None
    except OSError as e:
        raise CheckpointError(f"cannot write to {output_dir}: {e.strerror or e}") from None
    return Path(folder)


def cmd_download(args: argparse.Namespace) -> int:
    exclude = args.exclude
    if exclude is None and not args.include_original:
        exclude = list(DEFAULT_IGNORE)
    folder = download(
        args.repo_id,
        args.output_dir,
        token=args.hf_token,
        repo_type=args.repo_type,
        revision=args.revision,
        include=args.include,
        exclude=exclude,
    )
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    )
    print(f"downloaded {len(files)} files of {args.repo_id} to {folder}")
    for name in files:
        print(f"  {name}")
    if exclude and not args.include:
        print(f"(skipped files matching {' '.join(exclude)}; see --include-original)")
    return 0
