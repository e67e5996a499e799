"""`--tensorboard` and `--wandb` (fedjax_sim.writers): read back what they wrote.

One 4-round `fedjax-sim run` with both writers (W&B offline: no network) is shared by the
tests. TensorBoard's event files are read back with tensorboardX's own protobufs (it has no
reader; the framing is TFRecord's), W&B's offline run file with wandb's protobufs (its
records are a LevelDB log).
"""

import glob
import json
import os
import pathlib
import struct

import pytest

from fedjax_sim import cli, writers

tensorboardX = pytest.importorskip("tensorboardX")


def tensorboard_events(logdir):
  """Every Event in the event files of `logdir` (TFRecord framing: length, its CRC,
  the record, its CRC)."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
    data = pathlib.Path(path).read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12:pos + 12 + length])
      events.append(event)
      pos += 12 + length + 4
  return events


def tensorboard_scalars(logdir):
  """tag -> {step: value} of the scalar summaries."""
  out = {}
  for event in tensorboard_events(logdir):
    for value in event.summary.value:
      if value.WhichOneof("value") == "simple_value":
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def wandb_records(path):
  """The Records of a W&B run file: a LevelDB log (header ':W&B', magic, version; 32 KiB
  blocks of chunks: CRC, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
  from wandb.proto import wandb_internal_pb2
  data = pathlib.Path(path).read_bytes()
  assert data[:4] == b":W&B"
  pos, block, parts, records = 7, 32768, [], []
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0 and length == 0:
      pos += left
      continue
    parts.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(parts))
      records.append(record)
      parts = []
  return records


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("writers") / "run"
  flags = ["run", "--rounds", "4", "--eval-every", "2", "--clients-per-round", "3", "--steps",
           "2", "--client-lr", "0.07", "--output", str(out), "--no-progress", "--tensorboard"]
  have_wandb = True
  try:
    import wandb  # noqa: F401
  except ImportError:
    have_wandb = False
  if have_wandb:
    flags += ["--wandb", "fedjax-sim-test", "--wandb-mode", "offline"]
  assert cli.main(flags) == 0
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  return out, rows


def test_tensorboard_holds_every_round_the_config_and_the_summary(run):
  out, rows = run
  logdir = out / "tensorboard"
  scalars = tensorboard_scalars(logdir)
  for name in ("train_loss", "update_norm", "num_examples"):
    assert scalars[name] == pytest.approx({r["round"]: r[name] for r in rows}, rel=1e-6), name
  assert scalars["test_accuracy"] == pytest.approx(
      {r["round"]: r["test_accuracy"] for r in rows if "test_accuracy" in r}, rel=1e-6)
  assert sorted(scalars["test_accuracy"]) == [2, 4]
  from tensorboardX.proto import api_pb2, plugin_hparams_pb2
  plugin = {}
  texts = {}
  for event in tensorboard_events(logdir):
    for value in event.summary.value:
      name = value.metadata.plugin_data.plugin_name
      if name == "hparams":
        data = plugin_hparams_pb2.HParamsPluginData()
        data.ParseFromString(value.metadata.plugin_data.content)
        plugin[value.tag] = data
      elif name == "text":
        texts[value.tag] = b"".join(value.tensor.string_val).decode()
  start = plugin["_hparams_/session_start_info"].session_start_info.hparams
  assert start["client_lr"].number_value == pytest.approx(0.07)
  assert start["task"].string_value == "synthetic"
  metrics = {m.name.tag for m in plugin["_hparams_/experiment"].experiment.metric_infos}
  assert {"train_loss", "test_accuracy"} <= metrics
  assert (plugin["_hparams_/session_end_info"].session_end_info.status
          == api_pb2.Status.Value("STATUS_SUCCESS"))
  assert "| status | completed |" in texts["summary/text_summary"]
  assert '"client_lr": 0.07' in texts["config/text_summary"]


def test_tensorboard_writer_marks_a_failed_run(tmp_path):
  writer = writers.TensorBoardWriter(tmp_path, config={"lr": 1.0})
  writer.on_rounds([{"round": 1, "train_loss": 2.0}, {"round": 2, "train_loss": 1e9}])
  writer.on_end({"status": "diverged at round 2", "rounds": 1, "seconds": 0.1,
                 "final": {"round": 1, "train_loss": 2.0}})
  assert tensorboard_scalars(tmp_path)["train_loss"] == {1: 2.0, 2: 1e9}
  from tensorboardX.proto import api_pb2, plugin_hparams_pb2
  [end] = [v for e in tensorboard_events(tmp_path) for v in e.summary.value
           if v.tag == "_hparams_/session_end_info"]
  data = plugin_hparams_pb2.HParamsPluginData()
  data.ParseFromString(end.metadata.plugin_data.content)
  assert data.session_end_info.status == api_pb2.Status.Value("STATUS_FAILURE")


