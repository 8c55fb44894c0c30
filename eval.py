"""Evaluate a checkpoint the way the ReTool paper does: k samples per problem at temperature 1.0,
top-p 0.7, with the code interpreter in the loop (or without: --no-tools), graded on the last
\\boxed{} answer. Reports avg@k (the paper's pass@1), unbiased pass@k, maj@k and the tool-use
statistics of the paper's analysis; writes results.json, results.md and samples.jsonl.

    python eval.py                                   # newest of out/rl, out/sft on the built-in test set
    python eval.py --model DIR --data AIME24.jsonl --k 32 --temperature 1.0 --top-p 0.7
    python eval.py --compare out/sft out/rl --data AIME24.jsonl --k 8
    python eval.py --plot out/rl/metrics.jsonl       # training curves -> metrics.png
"""
import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from data import extract_answer, is_equiv  # re-exported: eval.py is where users find the grader

# -----------------------------------------------------------------------------
# config

DEFAULT_MODELS = ("out/rl", "out/sft")  # `python eval.py` takes the newest of these
BUILTIN_TEST_SIZE = 200
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json")
# Columns of the report table: (results key, header, is a fraction shown as a percentage)
COLUMNS = [("avg@k", "avg@k (pass@1)", True), ("pass@k", "pass@k", True), ("maj@k", "maj@k", True),
           ("code_ratio", "code ratio", True), ("calls_per_response", "calls/resp", False),
           ("code_pass_rate", "code pass", True), ("response_length", "resp tokens", False)]


