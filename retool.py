"""retool: teach a language model when and how to call a code interpreter (ReTool, arXiv 2504.11536).

One file for the model, the generation engine with its tool-interrupting sampler, the SFT and PPO
loops and the command line. The same module trains and generates: there is no second inference
engine and no weight sync. Read it top to bottom.
"""
import argparse
import bisect
import contextlib
import copy
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from data import (DataError, Sample, builtin_problems, builtin_sft_traces, builtin_tokenizer, interpreter_block,
                  load_template, load_rl, load_sft, render_prompt, response_spans, reward, sample_text, samples_html,
                  tokenize_trace)
from sandbox import Sandbox

# -----------------------------------------------------------------------------------------------
# Config: the presets. The tiny ones train the built-in tiny model on the built-in task (CPU,
# minutes); the real ones are the paper's settings for a real checkpoint. A stage picks by the
# model's size (default_preset); --preset overrides.

# The built-in tiny model (0.9M parameters), Qwen2-shaped; vocab_size comes from the tokenizer.
TINY_CONFIG = {
    "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
}
# Its training: small batches, many optimizer steps (what makes a tiny model learn to copy digits).
# Code share 0.6: the model learns both strategies and picks code about 60% of the time, so RL has
# a choice to learn (code works, mental arithmetic does not). Measured: 3.9 minutes on 2 cores,
# 59.0% right on 200 held-out problems (every code answer's code ran; 98% of those right).
TINY_TRAIN = {"n_traces": 20000, "code_share": 0.6, "steps": 1200, "batch": 8, "pack_len": 256,
              "lr": 2e-3, "activation_checkpointing": False}
# Fine-tuning a real checkpoint: the paper's 2 epochs; lr, batch and length from verl's reproduction.
REAL_TRAIN = {"epochs": 2.0, "batch": 32, "micro_batch": 1, "pack_len": 16384, "lr": 1e-5,
              "activation_checkpointing": True}
# RL: the tiny model learns fast at a large lr; real checkpoints get the paper's settings (lr 1e-6,
# critic lr 2e-6, critic warm-up 20, 400 steps)
TINY_PRESET_MAX_PARAMS = 100_000_000  # smaller checkpoints get the tiny presets by default (--preset overrides)
RL_PRESETS = {
    "tiny": dict(lr=1e-4, critic_lr=1e-3, steps=50, prompts=16, n=8, max_new_tokens=200,
                 critic_warmup=2, mini_batches=2, micro_batch=64, activation_checkpointing=False),
    "real": dict(lr=1e-6, critic_lr=2e-6, steps=400, prompts=64, n=16, max_new_tokens=16000,
                 critic_warmup=20, mini_batches=2, micro_batch=1, activation_checkpointing=True),
}


# -----------------------------------------------------------------------------------------------
# Model: a Llama/Qwen-family decoder in plain torch; load_model/save_model speak transformers' names.


class ModelError(Exception):
    """A checkpoint we cannot read: the message names the file or field (the CLI exits 2)."""


HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim")  # the last two optional
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_hf_config(hf: dict, where: str):
    """What from_hf relies on, each mistake a one-line ModelError -> (rope settings, rope_theta, rope type)."""
    kind = hf.get("model_type")
    if kind not in ("qwen2", "qwen3", "llama"):
        raise ModelError(f"{where}: unsupported model_type {kind!r} (supported: qwen2, qwen3, llama)")
    missing = next((k for k in ("num_attention_heads", *HF_SIZES[:4]) if k not in hf), None)
    if missing:
        raise ModelError(f"{where}: missing field {missing!r}")
    # transformers 5 writes rope_parameters; real 4.x checkpoints carry rope_theta/rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_scaling / rope_parameters must be an object")
    rope = dict(rope)
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ModelError(f"{where}: unsupported rope type {rope_type!r} (supported: default, llama3)")
    for key, value in (("rope_theta", theta), ("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
                       *((k, rope.get(k, 1)) for k in LLAMA3_ROPE[:3])):
        if type(value) not in (int, float) or not 0 < value < math.inf:
            raise ModelError(f"{where}: {key} must be a positive number, got {value!r}")
    if type(hf.get("tie_word_embeddings", False)) is not bool:
        raise ModelError(f"{where}: tie_word_embeddings must be true or false")
    for key in HF_SIZES:
        value = hf.get(key)
        if value is not None and not (type(value) is int and value > 0):
            raise ModelError(f"{where}: {key} must be a positive integer, got {value!r}")
    heads = hf["num_attention_heads"]
    if heads % hf.get("num_key_value_heads", heads):
        raise ModelError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads")
    if rope_type == "llama3" and any(k not in rope for k in LLAMA3_ROPE):
        raise ModelError(f"{where}: llama3 rope scaling needs {', '.join(LLAMA3_ROPE)}")
    return rope, theta, rope_type


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # only the llama3 type; everything else is refused up front
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (always on in Qwen2/2.5)
    o_proj_bias: bool = False  # Llama/Qwen3's attention_bias also covers o_proj; Qwen2 has none there
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3)
    hf: dict = field(default_factory=dict, repr=False)  # the config.json we came from, written back on save

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        rope, theta, rope_type = check_hf_config(hf, where)
        kind, heads = hf["model_type"], hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=True if kind == "qwen2" else hf.get("attention_bias", False),
            o_proj_bias=kind != "qwen2" and hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False), qk_norm=kind == "qwen3", hf=dict(hf))


def rope_inv_freq(c: ModelConfig) -> torch.Tensor:
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
    if c.rope_scaling:  # llama3: stretch the low frequencies, keep the high ones, blend in between
        s = c.rope_scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq.float()


def rotate(x, cos, sin):  # x (B, T, H, D); cos/sin (B, T, 1, D): the non-interleaved (rotate-half) form
    # rotate_half(x) * sin == roll(x, D/2) * [-sin, sin]: forward() folds the sign into the sin table
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # normalised in float32, scaled in x's dtype (HF's order)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.h, self.h_kv, self.d = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.qk_norm = c.qk_norm
        # q, k and v in one matmul (HF's q_proj/k_proj/v_proj stacked: load_model and save_model convert)
        self.qkv_proj = nn.Linear(c.hidden_size, (self.h + 2 * self.h_kv) * self.d, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.h * self.d, c.hidden_size, bias=c.o_proj_bias)
        if c.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.d, c.rms_norm_eps), RMSNorm(self.d, c.rms_norm_eps)

    def forward(self, x, cos, sin, attend):
        B, T, _ = x.shape
        H, H_kv = self.h, self.h_kv
        qkv = self.qkv_proj(x).view(B, T, H + 2 * H_kv, self.d)  # (B, T, H + 2 H_kv, D)
        qk, v = qkv.split((H + H_kv, H_kv), dim=2)
        if self.qk_norm:
            q, k = qk.split((H, H_kv), dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)
        # rotary in the tables' precision, attention in v's dtype (bf16 under autocast: flash-eligible)
        q, k = rotate(qk, cos, sin).to(v.dtype).split((H, H_kv), dim=2)
        out = attend(q, k, v, self.layer)  # (B, T, H, D)
        return self.o_proj(out.reshape(B, T, H * self.d))


class MLP(nn.Module):  # SwiGLU, HF's gate_proj and up_proj stacked in one matmul
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


@lru_cache(maxsize=1)
def flash_attn():
    """flash-attn's two kernels when installed (CUDA machines only), else None: SDPA does the work."""
    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        return flash_attn_varlen_func, flash_attn_with_kvcache
    except ImportError:
        return None


def use_flash(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and flash_attn() is not None


def packed_attention(q, k, v, document_ids):
    """Causal attention that never crosses a document boundary. q (B, T, H, D), k/v (B, T, H_kv, D);
    document_ids (B, T) with -1 on padding (padding attends among itself; its outputs are ignored)."""
    B, T, H, D = q.shape
    if use_flash(q):
        # varlen wants one flat token stream cut into segments: a segment starts at each row start
        # and wherever the document id changes.
        starts = torch.ones(B, T, dtype=torch.bool, device=q.device)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        cu = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([B * T], device=q.device)])
        cu = cu.to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        out = flash_attn()[0](q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                              cu, cu, longest, longest, causal=True)
        return out.view(B, T, H, D)
    if q.is_cuda:
        return segment_attention(q, k, v, document_ids)
    i = torch.arange(T, device=q.device)
    mask = (document_ids[:, :, None] == document_ids[:, None, :]) & (i[None, :, None] >= i[None, None, :])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], enable_gqa=True)
    return out.transpose(1, 2)


def segment_attention(q, k, v, document_ids):
    """The same, one causal SDPA call per document: no (T, T) mask, so on CUDA SDPA's flash or
    memory-efficient kernel serves 16k-token packed rows."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        ids = document_ids[b]
        cuts = [0] + (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist() + [len(ids)]
        for s, e in zip(cuts[:-1], cuts[1:]):
            out[b, s:e] = causal_attention(q[b:b + 1, s:e], k[b:b + 1, s:e], v[b:b + 1, s:e], None)[0]
    return out


def causal_attention(q, k, v, layer):  # a plain batch: every row is one document
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = rope_inv_freq(config)  # a plain attribute: .to(bf16) must not round it
        # Under grad, keep only each block's input and recompute its inside in backward: at 16k tokens
        # a 7B model's activations would not fit an 80 GB card otherwise. The real presets turn it on.
        self.activation_checkpointing = False

    def forward(self, input_ids, position_ids=None, document_ids=None, cache=None, head=None):
        """input_ids (B, T) -> logits (B, T, V). Packed rows pass document_ids and position_ids that
        restart per document. With a KVCache (the engine), positions come from the cache, the new
        keys and values are written into it, and only the last position's logits are returned.
        head(h, lm_head), when given, replaces the head on the final hidden states (B, T, C) and its
        result is returned: it runs inside forward, where FSDP has the head's weight gathered."""
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if cache is not None:
            position_ids, attend = cache.ctx.positions, cache.attend
        elif document_ids is not None:
            def attend(q, k, v, layer):  # every layer masks by the same documents
                return packed_attention(q, k, v, document_ids)
        else:
            attend = causal_attention
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device).expand(B, T)
        self.inv_freq = self.inv_freq.to(x.device)
        angles = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        cos = angles.cos().repeat(1, 1, 2)[:, :, None, :].to(x.dtype)  # (B, T, 1, D)
        sin = angles.sin()
        sin = torch.cat((-sin, sin), dim=-1)[:, :, None, :].to(x.dtype)  # (B, T, 1, D), rotate()'s signs in it
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.layers:
            x = checkpoint(block, x, cos, sin, attend, use_reentrant=False) if recompute else block(x, cos, sin, attend)
        if cache is not None:
            x = x[:, -1:]  # rows are left-padded, so the last position is every row's newest token
        x = self.norm(x)
        return self.lm_head(x) if head is None else head(x, self.lm_head)

    def hidden(self, input_ids, position_ids=None, document_ids=None):
        """Final-normed hidden states (B, T, C): the trunk a value head sits on."""
        return self(input_ids, position_ids, document_ids, head=lambda h, lm_head: h)  # __call__: FSDP hooks


def init_weights(model: Transformer, std: float = 0.02):
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            nn.init.ones_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, std=std)


