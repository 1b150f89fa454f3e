"""The released Prism checkpoints, and offline test checkpoints with the same architecture.

Test checkpoints use the real Qwen3.5 / Qwen3 architectures and the real tokenizers with random
weights from a fixed seed. Default random init makes every document score alike and greedy
decoding repeat one token, which would make parity tests prove little; `_rescale_` below gives
weights whose outputs clearly depend on the input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prism_ray import prompt
from prism_ray.tokenizers_build import QWEN3, QWEN3_5, TokenizerFamily, build_tokenizer


@dataclass(frozen=True)
class Checkpoint:
    name: str
    hub_id: str
    backbone: str
    parameters: str  # as the model card writes it: "0.8B"

    @property
    def size(self) -> str:
        """The size key users route by: "0.8b", "4b-exp", …"""
        return self.name.rsplit("-", 1)[-1].lower() if not self.name.endswith("-exp") else "4b-exp"


RELEASED: tuple[Checkpoint, ...] = (
    Checkpoint("Prism-Qwen3.5-Reranker-0.8B", "infgrad/Prism-Qwen3.5-Reranker-0.8B", "Qwen3.5", "0.8B"),
    Checkpoint("Prism-Qwen3.5-Reranker-2B", "infgrad/Prism-Qwen3.5-Reranker-2B", "Qwen3.5", "2B"),
    Checkpoint("Prism-Qwen3.5-Reranker-4B", "infgrad/Prism-Qwen3.5-Reranker-4B", "Qwen3.5", "4B"),
    Checkpoint("Prism-Qwen3.5-Reranker-9B", "infgrad/Prism-Qwen3.5-Reranker-9B", "Qwen3.5", "9B"),
    Checkpoint("Prism-Qwen3-Reranker-4B-exp", "infgrad/Prism-Qwen3-Reranker-4B-exp", "Qwen3-Reranker-4B", "4B"),
)


def find_released(key: str) -> Checkpoint | None:
    """Look a released checkpoint up by name, hub id or size ("0.8b", "9B", "4b-exp")."""
    k = key.strip().lower()
    for ckpt in RELEASED:
        if k in (ckpt.name.lower(), ckpt.hub_id.lower(), ckpt.size):
            return ckpt
    return None


# --------------------------------------------------------------------------------------------
# Presets for offline checkpoints
# --------------------------------------------------------------------------------------------

def _qwen3_5_text(hidden, layers, intermediate, heads, kv_heads, head_dim, lin_k_heads, lin_v_heads,
                  lin_dim, mrope_section) -> dict:
    return {
        "model_type": "qwen3_5_text",
        "architectures": ["Qwen3_5ForCausalLM"],
        "vocab_size": 248320,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": lin_dim,
        "linear_value_head_dim": lin_dim,
        "linear_num_key_heads": lin_k_heads,
        "linear_num_value_heads": lin_v_heads,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
        "hidden_act": "silu",
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000,
            "partial_rotary_factor": 0.25,
            "mrope_section": mrope_section,
            "mrope_interleaved": True,
        },
    }


PRESETS: dict[str, dict] = {
    # Fast tests: every layer kind present (3 Gated DeltaNet layers + 1 full-attention layer).
    "tiny": _qwen3_5_text(128, 4, 256, 4, 2, 64, 4, 4, 32, [3, 3, 2]),
    # A second, larger test size (Serve routing by size, cascade screening).
    "small": _qwen3_5_text(256, 8, 512, 4, 2, 64, 4, 4, 64, [3, 3, 2]),
    # CPU benchmarks: the real 0.8B widths, fewer layers.
    "bench": _qwen3_5_text(1024, 4, 3584, 8, 2, 256, 16, 16, 128, [11, 11, 10]),
    # The real 0.8B shape.
    "0.8b": _qwen3_5_text(1024, 24, 3584, 8, 2, 256, 16, 16, 128, [11, 11, 10]),
    # Stand-in for Prism-Qwen3-Reranker-4B-exp (Qwen3 architecture, Qwen3 tokenizer).
    "qwen3-tiny": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000},
    },
}


def _family(config: dict) -> TokenizerFamily:
    return QWEN3 if config["model_type"] == "qwen3" else QWEN3_5


EMBED_STD = 0.05
FINAL_LOGIT_STD = 2.0  # spread of output logits; yes-no differences then spread over ~(-4, 4)


def _rescale_(model, seed: int) -> None:
    """Give random weights input-dependent outputs.

    Embeddings get a small scale and projections 1/sqrt(fan_in), so activations neither vanish nor
    explode through the layers; the final norm is shrunk so the (tied) yes/no logit difference
    lands in a range where the sigmoid score is neither saturated nor constant.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                # Small next to what the layers add: with tied embeddings a dominant input embedding
                # makes every position predict its own token again.
                p.copy_(torch.randn(p.shape, generator=gen) * EMBED_STD)
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif name.endswith("conv1d.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.0, 1.0, generator=gen).log1p())
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        final_norm = model.model.norm.weight
        # Qwen3.5 norms are zero-centred (scale = 1 + w); Qwen3 norms scale by w directly.
        zero_centred = model.config.model_type != "qwen3"
        scale = FINAL_LOGIT_STD / (EMBED_STD * model.config.hidden_size**0.5)
        final_norm.fill_(scale - 1.0 if zero_centred else scale)


def preset_checkpoint(preset: str, path: str | Path | None = None) -> Path:
    """The preset's checkpoint dir (default `checkpoints/<preset>`), built there on first use: what the
    benchmarks and scripts load."""
    ckpt = Path(path or f"checkpoints/{preset}")
    if not (ckpt / "config.json").is_file():
        print(f"building the {preset} preset at {ckpt} ...", flush=True)
        build_checkpoint(preset, ckpt)
    return ckpt


def build_checkpoint(preset: str, out: str | Path, seed: int = 0) -> Path:
    """Write a local Hugging Face checkpoint dir for `preset`; loads offline with Auto* classes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(PRESETS[preset])
    family = _family(cfg)

    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(family),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=prompt.DEFAULT_MAX_LENGTH if family is QWEN3_5 else 40960,
    )
    tok.chat_template = prompt.CROSS_ENCODER_CHAT_TEMPLATE
    tok.save_pretrained(out)

    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg, eos_token_id=eos, pad_token_id=eos[1],
                                  bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _rescale_(model, seed)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[1], do_sample=False)
    model.save_pretrained(out)

    # Path B: sentence-transformers CrossEncoder with a LogitScore head on yes/no.
    yes, no = (tok.convert_tokens_to_ids(t) for t in ("yes", "no"))
    (out / "prism_checkpoint.json").write_text(json.dumps({"preset": preset, "seed": seed}, indent=2))
    _write_cross_encoder_files(out, yes, no)
    return out


def _write_cross_encoder_files(out: Path, yes: int, no: int) -> None:
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_LogitScore",
         "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"},
    ], indent=2))
    (out / "1_LogitScore").mkdir(exist_ok=True)
    (out / "1_LogitScore" / "config.json").write_text(json.dumps(
        {"true_token_id": yes, "false_token_id": no, "module_input_name": "causal_logits"}, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"transformer_task": "text-generation",
         "modality_config": {"text": {"method": "forward", "method_output_name": "logits"},
                             "message": {"method": "forward", "method_output_name": "logits", "format": "flat"}},
         "module_output_name": "causal_logits"}, indent=2))
    (out / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.activation.Sigmoid"}, indent=2))
