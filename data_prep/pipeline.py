"""The Apache Beam pipeline that turns subjects into sharded TFRecord patch pairs.

  Create(subject specs) -> Map(simulate or load) -> FlatMap(patch pairs) -> Map(encode)
    -> Partition(split) -> WriteToTFRecord(one file per bundle) -> plan N shards
    -> fileio.WriteToFiles(<split>-%05d-of-%05d.tfrecord) -> Map(scan shard)

Simulation runs inside the pipeline, so the runner spreads subjects over its workers. Every
subject spec carries its own seed derived from the dataset seed and the subject's name, so a
subject's pairs do not depend on how many subjects there are or in which order they run; the
train/validation split is drawn per subject (stratified by kind), never per patch. Beam's
sinks write temporary files and rename them (see `WriteOptions` for how examples reach shards);
the scans of the finished shards feed the manifest (`data_prep.manifest`), and the whole dataset
is published by one rename.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
from typing import Any, Iterator, Sequence

import numpy as np

from data_prep import manifest as manifest_lib
from data_prep import model_errors as model_errors_lib
from data_prep import patches as patches_lib
from data_prep import phantoms as phantoms_lib
from qsmgan_tf import nifti_io
from qsmgan_tf import physics
from qsmgan_tf import records
from qsmgan_tf.records import codec
from qsmgan_tf.errors import InputError

SPLITS = ("train", "val")
SYNTHETIC_KINDS = ("brain", "shapes")
_SIDE_DIR = "_build"
_BUNDLE_DIR = "_bundles"


@dataclasses.dataclass(frozen=True)
class SubjectSpec:
  """What a worker needs to make one subject (picklable, small).

  Attributes:
    subject_id: unique name, e.g. 'brain-00003' or a real subject's folder name.
    split: 'train' or 'val'.
    kind: 'brain', 'shapes' (simulated) or 'real'.
    seed: the subject's own seed (phantom, noise, patch choice, augmentation).
    snr: simulated SNR (None: noise-free).
    voxel_size_mm: simulated voxel size, mm.
    b0_dir: simulated B0 direction (voxel frame).
    lesions: simulate microbleeds/calcification.
    shape: simulation grid; None = the phantom's natural grid.
    target: 'chi' or 'cosmos'.
    background_order: residual background polynomial degree (0 = none).
    model_errors: 'none', or 'realistic': departures from the dipole model drawn from the
      subject's seed (`data_prep.model_errors.realistic_model_errors`, as ``make_phantom``).
    detail: brains' fine anatomy, 'none' or 'fine' (`data_prep.phantoms.brain_phantom`).
    path: a real subject's folder.
  """
  subject_id: str
  split: str
  kind: str
  seed: int
  snr: float | None = 100.0
  voxel_size_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
  b0_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)
  lesions: bool = False
  shape: tuple[int, int, int] | None = None
  target: str = "chi"
  background_order: int = 0
  model_errors: str = "none"
  detail: str = "none"
  path: str | None = None


def derive_seed(seed: int, *names: Any) -> int:
  """A 63-bit seed from the dataset seed and names (stable across runs and platforms)."""
  text = json.dumps([int(seed), *[str(n) for n in names]])
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def assign_splits(subject_ids: Sequence[str], seed: int, val_fraction: float,
                  stratum: str = "") -> dict[str, str]:
  """Draws the validation subjects: ``round(n * val_fraction)`` of them, at least 1 (when
  ``val_fraction > 0`` and n >= 2) and at most n - 1; deterministic in the seed and the ids.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise InputError(f"--val_fraction must be in [0, 1), got {val_fraction}")
  ids = sorted(subject_ids)
  n = len(ids)
  n_val = int(round(n * val_fraction))
  if val_fraction > 0 and n >= 2:
    n_val = min(max(n_val, 1), n - 1)
  elif n < 2:
    n_val = 0
  order = np.random.default_rng(derive_seed(seed, "split", stratum)).permutation(n)
  val = {ids[i] for i in order[:n_val]}
  return {sid: ("val" if sid in val else "train") for sid in ids}


def tilted_b0(tilt_deg: float, rng: np.random.Generator) -> tuple[float, float, float]:
  """B0 tilted from z by ``tilt_deg`` towards a random azimuth (voxel frame)."""
  t = math.radians(float(tilt_deg))
  phi = float(rng.uniform(0.0, 2.0 * math.pi))
  return (math.sin(t) * math.cos(phi), math.sin(t) * math.sin(phi), math.cos(t))


