"""Request bodies with an exact prompt length: random token-id prompts, or chat text calibrated to a token count.

Both are deterministic in (seed, trace_index) and unique per request within a run (a later run with the same seed
against the same server finds them in its prefix cache: `splitbench profile` draws a fresh seed for that reason);
token-id prompts of a prefix-hash workload are built from its hash blocks instead, so the cache sees its reuse.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from splitbench.errors import InputError
from splitbench.workload.types import Workload
from splitbench.workload.words import WORDS

_PREFIX_KEY = 2 ** 62  # rng stream of the shared prefix; trace indexes never reach it
_BLOCK_KEY = 2 ** 62 + 1  # rng streams of hash blocks: [seed, _BLOCK_KEY, salt, hash id as uint64]
_BLOCK_CACHE = 4096       # hash blocks kept drawn (int64 arrays: 4 KiB per 512-token block)


def salt_key(salt: str | int | None) -> int:
    """--prefix-salt as a non-negative integer: a whole number >= 0 as given, other text its sha256's first 8
    bytes; None (no salt) is 0, so salt 0 is the unsalted play."""
    if salt is None:
        return 0
    text = str(salt).strip()
    if text.isdigit():
        return int(text)
    if not text:
        raise InputError("--prefix-salt must be a whole number or non-empty text")
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _tokenizer_file(path: str | Path) -> Path:
    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise InputError("no tokenizer.json here (need a fast-tokenizer model dir)", file=str(p))
    return f


class TokenIdPrompts:
    """`{"prompt": [ids]}` of exactly input_tokens random non-special ids; the first K shared if asked."""

    def __init__(self, vocab_size: int, special_ids: set[int] | frozenset[int] = frozenset(), seed: int = 0,
                 shared_prefix_tokens: int = 0, prefix_salt: str | int | None = None):
        if vocab_size < 2:
            raise InputError(f"vocab_size must be >= 2, got {vocab_size}")
        if shared_prefix_tokens < 0:
            raise InputError(f"shared_prefix_tokens must be >= 0, got {shared_prefix_tokens}")
        self.vocab_size, self.seed = int(vocab_size), int(seed)
        self.special_ids = frozenset(int(i) for i in special_ids)
        allowed = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64),
                               np.fromiter(self.special_ids, np.int64, len(self.special_ids)))
        if allowed.size == 0:
            raise InputError("every token id is special; nothing to sample from")
        # A contiguous range samples without the lookup table (the common case: specials first or last).
        self._range = (int(allowed[0]), int(allowed[-1]) + 1) \
            if allowed[-1] - allowed[0] + 1 == allowed.size else None
        self._allowed = allowed
        self.shared_prefix_tokens = int(shared_prefix_tokens)
        self._prefix = self._draw(np.random.default_rng([self.seed, _PREFIX_KEY]),
                                  self.shared_prefix_tokens).tolist()
        self.min_input_tokens = 1
        self.prefix_salt, self._salt = prefix_salt, salt_key(prefix_salt)
        self._hashes: dict[int, np.ndarray] = {}   # trace_index -> hash ids (use_prefix_hashes)
        self.block_tokens = 0
        self._blocks: dict[int, np.ndarray] = {}

    def use_prefix_hashes(self, w: Workload) -> "TokenIdPrompts":
        """Build request prompts from w's hash blocks: request i = block(h) for h in its hashes, cut to its input
        tokens, then unique tokens if the hashes cover less; block(h) depends only on (seed, salt, h)."""
        if w.prefix_hashes is None:
            return self
        if self.shared_prefix_tokens:
            raise InputError("--shared-prefix gives every prompt one prefix; this workload has its own prefix hashes "
                             "(use one or the other; synth: system_prompts=N,system_share=F is the hashed kind)")
        self._hashes = dict(zip(w.trace_index.tolist(), w.prefix_hashes))
        self.block_tokens, self._blocks = int(w.block_tokens), {}
        return self

    def block(self, h: int) -> np.ndarray:
        """The block_tokens token ids of hash id h (seeded by seed, salt and h alone)."""
        got = self._blocks.get(h)
        if got is None:
            if len(self._blocks) >= _BLOCK_CACHE:
                self._blocks.clear()
            rng = np.random.default_rng([self.seed, _BLOCK_KEY, self._salt, int(h) & 0xFFFFFFFFFFFFFFFF])
            got = self._blocks[h] = self._draw(rng, self.block_tokens).astype(np.int64)
        return got

    def _hashed(self, hashes: np.ndarray, trace_index: int, n: int) -> list[int]:
        need = min(hashes.size, -(-n // self.block_tokens))
        blocks = [self.block(h) for h in hashes[:need].tolist()] or [np.empty(0, np.int64)]
        ids = np.concatenate(blocks)[:n].tolist()
        if len(ids) < n:   # the trace gave fewer hash ids than blocks: the rest is this request's own
            ids += self._draw(np.random.default_rng([self.seed, int(trace_index)]), n - len(ids)).tolist()
        return ids

    @classmethod
    def from_tokenizer(cls, path: str | Path, seed: int = 0, shared_prefix_tokens: int = 0,
                       prefix_salt: str | int | None = None) -> "TokenIdPrompts":
        """Vocab size and special ids from a model dir (or its tokenizer.json)."""
        f = _tokenizer_file(path)
        try:
            tok = json.loads(f.read_text())
            vocab = tok["model"]["vocab"]
            ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
            added = tok.get("added_tokens") or []
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"cannot read tokenizer: {e}", file=str(f)) from None
        ids += [t["id"] for t in added]
        special = {int(t["id"]) for t in added if t.get("special")}
        return cls(max(ids) + 1, special, seed=seed, shared_prefix_tokens=shared_prefix_tokens,
                   prefix_salt=prefix_salt)

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self._range is not None:
            return rng.integers(self._range[0], self._range[1], n)
        return self._allowed[rng.integers(0, self._allowed.size, n)]

    def token_ids(self, trace_index: int, input_tokens: int) -> list[int]:
        n = int(input_tokens)
        if n < 1:
            raise InputError(f"input_tokens must be >= 1, got {n} (trace row {trace_index})")
        hashes = self._hashes.get(int(trace_index)) if self._hashes else None
        if hashes is not None:
            return self._hashed(hashes, trace_index, n)
        k = min(self.shared_prefix_tokens, n)
        own = self._draw(np.random.default_rng([self.seed, int(trace_index)]), n - k).tolist()
        return self._prefix[:k] + own if k else own

    def payload(self, trace_index: int, input_tokens: int) -> dict[str, Any]:
        return {"prompt": self.token_ids(trace_index, input_tokens)}

    def build(self, trace_index: int, input_tokens: int) -> tuple[dict[str, Any], int]:
        """(payload, prompt tokens the server will count): always exactly input_tokens."""
        return self.payload(trace_index, input_tokens), int(input_tokens)

    def describe(self) -> dict[str, Any]:
        out = {"kind": "token_ids", "vocab_size": self.vocab_size, "special_ids": sorted(self.special_ids),
               "seed": self.seed, "shared_prefix_tokens": self.shared_prefix_tokens}
        if self._hashes:
            out["prefix_blocks"] = {"block_tokens": self.block_tokens, "requests": len(self._hashes),
                                    "salt": None if self.prefix_salt is None else str(self.prefix_salt),
                                    "salt_key": self._salt}
        return out


def _special(cfg: dict, name: str) -> str:
    v = cfg.get(name)
    if isinstance(v, dict):
        v = v.get("content")
    return v or ""


def _raise(message: str):
    raise ValueError(message)


class ChatPrompts:
    """`{"messages": [{"role": "user", "content": text}]}` whose chat-templated prompt is exactly input_tokens.

    Renders the model's chat template the way transformers does (sandboxed jinja2, add_generation_prompt=True)
    and counts tokens of the rendered text without added special tokens, as vLLM's chat endpoint does.
    If the template alone is longer than input_tokens, the prompt is clamped to one word (strict=False; build()
    returns the real count) or InputError is raised (strict=True).
    """

    def __init__(self, tokenizer_dir: str | Path, seed: int = 0, *, strict: bool = False,
                 words: list[str] | None = None):
        self.tokenizer_dir, self.seed, self.strict = Path(tokenizer_dir), int(seed), strict
        f = _tokenizer_file(tokenizer_dir)
        self._tok = Tokenizer.from_file(str(f))
        cfg_file = f.parent / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template and (f.parent / "chat_template.jinja").is_file():
            template = (f.parent / "chat_template.jinja").read_text()
        if not template:
            raise InputError("tokenizer has no chat_template", file=str(cfg_file))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(template)
        self._specials = {k: _special(cfg, k) for k in
                          ("bos_token", "eos_token", "pad_token", "unk_token")}
        # Word table: token count of each word with its leading space; 1-token words fill the last gaps.
        words = list(dict.fromkeys(words or WORDS))
        counts = np.array([len(e.ids) for e in
                           self._tok.encode_batch([" " + w for w in words], add_special_tokens=False)])
        self._words, self._counts = np.array(words, dtype=object), counts
        self._mean_count = float(counts.mean())
        self._ones = self._words[counts == counts.min()]
        self._one_count = int(counts.min())
        self.template_tokens = self.count("")
        self.min_input_tokens = self.count(str(self._ones[0]))

    def render(self, content: str) -> str:
        return self._template.render(messages=[{"role": "user", "content": content}],
                                     add_generation_prompt=True, **self._specials)

    def count(self, content: str) -> int:
        """Prompt tokens of the chat-templated request with this user content."""
        return len(self._tok.encode(self.render(content), add_special_tokens=False).ids)

    def build(self, trace_index: int, input_tokens: int) -> tuple[dict[str, Any], int]:
        """(payload, prompt tokens it really makes); equal to input_tokens unless clamped."""
        target = int(input_tokens)
        budget = target - self.template_tokens
        rng = np.random.default_rng([self.seed, int(trace_index)])
        if target < self.min_input_tokens:
            if self.strict:
                raise InputError(f"input_tokens {target} is below the chat template's minimum "
                                 f"{self.min_input_tokens} (trace row {trace_index})")
            words = [str(rng.choice(self._ones))]
            return self._payload(words), self.count(words[0])
        # Bulk: random words whose summed counts stay within the budget; then exact-check and adjust.
        n = int(budget / self._mean_count) + 8
        idx = rng.integers(0, len(self._words), n)
        keep = int(np.searchsorted(np.cumsum(self._counts[idx]), budget, side="right"))
        words = self._words[idx[:keep]].tolist()
        got = self.count(" ".join(words))
        for _ in range(12):
            diff = target - got
            if diff == 0:
                break
            if diff > 0:
                words += rng.choice(self._ones, max(1, diff // self._one_count)).tolist()
            else:
                drop = 0
                while words and drop < -diff:
                    drop += len(self._tok.encode(" " + words.pop(), add_special_tokens=False).ids)
                if not words:
                    words = [str(rng.choice(self._ones))]
            got = self.count(" ".join(words))
        if got != target and self.strict:
            raise InputError(f"could not calibrate a chat prompt of {target} tokens (got {got}, "
                             f"trace row {trace_index})")
        return self._payload(words), got

    def payload(self, trace_index: int, input_tokens: int) -> dict[str, Any]:
        return self.build(trace_index, input_tokens)[0]

    @staticmethod
    def _payload(words: list[str]) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": " ".join(words)}]}

    def describe(self) -> dict[str, Any]:
        return {"kind": "chat", "tokenizer_dir": str(self.tokenizer_dir), "seed": self.seed,
                "template_tokens": self.template_tokens, "min_input_tokens": self.min_input_tokens,
                "strict": self.strict}


def prompt_source(model_info: dict, *, api: str = "completions", tokenizer: str | None = None,
                  vocab_size: int | None = None, seed: int = 0, shared_prefix_tokens: int = 0,
                  prefix_salt: str | int | None = None, workload: Workload | None = None):
    """The prompt source for a served model: its local tokenizer (vLLM reports the model path as `root`) or the
    given one gives exact-length prompts; else token ids below `vocab_size` (1000: low ids exist everywhere).
    A workload with prefix hashes gets prompts built from its hash blocks (token ids only)."""
    hashed = workload is not None and workload.prefix_hashes is not None
    if api == "chat" and hashed:
        raise InputError("--api chat cannot reproduce a prefix-hash trace's blocks exactly; use --api completions")
    tok = tokenizer
    root = model_info.get("root")
    if tok is None and root and any((Path(root) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = root
    if api == "chat":
        if not tok:
            raise InputError("--api chat needs --tokenizer DIR (to calibrate prompt lengths exactly)")
        return ChatPrompts(tok, seed=seed)
    if tok:
        src = TokenIdPrompts.from_tokenizer(tok, seed=seed, shared_prefix_tokens=shared_prefix_tokens,
                                            prefix_salt=prefix_salt)
    else:
        src = TokenIdPrompts(vocab_size=vocab_size or 1000, special_ids=set(range(10)), seed=seed,
                             shared_prefix_tokens=shared_prefix_tokens, prefix_salt=prefix_salt)
    return src.use_prefix_hashes(workload) if hashed else src
