"""Shared fixtures: tiny random Llama checkpoints written by transformers (the oracle).

Each ``make_hf_checkpoint(kind)`` call returns a folder written by
``LlamaForCausalLM.save_pretrained`` (transformers' own layout), so every test that reads one
exercises the real format, not our idea of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (pyproject's addopts: `-n logical`, one worker per core, at most
# MAX_WORKERS), each of the N workers gets its share of the cores as torch threads, and its
# subprocesses too (OMP_NUM_THREADS): N workers each using every core would only contend, and
# tiny CPU matmuls gain little from a second thread. `-n 0` runs in one process.
MAX_WORKERS = 8  # each worker holds torch, transformers and the tiny models; torchrun tests start two more
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


def pytest_xdist_auto_num_workers(config):
    """``-n logical`` / ``-n auto``: one worker per core, capped (see MAX_WORKERS)."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))

# Small but not degenerate: GQA needs n_heads > n_kv_heads, rope needs an even head_dim.
BASE = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> overrides of BASE; rope settings are passed in the transformers-5 form.
KINDS = {
    "llama2": dict(rope_theta=10000.0),
    "llama3": dict(num_key_value_heads=2, rope_theta=500000.0),
    "llama3_1": dict(
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "llama3_2": dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True),
    # Mistral 7B v0.3's shape in small: GQA, theta 1e6, no sliding window; Nemo-like explicit head_dim
    "mistral": dict(num_key_value_heads=2, rope_theta=1000000.0, sliding_window=None),
    "mistral_nemo": dict(num_key_value_heads=2, rope_theta=1000000.0, sliding_window=None, head_dim=24),
    # Qwen2.5 in small: biases on q/k/v, theta 1e6, tied embeddings, the window switched off
    "qwen2": dict(num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                  sliding_window=4096),
    # Qwen3 in small: per-head q/k norms, explicit head_dim != hidden/heads, tied embeddings
    "qwen3": dict(num_key_value_heads=2, rope_theta=1000000.0, head_dim=24, tie_word_embeddings=True),
    # Phi-3 mini in small: fused qkv_proj / gate_up_proj, a sliding window over every layer
    "phi3": dict(num_key_value_heads=2, rope_theta=10000.0, sliding_window=24, pad_token_id=0),
    # Phi-4-mini / Phi-3.5 in small: partial rotary (3/4 of each head), longrope with short and
    # long factors past original_max_position_embeddings=32, tied embeddings
    "phi3_longrope": dict(num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=0,
                          partial_rotary_factor=0.75, max_position_embeddings=256, original_max_position_embeddings=32,
                          rope_scaling=dict(rope_type="longrope", original_max_position_embeddings=32,
                                            short_factor=[1.0 + 0.05 * i for i in range(6)],
                                            long_factor=[1.0 + 0.5 * i for i in range(6)])),
    # Qwen3-MoE in small: q/k norms, 4 experts of width 48, top-2 with renormalised weights, layer 0
    # dense (mlp_only_layers), tied embeddings
    "qwen3_moe": dict(num_key_value_heads=2, rope_theta=1000000.0, head_dim=24, tie_word_embeddings=True,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                      mlp_only_layers=[0], router_aux_loss_coef=0.01),
    # gpt-oss in small: biased attention with sinks, sliding/full alternation (window 8), YaRN,
    # 4 biased clamped-SwiGLU experts, top 2, head_dim 16
    "gpt_oss": dict(num_key_value_heads=2, head_dim=16, intermediate_size=48, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=8, rope_theta=150000.0,
                    rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                      original_max_position_embeddings=4096)),
    # Gemma 3 in small: 1+w norms (four per layer, and on q/k), GeGLU, scaled embeddings, two
    # sliding layers (window 16, local theta 1e4) then a global one with linear rope scaling,
    # query_pre_attn_scalar != head_dim, tied embeddings
    "gemma3": dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=16,
                   query_pre_attn_scalar=24, rope_theta=1000000.0, rope_local_theta=10000.0,
                   rope_scaling=dict(rope_type="linear", factor=8.0)),
}