def synthetic_specs(n_brains: int, n_shapes: int, seed: int, *, val_fraction: float = 0.1,
                    lesion_fraction: float = 0.5, snrs: Sequence[float | None] = (100.0,),
                    voxel_sizes: Sequence[Sequence[float]] = ((1.0, 1.0, 1.0),),
                    b0_tilts_deg: Sequence[float] = (0.0,),
                    shape: Sequence[int] | None = None, target: str = "chi",
                    background_order: int = 0,
                    model_errors: str = "none",
                    model_error_fraction: float = 1.0,
                    detail: str = "none", detail_fraction: float = 1.0) -> list[SubjectSpec]:
  """Specs of the simulated subjects: per subject, SNR, voxel size and B0 tilt are drawn from
  the given lists and lesions with probability ``lesion_fraction`` (brains only), all from the
  subject's own seed; with ``model_errors='realistic'`` a share ``model_error_fraction`` of the
  subjects (drawn per subject) also gets the model errors its seed draws
  (`data_prep.model_errors.realistic_model_errors`); with ``detail='fine'`` a share
  ``detail_fraction`` of the brains (drawn per subject) has the fine anatomy
  (`data_prep.phantoms.brain_phantom`).
  """
  if n_brains < 0 or n_shapes < 0:
    raise InputError("numbers of synthetic subjects must be >= 0")
  if not 0.0 <= lesion_fraction <= 1.0:
    raise InputError(f"--lesion_fraction must be in [0, 1], got {lesion_fraction}")
  if not snrs or not voxel_sizes or not b0_tilts_deg:
    raise InputError("--snr, --voxel_sizes and --b0_tilt_deg need at least one value")
  if model_errors not in model_errors_lib.MODEL_ERROR_MODES:
    raise InputError(f"--model_errors must be one of {', '.join(model_errors_lib.MODEL_ERROR_MODES)}"
                     f", got {model_errors!r}")
  if not 0.0 <= model_error_fraction <= 1.0:
    raise InputError(f"--model_error_fraction must be in [0, 1], got {model_error_fraction}")
  if detail not in phantoms_lib.DETAIL_MODES:
    raise InputError(f"--detail must be one of {', '.join(phantoms_lib.DETAIL_MODES)}, "
                     f"got {detail!r}")
  if not 0.0 <= detail_fraction <= 1.0:
    raise InputError(f"--detail_fraction must be in [0, 1], got {detail_fraction}")
  specs = []
  for kind, count in zip(SYNTHETIC_KINDS, (n_brains, n_shapes)):
    ids = [f"{kind}-{i:05d}" for i in range(count)]
    splits = assign_splits(ids, seed, val_fraction, stratum=kind)
    for sid in ids:
      subject_seed = derive_seed(seed, sid)
      rng = np.random.default_rng(derive_seed(subject_seed, "geometry"))
      snr = snrs[int(rng.integers(len(snrs)))]
      voxel = tuple(float(v) for v in voxel_sizes[int(rng.integers(len(voxel_sizes)))])
      b0 = tilted_b0(b0_tilts_deg[int(rng.integers(len(b0_tilts_deg)))], rng)
      lesions = kind == "brain" and bool(rng.random() < lesion_fraction)
      # Drawn last and only when asked, so that datasets without errors keep their subjects.
      errors = model_errors
      if model_errors != "none" and model_error_fraction < 1.0:
        errors = model_errors if rng.random() < model_error_fraction else "none"
      fine = detail if kind == "brain" else "none"
      if fine != "none" and detail_fraction < 1.0:
        fine = detail if rng.random() < detail_fraction else "none"
      specs.append(SubjectSpec(
          subject_id=sid, split=splits[sid], kind=kind, seed=subject_seed, snr=snr,
          voxel_size_mm=voxel, b0_dir=b0, lesions=lesions,
          shape=tuple(int(n) for n in shape) if shape else None, target=target,
          background_order=int(background_order), model_errors=errors, detail=fine))
  return specs


