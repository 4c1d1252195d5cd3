"""How a run spreads over processes (ddp | fsdp2 | deepspeed) and how it checkpoints and resumes
(whole or sharded state).
"""
