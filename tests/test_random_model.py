"""`splitbench model random`: a real model's shapes with the tiny tokenizer padded to its vocabulary, no weight files
(the launcher adds vLLM's --load-format dummy and records it) or, with --weights, bf16 safetensors that load."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitbench.errors import InputError
from splitbench.servers import random_model as rm
from splitbench.servers.launcher import Cluster, VllmServer, weightless_model_dir
from splitbench.servers.topology import plan_cluster
from splitbench.sim.shapes import config_params, shape_from_hf_config

SMALL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 5000,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory) -> Path:
    """`splitbench model random --config llama-3.1-8b --out DIR`, through the CLI."""
    out = tmp_path_factory.mktemp("random") / "llama-3.1-8b"
    r = subprocess.run([sys.executable, "-m", "splitbench.cli", "model", "random", "--config", "llama-3.1-8b",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stdout.split())   # rich wraps the line
    assert "8.03e9 parameters" in said and "--load-format dummy" in said
    return out


def test_llama_8b_config_is_the_real_shape_and_transformers_accepts_it(llama8b):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.from_pretrained(llama8b)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 32, 4096, 14336)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (32, 8, 128256)
    assert cfg.max_position_embeddings == 131072 and str(cfg.dtype).endswith("bfloat16")
    raw = json.loads((llama8b / "config.json").read_text())
    assert raw["rope_theta"] == 500000.0 and raw["rope_scaling"]["rope_type"] == "llama3"
    assert rm.param_count(raw) == config_params(raw) == pytest.approx(8.03e9, rel=1e-3)
    shape = shape_from_hf_config(llama8b)        # the simulator sizes it without weight files
    assert shape.weight_bytes == 2 * config_params(raw) and shape.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_no_weight_files_and_the_tokenizer_covers_the_vocabulary(llama8b):
    transformers = pytest.importorskip("transformers")
    assert weightless_model_dir(llama8b) and not list(llama8b.glob("*.safetensors"))
    marker = json.loads((llama8b / rm.MARKER_FILE).read_text())
    assert marker["load_format"] == "dummy" and marker["weights"] is None and marker["config"] == "llama-3.1-8b"
    tok = transformers.AutoTokenizer.from_pretrained(llama8b)
    raw = json.loads((llama8b / "config.json").read_text())
    assert len(tok) == raw["vocab_size"]            # every id the model can generate decodes to text
    assert tok.decode([128255]) == " r128255" and tok.decode([4096]) == " r4096"
    assert (raw["bos_token_id"], raw["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    ids = tok("the cat sat on the mat")["input_ids"]
    assert ids and max(ids) < rm.TOKENIZER_MERGES_VOCAB      # prompts encode with the trained merges only


def test_launcher_serves_a_weightless_dir_with_load_format_dummy(llama8b, tmp_path):
    s = VllmServer(llama8b, port=8001, extra_args=["--uvicorn-log-level", "warning"])
    cmd = s.command()
    assert cmd[cmd.index("--load-format") + 1] == "dummy" and s.describe()["load_format"] == "dummy"
    explicit = VllmServer(llama8b, port=8001, extra_args=["--load-format=auto"])
    assert explicit.command().count("--load-format") == 0 and explicit.describe()["load_format"] == "auto"
    with_weights = tmp_path / "w"
    with_weights.mkdir()
    (with_weights / "config.json").write_text("{}")
    (with_weights / "model.safetensors").write_bytes(b"")
    assert "--load-format" not in VllmServer(with_weights, port=8001).command()
    assert VllmServer(with_weights, port=8001).describe()["load_format"] == "auto"
    # a cluster records it per instance (run.json backend.instances[].load_format); nothing is started
    spec = plan_cluster(llama8b, prompt=1, token=1, connector="nixl", hardware="gpu-host", gpus=[0],
                        layout="splitwiser", base_args=["--uvicorn-log-level", "warning"])
    cluster = Cluster(spec, tmp_path / "run")
    assert [i["load_format"] for i in cluster.describe()] == ["dummy", "dummy"]
    assert all("dummy" in s.command() for s in cluster.servers.values())


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_weights_are_bf16_safetensors_that_load_with_every_tensor(tmp_path, monkeypatch, model_type):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = {**SMALL, "model_type": model_type, "tie_word_embeddings": model_type == "qwen2",
           "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(rm, "SHARD_BYTES", 300_000)      # several shards + index, as for a real 8B checkpoint
    out = rm.write_random_model(tmp_path / "m", tmp_path / "config.json", weights=True, seed=1)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert not weightless_model_dir(out) and "--load-format" not in VllmServer(out, port=8001).command()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == rm.param_count(cfg) == config_params(cfg)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[-1] == cfg["vocab_size"] and bool(torch.isfinite(logits).all())


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(InputError, match="neither a known config"):
        rm.resolve_config("llama-9")
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "model_type": "mixtral"}))
    with pytest.raises(InputError, match="leave out --weights"):
        rm.write_random_model(tmp_path / "m", tmp_path, weights=True)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
    r = subprocess.run([sys.executable, "-m", "splitbench.cli", "model", "random", "--config", str(tmp_path / "x.json"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
