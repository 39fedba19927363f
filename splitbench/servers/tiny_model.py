"""A tiny random-weight Llama (HF format) with a locally trained BPE tokenizer: serves in vLLM, needs no download.

Deterministic by seed; weights via safetensors.numpy, so generating it needs neither torch nor network.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from splitbench.errors import InputError
from splitbench.workload.words import WORDS

GENERATOR_VERSION = 1
MARKER_FILE = "splitbench_tiny_model.json"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)   # ids 0..4
# chatml-style; BOS comes from the template, so tokenizing the rendered text needs no added special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Fixed list of common English words; the training corpus and ChatPrompts draw from it.
_DIGITS_PUNCT = list("0123456789") + [".", ",", ";", ":", "!", "?", "(", ")", "-", "'", '"']


def _corpus(seed: int, n_words: int = 60_000) -> list[str]:
    """English-like training text: Zipf-weighted common words, invented words, digits and punctuation."""
    rng = np.random.default_rng([seed, 1])
    syllables = ["ka", "lo", "ri", "ven", "tar", "mo", "sel", "dun", "pra", "ix", "qua", "zen", "bor",
                 "ett", "ul", "ny", "sha", "gor", "fi", "wem"]
    invented = ["".join(rng.choice(syllables, size=int(rng.integers(2, 5)))) for _ in range(1500)]
    vocab = np.array(WORDS + invented)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 0.9
    p /= p.sum()
    words = rng.choice(vocab, size=n_words, p=p).tolist()
    lines, i = [], 0
    while i < len(words):
        k = int(rng.integers(5, 20))
        chunk = words[i:i + k]
        i += k
        if rng.random() < 0.3:
            chunk.append(str(int(rng.integers(0, 10_000))))
        lines.append(" ".join(chunk) + str(rng.choice(_DIGITS_PUNCT[10:])))
    return lines


def train_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    """Byte-level BPE trained on the seeded English-like corpus; special tokens are ids 0..4."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return tok


def _weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 2])
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def lin(out_f: int, in_f: int) -> np.ndarray:
        return (rng.standard_normal((out_f, in_f), dtype=np.float32) * (in_f ** -0.5)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((v, h), dtype=np.float32) * 0.02,
         "model.norm.weight": np.ones(h, np.float32),
         "lm_head.weight": lin(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "self_attn.q_proj.weight"] = lin(h, h)
        w[p + "self_attn.k_proj.weight"] = lin(kv, h)
        w[p + "self_attn.v_proj.weight"] = lin(kv, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, h)
        w[p + "mlp.gate_proj.weight"] = lin(inter, h)
        w[p + "mlp.up_proj.weight"] = lin(inter, h)
        w[p + "mlp.down_proj.weight"] = lin(h, inter)
    return w


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """config.json's bos/eos/pad token ids in the trained tokenizer."""
    return {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS),
            "pad_token_id": tok.token_to_id(PAD)}


def _config(tok: Tokenizer, *, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
            max_position: int, dtype: str) -> dict:
    """config.json of the Llama (ids of the special tokens from the trained tokenizer)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True), "max_position_embeddings": max_position,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "initializer_range": 0.02, **special_token_ids(tok), "torch_dtype": dtype, "use_cache": True,
    }


def tokenizer_json_files(cfg: dict) -> dict[str, dict]:
    """The tokenizer's JSON files besides tokenizer.json (tokenizer config, special tokens, generation config)."""
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "pad_token": PAD, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
        "model_max_length": cfg["max_position_embeddings"], "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [IM_START, IM_END], "chat_template": CHAT_TEMPLATE,
    }
    return {
        "tokenizer_config.json": tok_cfg,
        "special_tokens_map.json": {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                                    "additional_special_tokens": [IM_START, IM_END]},
        "generation_config.json": {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
                                   "pad_token_id": cfg["pad_token_id"], "do_sample": False},
    }


def _json_files(cfg: dict, seed: int) -> dict[str, dict]:
    """The model directory's JSON files besides tokenizer.json: config, tokenizer files, marker."""
    marker = {"generator_version": GENERATOR_VERSION, "layers": cfg["num_hidden_layers"],
              "hidden": cfg["hidden_size"], "heads": cfg["num_attention_heads"],
              "kv_heads": cfg["num_key_value_heads"], "intermediate": cfg["intermediate_size"],
              "vocab_size": cfg["vocab_size"], "max_position": cfg["max_position_embeddings"], "seed": seed,
              "dtype": cfg["torch_dtype"]}
    return {"config.json": cfg, **tokenizer_json_files(cfg), MARKER_FILE: marker}


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished tmp directory at out (an existing out is swapped away, then removed)."""
    for f in tmp.iterdir():
        f.chmod(0o644)
    tmp.chmod(0o755)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "m")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_tiny_model(out_dir: str | os.PathLike, *, layers: int = 2, hidden: int = 128, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 256, vocab_size: int = 4096,
                     max_position: int = 16384, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """Write the model to out_dir (atomically: build in a sibling temp dir, then rename). Returns out_dir.

    `dtype` is the config's torch_dtype (what vLLM serves it as); the stored weights are float32.
    """
    if hidden % heads or heads % kv_heads:
        raise InputError(f"hidden ({hidden}) must divide by heads ({heads}) and heads by kv_heads ({kv_heads})")
    if min(layers, hidden, heads, kv_heads, intermediate, max_position) < 1 or vocab_size < 300:
        raise InputError("tiny model sizes must be positive and vocab_size >= 300")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok = train_tokenizer(vocab_size, seed)
        cfg = _config(tok, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                      intermediate=intermediate, max_position=max_position, dtype=dtype)
        tok.save(str(tmp / "tokenizer.json"))
        for name, obj in _json_files(cfg, seed).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        save_file(_weights(cfg, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitbench" / "models"


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """The default tiny model, generated once under cache_dir (default $XDG_CACHE_HOME/splitbench/models)."""
    out = Path(cache_dir or default_cache_dir()) / "tiny-llama"
    try:
        meta = json.loads((out / MARKER_FILE).read_text())
        if meta.get("generator_version") == GENERATOR_VERSION and (out / "model.safetensors").exists():
            return out
    except (OSError, ValueError):
        pass
    return write_tiny_model(out)
