"""Real-architecture models with random weights: a known model's config.json shapes (or any HF config.json) and the
tiny model's locally trained tokenizer, no download; vLLM initialises the weights itself (`--load-format dummy`).

`weights=True` writes bf16 safetensors instead, streamed tensor by tensor (16 GB for Llama-3.1-8B), for paths
that need weight files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from splitbench.errors import InputError
from splitbench.servers.tiny_model import replace_dir, special_token_ids, tokenizer_json_files, train_tokenizer

GENERATOR_VERSION = 1
MARKER_FILE = "splitbench_random_model.json"
DEFAULT_CONFIG = "llama-3.1-8b"
TOKENIZER_MERGES_VOCAB = 4096      # trained BPE tokens; unreachable filler tokens pad it to the config's vocab
SHARD_BYTES = 5 * 10**9            # --weights: safetensors shard size (HF's usual 5 GB)
WEIGHT_MODEL_TYPES = ("llama", "mistral", "qwen2")   # dense decoders whose tensors --weights knows

_LLAMA3_BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "vocab_size": 128256, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0, "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
                "initializer_range": 0.02, "use_cache": True}


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


# Shapes from each model's Hugging Face config.json (huggingface.co/<repo>/blob/main/config.json).
KNOWN_CONFIGS: dict[str, dict] = {
    # meta-llama/Llama-3.1-8B: 32 layers, hidden 4096, intermediate 14336, 32 heads, 8 KV heads (GQA), head dim 128
    "llama-3.1-8b": {**_LLAMA3_BASE, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "rope_scaling": _llama3_rope(8.0), "tie_word_embeddings": False},
    # meta-llama/Llama-3.2-1B: 16 layers, hidden 2048, intermediate 8192, 32 heads, 8 KV heads, head dim 64, tied
    "llama-3.2-1b": {**_LLAMA3_BASE, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "rope_scaling": _llama3_rope(32.0), "tie_word_embeddings": True},
    # meta-llama/Llama-3.2-3B: 28 layers, hidden 3072, intermediate 8192, 24 heads, 8 KV heads, head dim 128, tied
    "llama-3.2-3b": {**_LLAMA3_BASE, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
                     "rope_scaling": _llama3_rope(32.0), "tie_word_embeddings": True},
    # Qwen/Qwen2.5-7B: 28 layers, hidden 3584, intermediate 18944, 28 heads, 4 KV heads, q/k/v biases
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                   "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16", "initializer_range": 0.02,
                   "use_cache": True},
}


def resolve_config(config: str | os.PathLike | None) -> tuple[dict, str]:
    """(config dict, where it came from): a KNOWN_CONFIGS name, or a config.json file or a directory holding one."""
    config = config if config is not None else DEFAULT_CONFIG
    if str(config) in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[str(config)]), str(config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InputError(f"--config {config}: neither a known config ({', '.join(KNOWN_CONFIGS)}) "
                         f"nor a config.json file")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read model config: {e}", file=str(path)) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vocab_size"), int):
        raise InputError("config.json must be an object with an integer vocab_size", file=str(path))
    return cfg, str(path)


def _dims(cfg: dict) -> tuple[int, int, int, int, int, int, int]:
    """(layers, hidden, intermediate, heads, kv heads, head dim, vocab) of a dense decoder config."""
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return (int(cfg["num_hidden_layers"]), hidden, int(cfg["intermediate_size"]), heads,
                int(cfg.get("num_key_value_heads") or heads), int(cfg.get("head_dim") or hidden // heads),
                int(cfg["vocab_size"]))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"config.json lacks a dense decoder's shape ({e})") from None


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a Llama/Mistral/Qwen2 checkpoint of this config (Qwen2: q/k/v biases)."""
    if cfg.get("model_type") not in WEIGHT_MODEL_TYPES:
        raise InputError(f"writing weights knows model types {', '.join(WEIGHT_MODEL_TYPES)}, not "
                         f"{cfg.get('model_type')!r}; leave out --weights (vLLM's --load-format dummy serves any)")
    layers, h, inter, heads, kv_heads, hd, vocab = _dims(cfg)
    q, kv = heads * hd, kv_heads * hd
    bias = cfg["model_type"] == "qwen2" or bool(cfg.get("attention_bias"))
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter))]
        if bias:
            out += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (vocab, h)))
    return out


