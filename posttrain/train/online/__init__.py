"""Online RL: the loop, its config, rollouts and their engine, the policy update, cross-process
reductions (GRPO family, CISPO, CHORD).
"""
