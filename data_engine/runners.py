"""Runners: the same per-input work, locally (worker processes) or as an Apache Beam pipeline.

A job is a list of input keys (photo paths, or scene indices for synthesis) and a `work`
function `key -> Result` that is pure: the same key, config and seed give the same samples,
whichever runner, worker or order runs it. Outputs are idempotent: a sample is written
atomically to `OUT/samples/<safe id>/`, then a line recording the input's outcome is
appended to `OUT/engine_manifest.jsonl`. A re-run skips the inputs the manifest lists, so a
crash between the two writes just rewrites the same folder: nothing is lost or duplicated.
`summary(OUT)` turns the manifest into per-stage pass rates and the reasons for drops.

Each manifest line records the fingerprint of its input and of the config it ran with (the
job's `fingerprint(key)`): an input whose photo, bank or config changed since is redone, its
earlier samples removed first, so a drop caused by a config mistake is redone once the config
is fixed. An input dropped for a passing reason (`RETRY_REASONS`: an agent endpoint that was
down, rate-limited or timing out) is pending again on the next run whatever its fingerprint.
One run at a time writes an output (`fileio.output_lock`); a second one refuses.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import shutil
import traceback
from pathlib import Path
from typing import Callable, Iterable

from layerjax.data import schema
from layerjax.fileio import append_lines, atomic_file, output_lock, sweep

MANIFEST = 'engine_manifest.jsonl'
SUMMARY = 'engine_summary.json'
Fingerprint = Callable[[str], str] | None
# Drop reasons (`core.Drop.reason`) that say nothing about the input itself.
RETRY_REASONS = frozenset({'agent_unavailable', 'agent_timeout', 'agent_rate_limited'})


@dataclasses.dataclass
class Result:
  key: str
  samples: list                 # LayeredSamples that passed every stage
  record: list                  # Decision dicts, in stage order
  dropped: str | None = None    # the reason, if the input produced nothing
  fingerprint: str | None = None  # of the input and the config it ran with

  def manifest_line(self) -> dict:
    return {'key': self.key, 'samples': [s.id for s in self.samples],
            'dropped': self.dropped, 'record': self.record, 'fingerprint': self.fingerprint}


def retryable(entry: dict) -> bool:
  """Whether a manifest entry was dropped for a passing reason (see `RETRY_REASONS`)."""
  last = entry['record'][-1] if entry['record'] else {}
  return entry['dropped'] is not None and last.get('reason') in RETRY_REASONS


def finished(output: Path) -> dict[str, dict]:
  """Manifest entries by input key (the last line wins); unparsable lines are ignored."""
  path = Path(output) / MANIFEST
  if not path.exists():
    return {}
  entries = {}
  for line in path.read_text().splitlines():
    try:
      entry = json.loads(line)
    except json.JSONDecodeError:
      continue
    entries[entry['key']] = entry
  return entries


def write_result(result: Result, output: Path) -> None:
  _write_samples(result, output)
  append_lines(Path(output) / MANIFEST, [json.dumps(result.manifest_line())])


def guarded(work: Callable[[str], Result], key: str) -> Result:
  """`work(key)`, with any exception the stages did not turn into a drop recorded as one."""
  try:
    return work(key)
  except Exception as e:  # one input must never stop the run
    detail = f'{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}'
    return Result(key, [], [{'stage': 'engine', 'passed': False, 'reason': 'crash',
                             'details': {'detail': detail}, 'seconds': 0.0}], 'crash')


def _prepare(keys: Iterable[str], output: Path, fingerprint: Fingerprint) -> dict[str, str]:
  """The pending keys with their fingerprints: those not in the manifest (a torn last line
  from a kill mid-append counts as missing; `append_lines` cuts it), dropped for a passing
  reason, or recorded with another fingerprint (lines without one, from before
  fingerprints, count as current). The samples a redone input made before are removed
  first, so none outlives the input or config that made it."""
  entries = finished(output)
  pending = {}
  for key in dict.fromkeys(keys):
    fp = fingerprint(key) if fingerprint else None
    entry = entries.get(key)
    if entry and not retryable(entry) and entry.get('fingerprint', fp) == fp:
      continue
    pending[key] = fp
    for sid in (entry or {}).get('samples', ()):
      shutil.rmtree(schema.sample_folder(Path(output) / 'samples', sid), ignore_errors=True)
  sweep(Path(output) / 'samples')
  return pending


# Workers build their tools once (models in part 2) and reuse them for every input.
_WORKER: dict = {}


def _init_worker(make_work):
  _WORKER['work'] = make_work()


def _run_in_worker(key: str) -> Result:
  return guarded(_WORKER['work'], key)


def run_local(keys: Iterable[str], make_work: Callable[[], Callable[[str], Result]],
              output: Path, workers: int = 0, progress: bool = True,
              fingerprint: Fingerprint = None, desc: str = 'engine') -> dict:
  """Processes every pending key; `make_work()` builds the work function (in each worker);
  `fingerprint(key)` is that of the key's input and config (see the module's docstring);
  `desc` names the progress bar."""
  from tqdm import tqdm
  output = Path(output)
  with output_lock(output):
    pending = _prepare(keys, output, fingerprint)
    bar = tqdm(total=len(pending), disable=not progress, unit='input', desc=desc)
    if workers > 0 and pending:
      ctx = multiprocessing.get_context('spawn')  # no forked JAX/OpenCV thread state
      with ctx.Pool(workers, initializer=_init_worker, initargs=(make_work,),
                    maxtasksperchild=200) as pool:
        for result in pool.imap_unordered(_run_in_worker, pending):
          result.fingerprint = pending[result.key]
          write_result(result, output)
          bar.update()
    elif pending:
      work = make_work()
      for key, fp in pending.items():
        result = guarded(work, key)
        result.fingerprint = fp
        write_result(result, output)
        bar.update()
    bar.close()
    return summary(output)


def _work_dofn(make_work):
  """A Beam DoFn around `make_work`: tools are built once per DoFn instance (`setup`)."""
  import apache_beam as beam

  class Work(beam.DoFn):
    def setup(self):
      self.work = make_work()

    def process(self, item):
      key, fp = item
      result = guarded(self.work, key)
      result.fingerprint = fp
      yield result

  return Work()


def run_beam(keys: Iterable[str], make_work: Callable[[], Callable[[str], Result]],
             output: Path, beam_options: Iterable[str] = (),
             fingerprint: Fingerprint = None) -> dict:
  """The same job as an Apache Beam pipeline (DirectRunner unless `beam_options` say else).

  Samples are written by the workers (atomic folders); the manifest lines are gathered and
  appended by this process when the pipeline finishes, so the manifest stays one writer's.
  """
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  output = Path(output)
  with output_lock(output):
    pending = _prepare(keys, output, fingerprint)
    if pending:
      lines_prefix = output / '.beam' / 'results'
      options = PipelineOptions(list(beam_options))
      with beam.Pipeline(options=options) as p:
        _ = (p
             | 'Inputs' >> beam.Create(sorted(pending.items()))
             | 'Reshuffle' >> beam.Reshuffle()
             | 'Work' >> beam.ParDo(_work_dofn(make_work))
             | 'WriteSamples' >> beam.Map(_write_samples, str(output))
             | 'Lines' >> beam.Map(lambda r: json.dumps(r.manifest_line()))
             | 'WriteLines' >> beam.io.WriteToText(str(lines_prefix),
                                                   file_name_suffix='.jsonl'))
      parts = sorted(lines_prefix.parent.glob('results*.jsonl'))
      append_lines(output / MANIFEST, [line for part in parts
                                       for line in sorted(part.read_text().splitlines())])
      for part in parts:
        part.unlink()
    return summary(output)


def _write_samples(result: Result, output) -> Result:
  # The engine owns its samples folder: a sample rewritten after a crash replaces itself.
  for sample in result.samples:
    schema.write_folder(sample, schema.sample_folder(Path(output) / 'samples', sample.id),
                        overwrite=True)
  return result


def summary(output: Path) -> dict:
  """Per-stage pass rates and drop reasons over every input in the manifest; also written
  to `OUT/engine_summary.json`."""
  entries = finished(output)
  stages: dict[str, collections.Counter] = {}
  reasons: collections.Counter = collections.Counter()
  for entry in entries.values():
    for d in entry['record']:
      stages.setdefault(d['stage'], collections.Counter())['passed' if d['passed'] else
                                                            'dropped'] += 1
      if not d['passed']:
        reasons[f'{d["stage"]}: {d["reason"]}'] += 1
  result = {
      'inputs': len(entries),
      'samples': sum(len(e['samples']) for e in entries.values()),
      'dropped': sum(e['dropped'] is not None for e in entries.values()),
      'retry_on_rerun': sum(retryable(e) for e in entries.values()),
      'stages': {name: {'passed': c['passed'], 'dropped': c['dropped'],
                        'pass_rate': c['passed'] / max(1, c['passed'] + c['dropped'])}
                 for name, c in stages.items()},
      'drop_reasons': dict(reasons.most_common()),
  }
  with atomic_file(Path(output) / SUMMARY) as tmp:
    tmp.write_text(json.dumps(result, indent=2) + '\n')
  return result
