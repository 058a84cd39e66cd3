"""`tune download` against the local fake hub (no network)."""

from __future__ import annotations

import json

from tunelab.cli.main import main

FILES = {
    "config.json": json.dumps({"model_type": "llama"}),
    "model.safetensors": b"\x00\x01weights" * 100,
    "tokenizer/tokenizer.json": "{}",
    "original/consolidated.00.pth": b"pickle!",
    "original/tokenizer.model": b"spm",
}


def test_download_model_to_output_dir(fake_hub, tmp_path, capsys):
    fake_hub.add_repo("org/tiny", FILES)
    out = tmp_path / "ckpt"
    assert main(["download", "org/tiny", "--output-dir", str(out)]) == 0
    for name, data in FILES.items():
        if name == "original/consolidated.00.pth":
            assert not (out / name).exists()  # skipped by default
            continue
        expected = data.encode() if isinstance(data, str) else data
        assert (out / name).read_bytes() == expected
    printed = capsys.readouterr().out
    assert "downloaded 4 files" in printed
    assert any(path.startswith("/api/models/org/tiny") for _, path, _ in fake_hub.requests)


def test_download_include_original_and_patterns(fake_hub, tmp_path):
    fake_hub.add_repo("org/tiny", FILES)
    out = tmp_path / "all"
    assert main(["download", "org/tiny", "--output-dir", str(out), "--include-original"]) == 0
    assert (out / "original/consolidated.00.pth").read_bytes() == b"pickle!"
    out2 = tmp_path / "some"
    assert main(["download", "org/tiny", "--output-dir", str(out2), "--include", "*.json"]) == 0
    got = sorted(p.relative_to(out2).as_posix() for p in out2.rglob("*.json")
                 if ".cache" not in p.parts)
    assert got == ["config.json", "tokenizer/tokenizer.json"]
    assert not (out2 / "model.safetensors").exists()


def test_download_dataset_repo(fake_hub, tmp_path):
    fake_hub.add_repo("org/data", {"train.jsonl": '{"a": 1}\n'}, repo_type="dataset")
    out = tmp_path / "ds"
    rc = main(["download", "org/data", "--repo-type", "dataset", "--output-dir", str(out)])
    assert rc == 0
    assert (out / "train.jsonl").read_text() == '{"a": 1}\n'


def test_download_missing_repo_is_one_line(fake_hub, tmp_path, capsys):
    rc = main(["download", "org/nope", "--output-dir", str(tmp_path / "x")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "not found" in err[0] and "org/nope" in err[0] and "HF_TOKEN" in err[0]


def test_download_invalid_repo_id_is_one_line(fake_hub, tmp_path, capsys):
    rc = main(["download", "bad id with spaces", "--output-dir", str(tmp_path / "x")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_download_gated_needs_token(fake_hub, tmp_path, capsys, monkeypatch):
    fake_hub.add_repo("meta/gated", {"config.json": "{}"}, token="secret")
    rc = main(["download", "meta/gated", "--output-dir", str(tmp_path / "g")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gated" in err[0] and "HF_TOKEN" in err[0]
    # --hf-token works, and so does HF_TOKEN from the environment
    rc = main(["download", "meta/gated", "--output-dir", str(tmp_path / "g"), "--hf-token", "secret"])
    assert rc == 0 and (tmp_path / "g" / "config.json").exists()
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert main(["download", "meta/gated", "--output-dir", str(tmp_path / "g2")]) == 0


def test_download_unreachable_endpoint(tmp_path, capsys, monkeypatch, fake_hub):
    # A port nobody listens on: the error names the network, in one line.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    rc = main(["download", "org/tiny", "--output-dir", str(tmp_path / "n")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "network" in err[0]


def test_hub_download_helpers_use_fake_hub(fake_hub, tmp_path):
    """Library code that calls huggingface_hub without endpoint= also reaches the fake hub."""
    import huggingface_hub

    fake_hub.add_repo("org/data", {"data/train.json": "[]"}, repo_type="dataset")
    path = huggingface_hub.hf_hub_download("org/data", "data/train.json", repo_type="dataset")
    assert open(path).read() == "[]"
    folder = huggingface_hub.snapshot_download("org/data", repo_type="dataset")
    assert (tmp_path / "hf_home") in __import__("pathlib").Path(folder).parents


def test_download_mistral_layout_skips_the_consolidated_copy(fake_hub, tmp_path):
    """Mistral's repos carry the weights twice (consolidated.safetensors in its own format):
    the shipped config's download command fetches the HF copy only."""
    files = {"config.json": json.dumps({"model_type": "mistral"}), "model-00001-of-00001.safetensors": b"w" * 64,
             "consolidated.safetensors": b"c" * 64, "params.json": "{}", "tokenizer.model": b"spm"}
    fake_hub.add_repo("mistralai/Mistral-7B-Instruct-v0.3", files)
    out = tmp_path / "m"
    assert main(["download", "mistralai/Mistral-7B-Instruct-v0.3", "--output-dir", str(out)]) == 0
    assert (out / "model-00001-of-00001.safetensors").is_file() and not (out / "consolidated.safetensors").exists()
