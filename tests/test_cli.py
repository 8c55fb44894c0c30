"""What a newcomer meets on the command line (issue 16): each test runs the real commands in a
subprocess and reads their exit code and last lines, on a tiny checkpoint and tiny flags."""
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eval as ev
import retool
from data import builtin_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "tie_word_embeddings": True}
SFT = ["--n-traces", "120", "--heldout", "8", "--batch", "4", "--pack-len", "256", "--lr", "3e-3"]
RL = ["--prompts", "2", "--rollouts", "2", "--mini-batches", "1", "--micro-batch", "4", "--max-new-tokens", "24",
      "--lr", "1e-3", "--critic-lr", "1e-3"]
POLL_S = 0.2  # how often the Ctrl-C test looks at the run's files


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = builtin_tokenizer()
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    retool.save_model(retool.build_model({**TINY, "vocab_size": len(tok)}, 0), tok, path)
    return path


def start(script, *args, cwd, stderr=subprocess.PIPE):
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=stderr)


def cli(*commands, cwd):
    """Runs (script, args...) commands side by side -> [(exit code, stdout, stderr)]."""
    procs = [start(*c, cwd=cwd) for c in commands]
    outputs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outputs)]


def last_line(text):
    return text.rstrip("\n").split("\n")[-1]


def test_1_a_run_that_trains_nothing_says_so_up_front(ckpt, tmp_path):
    (rc, _, err), = cli(("retool.py", "--stage", "rl", "--model", ckpt, "--out", "rl", "--steps", "1",
                         "--critic-warmup", "1", *RL), cwd=tmp_path)
    lines = err.splitlines()
    assert rc == 0 and lines[0].startswith("rl: ppo from")
    assert lines[1] == "rl: note: --steps 1 <= --critic-warmup 1: only the critic trains, the policy will not change"
    assert last_line(err) == "rl: saved the model in rl (beside metrics.jsonl and checkpoints/)"


def test_2_a_folder_without_tokenizer_or_chat_template_is_one_line_in_every_command(ckpt, tmp_path, capsys):
    bare, plain = tmp_path / "bare", tmp_path / "plain"
    shutil.copytree(ckpt, bare)
    shutil.copytree(ckpt, plain)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / f).unlink()
    (plain / "chat_template.jinja").unlink()
    no_tok = f"{bare}: no tokenizer (tokenizer.json or vocab.json or tokenizer.model)"
    sft, evl = cli(("retool.py", "--stage", "sft", "--model", bare), ("eval.py", "--model", bare), cwd=tmp_path)
    assert sft == (2, "", f"retool.py: error: --model {no_tok}\n")
    assert evl == (2, "", f"eval.py: error: --model {no_tok}\n")
    assert retool.main(["--stage", "rl", "--model", str(plain), "--out", str(tmp_path / "rl")]) == 2
    assert capsys.readouterr().err == (f"retool.py: error: --model {plain}: the tokenizer has no chat template "
                                       "(chat_template.jinja or chat_template.json, or tokenizer_config.json's)\n")
    with pytest.raises(retool.ModelError, match="no tokenizer"):  # never a tokenizer of one id
        retool.load_model(bare)


def test_3_an_unwritable_out_fails_before_any_work(ckpt, tmp_path, capsys):
    Path(tmp_path, "afile").write_text("")
    sft, evl = cli(("retool.py", "--stage", "sft", "--out", "afile/sft"),
                   ("eval.py", "--model", ckpt, "--out", "afile/eval"), cwd=tmp_path)
    assert sft == (2, "", "retool.py: error: --out afile/sft: cannot write (Not a directory)\n")
    assert retool.main(["--stage", "rl", "--model", str(ckpt), "--out", str(tmp_path / "afile/rl")]) == 2
    assert capsys.readouterr().err.endswith("afile/rl: cannot write (Not a directory)\n")
    assert evl == (2, "", "eval.py: error: --out afile/eval: cannot write (Not a directory)\n")  # nothing evaluated


def test_4_saved_files_get_the_usual_umask_permissions(ckpt, tmp_path):
    model, tok = retool.load_model(ckpt)
    old = os.umask(0o027)
    try:
        retool.save_model(model, tok, tmp_path / "model")
        ev._write_atomic(tmp_path / "results.json", lambda tmp: tmp.write_text("{}\n"))
    finally:
        os.umask(old)
    files = [*(tmp_path / "model").iterdir(), tmp_path / "results.json"]
    assert "model.safetensors" in {f.name for f in files}
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o640" for f in files}


