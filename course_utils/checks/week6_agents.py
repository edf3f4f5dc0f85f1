"""Week 6 exercises, retrieval and agents (notebooks 05-06): BM25, reciprocal-rank fusion, a safe
calculator, and validating a tool call.

Expected values come from independent references computed in the trusted checker: BM25 and RRF
written in closed form with numpy (a matrix formulation, not the package's loops), Python's own
arithmetic on expressions the checker wrote itself, and hand-written verdicts for each tool call.
"""
from __future__ import annotations

import builtins
import json

import numpy as np
import torch

from ..exercises import Case, case_rng, exercise


# ----------------------------------------------------------------------------------------------
# 6.9 BM25 scores (notebook 05)
# ----------------------------------------------------------------------------------------------
def _bm25_numpy(query, docs, k1=1.5, b=0.75):
    vocab = sorted({t for d in docs for t in d} | set(query))
    col = {t: j for j, t in enumerate(vocab)}
    tf = np.zeros((len(docs), len(vocab)))  # (N, V) term frequencies
    for i, d in enumerate(docs):
        for t in d:
            tf[i, col[t]] += 1
    n = len(docs)
    df = (tf > 0).sum(0)  # (V,)
    idf = np.log1p((n - df + 0.5) / (df + 0.5))
    lengths = tf.sum(1, keepdims=True)  # (N, 1)
    sat = tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths / lengths.mean()))  # (N, V)
    qcount = np.zeros(len(vocab))
    for t in query:
        qcount[col[t]] += 1
    return [float(x) for x in sat @ (idf * qcount)]


def _random_docs(g: torch.Generator, n_docs: int, vocab: int, lo: int, hi: int) -> list[list[str]]:
    words = [f"w{i}" for i in range(vocab)]
    docs = []
    for _ in range(n_docs):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        docs.append([words[int(i)] for i in torch.randint(0, vocab, (length,), generator=g)])
    return docs


def _bm25_case(name, query, docs, hint=None, **kw) -> Case:
    return Case(name, run=lambda f: [float(s) for s in f(list(query), [list(d) for d in docs], **kw)],
                expected=lambda: _bm25_numpy(query, docs, **kw), names="scores", atol=1e-9, rtol=1e-7, hint=hint)


@exercise("6.9", "BM25 scores from scratch", reference="course_utils.retrieval:bm25_scores",
          hint="For each document d: sum over the query's tokens t (repeats count) of idf(t) * f(k1+1) / (f + k1 * "
               "(1 - b + b * len(d) / avgdl)), f = count of t in d, idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5)) "
               "with n_t the number of DOCUMENTS containing t; avgdl over all documents.")
def _():
    g = case_rng(69)
    docs = _random_docs(g, 6, 12, 3, 12)
    yield _bm25_case("6 documents, 3-word query", ["w1", "w4", "w7"], docs)
    yield _bm25_case("12 documents of very different lengths (length normalisation)", ["w2", "w3"],
                     _random_docs(g, 12, 8, 1, 40), hint="divide len(d) by the AVERAGE document length avgdl")
    yield _bm25_case("a query word in every document (idf must stay positive: Lucene's idf)", ["w0", "w5"],
                     [["w0", "w5", "w1"], ["w0", "w2"], ["w0", "w0", "w3", "w5"], ["w0", "w4", "w4"]],
                     hint="idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5)): the 1 + inside the log keeps it positive")
    yield _bm25_case("a repeated query word counts twice", ["w1", "w1", "w2"], docs,
                     hint="loop over the query's tokens as given; a repeated token adds its term again")
    yield _bm25_case("a query word in no document contributes 0", ["w99", "w3"], docs)
    yield _bm25_case("a word repeated inside a document (saturation)", ["w1"],
                     [["w1"] * 9 + ["w2"], ["w1", "w2", "w3"], ["w4", "w5"]],
                     hint="f * (k1 + 1) / (f + k1 * (...)), f = how often t occurs in d, not 0/1")
    yield _bm25_case("k1=0.9, b=0.4 passed as keywords", ["w2", "w6", "w9"], docs, k1=0.9, b=0.4,
                     hint="use the k1 and b arguments, not constants")
    yield _bm25_case("b=0: no length normalisation", ["w2", "w6"], _random_docs(g, 5, 8, 2, 20), b=0.0)
    yield _bm25_case("a single document", ["w1", "w2"], [["w1", "w2", "w2", "w3"]])


# ----------------------------------------------------------------------------------------------
# 6.10 Reciprocal-rank fusion (notebook 05)
# ----------------------------------------------------------------------------------------------
def _rrf_closed_form(rankings, k=60):
    ids = list(dict.fromkeys(d for r in rankings for d in r))  # first-seen order
    ranks = np.array([[r.index(d) + 1 if d in r else np.inf for d in ids] for r in rankings])  # (lists, ids)
    score = (1.0 / (k + ranks)).sum(0)
    order = np.argsort(-score, kind="stable")
    return [[ids[i], float(score[i])] for i in order]


