"""The graded row a stub reward returns, in the shape of train/rollouts.score_completion's, for
tests that replace the grader with a rule on token ids (online_sync_checks.py, test_moe.py,
online_dist_worker.py, test_train_online.py)."""

from __future__ import annotations


def graded(reward: float, truncated: bool = False) -> dict:
    """A row with `reward` as both the grader's and the shaped reward (no format bonus, no
    overlong penalty); verdict correct when the reward is non-zero."""
    return {
        "verdict": "correct" if reward else "incorrect",
        "correct_reward": reward,
        "format_ok": True,
        "overlong": 0.0,
        "reward": reward,
        "truncated": truncated,
    }
