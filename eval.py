"""Evaluate a checkpoint the way the ReTool paper does: k samples per problem at temperature 1.0,
top-p 0.7, with the code interpreter in the loop (or without: --no-tools), graded on the last
\\boxed{} answer. Reports avg@k (the paper's pass@1), unbiased pass@k, maj@k and the tool-use
statistics of the paper's analysis; writes results.json, results.md, samples.jsonl and samples.html.

    python eval.py                                   # newest of out/rl, out/sft on the built-in test set
    python eval.py --model DIR --data AIME24.jsonl --k 32 --temperature 1.0 --top-p 0.7
    python eval.py --compare out/sft out/rl --data AIME24.jsonl --k 8
    python eval.py --plot out/rl                     # training curves -> out/rl/metrics.png
"""
import contextlib
import json
import math
import os
import sys
from pathlib import Path

from data import extract_answer, is_equiv  # re-exported: eval.py is where users find the grader

# -----------------------------------------------------------------------------
# config

DEFAULT_MODELS = ("out/rl", "out/sft")  # `python eval.py` takes the newest of these
BUILTIN_TEST_SIZE = 200
HTML_PROBLEMS = 200  # samples.html shows the first sample of this many problems (samples.jsonl has all)
PAPER_K = 32  # the paper's protocol: 32 samples per problem at temperature 1.0, top-p 0.7
# --plot: a panel per quantity, each logged name drawn under its own name (SFT's, then RL's)
PLOT_PANELS = (("loss", ("loss", "heldout_loss")), ("reward", ("reward",)), ("accuracy", ("accuracy",)),
               ("code ratio", ("code_ratio",)), ("response length", ("response_len", "response_length")),
               ("code pass rate", ("code_pass", "code_pass_rate")), ("entropy", ("entropy",)),
               ("KL", ("approx_kl", "ref_kl")), ("clip fraction", ("clip_frac",)))
# Columns of the report table: (results key, header, is a fraction shown as a percentage)
COLUMNS = [("avg@k", "avg@k (pass@1)", True), ("pass@k", "pass@k", True), ("maj@k", "maj@k", True),
           ("code_ratio", "code ratio", True), ("calls_per_response", "calls/resp", False),
           ("code_pass_rate", "code pass", True), ("response_length", "resp tokens", False)]


class EvalError(Exception):
    """A user mistake (bad path or flag): one line, exit 2."""


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


def mean(xs) -> float:
    return sum(xs) / len(xs)


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
             max_new_tokens=1024, max_tool_calls=8, seed=0, max_batch=64, progress=True, template=None, name="eval",
             kv_budget=None):
    """Sample k responses per problem (one sandbox shared by all of them) and grade them; the progress
    bar, labelled `name`, moves as each sample finishes. template: a --prompt-template
    (data.load_template), with the official interpreter format. kv_budget: the engine's KV cache bytes
    (retool.generate). -> (compute_metrics(...) dict, trajectories)."""
    from tqdm import tqdm

    from data import render_prompt
    from retool import generate
    from sandbox import Sandbox

    prompts = [render_prompt(tokenizer, p.problem, tools, template) for p in problems for _ in range(k)]
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))]  # per prompt: batching never changes a sample
    with tqdm(total=len(prompts), desc=name, unit="sample", disable=not progress) as bar, \
            (Sandbox() if tools else contextlib.nullcontext()) as sb:
        trajectories = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seeds, tool=sb.run_many if sb else None,
                                max_tool_calls=max_tool_calls, max_batch=max_batch, official=template is not None,
                                kv_budget=kv_budget, on_finish=lambda i: bar.update())
    return compute_metrics(trajectories, [p.answer for p in problems]), trajectories


