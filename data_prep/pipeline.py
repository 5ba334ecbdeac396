"""The Apache Beam pipeline that turns subjects into sharded TFRecord patch pairs.

  Create(subject specs) -> Map(simulate or load) -> FlatMap(patch pairs) -> Map(encode)
    -> Partition(split) -> WriteToTFRecord(one file per bundle) -> plan N shards
    -> fileio.WriteToFiles(<split>-%05d-of-%05d.tfrecord) -> Map(scan shard)

Simulation runs inside the pipeline, so the runner spreads subjects over its workers. Every
subject spec carries its own seed and its split (`data_prep.subject_specs`). Beam's sinks write
temporary files and rename them (see `WriteOptions` for how examples reach shards, and
`data_prep.sharding` for the stages that plan and write them); the scans of the finished shards
feed the manifest (`data_prep.manifest`), and the whole dataset is published by one rename.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Iterator, Sequence

import numpy as np

from data_prep import manifest as manifest_lib
from data_prep import model_errors as model_errors_lib
from data_prep import patches as patches_lib
from data_prep import sharding
from data_prep import subject_specs as specs_lib
from qsmgan_tf import nifti_io
from qsmgan_tf import physics
from qsmgan_tf import records
from qsmgan_tf.records import codec
from qsmgan_tf.errors import InputError

_SIDE_DIR = "_build"
_BUNDLE_DIR = "_bundles"


# --------------------------------------------------------------------------------------
# Pipeline stages (module-level functions: Beam pickles them by reference)
# --------------------------------------------------------------------------------------
def make_subject(spec: specs_lib.SubjectSpec):
  """Simulates (or loads) the subject of a spec: ``(spec, Subject)``."""
  if spec.kind == "real":
    from data_prep import subjects as subjects_lib  # pylint: disable=import-outside-toplevel
    subject = subjects_lib.load_subject(spec.path, target=spec.target)
  else:
    from data_prep import simulate  # pylint: disable=import-outside-toplevel
    errors = (model_errors_lib.realistic_model_errors(spec.seed)
              if spec.model_errors == "realistic" else None)
    subject = simulate.simulate_subject(
        spec.kind, spec.seed, shape=spec.shape, voxel_size_mm=spec.voxel_size_mm,
        b0_dir=spec.b0_dir, snr=spec.snr, lesions=spec.lesions,
        background_order=spec.background_order, target=spec.target,
        subject_id=spec.subject_id, model_errors=errors, detail=spec.detail)
  if str(subject.subject_id) != spec.subject_id:
    subject = dataclasses.replace(subject, subject_id=spec.subject_id)
  return spec, subject


def subject_summary(spec_subject) -> dict:
  """What the manifest records about a subject (its split, geometry and seed)."""
  spec, subject = spec_subject
  return {
      "split": spec.split,
      "subject_id": spec.subject_id,
      "kind": spec.kind,
      "seed": spec.seed,
      "shape": [int(n) for n in np.shape(subject.mask)],
      "voxel_size_mm": [float(v) for v in subject.voxel_size_mm],
      "b0_dir": [round(float(v), 6) for v in physics.unit_vector(subject.b0_dir)],
      "snr": None if subject.snr is None else float(subject.snr),
      "lesions": spec.lesions,
      "target": spec.target,
      "mask_voxels": int(np.count_nonzero(subject.mask)),
      "model_errors": subject.meta.get("model_errors", {}).get("levels"),
      "detail": spec.detail,
  }


def subject_pairs(spec_subject, config: patches_lib.PatchConfig) -> Iterator[tuple[str, tuple]]:
  """``(split, (arrays, meta))`` for every patch pair of a subject."""
  spec, subject = spec_subject
  kind = spec.kind
  for pair in patches_lib.patch_pairs(subject, config, spec.seed, kind=kind):
    yield spec.split, pair


_COUNTER_NAMESPACE = "qsmgan_tf.data_prep"


def encode_pair(split_pair, dtypes: dict) -> tuple[str, bytes]:
  """``(split, serialized tf.train.Example)``; counts the pairs per split (a Beam metric)."""
  from apache_beam.metrics import Metrics  # pylint: disable=import-outside-toplevel
  split, (arrays, meta) = split_pair
  Metrics.counter(_COUNTER_NAMESPACE, f"pairs_{split}").inc()
  return split, codec.encode(arrays, meta, dtypes)


def _split_index(element, num_partitions) -> int:  # pylint: disable=unused-argument
  return specs_lib.SPLITS.index(element[0])


def _write_json(items, path) -> None:
  nifti_io.write_text(path, json.dumps(list(items)))


def beam_args(runner: str = "DirectRunner", num_workers: int = 1,
              running_mode: str = "in_memory", extra: Sequence[str] = ()) -> list[str]:
  """Beam pipeline options for a runner.

  'DirectRunner' means its local engine, FnApiRunner, used directly: Beam 2.77's DirectRunner
  first tries to download the Prism runner binary, which must not happen here (no network).
  """
  if runner.lower() in ("directrunner", "direct", "fnapirunner"):
    # Worker processes log every bundle at INFO; later options (extra) override this.
    return ["--runner=FnApiRunner", f"--direct_num_workers={int(num_workers)}",
            f"--direct_running_mode={running_mode}", "--default_sdk_harness_log_level=WARNING",
            *extra]
  return [f"--runner={runner}", *extra]




SHARDING_MODES = ("fileio", "reshard", "beam")


@dataclasses.dataclass(frozen=True)
class WriteOptions:
  """Output layout: shards per split, Beam runner options and how examples reach shards.

  ``sharding='fileio'`` (default) and ``'reshard'`` share a first stage: Beam's TFRecord sink
  writes one file per bundle as the workers produce examples (``num_shards=0``, no
  GroupByKey), and the records are indexed and dealt into exactly N shard plans in a seeded
  order over their SHA-256 (only these small plans are grouped). ``'fileio'`` then writes each
  shard with Beam's file sink, ``fileio.WriteToFiles`` (one destination per shard: temporary
  file, then rename); ``'reshard'`` copies the framed records into the shards itself. Both
  give shards that are byte-identical from run to run, and to each other, at the same speed
  and memory (BUILD.md, data_prep).
  ``'beam'``: ``WriteToTFRecord(num_shards=N)``; Beam groups every example by shard key (a
  GroupByKey), which the DirectRunner holds in memory (peak RSS grows with the dataset:
  measured 3.5-5.1 GB for 0.7 GB of examples), moving each ~0.86 MB example through its data
  plane.
  """
  train_shards: int = 16
  val_shards: int = 2
  beam_args: tuple[str, ...] = ("--runner=FnApiRunner",)
  sharding: str = "fileio"
  seed: int = 0


def run_pipeline(specs: Sequence[specs_lib.SubjectSpec], config: patches_lib.PatchConfig, out_dir,
                 write: WriteOptions) -> dict[str, Any]:
  """Runs the Beam pipeline into ``out_dir`` (an empty staging folder).

  Returns:
    ``{'shard_scans': {split: [...]}, 'subjects': {split: [...]}}`` for `manifest.build_manifest`.
  """
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.io import fileio  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  from apache_beam.options.value_provider import StaticValueProvider  # pylint: disable=import-outside-toplevel

  out_dir = pathlib.Path(out_dir)
  side = out_dir / _SIDE_DIR
  side.mkdir(exist_ok=True)
  present = [s for s in specs_lib.SPLITS if any(spec.split == s for spec in specs)]
  shards = {"train": write.train_shards, "val": write.val_shards}
  dtypes = config.storage_dtypes()
  options = PipelineOptions(list(write.beam_args))
  p = beam.Pipeline(options=options)
  subjects = (p
              | "Specs" >> beam.Create(list(specs))
              | "Simulate" >> beam.Map(make_subject))
  _ = (subjects
       | "Summarise" >> beam.Map(subject_summary)
       | "SubjectList" >> beam.combiners.ToList()
       | "WriteSubjects" >> beam.Map(_write_json, str(side / "subjects.json")))
  examples = (subjects
              | "Patches" >> beam.FlatMap(subject_pairs, config)
              | "Encode" >> beam.Map(encode_pair, dtypes)
              | "BySplit" >> beam.Partition(_split_index, len(specs_lib.SPLITS)))
  for index, split in enumerate(specs_lib.SPLITS):
    if split not in present:
      continue
    values = examples[index] | f"Drop{split}" >> beam.Values()
    if write.sharding == "beam":
      scans = (values
               | f"Write{split}" >> beam.io.WriteToTFRecord(
                   str(out_dir / split), file_name_suffix=records.SHARD_SUFFIX,
                   num_shards=shards[split], shard_name_template=records.BEAM_SHARD_TEMPLATE)
               | f"Scan{split}" >> beam.Map(manifest_lib.scan_for_manifest))
    else:
      bundles = out_dir / _BUNDLE_DIR
      plans = (values
               | f"Write{split}" >> beam.io.WriteToTFRecord(
                   str(bundles / split), file_name_suffix=records.SHARD_SUFFIX,
                   num_shards=0, shard_name_template=records.BEAM_SHARD_TEMPLATE)
               | f"Index{split}" >> beam.FlatMap(sharding.index_bundle)
               | f"IndexList{split}" >> beam.combiners.ToList()
               | f"Plan{split}" >> beam.FlatMap(
                   sharding.plan_shards, str(out_dir / split), shards[split],
                   specs_lib.derive_seed(write.seed, split))
               | f"Spread{split}" >> beam.Reshuffle())
      if write.sharding == "fileio":
        scans = (plans
                 | f"Read{split}" >> beam.FlatMap(sharding.plan_payloads)
                 | f"Shard{split}" >> fileio.WriteToFiles(
                     str(out_dir), file_naming=sharding.shard_file_name,
                     destination=sharding.shard_destination, sink=sharding.tfrecord_sink,
                     # Beam 2.77 calls .get() on it: a plain string fails in the workers.
                     temp_directory=StaticValueProvider(str, str(bundles / f"fileio-{split}")),
                     # Never spill a shard's records into Beam's GroupByKey path (more files).
                     max_writers_per_bundle=shards[split])
                 | f"Scan{split}" >> beam.Map(
                     sharding.scan_written, str(out_dir),
                     beam.pvalue.AsDict(
                         plans | f"ByName{split}" >> beam.Map(sharding.plan_by_name))))
      else:
        scans = plans | f"Shard{split}" >> beam.Map(sharding.write_shard)
    _ = (scans
         | f"ScanList{split}" >> beam.combiners.ToList()
         | f"WriteScans{split}" >> beam.Map(_write_json, str(side / f"shards_{split}.json")))
  result = p.run()
  result.wait_until_finish()
  produced = _counters(result)
  with open(side / "subjects.json", encoding="utf-8") as f:
    subjects_out = manifest_lib.summarise_subjects(json.load(f))
  scans = {}
  for split in present:
    with open(side / f"shards_{split}.json", encoding="utf-8") as f:
      scans[split] = json.load(f)
  for path in side.iterdir():
    path.unlink()
  side.rmdir()
  shutil.rmtree(out_dir / _BUNDLE_DIR, ignore_errors=True)
  stray = [n for n in os.listdir(out_dir) if n.startswith("beam-temp")]
  if stray:
    raise RuntimeError(f"Beam left temporary files in {out_dir}: {stray}")
  written = {s: sum(x["num_records"] for x in v) for s, v in scans.items()}
  for split in present:
    # Measured: DirectRunner multi_threading with a GroupByKey of large elements (sharding
    # 'beam') lost records. Never publish a dataset that is not what the workers produced.
    if produced.get(split) is not None and produced[split] != written[split]:
      raise RuntimeError(f"Beam produced {produced[split]} {split} pairs but the shards hold "
                         f"{written[split]}: records were lost; not publishing")
  logging.info("wrote %s", written)
  return {"shard_scans": scans, "subjects": subjects_out}


def _counters(result) -> dict[str, int]:
  """Committed per-split pair counters of a finished pipeline (empty if the runner has none)."""
  from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=import-outside-toplevel
  out = {}
  try:
    query = result.metrics().query(MetricsFilter().with_namespace(_COUNTER_NAMESPACE))
  except (NotImplementedError, AttributeError):
    return out
  for counter in query["counters"]:
    split = counter.key.metric.name[len("pairs_"):]
    out[split] = out.get(split, 0) + int(counter.committed or 0)
  return out


def make_dataset(specs: Sequence[specs_lib.SubjectSpec], config: patches_lib.PatchConfig, out_dir,
                 write: WriteOptions, *, target: str = "chi", flags: dict | None = None,
                 overwrite: bool = False) -> dict:
  """Builds a whole dataset folder: pipeline, manifest, then one rename into ``out_dir``.

  Returns:
    The manifest.

  Raises:
    InputError: ``out_dir`` exists (without ``overwrite``), no subjects, or bad shard counts.
  """
  if not specs:
    raise InputError("no subjects: pass --synthetic_brains/--synthetic_shapes or --subjects_dir")
  if write.train_shards < 1 or write.val_shards < 1:
    raise InputError("--shards and --val_shards must be >= 1")
  if write.sharding not in SHARDING_MODES:
    raise InputError(f"--sharding must be one of {SHARDING_MODES}, got {write.sharding!r}")
  ids = [s.subject_id for s in specs]
  if len(set(ids)) != len(ids):
    raise InputError("subject ids are not unique")
  tmp = manifest_lib.staging_dir(out_dir, overwrite=overwrite)
  try:
    result = run_pipeline(specs, config, tmp, write)
    manifest = manifest_lib.build_manifest(
        shard_scans=result["shard_scans"], subjects=result["subjects"], patch_config=config,
        target=target, flags=flags)
    manifest_lib.write_manifest(tmp, manifest)
    manifest_lib.publish(tmp, out_dir)
  except BaseException:
    manifest_lib.discard(tmp)
    raise
  return manifest