def _rrf_case(name, rankings, hint=None, **kw) -> Case:
    def run(f):
        return [[str(d), float(s)] for d, s in f([list(r) for r in rankings], **kw)]
    return Case(name, run=run, expected=lambda: _rrf_closed_form(rankings, **kw), names="fused", atol=1e-12,
                rtol=1e-9, hint=hint)


@exercise("6.10", "Reciprocal-rank fusion", reference="course_utils.retrieval:reciprocal_rank_fusion",
          hint="score(d) = sum over the lists that contain d of 1 / (k + rank), rank counted from 1; return "
               "[(id, score), ...] for every id, highest score first, ties in the order ids first appear.")
def _():
    g = case_rng(610)
    ids = [f"p{i}" for i in range(12)]
    perm = lambda n: [ids[int(i)] for i in torch.randperm(len(ids), generator=g)[:n]]  # noqa: E731
    yield _rrf_case("two lists of 5 that overlap", [perm(5), perm(5)])
    yield _rrf_case("three lists of different lengths", [perm(8), perm(3), perm(6)])
    yield _rrf_case("one list: scores 1/(k+1), 1/(k+2), ...", [["a", "b", "c"]],
                    hint="the first rank is 1, not 0: the top item scores 1/(k+1)")
    yield _rrf_case("an id in only one of the lists still counts", [["a", "b"], ["c", "a"]])
    yield _rrf_case("disjoint lists: ties in first-seen order", [["a", "b"], ["c", "d"]],
                    hint="equal scores keep the order in which ids first appear (list by list); sort is stable")
    yield _rrf_case("k=1 given as a keyword (rank matters more)", [perm(6), perm(6)], k=1,
                    hint="use the k argument")
    yield _rrf_case("k=0", [["x", "y", "z"], ["z", "y", "x"], ["y"]], k=0)


# ----------------------------------------------------------------------------------------------
# 6.11 A calculator that never uses eval (notebook 06)
# ----------------------------------------------------------------------------------------------
def _no_eval(*args, **kwargs):
    raise RuntimeError("eval/exec are not allowed in this exercise: walk the ast instead")


def _calc_run(expression: str):
    def run(f):
        saved = builtins.eval, builtins.exec
        builtins.eval, builtins.exec = _no_eval, _no_eval
        try:
            value = f(expression)
        except ValueError:
            return ["ValueError"]
        finally:
            builtins.eval, builtins.exec = saved
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return ["not a number", repr(value)[:80]]
        return ["value", float(value)]
    return run


def _value_case(expression: str, hint=None) -> Case:
    # The checker evaluates expressions it wrote itself: Python's own arithmetic is the reference.
    return Case(f"{expression!r}", run=_calc_run(expression),
                expected=lambda: ["value", float(builtins.eval(expression.strip(), {"__builtins__": {}}))],
                names="result", atol=1e-9, rtol=1e-9, hint=hint)


def _refused_case(expression: str, hint: str) -> Case:
    return Case(f"{expression!r} must raise ValueError", run=_calc_run(expression), expected=lambda: ["ValueError"],
                names="result", hint=hint)


@exercise("6.11", "A safe calculator with ast", reference="course_utils.agents:calculate", time_limit=10.0,
          hint="ast.parse(expression.strip(), mode='eval'), then a recursive walk: Constant (int/float), BinOp with "
               "+ - * / // % **, UnaryOp with - and +; anything else raises ValueError, and so do SyntaxError, "
               "ZeroDivisionError and |exponent| > 100 (check the exponent BEFORE computing the power).")
def _():
    for expr in ("2 + 3 * 4", "(2 + 3) * 4", "7 / 2", "7 // 2", "-7 // 2", "10 % 4", "100 - 58 - 3"):
        yield _value_case(expr, hint="follow Python's operators: / is true division, // floor division, "
                                     "and a - b - c means (a - b) - c")
    yield _value_case("-3 ** 2", hint="unary minus: support ast.UnaryOp (USub); -3 ** 2 is -(3 ** 2) = -9")
    yield _value_case("+4 - -2")
    yield _value_case("2 ** -1 + 1.5e3")
    yield _value_case(" 12 * 35 ", hint="strip surrounding spaces before parsing")
    yield _value_case("2 ** 100")
    yield _refused_case("__import__('os').getpid()", "a call is not arithmetic: raise ValueError")
    yield _refused_case("abs(-3)", "a function call is not arithmetic: raise ValueError")
    yield _refused_case("x + 1", "a name is not a number: raise ValueError")
    yield _refused_case("(1).__class__", "attribute access is not arithmetic: raise ValueError")
    yield _refused_case("'ab' * 3", "only int and float constants: a string raises ValueError")
    yield _refused_case("1 < 2", "a comparison is not one of the allowed operators: raise ValueError")
    yield _refused_case("2 +", "a syntax error becomes ValueError (catch SyntaxError)")
    yield _refused_case("", "an empty expression is a syntax error: ValueError")
    yield _refused_case("1 / (3 - 3)", "division by zero becomes ValueError")
    yield _refused_case("2 ** 1000", "an exponent above 100 raises ValueError")
    yield _refused_case("9 ** 9 ** 9", "check the exponent BEFORE computing: 9 ** (9 ** 9) would never finish")


