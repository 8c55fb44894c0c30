"""Speed, measured side by side in one run: `python bench.py` prints a table of ratios.

- engine decode tokens/s against transformers' `generate` on the same weights, batch 1 and 32, and
  the step's matmuls and attention alone (the floor any engine pays);
- the paged KV cache: blocks of 16 against one block per row, and a budget for half the rows
  (preempted and re-prefilled) against room for all;
- tool-interrupted generation against plain generation of the same total length;
- the sandbox against a fresh interpreter per snippet;
- the grader (the RL reward) in grades/s on a mix of RL-style answers;
- on CUDA: a 1.5B-shaped random model in bf16 and its decode roofline fraction.
"""
import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

import data
import retool
from sandbox import PRELOAD, Sandbox


TINY = {**retool.TINY_CONFIG, "tie_word_embeddings": False}  # the SFT preset's shape; untied: EOS rows pinned


def timed(fn, repeat=3, cuda=False):
    """Best of `repeat` wall times (the least disturbed run) and the last result. cuda: each run waits
    for the device, so the time is the kernels' and not their launch's."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def decode_floor(model, batch, context, repeat=200):
    """Seconds per decode step of the step's matmuls and attention calls alone, at the bench's shapes
    (weights hot in cache, nothing else): what any engine on this machine pays per step."""
    c = model.config
    G = c.num_attention_heads // c.num_key_value_heads
    x, a = torch.randn(batch, 1, c.hidden_size), torch.randn(batch, 1, c.num_attention_heads * c.head_dim)
    h = torch.randn(batch, 1, c.intermediate_size)
    q = torch.randn(batch, c.num_key_value_heads, G, c.head_dim)
    k, v = torch.randn(2, batch, c.num_key_value_heads, context, c.head_dim)
    mask = torch.zeros(batch, 1, G, context)
    F = torch.nn.functional

    def step():
        for block in model.layers:
            F.linear(x, block.self_attn.qkv_proj.weight, block.self_attn.qkv_proj.bias)
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            F.linear(a, block.self_attn.o_proj.weight)
            F.linear(x, block.mlp.gate_up_proj.weight)
            F.linear(h, block.mlp.down_proj.weight)
        F.linear(x, model.lm_head.weight)

    with torch.inference_mode():
        for _ in range(20):
            step()
        secs, _ = timed(lambda: [step() for _ in range(repeat)])
    return secs / repeat


def builtin_prompts(tokenizer, batch):
    return [data.render_prompt(tokenizer, p.problem) for p in data.builtin_problems("test", batch, seed=1)]


def bench_decode(model, tokenizer, hf, batch, new_tokens):
    prompts = builtin_prompts(tokenizer, batch)
    width = min(map(len, prompts))
    prompts = [p[-width:] for p in prompts]  # equal lengths: no padding on either side
    ours_s, trajs = timed(lambda: retool.generate(model, tokenizer, prompts, max_new_tokens=new_tokens,
                                                  temperature=0, max_batch=batch))
    eos = sorted(retool.stop_ids(tokenizer))
    hf_s, out = timed(lambda: hf.generate(torch.tensor(prompts), max_new_tokens=new_tokens, do_sample=False,
                                          eos_token_id=eos, pad_token_id=tokenizer.pad_token_id))
    ours_tok = sum(len(t.response_ids) for t in trajs)
    hf_tok = int(sum(((row[width:] != tokenizer.pad_token_id).sum()) for row in out))
    return ours_tok / ours_s, hf_tok / hf_s, decode_floor(model, batch, width + new_tokens // 2)


def bench_paged(model, tokenizer, batch=32, new_tokens=128):
    """The same greedy rows three ways: one block per row (the CPU default), blocks of KV_BLOCK with
    room for every row, and blocks of KV_BLOCK with a budget for half the rows."""
    prompts = builtin_prompts(tokenizer, batch)
    longest = max(map(len, prompts)) + new_tokens
    half = retool.kv_bytes(model.config, longest * batch // 2, next(model.parameters()).element_size())
    runs = {}
    for name, kw in (("contiguous", {}), ("paged", {"block_size": retool.KV_BLOCK}),
                     ("half", {"block_size": retool.KV_BLOCK, "kv_budget": half})):
        runs[name] = timed(lambda: retool.generate(model, tokenizer, prompts, max_new_tokens=new_tokens,
                                                   temperature=0, max_batch=batch, **kw))
    same = all(a.response_ids == b.response_ids for a, b in zip(runs["contiguous"][1], runs["half"][1]))
    return runs["paged"][0] / runs["contiguous"][0], runs["half"][0] / runs["paged"][0], same


def bench_interruptions(tokenizer, calls=4, batch=32):
    """A tiny model taught one trace with `calls` tool calls; generating it with the tool against
    plain generation of the same number of tokens (the tool is instant: this is the engine's cost)."""
    body = "".join(f"<code>\n```python\nprint({i}*{i})\n```\n</code>\n<interpreter>\n{i * i}\n</interpreter>\n"
                   for i in range(1, calls + 1))
    messages = [{"role": "user", "content": "Square 1 to 4."}, {"role": "assistant", "content": body + "\\boxed{16}"}]
    ids, mask = data.tokenize_trace(tokenizer, messages)
    model = retool.build_model({**TINY, "vocab_size": len(tokenizer)}, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y, w = torch.tensor([ids[:-1]]), torch.tensor(ids[1:]), torch.tensor(mask[1:], dtype=torch.float)
    for _ in range(150):
        loss = (torch.nn.functional.cross_entropy(model(x)[0], y, reduction="none") * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    prompt = data.render_prompt(tokenizer, "Square 1 to 4.")

    def tool(codes):  # print(a*b) -> a*b
        return [str(eval(c.strip()[6:-1])) for c in codes]

    with_tool_s, trajs = timed(lambda: retool.generate(model, tokenizer, [prompt] * batch, temperature=0,
                                                       max_new_tokens=len(ids), tool=tool))
    n = len(trajs[0].response_ids)
    plain_s, plain = timed(lambda: retool.generate(model, tokenizer, [prompt] * batch, temperature=0,
                                                   max_new_tokens=n, stop=()))
    assert len(trajs[0].tool_calls) == calls, "the bench model did not learn its trace"
    return with_tool_s / plain_s, len(plain[0].response_ids), n


def bench_sandbox(n=200, fresh_n=10, many=1024):
    """Sandbox latency and throughput against a fresh interpreter that imports the same modules."""
    snippets = {"print(1+1)": "print(1+1)",
                "numpy snippet": "import numpy as np\na = np.arange(100.0).reshape(10, 10)\n"
                                 "print(float(np.linalg.norm(a @ a.T)))"}
    rows = []
    with Sandbox(workers=2) as sb:
        for _ in range(20):
            sb.run("pass")  # warm: workers forked, caches touched
        for name, code in snippets.items():
            lat = sorted(timed(lambda: sb.run(code), repeat=1)[0] for _ in range(n))
            fresh = statistics.median(timed(lambda: subprocess.run(
                [sys.executable, "-c", f"import {', '.join(PRELOAD)}\n{code}"], check=True, capture_output=True),
                repeat=1)[0] for _ in range(fresh_n))
            p50, p95 = lat[n // 2], lat[int(0.95 * n)]
            rows += [(f"sandbox `{name}` p50 / p95", f"{p50 * 1e3:.1f} / {p95 * 1e3:.1f} ms", "p50 <= 5 ms"),
                     (f"fresh interpreter / sandbox, `{name}` p50", f"{fresh * 1e3:.0f} ms / {p50 * 1e3:.1f} ms = "
                      f"{fresh / p50:.0f}x", ">= 100x")]
        secs, results = timed(lambda: sb.run_many(["print(1+1)"] * many), repeat=1)
        ok = sum(r.status == "ok" for r in results)
        rows.append((f"run_many, {many} snippets, 2 workers", f"{many / secs:.0f} snippets/s ({ok} ok)",
                     ">= 300/s"))
    return rows


def grading_mix(n=1000, group=8, seed=0):
    """n (pred, gold, equal) as a rollout batch grades them: `group` answers per problem, half of them
    right (mostly written alike), the wrong ones apart; problems 60% AIME integers, 20% fractions (the
    exact path), 20% expressions (math-verify's)."""
    rng, exact, symbolic = random.Random(seed), [], []
    for i in range(n // group):
        a, b = rng.randint(1, 999), rng.randint(2, 99)
        symbolic_kinds = [(f"\\sqrt{{{a * a * b}}}", [f"{a}\\sqrt{{{b}}}", f"{a}\\cdot\\sqrt{{{b}}}"]),
                          (f"\\frac{{{a}\\pi}}{{{b}}}", [f"{a}\\pi/{b}", f"\\frac{{{a}}}{{{b}}}\\pi"]),
                          (f"x^2+{a}x", [f"x(x+{a})", f"{a}x+x^2"])]
        for r in range(group):
            right, other = rng.random() < 0.5, a + r + 1
            if i % 5 < 3:
                exact.append((f"{a:03d}" if right else str(other), str(a), right))
            elif i % 5 == 3:
                exact.append((f"\\frac{{{a}}}{{{b}}}" if right else f"{other}/{b}", f"{a}/{b}", right))
            else:
                gold, forms = symbolic_kinds[i // 5 % 3]
                symbolic.append((forms[rng.random() < 0.25] if right else f"{forms[0]}+{r + 1}", gold, right))
    return exact, symbolic


def bench_grading():
    """The RL reward's grader, each mix graded once from a cold cache."""
    rows = []
    exact, symbolic = grading_mix()
    for name, mix, target in (("integer/fraction", exact, ">= 5,000/s"), ("symbolic", symbolic, ">= 200/s"),
                              ("all", exact + symbolic, "")):
        data.parsed.cache_clear()
        secs, graded = timed(lambda: [data.is_equiv(p, g) for p, g, _ in mix], repeat=1)
        assert graded == [want for *_, want in mix], "the grader got the bench's own answers wrong"
        rows.append((f"grading, {len(mix)} answers, {name}", f"{len(mix) / secs:,.0f} grades/s", target))
    return rows


def bench_cuda():
    """bf16 decode of a 1.5B-shaped random model and the share of memory bandwidth it reaches."""
    cfg = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
           "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True}
    model = retool.build_model(cfg).to("cuda", torch.bfloat16).eval()
    tokenizer = data.builtin_tokenizer()  # ids only index the embedding: any tokenizer serves
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    torch.cuda.synchronize()
    copy_s, _ = timed(lambda: y.copy_(x), repeat=5, cuda=True)
    bandwidth = 2 * x.numel() * 4 / copy_s  # bytes/s: read + write
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for batch in (1, 32):
        prompts = [[1] * 128] * batch
        secs, trajs = timed(lambda: retool.generate(model, tokenizer, prompts, max_new_tokens=256, temperature=0),
                            repeat=2, cuda=True)
        steps = max(len(t.response_ids) for t in trajs)
        kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 128 * 2 * batch * (128 + steps / 2)
        rows.append((f"CUDA bf16 1.5B decode, batch {batch}", f"{batch * steps / secs:.0f} tok/s, "
                     f"{(weights + kv) * steps / secs / bandwidth:.0%} of {bandwidth / 1e9:.0f} GB/s roofline", ""))
    return rows


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.manual_seed(0)
    tokenizer = data.builtin_tokenizer()
    model = retool.build_model({**TINY, "vocab_size": len(tokenizer)}, seed=0).eval()
    with torch.no_grad():  # EOS logits pinned at 0, below the top logit: every row decodes all its tokens
        model.lm_head.weight[sorted(retool.stop_ids(tokenizer))] = 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        retool.save_model(model, tokenizer, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
    for batch in (1, 32):
        ours, theirs, floor = bench_decode(model, tokenizer, hf, batch, new_tokens=128)
        rows.append((f"decode tok/s, batch {batch}: engine / transformers",
                     f"{ours:.0f} / {theirs:.0f} = {ours / theirs:.2f}x", ">= 3x at batch 32" if batch == 32 else ""))
        step, hf_step = batch / ours, batch / theirs
        rows.append((f"decode ms/step, batch {batch}: engine / transformers / matmuls+attention alone",
                     f"{step * 1e3:.2f} / {hf_step * 1e3:.2f} / {floor * 1e3:.2f} (the most any engine could "
                     f"gain: {hf_step / floor:.1f}x)", ""))
    paged, half, same = bench_paged(model, tokenizer)
    rows.append((f"paged KV cache, batch 32: blocks of {retool.KV_BLOCK} / one block per row", f"{paged:.2f}x time",
                 "(the CPU default is one block per row)"))
    rows.append(("KV budget for half the rows / room for all (blocks of 16)",
                 f"{half:.2f}x time, {'the same' if same else 'OTHER'} tokens", "same tokens"))
    ratio, n_plain, n_tool = bench_interruptions(tokenizer)
    rows.append((f"4 tool calls / plain, {n_tool} tokens x 32 rows", f"{ratio:.2f}x time ({ratio - 1:+.0%})",
                 "<= +20%"))
    rows += bench_sandbox()
    rows += bench_grading()
    if torch.cuda.is_available():
        rows += bench_cuda()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}\n")
    print("| measurement | result | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