def build_model(hf_config: dict, seed: int = 0) -> Transformer:
    """A freshly initialised model for a transformers-style config dict (the tiny preset)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(hf_config))
    init_weights(model, hf_config.get("initializer_range", 0.02))
    return model


def hf_parts(name: str, c: ModelConfig) -> list:
    """Our parameter name -> [(HF tensor name, rows)]: a stacked projection is its HF parts along dim 0."""
    key = name if name.startswith("lm_head") else "model." + name
    head, _, leaf = key.rpartition(".")
    head, _, proj = head.rpartition(".")
    stacks = {"qkv_proj": [("q_proj", c.num_attention_heads * c.head_dim), ("k_proj", c.num_key_value_heads * c.head_dim),
                           ("v_proj", c.num_key_value_heads * c.head_dim)],
              "gate_up_proj": [("gate_proj", c.intermediate_size), ("up_proj", c.intermediate_size)]}
    return [(f"{head}.{part}.{leaf}", rows) for part, rows in stacks[proj]] if proj in stacks else [(key, None)]


def default_preset(model_path) -> str:
    """"tiny" for a fresh model and checkpoints under TINY_PRESET_MAX_PARAMS (the built-in SFT model
    included), "real" (the paper's settings) for anything larger."""
    if model_path is None:
        return "tiny"
    with torch.device("meta"):
        config = ModelConfig.from_hf(read_json(Path(model_path) / "config.json"), str(Path(model_path) / "config.json"))
        n = sum(p.numel() for p in Transformer(config).parameters())
    return "tiny" if n < TINY_PRESET_MAX_PARAMS else "real"


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable ({e})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return value


MODEL_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # fast, BPE (+ merges.txt), sentencepiece
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # or "chat_template" in tokenizer_config.json


def tokenizer_problem(path: Path) -> str | None:
    """What a folder lacks to give a usable tokenizer (AutoTokenizer would quietly build one of a single
    id from a folder without its files), or None. Every prompt goes through the chat template."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return f"no tokenizer ({' or '.join(TOKENIZER_FILES)})"
    tok_cfg = path / "tokenizer_config.json"
    if not any((path / f).is_file() for f in CHAT_TEMPLATE_FILES) and not (
            tok_cfg.is_file() and "chat_template" in read_json(tok_cfg)):
        return f"the tokenizer has no chat template ({' or '.join(CHAT_TEMPLATE_FILES)}, or tokenizer_config.json's)"
    return None


def check_model_dir(path, flag=None, config_only=False):
    """Before any work: a checkpoint folder with config.json, weights, a tokenizer and its chat template
    (config.json alone with config_only: --plan reads nothing else), or a one-line ModelError naming
    the folder (and the flag that gave it)."""
    path = Path(path)
    if not path.is_dir():
        problem = "not a directory" if path.exists() else "no such directory"
    elif not (path / "config.json").is_file():
        problem = "not a checkpoint directory (no config.json)"
    elif config_only:
        problem = None
    elif not any((path / f).is_file() for f in MODEL_FILES):
        problem = f"no {' or '.join(MODEL_FILES)}"
    else:
        problem = tokenizer_problem(path)
    if problem:
        raise ModelError(f"{flag + ' ' if flag else ''}{path}: {problem}")


def read_weights(path: Path, model, device, dtype) -> dict:
    """The safetensors files of an HF folder -> our state dict (HF's q/k/v and gate/up stacked)."""
    from safetensors import safe_open

    index, config = path / "model.safetensors.index.json", model.config
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index}: no 'weight_map' object")
        files = sorted(set(map(str, weight_map.values())))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for f in files:
        if not (path / f).is_file():
            raise ModelError(f"{path / f}: missing weight shard")
        try:
            with safe_open(str(path / f), framework="pt", device="cpu") as sf:
                tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
        except Exception as e:  # noqa: BLE001  safetensors raises its own error type for a corrupt file
            raise ModelError(f"{path / f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    state = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        parts = hf_parts(name, config)
        if parts[0][0] not in tensors and name == "lm_head.weight" and config.tie_word_embeddings:
            parts = [("model.embed_tokens.weight", None)]
        for key, rows in parts:
            want = tuple(p.shape) if rows is None else (rows, *p.shape[1:])
            if key not in tensors:
                raise ModelError(f"{path}: weight {key!r} missing from the checkpoint")
            if tuple(tensors[key].shape) != want:
                raise ModelError(f"{path}: weight {key!r} has shape {tuple(tensors[key].shape)}, config says {want}")
        t = torch.cat([tensors[key] for key, _ in parts]) if len(parts) > 1 else tensors[parts[0][0]]
        state[name] = t.to(device=device, dtype=dtype)
    return state


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    problem = tokenizer_problem(path)
    if problem:
        raise ModelError(f"{path}: {problem}")
    # A tokenizer saved as a plain tokenizer.json (the built-in one) must load as exactly that:
    # AutoTokenizer would follow config.json's model_type and swap in Qwen2's pre-tokenizer.
    tok_cfg = path / "tokenizer_config.json"
    plain = tok_cfg.is_file() and read_json(tok_cfg).get("tokenizer_class") in (
        "TokenizersBackend", "PreTrainedTokenizerFast")
    try:
        return (PreTrainedTokenizerFast if plain else AutoTokenizer).from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001  tokenizers' own errors on a corrupt tokenizer.json
        raise ModelError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None


def load_model(path, device=None, dtype=None):
    """A local HF checkpoint directory -> (model, tokenizer), without a transformers model."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (not a model directory)")
    config = ModelConfig.from_hf(read_json(path / "config.json"), str(path / "config.json"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(read_weights(path, model, device, dtype), assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    return model, load_tokenizer(path)


def remove_model(path):
    """Drop a model's config.json and weight files from path, nothing else: without config.json the
    directory is no model, so a rerun or a crash mid-save never leaves a stale one to be loaded."""
    path = Path(path)
    for f in [path / "config.json", path / "model.safetensors.index.json", *path.glob("model*.safetensors")]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(f)


def save_model(model: Transformer, tokenizer, path, state_dict: dict | None = None):
    """Write an HF model (config, safetensors, tokenizer) into directory path; other files there
    (checkpoints, metrics) stay. Every file is written aside and renamed into place, config.json
    last, so path holds no config.json until the model is whole. Sharded (FSDP) callers pass the
    gathered full state_dict."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for name, v in state.items():
        if not (name == "lm_head.weight" and model.config.tie_word_embeddings):
            parts = hf_parts(name, model.config)
            pieces = v.detach().to("cpu").split([rows or len(v) for _, rows in parts])
            tensors.update({key: piece.contiguous() for (key, _), piece in zip(parts, pieces)})
    hf = dict(model.config.hf)
    hf.pop("torch_dtype", None)
    hf["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    hf.setdefault("architectures", [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                     "llama": "LlamaForCausalLM"}[hf["model_type"]]])
    tmp = Path(tempfile.mkdtemp(prefix=".saving", dir=path))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        remove_model(path)  # an old shard index would outrank the new single file
        mask = os.umask(0o22)  # reading the umask means setting it: set it straight back
        os.umask(mask)
        for f in sorted(os.listdir(tmp), key=lambda f: f == "config.json"):
            os.chmod(tmp / f, 0o666 & ~mask)  # safetensors writes 0600: a colleague could not load the model
            os.replace(tmp / f, path / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -----------------------------------------------------------------------------------------------
# Generation engine: a paged KV cache, continuous batching with preemption, and a sampler that
# pauses a row at </code>, runs its code, appends the interpreter's output into the cache and resumes.

KV_BLOCK = 16  # positions per cache block under SDPA: small blocks waste little at a row's end
FLASH_KV_BLOCK = 256  # flash-attn's paged kernel takes blocks of a multiple of 256 positions
MEMORY_MARGIN = 0.1  # of each GPU's memory, kept for a forward's activations and logits (and the plan's)


def kv_bytes(config: ModelConfig, positions: int, dtype_bytes: int = 2) -> int:
    """Keys and values of `positions` positions over all layers: the engine's pool and the plan."""
    return positions * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes


@dataclass
class Context:
    """What every layer of one engine forward shares, built once per step (nano-vllm's Context)."""
    positions: torch.Tensor  # (R, T) query positions, bottom-right aligned; padding at 0
    total: torch.Tensor  # (R,) each row's cached length once this forward is written
    src: torch.Tensor | None  # (N,) the real tokens' places in the flattened (R*T) chunk; None: all are real
    write: torch.Tensor  # (N,) where each real token's key goes in the flattened pool (blocks * block size)
    table: torch.Tensor  # (R, W) each row's blocks in position order, padded (flash-attn's block_table)
    width: int  # the longest row after this forward: the keys SDPA reads
    prefix: bool  # each row one block, rows in blocks 0..R-1: SDPA reads a slice of the pool, no copy
    mask: torch.Tensor | None  # (R, 1, T, L) SDPA's additive causal bias; None under flash-attn


class KVCache:
    """Paged keys and values (vLLM's PagedAttention; nano-vllm's block manager): per layer a pool of
    fixed-size blocks (blocks, block_size, H_kv, D), flash-attn's paged layout, handed to rows one
    block at a time, so a row holds memory for the positions it has, not the longest it might reach.
    Blocks are reference-counted: the rollouts of one prompt share its prompt's blocks. A forward
    feeds R rows a left-padded chunk (R, T) whose last n_new[r] tokens are real; row r's cached[r]
    positions lie in its blocks tables[r]. `prepare` builds the forward's Context."""

    def __init__(self, config: ModelConfig, n_blocks: int, block_size: int, device, dtype):
        shape = (config.num_hidden_layers, n_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)  # blocks are zeroed as they are handed out
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.refs = [0] * n_blocks
        self.free = list(range(n_blocks))[::-1]  # a stack: pop() hands out the lowest block first
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.ctx = None

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def allocate(self, n: int) -> list:
        """n free blocks, zeroed: SDPA reads (masked) positions past a row's end, and a NaN left by
        an earlier row would pass the mask (NaN + -inf is NaN) into this one's output."""
        blocks = [self.free.pop() for _ in range(n)]
        for b in blocks:
            self.refs[b] = 1
            self.k[:, b].zero_()
            self.v[:, b].zero_()
        return blocks

    def share(self, blocks: list):
        for b in blocks:
            self.refs[b] += 1

    def release(self, blocks: list) -> list:
        """Drop one reference to each block -> the blocks that became free."""
        freed = []
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)
                freed.append(b)
        return freed

    def prepare(self, tables: list, cached: list, n_new: list):
        """Build the Context of a forward of a left-padded (R, T) chunk."""
        R, T, bs, device = len(tables), max(n_new), self.block_size, self.k.device
        total = torch.tensor([c + n for c, n in zip(cached, n_new)], device=device)  # (R,)
        width = int(total.max())
        steps = torch.arange(width, device=device)  # T <= width: a row's cache includes its new tokens
        positions = (total[:, None] - T + steps[:T]).clamp(min=0)  # (R, T); padding never fully masked
        widest = max(map(len, tables))
        # padded with the row's own first block: a row never reads (even masked) another row's keys
        table = torch.tensor([t + t[:1] * (widest - len(t)) for t in tables], device=device)  # (R, W)

        def place(pos):  # (R, X) positions -> (R, X) places in the flattened pool
            return table.gather(1, pos // bs) * bs + pos % bs

        write = place(positions).flatten()  # (R*T,)
        src = None
        if min(n_new) < T:  # padding: only each row's last n_new tokens are written
            valid = (steps[:T] >= T - total.new_tensor(n_new)[:, None]).flatten()  # (R*T,)
            src = valid.nonzero()[:, 0]
            write = write[src]
        mask = None
        if not use_flash(self.k):  # the cache holds q's dtype: bf16 under CUDA autocast
            causal = steps[:width] <= positions[:, :, None]  # (R, T, L)
            mask = torch.zeros(causal.shape, dtype=self.k.dtype, device=device).masked_fill_(~causal, float("-inf"))[:, None]
        prefix = widest == 1 and [t[0] for t in tables] == list(range(R))  # from the lists: no device sync
        self.ctx = Context(positions, total, src, write, table, width, prefix, mask)

    def attend(self, q, k, v, layer):  # q (R, T, H, D), k/v (R, T, H_kv, D) -> (R, T, H, D)
        R, T, H, D = q.shape
        ctx = self.ctx
        k, v = k.flatten(0, 1), v.flatten(0, 1)  # (R*T, H_kv, D)
        if ctx.src is not None:
            k, v = k[ctx.src], v[ctx.src]
        pool_k, pool_v = self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)  # views (blocks*bs, H_kv, D)
        pool_k.index_copy_(0, ctx.write, k)
        pool_v.index_copy_(0, ctx.write, v)
        if ctx.mask is None:
            return flash_attn()[1](q, self.k[layer], self.v[layer], cache_seqlens=ctx.total.int(),
                                   block_table=ctx.table.int(), causal=True)
        if ctx.prefix:
            kc, vc = self.k[layer, :R, :ctx.width], self.v[layer, :R, :ctx.width]  # views (R, L, H_kv, D)
        elif ctx.table.shape[1] == 1:  # one block per row, in another order: copy only the positions read
            kc, vc = self.k[layer, ctx.table[:, 0], :ctx.width], self.v[layer, ctx.table[:, 0], :ctx.width]
        else:  # whole blocks gathered (memcpy-sized pieces, far cheaper than per-position indexing)
            kc = self.k[layer].index_select(0, ctx.table.flatten()).view(R, -1, *k.shape[1:])[:, :ctx.width]
            vc = self.v[layer].index_select(0, ctx.table.flatten()).view(R, -1, *v.shape[1:])[:, :ctx.width]
        kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)  # (R, H_kv, L, D)
        if T == 1:  # decode: a kv head's G query heads become G queries of one head, so each key is read once
            out = F.scaled_dot_product_attention(q.reshape(R, -1, self.groups, D), kc, vc, attn_mask=ctx.mask)
            return out.view(R, 1, H, D)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kc, vc, attn_mask=ctx.mask, enable_gqa=True)
        return out.transpose(1, 2)


class KVBudgetError(ValueError):
    """The KV budget holds no row of the longest length a rollout may reach."""


def make_cache(config: ModelConfig, *, max_len, rows, kv_budget, block_size, device, dtype) -> KVCache:
    """The pool: blocks for `rows` rows of max_len positions, or fewer where kv_budget bytes (default
    on CUDA: the card's free memory less MEMORY_MARGIN of it; on CPU: no cap) hold fewer; then the
    engine preempts. A pool must hold one row of max_len, or no row could ever finish. Default block
    size: flash-attn's; on CPU with no budget one block per row (every row fits, and SDPA over
    scattered blocks would copy the whole cache every step: 24% of a decode step at batch 32); else
    KV_BLOCK."""
    flash = use_flash(torch.empty(0, device=device, dtype=dtype))
    if block_size is None:
        if flash:
            block_size = FLASH_KV_BLOCK
        elif kv_budget is None and device.type == "cpu":
            block_size = max_len
        else:
            block_size = KV_BLOCK
    if flash:  # its paged kernel takes multiples of FLASH_KV_BLOCK only
        block_size = -(-block_size // FLASH_KV_BLOCK) * FLASH_KV_BLOCK
    else:
        block_size = min(block_size, max_len)  # a row needs no more: one block per row is the contiguous cache
    per_row = -(-max_len // block_size)
    if kv_budget is None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the allocator's idle cache
        kv_budget = free - MEMORY_MARGIN * total
    n_blocks = rows * per_row
    if kv_budget is not None:
        n_blocks = min(n_blocks, int(kv_budget // kv_bytes(config, block_size, dtype.itemsize)))
    if n_blocks < per_row:
        have = max(0, n_blocks) * block_size
        raise KVBudgetError(f"the KV budget ({(kv_budget or 0) / 2**30:.2f} GiB) holds {have} positions of this "
                         f"model; one row needs {max_len} (max_total_len): raise --kv-budget or lower --max-new-tokens")
    return KVCache(config, n_blocks, block_size, device, dtype)


def sample(logits, temperature, top_p, top_k, uniforms):
    """logits (R, V) float32, uniforms (R,) in [0, 1) -> tokens (R,), their log-probs (R,) under the
    distribution actually sampled from (temperature-scaled, top-k/top-p filtered)."""
    if temperature == 0:
        logp, tokens = torch.log_softmax(logits, -1).max(-1)  # max: the first of tied maxima, like argmax
        return tokens, logp
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    logp = torch.log_softmax(logits, -1)
    # Inverse-CDF sampling with one uniform per row from the row's own RNG: a row's tokens depend on
    # its seed only, never on which other rows share the batch (or the rank).
    cdf = logp.exp().cumsum(-1)
    u = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    last = (logp > float("-inf")).long().cumsum(-1).argmax(-1)  # (R,) the last token still allowed
    tokens = torch.minimum(torch.searchsorted(cdf, u, right=True)[:, 0], last)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


@dataclass
class ToolCall:
    code: str
    feedback: str
    status: str  # the sandbox's status ("ok", "error", "timeout", ...); "ok" for plain-string tools


@dataclass
class Trajectory:
    prompt_ids: list
    response_ids: list = field(default_factory=list)
    loss_mask: list = field(default_factory=list)  # 1 sampled by the model, 0 injected interpreter
    logprobs: list = field(default_factory=list)  # per response token; 0.0 where loss_mask is 0
    tool_calls: list = field(default_factory=list)
    finish_reason: str = ""  # "eos", "length", "stop" or "max_tool_calls"
    text: str = ""

    def extend(self, ids: list, logprobs: list | None = None):
        """Append response ids: sampled, with their log-probs, or injected (logprobs None)."""
        self.response_ids += ids
        self.loss_mask += [0 if logprobs is None else 1] * len(ids)
        self.logprobs += [0.0] * len(ids) if logprobs is None else logprobs


CODE_BLOCK = re.compile(r"```python[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python block of the last <code> span (the official harness's rule)."""
    start = text.rfind("<code>")
    span = (text[start + len("<code>"):] if start >= 0 else text).removesuffix("</code>")
    blocks = CODE_BLOCK.findall(span)
    return blocks[-1] if blocks else span.strip().strip("`")


@lru_cache(maxsize=8)
def token_texts(tokenizer) -> list:
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)


def decode(tokenizer, ids, **kw) -> str:  # code must come back exactly: no "clean-up" of its spaces
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False, **kw)


def stop_ids(tokenizer) -> set:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return ids


def close_code(tokenizer, response_ids, block: str) -> tuple[bool, list]:
    """(keep the last id?, ids to inject) once a row's code ran, `block` the interpreter text that
    follows </code>. BPE may complete the tag with a merged token ('>\n', '></'): text past the tag
    that starts the block stays sampled and only the rest is injected; any other text past it is
    dropped with its token, whose text up to the tag comes back injected. Either way the stream's
    text reads `</code>` + block, as in tokenize_trace, and no sampled id is re-encoded."""
    tail = decode(tokenizer, response_ids[-len("</code>"):])
    extra = tail[tail.rfind("</code>") + len("</code>"):]
    if block.startswith(extra):
        return True, tokenizer.encode(block[len(extra):], add_special_tokens=False)
    head = decode(tokenizer, response_ids[-1:])[:-len(extra)]
    return False, tokenizer.encode(head, add_special_tokens=False) + tokenizer.encode(block, add_special_tokens=False)


def call_tool(tool, codes) -> list:
    """tool(codes) as a list; a ValueError when it answers another number of results than calls."""
    results = list(tool(codes))
    if len(results) != len(codes):
        raise ValueError(f"the tool answered {len(results)} results for {len(codes)} calls")
    return results


def run_tool(tool, codes):
    """A tool failure of any kind becomes the feedback of its calls, never a crashed rollout."""
    try:
        return [(r, "ok") if isinstance(r, str) else (r.feedback, r.status) for r in call_tool(tool, codes)]
    except Exception as e:  # noqa: BLE001
        return [(f"{type(e).__name__}: {e}", "internal")] * len(codes)


WAITING, FEEDING, PAUSED, TOOL, DONE = "waiting", "feeding", "paused", "tool", "done"


@dataclass
class RowState:
    """One prompt's progress through the engine (nanochat's RowState). state is WAITING for a slot,
    FEEDING (its unfed ids go in next), PAUSED at </code> (code not sent yet), TOOL (code running),
    or DONE. Its first `cached` ids (prompt, then response) have their keys in `blocks`."""
    traj: Trajectory
    rng: random.Random
    state: str = WAITING
    blocks: list = field(default_factory=list)  # its KV cache blocks, in position order
    cached: int = 0
    prefix: tuple | None = None  # the prompt prefix this row prefills for its siblings, until it has

    def unfed(self) -> list:
        """The ids whose keys are not cached yet: what the row's next forward feeds."""
        t = self.traj
        return t.prompt_ids[self.cached:] + t.response_ids[max(0, self.cached - len(t.prompt_ids)):]

    def length(self) -> int:  # its ids, cached or not
        return len(self.traj.prompt_ids) + len(self.traj.response_ids)


@dataclass
class Limits:
    """What ends a row: sampled stop tokens and tails, its lengths, its tool calls."""
    max_new_tokens: int
    max_total_len: int
    max_tool_calls: int
    eos: set
    tails: tuple  # stop strings, and "</code>" with a tool
    may_end: set  # only a token containing a tail's last character can complete one
    window: int  # tokens enough to hold the longest tail

    def too_long(self, traj: Trajectory, more: int = 0) -> bool:  # with `more` response ids, at a length limit?
        response = len(traj.response_ids) + more
        return response >= self.max_new_tokens or len(traj.prompt_ids) + response >= self.max_total_len


class Engine:
    """Continuous batching of at most `slots` rows over one paged KVCache, with the tool interruption.
    A row that needs a block when none is free preempts the newest row (vLLM's policy): its blocks go
    back to the pool, its ids stay, and it is re-prefilled when blocks free up. Rows whose prompts agree
    on every full block before their last token (the n rollouts of one prompt) share those blocks:
    the first row prefills them, the others feed only the rest."""

    def __init__(self, model, tokenizer, prompts, seeds, limits, sampling, tool, official, cache, slots, on_finish=None):
        self.on_finish = on_finish  # called with a prompt's index as its row finishes (a progress bar)
        self.model, self.tokenizer, self.limits, self.sampling, self.tool = model, tokenizer, limits, sampling, tool
        self.official = official  # the official ReTool interpreter block (data.interpreter_block)
        self.cache, self.slots, self.device = cache, slots, cache.k.device
        self.cuda = self.device.type == "cuda"  # rollouts in bf16 there (cache and matmuls), even for fp32 weights
        self.rows = [RowState(Trajectory(prompt_ids=p), random.Random(s)) for p, s in zip(prompts, seeds)]
        self.waiting = deque(range(len(self.rows)))  # rows to admit, in order; preempted rows go in front
        self.active = []  # the admitted rows, oldest first
        self.prefixes = {}  # a prompt prefix -> its shared blocks; None while its first row prefills it
        self.block_prefix = {}  # a shared block -> its prefix, to forget the prefix when the block is freed
        self.running = {}  # future -> the row indices whose code it runs
        self.pool = ThreadPoolExecutor(max_workers=4) if tool else None

    def run(self) -> list:
        try:
            while self.waiting or self.active or self.running:
                # 1. admit waiting rows while a slot and the blocks of their ids are free
                self.admit()
                # 2. collect finished tool calls (waiting for one when no row can feed) and resume their rows
                self.collect_tools(block=not any(self.rows[i].state == FEEDING for i in self.active))
                # 3. blocks for what each feeding row writes next, preempting the newest rows when none are free
                ready = self.reserve([i for i in self.active if self.rows[i].state == FEEDING])
                # 4-5. chunks (prompts, interpreter output) and single-token decodes go in separate forwards
                # so that one long prompt does not pad every decoding row to its length
                chunks = [i for i in ready if self.rows[i].length() - self.rows[i].cached > 1]
                decodes = [i for i in ready if self.rows[i].length() - self.rows[i].cached == 1]
                for group in (chunks, decodes):
                    if group:
                        self.forward(group)
                # 6. send the newly paused rows' code, one batch per step: the sandbox runs it in parallel
                paused = [i for i in chunks + decodes if self.rows[i].state == PAUSED]
                if paused:
                    codes = [self.rows[i].traj.tool_calls[-1].code for i in paused]
                    self.running[self.pool.submit(run_tool, self.tool, codes)] = paused
                    for i in paused:
                        self.rows[i].state = TOOL
        finally:
            if self.pool:
                self.pool.shutdown(wait=False, cancel_futures=True)
        return [r.traj for r in self.rows]

    def shared_prefix(self, row) -> tuple:
        """(key, blocks) of the full blocks of a row's prompt before its last token, the one whose
        logits the row samples from. blocks: a sibling's, [] if no row has them, None while one fills them."""
        prompt, bs = row.traj.prompt_ids, self.cache.block_size
        n = (len(prompt) - 1) // bs
        if n == 0:
            return None, []
        key = tuple(prompt[:n * bs])
        return key, self.prefixes.get(key, [])

    def admit(self):
        deferred = []  # rows whose prefix a sibling is prefilling this step: admitted after it, sharing it
        free = len(self.cache.free)  # less what the rows admitted this round will take in reserve()
        full = self.cache.blocks_for(self.limits.max_total_len)  # a row holding these needs no more
        growing = sum(len(self.rows[j].blocks) < full for j in self.active)  # rows that will need a next block
        while self.waiting and len(self.active) < self.slots:
            i = self.waiting.popleft()
            row = self.rows[i]
            key, shared = self.shared_prefix(row)
            if shared is None:
                deferred.append(i)
                continue
            need = self.cache.blocks_for(row.length()) - len(shared)
            if free - need < growing:  # keep a next block for every admitted row that may grow,
                self.waiting.appendleft(i)  # or admitting would preempt them, and them it (thrashing)
                break
            free -= need
            if len(shared) + need < full:
                growing += 1
            self.cache.share(shared)
            row.blocks, row.cached, row.state = list(shared), len(shared) * self.cache.block_size, FEEDING
            if key is not None and not shared:
                self.prefixes[key], row.prefix = None, key
            self.active.append(i)
        self.waiting.extendleft(reversed(deferred))

    def reserve(self, ready) -> list:
        """Give each ready row, oldest first, the blocks its next forward writes -> the rows still ready."""
        for i in ready:
            row = self.rows[i]
            need = self.cache.blocks_for(row.length()) - len(row.blocks)
            while len(self.cache.free) < need and i in self.active:
                self.preempt(self.active[-1])
            if i in self.active:
                row.blocks += self.cache.allocate(need)
        return [i for i in ready if i in self.active]

    def preempt(self, i):
        """Row i gives its blocks back and is re-prefilled later; a row whose code is still running
        stays TOOL and is queued when its output comes back."""
        self.evict(i)
        if self.rows[i].state == FEEDING:
            self.rows[i].state = WAITING
            self.waiting.appendleft(i)

    def evict(self, i):
        row = self.rows[i]
        for b in self.cache.release(row.blocks):
            key = self.block_prefix.pop(b, None)
            if key is not None:
                self.prefixes.pop(key, None)
        if row.prefix is not None and self.prefixes.get(row.prefix, []) is None:
            del self.prefixes[row.prefix]  # its siblings will prefill the prefix themselves
        row.blocks, row.cached, row.prefix = [], 0, None
        self.active.remove(i)

    def collect_tools(self, block: bool):
        done = [f for f in self.running if f.done()]
        if self.running and block:
            done = list(wait(self.running, return_when=FIRST_COMPLETED).done)
        for f in done:
            for i, (feedback, status) in zip(self.running.pop(f), f.result()):
                t = self.rows[i].traj
                t.tool_calls[-1].feedback, t.tool_calls[-1].status = feedback, status
                keep, block_ids = close_code(self.tokenizer, t.response_ids, interpreter_block(feedback, self.official))
                if not keep:  # the row's last sampled token (</code>'s) was never fed: nothing to uncache
                    del t.response_ids[-1], t.loss_mask[-1], t.logprobs[-1]
                if self.limits.too_long(t, len(block_ids)):
                    self.finish(i, "length")
                    continue
                t.extend(block_ids)
                if i in self.active:
                    self.rows[i].state = FEEDING
                else:  # preempted while its code ran
                    self.rows[i].state = WAITING
                    self.waiting.appendleft(i)

    def forward(self, indices):
        indices = sorted(indices, key=lambda i: self.rows[i].blocks[0])  # blocks 0..R-1 in order: no gather
        rows = [self.rows[i] for i in indices]
        chunks = [r.unfed() for r in rows]
        T = max(map(len, chunks))
        ids = torch.tensor([[0] * (T - len(c)) + c for c in chunks], device=self.device)  # left-padded (R, T)
        # inference_mode saves per-op bookkeeping; an FSDP module's first unshard in it would leave
        # inference tensors behind that training cannot update, so sharded models get no_grad only
        # (inference_mode(False) would turn grad mode back on).
        with contextlib.nullcontext() if isinstance(self.model, FSDPModule) else torch.inference_mode():
            self.cache.prepare([r.blocks for r in rows], [r.cached for r in rows], [len(c) for c in chunks])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                logits = self.model(ids, cache=self.cache)[:, -1, :len(self.tokenizer)].float()  # (R, V): no padded ids
            uniforms = torch.tensor([r.rng.random() for r in rows])
            tokens, logps = sample(logits, *self.sampling, uniforms)
        for r, c in zip(rows, chunks):
            r.cached += len(c)
            if r.prefix is not None:  # its prompt's full blocks are written: siblings may share them now
                shared = r.blocks[:len(r.prefix) // self.cache.block_size]
                self.prefixes[r.prefix] = shared
                self.block_prefix.update((b, r.prefix) for b in shared)
                r.prefix = None
        for i, tok, lp in zip(indices, tokens.tolist(), logps.tolist()):
            self.after_token(i, tok, lp)

    def after_token(self, i, token, logprob):
        t, lim = self.rows[i].traj, self.limits
        t.extend([token], [logprob])
        if token in lim.eos:
            return self.finish(i, "eos")
        if lim.too_long(t):
            return self.finish(i, "length")
        if token not in lim.may_end:
            return
        ids = t.response_ids[-lim.window:]
        tail, before = decode(self.tokenizer, ids), decode(self.tokenizer, ids[:-1])
        done = [s for s in lim.tails if tail.count(s) > before.count(s)]  # the newest token completed one
        if not done:
            return
        if done[0] != "</code>":
            return self.finish(i, "stop")
        if len(t.tool_calls) >= lim.max_tool_calls:
            return self.finish(i, "max_tool_calls")
        t.tool_calls.append(ToolCall(extract_code(decode(self.tokenizer, t.response_ids)), "", ""))
        self.rows[i].state = PAUSED  # the row sits out until its feedback arrives; its token is fed with it

    def finish(self, i, reason):
        self.rows[i].traj.finish_reason, self.rows[i].state = reason, DONE
        if i in self.active:
            self.evict(i)
        if self.on_finish is not None:
            self.on_finish(i)


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
             tool=None, max_tool_calls=8, seed=None, max_batch=64, max_total_len=None, stop=(), official=False,
             kv_budget=None, block_size=None, on_finish=None):
    """Sample a response for every prompt (strings or token-id lists) -> list[Trajectory].

    At most max_batch rows decode at once; a finished row frees its slot for the next prompt. With a
    tool (code strings -> feedback strings or sandbox Results), a row whose text gains </code> waits
    for its code to run while the others decode, then gets its interpreter block fed as one chunk.
    seed: an int, or one per prompt (rollouts that must not depend on how prompts are split across
    ranks). official: the official ReTool interpreter block. Ids past len(tokenizer) (a padded head's
    rows) are never sampled. on_finish(i): prompt i's row finished (a progress bar). kv_budget and
    block_size size the paged cache (make_cache); rows past the budget are preempted and resumed with
    the same tokens."""
    prompts = [tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p) for p in prompts]
    if not prompts:
        return []
    if not all(prompts):
        raise ValueError("generate: empty prompt (a prompt needs at least one token)")
    seeds = seed if isinstance(seed, (list, tuple)) else [
        None if seed is None else seed * 1_000_003 + i for i in range(len(prompts))]
    longest = max(map(len, prompts))
    reachable = longest + max_new_tokens  # no row can grow past this: a larger max_total_len buys nothing
    max_total_len = min(max_total_len or reachable, reachable)
    if longest >= max_total_len:
        raise ValueError(f"a prompt of {longest} tokens does not fit max_total_len={max_total_len}")
    tails = tuple(stop) + (("</code>",) if tool else ())
    may_end = {i for i, s in enumerate(token_texts(tokenizer)) if any(t[-1] in s for t in tails)}
    limits = Limits(max_new_tokens, max_total_len, max_tool_calls, stop_ids(tokenizer), tails, may_end,
                    window=max((len(t) for t in tails), default=0) + 1)
    param, slots = next(model.parameters()), min(max_batch, len(prompts))
    dtype = torch.bfloat16 if param.device.type == "cuda" else param.dtype
    cache = make_cache(model.config, max_len=max_total_len, rows=slots, kv_budget=kv_budget, block_size=block_size,
                       device=param.device, dtype=dtype)
    results = Engine(model, tokenizer, prompts, seeds, limits, (temperature, top_p, top_k), tool, official, cache,
                     slots, on_finish=on_finish).run()
    for t in results:
        t.text = decode(tokenizer, t.response_ids, skip_special_tokens=True)
    return results


# -----------------------------------------------------------------------------------------------
# Stage 1: cold-start SFT, and the training plumbing the RL stage reuses (distributed setup,
# FSDP2 sharding, AdamW + warm-up/cosine, packed rows, next-token log-probs, atomic resumable
# checkpoints, metrics).


# --- distributed -------------------------------------------------------------------------------

def setup_distributed():
    """(rank, world_size, device). Joins the process group when launched by torchrun (RANK set):
    nccl on CUDA, gloo on CPU; a plain `python` run is rank 0 of 1. On CPU torch takes half the cores
    unless OMP_NUM_THREADS says otherwise: OpenMP threads that spin-wait for a core another process
    holds collapse (SFT, 2 threads on a busy 2-core box: 700 tokens/s, 1 thread: 11,000), and RL
    leaves the other half to the sandbox's workers (generation 60x slower on 2 cores with 2 threads)."""
    cuda = torch.cuda.is_available()
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
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


def global_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t, op=None):
    """Sum (or op) a tensor over ranks, in place; a no-op on one process."""
    if dist.is_initialized():
        dist.all_reduce(t, op or dist.ReduceOp.SUM)
    return t


def shard_model(model, device):
    """FSDP2 over all ranks: every block of model.layers is one unit (gathered only while it
    runs), the root keeps embeddings, final norm and head. A no-op move on a single process."""
    if world_size() == 1:
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world_size(),))
    # On CUDA the gathered parameters are bf16 (forward, and generation's full_weights: half of fp32's
    # bytes on every rank); gradients reduce in fp32 and the optimizer keeps fp32 masters. CPU: fp32.
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # also moves the CPU-loaded parameters onto `device`
    return model