def test_a_resumed_tensorboard_log_purges_the_rounds_it_redoes(tmp_path):
  first = writers.TensorBoardWriter(tmp_path)
  first.on_rounds([{"round": r, "train_loss": 1.0 * r} for r in (1, 2, 3, 4)])
  first.close()  # killed after round 4, resumed from the checkpoint of round 2
  resumed = writers.TensorBoardWriter(tmp_path)
  resumed.on_rounds([{"round": r, "train_loss": 10.0 * r} for r in (3, 4)])
  resumed.close()
  events = tensorboard_events(tmp_path)
  # TensorBoard drops earlier events at steps >= a session START's step.
  [start] = [e for e in events if e.HasField("session_log")]
  assert start.step == 3 and start.session_log.status == start.session_log.START
  steps = [(e.step, v.simple_value) for e in events for v in e.summary.value]
  assert steps[-2:] == [(3, 30.0), (4, 40.0)] and (1, 1.0) in steps


def test_wandb_offline_run_holds_every_round_the_config_and_the_summary(run):
  pytest.importorskip("wandb")
  out, rows = run
  [path] = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
  records = wandb_records(path)
  history = {}
  summary = {}
  config = {}
  for record in records:
    kind = record.WhichOneof("record_type")
    if kind == "history":
      items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
               for i in record.history.item}
      history[items["_step"]] = items
    elif kind == "summary":
      for update in record.summary.update:
        summary["/".join(update.nested_key) or update.key] = json.loads(update.value_json)
    elif kind == "run":
      config = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                for i in record.run.config.update}
  assert sorted(history) == [1, 2, 3, 4]
  for row in rows:
    for name in ("train_loss", "update_norm", "test_accuracy"):
      if name in row:
        assert history[row["round"]][name] == pytest.approx(row[name], rel=1e-6), name
  assert "test_accuracy" not in history[1] and "test_accuracy" in history[2]
  assert config["client_lr"] == pytest.approx(0.07) and config["task"] == "synthetic"
  assert summary["status"] == "completed" and summary["rounds"] == 4
  assert summary["final/test_accuracy"] == pytest.approx(rows[-1]["test_accuracy"], rel=1e-6)


@pytest.mark.parametrize("flags, extra", [(["--tensorboard"], "tensorboard"),
                                          (["--wandb", "p"], "wandb")])
def test_a_missing_writer_package_is_one_line_before_anything_runs(
    flags, extra, tmp_path, monkeypatch, capsys):
  real = writers.importlib.util.find_spec
  monkeypatch.setattr(writers.importlib.util, "find_spec",
                      lambda name, *a: None if name in ("tensorboardX", "wandb") else real(name, *a))
  out = tmp_path / "run"
  assert cli.main(["run", "--rounds", "2", "--output", str(out), "--no-progress", *flags]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"pip install 'fedjax_sim[{extra}]'" in err
  assert not (out / "config.json").exists()


def test_a_writer_that_cannot_start_is_one_line_and_loses_no_finished_run(
    tmp_path, monkeypatch, capsys):
  # W&B online without an API key failed at wandb.init, after the finished run in the
  # folder had been cleared; a --tensorboard DIR that is a file failed after a chunk.
  for name in ("WANDB_API_KEY", "WANDB_MODE"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
  out = tmp_path / "run"
  base = ["run", "--rounds", "2", "--clients-per-round", "3", "--steps", "1", "--output",
          str(out), "--no-progress"]
  assert cli.main(base) == 0
  kept = sorted(os.listdir(out))
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  for flags, message in ((["--wandb", "p"], "--wandb: W&B cannot log online here"),
                         (["--tensorboard", str(a_file)], "is a file, not a folder")):
    capsys.readouterr()
    assert cli.main([*base, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert sorted(os.listdir(out)) == kept


def test_a_resumed_run_continues_its_w_and_b_run(tmp_path):
  # It started a second W&B run, which split the rounds in two.
  out = tmp_path / "run"
  assert cli.main(["run", "--rounds", "2", "--clients-per-round", "3", "--steps", "1",
                   "--output", str(out), "--no-progress", "--wandb", "p",
                   "--wandb-mode", "offline"]) == 0
  assert cli.main(["run", "--resume", str(out), "--no-progress"]) == 0
  runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
  run_id = json.loads((out / "config.json").read_text())["wandb_id"]
  assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs), runs


def test_overwrite_clears_the_old_log_and_a_diverged_chunk_reaches_it(tmp_path):
  # --overwrite left the old configuration's TensorBoard events beside the new ones (two
  # values a step), and the rounds of the chunk in which a run diverged went to
  # metrics.jsonl but not to the writers.
  out = tmp_path / "run"
  base = ["run", "--rounds", "6", "--eval-every", "6", "--clients-per-round", "3",
          "--steps", "2", "--output", str(out), "--no-progress", "--tensorboard"]
  assert cli.main([*base, "--client-lr", "0.07"]) == 0
  assert cli.main([*base, "--server-lr", "300", "--overwrite"]) != 0  # diverges
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert 0 < len(rows) < 6
  scalars = tensorboard_scalars(out / "tensorboard")["train_loss"]
  assert scalars == pytest.approx({r["round"]: r["train_loss"] for r in rows})
