"""Export a trained decoder as a Hugging Face Llama folder (`LlamaForCausalLM.from_pretrained`).

Our model already follows HF Llama's conventions (half-split RoPE, float32 RMSNorm, SwiGLU,
no biases), so export is a rename of the weights plus a `config.json`. Transformers itself
is not needed to export, only to load the result.

    DIR/config.json                 LlamaConfig fields
    DIR/model.safetensors           weights under HF names (a tied head is stored once)
    DIR/generation_config.json      special token ids, when known
    DIR/mega_trading_export.json    provenance, our ModelConfig, caller's metadata
    DIR/mega_trading_tokenizer.json our event tokenizer (not an HF tokenizer, so not
                                    named tokenizer.json, which HF would try to parse)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mega_trading.core.config import to_dict
from mega_trading.core.lineage import atomic_dir, provenance, write_json_atomic
from mega_trading.model.transformer import ModelConfig, Transformer

# our per-layer name -> HF per-layer name
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}


def hf_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    _, index, rest = name.split(".", 2)
    return f"model.layers.{index}.{_LAYER_NAMES[rest]}"


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under HF names; contiguous CPU copies, the tied head left out."""
    tensors = {}
    for name, param in model.named_parameters():  # yields a tied weight once
        tensors[hf_name(name)] = param.detach().to("cpu").contiguous().clone()
    return tensors


def llama_config(cfg: ModelConfig, special_tokens: dict[str, int] | None = None) -> dict[str, Any]:
    """The config.json of a `LlamaForCausalLM` that computes what `Transformer(cfg)` does."""
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
               **(special_tokens or {})}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 reads rope_parameters
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "use_cache": True,
        **special,
    }


def export_hf(model: Transformer, out_dir: str | Path, extra_metadata: dict[str, Any] | None = None,
              special_tokens: dict[str, int] | None = None,
              tokenizer_path: str | Path | None = None) -> Path:
    """Write `out_dir` (atomically, replacing it) so that HF Llama loads `model` from it.

    `special_tokens` may set bos_token_id / eos_token_id / pad_token_id; `tokenizer_path`
    is copied alongside so the folder is self-contained.
    """
    cfg: ModelConfig = model.cfg
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(hf_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        config = llama_config(cfg, special_tokens)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: v for k, v in config.items() if k.endswith("_token_id") and v is not None}
        if generation:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "mega_trading_tokenizer.json")
        write_json_atomic(tmp / "mega_trading_export.json", {
            "provenance": provenance(stage="export_hf"),
            "model_config": to_dict(cfg),
            "metadata": extra_metadata or {},
        })
    return out_dir
