"""The tools a model may call: a calculator, a unit converter and a lookup table, and how a call is checked and run.

    call = read_tool_call('{"name": "calculator", "arguments": {"expression": "48 / 2"}}')   # a <tool_call> block
    call.well_formed, call.error, call.result          # True, None, "24"  (the text of the `tool` message)
    conversations = converse_with_tools(reply_fn, [(messages, TOOL_SCHEMAS)], max_turns=5)   # a model, the tools

Each tool is a pure Python function of its JSON arguments returning a short text; TOOL_SCHEMAS describes them in
the OpenAI function format, which the chat template renders in the system turn (dataset/chat_format.py). A call
that cannot be run never raises: its problem comes back as the result ("error: ..."), the `tool` message the model
reads next, as a tool's error reaches the model in an agent loop. Two kinds of failure are told apart:

    malformed call   the block is not a JSON object {"name": <a tool>, "arguments": {...}} whose arguments fit the
                     tool's schema (well_formed False): the model has not learned the format
    tool error       a well-formed call the tool refuses ("2 / 0", "import os" for the calculator): error is set

No tool touches the network, a file (the lookup table is read once, from the repository) or the clock, and the
work of a call is bounded by its input, so no call can hang a rollout: the calculator takes at most
MAX_EXPRESSION_CHARS characters and refuses, before computing it, any number or power beyond MAX_MAGNITUDE.

converse_with_tools holds conversations message by message: the model's reply, the results of its calls as tool
messages, the next reply, until a reply calls nothing or the turns run out. The evaluation and the web demo use it
(with a local model or an OpenAI-compatible server behind reply_fn); the trainer rolls out on token ids instead
(trainer/train_agent.py), to keep the very tokens it sampled.

The tools live here, in dataset/, because the trainer (trainer/train_agent.py), the evaluation
(eval/eval_toolcall.py) and the web demo (scripts/web_demo.py) all run them, and dataset/ is the package the three
may all import (DESIGN.md: trainer/, scripts/ and eval/ import dataset/, never each other's scripts). They belong to
the conversation format as chat_format.py does: their schemas are part of the prompt, their results its `tool`
messages.
"""

import ast
import json
import math
import operator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from dataset.chat_format import TOOL_CALL_OPEN

LOOKUP_TABLE = Path(__file__).resolve().parent / "data" / "agent" / "lookup_table.json"
MAX_EXPRESSION_CHARS = 200  # bounds the parse and the number of operations (about one per two characters)
MAX_MAGNITUDE = 10 ** 15  # the largest |number| the calculator accepts or produces (money, counts, distances)
SIGNIFICANT_DIGITS = 10  # of a non-integer result: 2 / 3 -> 0.6666666667


class ToolError(ValueError):
    """A tool refused its arguments; the message is one sentence meant for the model (it becomes the tool message)."""


# ----------------------------------------------------------------------------------------------------------------
# calculator: arithmetic on an AST, nothing else


ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Mod: operator.mod, ast.Pow: operator.pow}
ALLOWED = "numbers, + - * / ** %, parentheses and unary minus"
REFUSED_NODES = {ast.Name: "a name", ast.Attribute: "attribute access", ast.Call: "a function call",
                 ast.Subscript: "indexing", ast.Tuple: "a comma (write 1200, not 1,200)", ast.Compare: "a comparison",
                 ast.BoolOp: "and/or", ast.Lambda: "a lambda", ast.JoinedStr: "a string", ast.List: "a list",
                 ast.Dict: "a dict", ast.Set: "a set"}


