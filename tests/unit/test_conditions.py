"""Every condition operator, and how missing values and mixed types behave."""
import pytest

from detectors.conditions import compile_conditions

CASES = [
    # condition, value, expected
    ("salesforce", "salesforce", True),
    ("salesforce", "hubspot", False),
    (10, 10.0, True),
    (True, 1, False),                      # booleans are not numbers
    ({"eq": "a"}, "a", True),
    ({"eq": "a"}, "b", False),
    ({"in": ["a", "b"]}, "b", True),
    ({"in": ["a", "b"]}, "c", False),
    ({"not_in": ["a", "b"]}, "c", True),
    ({"not_in": ["a", "b"]}, "a", False),
    ({"gt": 10}, 11, True),
    ({"gt": 10}, 10, False),
    ({"gte": 10}, 10, True),
    ({"gte": 10}, 9.99, False),
    ({"lt": 10}, 9, True),
    ({"lt": 10}, 10, False),
    ({"lte": 10}, 10, True),
    ({"lte": 10}, 10.5, False),
    # numbers as payloads carry them (issue 23): Segment types `employees` as a String
    ({"gt": 10}, "11", True),
    ({"gte": 10}, "4500", True),
    ({"gte": 10}, " 9.5 ", False),
    ({"lt": 10}, "-3", True),
    ({"lte": 1000}, "1e3", True),
    ({"gte": 10}, "1,000", False),          # thousands separators are not numbers (locale)
    ({"gte": 10}, "51-200", False),         # a range is a string
    ({"gte": 10}, "NaN", False),
    ({"lt": 10}, "-inf", False),
    ({"gte": 10}, "0x10", False),
    ({"gte": 10}, "٤٥", False),   # other scripts' digits: not read as numbers
    ({"gte": 10}, True, False),             # booleans are not numbers
    ({"gte": 10}, "", False),
    (10, "10", True),
    ({"in": [5, 10]}, "10.0", True),
    ({"not_in": [5, 10]}, "5", False),
    ({"eq": "10"}, 10, False),              # a string in the rule compares strings only
    ({"gte": "b"}, "c", True),
    ({"gte": "2026-01-01"}, "2026-03-01", True),
    # booleans as strings: "true"/"false" in any case, nothing else
    (True, "true", True),
    (True, "TRUE", True),
    (False, "false", True),
    (True, "false", False),
    (True, "yes", False),
    (True, "1", False),
    ({"in": [True]}, "True", True),
    ({"gte": 10, "lt": 50}, 20, True),     # several operators: all must hold
    ({"gte": 10, "lt": 50}, 50, False),
    ({"exists": True}, "x", True),
    ({"exists": True}, None, False),
    ({"exists": False}, None, True),
]


@pytest.mark.parametrize("cond,value,expected", CASES)
def test_operator(cond, value, expected):
    assert compile_conditions({"f": cond})({"f": value}) is expected


@pytest.mark.parametrize("cond", ["x", {"eq": "x"}, {"in": ["x"]}, {"not_in": ["x"]}, {"gt": 1}, {"gte": 1},
                                  {"lt": 1}, {"lte": 1}, {"exists": True}])
def test_missing_value_fails(cond):
    assert compile_conditions({"f": cond})({}) is False


def test_missing_value_satisfies_exists_false():
    assert compile_conditions({"f": {"exists": False}})({}) is True


def test_dotted_paths_reach_into_nested_values():
    pred = compile_conditions({"properties.plan.name": "pro"})
    assert pred({"properties": {"plan": {"name": "pro"}}})
    assert not pred({"properties": {"plan": "pro"}})
    assert not pred({"properties": None})
