"""Import a public layered dataset into the on-disk `LayeredSample` form, one folder a sample.

    python -m layerjax.data.importers crello PARQUET_OR_DIR... --output DIR [--max-size 1024]
    python -m layerjax.data.importers crello PARQUET_OR_DIR... --output DIR --layerd
    python -m layerjax.data.importers mulan --annotations DIR --images DIR --output DIR
    python -m layerjax.data.importers mulan --pairs PAIRS.csv --output DIR

Re-running continues: a sample already imported from the same input files with the same
options is not rewritten; one imported otherwise is. Sample folders are named by
`fileio.safe_name` of the record's id, so no id leads out of `--output`. A bad record is
skipped and counted with its reason (`--on-error raise` stops instead). One import at a time
per output folder. The output is a TFDS source:
`Layered(sources={'train': DIR}).download_and_prepare()`. An error is one line on stderr
(exit 2 for bad input), with the traceback under `--verbose`.

`crello --layerd` writes instead the ground truth of LayerD's Crello protocol
(`crello.layerd_layers`: short side 512 unless `--short-side`, transparent elements left out,
hidden ones dropped, a white layer first where the back does not cover) in LayerD's format, a
folder of back-to-front PNGs per template named as the template's sample folder is
('crello-<id>', `safe_name`), so predictions made from the sample folders pair with it in
`python -m layerjax.evaluate --benchmark crello`. A template LayerD leaves out (fewer than 2
layers) gets no folder; it is counted as left out, not as a bad record.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from layerjax import cli
from layerjax.data.schema import SampleError, sample_folder, write_folder
from layerjax.evaluate.layerd import CRELLO_SHORT_SIDE, PROVENANCE, write_layerd_folder
from layerjax.fileio import OutputError, fingerprint, output_lock, sweep, tree_stats


class LeftOut(Exception):
  """A record the dataset's protocol leaves out: counted with its reason, never an error."""


@dataclasses.dataclass(frozen=True)
class Form:
  """How a record (anything with `id` and a `provenance` dict) is stored: `write(record,
  folder)` replaces a folder of its own kind only; `marker` is the JSON file there whose
  'provenance' holds the import fingerprint."""
  write: Callable[[Any, Path], object]
  marker: str


@dataclasses.dataclass
class LayerdTemplate:
  """A template's LayerD ground truth: uint8 RGBA layers, back to front."""
  id: str
  layers: list
  provenance: dict


MAX_SIZE = 1024   # the longest side of crello sample folders unless --max-size
SAMPLES = Form(lambda sample, dst: write_folder(sample, dst, overwrite=True), 'manifest.json')
LAYERD = Form(lambda t, dst: write_layerd_folder(t.layers, dst, t.provenance, overwrite=True),
              PROVENANCE)


def _imported_as(folder: Path, marker: str) -> str | None:
  try:
    return json.loads((folder / marker).read_text())['provenance']['import']
  except (OSError, ValueError, KeyError, TypeError):
    return None


def import_rows(rows: Iterable[dict], to_record: Callable[[dict], Any], output: Path,
                on_error: str = 'skip', limit: int | None = None,
                fingerprint: str | None = None, form: Form = SAMPLES) -> dict:
  """Writes each row's record to `output/<safe id>` as `form` says; returns counts and the
  reasons for skips ('errors') and for records `to_record` left out (`LeftOut`, 'left_out').

  `fingerprint` (of the input files and options) goes into each record's provenance
  ('import'); a record already there with the same one is left as it is, one with another
  is replaced. A destination that is not a folder of the form's kind is a bad record, never
  replaced.
  """
  output = Path(output)
  counts = collections.Counter()
  errors, left_out = [], []
  with output_lock(output):
    sweep(output)
    for i, row in enumerate(rows):
      if limit is not None and i >= limit:
        break
      try:
        record = to_record(row)
        record.provenance['import'] = fingerprint
        dst = sample_folder(output, record.id)
        if (dst / form.marker).is_file() and _imported_as(dst, form.marker) == fingerprint:
          counts['existing'] += 1
          continue
        form.write(record, dst)
      except LeftOut as e:
        counts['left_out'] += 1
        left_out.append(str(e))
        continue
      except (SampleError, OutputError) as e:
        if on_error == 'raise':
          raise
        counts['bad'] += 1
        errors.append(str(e))
        continue
      counts['written'] += 1
  return {'counts': dict(counts), 'errors': errors, 'left_out': left_out}


