"""Growing a model before training: depth up-scaling (LLaMA-Pro, OpT-DeUS) and layer alignment."""
