"""Lazy-reasoning metric: wrong + long reasoning + >= 3 whole-word reflective words."""

import pytest

from tirl.benchmarks.lazy import count_reflective, is_lazy, lazy_ratio


def words(text: str) -> int:
    return len(text.split())


def trace(filler_words: int, reflective: str, answer: str = "[f(a=1)]") -> str:
    return "<think>\n" + "step " * filler_words + reflective + "\n</think>\n\n" + answer


def test_count_reflective_whole_words_case_insensitive():
    assert count_reflective("Wait, but... BUT however; Alternatively! wait") == 6
    assert count_reflective("butter awaits waiting however_x buttress rebut") == 0
    assert count_reflective("it's wait-and-see, but") == 2  # hyphen and comma are word boundaries


def test_is_lazy_needs_all_three_conditions():
    lazy = trace(250, "wait but however")  # 253 words of reasoning, 3 reflective words
    assert is_lazy(lazy, correct=False, tokenizer_or_len_fn=words)
    assert not is_lazy(lazy, correct=True, tokenizer_or_len_fn=words)
    assert not is_lazy(trace(250, "wait but"), correct=False, tokenizer_or_len_fn=words)
    assert not is_lazy(trace(150, "wait but however"), correct=False, tokenizer_or_len_fn=words)
    # look-alikes do not count: only "However" is a reflective word here
    assert not is_lazy(trace(250, "butter awaits However"), correct=False, tokenizer_or_len_fn=words)


def test_length_threshold_is_strict_and_measured_on_reasoning_only():
    exactly_200 = trace(197, "wait but however")  # 197 + 3 = 200 words: not more than 200
    assert not is_lazy(exactly_200, correct=False, tokenizer_or_len_fn=words)
    assert is_lazy(trace(198, "wait but however"), correct=False, tokenizer_or_len_fn=words)
    # reflective words and length in the answer after </think> are not reasoning
    answer_heavy = trace(250, "", answer="wait but however " + "x " * 300)
    assert not is_lazy(answer_heavy, correct=False, tokenizer_or_len_fn=words)
    # no <think> block: the whole response is the reasoning
    assert is_lazy("step " * 250 + "wait, but however", correct=False, tokenizer_or_len_fn=words)
    # thresholds are parameters
    assert is_lazy(trace(10, "wait"), False, words, min_reasoning_tokens=5, min_reflective=1)


class WhitespaceTokenizer:
    """Stands in for an HF tokenizer: has `.encode`, and calling it is not a length."""

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return text.split()

    def __call__(self, text):
        raise AssertionError("is_lazy must use .encode, not __call__, on a tokenizer")


def test_lazy_ratio_with_a_tokenizer():
    responses = [
        trace(250, "wait but however"),  # lazy
        trace(250, "wait but however"),  # correct, so not lazy
        trace(10, "wait but however"),  # short
        trace(250, "alternatively"),  # too few reflective words
    ]
    assert lazy_ratio(responses, [False, True, False, False], WhitespaceTokenizer()) == 0.25
    with pytest.raises(ValueError, match="one flag per response"):
        lazy_ratio(responses, [False], words)
    with pytest.raises(ValueError, match="at least one response"):
        lazy_ratio([], [], words)
    with pytest.raises(TypeError, match="tokenizer"):
        is_lazy(responses[0], False, 200)
