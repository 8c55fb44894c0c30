"""RL stage: GAE across interpreter spans, GRPO groups, loss normalisation, PPO direction, masked
gradients, whole steps with the real sandbox, resume, and 2 gloo ranks against 1 process."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retool import (Critic, add_advantages, gae, group_advantages, minibatch_backward, rl_args, rl_main,
                 rl_step, rollout, rollout_metrics, score, timed)
import retool
from retool import make_optimizer
from data import builtin_problems, builtin_tokenizer
from retool import build_model, save_model
from sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "tie_word_embeddings": True}


LR = 1e-3  # the small runs' policy and critic lr


def small(prompts=2, mini_batches=1):
    return ["--prompts", str(prompts), "--rollouts", "2", "--mini-batches", str(mini_batches), "--micro-batch",
            "4", "--max-new-tokens", "24", "--critic-warmup", "1", "--lr", str(LR), "--critic-lr", str(LR)]


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(build_model({**TINY, "vocab_size": len(tok)}, 0), tok, path)
    return str(path)


def fake_records(rewards, vocab, seed=0):
    """Random prompt + response ids; each response has an interpreter span (mask 0) in the middle."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in rewards:
        p, n = int(torch.randint(3, 7, (1,), generator=g)), int(torch.randint(9, 16, (1,), generator=g))
        mask = torch.zeros(p + n - 1)
        mask[p - 1:] = 1
        mask[p + 2:p + 5] = 0
        out.append(retool.Rollout(ids=torch.randint(0, vocab, (p + n,), generator=g), mask=mask,
                                  engine_logp=torch.zeros(p + n - 1), reward=float(r)))
    return out


def test_gae_steps_over_an_interpreter_span():
    # row 0: sampled, sampled, interpreter x2, sampled, sampled (reward 1 on the last token)
    # row 1: the same without the span, then padding: the span must change nothing
    values = torch.tensor([[0.5, 0.2, 9.0, 9.0, -0.3, 0.1], [0.5, 0.2, -0.3, 0.1, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0]])
    rewards = torch.zeros(2, 6)
    rewards[0, 5] = rewards[1, 3] = 1.0
    adv, ret = gae(rewards, values, mask)  # gamma = lambda = 1: A_t = R - V_t
    assert torch.allclose(adv[0], torch.tensor([0.5, 0.8, 0, 0, 1.3, 0.9]))
    assert torch.allclose(ret[0], torch.tensor([1.0, 1, 0, 0, 1, 1]))
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # by hand over the sampled tokens only: deltas 0.9, 0.39, -0.47, -0.32, each A = delta + 0.45 A_next
    want = torch.tensor([-0.3705125, -0.11225, 0.795, 0.9])
    assert torch.allclose(adv[0, [0, 1, 4, 5]], want) and torch.allclose(adv[1, :4], want)
    assert (adv[0, 2:4] == 0).all() and (adv[1, 4:] == 0).all()
    assert torch.allclose(ret[0, [0, 1, 4, 5]], want + values[0, [0, 1, 4, 5]])


def test_grpo_groups_and_all_equal_groups():
    r = torch.tensor([1.0, 1, 1, 1, -1, -1, -1, -1, 1, -1, -1, -1])
    a = group_advantages(r, 4)
    assert torch.equal(a[:8], torch.zeros(8)) and not a.isnan().any()
    assert torch.allclose(a[8:], torch.tensor([1.5, -0.5, -0.5, -0.5]) / math.sqrt(0.75), atol=1e-5)
    assert torch.allclose(group_advantages(r, 4, std=False)[8:], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.equal(group_advantages(torch.tensor([1.0, -1.0]), 1), torch.zeros(2))  # n = 1


def models(tok, seed=0):
    torch.manual_seed(seed)
    policy = build_model({**TINY, "vocab_size": len(tok)}, seed)
    critic = Critic(policy)
    torch.nn.init.normal_(critic.head.weight, std=0.1)  # non-zero values exercise the value loss
    return policy, critic


def grads(*ms):
    return [p.grad.clone() for m in ms for p in m.parameters() if p.grad is not None]


def test_loss_is_a_global_token_mean_however_micro_batched(ckpt, tok):
    policy, critic = models(tok)
    records = fake_records([1, -1, 1, 1, -1], len(tok))
    runs = []
    for micro in (5, 1, 2):
        a = rl_args(["--model", ckpt, "--micro-batch", str(micro), "--rollouts", "5"])
        score(records, policy, critic, None, a, torch.device("cpu"))
        add_advantages(records, a)
        g = torch.Generator().manual_seed(1)
        for rec in records:  # a policy that moved since the rollouts: ratios off 1, some clipped
            rec.old_logp = rec.old_logp + 0.3 * torch.randn(len(rec.old_logp), generator=g)
        n_tokens = sum(r.mask.sum().item() for r in records)
        policy.zero_grad(), critic.zero_grad()
        stats = minibatch_backward(records, policy, critic, a, torch.device("cpu"), n_tokens)
        runs.append((stats, grads(policy, critic)))
    for stats, g in runs[1:]:
        assert stats == pytest.approx(runs[0][0], rel=1e-5)
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(g, runs[0][1]))
    assert runs[0][0]["clipped"] > 0 and runs[0][0]["value_loss"] > 0


