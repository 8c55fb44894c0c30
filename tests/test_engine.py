"""The generation engine: greedy parity with transformers, continuous batching, the tool interruption."""
import pytest
import torch
import transformers

import data
import retool

TRACE = ("<code>\n```python\nprint(6*7)\n```\n</code>\n<interpreter>\n42\n</interpreter>\n"
         "<code>\n```python\nprint(42+1)\n```\n</code>\n<interpreter>\n43\n</interpreter>\n\\boxed{43}")
MESSAGES = [{"role": "user", "content": "What is 6*7+1?"}, {"role": "assistant", "content": TRACE}]
OUTPUTS = {"print(6*7)": "42", "print(42+1)": "43"}


def scripted_tool(codes):
    return [OUTPUTS.get(c.strip(), "NameError: unknown") for c in codes]


@pytest.fixture(scope="module")
def tokenizer():
    return data.builtin_tokenizer()


def tiny(tokenizer, seed=0):
    cfg = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    return retool.build_model(cfg, seed).eval()


@pytest.fixture(scope="module")
def memorized(tokenizer):
    """A tiny model trained to reproduce one two-call trace (so it emits </code> twice)."""
    ids, mask = data.tokenize_trace(tokenizer, MESSAGES)
    model = tiny(tokenizer).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    w = torch.tensor([mask[1:]], dtype=torch.float)
    for _ in range(150):
        loss = (torch.nn.functional.cross_entropy(model(x)[0], y[0], reduction="none") * w[0]).sum() / w.sum()
        opt.zero_grad(), loss.backward(), opt.step()
    assert loss.item() < 0.01
    return model.eval(), ids, mask


def test_greedy_matches_transformers_generate(tokenizer, tmp_path):
    model = tiny(tokenizer, seed=3)
    retool.save_model(model, tokenizer, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = [data.render_prompt(tokenizer, p) for p in ("What is 12*34?", "Count primes below 50.")]
    ours = retool.generate(model, tokenizer, prompts, max_new_tokens=24, temperature=0)
    eos = sorted(retool.stop_ids(tokenizer))
    for p, t in zip(prompts, ours):
        out = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=eos,
                          pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
        assert t.response_ids == out
        assert t.finish_reason == ("eos" if out[-1] in eos else "length")


def test_continuous_batching_equals_each_prompt_alone(tokenizer):
    model = tiny(tokenizer, seed=4)
    prompts = [data.render_prompt(tokenizer, f"What is {7 * i} plus {i * i}?")[: 20 + 3 * i] for i in range(7)]
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, top_k=50, seed=[11 * i for i in range(7)])):
        batched = retool.generate(model, tokenizer, prompts, max_new_tokens=16, max_batch=3, **kw)
        for i, p in enumerate(prompts):
            one = dict(kw, seed=kw["seed"][i:i + 1]) if "seed" in kw else kw
            alone = retool.generate(model, tokenizer, [p], max_new_tokens=16, **one)[0]
            assert batched[i].response_ids == alone.response_ids
            assert batched[i].logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_sampling_respects_top_k_and_is_seeded():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4000)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    tokens, logps = retool.sample(logits, 1.0, 1.0, 2, u)
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).float().mean().item() - 1 / (1 + torch.e ** -1)) < 0.03
    assert torch.allclose(logps[tokens == 1], torch.log(torch.tensor(1 / (1 + torch.e))))
    tokens, _ = retool.sample(logits, 1.0, 0.5, 0, u)
    assert set(tokens.tolist()) == {0}  # p(0) = 0.64 already covers top_p 0.5


def test_interrupted_stream_equals_sft_tokenization(tokenizer, memorized):
    model, ids, mask = memorized
    prompt = data.render_prompt(tokenizer, "What is 6*7+1?")
    t = retool.generate(model, tokenizer, [prompt], max_new_tokens=80, temperature=0, tool=scripted_tool)[0]
    assert t.prompt_ids + t.response_ids == ids  # one token stream for SFT and RL
    assert [0] * len(prompt) + t.loss_mask == mask
    assert [(c.code.strip(), c.feedback, c.status) for c in t.tool_calls] == [
        ("print(6*7)", "42", "ok"), ("print(42+1)", "43", "ok")]
    assert t.finish_reason == "eos" and t.text.endswith("\\boxed{43}")
    injected = [tok for tok, m in zip(t.response_ids, t.loss_mask) if m == 0]
    assert injected == data.encode_interpreter(tokenizer, "42") + data.encode_interpreter(tokenizer, "43")
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.loss_mask) if m == 0)


