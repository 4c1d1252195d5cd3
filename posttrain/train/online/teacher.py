"""The teacher of on-policy distillation (`--method distill`): loaded once, scores the student's
samples token by token.

    posttrain train --method distill --problems "builtin:arith:512?split=train" --out runs/d \
        --set distill.teacher=smollm2-135m --set distill.teacher_adapter=runs/rpo/train/adapter

The teacher runs in the trainer's process (each process holds a whole copy, also under fsdp2):
no gradient, eval mode, the policy's dtype, its adapter merged (models.load_with_adapter). It
scores exactly the token ids the student sampled after exactly the student's prompt ids, so its
tokenizer must be the student's: the same vocabulary and the same ids from the chat template,
checked at start (ConfigError otherwise). Its log-probs are of softmax(logits / T) with T the
sampling temperature, as the student's: a teacher equal to the student gives advantage 0 at any
temperature, and the student's logits are pulled towards the teacher's own.
"""

from __future__ import annotations

import torch

from posttrain.config import ConfigError

# a conversation rendered by both chat templates; its ids must agree
PROBE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 + 30? Think, then answer."},
]


def check_same_tokenizer(student, teacher, where: str = "distill.teacher") -> None:
    """ConfigError unless the two tokenizers give the same ids: vocabulary (token -> id),
    special tokens and the chat template's rendering of a probe conversation."""
    if student.get_vocab() != teacher.get_vocab():
        diff = len(set(student.get_vocab().items()) ^ set(teacher.get_vocab().items()))
        raise ConfigError(
            f"{where}: the teacher's tokenizer differs from the student's ({diff} token -> id "
            f"entries differ; sizes {len(student)} and {len(teacher)}); expected the same "
            "tokenizer: the teacher scores the student's token ids"
        )
    if (student.eos_token_id, student.bos_token_id) != (teacher.eos_token_id, teacher.bos_token_id):
        raise ConfigError(f"{where}: the teacher's eos / bos token ids differ from the student's")
    ids = [
        tok(
            tok.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        if tok.chat_template
        else None
        for tok in (student, teacher)
    ]
    if ids[0] != ids[1]:
        raise ConfigError(
            f"{where}: the teacher's chat template renders a conversation to other token ids "
            "than the student's; expected the same template (the teacher scores the student's "
            "prompt ids)"
        )


def load_teacher(cfg, student_tokenizer, device, dtype: torch.dtype):
    """The teacher model of `cfg.distill`, checked against the student's tokenizer first (the
    mismatch costs no model load), in eval mode with gradients off."""
    from posttrain.models import load_tokenizer, load_with_adapter

    d = cfg.distill
    cfg.check_teacher_files()
    check_same_tokenizer(student_tokenizer, load_tokenizer(d.teacher))
    teacher = load_with_adapter(d.teacher, d.teacher_adapter or None, dtype=dtype)
    if teacher.config.vocab_size < len(student_tokenizer):
        raise ConfigError(
            f"distill.teacher: the model has {teacher.config.vocab_size} output tokens, fewer "
            f"than the tokenizer's {len(student_tokenizer)}"
        )
    teacher.to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def teacher_logps(teacher, batches: list[tuple[dict, slice]], temperature: float) -> list:
    """The teacher's tempered log-probs of the sampled tokens, one (b, K) per micro-batch
    (0 off the completion tokens), through the trainer's own forward (update.sampled_logps)."""
    from posttrain.losses import token_logps
    from posttrain.train.online.update import batch_logits

    out = []
    for batch, _ in batches:
        logits = batch_logits(teacher, batch)  # (b, K, V)
        if temperature != 1.0:
            logits = logits / temperature
        out.append(token_logps(logits, batch["labels"]))  # (b, K)
    return out
