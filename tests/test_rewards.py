"""rewards.py: every scoring rule on a hand-made table, both completion formats, prefill, and load_rewards' errors."""
import doctest
import functools
import sys

import pytest

import rewards
from rewards import correct, load_rewards, structure, think_format


def chat(text):
    return [{"role": "assistant", "content": text}]


R = "<reasoning>\nwarm colour\n</reasoning>\n"
A = "<answer>\nred\n</answer>"


@pytest.mark.parametrize("completion,prefill,expected", [
    (R + A, "", 2.0),                                                          # exact
    (A, "", 1.0),                                                              # reasoning missing
    (R, "", 1.0),                                                              # answer missing
    ("red", "", 0.0),                                                          # nothing
    (R + R + A, "", 1.5),                                                      # reasoning twice
    (R + R + R + A, "", 1.0),                                                  # three times: 0 for that block
    (R + R + R + R + A + A, "", 0.5),                                          # never below 0 per block
    (R + A + "\n<answer>\nblue", "", 1.5),                                     # a half-written second answer counts
    ("\nwarm colour\n</reasoning>\n" + A, "<reasoning>", 2.0),                 # prefill completes the reasoning tag
    ("\nwarm colour\n</reasoning>\n" + A, "", 1.0),                            # ... and without it, half a block
    (chat(R + A), "", 2.0),                                                    # conversational format
    (chat("\nwarm\n</reasoning>\n" + A), "<reasoning>", 2.0),                  # conversational + prefill
    ("\n\n  <reasoning>  \r\n  warm\r\n\t</reasoning>\t\n\n<answer>\nred\n</answer>\n\n", "", 2.0),  # whitespace
    ("<reasoning>warm</reasoning>\n<answer>red</answer>", "", 0.0),           # tags not on their own lines
    ("Sure: <reasoning>\nwarm\n</reasoning>\n" + A, "", 1.0),                  # text shares the opening tag's line
    ("<reasoning>\n  \n</reasoning>\n" + A, "", 1.0),                          # empty block earns nothing
    (A + "\n" + R, "", 2.0),                                                   # order is not scored
    ("<Reasoning>\nwarm\n</Reasoning>\n" + A, "", 1.0),                        # tags are case-sensitive
])
def test_structure(completion, prefill, expected):
    assert structure([completion], prefill=prefill) == [expected]


def test_structure_prefill_column_and_extra_kwargs():
    done = "\nwarm\n</reasoning>\n" + A
    got = structure([done, done, R + A], prefill=["<reasoning>", None, ""], prompts=["p"] * 3,
                    completion_ids=[[1]] * 3, trainer_state=None, answer=["red"] * 3)
    assert got == [2.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="prefill"):
        structure([done], prefill=["a", "b"])


@pytest.mark.parametrize("completion,prefill,expected", [
    ("<think>warm</think><answer>red</answer>", "", 2.0),                      # exact
    ("\n<think>\nwarm\n</think>\n\n<answer>\nred\n</answer>\n", "", 2.0),      # whitespace is never outside text
    ("<answer>red</answer>", "", 1.0),                                         # think tags missing
    ("<think>warm</think>", "", 1.0),                                          # answer tags missing
    ("red", "", 0.0),                                                          # 4 missing + outside text: floor 0
    ("<think>a</think><think>b</think><answer>red</answer>", "", 1.0),         # two think tags duplicated
    ("<think>a</think><answer>r</answer><answer>r</answer><answer>r</answer>", "", 0.0),  # 2 extra x 2 tags
    ("Sure! <think>warm</think><answer>red</answer>", "", 1.5),                # text before <think>
    ("<think>warm</think> so <answer>red</answer>", "", 1.5),                  # text between the blocks
    ("<think>warm</think><answer>red</answer> done.", "", 1.5),                # text after </answer>
    ("hi <think>a</think> and <answer>red</answer> bye", "", 1.5),             # outside text costs 0.5 once
    ("warm</think><answer>red</answer>", "<think>", 2.0),                      # prefill supplies <think>
    ("warm</think><answer>red</answer>", "", 1.0),                             # ... without it: missing + outside
    ("<think>warm, then cut off", "", 0.5),                                    # unclosed: inside, not outside
    (chat("<think>warm</think><answer>red</answer>"), "", 2.0),                # conversational format
])
def test_think_format(completion, prefill, expected):
    assert think_format([completion], prefill=prefill) == [expected]


@pytest.mark.parametrize("completion,reference,expected", [
    ("<reasoning>\nwarm\n</reasoning>\n<answer>\nred\n</answer>", "red", 1.0),  # tags
    ("red", "red", 1.0),                                                       # no tags: the whole completion
    ("<answer> RED! </answer>", "Red", 1.0),                                   # case and punctuation
    ('"Red."', "red", 1.0),
    ("<answer>blue</answer>", "red", 0.0),                                     # wrong answer
    ("<answer>red</answer> no wait <answer>blue</answer>", "blue", 1.0),       # several: the last one
    ("<answer>red</answer> no wait <answer>blue</answer>", "red", 0.0),
    ("The answer is red", "red", 0.0),                                         # no tags: no searching in prose
    (chat("<answer>red</answer>"), "red", 1.0),                                # conversational format
    ("<answer>42</answer>", 42, 1.0),                                          # non-string reference
])
def test_correct(completion, reference, expected):
    assert correct([completion], answer=[reference]) == [expected]


