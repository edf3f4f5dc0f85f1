"""A tool-using agent (week 6): a JSON call format checked by a schema, three tools (a calculator that
parses with `ast`, search over the planets, sandboxed Python), the reason-call-observe-answer loop with
a step limit, evaluation with a failure taxonomy, and training traces for LoRA fine-tuning.

The model writes one JSON object per turn: a call {"tool": ..., "arguments": {...}} or a final
{"answer": ...}. A malformed turn is not fatal: the loop feeds back an error that says what was
wrong, as production agents do (ReAct, Yao et al., 2023; Toolformer, Schick et al., 2023). Production
frameworks add parallel calls, streaming and a model trained on a native tool format.
"""
from __future__ import annotations

import ast
import json
import operator
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jsonschema

from .retrieval import chat_generate, exact_match

# ----------------------------------------------------------------------------------------------
# The task suite (datasets/tool_tasks)
# ----------------------------------------------------------------------------------------------
def load_tool_tasks(split: str = "test") -> list[dict]:
    """Tasks {"id", "kind", "question", "tool", "arguments", "answer"}: "test" (130, held out) or "train" (340)."""
    from .data import load_project_dataset

    return load_project_dataset("tool_tasks", split, ("test", "train"))


# ----------------------------------------------------------------------------------------------
# The call format and its schemas
# ----------------------------------------------------------------------------------------------
TOOL_SCHEMAS: dict[str, dict] = {
    "calculator": {"type": "object", "properties": {"expression": {"type": "string", "minLength": 1}},
                   "required": ["expression"], "additionalProperties": False},
    "search": {"type": "object", "properties": {"query": {"type": "string", "minLength": 1}},
               "required": ["query"], "additionalProperties": False},
    "python": {"type": "object", "properties": {"code": {"type": "string", "minLength": 1}},
               "required": ["code"], "additionalProperties": False},
}
TOOL_DOCS = {"calculator": 'arithmetic with + - * / ** and brackets, e.g. {"expression": "12 * (3 + 4)"}',
             "search": 'finds passages about the planets, e.g. {"query": "capital of Shaith"}',
             "python": 'runs a short Python program and returns what it prints, e.g. {"code": "print(2 ** 10)"}'}
CALL_SCHEMA = {"type": "object", "properties": {"tool": {"type": "string"}, "arguments": {"type": "object"}},
               "required": ["tool", "arguments"], "additionalProperties": False}


def validate_call(text: str, schemas: dict[str, dict]) -> tuple[dict | None, str | None]:
    """Parse and validate a model's tool call (exercise 6.12): (call, None) or (None, error message).

    The JSON object starts at the first '{' (text around it is ignored). Errors start with
    "invalid JSON:", "invalid call:" (not {"tool": str, "arguments": object}), "unknown tool:" (naming
    the tool and the known ones) or "invalid arguments for <tool>:" (the schema's message).
    """
    start = text.find("{")
    if start < 0:
        return None, "invalid JSON: no '{' found; reply with one JSON object"
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at character {e.pos}"
    try:
        jsonschema.validate(obj, CALL_SCHEMA)
    except jsonschema.ValidationError as e:
        return None, f'invalid call: {e.message}; write {{"tool": NAME, "arguments": {{...}}}}'
    if obj["tool"] not in schemas:
        return None, f"unknown tool: {obj['tool']!r}; the tools are {', '.join(sorted(schemas))}"
    try:
        jsonschema.validate(obj["arguments"], schemas[obj["tool"]])
    except jsonschema.ValidationError as e:
        return None, f"invalid arguments for {obj['tool']}: {e.message}"
    return obj, None


def parse_turn(text: str, schemas: dict[str, dict] = TOOL_SCHEMAS) -> tuple[str, Any]:
    """One model turn -> ("answer", value) | ("call", call) | ("error", message for the model)."""
    start = text.find("{")
    if start >= 0:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            if isinstance(obj, dict) and set(obj) == {"answer"}:
                return "answer", str(obj["answer"])
        except json.JSONDecodeError:
            pass
    call, error = validate_call(text, schemas)
    return ("call", call) if error is None else ("error", error)


# ----------------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPONENT = 100


