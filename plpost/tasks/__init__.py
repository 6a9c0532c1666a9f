"""Tasks with verifiable answers, for demos and tests that run offline."""

from plpost.tasks.addition import (
    AdditionProblem,
    exact_match_reward,
    extract_answer,
    sample_problems,
)

__all__ = ["AdditionProblem", "exact_match_reward", "extract_answer", "sample_problems"]
