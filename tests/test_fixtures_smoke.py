import json


def test_hf_checkpoint_fixture(make_hf_checkpoint, load_hf_model):
    path = make_hf_checkpoint("llama3_1")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    model = load_hf_model(path)
    assert model.config.num_key_value_heads == 2
