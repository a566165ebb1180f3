"""Answer extraction and comparison for Rho-1's math protocol (math-evaluation-harness style).

``extract_answer(text)``: the content of the last ``\\boxed{...}`` (balanced braces), else what
follows the last "The answer is", else the last number; ``normalize_answer`` then strips what
does not change the value: ``$``, ``\\text{units}`` and unit words, ``\\left/\\right``, ``%``,
degrees, thousands commas, trailing dots and zeros, ``x =``, and rewrites ``\\dfrac``/``\\tfrac``,
``\\frac12`` and ``a/b`` as ``\\frac{a}{b}``. ``is_equiv`` compares two normalised answers as
strings, then as numbers (fractions and percentages evaluated, relative tolerance 1e-4).

No dependency beyond the standard library: lm-eval task code and unit tests import it directly.
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?\d*\.?\d+")
_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is:?", re.UNICODE)
# Units that follow a number in GSM8K/MATH answers; removed when something remains.
_UNITS = (
    "dollars dollar cents cent percent degrees degree units unit square feet foot ft inches "
    "inch meters meter metres metre cm mm km kg grams gram g miles mile mph hours hour minutes "
    "minute min seconds second sec days day weeks week months month years year pounds pound lbs "
    "lb ounces ounce oz liters liter litres litre gallons gallon cups cup people students apples "
    "marbles books stamps shells pencils toys cars"
).split()
_UNIT_RE = re.compile(r"(?<![\w\\])(?:sq\.?\s+)?(?:" + "|".join(_UNITS) + r")\b\.?")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces balanced);
    ``\\boxed 5`` (no brace) gives ``5``; None when there is none."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:].split("{", 1)
    head = text[idx:].split(None, 1)
    if len(rest) == 1 or (len(head) > 1 and "{" not in head[0]):
        # "\boxed 5$": the token after the command.
        return head[1].split("$")[0].strip() if len(head) > 1 else None
    depth, out = 1, []
    for ch in rest[1]:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return "".join(out)
        out.append(ch)
    return None  # unbalanced: the generation was cut inside the box


def extract_answer(text: str) -> str:
    """The model's final answer in ``text`` (normalised); ``""`` when there is none."""
    boxed = last_boxed(text)
    if boxed is not None:
        answer = boxed
    else:
        parts = _ANSWER_IS.split(text)
        if len(parts) > 1:
            answer = parts[-1].strip()
            # The sentence ends at a period followed by space/newline (not a decimal point).
            answer = re.split(r"\.(?:\s|$)|\n", answer, maxsplit=1)[0]
        else:
            numbers = _NUMBER.findall(text.replace(",", ""))
            answer = numbers[-1] if numbers else ""
    return normalize_answer(answer)


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    return re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)


def normalize_answer(answer: str) -> str:
    s = str(answer).strip().replace("\n", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    # Units: a trailing \text{...} / \mbox{...}, then unit words, when something remains.
    stripped = re.sub(r"\\(?:text|mbox)\{[^{}]*\}\s*$", "", s).strip()
    s = stripped or s
    stripped = _UNIT_RE.sub("", s).strip()
    s = stripped or s
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.strip().rstrip(".").strip()
    # "x = 5", "k=5": the value.
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1].strip()
    s = s.replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    # 5.0 -> 5, 2.50 -> 2.5; .5 -> 0.5
    s = re.sub(r"(\d+\.\d*?)0+$", r"\1", s)
    s = re.sub(r"(\d+)\.$", r"\1", s)
    if s.startswith("."):
        s = "0" + s
    s = s.replace("-.", "-0.")
    s = _fix_fracs(s)
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    return s


def _as_number(s: str) -> float | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if m:
        den = float(m.group(3))
        if den == 0:
            return None
        value = float(m.group(2)) / den
        return -value if m.group(1) else value
    try:
        return float(s)
    except ValueError:
        return None


def is_equiv(prediction: str, gold: str) -> bool:
    """Normalised answers equal as strings, or as numbers within a relative 1e-4."""
    if prediction == "" or gold == "":
        return False
    if prediction == gold:
        return True
    a, b = _as_number(prediction), _as_number(gold)
    if a is None or b is None:
        return False
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-8)