def autocast(device):
    """bf16 autocast on CUDA (a single GPU's fp32 parameters; sharded ones arrive bf16 from the
    MixedPrecisionPolicy, the optimizer keeps fp32 either way); plain fp32 on CPU."""
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
            rows.append([])
            free.append(pack_len)
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


HEAD_CHUNK = 1024  # logprobs_entropy's positions per head chunk: its fp32 logits and their gradient (the plan's too)


def logprobs_entropy(model, ids, temperature=1.0, with_entropy=True, chunk=HEAD_CHUNK, position_ids=None,
                     document_ids=None):
    """(B, L) ids -> float32 next-token log-probs (B, L-1) and entropies (B, L-1) under `temperature`
    (the rollouts'); position t scores ids[:, t + 1]. The same op order for the old and the new
    log-probs, so the first PPO ratio is exactly 1. The head runs `chunk` positions at a time and,
    under grad, is recomputed in backward: only the hidden states are kept, never (L, V) logits (at
    16k tokens and a 152k vocabulary, 10 GB in float32)."""
    def head(h, lm_head):
        h, parts = h[:, :-1], []  # (B, L-1, C): position t predicts ids[:, t + 1]
        for s in range(0, h.shape[1], chunk):
            part = (h[:, s:s + chunk], lm_head.weight, lm_head.bias, ids[:, s + 1:s + 1 + chunk], temperature,
                    with_entropy)
            parts.append(checkpoint(head_logprobs, *part, use_reentrant=False) if torch.is_grad_enabled()
                         else head_logprobs(*part))
        lps, ents = zip(*parts)
        return torch.cat(lps, 1), (torch.cat(ents, 1) if with_entropy else None)
    return model(ids, position_ids, document_ids, head=head)


