import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import data
from data import extract_answer, is_equiv, reward

EQUAL = [
    ("33", "33"), ("033", "33"), ("007", "7"), ("0", "000"), ("+5", "5"), ("-3", "- 3"),
    ("1,000", "1000"), ("1{,}000", "1000"), ("1\\,000", "1000"), ("12,345,678", "12345678"),
    ("0.5", "\\frac{1}{2}"), ("\\dfrac12", "1/2"), ("\\tfrac{3}{4}", "0.75"), (".5", "0.50"),
    ("-\\frac{1}{2}", "\\frac{-1}{2}"), ("\\frac{1}{-2}", "-0.5"), ("1e3", "1000"), ("2.0", "2"),
    ("$5$", "5"), ("5.", "5"), ("\\(5\\)", "5"), ("\\text{5}", "5"), ("\\textbf{12}", "12"),
    ("10^\\circ", "10"), ("10^{\\circ}", "10"), ("50\\%", "50"), ("50%", "50"),
    ("10\\text{ cm}", "10"), ("x = 3", "3"), ("k=12", "12"), ("\\boxed{4}", "4"),
    ("\\left(1,2\\right)", "(1, 2)"), ("(1, 2, 3)", "(1,2,3)"), ("(\\frac12, 3)", "(0.5, 3)"),
    ("[0,1)", "[0, 1)"), ("(-\\infty, 3]", "(-\\infty,3]"), ("\\{1,2\\}", "\\{2,1\\}"),
    ("\\left\\{3, 4\\right\\}", "\\{4,3\\}"), ("\\{10, 4, -2\\}", "\\{4, 10, -2\\}"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("\\sqrt2", "\\sqrt{2}"), ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2"),
    ("3\\sqrt[3]{2}", "\\sqrt[3]{54}"), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\pi/2", "\\frac{\\pi}{2}"), ("2\\pi", "2 \\pi"), ("π", "\\pi"), ("4\\pi^2", "4\\pi^{2}"),
    ("x+1", "1+x"), ("2x+1", "1+2x"), ("x^{2}+2x+1", "(x+1)^2"), ("\\frac{x}{2}", "0.5x"),
    ("\\$5", "5"), ("−7", "-7"),
    ("2\\cdot 3", "6"), ("2 \\times 3", "6"), ("\\infty", "\\infty"), ("e", "e"),
    ("\\frac{1}{2^{10}}", "1/1024"), ("\\frac{\\pi^{2}}{6}", "\\pi^2/6"),  # braces inside \frac / \sqrt
    ("\\sqrt{x^{2}+1}", "\\sqrt{x^2+1}"), ("2\\frac{1}{3}", "\\frac{7}{3}"), ("-1\\frac12", "-1.5"),
    ("2^{100}", "1267650600228229401496703205376"), ("0.1\\pi", "\\frac{\\pi}{10}"),
    ("\\sqrt{2}\\sqrt{2}-2", "0"), ("\\sqrt{5+2\\sqrt{6}}", "\\sqrt{2}+\\sqrt{3}"),
    ("\\frac3{3}", "1"), ("\\frac1{72}", "\\!\\frac{1}{72}"), ("\\frac{1}{72}\\!", "1/72"), ("\\cfrac{1}{3}", "1/3"),
    ("\\frac{1}{3} \\text{meters}", "\\frac{1}{3}"), ("\\frac{1}{3} \\textbf{meters}", "1/3"),
    # a decimal equals what agrees with it to 6 places, as in math-verify (and so open-r1, TRL)
    ("\\pi", "3.14159265358979323846"), ("\\pi", "3.141593"), ("1/3", "0.333333"), ("2/3", "0.666667"),
    ("\\frac{\\sqrt{2}}{2}", "0.7071067811865476"),
]

NOT_EQUAL = [
    ("33", "34"), ("33", "330"), ("1/3", "0.333"), ("\\sqrt{2}", "1.414"), ("2", "-2"),
    ("1,2", "12"), ("1,000", "1"), ("(1,2)", "(2,1)"), ("[0,1)", "[0,1]"), ("(0,1)", "[0,1]"),
    ("(1,2)", "(1,2,3)"), ("\\{1,2\\}", "\\{1,3\\}"), ("x", "y"), ("x+1", "x-1"),
    ("\\pi", "3.14"), ("2\\pi", "\\pi"), ("\\frac{1}{2}", "\\frac{2}{1}"), ("", "0"), (" ", " "),
    ("\\sqrt{3}", "3"), ("0.5", "5"), ("-\\infty", "\\infty"), ("10\\%", "1"), ("e", "2.718"),
    ("__import__('os').system('echo hi')", "0"), ("9^{9^{9}}", "9^{9^{9}}+1"),
    # exact, not within a float tolerance
    ("10^{-10}", "0"), ("10^{-9}", "2\\cdot10^{-9}"), ("2^{100}", "1267650600228229401496703205377"),
    ("1000^{3}", "1000000001"), ("2^{200}", "2^{200}+1"), ("10^{-200}", "0"),
    ("2\\frac{1}{3}", "\\frac{2}{3}"),  # a mixed number
    ("\\pi", "3.14159"), ("1/3", "0.33333"), ("2/3", "0.666666"), ("\\sqrt{2}", "1.41421"),  # under 6 places
    # commas alone and brackets are ordered (a tuple, a list of answers in turn), braces are sets
    ("1, 2", "2,1"), ("10, 4, -2", "4, 10, -2"), ("(10, 4, -2)", "(4, 10, -2)"), ("\\{1,2\\}", "1,2"),
]


@pytest.mark.parametrize("pred,gold", EQUAL)
def test_equal_pairs(pred, gold):
    assert is_equiv(pred, gold)
    assert is_equiv(gold, pred)


@pytest.mark.parametrize("pred,gold", NOT_EQUAL)
def test_not_equal_pairs(pred, gold):
    assert not is_equiv(pred, gold)
    assert not is_equiv(gold, pred)


def test_table_sizes():
    assert len(EQUAL) >= 40 and len(NOT_EQUAL) >= 20


@pytest.mark.parametrize("text,want", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}.", "2"),  # the last one counts
    ("nested \\boxed{\\frac{a}{\\sqrt{b}}} end", "\\frac{a}{\\sqrt{b}}"),
    ("\\boxed{(1, \\{2\\})}", "(1, \\{2\\})"),
    ("$\\boxed 5$", "5"), ("answer: \\boxed 42.", "42"), ("\\fbox{7}", "7"),
    ("\\boxed { 12 }", "12"), ("\\boxed{}", ""),
    ("\\boxed{3} and then \\boxed{", None),  # cut off before the brace closed: no answer
    ("no answer here", None), ("", None), (None, None), ("\\boxed", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_reward():
    assert reward("... so the answer is \\boxed{033}.<|im_end|>", "33") == 1.0
    assert reward("\\boxed{34}", "33") == -1.0
    assert reward("no box: 33", "33") == -1.0
    assert reward(None, "33") == -1.0


def test_never_raises_on_garbage():
    rng = random.Random(0)
    alphabet = "0123456789{}()[]\\^_/,.$-+*xe pi\\frac\\sqrt\\boxed\\left\\text%=\n\x00é"
    for _ in range(300):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert is_equiv(a, b) in (True, False)
        assert reward(a, b) in (1.0, -1.0)
        extract_answer(a)
    for weird in [None, 5, 3.5, b"33", [], "\\frac{1}{0}", "1/0", "0/0", "1e999999", "{" * 500,
                  "}" * 500, "(" * 300 + "1", "\\sqrt{-1}", "x" * 10_000, "1" * 5000]:
        assert is_equiv(weird, "1") in (True, False)
        assert is_equiv("1", weird) in (True, False)
        assert extract_answer(weird) in (None,) or isinstance(extract_answer(weird), str)


def test_time_cap_main_thread_and_worker_thread(monkeypatch):
    import time
    assert is_equiv("2\\sqrt{2}", "\\sqrt{8}")  # math-verify's first call sets up its parser: not under 0.2 s
    monkeypatch.setattr(data, "SYMBOLIC_TIMEOUT", 0.2)
    t = time.monotonic()
    assert data._with_timeout(time.sleep, 3) is False  # SIGALRM path
    assert time.monotonic() - t < 2.5
    out = []
    worker = threading.Thread(target=lambda: out.append(
        (data._with_timeout(time.sleep, 1), is_equiv("2\\sqrt{2}", "\\sqrt{8}"))))
    worker.start()
    worker.join()
    assert out == [(False, True)]  # thread path: abandoned on timeout, still grades


def test_time_cap_restores_a_callers_timer(monkeypatch):
    import signal
    assert is_equiv("\\frac{\\pi}{2}", "\\pi/2")  # math-verify's first call sets up its parser: not under 0.2 s
    monkeypatch.setattr(data, "SYMBOLIC_TIMEOUT", 0.2)
    old = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 100)
    try:
        assert is_equiv("\\frac{\\pi}{2}", "\\pi/2")
        assert 90 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_grades_in_threads_like_a_reward_pool():
    results = []
    def work():
        results.append([is_equiv("\\frac{\\pi}{2}", "\\pi/2"), is_equiv("033", "33"),
                        is_equiv("x+1", "x-1")])
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[True, True, False]] * 4


def test_grading_prints_nothing():
    # math-verify warns (once a process) that its signal timeouts are off: ours replace them, the note is silenced
    code = "import data\nfor _ in range(3):\n    assert data.is_equiv('2\\\\sqrt{2}', '\\\\sqrt{8}')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(data.__file__).parent, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
