"""Export to a Hugging Face Llama folder and check HF computes our logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mega_trading.model.export_hf import export_hf
from mega_trading.model.transformer import ModelConfig, Transformer

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")

VOCAB = 53


def random_model(seed: int, **overrides) -> Transformer:
    torch.manual_seed(seed)
    base = {"vocab_size": VOCAB, "block_size": 40, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
            "d_model": 32, "ffn_hidden": 56, "rope_theta": 500.0, "norm_eps": 1e-6}
    model = Transformer(ModelConfig(**{**base, **overrides}))
    with torch.no_grad():  # norm gains away from 1 so a wrong mapping would show
        for param in model.parameters():
            if param.ndim == 1:
                param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "n_kv_head": 1}])
def test_hf_llama_reproduces_our_logits(tmp_path, overrides):
    ours = random_model(0, **overrides)
    out = export_hf(ours, tmp_path / "hf", extra_metadata={"run": "unit-test"},
                    special_tokens={"bos_token_id": VOCAB - 1, "pad_token_id": VOCAB - 2})
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

    assert hf.config.num_key_value_heads == ours.cfg.n_kv_head
    assert hf.config.tie_word_embeddings == ours.cfg.tie_embeddings
    assert hf.config.bos_token_id == VOCAB - 1
    idx = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(idx)
        got = hf(input_ids=idx).logits.float()
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    assert expected.std() > 0.1  # logits are not trivially equal


def test_export_folder_layout(tmp_path):
    ours = random_model(2)
    out = export_hf(ours, tmp_path / "hf", extra_metadata={"step": 7})
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["intermediate_size"] == 56
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["rope_theta"] == 500.0 and config["rms_norm_eps"] == 1e-6
    assert config["max_position_embeddings"] == 40 and config["vocab_size"] == VOCAB
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: stored once
    assert len(tensors) == 1 + 2 * 9 + 1
    torch.testing.assert_close(tensors["model.layers.1.mlp.down_proj.weight"],
                               ours.layers[1].feed_forward.w2.weight.detach())
    meta = json.loads((out / "mega_trading_export.json").read_text())
    assert meta["metadata"] == {"step": 7} and meta["model_config"]["d_model"] == 32
    assert not (out / "tokenizer.json").exists()  # HF would try to parse it


def test_export_hf_command_on_a_run_folder(tmp_path):
    from mega_trading.cli import main
    from mega_trading.core.config import to_dict
    from mega_trading.model.checkpoint import save_checkpoint
    from mega_trading.train.optim import build_optimizer

    ours = random_model(3)
    run = tmp_path / "run"
    save_checkpoint(run, 5, ours, build_optimizer(ours), sampler_state={},
                    config={"model": to_dict(ours.cfg)}, tokenizer_hash="t", manifest_hash="m")
    assert main(["export-hf", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (hf(input_ids=idx).logits - ours(idx)).abs().max().item()
    assert diff < 1e-4
    meta = json.loads((tmp_path / "hf" / "mega_trading_export.json").read_text())
    assert meta["metadata"]["step"] == 5

    assert main(["export-hf", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