@cli.entry
def main(argv: list[str]) -> int:
  p = cli.ArgumentParser(prog='python -m layerjax.data.importers', description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='dataset', required=True)
  crello = sub.add_parser('crello', help='Crello parquet files (cyberagent/crello)')
  crello.add_argument('paths', nargs='+', help='parquet files or folders of them')
  crello.add_argument('--layout', default='auto', choices=('auto', 'v5', 'normalized'))
  crello.add_argument('--max-size', type=cli.int_at_least(1), default=None,
                      help=f'longest side in pixels (default {MAX_SIZE}; not with --layerd)')
  crello.add_argument('--layerd', action='store_true',
                      help="write LayerD's Crello ground truth, a folder of back-to-front PNGs "
                           'per template, instead of sample folders')
  crello.add_argument('--short-side', type=cli.int_at_least(1), default=None,
                      help=f'with --layerd: short side in pixels (default '
                           f'{CRELLO_SHORT_SIDE}, as LayerD\'s protocol)')
  mulan = sub.add_parser('mulan', help='MuLAn annotations plus their base images')
  mulan.add_argument('--annotations', help='folder of .p.zip / .p annotation files')
  mulan.add_argument('--images', help='folder of the base images, matched by file stem')
  mulan.add_argument('--pairs', help='CSV with columns image, annotation')
  for q in (crello, mulan):
    q.add_argument('--output', required=True, type=Path)
    q.add_argument('--on-error', default='skip', choices=('skip', 'raise'))
    q.add_argument('--limit', type=cli.int_at_least(0), default=None,
                   help='stop after this many records')
  args = p.parse_args(argv)

  form = SAMPLES
  if args.dataset == 'crello':
    from layerjax.data.importers import crello as module
    if args.layerd and args.max_size is not None:
      p.error('crello: --max-size does not apply with --layerd (use --short-side)')
    if args.short_side is not None and not args.layerd:
      p.error('crello: --short-side applies with --layerd only')
    rows = module.rows(args.paths, layout=args.layout)
    inputs = module.parquet_files(args.paths)
    if args.layerd:
      short_side = args.short_side or CRELLO_SHORT_SIDE
      to_record = lambda row: _layerd_template(row, short_side)
      options = {'layout': args.layout, 'layerd': True, 'short_side': short_side}
      form = LAYERD
    else:
      max_size = args.max_size or MAX_SIZE
      to_record = lambda row: module.to_sample(row, max_size=max_size)
      options = {'layout': args.layout, 'max_size': max_size}
  else:
    from layerjax.data.importers import mulan as module
    if bool(args.pairs) == bool(args.annotations):
      p.error('mulan: give either --pairs or --annotations (with --images)')
    rows = module.rows(args.annotations, args.images, pairs_csv=args.pairs)
    to_record = module.to_sample
    inputs, options = [x for x in (args.annotations, args.images, args.pairs) if x], {}
  fp = fingerprint(args.dataset, options, [[str(x), tree_stats(x)] for x in inputs])
  result = import_rows(rows, to_record, args.output, args.on_error, args.limit, fp, form)
  counts = result['counts']
  left_out = f', {counts["left_out"]} left out' if counts.get('left_out') else ''
  print(f'{args.dataset} -> {args.output}: {counts.get("written", 0)} written, '
        f'{counts.get("existing", 0)} already there, {counts.get("bad", 0)} skipped{left_out}')
  for error in result['errors']:
    print(f'  skipped: {error}', file=sys.stderr)
  for reason in result['left_out']:
    print(f'  left out: {reason}', file=sys.stderr)
  return 0


def _layerd_template(row: dict, short_side: int) -> LayerdTemplate:
  from layerjax.data.importers import crello
  layers = crello.layerd_layers(row, short_side)
  if not layers:
    raise LeftOut(f'crello template {row["id"]!r}: fewer than 2 layers after LayerD\'s '
                  f'filtering, so LayerD writes no ground truth for it')
  return LayerdTemplate(crello.sample_id(row['id']), layers, {
      'source': 'crello', 'protocol': 'layerd', 'template_id': row['id'],
      'file': row.get('_file'), 'row': row.get('_row'), 'short_side': short_side,
      'canvas_size': [row['canvas_width'], row['canvas_height']]})


if __name__ == '__main__':
  sys.exit(main())