def head_logprobs(h, weight, bias, targets, temperature, with_entropy):
    """h (B, c, C) -> log-probs of targets (B, c) and entropies (B, c) or None, in float32."""
    logp = torch.log_softmax(F.linear(h, weight, bias).float() / temperature, -1)  # (B, c, V)
    lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    return lp, (-(logp.exp() * logp).sum(-1) if with_entropy else None)


def token_logprobs(model, ids, position_ids=None, document_ids=None):
    """Packed rows' view: (B, T) log p(ids[:, t+1] | ids[:, :t+1]); the last column, and places whose
    next token starts another document or is padding, hold 0."""
    lp = logprobs_entropy(model, ids, with_entropy=False, position_ids=position_ids, document_ids=document_ids)[0]
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
    return all_reduce(total).item(), optimizer_step(model, optimizer, scheduler, clip)


@torch.no_grad()
def heldout_loss(model, rows, micro, device):
    """Token-mean loss over all held-out rows; every rank runs the same number of forwards (FSDP
    needs that): past the end, a rank wraps around to rows it then weighs 0."""
    rank, world = global_rank(), world_size()
    n = len(rows["input_ids"])
    sums = torch.zeros(2, device=device)  # NLL sum, target count
    for start in range(0, n, micro * world):
        idx = torch.arange(start + rank * micro, start + (rank + 1) * micro)
        mb = {k: v[idx % n].to(device) for k, v in rows.items()}
        mb["loss_mask"] = mb["loss_mask"] * (idx < n).to(device)[:, None]
        with autocast(device):
            sums[0] += sft_loss_sum(model, mb)
        sums[1] += mb["loss_mask"].sum()
    sums = all_reduce(sums)
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

