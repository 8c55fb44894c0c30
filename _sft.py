# ---------------------------------------------------------------------------------------------
# Stage 1: cold-start SFT, and the training plumbing the RL stage reuses (distributed setup,
# FSDP2 sharding, AdamW + warm-up/cosine, packed rows, next-token log-probs, atomic resumable
# checkpoints, metrics). Pasted into retool.py above the CLI at merge.
# ---------------------------------------------------------------------------------------------
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

from data import DataError, builtin_sft_traces, builtin_tokenizer, load_sft, tokenize_trace
from retool import ModelError, build_model, load_model, save_model

# The built-in tiny model (0.9M parameters), Qwen2-shaped; vocab_size comes from the tokenizer.
TINY_CONFIG = {
    "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
}
# Its training: small batches, many optimizer steps (what makes a tiny model learn to copy digits).
# Code share 0.6: the model learns both strategies and picks code about 60% of the time, so RL has
# a choice to learn (code works, mental arithmetic does not). Measured: 3.7 minutes on 2 cores,
# 58.5% right on 200 held-out problems (every code answer's code ran; 97% of those right).
TINY_TRAIN = {"n_traces": 20000, "code_share": 0.6, "steps": 1200, "batch": 8, "pack_len": 256,
              "lr": 2e-3}
# Fine-tuning a real checkpoint: the paper's 2 epochs; lr, batch and length from verl's reproduction.
REAL_TRAIN = {"epochs": 2.0, "batch": 32, "micro_batch": 1, "pack_len": 16384, "lr": 1e-5}


# --- distributed -------------------------------------------------------------------------------

def setup_distributed():
    """(rank, world_size, device). Joins the process group when launched by torchrun (RANK set):
    nccl on CUDA, gloo on CPU; a plain `python` run is rank 0 of 1."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def shard_model(model, device):
    """FSDP2 over all ranks: every block of model.layers is one unit (gathered only while it
    runs), the root keeps embeddings, final norm and head. A no-op move on a single process."""
    if world_size() == 1:
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world_size(),))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # also moves the CPU-loaded parameters onto `device`
    return model


def autocast(device):
    """bf16 autocast on CUDA (parameters and optimizer stay fp32); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# --- optimisation ------------------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.95)):
    """AdamW; matrices decay, norms and biases (1-d parameters) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step, *, lr, warmup, total, min_ratio=0.1):
    """Linear warm-up over `warmup` steps, then cosine from lr down to min_ratio * lr at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_scheduler(optimizer, *, warmup, total, min_ratio=0.1):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, lr=1.0, warmup=warmup, total=total, min_ratio=min_ratio))


