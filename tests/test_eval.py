import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import eval as ev  # noqa: E402
from data import builtin_problems, builtin_tokenizer, load_eval  # noqa: E402
from retool import ToolCall, Trajectory, build_model, save_model  # noqa: E402

AIME24 = Path(__file__).resolve().parents[2] / "shared/data/AIME24.jsonl"
TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    tok = builtin_tokenizer()
    model = build_model({**TINY, "vocab_size": len(tok)}, seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(model, tok, path)
    return path


def brute_pass_at_k(n, c, k):
    hits = [any(i < c for i in subset) for subset in itertools.combinations(range(n), k)]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (6, 0, 3), (6, 6, 2),
                                   (8, 3, 4), (10, 1, 5), (10, 7, 3), (12, 4, 6), (7, 2, 7)])
def test_pass_at_k_matches_brute_force(n, c, k):
    assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
    assert ev.pass_at_k(32, 8, 1) == pytest.approx(8 / 32)  # pass@1 is the mean accuracy
    assert ev.pass_at_k(1000, 1, 1000) == 1.0
    assert 0.0 < ev.pass_at_k(1000, 1, 10) < 0.011  # no overflow with large n
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 5)


def test_majority_groups_equivalent_answers():
    assert ev.majority_answer(["34", "033", "33", "34", "0033"]) == "033"  # 3 x 33 beat 2 x 34
    assert ev.majority_answer(["\\frac12", "3", "0.5", "3", "1/2"]) == "\\frac12"
    assert ev.majority_answer(["7", "8"]) == "7"  # tie: the first seen
    assert ev.majority_answer([None, None, "5"]) == "5"  # no answer never votes
    assert ev.majority_answer([None, None]) is None
    assert ev.majority_answer([]) is None


def traj(text, n_tokens, statuses=()):
    return Trajectory(prompt_ids=[1, 2], response_ids=list(range(n_tokens)), loss_mask=[1] * n_tokens,
                      logprobs=[0.0] * n_tokens, finish_reason="eos", text=text,
                      tool_calls=[ToolCall("print(1)", "1", s) for s in statuses])


def test_metrics_on_hand_made_trajectories():
    trajs = [  # problem 0 (gold 33): 2 of 3 right; problem 1 (gold 1/2): 0 of 3 right, majority wrong
        traj("so \\boxed{033}", 10, ["ok"]), traj("\\boxed{34}", 20),
        traj("\\boxed{33}.", 30, ["ok", "error"]),
        traj("\\boxed{0.4}", 40, ["timeout"]), traj("no box", 50), traj("\\boxed{2/5}", 60)]
    res = ev.compute_metrics(trajs, ["33", "\\frac{1}{2}"])
    m = res["metrics"]
    assert res["correct"] == [True, False, True, False, False, False]
    assert (m["problems"], m["k"], m["samples"]) == (2, 3, 6)
    assert m["avg@k"] == pytest.approx(2 / 6) and m["pass@1"] == pytest.approx(2 / 6)
    assert m["pass@k"] == pytest.approx(0.5) and m["pass@2"] == pytest.approx(0.5)
    assert m["maj@k"] == pytest.approx(0.5)
    assert res["per_problem"][0]["majority"] == "033" and res["per_problem"][1]["majority"] == "0.4"
    assert m["code_ratio"] == pytest.approx(3 / 6)
    assert m["calls_per_response"] == pytest.approx(4 / 6)
    assert m["code_pass_rate"] == pytest.approx(2 / 4)
    assert m["response_length"] == pytest.approx(35)
    assert m["answered"] == pytest.approx(5 / 6)
    assert m["finish_reasons"] == {"eos": 6}
    no_calls = ev.compute_metrics([traj("\\boxed{1}", 3)], ["1"])["metrics"]
    assert no_calls["code_pass_rate"] is None and no_calls["code_ratio"] == 0.0
    assert "–" in ev.markdown_table([("m", {"data": "d", "tools": True, "metrics": no_calls})])
    with pytest.raises(ValueError):
        ev.compute_metrics(trajs[:5], ["33", "1/2"])


