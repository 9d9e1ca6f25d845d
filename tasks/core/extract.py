"""Taking code out of a model's answer the way a careful user would."""
from __future__ import annotations

import ast
import re

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def last_fenced_block(text: str) -> str | None:
    """The last fenced code block; an unterminated final fence counts (the answer hit max tokens)."""
    blocks = [body for _lang, body in FENCE.findall(text)]
    blocks = [b for b in blocks if b.strip()]
    return blocks[-1] if blocks else None


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return bool(re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE))
    return any(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
        for node in ast.walk(tree)
    )


def _prompt_prefix(prompt: str, entry_point: str) -> str:
    """The prompt up to the entry point's `def` line: imports and helper functions it relies on."""
    match = re.search(rf"^(async\s+)?def\s+{re.escape(entry_point)}\s*\(", prompt, re.MULTILINE)
    return prompt[: match.start()] if match else prompt


def _as_body(code: str) -> str:
    lines = code.splitlines()
    if any(line.strip() and not line.startswith((" ", "\t")) for line in lines):
        return "\n".join("    " + line if line.strip() else line for line in lines)
    return code


def program_from_answer(prompt: str, entry_point: str, answer: str) -> str | None:
    """The program to test: the last fenced block (completing the prompt's context when it
    redefines the entry point, else as the function's body); with no fence, the bare answer
    as a body. None when nothing code-like is there."""
    code = last_fenced_block(answer)
    if code is None:
        code = answer if answer.strip() else None
        if code is None:
            return None
    if defines(code, entry_point):
        return _prompt_prefix(prompt, entry_point) + code
    return prompt + _as_body(code)


def one_line_stub(text: str) -> bool:
    """Empty answers and one-line stubs, the only samples the paper drops."""
    code = last_fenced_block(text) or text
    lines = [l for l in code.splitlines() if l.strip() and not l.strip().startswith("#")]
    return len(lines) <= 1