def interrupt_when(args, ready, out):
    """Starts retool.py, sends SIGINT (Ctrl-C) once ready(out) holds -> (exit code, stderr). stderr goes to
    a file: the progress bar would fill a pipe nobody reads."""
    with open(out.with_suffix(".err"), "w") as err:
        proc = start("retool.py", *args, "--out", out.name, cwd=out.parent, stderr=err)
        while not ready(out):
            assert proc.poll() is None, out.with_suffix(".err").read_text()[-2000:]
            time.sleep(POLL_S)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    return rc, out.with_suffix(".err").read_text()


def steps_logged(out):
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_5_ctrl_c_says_where_resume_goes_on_its_own_line(ckpt, tmp_path):
    long = ["--stage", "sft", "--model", ckpt, *SFT, "--steps", "100000"]
    rc, err = interrupt_when([*long, "--save-every", "100000"], lambda out: steps_logged(out) >= 1, tmp_path / "a")
    done = steps_logged(tmp_path / "a")
    assert rc == 130 and err.endswith(
        f"\nsft: interrupted after step {done}, before the first checkpoint: there is nothing to resume\n")
    rc, err = interrupt_when([*long, "--save-every", "2"], lambda out: steps_logged(out) >= 3, tmp_path / "b")
    done, at = steps_logged(tmp_path / "b"), int(retool.latest_checkpoint(tmp_path / "b").rsplit("_", 1)[1])
    assert rc == 130 and at >= 2 and err.endswith(
        f"\nsft: interrupted after step {done}; --resume continues from step {at} ({done - at} steps lost)\n")