def test_evaluate_with_real_sandbox_counts_calls():
    """A tiny model pushed to always write </code>: every response calls the real sandbox."""
    tok = builtin_tokenizer()
    inner = build_model({**TINY, "vocab_size": len(tok)}, seed=1)
    close = tok.convert_tokens_to_ids("</code>")

    class AlwaysCloseCode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, *args, **kwargs):
            logits = self.inner(*args, **kwargs)
            logits[..., close] += 100.0
            return logits

    problems = builtin_problems("test", 2)
    res, trajs = ev.evaluate(AlwaysCloseCode(), tok, problems, k=2, max_new_tokens=300, max_tool_calls=2,
                             progress=False)
    m = res["metrics"]
    assert len(trajs) == 4 and m["samples"] == 4
    assert all(len(t.tool_calls) == 2 and t.finish_reason == "max_tool_calls" for t in trajs)
    assert all(c.status in ("ok", "error") for t in trajs for c in t.tool_calls)  # the sandbox ran each
    assert m["code_ratio"] == 1.0 and m["calls_per_response"] == 2.0
    assert m["finish_reasons"] == {"max_tool_calls": 4}
    statuses = [c.status for t in trajs for c in t.tool_calls]
    assert m["code_pass_rate"] == pytest.approx(statuses.count("ok") / len(statuses))
    assert m["avg@k"] == 0.0


