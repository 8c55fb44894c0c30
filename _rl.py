# ---------------------------------------------------------------------------------------------
# RL stage (ReTool stage 2): PPO (or GRPO) whose rollouts run code as they go.
# One step: sample prompts; n rollouts each through `generate` with the sandbox as the tool; +1/-1
# reward from the grader; old log-probs (and values) from a training forward of the same modules;
# advantages; PPO epochs over mini-batches. Interpreter tokens (loss mask 0) are context only:
# they never enter the policy loss, value loss, KL or entropy.
# ---------------------------------------------------------------------------------------------
import bisect
import contextlib
import copy
import os
import shutil
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from retool import ModelError, generate, load_model, save_model
from data import DataError, builtin_problems, load_rl, render_prompt
from sandbox import Sandbox
from _grading import reward as grade_reward
from _sft import (UsageError, _Parser, autocast, barrier, batch_indices, latest_checkpoint,
                  load_checkpoint, make_optimizer, MetricsLog, optimizer_step, save_checkpoint,
                  setup_distributed, shard_model, world_size)

# the built-in tiny model learns fast at a large lr; real checkpoints get the paper's settings
RL_PRESETS = {
    "tiny": dict(lr=1e-4, critic_lr=1e-3, steps=50, prompts=16, n=8, max_new_tokens=200,
                 critic_warmup=2, mini_batches=2, micro_batch=64),
    "real": dict(lr=1e-6, critic_lr=2e-6, steps=400, prompts=64, n=16, max_new_tokens=16000,
                 critic_warmup=20, mini_batches=2, micro_batch=4),
}


# ----------------------------------------------------------------------------- advantages

def gae(rewards, values, mask, gamma=1.0, lam=1.0):
    """GAE over (B, T) response positions that steps straight over mask-0 positions (interpreter
    output, padding): no TD error there, and the next sampled token's value and advantage carry
    across unchanged, as if the injected span were not in the sequence. -> (advantages, returns),
    both 0 where mask is 0."""
    B, T = values.shape
    adv = torch.zeros_like(values)
    next_value = values.new_zeros(B)  # value of the next sampled position (0 after the end)
    last = values.new_zeros(B)  # advantage of the next sampled position
    for t in reversed(range(T)):
        m = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = torch.where(m, delta + gamma * lam * last, last)
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, last, torch.zeros_like(last))
    return adv, (adv + values) * (mask > 0)


def group_advantages(rewards, n, std=True, eps=1e-6):
    """GRPO: (N,) rewards in consecutive groups of n rollouts of one prompt -> (N,) advantages.
    std=False is Dr. GRPO (no division). A group whose rewards are all equal gets exactly 0."""
    r = rewards.view(-1, n)
    a = r - r.mean(1, keepdim=True)
    if std:
        a = a / (r.std(1, keepdim=True, correction=0) + eps)
    flat = (r.max(1, keepdim=True).values == r.min(1, keepdim=True).values)
    return torch.where(flat, torch.zeros_like(a), a).view(-1)


# ----------------------------------------------------------------------------- losses

def logprobs_entropy(model, ids, temperature=1.0, with_entropy=True):
    """(B, L) ids -> next-token log-probs (B, L-1) and entropies (B, L-1) under the temperature the
    rollouts were sampled at; position t scores ids[:, t + 1]. The same op order for the old and
    the new log-probs, so the first PPO ratio is exactly 1."""
    logp = torch.log_softmax(model(ids)[:, :-1].float() / temperature, -1)  # (B, L-1, V)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp, (-(logp.exp() * logp).sum(-1) if with_entropy else None)


def policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=10.0):
    """Clipped surrogate with separate low/high bounds and a dual clip for negative advantages.
    -> per-token loss (B, T), exactly 0 (and 0 gradient) where mask is 0, and the clipped mask."""
    m = mask > 0
    logp = torch.where(m, logp, old_logp)  # mask-0 logits get no gradient, not even 0 * inf
    ratio = torch.exp(logp - old_logp)
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(l1, l2)
    # dual clip: a negative advantage times a runaway ratio would otherwise be unbounded
    loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    clipped = m & (loss != l1)  # the clip or the dual clip decided
    return torch.where(m, loss, torch.zeros_like(loss)), clipped


