"""The tools of tool-use RL (dataset/tools.py), as specifications: the calculator computes arithmetic and refuses
everything else with a sentence for the model, the converter follows the units' exact definitions, the lookup reads
the shipped table, a call that cannot be run comes back as an error result (never an exception), and a conversation
with tools runs the calls and appends their results."""

import ast
import json

import pytest

from dataset import tools
from dataset.tools import (MAX_EXPRESSION_CHARS, TOOL_SCHEMAS, ToolError, calculator, call_tool, convert_units,
                           converse_with_tools, lookup, read_tool_call)


# ----------------------------------------------------------------------------------------------------------
# calculator


@pytest.mark.parametrize("expression, value", [
    ("48/2", "24"),                  # true division, integral result shown as an integer (GSM8K's <<48/2=24>>)
    ("0.2*50", "10"),
    ("100-50-30-15", "5"),
    ("7/2", "3.5"),
    ("2/3", "0.6666666667"),         # 10 significant digits
    ("(48 + 24) / 2", "36"),
    ("-(-3) * -2", "-6"),
    ("2 ** 10", "1024"),
    ("2 ** -1", "0.5"),
    ("17 % 5", "2"),
    ("10 ** 15", "1000000000000000"),  # the largest result allowed, exact
    ("1_000 + 1", "1001"),
])
def test_calculator_computes_arithmetic_as_python_does(expression, value):
    assert calculator(expression) == value
    expected = eval(compile(ast.parse(expression, mode="eval"), "<test>", "eval"))  # the reference: Python itself
    assert float(value) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("expression, message", [
    ("x + 1", "a name is not arithmetic"),
    ("__import__('os').system('ls')", "a function call is not arithmetic"),
    ("(1).real", "attribute access is not arithmetic"),
    ("abs(-3)", "a function call is not arithmetic"),
    ("'a' * 3", "a string is not arithmetic"),
    ("[1, 2][0]", "indexing is not arithmetic"),
    ("1,200 + 5", "a comma"),
    ("True + 1", "the constant True is not arithmetic"),
    ("7 // 2", "the operator // is not arithmetic"),
    ("1 << 3", "the operator << is not arithmetic"),
    ("+3", "the operator unary \\+ is not arithmetic"),
    ("1 < 2", "a comparison is not arithmetic"),
    ("lambda: 1", "a lambda is not arithmetic"),
    ("9 ** 9 ** 9", "9 \\*\\* 387420489 is larger than 1e\\+15"),  # refused before it is computed
    ("10 ** 16", "larger than 1e\\+15"),
    ("99999999 * 99999999", "larger than 1e\\+15"),
    ("1e400", "larger than 1e\\+15"),
    ("9" * 20, "larger than 1e\\+15"),
    ("0.1 ** -20", "larger than 1e\\+15"),
    ("(-8) ** 0.5", "not a real number"),
    ("5 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("0 ** -1", "zero cannot be raised to a negative power"),
    ("", "empty"),
    ("2 +", "not an arithmetic expression"),
    ("import os", "not an arithmetic expression"),
    ("1" + "+1" * MAX_EXPRESSION_CHARS, f"at most {MAX_EXPRESSION_CHARS}"),
])
def test_calculator_refuses_anything_but_arithmetic_with_a_clear_message(expression, message):
    with pytest.raises(ToolError, match=message):
        calculator(expression)


def test_a_refused_expression_comes_back_to_the_model_as_the_tool_result():
    call = call_tool("calculator", {"expression": "__import__('os').system('rm -rf /')"})
    assert call.well_formed and call.error.startswith("a function call is not arithmetic")
    assert call.result == f"error: {call.error}"


def test_nested_parentheses_within_the_length_limit_are_fine():
    depth = (MAX_EXPRESSION_CHARS - 1) // 2
    assert calculator("(" * depth + "7" + ")" * depth) == "7"
    assert calculator("-" * (MAX_EXPRESSION_CHARS - 1) + "7") == "-7"  # 199 minus signs: odd


# ----------------------------------------------------------------------------------------------------------
# convert_units and lookup


@pytest.mark.parametrize("value, source, target, expected", [
    (1, "mile", "km", "1.609344 km"),        # the international mile: exactly 1609.344 m
    (12, "inches", "feet", "1 ft"),
    (1, "lb", "g", "453.59237 g"),           # the international pound: exactly 0.45359237 kg
    (16, "ounces", "pounds", "1 lb"),
    (1, "gallon", "cups", "16 cup"),         # US customary: 128 fl oz in a gallon, 8 in a cup
    (3, "teaspoons", "tbsp", "1 tbsp"),
    (90, "minutes", "hours", "1.5 h"),
    (2, "weeks", "days", "14 day"),
    (100, "km/h", "m/s", "27.77777778 m/s"),
    (212, "Fahrenheit", "celsius", "100 C"),
    (-40, "C", "F", "-40 F"),
    (0, "K", "C", "-273.15 C"),
])
def test_convert_units_follows_the_exact_definitions(value, source, target, expected):
    assert convert_units(value, source, target) == expected


@pytest.mark.parametrize("value, source, target, message", [
    (1, "kg", "m", "cannot convert kg \\(mass\\) to m \\(length\\)"),
    (1, "kg", "celsius", "cannot convert kg \\(mass\\) to C \\(temperature\\)"),
    (1, "parsec", "m", "from_unit 'parsec' is not a unit the converter knows"),
    (1, "m", "furlong", "to_unit 'furlong' is not a unit"),
    (-500, "F", "C", "below absolute zero"),
    (1e16, "m", "km", "larger than 1e\\+15"),
])
def test_convert_units_refuses_what_it_cannot_convert(value, source, target, message):
    with pytest.raises(ToolError, match=message):
        convert_units(value, source, target)


def test_lookup_reads_the_shipped_table_by_name_or_alias():
    rows = json.loads(tools.LOOKUP_TABLE.read_text())
    assert len(rows) == len({row["name"] for row in rows}) > 50
    for row in rows:
        assert lookup(row["name"]) == str(row["value"])
    assert lookup("A Dozen") == lookup("dozens") == "12"  # case, a leading article, an alias
    assert lookup("days in a week?") == "7"
    with pytest.raises(ToolError, match="'parsec' is not in the table; it holds e.g. dozen"):
        lookup("parsec")


# ----------------------------------------------------------------------------------------------------------
# Calls: schemas, well-formedness, errors


def test_tool_schemas_are_openai_functions_the_chat_template_renders(tokenizer):
    assert [schema["function"]["name"] for schema in TOOL_SCHEMAS] == ["calculator", "convert_units", "lookup"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tools=TOOL_SCHEMAS, tokenize=False,
                                             add_generation_prompt=True)
    for schema in TOOL_SCHEMAS:
        assert json.dumps(schema, ensure_ascii=False) in rendered


@pytest.mark.parametrize("block, well_formed, result", [
    ('{"name": "calculator", "arguments": {"expression": "48 / 2"}}', True, "24"),
    ('{"name": "calculator", "arguments": "{\\"expression\\": \\"3 * 4\\"}"}', True, "12"),  # arguments as a string
    ('{"name": "lookup", "arguments": {"name": "score"}}', True, "20"),
    ('{"name": "convert_units", "arguments": {"value": 5, "from_unit": "km", "to_unit": "mi"}}', True,
     "3.106855961 mi"),
    ('{"name": "calculator", "arguments": {"expression": "5 / 0"}}', True, "error: division by zero"),
    ('{"name": "calculator", "arguments": {"expression": "48 / 2"}', False, "error: the tool call is not valid JSON"),
    ('["calculator"]', False, 'error: a tool call is a JSON object {"name": ..., "arguments": {...}}'),
    ('{"name": "calculator"}', False, "error: a tool call is a JSON object"),
    ('{"name": "python", "arguments": {"code": "1"}}', False, "error: there is no tool 'python'"),
    ('{"name": "calculator", "arguments": {"expr": "1"}}', False,
     "error: calculator takes the arguments expression; missing expression; unknown expr"),
    ('{"name": "calculator", "arguments": {"expression": 12}}', False,
     "error: the argument expression of calculator must be a string"),
    ('{"name": "convert_units", "arguments": {"value": true, "from_unit": "m", "to_unit": "km"}}', False,
     "error: the argument value of convert_units must be a number"),
    ('{"name": "calculator", "arguments": [1]}', False, "error: the arguments of calculator must be a JSON object"),
])
def test_a_call_never_raises_its_problem_is_the_result(block, well_formed, result):
    call = read_tool_call(block)
    assert call.well_formed is well_formed
    assert call.result.startswith(result)
    assert (call.error is None) == (not result.startswith("error:"))


def test_converse_with_tools_runs_each_call_and_appends_its_result():
    """A scripted model: a call, a call the tool refuses, then the answer. Every result reaches the next turn."""
    replies = iter([{"content": "", "tool_calls": [{"name": "calculator", "arguments": '{"expression": "48/2"}'}]},
                    {"content": "Let me try.",
                     "tool_calls": [{"name": "calculator", "arguments": '{"expression": "x"}'}]},
                    {"content": "It is 24.", "reasoning": "The tool said so."}])
    seen = []

    def reply_fn(requests):
        [(messages, offered)] = requests
        seen.append(list(messages))
        assert offered is TOOL_SCHEMAS
        return [next(replies)]

    question = [{"role": "user", "content": "48 / 2?"}]
    [result] = converse_with_tools(reply_fn, [(question, TOOL_SCHEMAS)], max_turns=5)
    assert result.reply == "It is 24." and result.answered and result.turns == 3
    assert [call.result for call in result.calls] == ["24", "error: a name is not arithmetic; the calculator takes "
                                                            "only numbers, + - * / ** %, parentheses and unary minus"]
    assert [m["role"] for m in result.messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert seen[1][-1] == {"role": "tool", "content": "24"} and seen[2][-1]["content"].startswith("error: a name")
    assert result.messages[-1] == {"role": "assistant", "content": "It is 24.", "reasoning": "The tool said so."}
    assert question == [{"role": "user", "content": "48 / 2?"}]  # the caller's list is left as it was


def test_conversations_advance_together_a_turn_at_a_time():
    """Three conversations in one batch: reply_fn answers only those still going, and each ends on its own."""
    asked = []

    def reply_fn(requests):
        asked.append(len(requests))
        return [{"content": "", "tool_calls": [{"name": "lookup", "arguments": '{"name": "dozen"}'}]}
                if messages[0]["content"] == "loop" else {"content": f"done after {len(messages)}"}
                for messages, _ in requests]

    questions = [([{"role": "user", "content": text}], TOOL_SCHEMAS) for text in ("loop", "stop", "loop")]
    looped, stopped, _ = converse_with_tools(reply_fn, questions, max_turns=3)
    assert asked == [3, 2, 2]  # the second conversation answered in its first turn
    assert (stopped.turns, stopped.answered, stopped.reply) == (1, True, "done after 1")
    assert (looped.turns, len(looped.calls), looped.answered, looped.reply) == (3, 3, False, "")
    assert [call.result for call in looped.calls] == ["12"] * 3


def test_a_tool_call_block_the_reply_could_not_parse_counts_as_malformed():
    def broken_block(requests):  # parse_tool_calls leaves a block that is not JSON in the content
        return [{"content": 'So <tool_call>\n{"name": calculator}\n</tool_call>'} for _ in requests]

    [broken] = converse_with_tools(broken_block, [([{"role": "user", "content": "?"}], TOOL_SCHEMAS)], max_turns=3)
    assert (broken.turns, broken.answered, broken.reply) == (1, False, "So")
    assert [call.well_formed for call in broken.calls] == [False]