def test_engine_logprobs_match_a_full_forward(tokenizer, memorized):
    model, _, _ = memorized
    prompts = [data.render_prompt(tokenizer, "What is 6*7+1?")] * 3 + [data.render_prompt(tokenizer, "Hi")]

    class Result:  # a sandbox-like result object
        def __init__(self, feedback):
            self.feedback, self.status = feedback, "error" if "Error" in feedback else "ok"

    trajs = retool.generate(model, tokenizer, prompts, max_new_tokens=60, temperature=1.0, seed=5, max_batch=2,
                            tool=lambda codes: [Result(f) for f in scripted_tool(codes)])
    assert sum(len(t.tool_calls) for t in trajs) >= 6
    for t in trajs:
        seq = torch.tensor([t.prompt_ids + t.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq)[0, :-1].float(), -1)
        ref = logp[len(t.prompt_ids) - 1:].gather(-1, torch.tensor(t.response_ids)[:, None])[:, 0]
        for lp, r, m in zip(t.logprobs, ref.tolist(), t.loss_mask):
            assert lp == 0.0 if m == 0 else abs(lp - r) < 1e-4
        for call in t.tool_calls:
            assert call.status == ("error" if "Error" in call.feedback else "ok")


def test_caps_end_trajectories_and_say_so(tokenizer, memorized):
    model, _, _ = memorized
    prompt = data.render_prompt(tokenizer, "What is 6*7+1?")
    capped = retool.generate(model, tokenizer, [prompt], max_new_tokens=80, temperature=0, tool=scripted_tool,
                             max_tool_calls=1)[0]
    assert capped.finish_reason == "max_tool_calls" and len(capped.tool_calls) == 1
    assert capped.text.count("</code>") == 2 and capped.loss_mask[-1] == 1
    short = retool.generate(model, tokenizer, [prompt], max_new_tokens=5, temperature=0, tool=scripted_tool)[0]
    assert short.finish_reason == "length" and len(short.response_ids) == 5
    # the interpreter block would not fit: the trajectory ends at </code>, nothing half-injected
    no_room = retool.generate(model, tokenizer, [prompt], max_new_tokens=12, temperature=0, tool=scripted_tool)[0]
    assert no_room.finish_reason == "length" and no_room.text.endswith("</code>") and all(no_room.loss_mask)
    broken = retool.generate(model, tokenizer, [prompt], max_new_tokens=80, temperature=0,
                             tool=lambda codes: 1 / 0)[0]
    assert broken.tool_calls[0].status == "internal" and "ZeroDivisionError" in broken.tool_calls[0].feedback
    stopped = retool.generate(model, tokenizer, [prompt], max_new_tokens=80, temperature=0, stop=["python"])[0]
    assert stopped.finish_reason == "stop" and stopped.text.endswith("python")


def test_extract_code_takes_the_last_python_block():
    text = "x <code>\n```python\na=1\n```\n</code> y <code>\n```python\nb=2\n```\n```python\nc=3\n```\n</code>"
    assert retool.extract_code(text) == "c=3\n"


def test_sampling_never_picks_a_filtered_token_at_u_near_one():
    logits = torch.tensor([[5.0, 4.0, -1e9, -1e9]])
    tokens, logps = retool.sample(logits, 1.0, 0.9, 0, torch.tensor([1 - 2**-26], dtype=torch.float64))
    assert tokens.item() in (0, 1) and torch.isfinite(logps).all()


def test_stop_strings_ending_in_whitespace_fire(tokenizer, memorized):
    model, _, _ = memorized
    prompt = data.render_prompt(tokenizer, "What is 6*7+1?")
    t = retool.generate(model, tokenizer, [prompt], max_new_tokens=80, temperature=0, stop=["```python\n"])[0]
    # stops at the token that completes the string (here "\nprint(" completes "```python\n")
    assert t.finish_reason == "stop" and t.text.startswith("<code>\n```python\n") and "6*7" not in t.text