class EvalError(Exception):
    """A user mistake (bad path or flag): one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (in main), instead of argparse's usage block
        raise EvalError(message)


# -----------------------------------------------------------------------------
# metrics: plain functions over trajectories, so tests can call them directly

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    computed as a product so it never overflows."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_answer(answers: list):
    """The most common answer, equivalent answers counted together ("033" with "33"); ties go to
    the answer seen first; None when no sample produced an answer."""
    groups = []  # [representative, count]
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if is_equiv(a, g[0]):
                g[1] += 1
                break
        else:
            groups.append([a, 1])
    return max(groups, key=lambda g: g[1])[0] if groups else None


def compute_metrics(trajectories: list, golds: list) -> dict:
    """Trajectories ordered problem-major (the k samples of problem 0, then of problem 1, ...)."""
    if not golds or len(trajectories) % len(golds):
        raise ValueError(f"{len(trajectories)} trajectories for {len(golds)} problems")
    k = len(trajectories) // len(golds)
    answers = [extract_answer(t.text) for t in trajectories]
    correct = [is_equiv(a, golds[i // k]) for i, a in enumerate(answers)]
    per_problem = []
    for p, gold in enumerate(golds):
        ans, ok = answers[p * k:(p + 1) * k], correct[p * k:(p + 1) * k]
        maj = majority_answer(ans)
        per_problem.append({"gold": gold, "answers": ans, "correct": ok, "majority": maj,
                            "majority_correct": is_equiv(maj, gold)})
    calls = [c for t in trajectories for c in t.tool_calls]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    m = {"problems": len(golds), "k": k, "samples": len(trajectories),
         "avg@k": mean(correct),
         "pass@k": mean([pass_at_k(k, sum(p["correct"]), k) for p in per_problem]),
         "maj@k": mean([p["majority_correct"] for p in per_problem])}
    j = 1
    while j <= k:  # the pass@j curve, powers of two up to k
        m[f"pass@{j}"] = mean([pass_at_k(k, sum(p["correct"]), j) for p in per_problem])
        j *= 2
    m.update({
        "answered": mean([a is not None for a in answers]),
        "code_ratio": mean([len(t.tool_calls) > 0 for t in trajectories]),
        "calls_per_response": len(calls) / len(trajectories),
        "code_pass_rate": mean([c.status == "ok" for c in calls]) if calls else None,
        "response_length": mean([len(t.response_ids) for t in trajectories]),
        "finish_reasons": {r: sum(t.finish_reason == r for t in trajectories)
                           for r in sorted({t.finish_reason for t in trajectories})},
    })
    return {"metrics": m, "per_problem": per_problem, "correct": correct}


def markdown_table(rows: list) -> str:
    """rows: (name, results dict) pairs -> one markdown table, a row per checkpoint."""
    def cell(v, pct):
        if v is None:
            return "–"
        return f"{100 * v:.1f}" if pct else f"{v:.2f}" if v < 10 else f"{v:.0f}"
    head = ["model", "data", "tools", "k"] + [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        m = r["metrics"]
        vals = [name, r["data"], "yes" if r["tools"] else "no", str(m["k"])]
        lines.append("| " + " | ".join(vals + [cell(m[key], pct) for key, _, pct in COLUMNS]) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# evaluation

def evaluate(model, tokenizer, problems: list, *, k=1, temperature=1.0, top_p=0.7, tools=True,
             max_new_tokens=1024, max_tool_calls=8, seed=0, max_batch=64, progress=True, template=None):
    """Sample k responses per problem (one sandbox shared by all of them) and grade them.
    template: a --prompt-template (data.load_template), with the official interpreter format.
    -> (compute_metrics(...) dict, list of trajectories)."""
    from tqdm import tqdm

    from data import render_prompt
    from retool import generate
    from sandbox import Sandbox

    prompts = [render_prompt(tokenizer, p.problem, tools, template) for p in problems for _ in range(k)]
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))]  # per prompt: chunking never changes a sample
    # generate batches continuously within a call; calls of 4 x max_batch prompts let the bar move
    chunk = 4 * max_batch
    trajectories = []
    with tqdm(total=len(prompts), desc="eval", unit="sample", disable=not progress) as bar, \
            (Sandbox() if tools else contextlib.nullcontext()) as sb:
        for s in range(0, len(prompts), chunk):
            trajectories += generate(model, tokenizer, prompts[s:s + chunk], max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, seed=seeds[s:s + chunk],
                                     tool=sb.run_many if sb else None, max_tool_calls=max_tool_calls,
                                     max_batch=max_batch, official=template is not None)
            bar.update(len(prompts[s:s + chunk]))
    return compute_metrics(trajectories, [p.answer for p in problems]), trajectories


def _write_atomic(path: Path, text: str):
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:  # a full disk or a path that changed under us: one line, no temp file left
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise EvalError(f"{path}: cannot write ({e.strerror or e})") from None


def newest_checkpoint(candidates=DEFAULT_MODELS) -> Path:
    found = [(max(f.stat().st_mtime for f in map(Path(d).joinpath, MODEL_FILES) if f.is_file()), d)
             for d in candidates if any(Path(d, f).is_file() for f in MODEL_FILES)]
    if not found:
        raise EvalError(f"no checkpoint in {' or '.join(candidates)}: train one "
                        "(python retool.py --stage sft) or pass --model DIR")
    return Path(max(found)[1])


def check_model_dir(path: Path, flag):
    """Before anything is evaluated, so a typo in the last --compare folder fails in seconds.
    flag: the flag that gave the path (None for the default checkpoint)."""
    where = f"{flag} {path}" if flag else str(path)
    if not path.is_dir():
        raise EvalError(f"{where}: {'not a directory' if path.exists() else 'no such directory'}")
    if not (path / "config.json").is_file():
        raise EvalError(f"{where}: not a checkpoint directory (no config.json)")
    if not any((path / f).is_file() for f in MODEL_FILES):
        raise EvalError(f"{where}: no {' or '.join(MODEL_FILES)}")


def check_out(path: Path, out_flag, want_dir=True):
    """Before anything is evaluated: an output path that exists must be of the right kind.
    out_flag: what --out was given (None: the default place), for the message."""
    if path.exists() and path.is_dir() != want_dir:
        where = "" if out_flag is None else f"--out {out_flag}: "
        where += "" if out_flag is not None and Path(out_flag) == path else f"{path}: "
        raise EvalError(where + ("not a directory" if want_dir else "is a directory"))


def out_paths(args, models: list, data_name: str):
    """(an output directory per checkpoint, the comparison table's path or None). --out is the
    directory itself for one model, the parent of each model's directory with --compare."""
    suffix = f"-{data_name}{'-notools' if args.no_tools else ''}"  # with and without tools never collide
    if not args.compare:
        return [Path(args.out) if args.out else Path("out/eval") / (out_names(models)[0] + suffix)], None
    root = Path(args.out or "out/eval")
    return [root / (n + suffix) for n in out_names(models)], root / f"compare{suffix}.md"


def load_problems(args):
    """-> (problems, the data's name in output paths)."""
    from data import builtin_problems, load_eval

    if not args.data:
        problems, data_name = builtin_problems("test", BUILTIN_TEST_SIZE), "builtin-test"
    else:
        path = Path(args.data)
        if path.is_dir():
            raise EvalError(f"--data {path}: a directory, not a file")
        try:
            problems, data_name = load_eval(path), path.stem
        except OSError as e:  # unreadable (permissions, a FIFO gone away): data.py only checks is_file
            raise EvalError(f"--data {path}: cannot read ({e.strerror or e})") from None
    problems = problems[:args.limit] if args.limit else problems
    if not problems:
        raise EvalError(f"--data {args.data}: no problems")
    return problems, data_name


def out_names(dirs) -> list:
    """Output names for checkpoints, unique within one --compare: the directory's own name (of its
    absolute path, so --model . names the cwd), its parent's prefixed where names clash
    (runs/a/rl, runs/b/rl -> a-rl, b-rl), then a numeric suffix where they still do."""
    paths = [Path(os.path.abspath(d)) for d in dirs]
    names = [p.name or "root" for p in paths]
    names = [f"{p.parent.name or 'root'}-{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return [f"{n}-{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def run_one(model_dir: Path, args, problems, data_name: str, out: Path) -> dict:
    """Evaluate one checkpoint and write results.json / results.md / samples.jsonl to `out`
    (out_paths' directory for this checkpoint)."""
    from retool import load_model

    model, tokenizer = load_model(model_dir)
    model.eval()
    res, trajs = evaluate(model, tokenizer, problems, k=args.k, temperature=args.temperature,
                          top_p=args.top_p, tools=not args.no_tools, max_new_tokens=args.max_new_tokens,
                          max_tool_calls=args.max_tool_calls, seed=args.seed, max_batch=args.batch,
                          template=args.template)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # check_out passed, but the disk can still change during a long evaluation
        raise EvalError(f"{out}: cannot create ({e.strerror or e})") from None
    settings = {k: getattr(args, k)
                for k in ("temperature", "top_p", "max_new_tokens", "max_tool_calls", "seed", "prompt_template")}
    results = {"model": str(model_dir), "data": data_name, "tools": not args.no_tools, **settings,
               "metrics": res["metrics"], "per_problem": [
                   dict(problem=p.problem, **r) for p, r in zip(problems, res["per_problem"])]}
    _write_atomic(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    _write_atomic(out / "results.md", markdown_table([(str(model_dir), results)]) + "\n")
    _write_atomic(out / "samples.jsonl", "".join(json.dumps(
        {"problem": i // args.k, "sample": i % args.k, "answer": extract_answer(t.text), "correct": c,
         "finish_reason": t.finish_reason, "tool_calls": len(t.tool_calls), "text": t.text},
        ensure_ascii=False) + "\n" for i, (t, c) in enumerate(zip(trajs, res["correct"]))))
    results["out"] = str(out)
    return results


def plot(metrics_path: Path) -> Path:
    """Training curves from a metrics.jsonl (one JSON object per step) -> a PNG beside it."""
    if not metrics_path.is_file():
        raise EvalError(f"--plot {metrics_path}: no such file")
    try:  # a binary file gets replacement characters, so it fails below as "not a JSON object"
        text = metrics_path.read_text(errors="replace")
    except OSError as e:
        raise EvalError(f"--plot {metrics_path}: cannot read ({e.strerror or e})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rows.append(json.loads(line) if line.strip() else {})
        except json.JSONDecodeError:
            rows.append(None)
        if not isinstance(rows[-1], dict):
            raise EvalError(f"{metrics_path}:{n}: not a JSON object")
    # each panel: the first key present (the RL logger's names, then common alternatives)
    panels = [("reward / accuracy", ("reward", "accuracy", "acc")), ("code ratio", ("code_ratio",)),
              ("response length", ("response_len", "response_length")),
              ("code pass rate", ("code_pass", "code_pass_rate"))]
    found = [(title, next((key for key in keys if any(key in r for r in rows)), None))
             for title, keys in panels]
    if not any(key for _, key in found):
        raise EvalError(f"{metrics_path}: no reward/code_ratio/response_length/code_pass_rate columns")
    try:  # after the file is checked, so a bad file is reported with or without matplotlib
        import matplotlib
    except ImportError:
        raise EvalError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (title, key) in zip(axes, found):
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
               if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(f"{title} ({key})" if key else f"{title} (not logged)")
        ax.set_xlabel("step")
    fig.tight_layout()
    png = metrics_path.with_suffix(".png")
    fd, tmp = tempfile.mkstemp(dir=png.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
    return png


# -----------------------------------------------------------------------------
# CLI

def parse_args(argv):
    p = _Parser(prog="eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the newest of out/rl, out/sft)")
    p.add_argument("--compare", nargs="+", metavar="DIR", help="evaluate several checkpoints side by side")
    p.add_argument("--data", help="eval file (.jsonl/.json/.parquet; default: the built-in test set)")
    p.add_argument("--k", type=int, help="samples per problem (default 32 with --data, 1 built-in)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--no-tools", action="store_true", help="text-only reasoning, no interpreter")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-tool-calls", type=int, default=8)
    p.add_argument("--limit", type=int, help="evaluate only the first N problems")
    p.add_argument("--batch", type=int, default=64, help="rows decoded at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-template", metavar="FILE[:KEY]", help="user turn: this {query} template on the bare "
                   "problem (.txt, or .json like the official prompt_template.json), official interpreter format")
    p.add_argument("--out", help="output directory (default out/eval/<model>-<data>[-notools]; with "
                   "--compare: the folder holding those and compare-<data>[-notools].md)")
    p.add_argument("--plot", metavar="METRICS_JSONL", help="draw training curves to a PNG and exit")
    args = p.parse_args(argv)
    args.k = args.k if args.k is not None else (32 if args.data else 1)
    for flag in ("k", "max_new_tokens", "batch", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_tool_calls < 0 or not 0 <= args.temperature < math.inf or not 0 < args.top_p <= 1:
        p.error("need --max-tool-calls >= 0, --temperature >= 0 and 0 < --top-p <= 1")
    # an empty path would quietly mean the default (for --plot: a whole evaluation instead of a plot)
    for flag in ("model", "data", "out", "plot"):
        if getattr(args, flag) == "":
            p.error(f"--{flag}: empty path")
    if args.compare and "" in args.compare:
        p.error("--compare: empty path")
    if args.model and args.compare:
        p.error("give --model or --compare, not both")
    return args


def main(argv=None):
    from data import DataError
    from data import load_template
    from retool import ModelError

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        args.template = load_template(args.prompt_template) if args.prompt_template else None
        if args.plot:
            print(f"wrote {plot(Path(args.plot))}")
            return 0
        problems, data_name = load_problems(args)
        # every path is checked before the first checkpoint is evaluated (that can take hours)
        flag = "--compare" if args.compare else "--model" if args.model else None
        models = args.compare or [args.model or str(newest_checkpoint())]
        for d in models:
            check_model_dir(Path(d), flag)
        outs, compare_md = out_paths(args, models, data_name)
        for out in ([Path(args.out)] if args.out else []) + outs:
            check_out(out, args.out)
        if compare_md:
            check_out(compare_md, args.out, want_dir=False)
        rows = [(d, run_one(Path(d), args, problems, data_name, out)) for d, out in zip(models, outs)]
        table = markdown_table(rows)
        print(table)
        if compare_md:
            _write_atomic(compare_md, table + "\n")
    except (EvalError, DataError, ModelError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    for _, r in rows:
        print(f"wrote {r['out']}/results.json")
    if compare_md:
        print(f"wrote {compare_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