def _write_atomic(path: Path, write):
    """write(tmp) writes the file aside, then it is renamed into place; open() gives the temp file the
    usual umask permissions (mkstemp's would be 0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full disk or a path that changed under us: one line, no temp file left
        tmp.unlink(missing_ok=True)
        raise EvalError(f"{path}: cannot write ({e.strerror or e})") from None


def newest_checkpoint() -> Path:
    from retool import MODEL_FILES

    found = [(max(f.stat().st_mtime for f in map(Path(d).joinpath, MODEL_FILES) if f.is_file()), d)
             for d in DEFAULT_MODELS if any(Path(d, f).is_file() for f in MODEL_FILES)]
    if not found:
        raise EvalError(f"no checkpoint in {' or '.join(DEFAULT_MODELS)}: train one "
                        "(python retool.py --stage sft) or pass --model DIR")
    return Path(max(found)[1])


def load_problems(args):
    """-> (problems, the data's name in output paths)."""
    from data import builtin_problems, load_eval
    from retool import check_input_file

    if not args.data:
        problems, data_name = builtin_problems("test", BUILTIN_TEST_SIZE), "builtin-test"
    else:
        path = Path(args.data)
        check_input_file("--data", path)
        try:
            problems, data_name = load_eval(path), path.stem
        except OSError as e:  # unreadable (permissions, a FIFO gone away): data.py only checks is_file
            raise EvalError(f"--data {path}: cannot read ({e.strerror or e})") from None
    problems = problems[:args.limit]  # --limit is None or >= 1
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


def out_where(path: Path, out_flag) -> str:
    """How a message names an output path. out_flag: what --out was given (None: the default place)."""
    if out_flag is None:
        return str(path)
    return f"--out {out_flag}" if Path(out_flag) == path else f"--out {out_flag}: {path}"


def check_outputs(args, models, data_name):
    """(an output directory per checkpoint, the comparison table's path or None). --out is the directory
    itself for one model, the parent of each model's directory with --compare. Every path is checked, then
    created and probed for writing, before the first checkpoint is evaluated (that can take hours)."""
    from retool import check_out_dir

    suffix = f"-{data_name}{'-notools' if args.no_tools else ''}"  # with and without tools never collide
    root = Path(args.out or "out/eval")
    if args.compare:
        outs, compare_md = [root / (n + suffix) for n in out_names(models)], root / f"compare{suffix}.md"
    else:
        outs, compare_md = [root if args.out else root / (out_names(models)[0] + suffix)], None
    for path in ([root] if args.out else []) + outs:  # before anything is created: --out first
        if path.exists() and not path.is_dir():
            raise EvalError(f"{out_where(path, args.out)}: not a directory")
    if compare_md and compare_md.is_dir():
        raise EvalError(f"{out_where(compare_md, args.out)}: is a directory")
    for out in outs + ([root] if compare_md else []):
        check_out_dir(out, out_where(out, args.out))
    return outs, compare_md


def samples_page(tokenizer, trajs, res, problems, k, title) -> str:
    """samples.html: the first sample of each of the first HTML_PROBLEMS problems, graded as results.json."""
    from data import samples_html
    from retool import sample_view

    views = []
    for p, problem in enumerate(problems[:HTML_PROBLEMS]):
        t, right = trajs[p * k], res["correct"][p * k]
        views.append(sample_view(tokenizer, t, f"problem {p + 1}, sample 1 of {k}: {'right' if right else 'wrong'}"
                                 f" (answer {extract_answer(t.text)}, gold {problem.answer}), finish "
                                 f"{t.finish_reason}, {len(t.tool_calls)} tool call(s)", right))
    return samples_html(views, title)


def run_one(model_dir: Path, args, problems, data_name: str, out: Path) -> dict:
    """Evaluate one checkpoint and write results.json / results.md / samples.jsonl / samples.html to `out`
    (check_outputs' directory for this checkpoint)."""
    from retool import kv_budget_bytes, load_model

    model, tokenizer = load_model(model_dir)
    model.eval()
    res, trajs = evaluate(model, tokenizer, problems, k=args.k, temperature=args.temperature,
                          top_p=args.top_p, tools=not args.no_tools, max_new_tokens=args.max_new_tokens,
                          max_tool_calls=args.max_tool_calls, seed=args.seed, max_batch=args.batch,
                          template=args.template, name=out_names([model_dir])[0],
                          kv_budget=kv_budget_bytes(args.kv_budget))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # checked before, but the disk can still change during a long evaluation
        raise EvalError(f"{out}: cannot create ({e.strerror or e})") from None
    settings = {k: getattr(args, k)
                for k in ("temperature", "top_p", "max_new_tokens", "max_tool_calls", "seed", "prompt_template")}
    results = {"model": str(model_dir), "data": data_name, "tools": not args.no_tools, **settings,
               "metrics": res["metrics"], "per_problem": [
                   dict(problem=p.problem, **r) for p, r in zip(problems, res["per_problem"])]}
    samples = "".join(json.dumps(
        {"index": i // args.k, "sample": i % args.k, "problem": problems[i // args.k].problem,
         "gold": problems[i // args.k].answer, "answer": extract_answer(t.text), "correct": c,
         "finish_reason": t.finish_reason, "tool_calls": len(t.tool_calls), "text": t.text},
        ensure_ascii=False) + "\n" for i, (t, c) in enumerate(zip(trajs, res["correct"])))
    for name, text in (("results.json", json.dumps(results, indent=1, ensure_ascii=False)),
                       ("results.md", markdown_table([(str(model_dir), results)])), ("samples.jsonl", samples),
                       ("samples.html", samples_page(tokenizer, trajs, res, problems, args.k,
                                                     f"{model_dir} on {data_name}"))):
        _write_atomic(out / name, lambda tmp: tmp.write_text(text.rstrip("\n") + "\n"))
    results["out"] = str(out)
    return results


def plot_panels(rows: list) -> list:
    """-> [(panel title, [the names of it that were logged])] for the quantities present in rows."""
    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in PLOT_PANELS]
    return [(title, keys) for title, keys in panels if keys]


def plot(path: Path) -> Path:
    """Training curves from a run folder's metrics.jsonl (or that file) -> metrics.png beside it."""
    metrics_path = path / "metrics.jsonl" if path.is_dir() else path
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
    panels = plot_panels(rows)
    if not panels:
        raise EvalError(f"{metrics_path}: none of {', '.join(k for _, keys in PLOT_PANELS for k in keys)} logged")
    try:  # after the file is checked, so a bad file is reported with or without matplotlib
        import matplotlib
    except ImportError:
        raise EvalError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(4 * cols, 3.5), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            ax.plot(*zip(*[(r.get("step", i), r[key]) for i, r in enumerate(rows)
                           if isinstance(r.get(key), (int, float))]), label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    png = metrics_path.with_suffix(".png")
    _write_atomic(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return png


# -----------------------------------------------------------------------------
# CLI

def parse_args(argv):
    from retool import KV_BUDGET_HELP, CliParser

    p = CliParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the newest of out/rl, out/sft)")
    p.add_argument("--compare", nargs="+", metavar="DIR", help="evaluate several checkpoints side by side")
    p.add_argument("--data", help="eval file (.jsonl/.json/.parquet; default: the built-in test set)")
    p.add_argument("--k", type=int, help=f"samples per problem (default {PAPER_K} with --data, the paper's "
                   "protocol; 1 on the built-in test set)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the paper's)")
    p.add_argument("--top-p", type=float, default=0.7, help="nucleus sampling (the paper's)")
    p.add_argument("--no-tools", action="store_true", help="text-only reasoning, no interpreter")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per response, interpreter output included")
    p.add_argument("--max-tool-calls", type=int, default=8, help="interpreter calls per response")
    p.add_argument("--limit", type=int, help="evaluate only the first N problems")
    p.add_argument("--batch", type=int, default=64, help="rows decoded at once")
    p.add_argument("--kv-budget", type=float, metavar="GIB", help=KV_BUDGET_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the samples")
    p.add_argument("--prompt-template", metavar="FILE[:KEY]", help="user turn: this {query} template on the bare "
                   "problem (.txt, or .json like the official prompt_template.json), official interpreter format")
    p.add_argument("--out", help="output directory (default out/eval/<model>-<data>[-notools]; with "
                   "--compare: the folder holding those and compare-<data>[-notools].md)")
    p.add_argument("--plot", metavar="RUN", help="draw a run folder's (or a metrics.jsonl's) training curves "
                   "to metrics.png beside it and exit")
    args = p.parse_args(argv)
    args.k_why = f"--k {args.k}" if args.k is not None else \
        f"k {PAPER_K}: the paper's protocol for --data; --k sets it" if args.data else "k 1 on the built-in test set"
    args.k = args.k if args.k is not None else (PAPER_K if args.data else 1)
    for flag in ("k", "max_new_tokens", "batch", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.kv_budget is not None and not 0 < args.kv_budget < math.inf:
        p.error(f"--kv-budget must be positive, got {args.kv_budget}")
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
    from data import DataError, load_template
    from retool import KVBudgetError, ModelError, UsageError, check_model_dir

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        args.template = load_template(args.prompt_template) if args.prompt_template else None
        if args.plot:
            print(f"wrote {plot(Path(args.plot))}")
            return 0
        problems, data_name = load_problems(args)
        flag = "--compare" if args.compare else "--model" if args.model else None
        models = args.compare or [args.model or str(newest_checkpoint())]
        for d in models:
            check_model_dir(d, flag)
        outs, compare_md = check_outputs(args, models, data_name)
        print(f"eval.py: {len(problems)} problems x {args.k} samples = {len(problems) * args.k} samples per "
              f"checkpoint ({args.k_why})", file=sys.stderr)
        rows = [(d, run_one(Path(d), args, problems, data_name, out)) for d, out in zip(models, outs)]
        table = markdown_table(rows)
        print(table)
        if compare_md:
            _write_atomic(compare_md, lambda tmp: tmp.write_text(table + "\n"))
    except (EvalError, DataError, ModelError, UsageError, KVBudgetError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    for _, r in rows:
        print(f"wrote {r['out']}/: results.json (metrics, per-problem answers), results.md (the table), "
              "samples.jsonl (every sample: problem, gold, answer, text)")
    if compare_md:
        print(f"wrote {compare_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