# ----------------------------------------------------------------------------------------------
# 6.12 Validating a tool call and writing the error message (notebook 06)
# ----------------------------------------------------------------------------------------------
CALC = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"],
        "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
           "required": ["city"], "additionalProperties": False}
SCHEMAS = {"calculator": CALC, "weather": WEATHER}


def _call_compare(got, expected):
    if not (isinstance(got, (list, tuple)) and len(got) == 2):
        return f"return a pair (call, error); got {str(got)[:120]}"
    call, error = got
    if expected[0] == "ok":
        if error is not None:
            return f"this call is valid: expected (call, None), got the error {str(error)[:200]!r}"
        if call != expected[1]:
            return f"the call should be the parsed JSON object {expected[1]}, got {str(call)[:200]}"
        return None
    if call is not None:
        return f"this call is invalid ({expected[1]}...): expected (None, message), got the call {str(call)[:200]}"
    if not isinstance(error, str) or not error.startswith(expected[1]):
        return f"the error message should start with {expected[1]!r}; got {str(error)[:200]!r}"
    missing = [w for w in expected[2] if w not in error]
    if missing:
        return f"the error message should name {missing} so the model can fix its call; got {error[:200]!r}"
    return None


def _call_case(name: str, text: str, expected: tuple, schemas: dict | None = None, hint=None) -> Case:
    schemas = schemas or SCHEMAS
    return Case(name, run=lambda f: list(f(text, json.loads(json.dumps(schemas)))), expected=lambda: expected,
                compare=_call_compare, hint=hint)


@exercise("6.12", "Validate a tool call with jsonschema", reference="course_utils.agents:validate_call",
          hint="Find the first '{', json.JSONDecoder().raw_decode from there; validate {'tool': str, 'arguments': "
               "object} (exactly those keys); look the tool up in `schemas`; jsonschema.validate the arguments. "
               "Errors start with 'invalid JSON:', 'invalid call:', 'unknown tool:' or 'invalid arguments for <tool>:'.")
def _():
    ok = {"tool": "calculator", "arguments": {"expression": "12 * 35"}}
    yield _call_case("a valid call", json.dumps(ok), ("ok", ok))
    yield _call_case("a valid call with words around it, and a '}' after it",
                     f"Let me compute. {json.dumps(ok)} Done }}", ("ok", ok),
                     hint="decode ONE object from the first '{' (raw_decode), ignore what follows")
    w = {"tool": "weather", "arguments": {"city": "Velka", "unit": "C"}}
    yield _call_case("a valid call of another tool (use the schemas you are given)", json.dumps(w), ("ok", w))
    yield _call_case("no JSON at all", "The answer is 420.", ("error", "invalid JSON:", []))
    yield _call_case("a truncated object", '{"tool": "calculator", "arguments": {"expression": "1 +',
                     ("error", "invalid JSON:", []))
    yield _call_case("Python quotes instead of JSON", "{'tool': 'calculator', 'arguments': {'expression': '1'}}",
                     ("error", "invalid JSON:", []))
    yield _call_case("arguments missing", '{"tool": "calculator"}', ("error", "invalid call:", ["arguments"]))
    yield _call_case("tool is not a string", '{"tool": 3, "arguments": {}}', ("error", "invalid call:", []))
    yield _call_case("an extra key", '{"tool": "calculator", "arguments": {"expression": "1"}, "why": "x"}',
                     ("error", "invalid call:", ["why"]), hint="only the keys 'tool' and 'arguments' are allowed")
    yield _call_case("an unknown tool", '{"tool": "calc", "arguments": {"expression": "1"}}',
                     ("error", "unknown tool:", ["calc", "calculator", "weather"]),
                     hint="name the unknown tool and list the known ones")
    yield _call_case("a required argument missing", '{"tool": "calculator", "arguments": {"expr": "1"}}',
                     ("error", "invalid arguments for calculator:", ["expression"]))
    yield _call_case("an argument of the wrong type", '{"tool": "calculator", "arguments": {"expression": 12}}',
                     ("error", "invalid arguments for calculator:", []))
    yield _call_case("a value outside the enum", '{"tool": "weather", "arguments": {"city": "Velka", "unit": "K"}}',
                     ("error", "invalid arguments for weather:", ["K"]))
