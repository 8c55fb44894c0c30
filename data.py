"""Data for retool: file readers, prompts, trace tokenization, the samples page, and the built-in
task + tokenizer.

The trace format is the ReTool one: the model writes `<code>\n```python\n...\n```\n</code>`, the
engine appends `interpreter_block(feedback)` as token ids, the model goes on and ends with
`\\boxed{answer}` and EOS. `tokenize_trace` rebuilds exactly that id stream for SFT.
"""
import hashlib
import html
import json
import logging
import math
import random
import re
import signal
import threading
import traceback
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache, partial
from pathlib import Path

import math_verify

# ----------------------------------------------------------------------------- config

TOOL_INSTRUCTION = (
    "Solve the problem below. You may run Python: write a complete script as "
    "<code>\n```python\n...\n```\n</code> and what it prints comes back as "
    "<interpreter>\n...\n</interpreter>. Every script runs on its own, so repeat the imports "
    "and definitions it needs. Put the final answer in \\boxed{}."
)
TEXT_INSTRUCTION = (
    "Solve the problem below by reasoning step by step, without running code. "
    "Put the final answer in \\boxed{}."
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, turn start, eos
TAG_TOKENS = ["<code>", "</code>", "<interpreter>", "</interpreter>", "```python"]
CHAT_TEMPLATE = (  # Qwen-style, without the default system message
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOL_ROLES = ("tool", "ipython", "function")  # split-form interpreter outputs
# Instructions that public datasets wrap around the bare problem (DAPO-Math-17k prompts, the
# ReTool-SFT user turn). Readers cut them off, so that ours is the only instruction the model
# sees, the same in SFT, RL and evaluation.
WRAPPERS = [
    re.compile(r"Solve the following math problem step by step\..*?\n\n(.*?)\s*"
               r"(?:Remember to put your answer on its own line after \"Answer:\".*)?", re.S),
    re.compile(r".*?\*user question:\*\s*(?:Answer the following Math Problem and put the answer in the "
               r"format of \\boxed\{\{?answer\}\}?\s*)?(.*?)\s*(?:Remember to place the final answer.*)?", re.S),
]
QUERY = "{query}"  # where --prompt-template puts the bare problem
# one interpreter block inside assistant text; whitespace around it is re-rendered canonically
INTERPRETER_RE = re.compile(r"\s*<interpreter>\n?(.*?)</interpreter>[ \t]*\n?", re.S)
OFFICIAL_INTERPRETER_RE = re.compile(r"\s*<interpreter>\n?(.*?)</interpreter>[ \t]*\n{0,2}", re.S)


class DataError(Exception):
    """Bad user data; the message is one line naming the file and the row."""


@dataclass
class Problem:
    problem: str
    answer: str
    kind: str = ""
    level: int = 0


# ----------------------------------------------------------------------------- readers

def _rows(path) -> list[tuple[str, dict]]:
    """(where, row) pairs; `where` is 'path:N' with N the 1-based line (.jsonl) or row number."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{path}: unknown extension '{ext}' (expected .jsonl, .json or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        try:
            rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
        except Exception as e:
            raise DataError(f"{path}: invalid parquet ({str(e).splitlines()[0]})") from None
    elif ext == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise DataError(f"{path}{where}: invalid JSON ({str(e).splitlines()[0]})") from None
        if isinstance(data, dict):  # a single row
            data = [data]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        rows = list(enumerate(data, 1))
    else:
        rows = []
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    if not rows:
        raise DataError(f"{path}: empty file")
    for n, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    return [(f"{path}:{n}", row) for n, row in rows]


def read_rows(path) -> list[dict]:
    return [row for _, row in _rows(path)]


def _key(d, key):
    """d[key], else the value of a key equal to it up to case (AIME files: `Problem`, `Answer`)."""
    if not isinstance(d, dict):
        return None
    return d[key] if key in d else next((v for k, v in d.items() if str(k).lower() == key), None)


def _get(row: dict, names: tuple[str, ...], where: str) -> str:
    """First present, non-empty field among `names` (dotted names reach into dicts), as a string;
    only strings and numbers count (a column-shaped file or a list answer is an error)."""
    for name in names:
        value = row
        for key in name.split("."):
            value = _key(value, key)
        if isinstance(value, list) and value and isinstance(value[-1], dict):  # chat-form prompt
            value = value[-1].get("content")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            got = "an empty list" if value == [] else type(value).__name__
            raise DataError(f"{where}: field '{name}' must be a string or a number, got {got}")
        if value is not None and str(value).strip():
            return str(value)
    also = ", ".join(f"'{n}'" for n in names[1:])
    raise DataError(f"{where}: missing field '{names[0]}'" + (f" (also accepted: {also})" if also else ""))


def _bare_problem(text: str) -> str:
    for pattern in WRAPPERS:
        if match := pattern.fullmatch(text.strip()):
            return match.group(1)
    return text


def _problem(row: dict, where: str) -> Problem:
    # one reader for DAPO rows (prompt + reward_model.ground_truth), flat rows and AIME-style rows
    return Problem(_bare_problem(_get(row, ("problem", "question", "input", "prompt"), where)),
                   _get(row, ("answer", "output", "reward_model.ground_truth"), where))


def load_eval(path) -> list[Problem]:
    """Evaluation rows: `problem` | `question` | `input` with `answer` | `output` (AIME files)."""
    return [_problem(row, where) for where, row in _rows(path)]


def load_rl(path) -> list[Problem]:
    """RL prompts: DAPO rows (`prompt` chat list + `reward_model.ground_truth`) or flat rows.
    Repeated rows are dropped (the original DAPO-Math-17k file repeats its problems many times)."""
    problems = {}
    for p in load_eval(path):
        problems.setdefault((p.problem, p.answer), p)
    return list(problems.values())


def _prompt_and_response(messages, where: str = "messages") -> tuple[str, str]:
    """(user text, assistant text) of one conversation; `tool` messages become interpreter blocks
    and a system message is folded into the user text (prompts here are a single user turn)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    prompt, response = [], []
    for i, m in enumerate(messages, 1):
        m = m if isinstance(m, dict) else {}
        role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls") or []
        content = "" if content is None and calls else content
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} has no 'content' string")
        if role in ("system", "user"):
            if response:
                raise DataError(f"{where}: message {i}: multi-turn conversations are not supported")
            prompt.append(content)
        elif role == "assistant":
            response.append(content)
            for call in calls:  # OpenAI-style tool calls (verl's ReTool-SFT conversion): back to <code>
                try:
                    args = call["function"]["arguments"]
                    code = (json.loads(args) if isinstance(args, str) else args)["code"]
                except (KeyError, TypeError, ValueError):
                    raise DataError(f"{where}: message {i}: a tool call without a 'code' argument") from None
                sep = "\n" if content and not content.endswith("\n") else ""
                response.append(sep + code_block(code))
        elif role in TOOL_ROLES:
            response.append(interpreter_block(content))
        else:
            raise DataError(f"{where}: message {i} has unknown role {role!r}")
    if not prompt or not response:
        raise DataError(f"{where}: needs a user message and an assistant message")
    return _bare_problem("\n\n".join(prompt)), "".join(response)


def load_sft(path) -> list[list[dict]]:
    """Conversations as [user, assistant] with interpreter outputs inline in the assistant text."""
    out = []
    for where, row in _rows(path):
        if "messages" not in row:
            raise DataError(f"{where}: missing field 'messages'")
        user, text = _prompt_and_response(row["messages"], where)
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": text}])
    return out


# ----------------------------------------------------------------------------- prompts and traces

def load_template(spec: str) -> str:
    """--prompt-template: a text file with {query}, or a JSON file of one string value, or
    FILE.json:KEY (the official prompt_template.json: key `retool`, applied with str.format)."""
    path, key = spec.rsplit(":", 1) if re.search(r"\.json:[^/\\]+$", spec, re.I) else (spec, None)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--prompt-template {path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"--prompt-template {path}: invalid JSON ({e.msg})") from None
        strings = {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
        if key is None and len(strings) != 1:
            raise DataError(f"--prompt-template {path}: {len(strings)} string values, name one as "
                            f"{path}:KEY (keys: {', '.join(strings) or 'none'})")
        if key is not None and key not in strings:
            raise DataError(f"--prompt-template {path}: no string value '{key}' (keys: {', '.join(strings)})")
        text = strings[key] if key else next(iter(strings.values()))
    try:
        has_query = "\0" in text.format(query="\0")
    except (KeyError, IndexError, ValueError) as e:  # other fields, or a lone brace
        raise DataError(f"--prompt-template {spec}: not a str.format template with only {QUERY} ({e!r})") from None
    if not has_query:
        raise DataError(f"--prompt-template {spec}: no {QUERY} in the template")
    return text


def render_prompt(tokenizer, problem: str, tools=True, template=None) -> list[int]:
    """Prompt ids ending with the assistant header, through the tokenizer's own chat template (Qwen2.5
    adds its default system turn). With a template (load_template) the user turn is the template
    applied to the problem; else our instruction and the problem. tools=None: the problem as is."""
    instruction = {True: TOOL_INSTRUCTION, False: TEXT_INSTRUCTION, None: None}[tools]
    content = problem if instruction is None else f"{instruction}\n\n{problem}"
    content = content if template is None else template.format(query=problem)
    return list(tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def interpreter_block(feedback: str, official=False) -> str:
    """What follows the model's </code>. official: the official ReTool harness's bytes (after
    `</code>`: "\n<interpreter>\n" + output + "</interpreter>\n\n", output ending in a newline)."""
    return "\n<interpreter>\n" + feedback.rstrip("\n") + "\n</interpreter>\n" + ("\n" if official else "")


def code_block(code: str) -> str:
    return f"<code>\n```python\n{code}\n```\n</code>"


def encode_interpreter(tokenizer, feedback: str, official=False) -> list[int]:
    # tokenized alone, so its ids never merge with the model's text around it
    return tokenizer.encode(interpreter_block(feedback, official), add_special_tokens=False)


def tokenize_trace(tokenizer, messages, tools=True, template=None) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a conversation, built the way the engine builds it: prompt ids, then
    model-text segments and interpreter blocks each tokenized alone, then EOS. Mask is 0 on the
    prompt and interpreter ids, 1 on the model's own ids and the final EOS. A template (load_template)
    also means the official interpreter block."""
    user, text = _prompt_and_response(messages)
    ids = render_prompt(tokenizer, user, tools, template)
    mask = [0] * len(ids)

    def add(new, m):
        ids.extend(new)
        mask.extend([m] * len(new))

    pos = 0
    for match in (INTERPRETER_RE if template is None else OFFICIAL_INTERPRETER_RE).finditer(text):
        add(tokenizer.encode(text[pos:match.start()], add_special_tokens=False), 1)
        add(encode_interpreter(tokenizer, match.group(1), template is not None), 0)
        pos = match.end()
    add(tokenizer.encode(text[pos:], add_special_tokens=False) + [tokenizer.eos_token_id], 1)
    return ids, mask


# ----------------------------------------------------------------------------- samples.html
# What the model wrote, what ran, what came back. The caller decodes a trajectory into loss-mask
# runs (retool.sample_view); this part needs only strings, so eval.py and retool.py share it.

CODE_SPAN_RE = re.compile(r"(<code>.*?(?:</code>|$))", re.S)  # captured: re.split keeps the spans
SAMPLES_CSS = """body { font-family: sans-serif; max-width: 62em; margin: 2em auto; color: #222; }
.sample { border: 1px solid #ccc; border-radius: 6px; margin: 1.5em 0; padding: 0 1em; }
h2 { font-size: 1em; } h2.right { color: #176b2c; } h2.wrong { color: #a61b1b; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.9em; line-height: 1.4; }
.prompt { color: #777; border-bottom: 1px dashed #ccc; padding-bottom: 0.8em; }
.model { color: #222; }
.code { background: #e6efff; color: #0b3d91; font-weight: bold; }
.interp { background: #fff1d6; color: #6b4400; font-style: italic; }"""
SAMPLES_LEGEND = ('<p><span class="model">the model\'s text</span> &middot; <span class="code">the code it ran</span>'
                  ' &middot; <span class="interp">the interpreter\'s output (injected, not trained on)</span></p>')


@dataclass
class Sample:
    """One trajectory as a person reads it (samples.html, the terminal)."""
    title: str  # which one, its reward or correctness, its finish reason
    right: bool
    prompt: str
    spans: list  # [(kind, text)], kind "model", "code" or "interp"; the texts join to the response


def response_spans(runs) -> list:
    """[(sampled?, text)] runs of one loss-mask value -> [(kind, text)]: an injected run is "interp";
    a sampled one is "model" text around "code" spans (<code>...</code>, tags included). A span never
    crosses runs: the engine injects right after </code>."""
    spans = []
    for sampled, text in runs:
        if not sampled:
            spans.append(("interp", text))
            continue
        for i, part in enumerate(CODE_SPAN_RE.split(text)):  # odd parts are the code spans
            if part:
                spans.append(("code" if i % 2 else "model", part))
    return spans


def samples_html(samples, title) -> str:
    """A static page of Samples: inline CSS, no script, nothing fetched; every text escaped."""
    esc = html.escape
    cards = [f'<div class="sample"><h2 class="{"right" if s.right else "wrong"}">{esc(s.title)}</h2>'
             f'<pre class="prompt">{esc(s.prompt)}</pre><pre class="response">'
             + "".join(f'<span class="{kind}">{esc(text)}</span>' for kind, text in s.spans) + "</pre></div>"
             for s in samples]
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>\n'
            f"<style>\n{SAMPLES_CSS}\n</style></head>\n<body><h1>{esc(title)}</h1>{SAMPLES_LEGEND}\n"
            + "\n".join(cards) + "\n</body></html>\n")


def sample_text(s: Sample) -> str:
    """A Sample in plain text for the terminal: a header line, the prompt, the response (its code and
    the interpreter's output stand between their own tags)."""
    rule = "-" * 20
    return f"{rule} {s.title} {rule}\n{s.prompt}{''.join(text for _, text in s.spans)}\n{rule}"


# ----------------------------------------------------------------------------- built-in task
# Problems a tiny model cannot do in its head but solves by copying the operands into one line of
# Python. Each generator returns (problem text, working code, exact integer answer); `level` 1-3
# scales the operands.

def _n(rng, digits):
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


@lru_cache(maxsize=1)
def _prime_flags(limit=20_000):
    flags = bytearray([1]) * (limit + 1)
    flags[0] = flags[1] = 0
    for p in range(2, math.isqrt(limit) + 1):
        if flags[p]:
            flags[p * p::p] = bytes(len(range(p * p, limit + 1, p)))
    return flags


def _mul(rng, level):
    a, b = _n(rng, (2, 4, 6)[level - 1]), _n(rng, (2, 3, 5)[level - 1])
    return f"What is {a} * {b}?", f"print({a} * {b})", a * b


def _add(rng, level):
    xs = [_n(rng, (3, 4, 6)[level - 1]) for _ in range((2, 3, 3)[level - 1])]
    expr = " + ".join(map(str, xs))
    return f"What is {expr}?", f"print({expr})", sum(xs)


def _powmod(rng, level):
    a, b, m = [_n(rng, d) for d in ((1, 2, 2), (2, 3, 3), (4, 4, 4))[level - 1]]
    return f"What is {a}^{b} mod {m}?", f"print(pow({a}, {b}, {m}))", pow(a, b, m)


def _digitsum(rng, level):
    a, b = rng.randint(2, (9, 30, 99)[level - 1]), rng.randint(5, (15, 60, 200)[level - 1])
    code = f"print(sum(map(int, str({a} ** {b}))))"
    return f"What is the digit sum of {a}^{b}?", code, sum(map(int, str(a ** b)))


def _primes(rng, level):
    lo = rng.randint(2, (50, 1000, 10_000)[level - 1])
    hi = lo + rng.randint(*((10, 50), (50, 500), (500, 2000))[level - 1])
    code = f"print(sum(all(n % d for d in range(2, n)) for n in range({lo}, {hi} + 1)))"
    return f"How many primes are between {lo} and {hi}?", code, sum(_prime_flags()[lo:hi + 1])


def _divisors(rng, level):
    n = rng.randint(12, (100, 10_000, 1_000_000)[level - 1])
    code = f"n = {n}\nprint(sum(n % d == 0 for d in range(1, n + 1)))"
    count = sum(2 - (d * d == n) for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return f"How many divisors does {n} have?", code, count


def _gcd_lcm(rng, level, name):  # name: "gcd" or "lcm"
    # a shared factor, so that the answer is not almost always 1 (gcd) or the product (lcm)
    g = _n(rng, level)
    xs = [g * rng.randint(2, (9, 99, 999)[level - 1]) for _ in range((2, 3, 3)[level - 1])]
    args = ", ".join(map(str, xs))
    code = f"from math import {name}\nprint({name}({args}))"
    return f"What is {name}({args})?", code, getattr(math, name)(*xs)


def _comb(rng, level):
    n = rng.randint(5, (20, 40, 100)[level - 1])
    k = rng.randint(2, n - 2)
    return f"What is {n} choose {k}?", f"from math import comb\nprint(comb({n}, {k}))", math.comb(n, k)


KINDS = {"mul": _mul, "add": _add, "powmod": _powmod, "digitsum": _digitsum, "primes": _primes,
         "divisors": _divisors, "gcd": partial(_gcd_lcm, name="gcd"), "lcm": partial(_gcd_lcm, name="lcm"),
         "comb": _comb}
LEVELS = (1, 2, 3)
TEST_SHARE = 0.2  # of the problem space, by hash of the problem text


def _split(text: str) -> str:
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return "test" if h / 2 ** 64 < TEST_SHARE else "train"


def _builtin(split: str, n: int, seed: int):
    """n distinct (Problem, code) pairs of one split; kinds and levels drawn uniformly."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng, seen, out = random.Random(f"retool-{seed}"), set(), []
    while len(out) < n:
        kind, level = rng.choice(sorted(KINDS)), rng.choice(LEVELS)
        text, code, answer = KINDS[kind](rng, level)
        if text not in seen and _split(text) == split:  # the test split owns its problems
            seen.add(text)
            out.append((Problem(text, str(answer), kind, level), code))
    return out


def builtin_problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    return [p for p, _ in _builtin(split, n, seed)]


def _broken(code: str) -> str:
    """A first attempt with a typical slip: a missing import, a wrong type, a missing ')'."""
    if code.startswith("from "):
        return code.split("\n", 1)[1]
    if "map(int, " in code:
        return code.replace("map(int, ", "").replace(")))", "))", 1)
    return code[:-1]


def _run_error(code: str) -> str:
    """The last traceback line Python prints for code that fails (computed here, no sandbox)."""
    try:
        exec(compile(code, "<code>", "exec"), {})
    except Exception as e:
        return traceback.format_exception(e)[-1].strip()
    raise AssertionError(f"expected an error from {code!r}")


def builtin_sft_traces(n: int, seed: int = 0, code_share: float = 0.6,
                       fix_share: float = 0.15) -> list[list[dict]]:
    """Cold-start SFT conversations on train problems. A share `code_share` solve with code (of
    those, `fix_share` first run a broken script, read the error and fix it); the rest state the
    answer in text. The first assistant token already tells code (`<code>`) from text."""
    rng = random.Random(f"retool-sft-{seed}")
    out = []
    for p, code in _builtin("train", n, seed):
        if rng.random() < code_share:
            text = code_block(code) + interpreter_block(p.answer) + f"\\boxed{{{p.answer}}}"
            if rng.random() < fix_share:
                bad = _broken(code)
                text = code_block(bad) + interpreter_block(_run_error(bad)) + text
        else:
            text = f"The answer is \\boxed{{{p.answer}}}"
        out.append([{"role": "user", "content": p.problem}, {"role": "assistant", "content": text}])
    return out


# ----------------------------------------------------------------------------- built-in tokenizer

def _corpus() -> list[str]:
    """The strings tokenize_trace encodes one by one for built-in traces (prompts rendered with
    both instructions, model segments, interpreter blocks), so merges fit what the model sees."""
    out = []
    for i, (user, reply) in enumerate(builtin_sft_traces(1500, seed=12345, code_share=0.7,
                                                         fix_share=0.3)):
        instruction = TOOL_INSTRUCTION if i % 4 else TEXT_INSTRUCTION
        out.append(f"<|im_start|>user\n{instruction}\n\n{user['content']}<|im_end|>\n"
                   "<|im_start|>assistant\n")
        text, pos = reply["content"], 0
        for m in INTERPRETER_RE.finditer(text):
            out += [text[pos:m.start()], interpreter_block(m.group(1))]
            pos = m.end()
        out.append(text[pos:] + "<|im_end|>")
    return out


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    # Digits stay single tokens (the model copies operands digit by digit); everything else is
    # byte-level, so any text round-trips, and BPE may merge across spaces: the fixed instruction
    # and code templates become a handful of tokens, which makes the tiny model's job short.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # the tags are plain (not special) tokens: decode keeps them, and no merge crosses them
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIAL_TOKENS, max_token_length=None)
    # the trainer does not split out added tokens itself; do it, so no merge is spent on them
    added = re.compile("|".join(map(re.escape, SPECIAL_TOKENS + TAG_TOKENS)))
    tok.train_from_iterator((p for s in _corpus() for p in added.split(s) if p), trainer)
    return tok.to_str()


def builtin_tokenizer():
    """A deterministic byte-level BPE (about 700 tokens) for the built-in task: digits are single
    tokens, the tags are single plain tokens, Qwen-style chat template, eos `<|im_end|>`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<|im_end|>",
        pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
        model_max_length=1 << 20)


# ----------------------------------------------------------------------------- grading

SYMBOLIC_TIMEOUT = 2.0  # seconds; math-verify (sympy) can hang on adversarial or huge expressions
SYMBOLIC_MAX_CHARS = 120  # longer answers are garbage or a derivation, not one answer: no sympy time
PARSE_CACHE = 4096  # answers kept parsed
DECIMAL_PLACES = 6  # math-verify's float_rounding: a decimal equals what agrees with it to 6 places


class _Timeout(BaseException):  # BaseException: sympy's own `except Exception` must not eat it
    pass


def extract_answer(text):
    """The content of the last \\boxed{...} / \\fbox{...} (or `\\boxed 5`); None when absent."""
    if not isinstance(text, str):
        return None
    ms = list(re.finditer(r"\\(?:boxed|fbox)\s*([{ ])", text))
    if not ms:
        return None
    m, i = ms[-1], ms[-1].end(1)
    if m.group(1) == " ":  # `\boxed 5`: up to the next space or dollar sign
        ans = re.match(r"[^\s$]*", text[i:]).group(0)
        return ans.rstrip(".") or None
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # unbalanced: cut off before the closing brace


def _normalize(s):
    s = str(s).strip()
    s = re.sub(r"^\\\[|\\\]$|^\\\(|\\\)$", "", s).replace("\\$", "").replace("$", "").strip()
    s = s.replace("−", "-")  # unicode minus
    s = re.sub(r"\\(left|right|displaystyle|[,;:! ])", "", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)", r"\\frac{\1}", s)  # \frac12, \frac3{3}
    s = re.sub(r"(\\frac\{[^{}]*\})\s*(\d)", r"\1{\2}", s)
    # a unit after a number or a fraction: 10\text{ cm}, \frac{1}{3} \textbf{meters}
    s = re.sub(r"^([-\d.,/ ]+|-?\\frac\{[\d.]+\}\{[\d.]+\})\s*\\(text|textbf|mathrm|mbox)\{\s*[a-zA-Z ]*\}$",
               r"\1", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|boxed)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|\\?%|\\degree|°", "", s)
    s = s.replace("{,}", "").replace("\\{", "{").replace("\\}", "}")
    s = re.sub(r"\\sqrt\s*(\d+|[a-z])", r"\\sqrt{\1}", s)  # \sqrt2
    s = re.sub(r"^[a-zA-Z]\w*\s*=\s*(?=[^=]+$)", "", s)  # "x = 5" -> "5"
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    if m := re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s):  # mixed number 2\frac{1}{3}
        s = f"{m[1]}\\frac{{{int(m[2]) * int(m[4]) + int(m[3])}}}{{{m[4]}}}"
    return s


def _number(s):
    """Exact rational value of an integer / decimal / a/b / \\frac{a}{b}, else None."""
    m = re.fullmatch(r"([-+]?)\\frac\{([-+]?[\d.]+)\}\{([-+]?[\d.]+)\}", s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    m = re.fullmatch(r"([-+]?)((?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d{1,3})?)(?:/(\d+(?:\.\d*)?))?", s)
    if not m:
        return None
    try:
        v = Fraction(m.group(2)) / Fraction(m.group(3) or 1)
    except ZeroDivisionError:
        return None
    return -v if m.group(1) == "-" else v


def _split_top(s):
    # split on commas at bracket depth 0
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _elements(s):
    """("()" / "[)" / "{}" / "" , top-level elements): brackets only when they wrap the whole."""
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        depth = 0
        for i, ch in enumerate(s):
            depth += (ch in "([{") - (ch in ")]}")
            if depth == 0 and i < len(s) - 1:
                break
        else:
            return s[0] + s[-1], _split_top(s[1:-1])
    return "", _split_top(s)


def _with_timeout(fn, *args):
    """fn(*args) or False after SYMBOLIC_TIMEOUT s: SIGALRM in the main thread, else a daemon thread
    (a runaway call is then abandoned, not killed)."""
    if threading.current_thread() is threading.main_thread():
        def _raise(*_):
            raise _Timeout
        old = signal.signal(signal.SIGALRM, _raise)
        caller = signal.setitimer(signal.ITIMER_REAL, SYMBOLIC_TIMEOUT)
        try:
            return bool(fn(*args))
        except (Exception, _Timeout):
            return False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            signal.setitimer(signal.ITIMER_REAL, *caller)  # a caller's own timer, as it was
    box = [False]
    def _run():
        try:
            box[0] = bool(fn(*args))
        except Exception:
            pass
    t = threading.Thread(target=_run, daemon=True)
    t.start()
    t.join(SYMBOLIC_TIMEOUT)
    return box[0] if not t.is_alive() else False


# math-verify's own timeouts use SIGALRM, which raises outside the main thread: ours wraps each call
# instead, so its once-a-process note that they are off is noise
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda record: "Timeout is disabled" not in record.getMessage())


@lru_cache(maxsize=PARSE_CACHE)
def parsed(s):
    """math-verify's parse of one answer (~10 ms of ANTLR): a group's rollouts share a gold, and its
    right answers are mostly written alike."""
    return math_verify.parse(f"${s}$", parsing_timeout=None)


def _math_verify_equal(a, b):
    g, p = parsed(b), parsed(a)
    return math_verify.verify(g, p, float_rounding=DECIMAL_PLACES, timeout_seconds=None)


def _equiv(a, b, depth=0):
    if a == b:
        return True
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:  # as math-verify decides them, at a fraction of its cost
        if "." in a + b:
            return round(na, DECIMAL_PLACES) == round(nb, DECIMAL_PLACES)
        return na == nb
    (ba, pa), (bb, pb) = _elements(a), _elements(b)
    if len(pa) > 1 or len(pb) > 1:  # tuples, intervals, sets, bare lists
        if len(pa) != len(pb) or len(pa) > 16 or depth > 2 or ba != bb:
            return False
        if ba == "{}":  # sets: order-free, 1-to-1; bare lists and brackets are ordered
            left = list(pb)
            for x in pa:
                hit = next((i for i, y in enumerate(left) if _equiv(x, y, depth + 1)), None)
                if hit is None:
                    return False
                left.pop(hit)
            return True
        return all(_equiv(x, y, depth + 1) for x, y in zip(pa, pb))
    if max(len(a), len(b)) > SYMBOLIC_MAX_CHARS:
        return False
    return _with_timeout(_math_verify_equal, a, b)


def is_equiv(pred, gold):
    """True when the predicted answer string means the gold answer; False on None or garbage."""
    if pred is None or gold is None:
        return False
    try:
        a, b = _normalize(pred), _normalize(gold)
        return bool(a) and bool(b) and _equiv(a, b)
    except (Exception, _Timeout):  # the grader is a reward: never raise
        return False


def reward(text, gold):
    """+1.0 when the last boxed answer of `text` equals `gold`, else -1.0 (the paper's reward)."""
    return 1.0 if is_equiv(extract_answer(text), gold) else -1.0