def calculate(expression: str) -> int | float:
    """Evaluate arithmetic safely (exercise 6.11): strip spaces, walk the `ast`, allow only numbers, + - * / // % ** and
    unary +/-, never `eval`. Anything else, a syntax error, division by zero or |exponent| > 100 -> ValueError."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None

    def walk(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
            try:
                return _OPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
        raise ValueError(f"not allowed in arithmetic: {type(node).__name__}")

    return walk(tree)


def format_number(x: int | float) -> str:
    """2418 -> '2418'; 2418.0 -> '2418'; 3.5 -> '3.5'; 1/3 -> '0.333333'."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x) if isinstance(x, int) else f"{x:.6g}"


def python_tool(code: str, *, seconds: float = 5.0, memory_mb: int = 512) -> str:
    """Run `code` in the course's bubblewrap sandbox (course_utils.tools.sandbox): no network, a throwaway
    scratch folder, read-only system, time/memory/process limits. Returns what it printed, or the error."""
    from .tools import sandbox

    exe = sandbox.bwrap_path()
    if exe is None:
        return f"error: the python tool is disabled: {sandbox.unavailable_reason()}"
    with tempfile.TemporaryDirectory(prefix="course-python-") as tmp:
        work, out = Path(tmp) / "work", Path(tmp) / "out"
        work.mkdir()
        out.mkdir()
        (work / "main.py").write_text(code, encoding="utf-8")
        limits = sandbox.Limits(seconds=seconds, memory_mb=memory_mb, processes=32, file_mb=8, output_mb=1)
        res = sandbox.run([sys.executable, "-I", "main.py"], work=work, out=out, env=sandbox.base_env(),
                          limits=limits, exe=exe)
    if res.timed_out:
        return f"error: the program ran longer than {seconds:g} s and was stopped"
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"error: the program failed: {last[-300:]}"
    return res.stdout.strip()[-500:] or "(the program printed nothing; use print())"


def make_tools(search_index: Any = None, *, k: int = 2, passages: list[dict] | None = None) -> dict[str, Callable[[dict], str]]:
    """Tool name -> function(arguments) -> text the model reads. Search shows the top-k passages with ids
    (`passages`: the texts behind the index's ids; default the project's documents), only those that share a
    word with the query: an empty result says so instead of showing unrelated passages."""
    from .retrieval import load_passages

    texts = {p["id"]: p["text"] for p in (load_passages() if passages is None else passages)}

    def calculator(args: dict) -> str:
        try:
            return format_number(calculate(args["expression"]))
        except ValueError as e:
            return f"error: {e}"

    def search(args: dict) -> str:
        if search_index is None:
            return "error: no search index"
        hits = [(i, s) for i, s in search_index.search(args["query"], k) if s > 0]
        if not hits:
            return f"no passage matches {args['query']!r}; search again with other words (a planet's name, a topic)"
        return "\n".join(f"[{i}] {texts[i]}" for i, _ in hits)

    return {"calculator": calculator, "search": search, "python": lambda args: python_tool(args["code"])}


def call_tool(tools: dict[str, Callable[[dict], str]], call: dict, *, seconds: float = 10.0) -> str:
    """Run one validated call and always return text for the model: a tool that raises, hangs past `seconds` or
    is missing becomes an "error: ..." observation, so one bad tool never ends the episode (or the batch).

    A thread cannot be killed: a hung in-process tool is abandoned, not stopped (the python tool really is
    stopped, by its sandbox). Production agents run every tool in a separate process for that reason.
    """
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    name = call["tool"]
    if name not in tools:
        return f"error: unknown tool {name!r}; the tools are {', '.join(sorted(tools))}"
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return str(pool.submit(tools[name], call["arguments"]).result(timeout=seconds))
    except FutureTimeout:
        return f"error: the {name} tool took longer than {seconds:g} s; it was abandoned, try a simpler call"
    except Exception as e:  # noqa: BLE001 - any tool failure becomes a message for the model
        return f"error: the {name} tool failed: {type(e).__name__}: {e}"
    finally:
        pool.shutdown(wait=False)


# ----------------------------------------------------------------------------------------------
# Prompts and the agent loop
# ----------------------------------------------------------------------------------------------
SYSTEM = ("You can use tools. To call a tool, reply with only a JSON object "
          '{{"tool": NAME, "arguments": {{...}}}}. The tools:\n{tools}\n'
          'When you have the tool result, reply with only {{"answer": "..."}}.')
