"""The model's logits equal transformers' for the same weights, through the paged KV cache."""

from __future__ import annotations

import json

import pytest
import torch

from kvmem import create_allocator
from kvmem.engine import ModelConfig, load_model, random_model
from kvmem.engine.config import preset
from kvmem.engine.tokenizer import ByteTokenizer, IncrementalDecoder

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def hf_pair(kind: str, tmp_path):
    """A random HF model of ``kind``, saved to disk, and ours loaded from that directory."""
    c = preset("tiny")
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            head_dim=c.head_dim,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
            **common,
        )
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, **common)
        hf = transformers.Qwen2ForCausalLM(cfg)
    ours = random_model(ModelConfig.from_hf(cfg.to_dict()), seed=1)
    sd = {k: v for k, v in ours.state_dict().items() if k in hf.state_dict()}
    hf.load_state_dict(sd, strict=False)  # our O(1) random weights, not HF's 0.02 ones
    hf.eval().save_pretrained(tmp_path)
    return hf, load_model(tmp_path)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_equal_transformers_prefill_and_20_decodes(kind, tmp_path):
    hf, model = hf_pair(kind, tmp_path)
    assert model.config.attention_bias == (kind == "qwen2")
    alloc = create_allocator("paged", model.kv_spec(), num_tokens=512, page_size=16)
    ids = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(2)).tolist()
    alloc.add("s", ids)
    alloc.reserve("s", len(ids))
    lay = alloc.layout([("s", len(ids))])
    ours = model(torch.tensor(ids), torch.arange(len(ids)), lay, alloc)
    alloc.commit("s", len(ids))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ref.abs().max() > 1.0  # the logits are not trivially small
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)
    seq = list(ids)
    for _ in range(20):
        nxt = int(ref[-1].argmax())
        seq.append(nxt)
        alloc.append("s", [nxt])
        alloc.reserve("s", 1)
        lay = alloc.layout([("s", 1)])
        step = model(torch.tensor([nxt]), torch.tensor([len(seq) - 1]), lay, alloc)
        alloc.commit("s", 1)
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(step[0], ref[-1], atol=TOL, rtol=0)
    alloc.check_integrity()


def test_checkpoint_mismatch_is_a_clear_error(tmp_path):
    _, model = hf_pair("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="missing"):
        load_model(tmp_path)
    assert model.config.num_layers == 2


def test_byte_tokenizer_streams_multibyte_text_whole():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    dec = IncrementalDecoder(tok)
    parts = [dec.feed([i]) for i in ids]
    assert "".join(parts) + dec.flush() == "héllo ✓"
    assert all("\ufffd" not in p for p in parts)


def test_engine_from_a_checkpoint_directory_with_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kvmem.engine import Engine, HFTokenizer, SamplingParams

    _, model = hf_pair("llama", tmp_path)
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "kv": 3, "cache": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    eng = Engine.from_pretrained(str(tmp_path), num_kv_tokens=512)
    assert isinstance(eng.tokenizer, HFTokenizer)
    assert eng.tokenizer.encode("hello kv cache") == [1, 3, 4]
    [c] = eng.generate(["hello world"], SamplingParams(max_tokens=5, ignore_eos=True))
    assert c.prompt_token_ids == [1, 2] and len(c.output_token_ids) == 5