def test_6_resume_takes_the_runs_flags_from_its_checkpoint(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert retool.sft_main(["--model", str(ckpt), "--out", str(out), *SFT, "--steps", "4", "--stop-after", "2"]) == 0
    saved = json.loads((out / "checkpoints/step_0000002/args.json").read_text())
    assert (saved["n_traces"], saved["steps"], saved["model"]) == (120, 4, str(ckpt))
    (rc, _, err), = cli(("retool.py", "--stage", "sft", "--resume", "--out", "run"), cwd=tmp_path)
    assert rc == 0 and last_line(err) == "sft: saved the model in run (beside metrics.jsonl and checkpoints/)"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert retool.main(["--stage", "sft", "--resume", "--out", str(out), "--steps", "6"]) == 2  # a flag given anew
    assert capsys.readouterr().err.endswith("is from a run of 4 steps, not 6\n")


def test_7_and_9_eval_says_what_it_draws_and_writes_self_describing_outputs(ckpt, tmp_path):
    Path(tmp_path, "two.jsonl").write_text('{"problem": "What is 2 + 3?", "answer": "5"}\n'
                                           '{"problem": "What is 7 * 6?", "answer": "42"}\n')
    (rc, out, err), = cli(("eval.py", "--model", ckpt, "--data", "two.jsonl", "--max-new-tokens", "4", "--no-tools",
                           "--out", "ev"), cwd=tmp_path)
    assert rc == 0 and err.splitlines()[0] == (
        "eval.py: 2 problems x 32 samples = 64 samples per checkpoint (k 32: the paper's protocol for --data; "
        "--k sets it)")
    assert re.search(r"tiny: 100%\|.*\| 64/64", err)  # the bar is named after the model
    assert last_line(out) == ("wrote ev/: results.json (metrics, per-problem answers), results.md (the table), "
                              "samples.jsonl (every sample: problem, gold, answer, text)")
    samples = [json.loads(line) for line in (tmp_path / "ev/samples.jsonl").read_text().splitlines()]
    assert [(s["index"], s["problem"], s["gold"]) for s in samples[31:33]] == [
        (0, "What is 2 + 3?", "5"), (1, "What is 7 * 6?", "42")]


def test_7_the_progress_callback_comes_as_each_sample_finishes(ckpt):
    model, tok = retool.load_model(ckpt)
    finished = []
    trajs = retool.generate(model, tok, [[1, 2, 3], [4, 5], [6]] * 4, max_new_tokens=12, seed=0,
                            on_finish=finished.append)
    assert sorted(finished) == list(range(12))
    lengths = [len(trajs[i].response_ids) for i in finished]  # every row starts together: shortest first
    assert lengths == sorted(lengths) and len(set(lengths)) > 1


def test_8_plot_draws_each_logged_name_and_takes_a_run_folder(tmp_path, capsys):
    sft = [{"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 2, "loss": 1.5, "heldout_loss": 1.7}]
    rl = [{"step": 1, "reward": -0.8, "accuracy": 0.1, "entropy": 0.3, "approx_kl": 1e-3, "ref_kl": 0.0,
           "clip_frac": 0.01, "code_ratio": 0.5}]
    assert ev.plot_panels(sft) == [("loss", ["loss", "heldout_loss"])]
    assert ev.plot_panels(rl) == [("reward", ["reward"]), ("accuracy", ["accuracy"]), ("code ratio", ["code_ratio"]),
                                  ("entropy", ["entropy"]), ("KL", ["approx_kl", "ref_kl"]),
                                  ("clip fraction", ["clip_frac"])]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl))
    (rc, out, err), = cli(("eval.py", "--plot", "run"), cwd=tmp_path)
    try:
        import matplotlib  # noqa: F401  optional: --plot says how to install it
        assert (rc, out) == (0, f"wrote {Path('run/metrics.png')}\n") and (run / "metrics.png").stat().st_size > 1000
    except ImportError:
        assert (rc, err) == (2, "eval.py: error: --plot needs matplotlib: pip install matplotlib\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    assert ev.main(["--plot", str(run)]) == 2
    assert capsys.readouterr().err == f"eval.py: error: {run}/metrics.jsonl:2: not a JSON object\n"


def test_9_readme_explains_every_logged_metric(ckpt, tmp_path):
    assert retool.sft_main(["--model", str(ckpt), "--out", str(tmp_path / "sft"), *SFT, "--steps", "2",
                            "--eval-every", "2"]) == 0
    assert retool.rl_main(["--model", str(ckpt), "--out", str(tmp_path / "rl"), "--steps", "2",
                           "--critic-warmup", "1", *RL]) == 0
    logged = {k for run in ("sft", "rl") for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
              for k in json.loads(line)} - {"step"}
    readme = (REPO / "README.md").read_text()
    listed = set(re.findall(r"^- `(\w+)`", readme.split("## Metrics")[1].split("\n## ")[0], re.M))
    assert logged <= listed, logged - listed
    assert "TensorBoard" in readme


def test_10_pip_install_e_puts_the_modules_on_the_path_and_the_readme_snippet_prints(ckpt, tmp_path):
    src = tmp_path / "src"  # a copy: the editable install writes build metadata beside the sources
    src.mkdir()
    for f in ("pyproject.toml", "retool.py", "sandbox.py", "data.py", "eval.py"):
        shutil.copy(REPO / f, src)
    venv = tmp_path / "venv"
    # the project's own pip and setuptools (no download), torch and the rest seen through the system site
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(src)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    work = tmp_path / "work"
    shutil.copytree(ckpt, work / "out" / "sft")
    snippet = (REPO / "README.md").read_text().split("## Public API")[1].split("```python\n")[1].split("```")[0]
    run = subprocess.run([python, "-c", snippet], cwd=work, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("finish_reason: ") and lines[-1].startswith("saved out/mine: ")
    assert (work / "out" / "mine" / "model.safetensors").is_file()


def test_11_the_same_mistake_gets_the_same_words(ckpt, tmp_path, monkeypatch, capsys):
    (tmp_path / "dir").mkdir()
    sft, evl = cli(("retool.py", "--stage", "sft", "--data", "dir"), ("eval.py", "--data", "dir"), cwd=tmp_path)
    assert sft == (2, "", "retool.py: error: --data dir: a directory, not a file\n")
    assert evl == (2, "", "eval.py: error: --data dir: a directory, not a file\n")
    monkeypatch.chdir(tmp_path)
    assert retool.main(["--stage", "rl", "--model", str(ckpt), "--data", "dir"]) == 2
    assert retool.main(["--stage", "dpo"]) == retool.main(["--stage"]) == 2
    assert capsys.readouterr().err.splitlines() == ["retool.py: error: --data dir: a directory, not a file"] + [
        "retool.py: error: --stage must be sft or rl (python retool.py --stage sft --help)"] * 2


def test_13_help_shows_the_defaults(tmp_path, capsys):
    (rc, rl, _), = cli(("retool.py", "--help", "--stage=rl"), cwd=tmp_path)
    texts = []
    for main, argv in ((retool.main, ["--stage", "sft", "--help"]), (ev.main, ["--help"])):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        texts.append(capsys.readouterr().out)
    assert rc == 0
    flat = [re.sub(r"\s+", " ", text) for text in (texts[0], rl, texts[1])]
    for needle in ("--out OUT final model, metrics.jsonl, checkpoints/ (default: out/sft)",
                   "--save-every SAVE_EVERY steps between checkpoints (default: 500)",
                   "--n-traces N_TRACES built-in traces to generate (default: 20000)", "--batch BATCH packed rows"):
        assert needle in flat[0]
    assert "(default: out/rl)" in flat[1] and "--kl-coef KL_COEF k3 KL penalty" in flat[1]
    assert "(default: 0.0)" in flat[1] and "(default: None)" not in flat[0] + flat[1] + flat[2]
    assert "--top-p TOP_P nucleus sampling (the paper's) (default: 0.7)" in flat[2]