def test_end_to_end_cli_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = ev.main(["--model", str(tiny_checkpoint), "--limit", "3", "--k", "2", "--max-new-tokens", "24",
                  "--out", str(out), "--seed", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "avg@k" in printed and f"| {tiny_checkpoint} |" in printed
    r = json.loads((out / "results.json").read_text())
    m = r["metrics"]
    assert r["tools"] is True and r["temperature"] == 1.0 and r["top_p"] == 0.7
    assert (m["problems"], m["k"], m["samples"]) == (3, 2, 6)
    assert len(r["per_problem"]) == 3 and all(len(p["correct"]) == 2 for p in r["per_problem"])
    flat = [c for p in r["per_problem"] for c in p["correct"]]
    assert m["avg@k"] == pytest.approx(sum(flat) / 6)
    assert m["pass@k"] == pytest.approx(sum(any(p["correct"]) for p in r["per_problem"]) / 3)
    assert sum(m["finish_reasons"].values()) == 6
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and [s["correct"] for s in samples] == flat
    assert m["code_ratio"] == pytest.approx(sum(s["tool_calls"] > 0 for s in samples) / 6)
    assert m["calls_per_response"] == pytest.approx(sum(s["tool_calls"] for s in samples) / 6)
    assert 0 < m["response_length"] <= 24 + 8 * 200
    assert (out / "results.md").read_text().startswith("| model")
    page = (out / "samples.html").read_text()  # the first sample of each problem, graded as results.json
    for p, problem in enumerate(r["per_problem"]):
        verdict = "right" if problem["correct"][0] else "wrong"
        assert f'<h2 class="{verdict}">problem {p + 1}, sample 1 of 2: {verdict}' in page
    assert page.count('<div class="sample">') == 3 and page.count('<pre class="response">') == 3
    assert "&lt;|im_start|&gt;user" in page and "<|im_start|>" not in page  # the prompt, escaped
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    # the same seed gives the same samples
    rc = ev.main(["--model", str(tiny_checkpoint), "--limit", "3", "--k", "2", "--max-new-tokens", "24",
                  "--out", str(tmp_path / "again"), "--seed", "1", "--no-tools"])
    assert rc == 0 and json.loads((tmp_path / "again/results.json").read_text())["tools"] is False


def test_samples_html_splits_spans_by_loss_mask_and_escapes_everything():
    """The model's text, its code and the injected interpreter output each get their own class; a
    snippet printing <script> stays text, in the code and in the output."""
    from data import sample_text, samples_html
    from retool import sample_view

    tok = builtin_tokenizer()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    said = enc("Compute a & b.\n<code>\n```python\nprint('<script>alert(1)</script>', 1 & 3)\n```\n</code>")
    ran = enc("\n<interpreter>\n<script>alert(1)</script> 1\n</interpreter>\n")
    end = enc("So \\boxed{1}<|im_end|>")
    t = Trajectory(prompt_ids=enc("<|im_start|>user\nWhat is 1 & 3?<|im_end|>\n"), response_ids=said + ran + end,
                   loss_mask=[1] * len(said) + [0] * len(ran) + [1] * len(end), finish_reason="eos")
    view = sample_view(tok, t, "problem 1: right, finish eos", True)
    assert [kind for kind, _ in view.spans] == ["model", "code", "interp", "model"]
    page = samples_html([view], "a & b")
    assert '<span class="model">Compute a &amp; b.\n</span><span class="code">&lt;code&gt;\n' in page
    assert "print(&#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27;, 1 &amp; 3)" in page
    assert '<span class="interp">\n&lt;interpreter&gt;\n&lt;script&gt;alert(1)&lt;/script&gt; 1\n' in page
    assert '<span class="model">So \\boxed{1}&lt;|im_end|&gt;</span>' in page
    assert "<script" not in page and "What is 1 &amp; 3?" in page and "<title>a &amp; b</title>" in page
    assert "http" not in page and "src=" not in page  # nothing fetched
    text = sample_text(view)  # the terminal's: the response as the model saw it, tags and all
    assert "problem 1: right, finish eos" in text.splitlines()[0]
    assert "<script>alert(1)</script> 1\n</interpreter>" in text and text.count("So \\boxed{1}") == 1


def test_compare_and_default_checkpoint(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert ev.main(["--limit", "1"]) == 2  # no out/rl or out/sft yet
    assert "no checkpoint" in capsys.readouterr().err
    os.makedirs("out")
    os.symlink(tiny_checkpoint, "out/sft")
    assert ev.newest_checkpoint() == Path("out/sft")
    os.makedirs("runs/b")
    os.symlink(tiny_checkpoint, "runs/b/sft")  # the same basename as out/sft: its own output dir
    assert ev.main(["--compare", str(tiny_checkpoint), "out/sft", "runs/b/sft", "--limit", "2", "--k", "1",
                    "--max-new-tokens", "8", "--no-tools"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("| ") for line in table) == 4  # header + three checkpoints
    for name, model in (("tiny", str(tiny_checkpoint)), ("out-sft", "out/sft"), ("b-sft", "runs/b/sft")):
        results = Path(f"out/eval/{name}-builtin-test-notools/results.json")
        assert json.loads(results.read_text())["model"] == model
    # the with-tools comparison gets its own table file and does not overwrite the text-only one
    assert ev.main(["--compare", "out/sft", "--limit", "1", "--k", "1", "--max-new-tokens", "4"]) == 0
    assert "wrote out/eval/compare-builtin-test.md" in capsys.readouterr().out
    text_only = Path("out/eval/compare-builtin-test-notools.md")
    tools = Path("out/eval/compare-builtin-test.md")
    assert "| no |" in text_only.read_text() and "| yes |" not in text_only.read_text()
    assert "| yes |" in tools.read_text() and "| no |" not in tools.read_text()


def test_out_names_are_the_resolved_names_and_unique(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ev.out_names(["."]) == [tmp_path.name] and ev.out_names(["out/rl/"]) == ["rl"]
    assert ev.out_names(["out/sft", "out/rl"]) == ["sft", "rl"]
    assert ev.out_names(["runs/a/rl", "runs/b/rl", "runs/c/sft"]) == ["a-rl", "b-rl", "sft"]
    assert ev.out_names(["x/rl", "x/rl/", "y/rl", "x/../x/rl"]) == ["x-rl-1", "x-rl-2", "y-rl", "x-rl-3"]
    assert ev.out_names(["a/rl", "b/rl", "c/a-rl"]) == ["a-rl-1", "b-rl", "a-rl-2"]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "no/such/dir"], "no/such/dir"),
    (["--model", "."], "config.json"),
    (["--model", "x", "--data", "no/such.jsonl"], "no/such.jsonl"),
    (["--plot", "no/such/metrics.jsonl"], "metrics.jsonl"),
])
def test_user_mistakes_exit_2_with_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ev.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("eval.py: error:")


@pytest.mark.parametrize("argv,needle", [
    (["--bogus"], "--bogus"), (["--k", "0"], "--k"), (["--k", "abc"], "abc"), (["--k", "-3"], "--k"),
    (["--k"], "--k"), (["--limit", "0"], "--limit"), (["--batch", "0"], "--batch"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-tool-calls", "-1"], "--max-tool-calls"),
    (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--seed", "x"], "--seed"),
    (["--model", "a", "--compare", "b"], "not both")])
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eval.py: error:") and needle in err


def _must_not_evaluate(*args, **kwargs):
    raise AssertionError("evaluated a checkpoint before every path was checked")


@pytest.mark.parametrize("argv,needle", [
    (["--compare", "{ckpt}", "/no/such/dir"], "--compare /no/such/dir: no such directory"),
    (["--compare", "{ckpt}", "empty"], "--compare empty: not a checkpoint directory (no config.json)"),
    (["--compare", "{ckpt}", "afile"], "--compare afile: not a directory"),
    (["--compare", "{ckpt}", "noweights"], "--compare noweights: no model.safetensors"),
    (["--model", "empty"], "--model empty: not a checkpoint directory"),
    (["--model", "{ckpt}", "--out", "afile"], "--out afile: not a directory"),
    (["--compare", "{ckpt}", "--out", "afile"], "--out afile: not a directory"),
    (["--compare", "{ckpt}", "--out", "taken"], "--out taken: taken/tiny-builtin-test: not a directory"),
    (["--compare", "{ckpt}", "--out", "taken", "--data", "d.jsonl"], "--out taken: taken/compare-d.md: is a directory"),
    (["--data", "empty"], "--data empty: a directory, not a file"),
    (["--data", "dir.jsonl"], "--data dir.jsonl: a directory, not a file"),
    (["--model", ""], "--model: empty path"), (["--data", ""], "--data: empty path"),
    (["--out", ""], "--out: empty path"), (["--plot", ""], "--plot: empty path"),
    (["--compare", "{ckpt}", ""], "--compare: empty path"),
    (["--plot", "binary.jsonl"], "binary.jsonl:1: not a JSON object"),
])
def test_path_mistakes_fail_before_evaluating(argv, needle, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, "run_one", _must_not_evaluate)
    Path("afile").write_text("not a folder\n")
    Path("binary.jsonl").write_bytes(bytes(range(256)))
    Path("d.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    for d in ("empty", "dir.jsonl", "taken/compare-d.md"):
        os.makedirs(d)
    Path("taken/tiny-builtin-test").write_text("")
    os.makedirs("noweights")
    Path("noweights/config.json").write_text("{}")
    assert ev.main([a.replace("{ckpt}", str(tiny_checkpoint)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eval.py: error: ") and needle in err
    assert not Path("out").exists()  # nothing written


def test_bad_flag_from_the_command_line_is_one_line():
    r = subprocess.run([sys.executable, "eval.py", "--bogus"], cwd=Path(ev.__file__).parent,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "eval.py: error: unrecognized arguments: --bogus\n"


def test_plot_training_curves(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "reward": -1 + s / 5, "code_ratio": s / 10,
                                           "response_length": 100 - s, "code_pass_rate": 0.9}) + "\n"
                               for s in range(10)))
    rc = ev.main(["--plot", str(metrics)])
    if importlib.util.find_spec("matplotlib"):
        assert rc == 0 and (tmp_path / "metrics.png").stat().st_size > 1000
    else:
        assert rc == 2 and "pip install matplotlib" in capsys.readouterr().err
    metrics.write_text('{"step": 0, "reward": 1}\nnot json\n')
    assert ev.main(["--plot", str(metrics)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ../shared lies beside every clone in CI: there (CI=true) a missing one fails this test, never skips it
@pytest.mark.skipif(not AIME24.is_file() and not os.environ.get("CI"),
                    reason=f"{AIME24} not present (a clone outside the workspace)")
def test_aime24_loads_and_grades():
    problems = load_eval(AIME24)
    assert len(problems) == 30 and all(p.problem for p in problems)
    for p in problems:
        assert ev.is_equiv(p.answer, p.answer)
        assert ev.is_equiv(p.answer.zfill(3), p.answer) and ev.is_equiv(p.answer, p.answer.zfill(3))
        assert ev.is_equiv(ev.extract_answer(f"... so \\boxed{{{int(p.answer):03d}}}."), p.answer)
        assert not ev.is_equiv(str(int(p.answer) + 1), p.answer)
    trajs = [Trajectory(prompt_ids=[0], text=f"\\boxed{{{p.answer}}}") for p in problems]
    assert ev.compute_metrics(trajs, [p.answer for p in problems])["metrics"]["avg@k"] == 1.0
    assert math.isclose(ev.compute_metrics(trajs[:1] * 2, ["45", "46"])["metrics"]["avg@k"], 0.5)