def _build_gemma3_image_text(seed: int, **overrides):
    """Gemma3ForConditionalGeneration in small: the gemma3 kind's text model beside a one-layer
    SigLIP vision tower and projector (what the 4B/12B/27B checkpoints hold)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = _build_hf_model("gemma3", seed, **overrides).config.to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=1000,
                          boi_token_index=1001, eoi_token_index=1002)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _build_hf_model(kind: str, seed: int, **overrides):
    if kind == "gemma3_mm":
        return _build_gemma3_image_text(seed, **overrides)
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    cfg = dict(BASE)
    cfg.update(KINDS[kind])
    cfg.update(overrides)
    config_class, model_class = LlamaConfig, LlamaForCausalLM
    if kind.startswith("mistral"):
        config_class, model_class = MistralConfig, MistralForCausalLM
        cfg.pop("attention_bias"), cfg.pop("mlp_bias")  # not in Mistral's config
    elif kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config_class, model_class = Qwen2Config, Qwen2ForCausalLM
        cfg.pop("attention_bias"), cfg.pop("mlp_bias")  # q/k/v biases are implied
    elif kind == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config_class, model_class = Qwen3Config, Qwen3ForCausalLM
        cfg.pop("mlp_bias")
    elif kind == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config_class, model_class = Gemma3TextConfig, Gemma3ForCausalLM
        cfg.pop("mlp_bias")
    elif kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config_class, model_class = Qwen3MoeConfig, Qwen3MoeForCausalLM
        cfg.pop("mlp_bias")
    elif kind == "gpt_oss":
        from transformers import GptOssConfig, GptOssForCausalLM

        config_class, model_class = GptOssConfig, GptOssForCausalLM
        cfg.pop("mlp_bias"), cfg.pop("attention_bias")
    elif kind.startswith("phi3"):
        from transformers import Phi3Config, Phi3ForCausalLM

        config_class, model_class = Phi3Config, Phi3ForCausalLM
        cfg.pop("attention_bias"), cfg.pop("mlp_bias")
        partial = cfg.pop("partial_rotary_factor", None)
    rope_theta = cfg.pop("rope_theta")
    rope_scaling = cfg.pop("rope_scaling", None)
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope_parameters = dict(rope_scaling, rope_theta=rope_theta)
    if kind.startswith("phi3") and partial is not None:
        rope_parameters["partial_rotary_factor"] = partial
    if kind == "gemma3":  # one RoPE per layer type
        rope_parameters = {"full_attention": rope_parameters,
                           "sliding_attention": {"rope_type": "default", "rope_theta": cfg.pop("rope_local_theta")}}
    config = config_class(rope_parameters=rope_parameters, **cfg)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # transformers initialises norms to ones, biases and routers to zeros; perturb them so a
    # wrong mapping shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".bias", "_bias", "mlp.gate.weight", "router.weight", ".sinks")):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def make_hf_checkpoint(tmp_path_factory):
    """Factory: ``make_hf_checkpoint(kind="llama3", seed=0, **config_overrides) -> Path``.

    kinds: llama2 (MHA, theta 1e4), llama3 (GQA, theta 5e5), llama3_1 (llama3 rope scaling),
    llama3_2 (tied embeddings), mistral (MistralForCausalLM, theta 1e6, no window),
    mistral_nemo (the same with an explicit head_dim), qwen2 (q/k/v biases, tied), qwen3 (q/k
    norms, head_dim 24, tied), gemma3 (Gemma3ForCausalLM: sliding and global layers), gemma3_mm
    (Gemma3ForConditionalGeneration: the same text model beside a vision tower), phi3 (fused
    projections, window 24), phi3_longrope (partial rotary, longrope past 32 positions), qwen3_moe
    (4 experts, top 2, a dense first layer), gpt_oss (sinks, YaRN, 4 biased experts),
    gpt_oss_mxfp4 (the same with inner width 64 and random MXFP4 experts, as the Hub stores
    gpt-oss). Written in fp32 by transformers' save_pretrained. Results are
    cached per argument set for the session; treat the folder as read-only (copy it to modify).
    """
    cache: dict = {}

    def make(kind: str = "llama3", seed: int = 0, **overrides) -> Path:
        key = (kind, seed, json.dumps(overrides, sort_keys=True))
        if key not in cache and kind == "gpt_oss_mxfp4":
            # experts' inner width 64: an MXFP4 block is 32 values of a row
            dense = make("gpt_oss", seed, **{"intermediate_size": 64, **overrides})
            cache[key] = _mxfp4_copy(dense, tmp_path_factory.mktemp(f"hf_{kind}") / "m", seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf_{kind}")
            model = _build_hf_model(kind, seed, **overrides)
            model.save_pretrained(out, safe_serialization=True)
            cache[key] = out
        return cache[key]

    return make


MXFP4_QUANTIZATION = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def random_mxfp4(e: int, out: int, inp: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 codes [e, out, inp / 32, 16] (any byte) and scales [e, out, inp / 32] of
    2^-11 to 2^-4: weights of the size trained models have (|w| <= 6 x 2^-4)."""
    blocks = torch.randint(0, 256, (e, out, inp // 32, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(116, 124, (e, out, inp // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


def _mxfp4_copy(dense: Path, out: Path, seed: int) -> Path:
    """The dense gpt-oss folder with its experts replaced by random MXFP4 pairs, stored as the
    Hub stores gpt-oss (``*_blocks`` / ``*_scales``, quantization_config mxfp4)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(dense, out)
    tensors = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, inp, outp = tensors.pop(name).shape  # dense: [E, in, out]
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = random_mxfp4(e, outp, inp, g)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = MXFP4_QUANTIZATION
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def load_hf_model():
    """``load_hf_model(path) -> LlamaForCausalLM`` (or the family's class) in fp32, eval mode
    (the oracle)."""

    def load(path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

    return load


# --------------------------------------------------------------------------------------------
# fake_hub: a local stand-in for the Hugging Face Hub (appended by the cli helper)
# --------------------------------------------------------------------------------------------


class _FakeHubRepo:
    """Files of one fake repo plus the ids the Hub derives from them."""

    def __init__(self, repo_id: str, files: dict, repo_type: str, token: str | None):
        import hashlib

        self.repo_id = repo_id
        self.repo_type = repo_type
        self.token = token
        self.files = {
            path: (data.encode() if isinstance(data, str) else bytes(data))
            for path, data in files.items()
        }
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + self.files[path])
        self.sha = digest.hexdigest()  # 40 hex chars, like a git commit id

    def blob_id(self, path: str) -> str:
        import hashlib

        data = self.files[path]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id

    def etag(self, path: str) -> str:
        import hashlib

        return hashlib.sha256(self.files[path]).hexdigest()

    def tree(self, prefix: str, recursive: bool) -> list[dict]:
        import hashlib

        prefix = prefix.strip("/")
        entries: dict[str, dict] = {}
        for path in sorted(self.files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1 :] if prefix else path
            parts = rel.split("/")
            # folders on the way (all of them when recursive, else only the first level)
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                oid = hashlib.sha1(folder.encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": oid})
            if recursive or len(parts) == 1:
                entries[path] = {
                    "type": "file",
                    "path": path,
                    "size": len(self.files[path]),
                    "oid": self.blob_id(path),
                }
        return list(entries.values())


class FakeHub:
    """Handle returned by the ``fake_hub`` fixture.

    Attributes:
        url: the endpoint (``http://127.0.0.1:PORT``), also set as ``HF_ENDPOINT``.
        requests: ``(method, path, authorization header or None)`` of every request served.
    """

    def __init__(self):
        self.url = ""
        self.repos: dict[tuple[str, str], _FakeHubRepo] = {}
        self.requests: list[tuple[str, str, str | None]] = []

    def add_repo(
        self, repo_id: str, files: dict, repo_type: str = "model", token: str | None = None
    ) -> str:
        """Serve ``files`` ({path: bytes | str}) as repo ``repo_id``; returns its commit sha.

        Args:
            repo_type: "model" or "dataset" (or "space").
            token: if set, the repo is gated: requests without ``Bearer <token>`` get 401
                with ``X-Error-Code: GatedRepo``.
        """
        repo = _FakeHubRepo(repo_id, files, repo_type, token)
        self.repos[(repo_type, repo_id)] = repo
        return repo.sha


def _make_fake_hub_handler(hub: FakeHub):
    import json
    import re
    from http.server import BaseHTTPRequestHandler
    from urllib.parse import parse_qs, unquote, urlsplit

    api_re = re.compile(r"^/api/(models|datasets|spaces)/(.+?)(?:/(revision|tree)/([^/]+)(/.*)?)?$")
    resolve_re = re.compile(r"^/(?:(datasets|spaces)/)?(.+?)/resolve/([^/]+)/(.+)$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head=False):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head=False, commit=None):
            headers = {"X-Error-Code": code, "X-Error-Message": message,
                       "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

        def _repo(self, kind: str, repo_id: str, head=False):
            repo = hub.repos.get((kind, repo_id))
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head=head)
                return None
            auth = self.headers.get("authorization")
            if repo.token is not None and auth != f"Bearer {repo.token}":
                self._error(401, "GatedRepo", "Access to this repo is restricted", head=head)
                return None
            return repo

        def _revision_ok(self, repo: _FakeHubRepo, revision: str, head=False) -> bool:
            if revision in ("main", repo.sha):
                return True
            self._error(404, "RevisionNotFound", "Invalid rev id", head=head)
            return False

        def _handle(self, head: bool):
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.requests.append((self.command, path, self.headers.get("authorization")))
            m = api_re.match(path)
            if m and not head:
                kind = m.group(1)[:-1]
                repo = self._repo(kind, m.group(2))
                if repo is None:
                    return
                revision = m.group(4) or "main"
                if not self._revision_ok(repo, revision):
                    return
                if m.group(3) == "tree":
                    query = parse_qs(url.query)
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    body = repo.tree(m.group(5) or "", recursive)
                else:
                    body = {
                        "id": repo.repo_id,
                        "sha": repo.sha,
                        "private": False,
                        "gated": bool(repo.token),
                        "siblings": [
                            {"rfilename": p, "size": len(d)} for p, d in sorted(repo.files.items())
                        ],
                    }
                self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
                return
            m = resolve_re.match(path)
            if m:
                kind = m.group(1)[:-1] if m.group(1) else "model"
                repo = self._repo(kind, m.group(2), head=head)
                if repo is None or not self._revision_ok(repo, m.group(3), head=head):
                    return
                filename = m.group(4)
                if filename not in repo.files:
                    self._error(404, "EntryNotFound", "Entry not found", head=head, commit=repo.sha)
                    return
                data = repo.files[filename]
                status = 200
                rng = re.match(r"bytes=(\d+)-$", self.headers.get("range", ""))
                if rng and not head:  # resumed download
                    start = int(rng.group(1))
                    data = data[start:]
                    status = 206
                headers = {
                    "X-Repo-Commit": repo.sha,
                    "ETag": f'"{repo.etag(filename)}"',
                    "Content-Length": str(len(data)),
                    "Content-Type": "application/octet-stream",
                    "Accept-Ranges": "bytes",
                }
                self._send(status, data, headers, head=head)
                return
            self._error(404, "NotFound", f"no route for {path}", head=head)

        def do_GET(self):
            self._handle(head=False)

        def do_HEAD(self):
            self._handle(head=True)

    return Handler


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A local fake of the Hugging Face Hub for ``snapshot_download`` / ``hf_hub_download``.

    Serves ``/api/{models,datasets}/{repo}/revision/{rev}``, ``.../tree/{rev}`` and
    ``[/datasets]/{repo}/resolve/{rev}/{path}`` (HEAD + GET with X-Repo-Commit, ETag,
    Content-Length) from a threaded server on 127.0.0.1. Sets ``HF_ENDPOINT`` (environment
    AND the copies huggingface_hub took at import), moves the hub cache and token file into
    tmp, and disables xet, telemetry and offline mode. Returns a ``FakeHub``: ``.url``,
    ``.add_repo(repo_id, files, repo_type="model", token=None)``, ``.requests``.
    The server stops at teardown.
    """
    import threading
    from http.server import ThreadingHTTPServer

    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_fake_hub_handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake_hub", daemon=True
    )
    thread.start()

    hf_home = tmp_path / "hf_home"
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(k, raising=False)
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    if constants is not None:
        # huggingface_hub copies these from the environment at import time.
        patched = {
            "ENDPOINT": hub.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
            "HF_TOKEN_PATH": str(hf_home / "token"),
            "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
        }
        for name, value in patched.items():
            if hasattr(constants, name):
                monkeypatch.setattr(constants, name, value)
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def graph_recorder():
    """``(backend, graphs)``: a torch.compile backend (AOTAutograd, graphs run as traced) that
    records the op targets of the forward and the backward graph into ``graphs["forward"]`` /
    ``graphs["backward"]``, for tests that check what a compiled layer calls."""
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, list[str]] = {}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = [str(node.target) for node in gm.graph.nodes]
            return gm.forward
        return compiler

    return aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward")), graphs


@pytest.fixture
def compiled_matches_eager(graph_recorder):
    """``check(fn, x, params, **tol) -> graphs``: ``fn(x)`` (a tensor or a tuple of them) run
    eagerly, then compiled (fullgraph, through ``graph_recorder``), both under the Triton
    kernels; the outputs, x's gradient and the gradients of ``params`` (of the summed squares
    of the outputs) must match within ``tol``. Returns the recorded forward / backward graphs."""
    from tunelab.kernels import backend

    record, graphs = graph_recorder

    def check(fn, x: torch.Tensor, params, **tol) -> dict[str, list[str]]:
        results = {}
        for name in ("eager", "compiled"):
            for p in params:
                p.grad = None
            xi = x.clone().requires_grad_()
            if name == "compiled":
                torch._dynamo.reset()
            run = torch.compile(fn, fullgraph=True, backend=record) if name == "compiled" else fn
            with backend("triton"):
                ys = run(xi)
                ys = ys if isinstance(ys, tuple) else (ys,)
                sum(y.square().sum() for y in ys).backward()
            results[name] = (*ys, xi.grad, *(p.grad for p in params))
        for a, b in zip(results["compiled"], results["eager"]):
            torch.testing.assert_close(a, b, **tol)
        return graphs

    return check
