"""retool: teach a language model when and how to call a code interpreter (ReTool, arXiv 2504.11536).

One file for the model, the generation engine with its tool-interrupting sampler, the SFT and PPO
loops and the command line. The same module trains and generates: there is no second inference
engine and no weight sync. Read it top to bottom.
"""
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

# -----------------------------------------------------------------------------------------------
# Model: a Llama/Qwen-family decoder in plain torch, weight names identical to transformers'.


class ModelError(Exception):
    """A checkpoint we cannot read: the message names the file or field (the CLI exits 2)."""


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
        kind = hf.get("model_type")
        if kind not in ("qwen2", "qwen3", "llama"):
            raise ModelError(f"{where}: unsupported model_type {kind!r} (supported: qwen2, qwen3, llama)")
        try:
            heads = hf["num_attention_heads"]
            # transformers 5 writes rope_parameters; real 4.x checkpoints carry rope_theta/rope_scaling.
            rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
            theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "llama3"):
                raise ModelError(f"{where}: unsupported rope type {rope_type!r} (supported: default, llama3)")
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
        except KeyError as e:
            raise ModelError(f"{where}: missing field {e.args[0]!r}") from None


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
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.h, self.h_kv, self.d = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.h * self.d, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.h_kv * self.d, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.h_kv * self.d, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.h * self.d, c.hidden_size, bias=c.o_proj_bias)
        if c.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.d, c.rms_norm_eps), RMSNorm(self.d, c.rms_norm_eps)

    def forward(self, x, cos, sin, attend):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.h_kv, self.d)  # (B, T, H_kv, D)
        v = self.v_proj(x).view(B, T, self.h_kv, self.d)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        out = attend(rotate(q, cos, sin), rotate(k, cos, sin), v, self.layer)  # (B, T, H, D)
        return self.o_proj(out.reshape(B, T, self.h * self.d))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.mlp.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.mlp.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x, cos, sin, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


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
    i = torch.arange(T, device=q.device)
    mask = (document_ids[:, :, None] == document_ids[:, None, :]) & (i[None, :, None] >= i[None, None, :])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], enable_gqa=True)
    return out.transpose(1, 2)


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

    def forward(self, input_ids, position_ids=None, document_ids=None, cache=None, hidden_only=False):
        """input_ids (B, T) -> logits (B, T, V). Packed rows pass document_ids and position_ids that
        restart per document. With a KVCache (the engine), positions come from the cache, the new
        keys and values are written into it, and only the last position's logits are returned."""
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if cache is not None:
            position_ids, attend = cache.positions, cache.attend
        elif document_ids is not None:
            attend = lambda q, k, v, layer: packed_attention(q, k, v, document_ids)  # noqa: E731
        else:
            attend = causal_attention
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device).expand(B, T)
        self.inv_freq = self.inv_freq.to(x.device)
        angles = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # (B, T, 1, D)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, attend)
        if cache is not None:
            x = x[:, -1:]  # rows are left-padded, so the last position is every row's newest token
        x = self.norm(x)
        return x if hidden_only else self.lm_head(x)

    def hidden(self, input_ids, position_ids=None, document_ids=None):
        """Final-normed hidden states (B, T, C): the trunk a value head sits on."""
        return self(input_ids, position_ids, document_ids, hidden_only=True)  # through __call__: FSDP hooks


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


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else "model." + name


