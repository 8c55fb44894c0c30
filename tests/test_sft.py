"""SFT stage: packing, loss normalisation, FSDP2-over-gloo equivalence, bit-exact resume, CLI errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retool import (lr_at, pack_documents, sft_loss_sum, sft_main, sft_step,
                  token_logprobs)
from data import builtin_tokenizer
from retool import build_model, save_model

REPO = Path(__file__).resolve().parents[1]
TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
        "tie_word_embeddings": True}


def tiny_model(vocab=50, seed=0):
    return build_model({**TINY, "vocab_size": vocab}, seed)


def random_docs(n, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(5, 30, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        mask = (torch.rand(length, generator=g) < 0.7).long().tolist()
        docs.append((ids, mask))
    return docs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A width-64, 2-layer model with the built-in tokenizer, saved as an HF dir for --model."""
    tok = builtin_tokenizer()
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(build_model({**TINY, "vocab_size": len(tok)}, 0), tok, path)
    return str(path)


def run_args(ckpt, out, *extra):
    return ["--model", ckpt, "--out", str(out), "--n-traces", "120", "--heldout", "8", "--batch", "4",
            "--pack-len", "256", "--lr", "3e-3", "--steps", "6", "--eval-every", "3", *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_pack_layout():
    docs = [([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1]), ([6, 7, 8, 9], [0, 0, 1, 1])]
    rows = pack_documents(docs, 6, pad_id=0)
    assert rows["input_ids"].tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]]
    assert rows["document_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, -1, -1, -1]]
    # a document's first token is never a target, padding neither
    assert rows["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]]


def test_packed_loss_equals_sum_of_document_losses():
    model = tiny_model()
    docs = random_docs(6)
    packed = pack_documents(docs, 64)
    assert len(packed["input_ids"]) < len(docs)  # several documents share a row
    alone = sum(sft_loss_sum(model, pack_documents([d], len(d[0]))) for d in docs)
    assert torch.allclose(sft_loss_sum(model, packed), alone, rtol=1e-5)
    lp = token_logprobs(model, packed["input_ids"], packed["position_ids"], packed["document_ids"])
    assert lp.shape == packed["input_ids"].shape and (lp <= 0).all()


def test_loss_is_global_token_mean_whatever_the_micro_batching():
    rows = pack_documents(random_docs(24, seed=1), 32)
    batch = {k: v[:4] for k, v in rows.items()}
    n_targets = int(batch["loss_mask"].sum())
    results = []
    for micro in (4, 2, 1):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient itself
        mbs = [{k: v[i:i + micro] for k, v in batch.items()} for i in range(0, 4, micro)]
        loss, _ = sft_step(model, opt, None, mbs, n_targets, torch.device("cpu"), clip=1e9)
        results.append((loss, torch.cat([p.detach().flatten() for p in model.parameters()])))
    direct = (sft_loss_sum(tiny_model(), batch) / n_targets).item()
    for loss, params in results:
        assert loss == pytest.approx(direct, rel=1e-6)
        assert torch.allclose(params, results[0][1], atol=1e-7)


def test_lr_schedule():
    lrs = [lr_at(s, lr=1.0, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert lrs[0] == 0.25 and lrs[3] == 1.0 and lrs[4] == 1.0
    assert lrs[20] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_few_steps_lower_the_loss_and_write_the_model(ckpt, tmp_path):
    assert sft_main(run_args(ckpt, tmp_path, "--steps", "8", "--eval-every", "8")) == 0
    m = metrics(tmp_path)
    assert [r["step"] for r in m] == list(range(1, 9))
    assert m[-1]["loss"] < 0.8 * m[0]["loss"] and "heldout_loss" in m[-1]
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(m[0])
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()


def test_rerun_leaves_no_stale_model_and_divergence_stops(ckpt, tmp_path, capsys):
    """An unfinished rerun must not look finished (the next stage would load the old model), a
    resume must keep the lr schedule's length, and a diverged run stops with one line, unsaved."""
    assert sft_main(run_args(ckpt, tmp_path, "--steps", "2")) == 0 and (tmp_path / "config.json").is_file()
    assert sft_main(run_args(ckpt, tmp_path, "--steps", "4", "--stop-after", "2")) == 0
    assert not (tmp_path / "config.json").exists() and (tmp_path / "checkpoints" / "step_0000002").is_dir()
    assert sft_main(run_args(ckpt, tmp_path, "--steps", "6", "--resume")) == 2
    assert "a run of 4 steps, not 6" in capsys.readouterr().err
    assert sft_main(run_args(ckpt, tmp_path / "hot", "--lr", "1e30")) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "error: step 2: the loss is nan, training diverged" in err
    assert not (tmp_path / "hot" / "config.json").exists()


def test_resume_is_bit_identical(ckpt, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert sft_main(run_args(ckpt, whole)) == 0
    assert sft_main(run_args(ckpt, split, "--stop-after", "3")) == 0
    assert not (split / "model.safetensors").exists()
    assert (split / "checkpoints" / "step_0000003" / "train_state.pt").is_file()
    with open(split / "metrics.jsonl", "a") as f:  # a crash after step 4 was logged, before its checkpoint
        f.write('{"step": 4, "loss": 99.0}\n')
    assert sft_main(run_args(ckpt, split, "--resume")) == 0
    a, b = load_file(whole / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(whole)] == [r["loss"] for r in metrics(split)]


def test_activation_checkpointing_keeps_less_for_backward_and_changes_nothing():
    """What autograd keeps for backward (parameters aside), with and without recomputation: the same
    loss and gradients, a fraction of the bytes (the head's float32 (., V) temporaries are never kept)."""
    model = tiny_model(vocab=700)
    packed = pack_documents(random_docs(24, vocab=700), 128)
    params = {p.data_ptr() for p in model.parameters()}

    def run(recompute):
        model.activation_checkpointing, kept = recompute, []

        def keep(t):
            kept.append(0 if t.data_ptr() in params else t.numel() * t.element_size())
            return t
        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = sft_loss_sum(model, packed)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()], sum(kept)
    (loss, grads, kept), (loss_r, grads_r, kept_r) = run(False), run(True)
    assert loss_r == loss and all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(grads, grads_r))
    assert kept_r < kept / 5


def test_two_gloo_ranks_match_one_process_through_a_resume(ckpt, tmp_path):
    script = tmp_path / "sft_entry.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                      "from retool import sft_main\nsys.exit(sft_main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 2 ranks recompute their blocks in backward, 1 process keeps the activations: the same training
    args = run_args(ckpt, tmp_path / "two", "--steps", "4", "--micro-batch", "1", "--activation-checkpointing")
    for extra in (["--stop-after", "2"], ["--resume"]):  # the sharded checkpoint round trip too
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                              "2", str(script), *args, *extra], env=env, capture_output=True, text=True,
                             timeout=120)
        assert two.returncode == 0, two.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints" / "step_0000002")) == ["args.json",
        "model", "rng_rank0.pt", "rng_rank1.pt", "train_state.pt"]
    assert sft_main(run_args(ckpt, tmp_path / "one", "--steps", "4", "--micro-batch", "2")) == 0
    one_losses = [r["loss"] for r in metrics(tmp_path / "one")]
    two_losses = [r["loss"] for r in metrics(tmp_path / "two")]
    assert len(two_losses) == 4 and two_losses == pytest.approx(one_losses, rel=1e-5)
    held = [[r["heldout_loss"] for r in metrics(tmp_path / d) if "heldout_loss" in r] for d in ("one", "two")]
    assert len(held[0]) == 2 and held[1] == pytest.approx(held[0], rel=1e-5)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps"),
    (["--bogus"], "--bogus"),
    (["--lr", "fast"], "--lr"),
    (["--model", "/no/such/dir"], "/no/such/dir"),
    (["--data", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["--batch", "6", "--micro-batch", "4"], "--batch"),
    (["--lr", "nan"], "--lr must be positive, got nan"),
    (["--clip", "-1"], "--clip"),
    (["--min-lr-ratio", "-1"], "--min-lr-ratio"),
    (["--weight-decay", "-5"], "--weight-decay"),
    (["--warmup", "1"], "--warmup"),
])
def test_bad_flags_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    assert sft_main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


def test_help_without_a_stage_exits_0(capsys):
    import retool
    assert retool.main(["--help"]) == 0 and "--stage sft --help" in capsys.readouterr().out


def test_bad_data_file_and_missing_checkpoint_exit_2(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    assert sft_main(["--model", ckpt, "--data", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bad.jsonl" in err
    assert sft_main(run_args(ckpt, tmp_path / "empty", "--resume")) == 2
    assert "--resume" in capsys.readouterr().err
    assert sft_main(["--out", str(bad)]) == 2
    assert "--out" in capsys.readouterr().err
