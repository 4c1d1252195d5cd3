"""Training loops: offline (SFT family on demonstrations, DPO family on pairs) and online RL.

posttrain train --method dpo --data pairs.jsonl --out runs/dpo
"""
