"""--plan: the memory per GPU of a real config (meta device) against hand arithmetic."""
import json
import os
import shutil
from pathlib import Path

import pytest

import retool

CONFIGS = Path(__file__).resolve().parent.parent.parent / "shared" / "real" / "configs"
GIB = 2 ** 30


def real_config(name, tmp_path):
    src = CONFIGS / name
    if not src.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{src} is missing (../shared is part of CI)")
        pytest.skip(f"{src} not here")
    (tmp_path / "config.json").write_text(src.read_text())
    return json.loads(src.read_text())


def qwen2_params(c):
    """Qwen2: q/k/v with bias, o without; SwiGLU MLP; two norms per block; untied head."""
    C, I, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * C // c["num_attention_heads"]
    block = (C * C + C) + 2 * (C * kv + kv) + C * C + 3 * C * I + 2 * C
    return 2 * V * C + L * block + C


def printed(out):
    """'  name   12.3 GiB' lines -> {name: GiB}, and 'rollouts of N tokens ...: k' -> {N: k}."""
    gib, rollouts = {}, {}
    for line in out.splitlines():
        if line.endswith(" GiB"):
            name, value = line.strip()[:-4].rsplit(None, 1)
            gib[name.strip()] = float(value)
        elif line.strip().startswith("rollouts of"):
            rollouts[int(line.split()[2])] = int(line.rsplit(":", 1)[1])
    return gib, rollouts


def test_plan_7b_ppo_fits_on_8x80gb_by_hand_arithmetic(tmp_path, capsys):
    c = real_config("Qwen2.5-7B.base.json", tmp_path)
    assert retool.rl_main(["--model", str(tmp_path), "--plan", "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    gib, rollouts = printed(out)
    n = qwen2_params(c)
    assert n == 7_615_616_512  # Qwen2.5-7B's published parameter count
    C, I, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    critic_trained = n - V * C + C + 1  # the critic's lm_head is never used, so AdamW holds no state for it
    master, grads, adam = 4 * (2 * n + C + 1) / 8, 4 * (n + critic_trained) / 8, 8 * (n + critic_trained) / 8
    tokens = 1 * (1024 + 16000)  # the real preset: micro-batch 1, prompt allowance + 16k new tokens
    act = tokens * (L * C * 4 + (8 * C + 4 * I) * 2) + 2 * 1024 * V * 4
    usable = 80e9 * 0.9
    gathered = 2 * n
    pool = usable - master - adam - gathered
    kv_token = L * 2 * c["num_key_value_heads"] * (C // c["num_attention_heads"]) * 2
    want = {"master weights (fp32, sharded)": master, "gradients (fp32, sharded)": grads,
            "optimizer state (AdamW, sharded)": adam, "activations (1 x 17024 tokens, checkpointed)": act,
            "training total": master + grads + adam + act, "usable (80 GB less 10%)": usable,
            "gathered bf16 weights (generation)": gathered, "KV pool left": pool}
    assert gib == {k: pytest.approx(v / GIB, abs=0.05) for k, v in want.items()}
    blocks = pool // (kv_token * 256)  # the engine's pool: blocks of 256 positions (flash-attn's paged kernel)
    assert rollouts == {17024: int(blocks // 67), 8512: int(blocks // 34)}  # 66.5 and 33.25 blocks, rounded up
    assert rollouts[17024] >= 16  # one prompt's 16 rollouts decode together
    assert out.rstrip().endswith("fits")


def test_plan_32b_ppo_does_not_fit_on_8x80gb_and_names_the_shortfall(tmp_path, capsys):
    c = real_config("Qwen2.5-32B.base.json", tmp_path)
    assert retool.rl_main(["--model", str(tmp_path), "--plan"]) == 2  # defaults: 8 GPUs of 80 GB
    out = capsys.readouterr().out
    n = qwen2_params(c)
    C, V = c["hidden_size"], c["vocab_size"]
    gib, _ = printed(out)
    trained = 2 * n - V * C + C + 1
    assert gib["optimizer state (AdamW, sharded)"] == pytest.approx(8 * trained / 8 / GIB, abs=0.05)
    last = out.rstrip().splitlines()[-1]
    assert last.startswith(f"does not fit: training needs {gib['training total']:.1f} GiB per GPU of 67.1 usable")
    assert "--gpus" in last and "--algo grpo" in last
    # GRPO on 16 GPUs: the training state fits, but every rank gathers all 61 GiB of bf16 weights to
    # generate, and the KV pool left is negative
    assert retool.rl_main(["--model", str(tmp_path), "--plan", "--algo", "grpo", "--gpus", "16"]) == 2
    gib, rollouts = printed(capsys.readouterr().out)
    assert gib["training total"] < gib["usable (80 GB less 10%)"] and rollouts[17024] == 0
    assert gib["gathered bf16 weights (generation)"] == pytest.approx(2 * n / GIB, abs=0.05)


def test_plan_sft_and_bad_flags(tmp_path, capsys):
    real_config("Qwen2.5-7B.base.json", tmp_path)
    assert retool.sft_main(["--model", str(tmp_path), "--plan", "--no-activation-checkpointing"]) == 2
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("does not fit: training needs") and last.endswith("--activation-checkpointing")
    assert retool.sft_main(["--model", str(tmp_path), "--plan", "--gpus", "0"]) == 2
    assert "--gpus must be" in capsys.readouterr().err
