"""Think-block splitting and stated-confidence extraction, as literal tables."""

import pytest

from posttrain.reasoning import Split, extract_confidence, prompt_opens_think, split_reasoning


@pytest.mark.parametrize(
    "text, opened, expected",
    [
        ("The answer is 4.", False, Split(None, "The answer is 4.", False)),
        ("<think>2+2 is 4</think>\n\nAnswer: 4", False, Split("2+2 is 4", "Answer: 4", False)),
        ("  <think>\nhmm\n</think>Answer: 5", False, Split("hmm", "Answer: 5", False)),
        ("<think>still thinking about 7", False, Split("still thinking about 7", "", True)),
        # Template opened the block in the prompt: output starts inside it.
        ("maybe 3\n</think>\nAnswer: 3", True, Split("maybe 3", "Answer: 3", False)),
        ("maybe 3 or 4", True, Split("maybe 3 or 4", "", True)),
        # A think tag mentioned later in plain output is not a think block.
        (
            "Answer: 6. (No <think> needed.)",
            False,
            Split(None, "Answer: 6. (No <think> needed.)", False),
        ),
    ],
)
def test_split_reasoning(text, opened, expected):
    assert split_reasoning(text, think_open_in_prompt=opened) == expected


def test_prompt_opens_think():
    assert prompt_opens_think("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_think("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_think("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "text, value",
    [
        ("Answer: B\nConfidence: 85%", 85.0),
        ("Confidence: 90 %\n...\nConfidence: 40%", 40.0),
        ("**Confidence:** 72.5%", 72.5),
        ("confidence score = 10", 10.0),
        ("Answer: 7", None),
        ("Confidence: 250%", None),
    ],
)
def test_extract_confidence(text, value):
    assert extract_confidence(text) == value
