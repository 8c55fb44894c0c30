# Answer grading: the RL reward and the eval metric. Pasted at the bottom of data.py at merge,
# so it imports nothing of ours. Never raises on any string input.
import cmath
import re
import signal
import threading
from fractions import Fraction

try:  # HF math-verify: optional, used for the symbolic step when installed
    import math_verify
except ImportError:
    math_verify = None

SYMPY_TIMEOUT = 2.0  # seconds; sympy can hang on adversarial or huge expressions


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
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}\s*$", "", s) if re.match(r"^[-\d.,/ ]+\\text", s) else s
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|boxed)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(left|right|displaystyle|[,;:! ])", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|\\?%|\\degree|°", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", "")
    s = s.replace("\\{", "{").replace("\\}", "}")
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\sqrt\s*(\d+|[a-z])", r"\\sqrt{\1}", s)  # \sqrt2
    s = re.sub(r"^[a-zA-Z]\w*\s*=\s*(?=[^=]+$)", "", s)  # "x = 5" -> "5"
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
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


def _to_sympy_src(s):
    for _ in range(3):  # nested fractions / roots, innermost first
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\[([^\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("π", "pi").replace("\\infty", "oo").replace("\\ln", "log")
    s = re.sub(r"\\(cdot|times)", "*", s).replace("^", "**").replace("{", "(").replace("}", ")")
    s = re.sub(r"\\(sin|cos|tan|log|exp)", r"\1", s)
    # whitelist: parse_expr evaluates Python, and model output is untrusted
    if len(s) > 120 or not re.fullmatch(r"[\w+\-*/().]*", s) or "__" in s:
        return None
    if any(w not in ("sqrt", "pi", "oo", "log", "sin", "cos", "tan", "exp", "e", "I") and len(w) > 1
           for w in re.findall(r"[a-zA-Z_]\w*", s)) or s.count("**") > 2:
        return None
    return s


def _sympy_equal(a, b):
    import sympy
    from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                            standard_transformations)
    sa, sb = _to_sympy_src(a), _to_sympy_src(b)
    if sa is None or sb is None:
        return False
    tr = standard_transformations + (implicit_multiplication_application,)
    ea, eb = (parse_expr(x, transformations=tr, evaluate=False) for x in (sa, sb))
    if ea.free_symbols or eb.free_symbols:
        return sympy.simplify(ea - eb) == 0
    va, vb = complex(sympy.N(ea, 30)), complex(sympy.N(eb, 30))
    if not (cmath.isfinite(va) and cmath.isfinite(vb)):
        return ea == eb  # infinities or overflow: only the same expression counts
    return abs(va - vb) <= 1e-9 * max(1.0, abs(vb))


def _with_timeout(fn, *args):
    """fn(*args) or False after SYMPY_TIMEOUT s: SIGALRM in the main thread, else a daemon thread
    (a runaway call is then abandoned, not killed; the whitelist keeps that rare)."""
    if threading.current_thread() is threading.main_thread():
        def _raise(*_):
            raise _Timeout
        old = signal.signal(signal.SIGALRM, _raise)
        signal.setitimer(signal.ITIMER_REAL, SYMPY_TIMEOUT)
        try:
            return bool(fn(*args))
        except (Exception, _Timeout):
            return False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    box = [False]
    def _run():
        try:
            box[0] = bool(fn(*args))
        except Exception:
            pass
    t = threading.Thread(target=_run, daemon=True)
    t.start()
    t.join(SYMPY_TIMEOUT)
    return box[0] if not t.is_alive() else False


def _math_verify_equal(a, b):
    # its own timeouts use SIGALRM too (main thread only): switch them off, ours wraps the call
    g, p = (math_verify.parse(f"${x}$", parsing_timeout=None) for x in (b, a))
    return math_verify.verify(g, p, timeout_seconds=None)


def _equiv(a, b, depth=0):
    if a == b:
        return True
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    (ba, pa), (bb, pb) = _elements(a), _elements(b)
    if len(pa) > 1 or len(pb) > 1:  # tuples, intervals, sets, bare lists
        if len(pa) != len(pb) or len(pa) > 16 or depth > 2:
            return False
        if ba in ("", "{}") and bb in ("", "{}"):  # sets and bare lists: order-free, 1-to-1
            left = list(pb)
            for x in pa:
                hit = next((i for i, y in enumerate(left) if _equiv(x, y, depth + 1)), None)
                if hit is None:
                    return False
                left.pop(hit)
            return True
        return ba == bb and all(_equiv(x, y, depth + 1) for x, y in zip(pa, pb))
    import sympy.parsing.sympy_parser  # noqa: F401  (first import is slow: keep it outside the cap)
    if math_verify is not None and _with_timeout(_math_verify_equal, a, b):
        return True
    return _with_timeout(_sympy_equal, a, b)


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
