"""Our decoder against transformers' on tiny random checkpoints, the KV cache against full recompute,
packed rows against separate documents."""
import json

import pytest
import torch
import transformers

import data
import retool

VOCAB = 120
CONFIGS = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 24, "attention_bias": True}),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {
        "tie_word_embeddings": True, "max_position_embeddings": 4096,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
}


def tiny_hf(kind, tmp_path):
    """A random tiny transformers model saved with a tokenizer; every weight (biases, norms) random."""
    cfg_cls, model_cls, extra = CONFIGS[kind]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, **extra)
    torch.manual_seed(0)
    hf = model_cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    tokenizer = data.builtin_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_logits_match_transformers_and_round_trip(kind, tmp_path):
    hf = tiny_hf(kind, tmp_path / "hf")
    model, _ = retool.load_model(tmp_path / "hf", device="cpu")
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)
    assert (got - want).abs().max() < 1e-4
    if kind == "llama":
        assert model.lm_head.weight is model.embed_tokens.weight
    retool.save_model(model, _, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (again(ids).logits - want).abs().max() < 1e-4
    assert json.loads((tmp_path / "ours/config.json").read_text())["dtype"] == "float32"
    _, reloaded = retool.load_model(tmp_path / "ours")
    prompt = "What is 123456 * 789?\n<code>\n```python\nprint(123456 * 789)\n```\n</code>"
    assert reloaded.encode(prompt) == data.builtin_tokenizer().encode(prompt)  # the very same token stream
    assert not list((tmp_path / "ours").glob(".saving*")), "the files are renamed, never left behind"
    (tmp_path / "ours" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "ours" / "model.safetensors.index.json").write_text("{}")  # a sharded save's leftover
    retool.save_model(model, reloaded, tmp_path / "ours")
    assert (tmp_path / "ours" / "metrics.jsonl").read_text() == "{}\n", "other files stay"
    assert not (tmp_path / "ours" / "model.safetensors.index.json").exists()
    retool.remove_model(tmp_path / "ours")
    assert not (tmp_path / "ours" / "config.json").exists() and (tmp_path / "ours" / "metrics.jsonl").exists()


def test_bad_checkpoints_name_the_problem(tmp_path):
    with pytest.raises(retool.ModelError, match="no config.json"):
        retool.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(retool.ModelError, match="unsupported model_type 'gpt2'"):
        retool.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    with pytest.raises(retool.ModelError, match="missing field 'num_attention_heads'"):
        retool.load_model(tmp_path)
    hf = {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"type": "yarn", "factor": 4}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(retool.ModelError, match="unsupported rope type 'yarn'"):
        retool.load_model(tmp_path)
    del hf["rope_scaling"]
    for change, needle in (({"rope_scaling": {"rope_type": "llama3", "factor": 8}}, "llama3 rope scaling needs"),
                           ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
                           ({"hidden_size": "8"}, "hidden_size must be a positive integer, got '8'"),
                           ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
                           ({"rope_theta": None}, "rope_theta must be a positive number, got None"),
                           ({"rope_scaling": "abc"}, "rope_scaling / rope_parameters must be an object"),
                           ({"rms_norm_eps": "x"}, "rms_norm_eps must be a positive number"),
                           ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false")):
        (tmp_path / "config.json").write_text(json.dumps({**hf, **change}))
        with pytest.raises(retool.ModelError, match=needle):
            retool.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(retool.ModelError, match="no model.safetensors"):
        retool.load_model(tmp_path)
    (tmp_path / "model.safetensors").write_text("garbage")
    with pytest.raises(retool.ModelError, match="not a readable safetensors file"):
        retool.load_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[1]")
    with pytest.raises(retool.ModelError, match="expected a JSON object"):
        retool.load_model(tmp_path)
    for bad in ("{bad", "[1]"):
        (tmp_path / "config.json").write_text(bad)
        with pytest.raises(retool.ModelError, match="config.json: (unreadable|expected)"):
            retool.load_model(tmp_path)


def tiny_model(seed=0, **kw):
    cfg = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, **kw)
    return retool.build_model(cfg, seed).eval()


def test_cached_decode_equals_full_recompute():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    lengths = [5, 11, 8]
    seqs = [torch.randint(0, VOCAB, (n + 9,), generator=g) for n in lengths]
    cache = retool.KVCache(model.config, 16, 4, "cpu", torch.float32)  # blocks of 4 positions
    tables, done = [[], [], []], [0, 0, 0]

    def feed(rows, chunks):
        for r, c in zip(rows, chunks):  # blocks handed out as rows grow: interleaved in the pool
            tables[r] += cache.allocate(cache.blocks_for(done[r] + len(c)) - len(tables[r]))
        T = max(len(c) for c in chunks)
        ids = torch.stack([torch.cat([torch.zeros(T - len(c), dtype=torch.long), c]) for c in chunks])
        cache.prepare([tables[r] for r in rows], [done[r] for r in rows], [len(c) for c in chunks])
        with torch.no_grad():
            return model(ids, cache=cache)[:, -1]

    # prompts of different lengths in one left-padded chunk, then a subset in another order,
    # then a multi-token append to one row, then single-token decodes of all rows
    steps = [([0, 1, 2], lengths), ([2, 0], [1, 3]), ([1], [4]), ([0, 1, 2], [1, 1, 1]), ([0, 1, 2], [1, 1, 1])]
    for rows, ns in steps:
        chunks = [seqs[r][done[r]:done[r] + n] for r, n in zip(rows, ns)]
        got = feed(rows, chunks)
        for r, n in zip(rows, ns):
            done[r] += n
        with torch.no_grad():
            want = torch.stack([model(seqs[r][None, :done[r]])[0, -1] for r in rows])
        assert (got - want).abs().max() < 1e-5
    assert sorted(b for t in tables for b in t) == list(range(16 - len(cache.free)))  # no block handed out twice
    assert [len(t) for t in tables] == [cache.blocks_for(n) for n in done]


def test_cache_attention_matches_flash_kvcache_semantics():
    """flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=total, block_table=table, causal=True):
    query i of a T-token chunk sits at position total - T + i and sees keys 0..that position, key p
    of row r lying at offset p % block_size of block table[r][p // block_size]."""
    torch.manual_seed(0)
    H, Hkv, D, T, bs = 4, 2, 8, 3, 4
    c = retool.ModelConfig(vocab_size=1, hidden_size=H * D, intermediate_size=1, num_hidden_layers=1,
                           num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D)
    cache = retool.KVCache(c, 12, bs, "cpu", torch.float32)
    cache.k.normal_(), cache.v.normal_()
    tables, cached, n_new = [[7, 2, 9], [4, 0, 11], [5]], [6, 9, 0], [3, 2, 3]  # shuffled, non-contiguous blocks
    q, k, v = torch.randn(3, T, H, D), torch.randn(3, T, Hkv, D), torch.randn(3, T, Hkv, D)
    cache.prepare(tables, cached, n_new)
    got = cache.attend(q, k, v, 0)
    for r, n in enumerate(n_new):
        total = cached[r] + n
        keys = torch.cat([cache.k[0, b] for b in tables[r]])[:total]  # new keys were written in place
        vals = torch.cat([cache.v[0, b] for b in tables[r]])[:total]
        assert torch.equal(keys[total - n:], k[r, T - n:])
        for i in range(T - n, T):
            pos = total - T + i
            s = torch.einsum("hd,shd->hs", q[r, i], keys[:pos + 1].repeat_interleave(H // Hkv, 1)) / D ** 0.5
            ref = torch.einsum("hs,shd->hd", s.softmax(-1), vals[:pos + 1].repeat_interleave(H // Hkv, 1))
            assert (got[r, i] - ref).abs().max() < 1e-5


def test_a_reused_block_carries_nothing_of_its_last_row():
    """SDPA reads masked positions past a short row's end (up to the longest row), and NaN + -inf is
    NaN: a block must come back zeroed, or one diverged row would poison the next to get it."""
    model = tiny_model()
    cache = retool.KVCache(model.config, 4, 4, "cpu", torch.float32)
    stale = cache.allocate(4)
    cache.k[:, stale], cache.v[:, stale] = float("nan"), float("nan")
    cache.release(stale)
    short, long = cache.allocate(1), cache.allocate(2)
    with torch.no_grad():
        cache.prepare([short, long], [0, 0], [2, 7])  # left-padded prompts of 2 and 7 tokens
        model(torch.arange(1, 8).expand(2, 7).contiguous(), cache=cache)
        cache.prepare([short, long], [2, 7], [1, 1])  # a decode step: the short row reads 8 positions
        out = model(torch.tensor([[8], [8]]), cache=cache)
    assert torch.isfinite(out).all()


def test_packed_rows_equal_separate_documents():
    model = tiny_model(seed=1)
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (7, 12, 5)]
    ids = torch.cat(docs + [torch.zeros(4, dtype=torch.long)])[None]  # three documents and padding
    doc_ids = torch.cat([torch.full((len(d),), j) for j, d in enumerate(docs)] + [torch.full((4,), -1)])[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs] + [torch.arange(4)])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, document_ids=doc_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    assert (packed[:24] - alone).abs().max() < 1e-5
    assert model.hidden(ids, pos, doc_ids).shape == (1, 28, 64)