def load_model(path, device=None, dtype=None):
    """A local HF checkpoint directory -> (model, tokenizer), without a transformers model."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (not a model directory)")
    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"{path}: no model.safetensors or model.safetensors.index.json")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device("meta"):
        model = Transformer(config)
    tensors = {}
    for f in files:
        if not (path / f).is_file():
            raise ModelError(f"{path / f}: missing weight shard")
        with safe_open(str(path / f), framework="pt", device="cpu") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    state = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = hf_name(name)
        if key not in tensors and name == "lm_head.weight" and config.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        if key not in tensors:
            raise ModelError(f"{path}: weight {key!r} missing from the checkpoint")
        if tensors[key].shape != p.shape:
            raise ModelError(f"{path}: weight {key!r} has shape {tuple(tensors[key].shape)}, config says {tuple(p.shape)}")
        state[name] = tensors[key].to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    # A tokenizer saved as a plain tokenizer.json (the built-in one) must load as exactly that:
    # AutoTokenizer would follow config.json's model_type and swap in Qwen2's pre-tokenizer.
    tok_cfg = path / "tokenizer_config.json"
    plain = tok_cfg.is_file() and json.loads(tok_cfg.read_text()).get("tokenizer_class") in (
        "TokenizersBackend", "PreTrainedTokenizerFast")
    try:
        tokenizer = (PreTrainedTokenizerFast if plain else AutoTokenizer).from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    return model, tokenizer


def replace_dir(tmp: Path, path: Path):
    """Move a finished directory into place; the previous one is removed only once the new one is there."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model: Transformer, tokenizer, path, state_dict: dict | None = None):
    """Write an HF directory (config, safetensors, tokenizer) atomically. Sharded (FSDP) callers pass
    the gathered full state_dict."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {hf_name(k): v.detach().to("cpu").contiguous() for k, v in state.items()
               if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    hf = dict(model.config.hf)
    hf.pop("torch_dtype", None)
    hf["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    hf.setdefault("architectures", [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                     "llama": "LlamaForCausalLM"}[hf["model_type"]]])
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp", dir=path.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -----------------------------------------------------------------------------------------------
# Generation engine: a static KV cache, continuous batching, and a sampler that pauses a row at
# </code>, runs its code, appends the interpreter's output into the cache and resumes.


class KVCache:
    """Keys and values of every slot, per layer (B, S_max, H_kv, D) — flash-attn's layout — and the
    number of positions each slot has filled. A forward feeds R rows (slot indices `rows`) a
    left-padded chunk (R, T) whose last n_new[r] tokens are real."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device, dtype):
        shape = (config.num_hidden_layers, slots, max_len, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lens = torch.zeros(slots, dtype=torch.long, device=device)

    def prepare(self, rows: torch.Tensor, n_new: torch.Tensor, T: int, prefix: bool):
        self.rows, self.prefix = rows, prefix  # prefix: rows are 0..R-1, so the cache is sliced, not gathered
        self.total = self.lens[rows] + n_new  # (R,) filled length once this chunk is in
        i = torch.arange(T, device=rows.device)
        # Query i sits at position total - T + i (bottom-right alignment); padding gets position 0
        # so that its row is never fully masked.
        self.positions = (self.total[:, None] - T + i).clamp(min=0)  # (R, T)
        self.valid = i[None, :] >= (T - n_new)[:, None]  # (R, T) real tokens
        self.width = int(self.total.max())

    def attend(self, q, k, v, layer):  # q (R, T, H, D), k/v (R, T, H_kv, D) -> (R, T, H, D)
        slot = self.rows[:, None].expand_as(self.valid)[self.valid]
        self.k[layer][slot, self.positions[self.valid]] = k[self.valid]
        self.v[layer][slot, self.positions[self.valid]] = v[self.valid]
        if use_flash(q):
            return flash_attn()[1](q, self.k[layer], self.v[layer], cache_seqlens=self.total.int(),
                                   cache_batch_idx=self.rows.int(), causal=True)
        R, L = len(self.rows), self.width
        kc = self.k[layer, :R, :L] if self.prefix else self.k[layer, self.rows, :L]  # (R, L, H_kv, D)
        vc = self.v[layer, :R, :L] if self.prefix else self.v[layer, self.rows, :L]
        mask = torch.arange(L, device=q.device)[None, None, :] <= self.positions[:, :, None]  # (R, T, L)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                             attn_mask=mask[:, None], enable_gqa=True)
        return out.transpose(1, 2)

    def commit(self):
        self.lens[self.rows] = self.total

    def move(self, src: int, dst: int):
        """Slot dst takes over slot src's cache (keeps occupied slots a prefix 0..R-1)."""
        n = int(self.lens[src])
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]
        self.lens[dst] = n