def format_number(value: int | float) -> str:
    """A result as the model reads it: integers exactly ("24", also for 24.0), others to SIGNIFICANT_DIGITS digits."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.{SIGNIFICANT_DIGITS}g}"


def checked(value: int | float) -> int | float:
    """`value` if it is a finite real number of magnitude at most MAX_MAGNITUDE. Raises ToolError otherwise."""
    if isinstance(value, complex):
        raise ToolError("the result is not a real number (a fractional power of a negative number)")
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise ToolError(f"a number or result is larger than {MAX_MAGNITUDE:.0e}; the calculator refuses it")
    return value


def power(base: int | float, exponent: int | float) -> int | float:
    """base ** exponent, refused before it is computed when |result| would pass MAX_MAGNITUDE (so 9 ** 9 ** 9 costs
    nothing): log10 |result| = exponent * log10 |base|."""
    if base == 0 and exponent < 0:
        raise ToolError("zero cannot be raised to a negative power")
    if base != 0 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise ToolError(f"{format_number(base)} ** {format_number(exponent)} is larger than {MAX_MAGNITUDE:.0e}; "
                        "the calculator refuses it")
    return checked(base ** exponent)


def evaluate_node(node: ast.AST) -> int | float:
    """The value of an arithmetic expression tree: numbers, + - * / ** %, unary minus. Raises ToolError on anything
    else (names, calls, attributes, strings, ...) or on division by zero."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool: True is an int in Python
        return checked(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -evaluate_node(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        left, right = evaluate_node(node.left), evaluate_node(node.right)
        if isinstance(node.op, ast.Pow):
            return power(left, right)
        if isinstance(node.op, (ast.Div, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        return checked(ARITHMETIC[type(node.op)](left, right))
    if isinstance(node, ast.Constant):
        found = "a string" if isinstance(node.value, (str, bytes)) else f"the constant {node.value!r}"
    elif isinstance(node, ast.BinOp):
        found = "the operator " + {ast.FloorDiv: "//", ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>",
                                   ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^"}.get(type(node.op), "?")
    elif isinstance(node, ast.UnaryOp):
        found = "the operator " + {ast.UAdd: "unary +", ast.Not: "not", ast.Invert: "~"}.get(type(node.op), "?")
    else:
        found = REFUSED_NODES.get(type(node), type(node).__name__)
    raise ToolError(f"{found} is not arithmetic; the calculator takes only {ALLOWED}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / ** %, parentheses and unary minus; nothing else.

    The expression is parsed by Python's own parser (ast, mode "eval") and the tree is evaluated node by node, so a
    name, an attribute, a call or a string is refused rather than run. The work is bounded: at most
    MAX_EXPRESSION_CHARS characters, and every number and intermediate result at most MAX_MAGNITUDE in size
    (powers are checked before they are computed). Division is true division (7 / 2 = 3.5), as in GSM8K's own
    calculator annotations ("<<48/2=24>>").

    Returns:
        the value as text: "24", "3.5", "0.6666666667".
    Raises:
        ToolError: not arithmetic, too long, too large, division by zero.
    """
    text = expression.strip()
    if not text:
        raise ToolError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression has {len(text)} characters; the calculator takes at most "
                        f"{MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):  # ValueError: a null byte
        raise ToolError(f"{text!r} is not an arithmetic expression; the calculator takes only {ALLOWED}") from None
    return format_number(evaluate_node(tree.body))


# ----------------------------------------------------------------------------------------------------------------
# convert_units: linear units by their exact definitions, and the three temperature scales


# {unit: (dimension, size in the dimension's base unit, names)}; the sizes are the exact definitions of the
# international yard and pound (1959) and of US customary volume (NIST Handbook 44, Appendix C)
UNITS = {
    "mm": ("length", 0.001, ("millimeter", "millimeters", "millimetre", "millimetres")),
    "cm": ("length", 0.01, ("centimeter", "centimeters", "centimetre", "centimetres")),
    "m": ("length", 1.0, ("meter", "meters", "metre", "metres")),
    "km": ("length", 1000.0, ("kilometer", "kilometers", "kilometre", "kilometres")),
    "in": ("length", 0.0254, ("inch", "inches")),
    "ft": ("length", 0.3048, ("foot", "feet")),
    "yd": ("length", 0.9144, ("yard", "yards")),
    "mi": ("length", 1609.344, ("mile", "miles")),
    "mg": ("mass", 1e-6, ("milligram", "milligrams")),
    "g": ("mass", 0.001, ("gram", "grams")),
    "kg": ("mass", 1.0, ("kilogram", "kilograms")),
    "t": ("mass", 1000.0, ("tonne", "tonnes", "metric ton", "metric tons")),
    "oz": ("mass", 0.028349523125, ("ounce", "ounces")),
    "lb": ("mass", 0.45359237, ("pound", "pounds", "lbs")),
    "s": ("time", 1.0, ("second", "seconds", "sec")),
    "min": ("time", 60.0, ("minute", "minutes")),
    "h": ("time", 3600.0, ("hour", "hours", "hr")),
    "day": ("time", 86400.0, ("days", "d")),
    "week": ("time", 604800.0, ("weeks", "wk")),
    "ml": ("volume", 0.001, ("milliliter", "milliliters", "millilitre", "millilitres")),
    "l": ("volume", 1.0, ("liter", "liters", "litre", "litres")),
    "tsp": ("volume", 0.00492892159375, ("teaspoon", "teaspoons")),
    "tbsp": ("volume", 0.01478676478125, ("tablespoon", "tablespoons")),
    "fl oz": ("volume", 0.0295735295625, ("fluid ounce", "fluid ounces")),
    "cup": ("volume", 0.2365882365, ("cups",)),
    "pt": ("volume", 0.473176473, ("pint", "pints")),
    "qt": ("volume", 0.946352946, ("quart", "quarts")),
    "gal": ("volume", 3.785411784, ("gallon", "gallons")),
    "m/s": ("speed", 1.0, ("meters per second", "metres per second")),
    "km/h": ("speed", 1000 / 3600, ("kph", "kilometers per hour", "kilometres per hour")),
    "mph": ("speed", 1609.344 / 3600, ("miles per hour",)),
}
# temperature scales are affine: {unit: (kelvin at 0 of the scale, kelvin per degree, names)}
TEMPERATURES = {"C": (273.15, 1.0, ("celsius", "degc", "°c")),
                "F": (273.15 - 32 * 5 / 9, 5 / 9, ("fahrenheit", "degf", "°f")),
                "K": (0.0, 1.0, ("kelvin",))}


@cache
def unit_names() -> dict[str, str]:
    """{every accepted name, lower case: its unit symbol}: "feet" -> "ft", "ft" -> "ft"."""
    table = {**UNITS, **TEMPERATURES}
    return {name.lower(): unit for unit, entry in table.items() for name in (unit, *entry[-1])}


def unit_symbol(name: str, argument: str) -> str:
    """The symbol of a unit named `name` (any case, surrounding spaces ignored). Raises ToolError naming
    `argument` when the unit is unknown."""
    symbol = unit_names().get(" ".join(name.lower().split()))
    if symbol is None:
        raise ToolError(f"{argument} {name!r} is not a unit the converter knows; it knows "
                        f"{', '.join([*UNITS, *TEMPERATURES])}")
    return symbol


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert `value` from one unit to another of the same dimension (length, mass, time, volume, speed,
    temperature), by the units' exact definitions (NIST Handbook 44, Appendix C; the temperature scales' zeros).

    Returns:
        the converted value and its unit: "3.106855961 mi".
    Raises:
        ToolError: an unknown unit, units of different dimensions, a value out of range.
    """
    source, target = unit_symbol(from_unit, "from_unit"), unit_symbol(to_unit, "to_unit")
    checked(value)
    if (source in TEMPERATURES) != (target in TEMPERATURES) or (
            source in UNITS and target in UNITS and UNITS[source][0] != UNITS[target][0]):
        kinds = [UNITS[unit][0] if unit in UNITS else "temperature" for unit in (source, target)]
        raise ToolError(f"cannot convert {source} ({kinds[0]}) to {target} ({kinds[1]})")
    if source in TEMPERATURES:
        (zero_in, step_in, _), (zero_out, step_out, _) = TEMPERATURES[source], TEMPERATURES[target]
        kelvin = zero_in + value * step_in
        if kelvin < -1e-9:
            raise ToolError(f"{format_number(value)} {source} is below absolute zero")
        result = (kelvin - zero_out) / step_out
    else:
        result = value * UNITS[source][1] / UNITS[target][1]
    return f"{format_number(checked(round(result, 12)))} {target}"


# ----------------------------------------------------------------------------------------------------------------
# lookup: everyday quantities from the shipped table


def normalize_key(name: str) -> str:
    """A name as the table stores it: lower case, single spaces, no leading article ("A Dozen" -> "dozen")."""
    words = name.lower().replace("?", " ").split()
    return " ".join(words[1:] if words and words[0] in ("a", "an", "the") else words)


@cache
def lookup_table() -> dict[str, int | float]:
    """{normalized name or alias: value} of dataset/data/agent/lookup_table.json ({"name", "value", "aliases"})."""
    rows = json.loads(LOOKUP_TABLE.read_text(encoding="utf-8"))
    return {normalize_key(key): row["value"] for row in rows for key in (row["name"], *row.get("aliases", ()))}


def lookup(name: str) -> str:
    """The value of an everyday quantity from the shipped table (dataset/data/agent/lookup_table.json): counting
    words ("dozen" 12, "score" 20), calendar and clock facts ("days in a week" 7), coins in cents ("quarter" 25).

    Returns:
        the value as text: "12".
    Raises:
        ToolError: a name the table does not hold (the message lists some that it does).
    """
    table = lookup_table()
    key = normalize_key(name)
    if key not in table:
        raise ToolError(f"{name!r} is not in the table; it holds e.g. {', '.join(list(table)[:8])}")
    return format_number(table[key])


# ----------------------------------------------------------------------------------------------------------------
# The tool registry, and running a call


def function_schema(name: str, description: str, properties: dict[str, str]) -> dict:
    """An OpenAI function-tool schema: every property required, of JSON type string or number."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {key: {"type": kind} for key, kind in properties.items()},
        "required": list(properties)}}}


TOOLS = {  # name: (function, schema)
    "calculator": (calculator, function_schema(
        "calculator", "Evaluate arithmetic: numbers, + - * / ** % and parentheses.", {"expression": "string"})),
    "convert_units": (convert_units, function_schema(
        "convert_units", "Convert a value between units of length, mass, time, volume, speed or temperature.",
        {"value": "number", "from_unit": "string", "to_unit": "string"})),
    "lookup": (lookup, function_schema(
        "lookup", "Look up an everyday quantity, e.g. dozen, days in a week, quarter (cents).", {"name": "string"})),
}
TOOL_SCHEMAS = [schema for _, schema in TOOLS.values()]
JSON_TYPES = {"string": (str,), "number": (int, float)}


@dataclass
class ToolCall:
    """A call the model made and what came of it.

    Attributes:
        name: the tool named (None when the block names none); arguments: the parsed arguments (None if unreadable).
        well_formed: the block is {"name": <a tool>, "arguments": {...}} with arguments fitting the tool's schema.
        error: why the call gave no value (a malformed call, or the tool's refusal), else None.
        result: the text of the `tool` message the model reads next: the value, or "error: <error>".
    """
    name: str | None
    arguments: dict | None
    well_formed: bool
    error: str | None
    result: str


def check_arguments(name: str, arguments: object) -> str | None:
    """Why `arguments` do not fit the schema of tool `name` (required keys, no others, JSON types), or None."""
    if not isinstance(arguments, dict):
        return f"the arguments of {name} must be a JSON object"
    properties = TOOLS[name][1]["function"]["parameters"]["properties"]
    missing, unknown = [key for key in properties if key not in arguments], [key for key in arguments
                                                                             if key not in properties]
    if missing or unknown:
        return (f"{name} takes the arguments {', '.join(properties)}; "
                + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                          unknown and f"unknown {', '.join(unknown)}"])))
    for key, spec in properties.items():
        value = arguments[key]
        if isinstance(value, bool) or not isinstance(value, JSON_TYPES[spec["type"]]):
            return f"the argument {key} of {name} must be a {spec['type']}"
    return None


def call_tool(name: object, arguments: object) -> ToolCall:
    """Run tool `name` on `arguments` (a JSON object, or a JSON string holding one, as the OpenAI API sends it).

    Never raises: a malformed call (unknown tool, arguments that do not fit its schema) or a tool's refusal comes
    back as a ToolCall whose result reads "error: ...".
    """
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return malformed_call(name if isinstance(name, str) else None, None, "the arguments are not valid JSON")
    if not isinstance(name, str) or name not in TOOLS:
        return malformed_call(name if isinstance(name, str) else None, arguments,
                         f"there is no tool {name!r}; the tools are {', '.join(TOOLS)}")
    problem = check_arguments(name, arguments)
    if problem:
        return malformed_call(name, arguments, problem)
    try:
        value = TOOLS[name][0](**arguments)
    except ToolError as refusal:
        return ToolCall(name, arguments, True, str(refusal), f"error: {refusal}")
    return ToolCall(name, arguments, True, None, value)


def malformed_call(name: str | None, arguments: object, problem: str) -> ToolCall:
    """A call that could not be run because of how it was written: well_formed False, `problem` as its error and, as
    "error: <problem>", its result."""
    return ToolCall(name, arguments if isinstance(arguments, dict) else None, False, problem, f"error: {problem}")


def read_tool_call(block: str) -> ToolCall:
    """Read and run the JSON inside one <tool_call>...</tool_call> block: {"name": ..., "arguments": {...}}, the
    Hermes / Qwen format the chat template writes (dataset/chat_format.py's tool_call_text). Never raises."""
    try:
        call = json.loads(block)
    except json.JSONDecodeError as error:
        return malformed_call(None, None, f"the tool call is not valid JSON ({error.msg} at character {error.pos})")
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        return malformed_call(None, None, 'a tool call is a JSON object {"name": ..., "arguments": {...}}')
    return call_tool(call["name"], call["arguments"])


# ----------------------------------------------------------------------------------------------------------------
# A conversation with tools, message by message (the evaluation and the web demo; the trainer works on tokens)


@dataclass
class Conversation:
    """One conversation of converse_with_tools, as it goes and as it ends.

    Attributes:
        messages: the conversation, the model's turns and the tool messages appended; tools: the schemas offered.
        calls: every call the model made, in order (a <tool_call> block the reply could not parse included, as a
            malformed call).
        reply: the final reply's text, before any <tool_call> it holds; "" when the turns ran out first.
        answered: the model ended with a reply that holds no call; turns: the assistant turns taken; done: ended.
    """
    messages: list[dict]
    tools: list[dict] | None
    calls: list[ToolCall] = field(default_factory=list)
    reply: str = ""
    answered: bool = False
    turns: int = 0
    done: bool = False

    def take(self, reply: dict) -> None:
        """Append the model's next message; run its calls and append their results, or end on a final reply."""
        reply = {"role": "assistant", **reply}
        self.messages.append(reply)
        self.turns += 1
        if reply.get("tool_calls"):
            for tool_call in reply["tool_calls"]:
                self.calls.append(call_tool(tool_call["name"], tool_call["arguments"]))
                self.messages.append({"role": "tool", "content": self.calls[-1].result})
            return
        content = reply["content"]
        self.done, self.answered = True, TOOL_CALL_OPEN not in content
        self.reply = content.split(TOOL_CALL_OPEN)[0].strip()
        if not self.answered:
            self.calls.append(malformed_call(None, None, 'a <tool_call> block that does not parse as {"name": ..., '
                                                         '"arguments": {...}}'))


def converse_with_tools(reply_fn, requests: list[tuple[list[dict], list[dict] | None]],
                        max_turns: int) -> list[Conversation]:
    """Let a model answer each conversation, running the tools it calls, for at most `max_turns` assistant turns.

    The conversations advance together, a turn at a time, so reply_fn can answer them in one batch.
    Args:
        reply_fn: function([(messages, tools), ...]) -> the next assistant message of each, {"content": str,
            "tool_calls": [{"name", "arguments": a JSON string}], ...}: its calls parsed as scripts/generation.py's
            parse_tool_calls and the OpenAI server give them (none when tools is None, or when a block does not
            parse, which then stays in the content); other keys (e.g. "reasoning") are kept in the conversation.
        requests: (messages so far, ending with the user's message; the tool schemas offered, or None) each.
    Returns:
        one Conversation per request. Each call's result is appended as a `tool` message (errors too:
        "error: ..."), and the next turn reads it. A reply whose content still holds "<tool_call>" (a block that
        did not parse, or one not closed) counts as a malformed call and ends the conversation unanswered.
    """
    conversations = [Conversation(list(messages), tools) for messages, tools in requests]
    for _ in range(max_turns):
        going = [conversation for conversation in conversations if not conversation.done]
        if not going:
            break
        for conversation, reply in zip(going, reply_fn([(c.messages, c.tools) for c in going])):
            conversation.take(reply)
    return conversations