# torch.distributed.checkpoint's views of a (possibly FSDP-sharded) model or optimizer: whole tensors,
# to load into every rank; or whole tensors gathered into CPU memory, on rank 0 only (what a save writes).
FULL_STATE = StateDictOptions(full_state_dict=True)
GATHERED_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(out_dir, step, model, optimizer, tokenizer, scheduler=None, extra=None, keep=2, args=None):
    """Writes out_dir/checkpoints/step_NNNNNNN/: model/ (HF format), train_state.pt (optimizer,
    scheduler, step, `extra`: any picklable dict such as the data position), rng_rank{r}.pt, and
    args.json (the run's flags, for --resume) when args is given.
    Collective under FSDP (call on every rank). Built in a temp dir, then renamed; only the last
    `keep` checkpoints stay. Returns the path."""
    model_sd = get_model_state_dict(model, options=GATHERED_STATE)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=GATHERED_STATE)
    root = os.path.join(out_dir, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step:07d}"), os.path.join(root, f".tmp_step_{step:07d}")
    if global_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_model(model, tokenizer, os.path.join(tmp, "model"), state_dict=model_sd)
        torch.save({"step": step, "optimizer": optim_sd, "extra": extra or {},
                    "scheduler": scheduler.state_dict() if scheduler else None},
                   os.path.join(tmp, "train_state.pt"))
        if args is not None:
            Path(tmp, ARGS_FILE).write_text(json.dumps(args, indent=1) + "\n")
    barrier()
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{global_rank()}.pt"))
    barrier()
    if global_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-keep]:
            shutil.rmtree(os.path.join(root, old))
    barrier()
    return final


def fresh_run(out_dir):
    """A fresh run: a previous run's checkpoints, metrics, samples and final model would mislead
    --resume, plots, a reader and the next stage (an unfinished run must not look finished)."""
    for stale in ("checkpoints", "tb"):
        shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
    for stale in ("metrics.jsonl", "samples.html"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, stale))
    remove_model(out_dir)


def save_final(out_dir, model, tokenizer, stage):
    """The finished model (HF format) into out_dir beside metrics.jsonl and checkpoints/; collective
    under FSDP."""
    state = get_model_state_dict(model, options=GATHERED_STATE)
    if global_rank() == 0:
        save_model(model, tokenizer, out_dir, state_dict=state)
        print(f"{stage}: saved the model in {out_dir} (beside metrics.jsonl and checkpoints/)", file=sys.stderr)
    barrier()


def latest_checkpoint(out_dir):
    root = os.path.join(out_dir, "checkpoints")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    return os.path.join(root, steps[-1]) if steps else None


def load_checkpoint(path, model, optimizer=None, scheduler=None):
    """Restores what save_checkpoint wrote (into a plain or an FSDP-sharded model) and this rank's
    RNG states; returns the train state dict ({"step", "extra", ...})."""
    plain, _ = load_model(os.path.join(path, "model"), device="cpu")
    set_model_state_dict(model, plain.state_dict(), options=FULL_STATE)
    state = read_pt(os.path.join(path, "train_state.pt"))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=FULL_STATE)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = os.path.join(path, f"rng_rank{global_rank()}.pt")
    _set_rng_state(read_pt(rng if os.path.exists(rng) else os.path.join(path, "rng_rank0.pt")))
    return state


def read_pt(path):
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001  a truncated or foreign file raises any of several types
        raise ModelError(f"{path}: unreadable checkpoint file ({type(e).__name__})") from None


class MetricsLog:
    """One JSON object per log() appended to out_dir/metrics.jsonl (rank 0 only), mirrored to
    TensorBoard under out_dir/tb when tensorboard is installed. A run resumed at step `start` first
    drops the lines of later steps (logged after that checkpoint by the interrupted run)."""

    def __init__(self, out_dir, enabled=True, start=0):
        self.path, self.tb = (os.path.join(out_dir, "metrics.jsonl") if enabled else None), None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            if os.path.exists(self.path):
                with open(self.path) as f:
                    kept = [line for line in f if json.loads(line)["step"] <= start]
                with open(self.path + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(self.path + ".tmp", self.path)
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


class DefaultsHelp(argparse.HelpFormatter):
    def _get_help_string(self, action):  # a flag's default, unless it has none or its help says it already
        shown = action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool)
        return action.help + " (default: %(default)s)" if shown and "default" not in action.help else action.help


class CliParser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(formatter_class=DefaultsHelp, **kwargs)

    def error(self, message):  # one line and exit 2, instead of usage + message
        raise UsageError(message)


# check_flags' rules: (test, what the message says a value must be)
POSITIVE = (lambda v: v > 0, "positive")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
KV_BUDGET_HELP = ("KV cache for generation per GPU, in GiB (default: room for every row on CPU, the free "
                  "memory less 10%% on CUDA); rows past it wait and are resumed, with the same tokens")
ARGS_FILE = "args.json"  # a checkpoint's run flags, which --resume takes back
NOT_RESUMED = ("out", "resume", "stop_after")  # where the run is, and how far this invocation goes


def kv_budget_bytes(gib):
    return None if gib is None else gib * GIB


def check_flags(a, rules, flags=None):
    """A one-line UsageError for the first flag value (NaN and infinity included) outside its range.
    rules: {dest: (test, what)}; flags: the flag of a dest named otherwise (dest n -> rollouts)."""
    for dest, (test, what) in rules.items():
        value = getattr(a, dest)
        if value is not None and not (math.isfinite(value) and test(value)):
            raise UsageError(f"--{(flags or {}).get(dest, dest).replace('_', '-')} must be {what}, got {value}")


def add_stage_flags(p):
    """The flags both stages share: --preset, --activation-checkpointing, --resume, --prompt-template, --plan."""
    p.add_argument("--preset", choices=("tiny", "real"), help="defaults for the other flags (default: tiny "
                   f"without --model or for a model under {TINY_PRESET_MAX_PARAMS:,} parameters, else real)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute each block in backward instead of keeping its activations (default: on "
                        "in the real preset)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out, "
                   "with the run's flags (a flag given again must not change the run)")
    p.add_argument("--prompt-template", metavar="FILE[:KEY]", help="user turn: this {query} template on the bare "
                   "problem (.txt, or .json like the official prompt_template.json), official interpreter format")
    p.add_argument("--plan", action="store_true", help="print the memory per GPU from --model's config.json "
                   "and exit: 0 when it fits, 2 when not")
    p.add_argument("--gpus", type=int, default=8, help="--plan: GPUs of the run (default 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="--plan: GB per GPU (default 80)")


def stage_args(p, argv):
    """argparse, except that with --resume a flag not on the command line takes the value the run was
    started with (its checkpoint's args.json): `--resume --out DIR` alone goes on."""
    defaults, unset = vars(p.parse_args([])), object()
    a = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(defaults, unset)))  # unset: not given
    ckpt = latest_checkpoint(defaults["out"] if a.out is unset else a.out) if a.resume is True else None
    saved = read_json(Path(ckpt, ARGS_FILE)) if ckpt and os.path.isfile(os.path.join(ckpt, ARGS_FILE)) else {}
    for k, v in vars(a).items():
        if v is unset:
            setattr(a, k, saved[k] if k in saved and k not in NOT_RESUMED else defaults[k])
    return a


def check_input_file(flag, path):
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: {'a directory, not a file' if os.path.isdir(path) else 'no such file'}")


def check_out_dir(path, where):
    """Creates output folder path and writes a probe file there, so that an unwritable one fails
    before any work. where: how the message names it (the flag and the path)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{where}: not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UsageError(f"{where}: cannot write ({e.strerror or e})") from None


def check_paths(a):
    a.template = load_template(a.prompt_template) if a.prompt_template else None
    if a.data is not None:
        check_input_file("--data", a.data)
    if a.plan:  # the plan reads config.json and writes nothing
        return
    check_out_dir(a.out, f"--out {a.out}")
    if a.resume and latest_checkpoint(a.out) is None:
        raise UsageError(f"--resume: no checkpoint under {os.path.join(a.out, 'checkpoints')}")


def sft_args(argv):
    p = CliParser(prog="retool.py --stage sft", description="Cold-start SFT on code-interleaved traces. "
                  "Without --model: the tiny preset on built-in traces, on CPU, in minutes.")
    for flag, kind, default, text in (
        ("model", str, None, "HF checkpoint dir to fine-tune (default: a fresh tiny model)"),
        ("data", str, None, "SFT rows, .jsonl/.json/.parquet (default: built-in traces)"),
        ("out", str, "out/sft", "final model, metrics.jsonl, checkpoints/"),
        ("n-traces", int, TINY_TRAIN["n_traces"], "built-in traces to generate"),
        ("code-share", float, TINY_TRAIN["code_share"], "share of built-in traces that use code"),
        ("steps", int, None, f"optimizer steps (default: --epochs; tiny preset {TINY_TRAIN['steps']})"),
        ("epochs", float, None, f"passes over the data (default {REAL_TRAIN['epochs']})"),
        ("batch", int, None, f"packed rows per step, all ranks (default {REAL_TRAIN['batch']}; tiny {TINY_TRAIN['batch']})"),
        ("micro-batch", int, None, "rows per forward on each rank (default: --batch / ranks)"),
        ("pack-len", int, None, f"tokens per packed row (default {REAL_TRAIN['pack_len']}; tiny {TINY_TRAIN['pack_len']})"),
        ("lr", float, None, f"peak lr (default {REAL_TRAIN['lr']}; tiny preset {TINY_TRAIN['lr']})"),
        ("min-lr-ratio", float, 0.1, "final lr / peak lr (cosine)"),
        ("warmup", float, 0.1, "share of the steps spent warming up"),
        ("weight-decay", float, 0.1, "AdamW weight decay on matrices"),
        ("clip", float, 1.0, "gradient-norm clip"),
        ("heldout", int, 64, "documents held out for the eval loss (at most a tenth)"),
        ("eval-every", int, 100, "steps between held-out losses"),
        ("save-every", int, 500, "steps between checkpoints"),
        ("stop-after", int, None, "stop after this many steps of this run, checkpointed (--resume goes on)"),
        ("seed", int, 0, "seed of the data, the initial weights and the batches")):
        p.add_argument("--" + flag, type=kind, default=default, help=text)
    add_stage_flags(p)
    a = stage_args(p, argv)
    if a.model is not None:
        check_model_dir(a.model, "--model", config_only=a.plan)
    a.preset = a.preset or default_preset(a.model)
    for k, v in (TINY_TRAIN if a.preset == "tiny" else REAL_TRAIN).items():
        if getattr(a, k, 0) is None and not (k == "steps" and a.epochs):
            setattr(a, k, v)
    check_flags(a, {**dict.fromkeys(("n_traces", "steps", "epochs", "batch", "micro_batch", "pack_len", "lr",
                                      "clip", "eval_every", "save_every", "stop_after"), POSITIVE),
                    "code_share": FRACTION, "warmup": (lambda v: 0 <= v < 1, "in [0, 1)"),
                    "min_lr_ratio": FRACTION, "weight_decay": NON_NEGATIVE, "heldout": NON_NEGATIVE})
    check_paths(a)
    return a


# --- memory plan -------------------------------------------------------------------------------
# What each GPU holds, from config.json alone (meta device), before hours of loading: FSDP2 shards
# fp32 master weights, gradients and AdamW's two moments over the GPUs; one micro-batch's
# activations; in RL, the bf16 weights every rank gathers whole for generation, and the KV pool
# that is left. Estimates: the margin covers the CUDA context, NCCL buffers and fragmentation.

GIB = 2 ** 30
PLAN_PROMPT_TOKENS = 1024  # a rollout's prompt allowance (DAPO-Math prompts are a few hundred tokens)


@dataclass
class MemoryPlan:  # bytes per GPU
    master: float
    grads: float
    optimizer: float
    activations: float
    usable: float
    gathered: float = 0.0  # RL: the policy's bf16 weights during generation
    kv_token: float = 0.0  # bf16 keys and values of one position, all layers

    @property
    def training(self):
        return self.master + self.grads + self.optimizer + self.activations

    @property
    def kv_pool(self):  # during generation gradients are freed; masters and AdamW moments stay
        return self.usable - self.master - self.optimizer - self.gathered

    def rollouts(self, length):  # the engine's arithmetic on CUDA: whole blocks of FLASH_KV_BLOCK positions
        blocks = self.kv_pool // (self.kv_token * FLASH_KV_BLOCK)
        return max(0, int(blocks // -(-length // FLASH_KV_BLOCK)))


def memory_plan(config: ModelConfig, *, gpus, gpu_gb, tokens, checkpointing, critic=False, generation=False):
    """The plan of one training micro-batch of `tokens` positions and, with generation, the rollouts'."""
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(config).parameters())
    C, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    head = 0 if config.tie_word_embeddings else V * C  # the critic's lm_head gets no gradient, its value head does
    trained = n + (n - head + C + 1 if critic else 0)
    held = n + (n + C + 1 if critic else 0)  # the critic copies the whole policy, lm_head included
    block = 8 * C + 4 * I  # bf16 values one block saves per position for backward (q k v o, MLP, norms)
    layers_kept = 1 if checkpointing else L  # checkpointing keeps the fp32 block inputs, recomputes one block
    act = tokens * (L * C * 4 + layers_kept * block * 2) + 2 * HEAD_CHUNK * V * 4
    plan = MemoryPlan(4 * held / gpus, 4 * trained / gpus, 8 * trained / gpus, act, gpu_gb * 1e9 * (1 - MEMORY_MARGIN))
    if generation:
        plan.gathered, plan.kv_token = 2 * n, kv_bytes(config, 1)
    return plan