def value_loss(values, old_values, returns, mask, clip=0.5):
    """Clipped value loss per token (B, T), 0 where mask is 0."""
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (v_clip - returns) ** 2)
    return torch.where(mask > 0, loss, torch.zeros_like(loss))


def k3_kl(logp, ref_logp, mask):
    """k3 estimator of KL(policy || reference) per token, 0 where mask is 0."""
    d = torch.where(mask > 0, ref_logp - logp, torch.zeros_like(logp))
    return torch.exp(d) - d - 1


class Critic(nn.Module):
    """Value model: a copy of the policy trunk (so it starts from the SFT weights) and a scalar
    head, zero-initialised so that warm-up starts from V = 0."""

    def __init__(self, policy):
        super().__init__()
        self.trunk = copy.deepcopy(policy)
        self.head = nn.Linear(policy.config.hidden_size, 1, device=policy.embed_tokens.weight.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def layers(self):  # the FSDP units, as for the policy (shard_model)
        return self.trunk.layers

    def forward(self, ids):  # (B, T) -> (B, T)
        h = self.trunk.hidden(ids)
        # a fresh tensor, not a view: FSDP2 hooks its backward onto this output
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float().clone()


# ----------------------------------------------------------------------------- rollouts

def timed(tool, timer):
    """The tool, adding to timer["sandbox"] the wall time during which at least one call runs (the
    engine runs calls in threads, overlapping decoding and each other; it already turns a tool
    failure of any kind into that call's feedback)."""
    lock, busy = threading.Lock(), {"n": 0, "since": 0.0}

    def run(codes):
        with lock:
            busy["n"] += 1
            busy["since"] = time.perf_counter() if busy["n"] == 1 else busy["since"]
        try:
            return tool(codes)
        finally:
            with lock:
                busy["n"] -= 1
                timer["sandbox"] += time.perf_counter() - busy["since"] if busy["n"] == 0 else 0.0
    return run


def first_code_token(tokenizer, response_ids):
    """Token index of the first `<code>` in a response (binary search over decoded prefixes)."""
    return bisect.bisect_left(range(len(response_ids)), True,
                              key=lambda k: "<code>" in tokenizer.decode(response_ids[:k + 1]))


def to_record(traj, gold, tokenizer):
    """One trajectory -> 1-D tensors over target positions t (position t scores ids[t + 1]) plus
    the rollout statistics the paper analyses."""
    p, r = len(traj.prompt_ids), len(traj.response_ids)
    ids = torch.tensor(traj.prompt_ids + traj.response_ids)
    mask, eng = torch.zeros(p + r - 1), torch.zeros(p + r - 1)
    mask[p - 1:] = torch.tensor(traj.loss_mask, dtype=torch.float)
    eng[p - 1:] = torch.tensor(traj.logprobs, dtype=torch.float)
    calls = traj.tool_calls
    stats = dict(
        reward=grade_reward(traj.text, gold), length=r, code=float(bool(calls)), calls=len(calls),
        code_lines=sum(sum(1 for l in c.code.splitlines() if l.strip()) for c in calls),
        calls_ok=sum(c.status == "ok" for c in calls),
        first_call=first_code_token(tokenizer, traj.response_ids) / r if calls else 0.0)
    return dict(ids=ids, mask=mask, eng=eng, stats=stats)


def collate(records, keys):
    """Right-pad 1-D tensors of the given keys into (B, L) batches (0 padding: mask 0 there)."""
    return {k: pad_sequence([rec[k] for rec in records], batch_first=True) for k in keys}


def rollout(policy, tokenizer, jobs, args, tool, step):
    """n rollouts for each (global prompt index j, Problem) job, in one generate call. Every row is
    seeded from (seed, step, j, rollout) only, so sharding prompts over ranks changes no rollout."""
    prompts = [render_prompt(tokenizer, p.problem, tools=not args.no_tools) for _, p in jobs]
    seeds = [((args.seed * 1_000_003 + step) * 100_003 + j) * 1_009 + i for j, _ in jobs for i in range(args.n)]
    trajs = generate(policy, tokenizer, [x for x in prompts for _ in range(args.n)],
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, tool=None if args.no_tools else tool,
                     max_tool_calls=args.max_tool_calls, seed=[s % 2**63 for s in seeds])
    golds = [p.answer for _, p in jobs for _ in range(args.n)]
    return [to_record(t, g, tokenizer) for t, g in zip(trajs, golds)]


# ----------------------------------------------------------------------------- training

@contextlib.contextmanager
def full_weights(model):
    """FSDP2: every rank generates with the full weights. unshard() on the root alone leaves the
    layers sharded, so keep every FSDP module gathered until generation ends, then reshard all."""
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


@torch.no_grad()
def score(records, policy, critic, ref, args, device):
    """Old log-probs, entropies, reference log-probs and old values, from no-grad forwards of the
    very modules that train (the engine's log-probs are only compared with them)."""
    for i in range(0, len(records), args.micro_batch):
        chunk = records[i:i + args.micro_batch]
        ids = collate(chunk, ["ids"])["ids"].to(device)
        with autocast(device):
            old, ent = logprobs_entropy(policy, ids, args.temperature)
            refl = logprobs_entropy(ref, ids, args.temperature, False)[0] if ref else None
            val = critic(ids)[:, :-1] if critic else None
        for k, rec in enumerate(chunk):
            n = len(rec["mask"])
            rec["old"], rec["ent"] = old[k, :n].cpu(), ent[k, :n].cpu()
            rec["ref"] = refl[k, :n].cpu() if ref else rec["old"]
            rec["val"] = val[k, :n].cpu() if critic else torch.zeros(n)


def add_advantages(records, args):
    """PPO: token-level GAE on the critic's values with the reward on the last sampled token.
    GRPO: the group-normalised reward on every sampled token (a group = n consecutive records)."""
    b = collate(records, ["mask", "val"])
    mask, rewards = b["mask"], torch.zeros_like(b["mask"])
    r = torch.tensor([rec["stats"]["reward"] for rec in records], dtype=torch.float)
    if args.algo == "ppo":
        last = (mask * torch.arange(mask.shape[1])).argmax(1)  # each row's last sampled position
        rewards[torch.arange(len(records)), last] = r
        adv, ret = gae(rewards, b["val"], mask)
    else:
        adv, ret = group_advantages(r, args.n, std=not args.no_std)[:, None] * mask, b["val"]
    for k, rec in enumerate(records):
        n = len(rec["mask"])
        rec["adv"], rec["ret"] = adv[k, :n], ret[k, :n]


def minibatch_backward(records, policy, critic, args, device, n_tokens, train_policy=True):
    """Backward of one mini-batch, micro-batch by micro-batch. Every sum is divided by n_tokens,
    the sampled-token count of the WHOLE mini-batch over all ranks, so the loss is a token-mean
    over the global batch however it is micro-batched or sharded. -> summed statistics."""
    scale = world_size() / n_tokens  # FSDP averages gradients over ranks: undo that
    keys = ["ids", "mask", "old", "ref", "val", "adv", "ret"]
    acc = dict(loss=0.0, clipped=0.0, approx_kl=0.0, ref_kl=0.0, value_loss=0.0)
    for i in range(0, len(records), args.micro_batch):
        b = {k: v.to(device) for k, v in collate(records[i:i + args.micro_batch], keys).items()}
        m = b["mask"]
        with autocast(device):
            if train_policy:
                logp = logprobs_entropy(policy, b["ids"], args.temperature, False)[0]
                pl, clipped = policy_loss(logp, b["old"], b["adv"], m, args.clip_low,
                                          args.clip_high, args.dual_clip)
                kl = k3_kl(logp, b["ref"], m).sum()
                loss = pl.sum() + args.kl_coef * kl
                (loss * scale).backward()
                acc["loss"] += loss.item() / n_tokens
                acc["clipped"] += clipped.sum().item() / n_tokens
                acc["ref_kl"] += kl.item() / n_tokens
                acc["approx_kl"] += k3_kl(logp.detach(), b["old"], m).sum().item() / n_tokens
            if critic is not None:
                vl = value_loss(critic(b["ids"])[:, :-1], b["val"], b["ret"], m, args.value_clip).sum()
                (vl * scale).backward()
                acc["value_loss"] += vl.item() / n_tokens
    return acc


def step_jobs(problems, args, step, rank, world):
    """This rank's (global index j, Problem) jobs of a step, in mini-batch order. Mini-batch k is
    the k-th contiguous block of the step's prompts and every rank takes its own slice of every
    block, so the global mini-batches are the same for any number of ranks."""
    block = args.prompts // args.mini_batches
    per = block // world
    order = batch_indices(len(problems), args.prompts, step, args.seed)
    return [(j, problems[order[j]]) for k in range(args.mini_batches)
            for j in range(k * block + rank * per, k * block + (rank + 1) * per)]


def reduce_floats(values, device, op=None):
    """Sum (or op) a list of floats over ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op or dist.ReduceOp.SUM)
    return t.tolist()


def rl_step(step, records, policy, critic, ref, opt, copt, args, device):
    """Score, advantages, PPO epochs over mini-batches -> training statistics (global)."""
    score(records, policy, critic, ref, args, device)
    add_advantages(records, args)
    train_policy = args.algo == "grpo" or step >= args.critic_warmup  # critic warm-up: critic only
    per = len(records) // args.mini_batches
    keys = ("loss", "clipped", "approx_kl", "ref_kl", "value_loss", "grad_norm", "critic_grad_norm")
    acc = dict.fromkeys(keys, 0.0)
    for _ in range(args.ppo_epochs):
        for k in range(args.mini_batches):
            mb = records[k * per:(k + 1) * per]
            n_tokens = max(1.0, reduce_floats([sum(r["mask"].sum().item() for r in mb)], device)[0])
            for key, v in minibatch_backward(mb, policy, critic, args, device, n_tokens, train_policy).items():
                acc[key] += v
            if train_policy:
                acc["grad_norm"] += optimizer_step(policy, opt, None, args.grad_clip)
            if critic is not None:
                acc["critic_grad_norm"] += optimizer_step(critic, copt, None, args.grad_clip)
    updates = args.ppo_epochs * args.mini_batches
    # the per-mini-batch sums are already global token-means of this rank's part: sum over ranks
    out = dict(zip(keys, reduce_floats([acc[k] for k in keys[:5]], device) + [acc[k] for k in keys[5:]]))
    out["clip_frac"] = out.pop("clipped")
    drop = {"ref_kl"} if ref is None else set()
    drop |= {"value_loss", "critic_grad_norm"} if critic is None else set()
    drop |= set() if train_policy else {"loss", "clip_frac", "approx_kl", "ref_kl", "grad_norm"}
    return {k: v / updates for k, v in out.items() if k not in drop}


def rollout_metrics(records, device):
    """The paper's analysis figures over this step's rollouts, all ranks together."""
    s = [r["stats"] for r in records]
    per_traj = [sum(x[k] for x in s) for k in ("reward", "length", "code", "calls", "code_lines", "calls_ok",
                                                "first_call")]
    per_token = [sum((f(r) * r["mask"]).sum().item() for r in records) for f in (
        lambda r: 1, lambda r: r["ent"], lambda r: r["ret"], lambda r: r["ret"] ** 2,
        lambda r: r["ret"] - r["val"], lambda r: (r["ret"] - r["val"]) ** 2)]
    n, acc, rew, length, code, calls, lines, ok, first, toks, ent, r1, r2, e1, e2 = reduce_floats(
        [len(s), sum(x["reward"] > 0 for x in s), *per_traj, *per_token], device)
    diff = max([((r["old"] - r["eng"]).abs() * r["mask"]).max().item() for r in records] or [0.0])
    diff = reduce_floats([diff], device, dist.ReduceOp.MAX if dist.is_initialized() else None)[0]
    var_ret, var_err = r2 / toks - (r1 / toks) ** 2, e2 / toks - (e1 / toks) ** 2
    return dict(reward=rew / n, accuracy=acc / n, response_len=length / n, code_ratio=code / n,
                tool_calls=calls / n, code_lines=lines / n, code_pass=ok / calls if calls else 0.0,
                first_call=first / code if code else 0.0, entropy=ent / toks,
                explained_var=1 - var_err / var_ret if var_ret > 1e-6 else 0.0,  # 0: constant returns
                logprob_diff=diff)


# ----------------------------------------------------------------------------- CLI

def rl_args(argv):
    p = _Parser(prog="retool.py --stage rl", description="RL with interleaved code execution. Without "
                "--model: the tiny preset from the built-in SFT model (out/sft); with --model: the real-"
                "checkpoint preset (the paper's settings). --data: DAPO-Math-17k-shaped prompts.")
    p.add_argument("--model", help="starting checkpoint, HF dir (default out/sft, the built-in SFT model)")
    p.add_argument("--data", help="RL prompts, .jsonl/.json/.parquet, DAPO-Math-17k or problem/answer rows")
    p.add_argument("--out", default="out/rl", help="final model, metrics.jsonl, checkpoints/")
    p.add_argument("--algo", choices=("ppo", "grpo"), default="ppo")
    p.add_argument("--no-std", action="store_true", help="GRPO without the std division (Dr. GRPO)")
    p.add_argument("--no-tools", action="store_true", help="text-only baseline: text prompt, no interpreter")
    for flag, kind, dest in (("steps", int, "steps"), ("prompts", int, "prompts"), ("rollouts", int, "n"),
                             ("max-new-tokens", int, "max_new_tokens"), ("lr", float, "lr"),
                             ("critic-lr", float, "critic_lr"), ("critic-warmup", int, "critic_warmup"),
                             ("mini-batches", int, "mini_batches"), ("micro-batch", int, "micro_batch")):
        p.add_argument(f"--{flag}", type=kind, dest=dest, help="default: " + ", ".join(
            f"{k} preset {v[dest]}" for k, v in RL_PRESETS.items()))
    for flag, default, text in (
            ("ppo-epochs", 1, "passes over each step's rollouts"), ("temperature", 1.0, "rollout temperature"),
            ("top-p", 1.0, "rollout top-p; below 1 the engine's log-probs differ from the trainer's"),
            ("max-tool-calls", 8, "interpreter calls per rollout"), ("clip-low", 0.2, "ratio clip below 1"),
            ("clip-high", 0.28, "ratio clip above 1"), ("dual-clip", 10.0, "loss cap for negative advantages"),
            ("value-clip", 0.5, "value clip around the old values"), ("grad-clip", 1.0, "gradient-norm clip"),
            ("kl-coef", 0.0, "k3 KL penalty against the frozen start model (0: none)"),
            ("train-problems", 4000, "built-in RL prompts"), ("save-every", 10, "steps between checkpoints")):
        p.add_argument(f"--{flag}", type=type(default), default=default, help=text)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for k, v in RL_PRESETS["tiny" if a.model is None else "real"].items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    a.model = a.model or os.path.join("out", "sft")
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        raise UsageError(f"{a.model}: no SFT checkpoint; run `python retool.py --stage sft` first"
                         if a.model == os.path.join("out", "sft") else f"--model {a.model}: no config.json")
    if a.data is not None and not os.path.isfile(a.data):
        raise UsageError(f"--data {a.data}: no such file")
    if min(a.steps, a.prompts, a.n, a.max_new_tokens, a.mini_batches, a.micro_batch, a.ppo_epochs) <= 0:
        raise UsageError("--steps, --prompts, --rollouts, --max-new-tokens, --mini-batches, --micro-batch "
                         "and --ppo-epochs must be positive")
    return a


def rl_main(argv):
    """`retool.py --stage rl ...`: returns the exit code (2 on a user mistake, one line)."""
    threads = torch.get_num_threads()
    try:
        return _rl_run(rl_args(argv))
    except (UsageError, DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # _rl_run may lower it on CPU; callers get theirs back
        if dist.is_initialized():
            dist.destroy_process_group()


def _rl_run(a):
    rank, world, device = setup_distributed()
    if a.prompts % (a.mini_batches * world):
        raise UsageError(f"--prompts {a.prompts} is not a multiple of --mini-batches {a.mini_batches} "
                         f"x {world} ranks")
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # leave half the cores to the sandbox: intra-op threads that compete with its workers spin
        # (measured on 2 cores: generation 60x slower with 2 threads than with 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    torch.manual_seed(a.seed)
    problems = load_rl(a.data) if a.data else builtin_problems("train", a.train_problems, seed=a.seed)
    policy, tok = load_model(a.model, device="cpu", dtype=torch.float32)
    ref = shard_model(copy.deepcopy(policy).requires_grad_(False), device) if a.kl_coef else None
    critic = shard_model(Critic(policy), device) if a.algo == "ppo" else None
    policy = shard_model(policy, device)
    opt = make_optimizer(policy, a.lr, weight_decay=0.0)
    copt = make_optimizer(critic, a.critic_lr, weight_decay=0.0) if critic is not None else None
    start = 0
    if a.resume:
        ckpt = latest_checkpoint(a.out)
        if ckpt is None:
            raise UsageError(f"--resume: no checkpoint under {os.path.join(a.out, 'checkpoints')}")
        state = load_checkpoint(ckpt, policy, opt)
        start = state["step"]
        if critic is not None:  # the critic travels in the policy checkpoint's train state
            if "critic" not in state["extra"]:
                raise UsageError(f"--resume: {ckpt} holds no critic (a GRPO run?); resume with --algo grpo")
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(critic, state["extra"]["critic"], options=full)
            set_optimizer_state_dict(critic, copt, state["extra"]["critic_opt"], options=full)
            if start <= a.critic_warmup:
                opt.state.clear()  # still warming up: the policy's optimizer has not stepped
    elif rank == 0:  # a fresh run: stale checkpoints would confuse a later --resume
        shutil.rmtree(os.path.join(a.out, "checkpoints"), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(a.out, "metrics.jsonl"))
    if rank == 0:
        print(f"rl: {a.algo}{' text-only' if a.no_tools else ''} from {a.model}, {len(problems)} prompts, "
              f"{a.steps} steps of {a.prompts} x {a.n} rollouts, {world} rank(s) on {device}", file=sys.stderr)
    log = MetricsLog(a.out, enabled=rank == 0)
    bar = tqdm(total=a.steps, initial=start, desc="rl", disable=rank != 0, dynamic_ncols=True)
    sandbox = contextlib.nullcontext() if a.no_tools else Sandbox()  # one for the whole run
    with sandbox as sb:
        for step in range(start, a.steps):
            timer, t0 = {"sandbox": 0.0}, time.perf_counter()
            with full_weights(policy):
                records = rollout(policy, tok, step_jobs(problems, a, step, rank, world), a,
                                  timed(sb.run_many, timer) if sb else None, step)
            t1 = time.perf_counter()
            metrics = rl_step(step, records, policy, critic, ref, opt, copt, a, device)
            metrics.update(rollout_metrics(records, device))
            if critic is None:
                metrics.pop("explained_var")
            metrics.update(time_gen=t1 - t0, time_sandbox=timer["sandbox"], time_train=time.perf_counter() - t1)
            log.log(step + 1, **metrics)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("reward", "accuracy", "code_ratio",
                                                             "response_len") if k in metrics})
            bar.update()
            if (step + 1) % a.save_every == 0 or step + 1 == a.steps:
                extra = {}
                if critic is not None:
                    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
                    extra = {"critic": get_model_state_dict(critic, options=opts),
                             "critic_opt": get_optimizer_state_dict(critic, copt, options=opts)}
                save_checkpoint(a.out, step + 1, policy, opt, tok, extra=extra)
                if a.algo == "ppo" and step + 1 <= a.critic_warmup:
                    opt.state.clear()  # saving gave the unused optimizer a zero step; Adam must start fresh
    bar.close()
    log.close()
    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # save_model replaces whole dirs: build aside, then move the files in
        tmp = os.path.join(a.out, ".final")
        save_model(policy, tok, tmp, state_dict=sd)
        for f in os.listdir(tmp):
            os.replace(os.path.join(tmp, f), os.path.join(a.out, f))
        os.rmdir(tmp)
        print(f"rl: saved {a.out}", file=sys.stderr)
    barrier()
    return 0
