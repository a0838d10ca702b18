"""The CPU engine against Hugging Face transformers' MixtralForCausalLM on tiny
random checkpoints: full passes, incremental decode, chunked prefill, every
checkpoint layout the loader reads, and bfloat16 weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import assert_close, hf_logits, make_hf_model, random_tokens, safetensors_torch, torch, transformers, write_consolidated

import mixtral_ext

CONFIGS = {
    # name: overrides of conftest.TINY
    "gqa1_mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=12),
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    "gqa8": dict(num_attention_heads=16, num_key_value_heads=2, head_dim=6),
    "mqa": dict(num_attention_heads=6, num_key_value_heads=1, head_dim=14),
    "experts8_top2": dict(num_local_experts=8, num_experts_per_tok=2),
    "experts4_top1": dict(num_local_experts=4, num_experts_per_tok=1),
    "experts8_top1": dict(num_local_experts=8, num_experts_per_tok=1),
    "odd_sizes": dict(vocab_size=131, hidden_size=53, intermediate_size=29, num_hidden_layers=3,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=22),
    "head_dim_default": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf(name, tmp_path):
    model = make_hf_model(seed=len(name), **CONFIGS[name])
    model.save_pretrained(tmp_path)
    engine = mixtral_ext.Engine.from_pretrained(tmp_path, max_context=128)
    ids = random_tokens(37, model.config.vocab_size, seed=len(name))
    assert_close(engine.logits(ids), hf_logits(model, ids), 1e-4)


def test_config_exposes_the_model(tiny_engine, tiny_model):
    c, hf = tiny_engine.config, tiny_model.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert (c.intermediate_size, c.num_experts, c.experts_per_token, c.vocab_size) == (
        hf.intermediate_size, hf.num_local_experts, hf.num_experts_per_tok, hf.vocab_size)
    assert c.rope_theta == hf.rope_parameters["rope_theta"]
    assert c.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert c.max_position_embeddings == hf.max_position_embeddings


def test_incremental_decode_equals_full_pass(tiny_engine, tiny_model):
    ids = random_tokens(45, tiny_model.config.vocab_size, seed=7)
    full = tiny_engine.logits(ids)
    with tiny_engine.new_sequence() as seq:
        step_logits = [seq.append(ids[:13])]
        step_logits += [seq.append([t]) for t in ids[13:30]]
        step_logits.append(seq.append(ids[30:]))  # a second prefill on top of cached tokens
        assert len(seq) == len(ids) and seq.tokens == ids
    assert_close(step_logits[0], full[12], 1e-5)
    assert_close(np.stack(step_logits[1:-1]), full[13:30], 1e-5)
    assert_close(step_logits[-1], full[-1], 1e-5)


def test_chunked_prefill_and_page_sizes_change_nothing(tiny_dir, tiny_model):
    ids = random_tokens(70, tiny_model.config.vocab_size, seed=3)
    ref = hf_logits(tiny_model, ids)
    for page_size, chunk in [(1, 7), (5, 16), (64, 1000)]:
        engine = mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=128, page_size=page_size,
                                                    max_batch_tokens=chunk)
        assert_close(engine.logits(ids), ref, 1e-4)
        with engine.new_sequence() as seq:
            assert_close(seq.append(ids), ref[-1], 1e-4)


def test_truncate_then_append_recomputes(tiny_engine, tiny_model):
    vocab = tiny_model.config.vocab_size
    a, b = random_tokens(30, vocab, seed=4), random_tokens(9, vocab, seed=5)
    with tiny_engine.new_sequence() as seq:
        seq.append(a)
        seq.append(random_tokens(17, vocab, seed=6))
        seq.truncate(len(a))
        assert seq.tokens == a
        out = seq.append(b)
    assert_close(out, hf_logits(tiny_model, a + b)[-1], 1e-4)


def test_consolidated_checkpoint_gives_the_same_logits(tiny_model, tmp_path):
    write_consolidated(tiny_model, tmp_path)
    engine = mixtral_ext.Engine.from_pretrained(tmp_path, max_context=128)
    ids = random_tokens(29, tiny_model.config.vocab_size, seed=8)
    assert_close(engine.logits(ids), hf_logits(tiny_model, ids), 1e-4)


def test_transformers4_config_and_shards(tiny_model, tmp_path):
    """config.json as the published checkpoints have it (top-level rope_theta, no head_dim),
    weights sharded with model.safetensors.index.json."""
    model = make_hf_model(seed=11, num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config.pop("head_dim")
    config["torch_dtype"] = config.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(config))
    engine = mixtral_ext.Engine.from_pretrained(tmp_path, max_context=128)
    assert engine.config.head_dim == 12 and engine.config.rope_theta == 10000.0
    ids = random_tokens(21, 101, seed=9)
    assert_close(engine.logits(ids), hf_logits(model, ids), 1e-4)


def test_fused_expert_tensors(tiny_model, tmp_path):
    """Experts stored as mlp.experts.gate_up_proj / down_proj, as transformers 5 holds them."""
    tiny_model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    safetensors_torch.save_file(state, os.path.join(tmp_path, "model.safetensors"))
    engine = mixtral_ext.Engine.from_pretrained(tmp_path, max_context=128)
    ids = random_tokens(19, tiny_model.config.vocab_size, seed=10)
    assert_close(engine.logits(ids), hf_logits(tiny_model, ids), 1e-4)


def test_bfloat16_checkpoint(tmp_path):
    model = make_hf_model(seed=12)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    ids = random_tokens(33, model.config.vocab_size, seed=12)
    bf16_ref = hf_logits(model, ids)  # HF computing in bfloat16
    # The same bf16 weights computed in float32 (loaded afresh: a cast model keeps bf16-rounded RoPE frequencies).
    exact = transformers.MixtralForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    exact_ref = hf_logits(exact, ids)
    engine = mixtral_ext.Engine.from_pretrained(tmp_path, max_context=128)
    assert_close(engine.logits(ids), exact_ref, 1e-4)  # bf16 -> float32 is exact
    engine_bf16 = mixtral_ext.Engine.from_pretrained(tmp_path, max_context=128, dtype="bfloat16")
    assert engine_bf16.weight_bytes < engine.weight_bytes
    assert_close(engine_bf16.logits(ids), exact_ref, 1e-4)
    assert_close(engine_bf16.logits(ids), bf16_ref, 5e-2)


def test_float16_weights(tiny_dir, tiny_model):
    engine = mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=128, dtype="float16")
    ids = random_tokens(25, tiny_model.config.vocab_size, seed=13)
    assert_close(engine.logits(ids), hf_logits(tiny_model, ids), 5e-3)


def test_tied_embeddings(tmp_path):
    model = make_hf_model(seed=14, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    engine = mixtral_ext.Engine.from_pretrained(tmp_path, max_context=64)
    ids = random_tokens(11, model.config.vocab_size, seed=14)
    assert_close(engine.logits(ids), hf_logits(model, ids), 1e-4)