def plan_main(a, stage):
    """--plan: print the memory plan per GPU -> 0 when it fits, 2 with the shortfall and its levers."""
    if a.model is None:
        raise UsageError("--plan needs --model (a checkpoint dir or a dir with its config.json)")
    check_flags(a, {"gpus": POSITIVE, "gpu_memory": POSITIVE})
    path = Path(a.model) / "config.json"
    config = ModelConfig.from_hf(read_json(path), str(path))
    micro = a.micro_batch or max(1, a.batch // a.gpus) if stage == "sft" else a.micro_batch
    length = a.pack_len if stage == "sft" else PLAN_PROMPT_TOKENS + a.max_new_tokens
    plan = memory_plan(config, gpus=a.gpus, gpu_gb=a.gpu_memory, tokens=micro * length,
                       checkpointing=a.activation_checkpointing, critic=stage == "rl" and a.algo == "ppo",
                       generation=stage == "rl")
    rows = [("master weights (fp32, sharded)", plan.master), ("gradients (fp32, sharded)", plan.grads),
            ("optimizer state (AdamW, sharded)", plan.optimizer),
            (f"activations ({micro} x {length} tokens{', checkpointed' if a.activation_checkpointing else ''})",
             plan.activations), ("training total", plan.training),
            (f"usable ({a.gpu_memory:g} GB less {MEMORY_MARGIN:.0%})", plan.usable)]
    if stage == "rl":
        rows += [("gathered bf16 weights (generation)", plan.gathered), ("KV pool left", plan.kv_pool)]
    print(f"memory per GPU, {a.gpus} GPUs, --stage {stage}:")
    for name, value in rows:
        print(f"  {name:<46} {value / GIB:8.1f} GiB")
    if stage == "rl":
        for n in (length, length // 2):
            print(f"  rollouts of {n} tokens decoding at once: {plan.rollouts(n)}")
    levers = "more --gpus, a larger --gpu-memory" + (", --micro-batch 1" if micro > 1 else "") + (
        "" if a.activation_checkpointing else ", --activation-checkpointing")
    if plan.training > plan.usable:
        print(f"does not fit: training needs {plan.training / GIB:.1f} GiB per GPU of {plan.usable / GIB:.1f} "
              f"usable; levers: {levers}" + (", --algo grpo (no critic)" if stage == "rl" else ""))
        return 2
    if stage == "rl" and plan.rollouts(length) < 1:
        print(f"does not fit: the KV pool ({plan.kv_pool / GIB:.1f} GiB) holds no rollout of {length} tokens; "
              f"levers: more --gpus, a larger --gpu-memory, --max-new-tokens, --algo grpo (no critic)")
        return 2
    print("fits")
    return 0


def interrupted(stage, out):
    """What Ctrl-C leaves: the steps done (metrics.jsonl's last line) against the latest checkpoint."""
    metrics, ckpt = Path(out, "metrics.jsonl"), latest_checkpoint(out)
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    done = json.loads(lines[-1])["step"] if lines else 0
    if ckpt is None:
        return f"{stage}: interrupted after step {done}, before the first checkpoint: there is nothing to resume"
    at = int(ckpt.rsplit("_", 1)[1])
    return f"{stage}: interrupted after step {done}; --resume continues from step {at} ({done - at} steps lost)"


def run_stage(stage, run, parse, argv):
    """A stage's exit code: 2 with one line on a user mistake, 130 on Ctrl-C. The caller (a test) gets
    its torch thread count back (a stage lowers it on CPU) and no process group is left behind."""
    threads = torch.get_num_threads()
    try:
        a = parse(argv)
        if a.plan:
            return plan_main(a, stage)
        try:
            return run(a)
        except KeyboardInterrupt:  # the progress bar is closed by now: the message gets its own line
            if global_rank() == 0:
                print(interrupted(stage, a.out), file=sys.stderr)
            return 130
    except (UsageError, DataError, ModelError, KVBudgetError) as e:
        print(f"retool.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


def sft_main(argv):
    """`retool.py --stage sft ...` -> exit code."""
    return run_stage("sft", _sft_run, sft_args, argv)


def sft_documents(a, tok):
    """The run's documents, tokenized and shuffled -> (packed train rows, packed held-out rows or None,
    a line describing them)."""
    traces = load_sft(a.data) if a.data else builtin_sft_traces(a.n_traces, seed=a.seed, code_share=a.code_share)
    docs = [tokenize_trace(tok, m, template=a.template) for m in traces]
    random.Random(a.seed).shuffle(docs)
    held, train = docs[:min(a.heldout, len(docs) // 10)], docs[min(a.heldout, len(docs) // 10):]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = pack_documents(train, a.pack_len, pad)
    cut = sum(len(d[0]) > a.pack_len for d in docs)
    about = f"{len(train)} documents in {len(rows['input_ids'])} rows of {a.pack_len} tokens ({cut} cut), " \
            f"{len(held)} held out"
    return rows, pack_documents(held, a.pack_len, pad) if held else None, about


def resume_sft(a, model, opt, sched, n_rows, steps) -> int:
    """Restores the latest checkpoint in --out -> its step; refuses one of another data set or length."""
    ckpt = latest_checkpoint(a.out)
    state = load_checkpoint(ckpt, model, opt, sched)
    if state["extra"].get("n_rows") != n_rows:
        raise UsageError(f"--resume: {ckpt} was trained on other data ({state['extra'].get('n_rows')} rows)")
    if state["extra"].get("steps", steps) != steps:  # the lr schedule spans the run's steps
        raise UsageError(f"--resume: {ckpt} is from a run of {state['extra']['steps']} steps, not {steps}")
    return state["step"]


def _sft_run(a):
    rank, world, device = setup_distributed()
    micro = a.micro_batch or max(1, a.batch // world)
    if a.batch % (micro * world):
        raise UsageError(f"--batch {a.batch} is not a multiple of --micro-batch {micro} x {world} ranks")
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    random.seed(a.seed)
    if a.model:  # on CPU in fp32: the optimizer keeps fp32 weights, CUDA runs under bf16 autocast
        model, tok = load_model(a.model, device="cpu", dtype=torch.float32)
    else:
        tok = builtin_tokenizer()
        model = build_model({**TINY_CONFIG, "vocab_size": len(tok)}, a.seed)
    model.activation_checkpointing = a.activation_checkpointing
    rows, held_rows, about = sft_documents(a, tok)
    n_rows = len(rows["input_ids"])
    steps = a.steps or math.ceil(a.epochs * n_rows / a.batch)
    if rank == 0:
        print(f"sft: {about}, {steps} steps of {a.batch} rows, {world} rank(s) on {device}", file=sys.stderr)

    model = shard_model(model, device)
    model.train()
    opt = make_optimizer(model, a.lr, a.weight_decay)
    sched = make_scheduler(opt, warmup=round(a.warmup * steps), total=steps, min_ratio=a.min_lr_ratio)
    start = resume_sft(a, model, opt, sched, n_rows, steps) if a.resume else 0
    if rank == 0 and not a.resume:
        fresh_run(a.out)
    log = MetricsLog(a.out, enabled=rank == 0, start=start)
    stop = min(steps, start + a.stop_after) if a.stop_after else steps
    share = a.batch // world
    with tqdm(total=steps, initial=start, desc="sft", disable=rank != 0, dynamic_ncols=True) as bar:
        for step in range(start, stop):
            t0 = time.perf_counter()
            idx = batch_indices(n_rows, a.batch, step, a.seed)
            mine = idx[rank * share:(rank + 1) * share]
            micro_batches = [{k: v[mine[i:i + micro]] for k, v in rows.items()} for i in range(0, share, micro)]
            n_targets = max(1, int(rows["loss_mask"][idx].sum()))
            lr = opt.param_groups[0]["lr"]
            loss, gnorm = sft_step(model, opt, sched, micro_batches, n_targets, device, a.clip)
            if not math.isfinite(loss):  # the same global value on every rank: all stop together
                raise UsageError(f"step {step + 1}: the loss is {loss}, training diverged (lower --lr?)")
            tps = int((rows["document_ids"][idx] >= 0).sum()) / (time.perf_counter() - t0)
            metrics = {"loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": round(tps)}
            if held_rows is not None and ((step + 1) % a.eval_every == 0 or step + 1 == steps):
                metrics["heldout_loss"] = heldout_loss(model, held_rows, micro, device)
            log.log(step + 1, **metrics)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}", lr=f"{lr:.2e}")
            bar.update()
            if (step + 1) % a.save_every == 0 or (step + 1 == stop < steps):
                save_checkpoint(a.out, step + 1, model, opt, tok, sched, args=vars(a),
                                extra={"rows_seen": (step + 1) * a.batch, "n_rows": n_rows, "steps": steps})
    log.close()
    if stop == steps:
        save_final(a.out, model, tok, "sft")
    return 0


# -----------------------------------------------------------------------------------------------
# RL stage (ReTool stage 2): PPO (or GRPO) whose rollouts run code as they go.
# One step: sample prompts; n rollouts each through `generate` with the sandbox as the tool; +1/-1
# reward from the grader; old log-probs (and values) from a training forward of the same modules;
# advantages; PPO epochs over mini-batches. Interpreter tokens (loss mask 0) are context only:
# they never enter the policy loss, value loss, KL or entropy.


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
    The std is the group's population std (correction 0; verl divides by the unbiased one, x1.15 at
    n=4). std=False is Dr. GRPO (no division). A group whose rewards are all equal gets exactly 0."""
    r = rewards.view(-1, n)
    a = r - r.mean(1, keepdim=True)
    if std:
        a = a / (r.std(1, keepdim=True, correction=0) + eps)
    flat = (r.max(1, keepdim=True).values == r.min(1, keepdim=True).values)
    return torch.where(flat, torch.zeros_like(a), a).view(-1)


def whiten(adv, mask, device, eps=1e-8):
    """PPO advantages (B, T) shifted and scaled by the masked mean and unbiased variance over all
    ranks' sampled tokens (verl's masked_whiten; the paper's lr was tuned with it); 0 where mask is 0."""
    m = mask > 0
    a = adv[m].double()
    n, s1, s2 = reduce_floats([a.numel(), a.sum().item(), (a * a).sum().item()], device)
    mean = s1 / max(n, 1.0)
    var = (s2 - n * mean * mean) / max(n - 1.0, 1.0)
    return torch.where(m, (adv - mean) / math.sqrt(var + eps), torch.zeros_like(adv))


# ----------------------------------------------------------------------------- losses

LOG_RATIO_CLAMP = 20.0  # verl's bound: logp - old = 100 would give exp() = inf and 0 * inf = NaN gradients


def policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=10.0):
    """Clipped surrogate with separate low/high bounds and a dual clip for negative advantages.
    -> per-token loss (B, T), exactly 0 (and 0 gradient) where mask is 0, and the clipped mask."""
    m = mask > 0
    logp = torch.where(m, logp, old_logp)  # mask-0 logits get no gradient, not even 0 * inf
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(l1, l2)
    # dual clip: a negative advantage times a runaway ratio would otherwise be unbounded
    loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    clipped = m & (loss != l1)  # the clip or the dual clip decided
    return torch.where(m, loss, torch.zeros_like(loss)), clipped


def tis_weights(old_logp, engine_logp, mask, cap):
    """Truncated importance sampling against the rollout/trainer mismatch: the engine sampled each
    token with its own log-prob, the loss assumes the trainer's, so weight it by
    min(exp(old - engine), cap) (verl, slime, OpenRLHF). (B, T); 0 where mask is 0; cap 0: all 1."""
    w = torch.exp(old_logp - engine_logp).clamp(max=cap) if cap > 0 else torch.ones_like(old_logp)
    return torch.where(mask > 0, w, torch.zeros_like(w))


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


def cached(tool, counts):
    """The tool for one generate call, running each distinct code once: a call whose exact code has
    already run (or is running) gets that result. Right for stateless snippets only: a script that
    draws random numbers gets its first run's draw in every rollout. counts["calls"/"hits"] += ..."""
    lock, results = threading.Lock(), {}

    def run(codes):
        mine = {}
        with lock:
            for c in codes:
                if c not in results:
                    results[c] = mine[c] = Future()
            counts["calls"] += len(codes)
            counts["hits"] += len(codes) - len(mine)
        if mine:
            try:
                out = call_tool(tool, list(mine))
            except Exception as e:  # the waiters see it too; run_tool makes it their feedback
                for f in mine.values():
                    f.set_exception(e)
                raise
            for f, r in zip(mine.values(), out):
                f.set_result(r)
        return [results[c].result() for c in codes]
    return run


def model_text(traj, tokenizer) -> str:
    """The model's own text (loss mask 1): the RL reward grades it, so a \\boxed{} that only the
    interpreter printed earns nothing (eval grades the whole response, as the official harness)."""
    return decode(tokenizer, [t for t, m in zip(traj.response_ids, traj.loss_mask) if m])


def sample_view(tokenizer, traj, title, right) -> Sample:
    """A trajectory for samples.html and the terminal: its response decoded run by run of one
    loss-mask value (sampled / injected), then split into the model's text, code and interpreter output."""
    runs, start, mask = [], 0, traj.loss_mask
    for k in range(1, len(mask) + 1):
        if k == len(mask) or mask[k] != mask[start]:
            runs.append((bool(mask[start]), decode(tokenizer, traj.response_ids[start:k])))
            start = k
    return Sample(title, right, decode(tokenizer, traj.prompt_ids), response_spans(runs))


def first_code_token(tokenizer, response_ids):
    """Token index of the first `<code>` in a response (binary search over decoded prefixes)."""
    return bisect.bisect_left(range(len(response_ids)), True,
                              key=lambda k: "<code>" in decode(tokenizer, response_ids[:k + 1]))


@dataclass
class Rollout:
    """One trajectory as PPO trains on it: tensors over the T = len(ids) - 1 target positions t
    (position t scores ids[t + 1]) and the statistics the paper analyses. to_record fills the
    fields down to `trajectory`, score the next five, add_advantages the last two."""
    ids: torch.Tensor  # (T + 1,) prompt then response ids
    mask: torch.Tensor  # (T,) 1 where ids[t + 1] was sampled, 0 on the prompt and interpreter output
    engine_logp: torch.Tensor  # (T,) the engine's log-prob of each sampled token, 0 elsewhere
    reward: float  # +1 right, -1 wrong: the model's own text graded
    length: int = 0  # response tokens, interpreter output included
    tool_calls: int = 0
    code_lines: int = 0  # non-blank code lines over all calls
    calls_ok: int = 0  # calls whose code ran without an error
    first_call: float = 0.0  # where the first <code> starts, as a fraction of the response (0: none)
    trajectory: Trajectory | None = None  # the engine's, for samples.html and the terminal sample
    old_logp: torch.Tensor | None = None  # (T,) the trainer's log-probs before this step's updates
    entropy: torch.Tensor | None = None  # (T,)
    ref_logp: torch.Tensor | None = None  # (T,) the frozen start model's (old_logp without a reference)
    values: torch.Tensor | None = None  # (T,) the critic's before the updates (0 without a critic)
    tis: torch.Tensor | None = None  # (T,) truncated importance-sampling weights, 0 where mask is 0
    advantages: torch.Tensor | None = None  # (T,)
    returns: torch.Tensor | None = None  # (T,) the critic's targets


def to_record(traj, gold, tokenizer) -> Rollout:
    """One trajectory -> its Rollout, the training forwards' fields still empty."""
    p, r = len(traj.prompt_ids), len(traj.response_ids)
    ids = torch.tensor(traj.prompt_ids + traj.response_ids)
    mask, engine_logp = torch.zeros(p + r - 1), torch.zeros(p + r - 1)
    mask[p - 1:] = torch.tensor(traj.loss_mask, dtype=torch.float)
    engine_logp[p - 1:] = torch.tensor(traj.logprobs, dtype=torch.float)
    calls = traj.tool_calls
    return Rollout(
        ids=ids, mask=mask, engine_logp=engine_logp, reward=reward(model_text(traj, tokenizer), gold),
        length=r, tool_calls=len(calls), calls_ok=sum(c.status == "ok" for c in calls),
        code_lines=sum(sum(1 for l in c.code.splitlines() if l.strip()) for c in calls),
        first_call=first_code_token(tokenizer, traj.response_ids) / r if calls else 0.0, trajectory=traj)


def collate(records, names):
    """Right-pad the named (T,) fields of Rollouts into (B, L) batches (0 padding: mask 0 there)."""
    return {k: pad_sequence([getattr(rec, k) for rec in records], batch_first=True) for k in names}


def rollout(policy, tokenizer, jobs, args, tool, step, counts=None):
    """n rollouts for each (global prompt index j, Problem) job, in one generate call. Every row is
    seeded from (seed, step, j, rollout) only, so sharding prompts over ranks changes no rollout.
    Identical codes run once (cached) unless --no-tool-cache; counts gets the calls and cache hits."""
    counts = {"calls": 0, "hits": 0} if counts is None else counts
    tool = tool if tool is None or args.no_tool_cache else cached(tool, counts)
    prompts = [render_prompt(tokenizer, p.problem, not args.no_tools, args.template) for _, p in jobs]
    seeds = [((args.seed * 1_000_003 + step) * 100_003 + j) * 1_009 + i for j, _ in jobs for i in range(args.n)]
    trajs = generate(policy, tokenizer, [x for x in prompts for _ in range(args.n)],
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, tool=None if args.no_tools else tool,
                     max_tool_calls=args.max_tool_calls, seed=[s % 2**63 for s in seeds],
                     official=args.template is not None, kv_budget=kv_budget_bytes(args.kv_budget))
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
            n = len(rec.mask)
            rec.old_logp, rec.entropy = old[k, :n].cpu(), ent[k, :n].cpu()
            rec.ref_logp = refl[k, :n].cpu() if ref else rec.old_logp
            rec.values = val[k, :n].cpu() if critic else torch.zeros(n)
            rec.tis = tis_weights(rec.old_logp, rec.engine_logp, rec.mask, args.tis_cap)


def add_advantages(records, args, device=torch.device("cpu")):
    """PPO: token-level GAE on the critic's values with the reward on the last sampled token,
    whitened over the step's tokens on all ranks unless --no-whiten.
    GRPO: the group-normalised reward on every sampled token (a group = n consecutive records)."""
    b = collate(records, ["mask", "values"])
    mask, rewards = b["mask"], torch.zeros_like(b["mask"])
    r = torch.tensor([rec.reward for rec in records], dtype=torch.float)
    if args.algo == "ppo":
        last = (mask * torch.arange(mask.shape[1])).argmax(1)  # each row's last sampled position
        rewards[torch.arange(len(records)), last] = r
        adv, ret = gae(rewards, b["values"], mask)
        adv = adv if args.no_whiten else whiten(adv, mask, device)
    else:
        adv, ret = group_advantages(r, args.n, std=not args.no_std)[:, None] * mask, b["values"]
    for k, rec in enumerate(records):
        n = len(rec.mask)
        rec.advantages, rec.returns = adv[k, :n], ret[k, :n]


def minibatch_backward(records, policy, critic, args, device, n_tokens, train_policy=True):
    """Backward of one mini-batch, micro-batch by micro-batch. Every sum is divided by n_tokens,
    the sampled-token count of the WHOLE mini-batch over all ranks, so the loss is a token-mean
    over the global batch however it is micro-batched or sharded. -> summed statistics."""
    scale = world_size() / n_tokens  # FSDP averages gradients over ranks: undo that
    names = ["ids", "mask", "old_logp", "ref_logp", "values", "advantages", "returns", "tis"]
    acc = dict(loss=0.0, clipped=0.0, approx_kl=0.0, ref_kl=0.0, value_loss=0.0)
    for i in range(0, len(records), args.micro_batch):
        b = {k: v.to(device) for k, v in collate(records[i:i + args.micro_batch], names).items()}
        m = b["mask"]
        for model in (policy, critic):  # FSDP: reduce-scatter once per mini-batch, at its end
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(i + args.micro_batch >= len(records))
        with autocast(device):
            if train_policy:
                logp = logprobs_entropy(policy, b["ids"], args.temperature, False)[0]
                pl, clipped = policy_loss(logp, b["old_logp"], b["advantages"], m, args.clip_low,
                                          args.clip_high, args.dual_clip)
                kl = k3_kl(logp, b["ref_logp"], m).sum()
                loss = (pl * b["tis"]).sum() + args.kl_coef * kl
                (loss * scale).backward()
                acc["loss"] += loss.item() / n_tokens
                acc["clipped"] += clipped.sum().item() / n_tokens
                acc["ref_kl"] += kl.item() / n_tokens
                acc["approx_kl"] += k3_kl(logp.detach(), b["old_logp"], m).sum().item() / n_tokens
            if critic is not None:
                vl = value_loss(critic(b["ids"])[:, :-1], b["values"], b["returns"], m, args.value_clip).sum()
                (vl * scale).backward()
                acc["value_loss"] += vl.item() / n_tokens
    return acc


RL_SAMPLES_SHOWN = 32  # rollouts of rank 0 on samples.html: the first prompts' whole groups


def show_samples(out_dir, records, tokenizer, step):
    """samples.html in out_dir (written aside and renamed: never half a page) and one sample on the terminal."""
    views = [sample_view(tokenizer, r.trajectory, f"step {step}, rollout {i + 1}: reward {r.reward:+g}, "
                         f"finish {r.trajectory.finish_reason}, {r.tool_calls} tool call(s)", r.reward > 0)
             for i, r in enumerate(records[:RL_SAMPLES_SHOWN])]
    path = os.path.join(out_dir, "samples.html")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(samples_html(views, f"{out_dir}: rollouts of step {step}"))
    os.replace(path + ".tmp", path)
    tqdm.write(sample_text(views[0]), file=sys.stderr)


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
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=device), op).tolist()


def rl_step(step, records, policy, critic, ref, opt, copt, args, device):
    """Score, advantages, PPO epochs over mini-batches -> training statistics (global)."""
    score(records, policy, critic, ref, args, device)
    add_advantages(records, args, device)
    train_policy = args.algo == "grpo" or step >= args.critic_warmup  # critic warm-up: critic only
    per = len(records) // args.mini_batches
    summed = ("loss", "clipped", "approx_kl", "ref_kl", "value_loss")  # minibatch_backward's
    acc = dict.fromkeys(summed + ("grad_norm", "critic_grad_norm"), 0.0)
    for _ in range(args.ppo_epochs):
        for k in range(args.mini_batches):
            mb = records[k * per:(k + 1) * per]
            n_tokens = max(1.0, reduce_floats([sum(r.mask.sum().item() for r in mb)], device)[0])
            for key, v in minibatch_backward(mb, policy, critic, args, device, n_tokens, train_policy).items():
                acc[key] += v
            if train_policy:
                acc["grad_norm"] += optimizer_step(policy, opt, None, args.grad_clip)
            if critic is not None:
                acc["critic_grad_norm"] += optimizer_step(critic, copt, None, args.grad_clip)
    updates = args.ppo_epochs * args.mini_batches
    # the per-mini-batch sums are already global token-means of this rank's part: sum over ranks
    # (the gradient norms are global already)
    out = {**acc, **dict(zip(summed, reduce_floats([acc[k] for k in summed], device)))}
    out["clip_frac"] = out.pop("clipped")
    drop = {"ref_kl"} if ref is None else set()
    drop |= {"value_loss", "critic_grad_norm"} if critic is None else set()
    drop |= set() if train_policy else {"loss", "clip_frac", "approx_kl", "ref_kl", "grad_norm"}
    return {k: v / updates for k, v in out.items() if k not in drop}


def rollout_sums(records, counts, tis_cap) -> dict:
    """This rank's sums behind rollout_metrics, by name: over rollouts, over sampled tokens, over calls."""
    def over_tokens(f):  # f(rollout) is (T,) or a number
        return sum((f(r) * r.mask).sum().item() for r in records)
    return dict(
        rollouts=len(records), right=sum(r.reward > 0 for r in records), reward=sum(r.reward for r in records),
        length=sum(r.length for r in records), with_code=sum(r.tool_calls > 0 for r in records),
        calls=sum(r.tool_calls for r in records), code_lines=sum(r.code_lines for r in records),
        calls_ok=sum(r.calls_ok for r in records), first_call=sum(r.first_call for r in records),
        tokens=over_tokens(lambda r: 1), entropy=over_tokens(lambda r: r.entropy),
        returns=over_tokens(lambda r: r.returns), returns_sq=over_tokens(lambda r: r.returns ** 2),
        error=over_tokens(lambda r: r.returns - r.values), error_sq=over_tokens(lambda r: (r.returns - r.values) ** 2),
        tis=sum(r.tis.sum().item() for r in records),
        tis_capped=over_tokens(lambda r: r.tis >= tis_cap) if tis_cap > 0 else 0.0,
        calls_run=counts["calls"], cache_hits=counts["hits"])


def rollout_metrics(records, device, counts=None, tis_cap=0.0):
    """The paper's analysis figures over this step's rollouts, all ranks together, with the TIS
    weights' mean, max and capped fraction and the tool cache's hit rate."""
    s = rollout_sums(records, counts or {"calls": 0, "hits": 0}, tis_cap)
    s = dict(zip(s, reduce_floats(list(s.values()), device)))
    diff = max([((r.old_logp - r.engine_logp).abs() * r.mask).max().item() for r in records] or [0.0])
    w_max = max([r.tis.max().item() for r in records] or [0.0])
    diff, w_max = reduce_floats([diff, w_max], device, dist.ReduceOp.MAX)
    n, toks, calls, code = s["rollouts"], s["tokens"], s["calls"], s["with_code"]
    var_ret = s["returns_sq"] / toks - (s["returns"] / toks) ** 2
    var_err = s["error_sq"] / toks - (s["error"] / toks) ** 2
    return dict(reward=s["reward"] / n, accuracy=s["right"] / n, response_len=s["length"] / n, code_ratio=code / n,
                tool_calls=calls / n, code_lines=s["code_lines"] / n, code_pass=s["calls_ok"] / calls if calls else 0.0,
                first_call=s["first_call"] / code if code else 0.0, entropy=s["entropy"] / toks,
                explained_var=1 - var_err / var_ret if var_ret > 1e-6 else 0.0,  # 0: constant returns
                logprob_diff=diff, tis_mean=s["tis"] / toks, tis_max=w_max, tis_capped=s["tis_capped"] / toks,
                tool_cache_hits=s["cache_hits"] / s["calls_run"] if s["calls_run"] else 0.0)


# ----------------------------------------------------------------------------- CLI

def rl_args(argv):
    p = CliParser(prog="retool.py --stage rl", description="RL with interleaved code execution, from the "
                  "built-in SFT model (out/sft) or --model. --data: DAPO-Math-17k-shaped prompts.")
    p.add_argument("--model", help="starting checkpoint, HF dir (default out/sft, the built-in SFT model)")
    p.add_argument("--data", help="RL prompts, .jsonl/.json/.parquet, DAPO-Math-17k or problem/answer rows")
    p.add_argument("--out", default="out/rl", help="final model, metrics.jsonl, checkpoints/, samples.html")
    p.add_argument("--algo", choices=("ppo", "grpo"), default="ppo", help="PPO with a critic, or GRPO")
    p.add_argument("--no-std", action="store_true", help="GRPO without the division by the group's "
                   "population std (Dr. GRPO)")
    p.add_argument("--no-whiten", action="store_true", help="PPO without whitening the advantages")
    p.add_argument("--no-tool-cache", action="store_true", help="run every call, even a code already run "
                   "this step (a snippet that draws random numbers then draws afresh in each rollout)")
    p.add_argument("--tis-cap", type=float, help="truncated importance sampling: weight each sampled token "
                   "by min(exp(trainer - engine log-prob), cap); 0: off (default: 2.0 on CUDA, 0 on CPU)")
    p.add_argument("--no-tools", action="store_true", help="text-only baseline: text prompt, no interpreter")
    p.add_argument("--kv-budget", type=float, metavar="GIB", help=KV_BUDGET_HELP)
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
            ("train-problems", 4000, "built-in RL prompts"), ("save-every", 10, "steps between checkpoints"),
            ("sample-every", 10, "steps between rollouts written to --out/samples.html, one of them also "
             "printed (0: never)")):
        p.add_argument(f"--{flag}", type=type(default), default=default, help=text)
    add_stage_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts' order and the rollouts")
    a = stage_args(p, argv)
    a.model = a.model or os.path.join("out", "sft")
    if a.model == os.path.join("out", "sft") and not os.path.isfile(os.path.join(a.model, "config.json")):
        raise UsageError(f"{a.model}: no SFT checkpoint; run `python retool.py --stage sft` first")
    check_model_dir(a.model, "--model", config_only=a.plan)
    a.preset = a.preset or default_preset(a.model)
    if a.tis_cap is None:  # CPU: the engine and the trainer run the same fp32 kernels
        a.tis_cap = 2.0 if torch.cuda.is_available() else 0.0
    for k, v in RL_PRESETS[a.preset].items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    check_flags(a, {**dict.fromkeys(("steps", "prompts", "n", "max_new_tokens", "mini_batches", "micro_batch",
                                      "ppo_epochs", "lr", "critic_lr", "temperature", "grad_clip", "value_clip",
                                      "save_every", "train_problems"), POSITIVE),
                    **dict.fromkeys(("critic_warmup", "max_tool_calls", "kl_coef", "clip_high", "tis_cap",
                                     "sample_every"), NON_NEGATIVE), "kv_budget": POSITIVE,
                    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "clip_low": (lambda v: 0 <= v < 1, "in [0, 1)"),
                    "dual_clip": (lambda v: v > 1, "above 1")}, flags={"n": "rollouts"})
    check_paths(a)
    return a