def optimizer_step(model, optimizer, scheduler=None, clip=1.0):
    """Clip, step, advance the schedule, zero the grads; returns the pre-clip gradient norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


# --- packed rows and log-probs -----------------------------------------------------------------

def pack_documents(docs, pack_len, pad_id=0):
    """Packs (ids, mask) documents into rows of exactly pack_len tokens, first-fit by decreasing
    length (documents longer than pack_len are cut). Returns (N, pack_len) tensors:
      input_ids; position_ids restarting at 0 per document; document_ids 0, 1, ... within a row
      and -1 on padding (the model attends only within equal ids); loss_mask 1 where a token is
      trained on (0 on padding and on each document's first token, which nothing predicts)."""
    order = sorted(range(len(docs)), key=lambda i: -min(len(docs[i][0]), pack_len))
    rows, free = [], []  # documents per row, room left per row
    for i in order:
        n = min(len(docs[i][0]), pack_len)
        r = next((r for r, room in enumerate(free) if room >= n), len(rows))
        if r == len(rows):
            rows.append([]), free.append(pack_len)
        rows[r].append(i)
        free[r] -= n
    out = {k: torch.full((len(rows), pack_len), v, dtype=torch.long) for k, v in
           (("input_ids", pad_id), ("position_ids", 0), ("document_ids", -1), ("loss_mask", 0))}
    for r, members in enumerate(rows):
        t = 0
        for d, i in enumerate(members):
            ids, mask = docs[i][0][:pack_len], docs[i][1][:pack_len]
            n = len(ids)
            out["input_ids"][r, t:t + n] = torch.tensor(ids)
            out["position_ids"][r, t:t + n] = torch.arange(n)
            out["document_ids"][r, t:t + n] = d
            out["loss_mask"][r, t + 1:t + n] = torch.tensor(mask[1:n], dtype=torch.long)
            t += n
    return out


def token_logprobs(model, ids, position_ids=None, document_ids=None, temperature=1.0):
    """(B, T) float32 log-probabilities of the next tokens: out[:, t] = log p(ids[:, t+1] | ids[:, :t+1]).
    The last column, and places whose next token starts another document or is padding, hold 0."""
    logits = model(ids, position_ids=position_ids, document_ids=document_ids)[:, :-1]  # (B, T-1, V)
    logits = logits.float() / temperature
    lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    if document_ids is not None:
        same = (document_ids[:, 1:] == document_ids[:, :-1]) & (document_ids[:, 1:] >= 0)
        lp = torch.where(same, lp, torch.zeros_like(lp))
    return F.pad(lp, (0, 1))


def sft_loss_sum(model, batch):
    """Summed next-token NLL over trained tokens of a packed micro-batch (dict of (B, T) tensors)."""
    lp = token_logprobs(model, batch["input_ids"], batch["position_ids"], batch["document_ids"])
    weight = F.pad(batch["loss_mask"][:, 1:], (0, 1)).to(lp.dtype)  # (B, T): target is token t+1
    return -(lp * weight).sum()


def sft_step(model, optimizer, scheduler, micro_batches, n_targets, device, clip=1.0):
    """One optimizer step over this rank's share of the global batch. The loss is the token mean
    over the WHOLE global batch: every micro-batch contributes sum(NLL) / n_targets, with
    n_targets counted across all micro-batches and ranks, so neither accumulation nor the number
    of ranks changes the gradient. Returns (global mean loss, grad norm)."""
    total = torch.zeros((), device=device)
    for i, mb in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter once, at the end
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        with autocast(device):
            loss = sft_loss_sum(model, {k: v.to(device) for k, v in mb.items()}) / n_targets
        # FSDP averages gradients over ranks; this loss is already a global mean, so undo that.
        (loss * world_size()).backward()
        total += loss.detach()
    return all_reduce_sum(total).item(), optimizer_step(model, optimizer, scheduler, clip)


@torch.no_grad()
def heldout_loss(model, rows, micro, device):
    """Token-mean loss over all held-out rows; every rank runs the same number of forwards (FSDP
    needs that): past the end, a rank wraps around to rows it then weighs 0."""
    rank, world = (dist.get_rank(), world_size()) if dist.is_initialized() else (0, 1)
    n = len(rows["input_ids"])
    sums = torch.zeros(2, device=device)  # NLL sum, target count
    for start in range(0, n, micro * world):
        idx = torch.arange(start + rank * micro, start + (rank + 1) * micro)
        mb = {k: v[idx % n].to(device) for k, v in rows.items()}
        mb["loss_mask"] = mb["loss_mask"] * (idx < n).to(device)[:, None]
        with autocast(device):
            sums[0] += sft_loss_sum(model, mb)
        sums[1] += mb["loss_mask"].sum()
    sums = all_reduce_sum(sums)
    return (sums[0] / sums[1].clamp(min=1)).item()


def batch_indices(n_rows, batch, step, seed):
    """Row indices of global batch `step`. Epochs are seeded permutations laid end to end, so the
    data position of a run is just its step count."""
    idx, pos = [], step * batch
    while len(idx) < batch:
        epoch, off = divmod(pos + len(idx), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
        idx += perm[off:off + batch - len(idx)].tolist()
    return idx


# --- checkpoints and metrics -------------------------------------------------------------------

def _rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"]), np.random.set_state(state["numpy"]), random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(out_dir, step, model, optimizer, tokenizer, scheduler=None, extra=None, keep=2):
    """Writes out_dir/checkpoints/step_NNNNNNN/: model/ (HF format), train_state.pt (optimizer,
    scheduler, step, `extra`: any picklable dict such as the data position), rng_rank{r}.pt.
    Collective under FSDP (call on every rank). Built in a temp dir, then renamed; only the last
    `keep` checkpoints stay. Returns the path."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    root = os.path.join(out_dir, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step:07d}"), os.path.join(root, f".tmp_step_{step:07d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_model(model, tokenizer, os.path.join(tmp, "model"), state_dict=model_sd)
        torch.save({"step": step, "optimizer": optim_sd, "extra": extra or {},
                    "scheduler": scheduler.state_dict() if scheduler else None},
                   os.path.join(tmp, "train_state.pt"))
    barrier()
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-keep]:
            shutil.rmtree(os.path.join(root, old))
    barrier()
    return final


def latest_checkpoint(out_dir):
    root = os.path.join(out_dir, "checkpoints")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    return os.path.join(root, steps[-1]) if steps else None


def load_checkpoint(path, model, optimizer=None, scheduler=None):
    """Restores what save_checkpoint wrote (into a plain or an FSDP-sharded model) and this rank's
    RNG states; returns the train state dict ({"step", "extra", ...})."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    plain, _ = load_model(os.path.join(path, "model"), device="cpu")
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, plain.state_dict(), options=full)
    state = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = os.path.join(path, f"rng_rank{rank}.pt")
    _set_rng_state(torch.load(rng if os.path.exists(rng) else os.path.join(path, "rng_rank0.pt"),
                              weights_only=False))
    return state


class MetricsLog:
    """One JSON object per log() appended to out_dir/metrics.jsonl (rank 0 only), mirrored to
    TensorBoard under out_dir/tb when tensorboard is installed."""

    def __init__(self, out_dir, enabled=True):
        self.path, self.tb = (os.path.join(out_dir, "metrics.jsonl") if enabled else None), None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def log(self, step, **metrics):
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            if self.tb is not None and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


# --- the SFT stage -----------------------------------------------------------------------------

class UsageError(Exception):
    """A user mistake (flag, path): reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + message
        raise UsageError(message)


def sft_args(argv):
    p = _Parser(prog="retool.py --stage sft", description="Cold-start SFT on code-interleaved traces. "
                "Without --model: the tiny preset on built-in traces, on CPU, in minutes.")
    for flag, kind, default, text in (
        ("model", str, None, "HF checkpoint dir to fine-tune (default: a fresh tiny model)"),
        ("data", str, None, "SFT rows, .jsonl/.json/.parquet (default: built-in traces)"),
        ("out", str, "out/sft", "final model, metrics.jsonl, checkpoints/"),
        ("n-traces", int, TINY_TRAIN["n_traces"], "built-in traces to generate"),
        ("code-share", float, TINY_TRAIN["code_share"], "share of built-in traces that use code"),
        ("steps", int, None, f"optimizer steps (default: --epochs; tiny preset {TINY_TRAIN['steps']})"),
        ("epochs", float, None, f"passes over the data (default {REAL_TRAIN['epochs']})"),
        ("batch", int, None, "packed rows per optimizer step, all ranks together"),
        ("micro-batch", int, None, "rows per forward on each rank (default: --batch / ranks)"),
        ("pack-len", int, None, "tokens per packed row"),
        ("lr", float, None, f"peak lr (default {REAL_TRAIN['lr']}; tiny preset {TINY_TRAIN['lr']})"),
        ("min-lr-ratio", float, 0.1, "final lr / peak lr (cosine)"),
        ("warmup", float, 0.1, "share of the steps spent warming up"),
        ("weight-decay", float, 0.1, "AdamW weight decay on matrices"),
        ("clip", float, 1.0, "gradient-norm clip"),
        ("heldout", int, 64, "documents held out for the eval loss (at most a tenth)"),
        ("eval-every", int, 100, "steps between held-out losses"),
        ("save-every", int, 500, "steps between checkpoints"),
        ("stop-after", int, None, "stop after this many steps of this run, checkpointed (--resume goes on)"),
        ("seed", int, 0, "")):
        p.add_argument("--" + flag, type=kind, default=default, help=text)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    a = p.parse_args(argv)
    for k, v in (TINY_TRAIN if a.model is None else REAL_TRAIN).items():
        if getattr(a, k, 0) is None and not (k == "steps" and a.epochs):
            setattr(a, k, v)
    for k in ("n_traces", "steps", "epochs", "batch", "micro_batch", "pack_len", "lr", "eval_every",
              "save_every", "stop_after"):
        if getattr(a, k) is not None and getattr(a, k) <= 0:
            raise UsageError(f"--{k.replace('_', '-')} must be positive, got {getattr(a, k)}")
    if not 0 <= a.code_share <= 1 or not 0 <= a.warmup < 1 or a.heldout < 0:
        raise UsageError("--code-share must lie in [0, 1], --warmup in [0, 1), --heldout >= 0")
    if a.model is not None and not os.path.isfile(os.path.join(a.model, "config.json")):
        raise UsageError(f"--model {a.model}: not a checkpoint directory (no config.json)")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise UsageError(f"--out {a.out}: not a directory")
    if a.data is not None and not os.path.isfile(a.data):
        raise UsageError(f"--data {a.data}: no such file")
    return a


def sft_main(argv):
    """`retool.py --stage sft ...`: returns the exit code (2 on a user mistake, one line)."""
    threads = torch.get_num_threads()  # _sft_run may lower it; callers (tests) get theirs back
    try:
        return _sft_run(sft_args(argv))
    except (UsageError, DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


def _sft_run(a):
    rank, world, device = setup_distributed()
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Half the cores: when another process holds a core, OpenMP threads that spin-wait for it
        # collapse (2 threads on a busy 2-core box: 700 tokens/s; 1 thread: 11,000).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    micro = a.micro_batch or max(1, a.batch // world)
    if a.batch % (micro * world):
        raise UsageError(f"--batch {a.batch} is not a multiple of --micro-batch {micro} x {world} ranks")
    torch.manual_seed(a.seed), np.random.seed(a.seed), random.seed(a.seed)
    if a.model:  # on CPU in fp32: the optimizer keeps fp32 weights, CUDA runs under bf16 autocast
        model, tok = load_model(a.model, device="cpu", dtype=torch.float32)
    else:
        tok = builtin_tokenizer()
        model = build_model({**TINY_CONFIG, "vocab_size": len(tok)}, a.seed)
    traces = load_sft(a.data) if a.data else builtin_sft_traces(a.n_traces, seed=a.seed, code_share=a.code_share)
    docs = [tokenize_trace(tok, m) for m in traces]
    random.Random(a.seed).shuffle(docs)
    held, train = docs[:min(a.heldout, len(docs) // 10)], docs[min(a.heldout, len(docs) // 10):]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = pack_documents(train, a.pack_len, pad)
    held_rows = pack_documents(held, a.pack_len, pad) if held else None
    n_rows = len(rows["input_ids"])
    steps = a.steps or math.ceil(a.epochs * n_rows / a.batch)
    cut = sum(len(d[0]) > a.pack_len for d in docs)
    if rank == 0:
        print(f"sft: {len(train)} documents in {n_rows} rows of {a.pack_len} tokens ({cut} cut), "
              f"{len(held)} held out, {steps} steps of {a.batch} rows, {world} rank(s) on {device}",
              file=sys.stderr)

    model = shard_model(model, device)
    model.train()
    opt = make_optimizer(model, a.lr, a.weight_decay)
    sched = make_scheduler(opt, warmup=round(a.warmup * steps), total=steps, min_ratio=a.min_lr_ratio)
    start = 0
    if a.resume:
        ckpt = latest_checkpoint(a.out)
        if ckpt is None:
            raise UsageError(f"--resume: no checkpoint under {os.path.join(a.out, 'checkpoints')}")
        state = load_checkpoint(ckpt, model, opt, sched)
        if state["extra"].get("n_rows") != n_rows:
            raise UsageError(f"--resume: {ckpt} was trained on other data ({state['extra'].get('n_rows')} rows)")
        start = state["step"]
    elif rank == 0:  # a fresh run: stale checkpoints and metrics would mislead --resume and plots
        for stale in ("checkpoints", "tb"):
            shutil.rmtree(os.path.join(a.out, stale), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(a.out, "metrics.jsonl"))
    log = MetricsLog(a.out, enabled=rank == 0)
    stop = min(steps, start + a.stop_after) if a.stop_after else steps
    share = a.batch // world
    bar = tqdm(total=steps, initial=start, desc="sft", disable=rank != 0, dynamic_ncols=True)
    for step in range(start, stop):
        t0 = time.perf_counter()
        idx = batch_indices(n_rows, a.batch, step, a.seed)
        mine = idx[rank * share:(rank + 1) * share]
        micro_batches = [{k: v[mine[i:i + micro]] for k, v in rows.items()} for i in range(0, share, micro)]
        n_targets = max(1, int(rows["loss_mask"][idx].sum()))
        lr = opt.param_groups[0]["lr"]
        loss, gnorm = sft_step(model, opt, sched, micro_batches, n_targets, device, a.clip)
        tps = int((rows["document_ids"][idx] >= 0).sum()) / (time.perf_counter() - t0)
        metrics = {"loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": round(tps)}
        if held_rows is not None and ((step + 1) % a.eval_every == 0 or step + 1 == steps):
            metrics["heldout_loss"] = heldout_loss(model, held_rows, micro, device)
        log.log(step + 1, **metrics)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}", lr=f"{lr:.2e}")
        bar.update()
        if (step + 1) % a.save_every == 0 or (step + 1 == stop < steps):
            save_checkpoint(a.out, step + 1, model, opt, tok, sched,
                            extra={"rows_seen": (step + 1) * a.batch, "n_rows": n_rows})
    bar.close()
    log.close()
    if stop == steps:  # the finished model, next to metrics.jsonl and checkpoints/
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:  # save_model replaces whole dirs: build aside, then move the files in
            tmp = os.path.join(a.out, ".final")
            save_model(model, tok, tmp, state_dict=sd)
            for f in os.listdir(tmp):
                os.replace(os.path.join(tmp, f), os.path.join(a.out, f))
            os.rmdir(tmp)
            print(f"sft: saved {a.out}", file=sys.stderr)
    barrier()
    return 0