def real_specs(subjects_dir, seed: int, val_fraction: float, target: str) -> list[SubjectSpec]:
  """Specs of real subjects found under ``subjects_dir`` (see `data_prep.subjects`)."""
  from data_prep import subjects as subjects_lib  # pylint: disable=import-outside-toplevel

  paths = [str(p) for p in subjects_lib.list_subjects(subjects_dir)]
  if not paths:
    raise InputError(f"no subjects found under {subjects_dir}")
  ids = {os.path.basename(os.path.normpath(p)): p for p in paths}
  if len(ids) != len(paths):
    raise InputError(f"subject folder names under {subjects_dir} are not unique")
  splits = assign_splits(list(ids), seed, val_fraction, stratum="real")
  return [SubjectSpec(subject_id=sid, split=splits[sid], kind="real",
                      seed=derive_seed(seed, "real", sid), snr=None, target=target,
                      path=path) for sid, path in sorted(ids.items())]


# --------------------------------------------------------------------------------------
# Pipeline stages (module-level functions: Beam pickles them by reference)
# --------------------------------------------------------------------------------------
def make_subject(spec: SubjectSpec):
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
  return SPLITS.index(element[0])


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


def _index_bundle(path) -> list[tuple[str, str, int, int, str, int]]:
  """``(sha256, path, offset, framed length, subject id, background flag)`` of every record
  of one bundle file: all the manifest needs per record, read once.
  """
  out = []
  for offset, length, data in records.iter_spans(path):
    out.append((hashlib.sha256(data).hexdigest(), str(path), offset, length, *codec.origin(data)))
  return out


def _plan_shards(index, prefix: str, num_shards: int, seed: int):
  """Deals the records into ``num_shards`` shards: a seeded permutation of the records sorted
  by SHA-256, so the plan depends on the example set only, not on Beam's bundle order.

  Yields:
    ``(shard path, [index entry, ...])`` per shard.
  """
  ordered = sorted(index)
  order = np.random.default_rng(seed).permutation(len(ordered))
  for i in range(num_shards):
    name = f"{prefix}-{i:05d}-of-{num_shards:05d}{records.SHARD_SUFFIX}"
    yield name, [ordered[j] for j in order[i::num_shards]]


def _planned_records(spans) -> Iterator[bytes]:
  """The framed records of a shard plan, read from the bundle files in plan order."""
  sources = {}
  try:
    for _, source, offset, length, _, _ in spans:
      if source not in sources:
        sources[source] = open(source, "rb")  # pylint: disable=consider-using-with
      f = sources[source]
      f.seek(offset)
      yield f.read(length)
  finally:
    for f in sources.values():
      f.close()


def _shard_scan(path, spans, file_sha256: str) -> dict:
  """The manifest scan of a written shard: its file hash, and the rest from its plan."""
  per_subject: dict[str, list[int]] = {}
  for *_, sid, background in spans:
    per_subject.setdefault(sid, [0, 0])[background] += 1
  return {
      "name": os.path.basename(path),
      "num_records": len(spans),
      "size_bytes": os.path.getsize(path),
      "sha256": file_sha256,
      "fingerprint": records.fingerprint(path),
      "record_sha256": [span[0] for span in spans],
      "per_subject": per_subject,
  }


def _write_shard(plan) -> dict:
  """Copies framed records into one shard (temp file, then rename); returns its manifest scan."""
  path, spans = plan
  tmp = f"{path}.tmp"
  file_hash = hashlib.sha256()
  with open(tmp, "wb") as out:
    for framed in _planned_records(spans):
      out.write(framed)
      file_hash.update(framed)
  os.replace(tmp, path)
  return _shard_scan(path, spans, file_hash.hexdigest())


def _plan_payloads(plan) -> Iterator[tuple[str, bytes | None]]:
  """``(shard name, record data)`` for every record of a shard plan, in plan order.

  All records of a shard come out of this one element, so they reach Beam's file sink within
  one bundle and `fileio.WriteToFiles` writes exactly one file per shard name. A shard with no
  records (more shards than examples) yields ``(name, None)``: the sink creates its file only
  for a destination it sees, and every listed shard must exist.
  """
  path, spans = plan
  name = os.path.basename(path)
  if not spans:
    yield name, None
  for framed in _planned_records(spans):
    yield name, framed[12:-4]