def rl_main(argv):
    """`retool.py --stage rl ...` -> exit code."""
    return run_stage("rl", _rl_run, rl_args, argv)


def resume_rl(a, policy, opt, critic, copt, run) -> int:
    """Restores the latest checkpoint in --out (the critic travels in the policy checkpoint's train
    state) -> its step; refuses one of another run (`run`: what must not change)."""
    ckpt = latest_checkpoint(a.out)
    state = load_checkpoint(ckpt, policy, opt)
    was = state["extra"].get("run", run)
    change = next((k for k in run if was.get(k) != run[k]), None)
    if change:
        raise UsageError(f"--resume: {ckpt} is from a run with {change} {was.get(change)}, not {run[change]}")
    if critic is not None:
        if "critic" not in state["extra"]:
            raise UsageError(f"--resume: {ckpt} holds no critic (a GRPO run?); resume with --algo grpo")
        set_model_state_dict(critic, state["extra"]["critic"], options=FULL_STATE)
        set_optimizer_state_dict(critic, copt, state["extra"]["critic_opt"], options=FULL_STATE)
    return state["step"]


def save_rl_checkpoint(a, step, policy, opt, critic, copt, tok, run):
    extra = {"run": run}
    if critic is not None:
        extra.update(critic=get_model_state_dict(critic, options=GATHERED_STATE),
                     critic_opt=get_optimizer_state_dict(critic, copt, options=GATHERED_STATE))
    save_checkpoint(a.out, step, policy, opt, tok, extra=extra, args=vars(a))