def param_count(cfg: dict) -> int:
    """Parameters of the checkpoint tensor_shapes() describes."""
    return sum(int(np.prod(s)) for _, s in tensor_shapes(cfg))


def padded_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    """The tiny model's trained BPE, its vocabulary padded to vocab_size with filler tokens no merge produces, so
    every id the model can generate decodes to text (" r4096", ...) while prompts encode as with the tiny model."""
    tok = train_tokenizer(TOKENIZER_MERGES_VOCAB, seed)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    n = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size < n:
        raise InputError(f"vocab_size {vocab_size} is smaller than the tokenizer's {n} tokens")
    for i in range(n, vocab_size):
        name = f"\u0120r{i}"          # byte-level " r<i>"
        vocab[name if name not in vocab else name + "_"] = i
    return Tokenizer.from_str(json.dumps(data))


# ----------------------------------------------------------------------------- bf16 safetensors, streamed

def _bf16_random(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """n random bf16 bit patterns: random sign and mantissa, exponent of `scale` (|w| in [s, 2s), s <= scale)."""
    exponent = int(np.clip(127 + np.floor(np.log2(scale)), 1, 254))
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    return (bits & np.uint16(0x807F)) | np.uint16(exponent << 7)


def _write_tensor(f, rng: np.random.Generator, name: str, shape: tuple[int, ...], chunk: int = 1 << 24) -> None:
    """One tensor's bytes (little-endian bf16): ones for norms, 0 for biases, else random at 1/sqrt(fan-in)."""
    n = int(np.prod(shape))
    if "norm" in name:
        f.write(np.full(n, 0x3F80, dtype="<u2").tobytes())   # 1.0
        return
    if name.endswith(".bias"):
        f.write(np.zeros(n, dtype="<u2").tobytes())
        return
    scale = 0.02 if "embed_tokens" in name else shape[-1] ** -0.5
    for start in range(0, n, chunk):
        f.write(_bf16_random(rng, min(chunk, n - start), scale).astype("<u2").tobytes())


def _shards(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    out: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * int(np.prod(shape))
        if out[-1] and size + nbytes > SHARD_BYTES:
            out.append([])
            size = 0
        out[-1].append((name, shape))
        size += nbytes
    return out


def write_bf16_weights(out_dir: Path, cfg: dict, seed: int) -> int:
    """The checkpoint as bf16 safetensors (one file, or 5 GB shards + model.safetensors.index.json); its bytes."""
    rng = np.random.default_rng([seed, 2])
    shards = _shards(tensor_shapes(cfg))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards, strict=True):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nbytes = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)   # the data starts 8-byte aligned
        with open(out_dir / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name, shape in shard:
                _write_tensor(f, rng, name, shape)
        total += offset
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


# ----------------------------------------------------------------------------- the model directory

def write_random_model(out_dir: str | os.PathLike, config: str | os.PathLike | None = None, *,
                       weights: bool = False, seed: int = 0) -> Path:
    """Write config.json (the config's shapes, this tokenizer's special-token ids), the padded tokenizer and a
    marker to out_dir (atomically); weight files only with `weights`. Returns out_dir.

    Without weight files splitbench's vLLM launcher adds `--load-format dummy` (servers/launcher.py)."""
    base, source = resolve_config(config)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok = padded_tokenizer(int(base["vocab_size"]), seed)
        cfg = {**base, **special_token_ids(tok)}
        cfg.setdefault("torch_dtype", "bfloat16")
        cfg.pop("transformers_version", None)
        tok.save(str(tmp / "tokenizer.json"))
        for name, obj in {"config.json": cfg, **tokenizer_json_files(cfg)}.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        weight_bytes = write_bf16_weights(tmp, cfg, seed) if weights else 0
        marker = {"generator_version": GENERATOR_VERSION, "config": source, "seed": seed,
                  "params": param_count(cfg) if cfg.get("model_type") in WEIGHT_MODEL_TYPES else None,
                  "weights": "safetensors-bf16" if weights else None, "weight_bytes": weight_bytes,
                  "load_format": "auto" if weights else "dummy",
                  "tokenizer": f"splitbench tiny-model BPE ({TOKENIZER_MERGES_VOCAB} tokens), padded to "
                               f"vocab_size with filler tokens"}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