@pytest.mark.parametrize("completion,prefill,expected", [
    ("red\n</answer>", "<answer>\n", 1.0),                                     # prefill opens the answer tag
    ("red", "<reasoning>", 1.0),                                               # a prefill without tags is not read
    ("\nwarm\n</reasoning>\n<answer>\nred\n</answer>", "<reasoning>", 1.0),
])
def test_correct_prefill(completion, prefill, expected):
    assert correct([completion], answer=["red"], prefill=prefill) == [expected]


def test_correct_missing_reference_is_none_and_extra_kwargs_ignored():
    assert correct(["red", "red"], answer=[None, "red"], prompts=["p", "p"], trainer_state=None) == [None, 1.0]


# ------------------------------------------------------------------------------------------------- load_rewards
@pytest.fixture
def user_file(tmp_path, monkeypatch):
    """my_rewards.py in a fresh working directory; sys.path and the imported module do not outlive the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = tmp_path / "my_rewards.py"
    path.write_text("def my_fn(completions, **kw):\n    return [float(len(c)) for c in completions]\n\n"
                    "NOT_CALLABLE = 3\n\n"
                    "class Brevity:\n    def __call__(self, completions, **kw):\n"
                    "        return [0.0] * len(completions)\n\n"
                    "brevity = Brevity()\n")
    before = set(sys.modules)
    yield path
    for name in set(sys.modules) - before:  # drop my_rewards & co (sys.modules itself must not be replaced)
        del sys.modules[name]


@pytest.mark.parametrize("spec,weights,names,expected_weights", [
    ("structure", None, ["structure"], None),
    ("structure,correct", "1,2", ["structure", "correct"], [1.0, 2.0]),
    (" think , correct ", " 0.5, 1 ", ["think_format", "correct"], [0.5, 1.0]),   # spaces; TRL logs think_format
    ("structure,correct", "", ["structure", "correct"], None),
    ("correct,structure,think", "-1,1e-1,2", ["correct", "structure", "think_format"], [-1.0, 0.1, 2.0]),
])
def test_load_rewards_names_and_weights(spec, weights, names, expected_weights):
    funcs, got = load_rewards(spec, weights)
    assert [f.__name__ for f in funcs] == names and got == expected_weights
    assert all(f is rewards.REWARDS[s.strip()] for f, s in zip(funcs, spec.split(",")))


def test_load_rewards_user_file(user_file):
    funcs, weights = load_rewards(f"structure,{user_file}:my_fn", "1,3")
    assert [f.__name__ for f in funcs] == ["structure", "my_fn"] and weights == [1.0, 3.0]
    assert funcs[1](["ab", "abcd"], answer=["x", "y"], trainer_state=None) == [2.0, 4.0]
    funcs, _ = load_rewards("my_rewards.py:my_fn", None)                        # relative to the working directory
    assert funcs[0](["abc"]) == [3.0]


def test_load_rewards_user_module_from_cwd(user_file):
    funcs, _ = load_rewards("my_rewards:my_fn,my_rewards:brevity", None)
    assert [f.__name__ for f in funcs] == ["my_fn", "brevity"]                  # callable instance gets a name
    assert funcs[1](["a"]) == [0.0]


@pytest.mark.parametrize("spec,weights,message", [
    ("structure,nope", None, "'nope'.*unknown"),
    ("", None, "expected comma-separated"),
    ("structure,,correct", None, "expected comma-separated"),
    ("no_such_module_xyz:fn", None, "'no_such_module_xyz:fn'.*cannot load"),
    ("missing.py:fn", None, "'missing.py:fn'.*cannot load"),
    ("my_rewards.py:nope", None, "'my_rewards.py:nope'.*no attribute 'nope'"),
    ("my_rewards:nope", None, "'my_rewards:nope'.*no attribute"),
    ("my_rewards.py:NOT_CALLABLE", None, "'my_rewards.py:NOT_CALLABLE'.*not a function"),
    ("my_rewards.py:", None, "expected module:function"),
    ("structure,structure", None, "two rewards named 'structure'"),
    ("structure,correct", "1", "1 weights for 2 rewards"),
    ("structure", "1,2", "2 weights for 1 rewards"),
    ("structure,correct", "1,abc", "'abc' is not a finite number"),
    ("structure,correct", "1,", "'' is not a finite number"),
    ("structure", "nan", "'nan' is not a finite number"),
])
def test_load_rewards_errors(user_file, spec, weights, message):
    with pytest.raises(ValueError, match=message) as err:
        load_rewards(spec, weights)
    assert "\n" not in str(err.value)


def test_load_rewards_broken_user_file(tmp_path):
    (tmp_path / "broken.py").write_text("def my_fn(:\n")
    with pytest.raises(ValueError, match="broken.py:my_fn.*SyntaxError"):
        load_rewards(f"{tmp_path / 'broken.py'}:my_fn", None)


def test_log_names_match_trl():
    """TRL logs `rewards/<get_callable_name(f)>/mean`: the names must be the ones the module docstring promises."""
    from trl.trainer.utils import get_callable_name

    funcs, _ = load_rewards("structure,think,correct", None)
    assert [get_callable_name(f) for f in funcs] == ["structure", "think_format", "correct"]
    assert get_callable_name(functools.partial(structure, prefill="<reasoning>")) == "structure"


def test_doctests():
    result = doctest.testmod(rewards)
    assert result.attempted >= 8 and result.failed == 0