def sample(logits, temperature, top_p, top_k, uniforms):
    """logits (R, V) float32, uniforms (R,) in [0, 1) -> tokens (R,), their log-probs (R,) under the
    distribution actually sampled from (temperature-scaled, top-k/top-p filtered)."""
    if temperature == 0:
        logp = torch.log_softmax(logits, -1)
        tokens = logp.argmax(-1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
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
    tokens = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=logits.size(-1) - 1)
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


CODE_BLOCK = re.compile(r"```python[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python block of the last <code> span (the official harness's rule)."""
    span = text[text.rfind("<code>") + len("<code>"):].removesuffix("</code>")
    blocks = CODE_BLOCK.findall(span)
    return blocks[-1] if blocks else span.strip().strip("`")


@lru_cache(maxsize=8)
def token_strings(tokenizer) -> list:
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def stop_ids(tokenizer) -> set:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return ids


def run_tool(tool, codes):
    """A tool failure of any kind becomes the feedback of its calls, never a crashed rollout."""
    try:
        results = tool(codes)
        return [(r, "ok") if isinstance(r, str) else (r.feedback, r.status) for r in results]
    except Exception as e:  # noqa: BLE001
        return [(f"{type(e).__name__}: {e}", "internal")] * len(codes)


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
             tool=None, max_tool_calls=8, seed=None, max_batch=64, max_total_len=None, stop=()):
    """Sample a response for every prompt (strings or token-id lists) -> list[Trajectory].

    At most max_batch rows decode at once; a finished row frees its slot for the next prompt. With a
    tool (list of code strings -> list of feedback strings or sandbox Results), a row whose text
    gains </code> waits for its code to run while the others keep decoding, then gets
    data.encode_interpreter(feedback) fed into its cache as one chunk. seed: an int, or one per
    prompt (rollouts that must not depend on how prompts are split across ranks)."""
    prompts = [tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p) for p in prompts]
    if not prompts:
        return []
    seeds = seed if isinstance(seed, (list, tuple)) else [
        None if seed is None else seed * 1_000_003 + i for i in range(len(prompts))]
    param = next(model.parameters())
    device, n = param.device, len(prompts)
    longest = max(map(len, prompts)) + max_new_tokens
    max_total_len = min(max_total_len or longest, longest)
    if max(map(len, prompts)) >= max_total_len:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens does not fit max_total_len={max_total_len}")
    slots = min(max_batch, n)
    cache = KVCache(model.config, slots, max_total_len + 1, device, param.dtype)
    eos, tails = stop_ids(tokenizer), tuple(stop) + (("</code>",) if tool else ())
    # Only a token that contains a tail's last character can complete it: skip the decode otherwise.
    vocab = token_strings(tokenizer)
    may_end = {i for i, s in enumerate(vocab) if s and any(t[-1] in s for t in tails)}
    window = max((len(t) for t in tails), default=0) + 1

    results = [Trajectory(prompt_ids=p) for p in prompts]
    waiting = list(range(n))[::-1]  # a stack: pop() takes prompts in order
    row = []  # slot -> index into results; occupied slots are always 0..len(row)-1
    pending, rng = {}, {}  # index -> ids to feed next / the row's random.Random
    running, paused = {}, []  # future -> indices whose code it runs; rows whose code is not sent yet
    pool = ThreadPoolExecutor(max_workers=4) if tool else None

    def finish(i, reason):
        results[i].finish_reason = reason
        slot, last = row.index(i), len(row) - 1
        if slot != last:
            cache.move(last, slot)
            row[slot] = row[last]
        row.pop()
        cache.lens[last] = 0
        pending.pop(i, None)

    def after_token(i, token, logprob):
        t = results[i]
        t.response_ids.append(token), t.loss_mask.append(1), t.logprobs.append(logprob)
        if token in eos:
            return finish(i, "eos")
        if len(t.response_ids) >= max_new_tokens or len(t.prompt_ids) + len(t.response_ids) >= max_total_len:
            return finish(i, "length")
        pending[i] = [token]
        if token not in may_end:
            return
        tail = tokenizer.decode(t.response_ids[-window:])
        done = [s for s in tails if s in tail and s not in tokenizer.decode(t.response_ids[-window:-1])]
        if not done:
            return
        if done[0] != "</code>":
            return finish(i, "stop")
        if len(t.tool_calls) >= max_tool_calls:
            return finish(i, "max_tool_calls")
        t.tool_calls.append(ToolCall(extract_code(tokenizer.decode(t.response_ids)), "", ""))
        pending[i] = None  # the row sits out until its feedback arrives; its token is fed with it
        paused.append(i)

    def feed(indices):
        chunks = [pending[i] for i in indices]
        T = max(map(len, chunks))
        ids = torch.tensor([[0] * (T - len(c)) + c for c in chunks], device=device)  # left-padded (R, T)
        slots_ = [row.index(i) for i in indices]
        cache.prepare(torch.tensor(slots_, device=device), torch.tensor([len(c) for c in chunks], device=device),
                      T, prefix=slots_ == list(range(len(slots_))))
        logits = model(ids, cache=cache)[:, -1].float()  # (R, V)
        cache.commit()
        uniforms = torch.tensor([rng[i].random() for i in indices])
        tokens, logps = sample(logits, temperature, top_p, top_k, uniforms)
        for i, tok, lp in zip(indices, tokens.tolist(), logps.tolist()):
            after_token(i, tok, lp)

    try:
        while waiting or row:
            while waiting and len(row) < slots:
                i = waiting.pop()
                row.append(i)
                pending[i], rng[i] = prompts[i], random.Random(seeds[i])
            done = [f for f in running if f.done()]
            if running and not any(pending.get(i) for i in row):
                done = list(wait(running, return_when=FIRST_COMPLETED).done)
            for f in done:
                for i, (feedback, status) in zip(running.pop(f), f.result()):
                    t = results[i]
                    t.tool_calls[-1].feedback, t.tool_calls[-1].status = feedback, status
                    block = data.encode_interpreter(tokenizer, feedback)
                    if len(t.response_ids) + len(block) >= max_new_tokens or \
                            len(t.prompt_ids) + len(t.response_ids) + len(block) >= max_total_len:
                        finish(i, "length")
                        continue
                    pending[i] = [t.response_ids[-1]] + block
                    t.response_ids += block
                    t.loss_mask += [0] * len(block)
                    t.logprobs += [0.0] * len(block)
            # Chunks (prompts, interpreter output) and single-token decodes go in separate forwards so
            # that one long prompt does not pad every decoding row to its length.
            ready = [i for i in row if pending.get(i)]
            for group in ([i for i in ready if len(pending[i]) > 1], [i for i in ready if len(pending[i]) == 1]):
                if group:
                    feed(group)
            if paused:  # one batch per step: the sandbox runs it in parallel
                running[pool.submit(run_tool, tool, [results[i].tool_calls[-1].code for i in paused])] = paused
                paused = []
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
    for t in results:
        t.text = tokenizer.decode(t.response_ids, skip_special_tokens=True)
    return results


# -----------------------------------------------------------------------------------------------
# Command line: `python retool.py --stage sft|rl [stage flags]` (each stage's --help lists its own).


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    stage = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--stage"), None)
    stage = stage or next((a.split("=", 1)[1] for a in argv if a.startswith("--stage=")), None)
    if stage not in ("sft", "rl"):
        print("error: --stage must be sft or rl (python retool.py --stage sft --help)", file=sys.stderr)
        return 2
    rest = [a for i, a in enumerate(argv) if a != "--stage" and not a.startswith("--stage=")
            and not (i and argv[i - 1] == "--stage")]
    if stage == "sft":
        from _sft import sft_main  # DEV: merged into this file
        return sft_main(rest)
    from _rl import rl_main  # DEV: merged into this file
    return rl_main(rest)


if __name__ == "__main__":
    sys.exit(main())