def seq_logprob(policy, rec):
    ids = rec.ids[None]
    lp = torch.log_softmax(policy(ids)[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return (lp * rec.mask).sum().item()


def test_ppo_step_moves_logprobs_with_the_reward(ckpt, tok):
    policy, critic = models(tok)
    records = fake_records([1, -1], len(tok), seed=3)
    a = rl_args(["--model", ckpt, "--rollouts", "2", "--mini-batches", "1", "--critic-warmup", "0"])
    before = [seq_logprob(policy, r) for r in records]
    opt, copt = make_optimizer(policy, 1e-3, 0.0), make_optimizer(critic, 1e-3, 0.0)
    stats = rl_step(0, records, policy, critic, None, opt, copt, a, torch.device("cpu"))
    after = [seq_logprob(policy, r) for r in records]
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1
    assert stats["approx_kl"] == pytest.approx(0, abs=1e-9) and stats["clip_frac"] == 0  # first epoch: ratio 1


def test_interpreter_positions_get_exactly_zero_gradient(ckpt, tok):
    policy, critic = models(tok)
    ref = build_model({**TINY, "vocab_size": len(tok)}, 1)
    records = fake_records([1, -1, 1], len(tok))
    a = rl_args(["--model", ckpt, "--rollouts", "3", "--kl-coef", "0.5", "--micro-batch", "4"])
    score(records, policy, critic, ref, a, torch.device("cpu"))
    add_advantages(records, a)
    seen = []

    def hook(module, inputs, out):  # keep the policy's final hidden states / the values and their gradients
        out.retain_grad()
        seen.append(out)
    policy.norm.register_forward_hook(hook), critic.head.register_forward_hook(hook)
    minibatch_backward(records, policy, critic, a, torch.device("cpu"), 1.0)
    (hidden, values), L = seen, max(len(r.ids) for r in records)
    mask = torch.stack([torch.nn.functional.pad(r.mask, (0, L - 1 - len(r.mask))) for r in records])
    for out in (hidden, values):
        g = out.grad[:, :-1].abs().sum(-1)  # (B, L-1)
        assert (g[mask == 0] == 0).all() and (g[mask == 1] > 0).all()


def test_step_with_the_real_sandbox_and_tool_calls(ckpt, tok):
    """A tiny model biased towards writing <code> ... </code> and EOS, so that its rollouts call the
    real sandbox; metrics must be finite and consistent with each other."""
    policy, critic = models(tok)
    head = torch.nn.Linear(64, len(tok), bias=True)
    with torch.no_grad():
        head.weight.copy_(policy.embed_tokens.weight)
        head.bias.zero_()
        for t, b in (("<code>", 4.0), ("</code>", 4.0), ("<|im_end|>", 2.5)):
            head.bias[tok.convert_tokens_to_ids(t)] = b
    policy.lm_head = head
    critic = Critic(policy)
    args = rl_args(["--model", ckpt, "--rollouts", "4", "--max-new-tokens", "40", "--micro-batch", "8",
                    "--mini-batches", "1", "--critic-warmup", "0", "--max-tool-calls", "2"])
    jobs = list(enumerate(builtin_problems("train", 2)))
    timer = {"sandbox": 0.0}
    with Sandbox(timeout=2.0) as sb:
        records = rollout(policy, tok, jobs, args, timed(sb.run_many, timer), step=0)
    opt, copt = make_optimizer(policy, 1e-4, 0.0), make_optimizer(critic, 1e-4, 0.0)
    m = rl_step(0, records, policy, critic, None, opt, copt, args, torch.device("cpu"))
    m.update(rollout_metrics(records, torch.device("cpu")))
    assert len(records) == 8 and m["tool_calls"] > 0 and timer["sandbox"] > 0
    assert all(math.isfinite(v) for v in m.values())
    assert m["accuracy"] == pytest.approx((m["reward"] + 1) / 2)
    assert 0 < m["code_ratio"] <= 1 and m["tool_calls"] >= m["code_ratio"] and 0 <= m["code_pass"] <= 1
    assert 0 <= m["first_call"] < 1 and m["entropy"] > 0 and m["logprob_diff"] < 1e-4


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_rl_main_end_to_end_and_bit_identical_resume(ckpt, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert rl_main(["--model", ckpt, "--out", str(whole), "--steps", "2", *small()]) == 0
    m = metrics(whole)
    assert [r["step"] for r in m] == [1, 2] and "loss" not in m[0] and "loss" in m[1]  # critic warm-up
    assert all(math.isfinite(v) for r in m for v in r.values())
    assert {"reward", "accuracy", "code_ratio", "clip_frac", "approx_kl", "entropy", "value_loss",
            "explained_var", "grad_norm", "time_gen", "time_sandbox", "time_train", "logprob_diff"} <= set(m[1])
    assert (whole / "model.safetensors").is_file() and (whole / "config.json").is_file()
    assert not (whole / "samples.html").exists()  # --sample-every 10 by default: no page before step 10
    assert rl_main(["--model", ckpt, "--out", str(split), "--steps", "1", *small()]) == 0
    assert rl_main(["--model", ckpt, "--out", str(split), "--steps", "2", "--resume", *small()]) == 0
    a, b = load_file(whole / "model.safetensors"), load_file(split / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = ("time_gen", "time_sandbox", "time_train")
    assert [{k: v for k, v in r.items() if k not in drop} for r in metrics(split)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in m]
    # a resume with another batch shape, or the other algorithm, is refused
    for change in (["--prompts", "4"], ["--algo", "grpo"]):
        assert rl_main(["--model", ckpt, "--out", str(split), "--steps", "3", "--resume", *small(), *change]) == 2


def test_grpo_text_only_step(ckpt, tmp_path):
    assert rl_main(["--model", ckpt, "--out", str(tmp_path), "--steps", "1", "--algo", "grpo", "--no-std",
                    "--no-tools", *small()]) == 0
    (m,) = metrics(tmp_path)
    assert "loss" in m and "value_loss" not in m and "explained_var" not in m
    assert m["code_ratio"] == 0 and m["time_sandbox"] == 0 and all(math.isfinite(v) for v in m.values())


def test_sample_every_writes_the_page_and_prints_one_sample(ckpt, tmp_path, capsys):
    assert rl_main(["--model", ckpt, "--out", str(tmp_path), "--steps", "2", "--sample-every", "1", *small()]) == 0
    err = capsys.readouterr().err
    page = (tmp_path / "samples.html").read_text()  # step 2's, written over step 1's
    assert f"<title>{tmp_path}: rollouts of step 2</title>" in page and page.count('<div class="sample">') == 4
    titles = [line.strip("- ") for line in err.splitlines() if ", rollout 1: reward " in line]
    assert [t.split(",")[0] for t in titles] == ["step 1", "step 2"]  # one sample per step, on the terminal
    assert all(" finish " in t and "tool call(s)" in t for t in titles)
    assert f">{titles[1]}</h2>" in page  # the page's first rollout is the one printed
    assert "<|im_start|>assistant" in err  # the prompt, as the model saw it
    assert all(f"step 2, rollout {i}: reward " in page for i in (1, 2, 3, 4))
    assert '<pre class="response"><span class="' in page and not list(tmp_path.glob("*.tmp"))


def test_two_gloo_ranks_match_one_process(ckpt, tmp_path):
    script = tmp_path / "rl_entry.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                      "from retool import rl_main\nsys.exit(rl_main(sys.argv[1:]))\n")
    # 2 rows per mini-batch per rank in micro-batches of 1: gradients sync once per mini-batch, not per micro-batch
    args = ["--model", ckpt, "--steps", "2", *small(prompts=4, mini_batches=2), "--micro-batch", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          "2", str(script), *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=150)
    assert two.returncode == 0, two.stderr[-2000:]
    assert rl_main([*args, "--out", str(tmp_path / "one")]) == 0
    for r1, r2 in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        for k in r1:
            if not k.startswith("time_"):
                assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), k
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    # whitening's global mean and variance sum in another order on 2 ranks (last-bit differences).
    # Adam's first step moves an element by lr * g / (|g| + eps): where |g| is near eps, a last-bit
    # change of g moves it by up to lr, and how many such elements there are depends on the CPU's
    # BLAS (6e-5 seen on one CPU, 2e-5 on another). Bound what the code guarantees: no element moves
    # more than one step apart, and the weights agree on average.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() <= 2 * LR and diff.mean() <= 1e-7


@pytest.mark.parametrize("argv, needle", [
    (["--algo", "dqn"], "--algo"), (["--prompts", "3"], "--prompts 3"), (["--steps", "0"], "--steps"),
    (["--data", "/nonexistent.jsonl"], "/nonexistent.jsonl"), (["--rollouts", "0"], "--rollouts must be positive"),
    (["--top-p", "0"], "--top-p"), (["--temperature", "-1"], "--temperature"), (["--save-every", "0"], "--save-every"),
    (["--train-problems", "0"], "--train-problems"), (["--kl-coef", "-1"], "--kl-coef"),
    (["--clip-low", "2"], "--clip-low"), (["--lr", "inf"], "--lr"), (["--out", __file__], "--out"),
    (["--sample-every", "-1"], "--sample-every must be >= 0"), (["--kv-budget", "0"], "--kv-budget must be positive"),
    (["--resume"], "--resume")])
def test_user_mistakes_exit_2_with_one_line(ckpt, argv, needle, capsys, tmp_path):
    assert rl_main(["--model", ckpt, "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_a_kv_budget_for_one_and_a_half_rollouts_changes_no_step(ckpt, tmp_path, monkeypatch):
    """The paged engine under a budget preempts rows and shares prompt blocks: the same rollouts,
    so the same step metrics as a run with room for every row."""
    config = retool.ModelConfig.from_hf(json.loads((Path(ckpt) / "config.json").read_text()))
    args = ["--model", ckpt, "--steps", "2", *small()]
    longest = []
    make_cache = retool.make_cache

    def recording(config, **kw):
        longest.append(kw["max_len"])
        return make_cache(config, **kw)

    monkeypatch.setattr(retool, "make_cache", recording)
    assert rl_main([*args, "--out", str(tmp_path / "all")]) == 0
    preempted = []
    preempt = retool.Engine.preempt

    def counting(self, i):
        preempted.append(i)
        preempt(self, i)

    monkeypatch.setattr(retool.Engine, "preempt", counting)
    budget = retool.kv_bytes(config, max(longest) * 3 // 2, 4) / retool.GIB  # fp32 keys and values of 1.5 rows
    assert rl_main([*args, "--out", str(tmp_path / "budget"), "--kv-budget", str(budget)]) == 0
    assert preempted
    for r1, r2 in zip(metrics(tmp_path / "all"), metrics(tmp_path / "budget"), strict=True):
        for k in r1:
            if not k.startswith("time_"):
                assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), k


def test_a_kv_budget_without_room_for_one_rollout_ends_with_one_line(ckpt, capsys, tmp_path):
    assert rl_main(["--model", ckpt, "--out", str(tmp_path / "out"), "--kv-budget", "1e-9", "--steps", "1",
                    *small()]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("retool.py: error: the KV budget (0.00 GiB) holds 0 positions")
    assert "Traceback" not in err


def test_missing_sft_checkpoint_says_run_sft_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert rl_main([]) == 2
    assert "--stage sft" in capsys.readouterr().err


def test_preset_follows_the_model_size_unless_named(ckpt, tmp_path):
    big = tmp_path / "qwen2.5-1.5b"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2}))
    builtin_tokenizer().save_pretrained(big)  # a whole checkpoint folder but for the weights' bytes
    (big / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert [retool.default_preset(p) for p in (None, ckpt, big)] == ["tiny", "tiny", "real"]
    assert rl_args(["--model", ckpt]).lr == retool.RL_PRESETS["tiny"]["lr"]
    assert rl_args(["--model", str(big)]).max_new_tokens == retool.RL_PRESETS["real"]["max_new_tokens"]
    assert rl_args(["--model", ckpt, "--preset", "real", "--lr", "3e-6"]).critic_lr == 2e-6
    assert retool.sft_args(["--model", str(big)]).pack_len == retool.REAL_TRAIN["pack_len"]
    assert retool.sft_args(["--model", ckpt]).steps == retool.TINY_TRAIN["steps"]


def test_chunked_logprobs_match_the_whole():
    torch.manual_seed(0)
    model = retool.build_model({"model_type": "qwen2", "vocab_size": 50, "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, 0)
    ids = torch.randint(0, 50, (3, 23))
    with torch.no_grad():  # the rollouts' old log-probs
        whole_lp, whole_ent = retool.logprobs_entropy(model, ids, 0.7, chunk=10_000)
        old_lp, old_ent = retool.logprobs_entropy(model, ids, 0.7, chunk=5)
    new_lp, new_ent = retool.logprobs_entropy(model, ids, 0.7, chunk=5)  # the update's, under grad
    assert new_lp.shape == new_ent.shape == (3, 22)
    # promised exact: old and new log-probs run the same ops on the same shapes, so the first PPO ratio is 1
    assert torch.equal(new_lp, old_lp) and torch.equal(new_ent, old_ent)
    # promised close, not bitwise: another chunk size is another matmul shape, whose summation order
    # BLAS chooses per CPU model (equal on some x86-64 machines, off by float32 rounding on others)
    assert torch.allclose(old_lp, whole_lp, rtol=1e-5, atol=1e-5)
    assert torch.allclose(old_ent, whole_ent, rtol=1e-5, atol=1e-5)


def test_whitening_equals_a_brute_force_masked_reference():
    g = torch.Generator().manual_seed(3)
    adv, mask = torch.randn(4, 9, generator=g) * 3 + 1, (torch.rand(4, 9, generator=g) > 0.3).float()
    picked = [adv[b, t].item() for b in range(4) for t in range(9) if mask[b, t]]
    mean = sum(picked) / len(picked)
    var = sum((x - mean) ** 2 for x in picked) / (len(picked) - 1)  # unbiased, as verl
    want = torch.tensor([[(adv[b, t].item() - mean) / math.sqrt(var + 1e-8) if mask[b, t] else 0.0
                          for t in range(9)] for b in range(4)])
    got = retool.whiten(adv, mask, torch.device("cpu"))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.all(got[mask == 0] == 0)


def test_a_runaway_log_ratio_gives_a_finite_loss_and_gradient():
    logp = torch.tensor([[100.0, -1.0]], requires_grad=True)
    loss, _ = retool.policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()


def test_tis_weights_by_hand_and_masked_tokens_unweighted():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    eng = torch.tensor([[-1.5, -1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = retool.tis_weights(old, eng, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 2.0, 0.0]]))
    assert torch.equal(retool.tis_weights(old, eng, mask, cap=0.0), mask)  # off: every sampled token 1
    assert torch.equal(retool.tis_weights(old, old, mask, cap=2.0), mask)  # engine == trainer: exactly 1


def test_engine_equal_to_trainer_leaves_the_loss_unchanged(ckpt, tok):
    losses = []
    for cap in ("0", "2"):
        a = rl_args(["--model", ckpt, "--tis-cap", cap] + small())
        policy = retool.load_model(ckpt)[0]
        records = fake_records([1, -1, 1, -1], len(tok))
        score(records, policy, None, None, a, torch.device("cpu"))
        for r in records:
            r.engine_logp = r.old_logp.clone()
            r.tis = retool.tis_weights(r.old_logp, r.engine_logp, r.mask, a.tis_cap)
        a.algo = "grpo"
        add_advantages(records, a)
        n = sum(r.mask.sum().item() for r in records)
        losses.append(minibatch_backward(records, policy, None, a, torch.device("cpu"), n)["loss"])
    assert losses[0] == losses[1]


def test_rl_reward_ignores_a_boxed_answer_only_the_interpreter_printed(tok):
    model = tok.encode('<code>\n```python\nprint(chr(92) + "boxed{" + str(3 + 4) + "}")\n```\n</code>',
                      add_special_tokens=False)
    tool = tok.encode("<interpreter>\n\\boxed{7}\n</interpreter>", add_special_tokens=False)
    traj = retool.Trajectory(prompt_ids=[1, 2], response_ids=model + tool, loss_mask=[1] * len(model) + [0] * len(tool),
                             logprobs=[0.0] * (len(model) + len(tool)))
    traj.text = retool.decode(tok, traj.response_ids)
    assert retool.reward(traj.text, "7") == 1.0  # eval's view: the whole response
    assert retool.to_record(traj, "7", tok).reward == -1.0


def test_tool_cache_runs_identical_codes_once_with_the_same_results():
    codes = ["print(6 * 7)", "print(1 + 1)", "print(6 * 7)", "print(6 * 7)", "print('<a & b>')", "print(1 + 1)"]
    seen = []

    def counting(batch):
        seen.extend(batch)
        return sb.run_many(batch)
    with Sandbox() as sb:
        plain = [r.feedback for r in sb.run_many(codes)]
        counts = {"calls": 0, "hits": 0}
        tool = retool.cached(counting, counts)
        got = [r.feedback for r in tool(codes[:3])] + [r.feedback for r in tool(codes[3:])]
    assert sorted(seen) == sorted(set(codes)) and got == plain
    assert counts == {"calls": 6, "hits": 3}
