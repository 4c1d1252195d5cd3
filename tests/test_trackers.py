"""Metrics reach TensorBoard through accelerate's tracker: the event file read back holds the
same numbers as metrics.jsonl (read with tensorboardX's protobuf, TFRecord framing by hand)."""

from __future__ import annotations

import re
import struct

import pytest

from posttrain.config import ConfigError
from posttrain.train.metrics import MetricsLog


def read_scalars(folder) -> dict[tuple[str, int], float]:
    """TFRecord: u64 length, u32 crc of the length, payload, u32 crc of the payload."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out


def test_tensorboard_gets_the_logged_numbers(tmp_path):
    pytest.importorskip("tensorboardX")
    log = MetricsLog(
        tmp_path / "metrics.jsonl", trackers=["tensorboard"], config={"lr": 1e-4, "lora": {"r": 16}}
    )
    for step in (1, 2, 3):
        log.write(
            {
                "step": step,
                "loss": 0.5 / step,
                "rewards/margins": 0.25 * step,
                "note": "text is not a scalar",
                "nan": float("nan"),
            }
        )
    log.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars[("loss", 2)] == pytest.approx(0.25)
    assert scalars[("rewards/margins", 3)] == pytest.approx(0.75)
    assert not any(tag in ("note", "nan", "step") for tag, _ in scalars)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3


def test_unknown_tracker_is_an_error(tmp_path):
    with pytest.raises(
        ConfigError, match=re.escape("unknown 'mlflowx'; expected tensorboard | wandb")
    ):
        MetricsLog(tmp_path / "metrics.jsonl", trackers=["mlflowx"])