def test_bad_prompts_and_tools_fail_loudly_instead_of_hanging(tokenizer, memorized):
    model, _, _ = memorized
    with pytest.raises(ValueError, match="empty prompt"):
        retool.generate(model, tokenizer, [[]], max_new_tokens=4)
    prompt = data.render_prompt(tokenizer, "What is 6*7+1?")
    t = retool.generate(model, tokenizer, [prompt], max_new_tokens=80, temperature=0, tool=lambda codes: [])[0]
    assert t.tool_calls[0].status == "internal" and "0 results for 1 calls" in t.tool_calls[0].feedback
    assert retool.extract_code("abcdefghij</code>") == "abcdefghij"


def test_autocast_hands_attention_one_dtype():
    """Under bf16 autocast q and k must reach attention in bf16 like v (fp32 rotary tables would
    promote them, and flash kernels would never be chosen)."""
    model = tiny(data.builtin_tokenizer(), seed=2)
    seen = []
    ids = torch.randint(0, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, document_ids=torch.zeros_like(ids))
    original = retool.packed_attention
    try:
        retool.packed_attention = lambda q, k, v, d: seen.append((q.dtype, k.dtype, v.dtype)) or original(q, k, v, d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, document_ids=torch.zeros_like(ids))
    finally:
        retool.packed_attention = original
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen)


def test_segment_attention_equals_the_masked_form():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 12, 4, 8, generator=g), torch.randn(2, 12, 2, 8, generator=g), torch.randn(2, 12, 2, 8, generator=g)
    docs = torch.tensor([[0] * 5 + [1] * 4 + [-1] * 3, [0] * 12])
    assert (retool.segment_attention(q, k, v, docs) - retool.packed_attention(q, k, v, docs)).abs().max() < 1e-5


def test_paged_cache_gives_the_contiguous_tokens_under_preemption_and_sharing(tokenizer, memorized, monkeypatch):
    """A pool too small for two rows (preemption), blocks of 4 (the copies of a prompt share its
    blocks) and tool interruptions: the same tokens, tool calls and log-probs as one contiguous
    block per row with room for every row."""
    model, _, _ = memorized
    prompts = [data.render_prompt(tokenizer, "What is 6*7+1?")] * 4 + [data.render_prompt(tokenizer, q)
                                                                      for q in ("Hi", "What is 2+2?")]
    counts = {"preempt": 0, "shared": 0}
    preempt, share = retool.Engine.preempt, retool.KVCache.share

    def counting_preempt(self, i):
        counts["preempt"] += 1
        preempt(self, i)

    def counting_share(self, blocks):
        counts["shared"] += len(blocks)
        share(self, blocks)

    monkeypatch.setattr(retool.Engine, "preempt", counting_preempt)
    monkeypatch.setattr(retool.KVCache, "share", counting_share)
    kw = dict(max_new_tokens=60, temperature=1.0, seed=3, max_batch=6, tool=scripted_tool)
    contiguous = retool.generate(model, tokenizer, prompts, block_size=10_000, **kw)  # one block per row (cut to max_total_len)
    assert counts == {"preempt": 0, "shared": 0}
    longest = max(len(t.prompt_ids) for t in contiguous) + 60
    budget = retool.kv_bytes(model.config, longest * 3 // 2, 4)  # fp32 keys and values of 1.5 rows
    paged = retool.generate(model, tokenizer, prompts, block_size=4, kv_budget=budget, **kw)
    assert counts["preempt"] > 0 and counts["shared"] > 0
    assert sum(len(t.tool_calls) for t in contiguous) >= 6
    for c, p in zip(contiguous, paged):
        assert (p.response_ids, p.loss_mask, p.finish_reason) == (c.response_ids, c.loss_mask, c.finish_reason)
        assert [(x.code, x.feedback) for x in p.tool_calls] == [(x.code, x.feedback) for x in c.tool_calls]
        assert max(abs(a - b) for a, b in zip(p.logprobs, c.logprobs)) <= 1e-5


def test_a_kv_budget_without_room_for_one_row_is_refused(tokenizer, memorized):
    model, _, _ = memorized
    prompt = data.render_prompt(tokenizer, "Hi")
    with pytest.raises(ValueError, match="one row needs .* \\(max_total_len\\)"):
        retool.generate(model, tokenizer, [prompt], max_new_tokens=40, block_size=4,
                        kv_budget=retool.kv_bytes(model.config, 8, 4))