def announce_rl(a, n_problems, world, device):
    print(f"rl: {a.algo}{' text-only' if a.no_tools else ''} from {a.model}, {n_problems} prompts, "
          f"{a.steps} steps of {a.prompts} x {a.n} rollouts, {world} rank(s) on {device}", file=sys.stderr)
    if a.algo == "ppo" and a.steps <= a.critic_warmup:
        print(f"rl: note: --steps {a.steps} <= --critic-warmup {a.critic_warmup}: only the critic trains, "
              "the policy will not change", file=sys.stderr)


def _rl_run(a):
    rank, world, device = setup_distributed()
    if a.prompts % (a.mini_batches * world):
        raise UsageError(f"--prompts {a.prompts} is not a multiple of --mini-batches {a.mini_batches} "
                         f"x {world} ranks")
    torch.manual_seed(a.seed)
    problems = load_rl(a.data) if a.data else builtin_problems("train", a.train_problems, seed=a.seed)
    policy, tok = load_model(a.model, device="cpu", dtype=torch.float32)
    policy.activation_checkpointing = a.activation_checkpointing  # the critic's trunk copies it
    ref = shard_model(copy.deepcopy(policy).requires_grad_(False), device) if a.kl_coef else None
    critic = shard_model(Critic(policy), device) if a.algo == "ppo" else None
    policy = shard_model(policy, device)
    opt = make_optimizer(policy, a.lr, weight_decay=0.0)
    copt = make_optimizer(critic, a.critic_lr, weight_decay=0.0) if critic is not None else None
    run = {"algo": a.algo, "prompts": a.prompts, "rollouts": a.n, "problems": len(problems)}
    start = resume_rl(a, policy, opt, critic, copt, run) if a.resume else 0
    if rank == 0 and not a.resume:
        fresh_run(a.out)
    if rank == 0:
        announce_rl(a, len(problems), world, device)
    log = MetricsLog(a.out, enabled=rank == 0, start=start)
    sandbox = contextlib.nullcontext() if a.no_tools else Sandbox()  # one for the whole run
    with sandbox as sb, tqdm(total=a.steps, initial=start, desc="rl", disable=rank != 0, dynamic_ncols=True) as bar:
        for step in range(start, a.steps):
            if a.algo == "ppo" and step <= a.critic_warmup:
                # The policy's AdamW has not stepped yet (critic warm-up), but saving or restoring a
                # checkpoint gives it a zero step of state: drop that, so Adam starts fresh as it does
                # in an uninterrupted run.
                opt.state.clear()
            timer, counts, t0 = {"sandbox": 0.0}, {"calls": 0, "hits": 0}, time.perf_counter()
            with full_weights(policy):
                records = rollout(policy, tok, step_jobs(problems, a, step, rank, world), a,
                                  timed(sb.run_many, timer) if sb else None, step, counts)
            t1 = time.perf_counter()
            metrics = rl_step(step, records, policy, critic, ref, opt, copt, a, device)
            metrics.update(rollout_metrics(records, device, counts, a.tis_cap))
            if critic is None:
                metrics.pop("explained_var")
            metrics.update(time_gen=t1 - t0, time_sandbox=timer["sandbox"], time_train=time.perf_counter() - t1)
            bad = next((k for k, v in metrics.items() if not math.isfinite(v)), None)
            if bad:  # global values: every rank stops here
                raise UsageError(f"step {step + 1}: {bad} is {metrics[bad]}, training diverged (lower --lr?)")
            log.log(step + 1, **metrics)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("reward", "accuracy", "code_ratio",
                                                             "response_len") if k in metrics})
            bar.update()
            if rank == 0 and a.sample_every and (step + 1) % a.sample_every == 0:
                show_samples(a.out, records, tok, step + 1)
            if (step + 1) % a.save_every == 0 or step + 1 == a.steps:
                save_rl_checkpoint(a, step + 1, policy, opt, critic, copt, tok, run)
    log.close()
    save_final(a.out, policy, tok, "rl")
    return 0


# -----------------------------------------------------------------------------------------------
# Command line: `python retool.py --stage sft|rl [stage flags]` (each stage's --help lists its own).


def main(argv=None) -> int:
    top = CliParser(prog="retool.py", add_help=False, allow_abbrev=False)  # the stage's parser reads the rest
    top.add_argument("--stage", choices=("sft", "rl"))
    top.add_argument("-h", "--help", action="store_true")
    try:
        a, rest = top.parse_known_args(sys.argv[1:] if argv is None else argv)
    except UsageError:  # --stage without a value, or another stage
        a = None
    if a is not None and a.stage is None and a.help:
        print("usage: python retool.py --stage {sft,rl} [flags]  (`--stage sft --help`, `--stage rl --help`: "
              "the flags)\n" + __doc__.strip())
        return 0
    if a is None or a.stage is None:
        print("retool.py: error: --stage must be sft or rl (python retool.py --stage sft --help)", file=sys.stderr)
        return 2
    return (sft_main if a.stage == "sft" else rl_main)(rest + ["--help"] * a.help)


if __name__ == "__main__":
    sys.exit(main())
