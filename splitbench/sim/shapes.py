"""Model shapes and KV memory: KV bytes per token from a model's config, accelerator memory, and the KV tokens
that fit on a catalog machine next to the weights.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitbench.errors import InputError
from splitbench.hardware.catalog import MachineType

# Accelerator memory as NVIDIA states it (decimal GB) and HBM bandwidth (NVIDIA A100/H100 SXM/H200 SXM datasheets).
ACCELERATOR_MEMORY_BYTES = {"a100-80gb": 80e9, "h100-80gb": 80e9, "h200-141gb": 141e9}
MEMORY_BANDWIDTH_BPS = {"a100-80gb": 2.039e12, "h100-80gb": 3.35e12, "h200-141gb": 4.8e12,
                        "cpu-host": 20e9}  # cpu-host: ESTIMATE for a small VM's DRAM bandwidth
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8_e4m3fn": 1,
                "float8_e5m2": 1, "int8": 1, "uint8": 1, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1,
                "F8_E5M2": 1, "I8": 1, "U8": 1, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "BOOL": 1}

_DENSE_DECODERS = ("llama", "mistral", "qwen2")   # model types config_params() sizes


@dataclass(frozen=True)
class ModelShape:
    """What KV-memory accounting needs: KV bytes per token and the weights' bytes."""
    name: str
    layers: int
    kv_heads: int      # key/value heads (GQA/MQA: fewer than attention heads)
    head_dim: int
    dtype_bytes: int   # of the KV cache (= the weights' dtype here)
    weight_bytes: float
    heads: int = 0     # query heads (0: unknown); heads x head_dim x layers sizes attention's FLOPs per KV token

    @property
    def attention_to_dense_flops(self) -> float | None:
        """Attention FLOPs per (query token, cached token) over dense FLOPs per token: 4 L heads head_dim over
        2 x parameters (None when the query heads are unknown)."""
        if not self.heads or not self.weight_bytes:
            return None
        return 2.0 * self.layers * self.heads * self.head_dim / (self.weight_bytes / self.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes   # K and V


MODEL_SHAPES = {
    # huggingface.co/bigscience/bloom config.json: n_layer 70, n_head 112 (MHA), hidden_size 14336 -> head dim 128;
    # 176B parameters (model card), fp16.
    "bloom-176b": ModelShape("bloom-176b", layers=70, kv_heads=112, head_dim=128, dtype_bytes=2,
                             weight_bytes=176e9 * 2, heads=112),
    # huggingface.co/meta-llama/Llama-2-70b-hf config.json: num_hidden_layers 80, num_attention_heads 64,
    # num_key_value_heads 8 (GQA), hidden_size 8192 -> head dim 128; 70B parameters, torch_dtype float16.
    "llama2-70b": ModelShape("llama2-70b", layers=80, kv_heads=8, head_dim=128, dtype_bytes=2,
                             weight_bytes=70e9 * 2, heads=64),
}


def _safetensors_params(path: Path) -> int:
    """Parameter count of one .safetensors file from its header (8-byte length + JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")


def config_params(cfg: dict) -> int:
    """Parameters of a dense Llama/Mistral/Qwen2 decoder from its config's shapes (no weight files needed)."""
    heads = int(cfg["num_attention_heads"])
    h, inter, layers, vocab = (int(cfg[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "vocab_size"))
    hd = int(cfg.get("head_dim") or h // heads)
    q, kv = heads * hd, int(cfg.get("num_key_value_heads") or heads) * hd
    bias = (q + 2 * kv) if cfg.get("model_type") == "qwen2" or cfg.get("attention_bias") else 0
    per_layer = 2 * h + 2 * h * q + 2 * h * kv + 3 * h * inter + bias
    return vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + h + layers * per_layer


def shape_from_hf_config(model_dir: str | os.PathLike) -> ModelShape:
    """ModelShape of a local HF model dir: config.json + the safetensors headers (weights at the config dtype);
    without weight files (a `--load-format dummy` model) a Llama/Mistral/Qwen2 config's parameter count."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read model config: {e}", file=str(cfg_path)) from None
    cfg = {**cfg.get("text_config", {}), **cfg}

    def get(*keys):
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        raise InputError(f"config has none of {', '.join(keys)}", file=str(cfg_path), column=keys[0])
    layers = int(get("num_hidden_layers", "n_layer", "num_layers"))
    heads = int(get("num_attention_heads", "n_head"))
    kv_heads = int(cfg.get("num_key_value_heads") or (1 if cfg.get("multi_query") else heads))
    head_dim = int(cfg.get("head_dim") or get("hidden_size", "n_embed") // heads)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    if dtype not in _DTYPE_BYTES:
        raise InputError(f"unknown dtype {dtype!r}", file=str(cfg_path), column="torch_dtype")
    files = sorted(d.glob("*.safetensors"))
    if files:
        params = sum(_safetensors_params(f) for f in files)
    elif cfg.get("model_type") in _DENSE_DECODERS:
        params = config_params(cfg)
    else:
        raise InputError(f"{d}: no *.safetensors files to size the weights from (and model type "
                         f"{cfg.get('model_type')!r} is not one sized from its config: {', '.join(_DENSE_DECODERS)})")
    return ModelShape(d.name, layers, kv_heads, head_dim, _DTYPE_BYTES[dtype], float(params * _DTYPE_BYTES[dtype]),
                      heads=heads)


def accelerator_memory_bytes(accelerator: str, override: float | None = None) -> float:
    """Memory of one accelerator: `override` when given, else ACCELERATOR_MEMORY_BYTES (InputError if unknown)."""
    if override is not None:
        return float(override)
    try:
        return ACCELERATOR_MEMORY_BYTES[accelerator]
    except KeyError:
        raise InputError(f"memory of accelerator {accelerator!r} is unknown (known: "
                         f"{', '.join(ACCELERATOR_MEMORY_BYTES)}); give it explicitly") from None


def kv_capacity_tokens(shape: ModelShape, accelerators: int, accelerator_memory_bytes: float,
                       memory_fraction: float = 0.9) -> int:
    """KV tokens that fit on `accelerators` devices holding one copy of the weights (>= 0)."""
    if accelerators < 1 or accelerator_memory_bytes <= 0 or not 0 < memory_fraction <= 1:
        raise InputError(f"kv capacity needs accelerators >= 1, memory > 0 and 0 < fraction <= 1, got "
                         f"{accelerators}, {accelerator_memory_bytes}, {memory_fraction}")
    free = memory_fraction * accelerators * accelerator_memory_bytes - shape.weight_bytes
    return max(0, int(free // shape.kv_bytes_per_token))


def machine_kv_capacity_tokens(shape: ModelShape, machine: MachineType, memory_bytes: float | None = None,
                               memory_fraction: float = 0.9, tensor_parallel: int | None = None) -> int:
    """KV tokens on one catalog machine: accelerators // tensor_parallel instances (default: one instance over
    all accelerators), each holding its own copy of the weights."""
    tp = int(tensor_parallel or machine.accelerators)
    if tp < 1 or tp > machine.accelerators:
        raise InputError(f"tensor_parallel {tp} does not fit machine {machine.name!r} "
                         f"({machine.accelerators} accelerators)")
    mem = accelerator_memory_bytes(machine.accelerator, memory_bytes)
    return (machine.accelerators // tp) * kv_capacity_tokens(shape, tp, mem, memory_fraction)