@functools.cache
def _tfrecord_sink_class():
  """A `fileio.FileSink` that frames records as `WriteToTFRecord` does (Beam's own code)."""
  from apache_beam.io import fileio  # pylint: disable=import-outside-toplevel
  from apache_beam.io import tfrecordio  # pylint: disable=import-outside-toplevel

  class TFRecordFileSink(fileio.FileSink):
    """Writes the data of ``(shard name, data)`` elements as TFRecords."""

    def open(self, fh):
      self._fh = fh  # pylint: disable=attribute-defined-outside-init

    def write(self, record):
      if record[1] is None:  # an empty shard: its file, opened for it, stays empty
        return
      # Beam ships no TFRecord `FileSink`; this is the framing `WriteToTFRecord` uses
      # (length, CRC-32C, data, CRC-32C). The data CRC is checked by the 'full' verify level.
      tfrecordio._TFRecordUtil.write_record(self._fh, record[1])  # pylint: disable=protected-access

    def flush(self):
      self._fh.flush()

  return TFRecordFileSink


def _tfrecord_sink(destination):
  """The `WriteToFiles` sink for any destination (built on the worker, never pickled)."""
  del destination
  return _tfrecord_sink_class()()


def _shard_destination(name_data) -> str:
  return name_data[0]


def _shard_file_name(window, pane, shard_index, total_shards, compression,  # pylint: disable=unused-argument
                     destination) -> str:
  """`WriteToFiles` naming: a destination is a shard's final name, and must be one file.

  Raises:
    RuntimeError: Beam wrote a shard's records into more than one file (they reached the sink
      in several bundles, or spilled past ``max_writers_per_bundle``).
  """
  if total_shards != 1:
    raise RuntimeError(f"Beam wrote {total_shards} files for {destination}, not one")
  return destination


def _plan_by_name(plan) -> tuple[str, list]:
  path, spans = plan
  return os.path.basename(path), spans


def _scan_written(file_result, out_dir, plans: dict) -> dict:
  """The manifest scan of a shard `WriteToFiles` has moved into ``out_dir``.

  Reads the shard once (every length CRC checked, the file hashed) and checks its record count
  against its plan; record digests and subjects come from the plan, as with `_write_shard`.

  Raises:
    RuntimeError: the shard does not hold the planned number of records.
  """
  path = os.path.join(out_dir, file_result.file_name)
  spans = plans[file_result.file_name]
  file_hash = hashlib.sha256()
  count = sum(1 for _ in records.iter_records(path, check_crc=False, file_hash=file_hash))
  if count != len(spans):
    raise RuntimeError(f"{file_result.file_name} holds {count} records, {len(spans)} planned")
  return _shard_scan(path, spans, file_hash.hexdigest())


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


def run_pipeline(specs: Sequence[SubjectSpec], config: patches_lib.PatchConfig, out_dir,
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
  present = [s for s in SPLITS if any(spec.split == s for spec in specs)]
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
              | "BySplit" >> beam.Partition(_split_index, len(SPLITS)))
  for index, split in enumerate(SPLITS):
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
               | f"Index{split}" >> beam.FlatMap(_index_bundle)
               | f"IndexList{split}" >> beam.combiners.ToList()
               | f"Plan{split}" >> beam.FlatMap(_plan_shards, str(out_dir / split),
                                                shards[split], derive_seed(write.seed, split))
               | f"Spread{split}" >> beam.Reshuffle())
      if write.sharding == "fileio":
        scans = (plans
                 | f"Read{split}" >> beam.FlatMap(_plan_payloads)
                 | f"Shard{split}" >> fileio.WriteToFiles(
                     str(out_dir), file_naming=_shard_file_name,
                     destination=_shard_destination, sink=_tfrecord_sink,
                     # Beam 2.77 calls .get() on it: a plain string fails in the workers.
                     temp_directory=StaticValueProvider(str, str(bundles / f"fileio-{split}")),
                     # Never spill a shard's records into Beam's GroupByKey path (more files).
                     max_writers_per_bundle=shards[split])
                 | f"Scan{split}" >> beam.Map(
                     _scan_written, str(out_dir),
                     beam.pvalue.AsDict(plans | f"ByName{split}" >> beam.Map(_plan_by_name))))
      else:
        scans = plans | f"Shard{split}" >> beam.Map(_write_shard)
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


def make_dataset(specs: Sequence[SubjectSpec], config: patches_lib.PatchConfig, out_dir,
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
