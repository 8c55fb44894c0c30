import contextlib
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

import data  # noqa: E402
from data import (DataError, Problem, builtin_problems, builtin_sft_traces,  # noqa: E402
                  builtin_tokenizer, encode_interpreter, interpreter_block, load_eval, load_rl,
                  load_sft, read_rows, render_prompt, tokenize_trace)

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
CODE_RE = re.compile(r"<code>\n```python\n(.*?)\n```\n</code>", re.S)


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def msg(role, content, **kw):
    return {"role": role, "content": content, **kw}


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def error(fn, *args) -> str:
    with pytest.raises(DataError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def run_py(code: str) -> str:
    """What the code prints, run in-process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<code>", "exec"), {})
    return out.getvalue()


# ----------------------------------------------------------------------------- readers

def test_sft_inline_and_split_forms(tmp_path):
    inline = ("Let me compute.\n<code>\n```python\nprint(6 * 7)\n```\n</code>\n<interpreter>\n42\n"
              "</interpreter>\nSo \\boxed{42}")
    split = [msg("user", "What is 6 * 7?"),
             msg("assistant", "Let me compute.\n<code>\n```python\nprint(6 * 7)\n```\n</code>"),
             msg("tool", "42\n"),
             msg("assistant", "So \\boxed{42}")]
    path = write(tmp_path / "sft.jsonl", [
        {"messages": [msg("user", "What is 6 * 7?"), msg("assistant", inline)]},
        {"messages": split},
        {"messages": [msg("system", "Be brief.")] + split[:2]}])
    rows = load_sft(path)
    assert rows[0] == [msg("user", "What is 6 * 7?"), msg("assistant", inline)]
    assert rows[1] == rows[0]  # the split form becomes the inline form
    assert rows[2][0]["content"] == "Be brief.\n\nWhat is 6 * 7?"
    assert read_rows(path)[1]["messages"] == split


def test_rl_and_eval_rows(tmp_path):
    dapo = {"prompt": [msg("user", "Find x.")], "reward_model": {"ground_truth": "12"}, "data_source": "math"}
    path = write(tmp_path / "rl.jsonl", [dapo, {"problem": "P2", "answer": 7}, dapo,
                                         {"question": "P3", "answer": "1/2"}])
    assert load_rl(path) == [Problem("Find x.", "12"), Problem("P2", "7"), Problem("P3", "1/2")]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"input": "P1", "output": "45"}, {"question": "P2", "answer": 0},
                                {"problem": "P3", "answer": "3"}]))
    assert load_eval(path) == [Problem("P1", "45"), Problem("P2", "0"), Problem("P3", "3")]


def test_public_dataset_shapes(tmp_path):
    # DAPO-Math-17k wraps its problems in its own instruction; ReTool-SFT's user turn too; verl
    # converts ReTool-SFT to OpenAI-style tool calls. All read back to the bare problem and the
    # inline trace.
    dapo = ("Solve the following math problem step by step. The last line of your response should be "
            "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
            "Find $x$ if $2x = 6$.\n\nRemember to put your answer on its own line after \"Answer:\".")
    path = write(tmp_path / "dapo.jsonl", [{"prompt": [msg("user", dapo)],
                                            "reward_model": {"ground_truth": "3", "style": "rule"}}])
    assert load_rl(path) == [Problem("Find $x$ if $2x = 6$.", "3")]
    retool_user = ("Solve step by step. You may write code...\n\n*user question:*\n"
                   "Find $x$ if $2x = 6$.\n\nRemember to place the final answer in the last part using "
                   "the format: \n<answer>\n\\boxed{'The final answer goes here.'}\n</answer>")
    inline = ("Solve it.\n<code>\n```python\nprint(6 // 2)\n```\n</code>\n<interpreter>\n3\n"
              "</interpreter>\n<answer>\n\\boxed{3}\n</answer>")
    args = {"code": "print(6 // 2)"}
    call = {"type": "function", "function": {"name": "code_interpreter", "arguments": args}}
    verl = [msg("user", "Find $x$ if $2x = 6$."), msg("assistant", "Solve it.", tool_calls=[call]),
            msg("tool", "3"), msg("assistant", "<answer>\n\\boxed{3}\n</answer>")]
    string_args = {"function": {"arguments": json.dumps(args)}}  # arguments as a JSON string
    path = write(tmp_path / "sft.jsonl", [
        {"messages": [msg("user", retool_user), msg("assistant", inline)]},
        {"messages": verl},
        {"messages": [verl[0], {**verl[1], "tool_calls": [string_args]}] + verl[2:]}])
    want = [msg("user", "Find $x$ if $2x = 6$."), msg("assistant", inline)]
    assert load_sft(path) == [want] * 3
    write(path, [{"messages": [verl[0], {**verl[1], "tool_calls": [{"function": {"arguments": {}}}]}]}])
    assert error(load_sft, path) == f"{path}:1: message 2: a tool call without a 'code' argument"


def test_capitalised_aime_fields(tmp_path):
    # the common AIME 2024 files: {"ID": ..., "Problem": ..., "Answer": ...}
    path = write(tmp_path / "aime.jsonl", [{"ID": "2024-I-1", "Problem": "P1", "Answer": 204},
                                           {"Question": "P2", "OUTPUT": "7"}])
    assert load_eval(path) == [Problem("P1", "204"), Problem("P2", "7")]


# ../shared lies beside every clone in CI: there (CI=true) a missing one fails this test, never skips it
@pytest.mark.skipif(not (SHARED / "AIME24.jsonl").is_file() and not os.environ.get("CI"),
                    reason="no ../shared/data beside this clone")
def test_real_aime_files():
    for name in ("AIME24.jsonl", "AIME25.jsonl"):
        problems = load_eval(SHARED / name)
        assert len(problems) == 30
        assert all(len(p.problem) > 50 and 0 <= int(p.answer) <= 999 for p in problems)
    assert load_eval(SHARED / "AIME24.jsonl")[0].answer == "45"


def test_error_messages(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b" "answer": 2}\n')
    assert error(load_eval, bad).startswith(f"{bad}:3: invalid JSON")
    write(bad, [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    assert error(load_eval, bad) == (f"{bad}:2: missing field 'answer' "
                                     "(also accepted: 'output', 'reward_model.ground_truth')")
    write(bad, [{"answer": "1"}])
    assert error(load_rl, bad).startswith(f"{bad}:1: missing field 'problem'")
    write(bad, [[1, 2]])
    assert error(read_rows, bad) == f"{bad}:1: expected a JSON object, got list"
    write(bad, [{"problem": "a", "answer": []}])
    assert error(load_eval, bad) == f"{bad}:1: field 'answer' must be a string or a number, got an empty list"
    write(bad, [{"prompt": [], "answer": "1"}])
    assert error(load_rl, bad) == f"{bad}:1: field 'prompt' must be a string or a number, got an empty list"
    write(bad, [{"problem": "a", "answer": True}])
    assert error(load_rl, bad) == f"{bad}:1: field 'answer' must be a string or a number, got bool"
    columns = tmp_path / "columns.json"  # column-shaped, as some exports write it: not one row
    columns.write_text(json.dumps({"problem": ["q1", "q2"], "answer": ["1", "2"]}))
    assert error(load_eval, columns) == f"{columns}:1: field 'problem' must be a string or a number, got list"
    bad.write_text("\n\n")
    assert error(read_rows, bad) == f"{bad}: empty file"
    csv = tmp_path / "x.csv"
    assert error(read_rows, csv) == f"{csv}: unknown extension '.csv' (expected .jsonl, .json or .parquet)"
    assert error(read_rows, tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"
    bad = tmp_path / "x.json"
    bad.write_text('[{"a": 1},\n{"a": }]')
    assert error(read_rows, bad).startswith(f"{bad}:2: invalid JSON")
    sft = write(tmp_path / "sft.jsonl", [{"messages": [msg("user", "q"), msg("assistant", "a")]}, {"text": "hi"}])
    assert error(load_sft, sft) == f"{sft}:2: missing field 'messages'"
    write(sft, [{"messages": [msg("user", "q"), msg("robot", "a")]}])
    assert error(load_sft, sft) == f"{sft}:1: message 2 has unknown role 'robot'"
    write(sft, [{"messages": [msg("user", "q"), msg("assistant", None)]}])
    assert error(load_sft, sft) == f"{sft}:1: message 2 has no 'content' string"
    write(sft, [{"messages": [msg("user", "q"), msg("assistant", "a"), msg("user", "q2")]}])
    assert error(load_sft, sft) == f"{sft}:1: message 3: multi-turn conversations are not supported"
    write(sft, [{"messages": [msg("user", "q")]}])
    assert error(load_sft, sft) == f"{sft}:1: needs a user message and an assistant message"


def test_parquet(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    if importlib.util.find_spec("pyarrow"):  # installed: a real round trip
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist([{"problem": "P", "answer": "1"}]), path)
        assert load_eval(path) == [Problem("P", "1")]
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # not installed: a clear message
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert error(read_rows, path) == f"{path}: reading .parquet needs pyarrow (pip install pyarrow)"


# ----------------------------------------------------------------------------- prompts and traces

def test_render_prompt(tok):
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for tools, instruction in (True, data.TOOL_INSTRUCTION), (False, data.TEXT_INSTRUCTION), (None, ""):
        ids = render_prompt(tok, "What is 2 * 3?", tools)
        assert ids[-len(header):] == header
        content = f"{instruction}\n\nWhat is 2 * 3?" if instruction else "What is 2 * 3?"
        assert tok.decode(ids) == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def engine_ids(tok, problem, pieces):
    """Ids as the engine builds them: prompt, then sampled segments and injected feedbacks."""
    ids, mask = render_prompt(tok, problem), []
    mask = [0] * len(ids)
    for kind, text in pieces:
        new = tok.encode(text, add_special_tokens=False) if kind == "model" else encode_interpreter(tok, text)
        ids += new
        mask += [int(kind == "model")] * len(new)
    return ids + [tok.eos_token_id], mask + [1]


def test_tokenize_trace_matches_engine(tok):
    pieces = [("model", "<code>\n```python\nprint(sum(str(7 ** 12)))\n```\n</code>"),
              ("tool", "TypeError: unsupported operand type(s) for +: 'int' and 'str'"),
              ("model", "<code>\n```python\nprint(sum(map(int, str(7 ** 12))))\n```\n</code>"),
              ("tool", "\n  45\n\n"),  # leading whitespace kept, trailing newlines dropped
              ("model", "The digit sum is \\boxed{45}")]
    want = engine_ids(tok, "Digit sum of 7^12?", pieces)
    inline = "".join(interpreter_block(t) if k == "tool" else t for k, t in pieces)
    split = [msg("user", "Digit sum of 7^12?")]
    split += [msg("assistant" if k == "model" else "tool", t) for k, t in pieces]
    assert tokenize_trace(tok, [split[0], msg("assistant", inline)]) == want
    assert tokenize_trace(tok, split) == want
    # loose whitespace around the interpreter block is re-rendered canonically
    loose = inline.replace("</code>\n<interpreter>", "</code>  \n\n<interpreter>")
    loose = loose.replace("</interpreter>\n", "</interpreter>")
    assert loose != inline and tokenize_trace(tok, [split[0], msg("assistant", loose)]) == want
    ids, mask = want
    blocks = [tok.decode(ids[i:j]) for i, j in spans(mask, 0)][1:]  # after the prompt
    assert blocks == [interpreter_block(pieces[1][1]), interpreter_block(pieces[3][1])]


def spans(mask, value):
    """[start, end) runs of `value` in mask."""
    out, start = [], None
    for i, m in enumerate(mask + [1 - value]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            out.append((start, i))
            start = None
    return out


def test_builtin_traces_tokenize_back_to_their_text(tok):
    for msgs in builtin_sft_traces(200, seed=3):
        ids, mask = tokenize_trace(tok, msgs)
        prompt = render_prompt(tok, msgs[0]["content"])
        assert ids[:len(prompt)] == prompt and mask[:len(prompt)] == [0] * len(prompt)
        assert tok.decode(ids[len(prompt):]) == msgs[1]["content"] + "<|im_end|>"
        masked = [tok.decode(ids[i:j]) for i, j in spans(mask, 0)[1:]]
        outputs = re.findall(r"<interpreter>\n(.*?)\n</interpreter>", msgs[1]["content"], re.S)
        assert masked == [interpreter_block(f) for f in outputs]


# ----------------------------------------------------------------------------- built-in task

def test_builtin_problems_splits_and_determinism():
    train, test = builtin_problems("train", 3000), builtin_problems("test", 600)
    assert builtin_problems("test", 600) == test and builtin_problems("test", 600, seed=1) != test
    assert not {p.problem for p in train} & {p.problem for p in test}
    assert len({p.problem for p in test}) == 600
    assert not {p.problem for p in test} & {m[0]["content"] for m in builtin_sft_traces(3000, seed=5)}
    assert set(Counter(p.kind for p in test)) == set(data.KINDS)
    assert set(Counter(p.level for p in test)) == {1, 2, 3}
    with pytest.raises(ValueError):
        builtin_problems("dev", 1)


def test_builtin_answers_are_what_the_code_prints():
    traces = builtin_sft_traces(400, seed=0, code_share=1.0, fix_share=0.0)
    problems = builtin_problems("train", 400)
    assert len({p.kind for p in problems}) == len(data.KINDS)
    for p, msgs in zip(problems, traces):
        assert msgs[0]["content"] == p.problem
        (code,) = CODE_RE.findall(msgs[1]["content"])
        assert run_py(code) == p.answer + "\n"  # an independent algorithm from the generator's
        assert msgs[1]["content"].endswith(interpreter_block(p.answer) + f"\\boxed{{{p.answer}}}")


def test_builtin_sft_traces_mix():
    traces = builtin_sft_traces(2000, seed=0)
    assert builtin_sft_traces(2000, seed=0) == traces
    texts = [m[1]["content"] for m in traces]
    code = [t for t in texts if t.startswith("<code>")]
    fixes = [t for t in code if t.count("<code>") == 2]
    assert 0.55 < len(code) / len(texts) < 0.65 and 0.1 < len(fixes) / len(code) < 0.2
    for t, p in zip(texts, builtin_problems("train", 2000)):
        assert t.endswith(f"\\boxed{{{p.answer}}}")
        assert t.startswith("<code>") or t == f"The answer is \\boxed{{{p.answer}}}"
    # a failing first block shows exactly the last line Python itself prints for it
    seen = {}
    for t in fixes:
        first = CODE_RE.findall(t)[0]
        err = re.search(r"<interpreter>\n(.*?)\n</interpreter>", t).group(1)
        seen.setdefault(err.split(":")[0], (first, err))
    assert set(seen) == {"NameError", "TypeError", "SyntaxError"}
    for first, err in seen.values():
        proc = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True)
        assert proc.stderr.strip().splitlines()[-1] == err


# ----------------------------------------------------------------------------- built-in tokenizer

def test_tokenizer_basics(tok):
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id and 300 < len(tok) <= 1024
    for t in data.TAG_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    s = "<code>\n```python\nprint(1)\n```\n</code>"
    assert tok.decode(tok.encode(s), skip_special_tokens=True) == s  # tags are not special
    assert len(tok.encode("9876543210", add_special_tokens=False)) == 10
    assert all(len(t) == 1 for t in tok.get_vocab() if any(c.isdigit() for c in t))
    assert tok.encode("", add_special_tokens=False) == []


def test_tokenizer_round_trip(tok):
    rng = random.Random(0)
    texts = ["".join(rng.choices(string.printable, k=rng.randint(0, 60))) for _ in range(300)]
    texts += ["héllo wörld ∑ 漢字 🙂", "  leading and trailing  ", "\\boxed{\\frac{1}{2}}", "\n\n\n  \t"]
    texts += data._corpus()
    for s in texts:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_tokenizer_save_load_and_determinism(tok, tmp_path):
    from transformers import AutoTokenizer
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [m[1]["content"] for m in builtin_sft_traces(50, seed=9)] + ["any text ~ 123 é"]
    assert [loaded.encode(s) for s in texts] == [tok.encode(s) for s in texts]
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id
    msgs = builtin_sft_traces(5, seed=9)
    assert [tokenize_trace(loaded, m) for m in msgs] == [tokenize_trace(tok, m) for m in msgs]
    # the same tokenizer in a fresh process with another hash seed
    digest = hashlib.sha256(data._tokenizer_json().encode()).hexdigest()
    code = "import data, hashlib; print(hashlib.sha256(data._tokenizer_json().encode()).hexdigest())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(data.__file__).parent, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert proc.stdout.strip() == digest