EXAMPLE = [{"role": "user", "content": "A box holds 12 eggs. How many eggs are in 35 boxes?"},
           {"role": "assistant", "content": '{"tool": "calculator", "arguments": {"expression": "12 * 35"}}'},
           {"role": "user", "content": "Result: 420"},
           {"role": "assistant", "content": '{"answer": "420"}'}]


def system_prompt(tools: list[str] | None = None) -> str:
    return SYSTEM.format(tools="\n".join(f"- {t}: {TOOL_DOCS[t]}" for t in (tools or list(TOOL_DOCS))))


def agent_messages(question: str, *, example: bool = True) -> list[dict]:
    """The start of an episode: system message with the tools, optionally the worked example, the question."""
    return [{"role": "system", "content": system_prompt()}, *(EXAMPLE if example else []),
            {"role": "user", "content": question}]


@dataclass
class Episode:
    question: str
    turns: list[dict] = field(default_factory=list)  # per turn: reply, kind, call, error, observation, seconds
    answer: str | None = None
    messages: list[dict] = field(default_factory=list)


def observe(tool: str, observation: str) -> str:
    """How a tool result goes back to the model (the format the training traces use)."""
    return f"Result: {observation}"


def run_agents(model: Any, tokenizer: Any, questions: list[str], tools: dict[str, Callable[[dict], str]], *,
               max_steps: int = 3, example: bool = True, max_new_tokens: int = 64, batch_size: int = 8,
               progress: Any = None, generate: Callable[..., list[str]] | None = None,
               policy: Callable[[Episode, dict], str | None] | None = None,
               observe: Callable[[str, str], str] = observe, tool_seconds: float = 10.0) -> list[Episode]:
    """Run the loop (reason -> call -> observe -> answer) for many questions at once, one batched step per turn.

    A malformed turn gets the validation error back as the next user message; after `max_steps` model turns
    without an answer the episode stops unanswered. Optional: `generate(conversations, max_new_tokens=,
    batch_size=)` replaces the local model (e.g. an OpenAI-compatible endpoint); `policy(episode, call)`
    returns a refusal message to block a call before it runs; `observe(tool, text)` formats tool results.
    """
    schemas = {name: TOOL_SCHEMAS.get(name, {"type": "object"}) for name in tools}
    generate = generate or (lambda convs, **kw: chat_generate(model, tokenizer, convs, **kw))
    episodes = [Episode(q, messages=agent_messages(q, example=example)) for q in questions]
    for _ in range(max_steps):
        live = [e for e in episodes if e.answer is None]
        if not live:
            break
        start = time.perf_counter()
        replies = generate([e.messages for e in live], max_new_tokens=max_new_tokens, batch_size=batch_size)
        seconds = (time.perf_counter() - start) / len(live)  # amortised over the batch
        for e, reply in zip(live, replies):
            kind, value = parse_turn(reply, schemas)
            refusal = policy(e, value) if kind == "call" and policy is not None else None
            turn = {"reply": reply, "kind": kind, "call": value if kind == "call" else None,
                    "error": value if kind == "error" else refusal, "observation": None, "seconds": seconds,
                    "refused": refusal is not None}
            e.messages.append({"role": "assistant", "content": reply})
            if kind == "answer":
                e.answer = value
            elif refusal is not None:
                e.messages.append({"role": "user", "content": f"Refused: {refusal}"})
            elif kind == "call":
                turn["observation"] = call_tool(tools, value, seconds=tool_seconds)
                e.messages.append({"role": "user", "content": observe(value["tool"], turn["observation"])})
            else:
                e.messages.append({"role": "user", "content": f"Error: {value}. Try again."})
            e.turns.append(turn)
        if progress is not None:
            progress.update(1)
    return episodes


# ----------------------------------------------------------------------------------------------
# Evaluation and the failure taxonomy
# ----------------------------------------------------------------------------------------------
FAILURES = ("answered without a tool", "malformed call", "wrong tool", "wrong arguments",
            "right call, wrong answer", "step limit")


def _arguments_ok(task: dict, call: dict, observation: str | None) -> bool:
    """Arguments judged by effect: the expression's value, the gold passage in the results, the program's output."""
    if task["tool"] == "calculator":
        try:
            return exact_match(format_number(calculate(call["arguments"]["expression"])), task["answer"])
        except ValueError:
            return False
    if task["tool"] == "search":
        return f"[{task['passage_id']}]" in (observation or "")
    return exact_match(observation or "", task["answer"])


