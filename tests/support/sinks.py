"""Reading back what the metrics sinks wrote, with each tool's own reader: TensorBoard's event
accumulator for the event files, and W&B's protobuf records for an offline run's transaction log
(`run-<id>.wandb`: W&B's LevelDB-style log of `wandb_internal_pb2.Record`, the file `wandb sync`
uploads; the offline run keeps its summary there, not in files/wandb-summary.json)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `log_dir`: tag -> [(step, value)] in write order, all of
    them (size guidance 0: no reservoir sampling), values as the float64 tensors hold them."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    accumulator = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0}
    )
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()["tensors"]:
        if accumulator.summary_metadata[tag].plugin_data.plugin_name != "scalars":
            continue
        scalars[tag] = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in accumulator.Tensors(tag)]
    return scalars


def tensorboard_hparams(log_dir: Path) -> dict[str, Any]:
    """The hyperparameters TensorBoard's HParams dashboard shows for the run under `log_dir`."""
    from google.protobuf.json_format import MessageToDict
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = event_accumulator.EventAccumulator(str(log_dir))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {key: MessageToDict(value) for key, value in info.hparams.items()}  # a Value: its plain value


BLOCK = 32 * 1024  # the log's block size; a record header never straddles one (the tail is padding)
HEADER = struct.Struct("<IHB")  # crc32 of type + data, data length, type (1 full, 2 first, 3 middle, 4 last)


def wandb_records(run_dir: Path) -> list[Any]:
    """The records of the one offline W&B run under `run_dir`/wandb, in order, every checksum checked."""
    from wandb.proto import wandb_internal_pb2

    (log,) = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    data = log.read_bytes()
    assert data[:4] == b":W&B", f"{log}: not a W&B transaction log"
    position, pending, records = 7, b"", []
    while position + HEADER.size <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER.size:
            position += left
            continue
        checksum, length, kind = HEADER.unpack_from(data, position)
        if kind == 0 and length == 0:  # zero padding at the end of a block
            position += left
            continue
        chunk = data[position + HEADER.size : position + HEADER.size + length]
        assert zlib.crc32(bytes([kind]) + chunk) == checksum, f"{log}: bad checksum at byte {position}"
        position += HEADER.size + length
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_summary(records: list[Any]) -> dict[str, Any]:
    """The run's summary: every summary update in order, the last value of each key kept."""
    summary: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary |= {_key(item): json.loads(item.value_json) for item in record.summary.update}
            for item in record.summary.remove:
                summary.pop(_key(item), None)
    return summary


def wandb_history(records: list[Any]) -> list[dict[str, Any]]:
    """Every `wandb.log` row, in order."""
    return [
        {_key(item): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]


def wandb_config(records: list[Any]) -> dict[str, Any]:
    """The run's config: wandb.init's (in the run record) and later updates, W&B's own `_wandb` aside."""
    config: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config |= {_key(item): json.loads(item.value_json) for item in updates}
    config.pop("_wandb", None)
    return config