def score_episode(task: dict, ep: Episode) -> dict:
    """Success, valid-call rate, tool and argument correctness, steps and the failure category of one episode."""
    calls = [t for t in ep.turns if t["kind"] == "call"]
    attempts = [t for t in ep.turns if t["kind"] != "answer"]
    first = calls[0] if calls else None
    success = ep.answer is not None and exact_match(ep.answer, task["answer"])
    right_tool = first is not None and first["call"]["tool"] == task["tool"]
    args_ok = right_tool and _arguments_ok(task, first["call"], first["observation"])
    squeeze = lambda args: json.dumps(args, sort_keys=True).replace(" ", "")  # noqa: E731 - spaces do not count
    exact_args = right_tool and squeeze(first["call"]["arguments"]) == squeeze(task["arguments"])
    if success:
        failure = None
    elif ep.answer is None and not calls and attempts:
        failure = "malformed call"
    elif ep.answer is None:
        failure = "step limit" if right_tool and args_ok else ("malformed call" if not calls else
                                                                "wrong tool" if not right_tool else "wrong arguments")
    elif not calls:
        failure = "answered without a tool"
    elif not right_tool:
        failure = "wrong tool"
    elif not args_ok:
        failure = "wrong arguments"
    else:
        failure = "right call, wrong answer"
    return {"id": task.get("id"), "kind": task.get("kind"), "success": success,
            "valid_calls": sum(t["kind"] == "call" for t in attempts), "call_attempts": len(attempts),
            "right_tool": right_tool, "right_arguments": args_ok, "exact_arguments": exact_args, "steps": len(ep.turns),
            "seconds_per_turn": sum(t["seconds"] for t in ep.turns) / max(len(ep.turns), 1), "failure": failure}


def summarize(scores: list[dict]) -> dict:
    """Suite metrics: rates with 95% Wilson intervals, mean steps and seconds per turn, failure counts."""
    from .metrics import proportion_ci

    n = len(scores)
    valid, attempts = sum(s["valid_calls"] for s in scores), sum(s["call_attempts"] for s in scores)
    return {"n": n, "success": proportion_ci([s["success"] for s in scores]),
            "valid_call_rate": proportion_ci(valid, attempts) if attempts else (float("nan"),) * 3,
            "call_attempts": attempts, "right_tool": proportion_ci([s["right_tool"] for s in scores]),
            "right_arguments": proportion_ci([s["right_arguments"] for s in scores]),
            "exact_arguments": proportion_ci([s["exact_arguments"] for s in scores]),
            "mean_steps": sum(s["steps"] for s in scores) / max(n, 1),
            "seconds_per_turn": sum(s["seconds_per_turn"] for s in scores) / max(n, 1),
            "failures": {f: sum(s["failure"] == f for s in scores) for f in FAILURES}}


def direct_answers(model: Any, tokenizer: Any, questions: list[str], **kw: Any) -> list[str]:
    """The no-tools baseline: the model answers each question itself, with a number or a few words."""
    system = "Answer the question. Reply with only the final answer: a number or a few words."
    return chat_generate(model, tokenizer, [[{"role": "system", "content": system}, {"role": "user", "content": q}]
                                            for q in questions], **kw)


# ----------------------------------------------------------------------------------------------
# Training traces for supervised fine-tuning (only the assistant's turns are learned)
# ----------------------------------------------------------------------------------------------
def trace_messages(task: dict, tools: dict[str, Callable[[dict], str]], *, example: bool = False) -> list[dict]:
    """A correct episode for a training task: the call, the real tool result, the answer."""
    call = {"tool": task["tool"], "arguments": task["arguments"]}
    return [*agent_messages(task["question"], example=example),
            {"role": "assistant", "content": json.dumps(call)},
            {"role": "user", "content": f"Result: {tools[task['tool']](task['arguments'])}"},
            {"role": "assistant", "content": json.dumps({"answer": task["answer"]})}]


def assistant_labels(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a ChatML conversation; labels are -100 except on the assistant's replies."""
    ids, labels = [], []
    for m in messages:
        head = tokenizer.encode(f"<|im_start|>{m['role']}\n", add_special_tokens=False)
        body = tokenizer.encode(f"{m['content']}<|im_end|>\n", add_special_tokens=False)
        ids += head + body
        labels += [-100] * len(head) + (body if m["role"] == "assistant" else [-100] * len(body))
    return ids, labels
