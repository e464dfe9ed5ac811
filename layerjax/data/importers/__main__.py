"""Import a public layered dataset into the on-disk `LayeredSample` form, one folder a sample.

    python -m layerjax.data.importers crello PARQUET_OR_DIR... --output DIR [--max-size 1024]
    python -m layerjax.data.importers mulan --annotations DIR --images DIR --output DIR
    python -m layerjax.data.importers mulan --pairs PAIRS.csv --output DIR

Re-running continues: a sample already imported from the same input files with the same
options is not rewritten; one imported otherwise is. Sample folders are named by
`fileio.safe_name` of the record's id, so no id leads out of `--output`. A bad record is
skipped and counted with its reason (`--on-error raise` stops instead). One import at a time
per output folder. The output is a TFDS source:
`Layered(sources={'train': DIR}).download_and_prepare()`. An error is one line on stderr
(exit 2 for bad input), with the traceback under `--verbose`.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Callable, Iterable

from layerjax import cli
from layerjax.data.schema import SampleError, sample_folder, write_folder
from layerjax.fileio import OutputError, fingerprint, output_lock, sweep, tree_stats


def _imported_as(folder: Path) -> str | None:
  try:
    return json.loads((folder / 'manifest.json').read_text())['provenance']['import']
  except (OSError, ValueError, KeyError, TypeError):
    return None


def import_rows(rows: Iterable[dict], to_sample: Callable[[dict], object], output: Path,
                on_error: str = 'skip', limit: int | None = None,
                fingerprint: str | None = None) -> dict:
  """Writes each row's sample to `output/<safe id>`; returns counts and the reasons for skips.

  `fingerprint` (of the input files and options) goes into each sample's provenance
  ('import'); a sample already there with the same one is left as it is, one with another
  is replaced. A destination that is not a sample folder is a bad record, never replaced.
  """
  output = Path(output)
  counts = collections.Counter()
  errors = []
  with output_lock(output):
    sweep(output)
    for i, row in enumerate(rows):
      if limit is not None and i >= limit:
        break
      try:
        sample = to_sample(row)
        sample.provenance['import'] = fingerprint
        dst = sample_folder(output, sample.id)
        if (dst / 'manifest.json').is_file() and _imported_as(dst) == fingerprint:
          counts['existing'] += 1
          continue
        write_folder(sample, dst, overwrite=True)
      except (SampleError, OutputError) as e:
        if on_error == 'raise':
          raise
        counts['bad'] += 1
        errors.append(str(e))
        continue
      counts['written'] += 1
  return {'counts': dict(counts), 'errors': errors}


@cli.entry
def main(argv: list[str]) -> int:
  p = cli.ArgumentParser(prog='python -m layerjax.data.importers', description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='dataset', required=True)
  crello = sub.add_parser('crello', help='Crello parquet files (cyberagent/crello)')
  crello.add_argument('paths', nargs='+', help='parquet files or folders of them')
  crello.add_argument('--layout', default='auto', choices=('auto', 'v5', 'normalized'))
  crello.add_argument('--max-size', type=cli.int_at_least(1), default=1024,
                      help='longest side in pixels')
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

  if args.dataset == 'crello':
    from layerjax.data.importers import crello as module
    rows = module.rows(args.paths, layout=args.layout)
    to_sample = lambda row: module.to_sample(row, max_size=args.max_size)
    inputs = module.parquet_files(args.paths)
    options = {'layout': args.layout, 'max_size': args.max_size}
  else:
    from layerjax.data.importers import mulan as module
    if bool(args.pairs) == bool(args.annotations):
      p.error('mulan: give either --pairs or --annotations (with --images)')
    rows = module.rows(args.annotations, args.images, pairs_csv=args.pairs)
    to_sample = module.to_sample
    inputs, options = [x for x in (args.annotations, args.images, args.pairs) if x], {}
  fp = fingerprint(args.dataset, options, [[str(x), tree_stats(x)] for x in inputs])
  result = import_rows(rows, to_sample, args.output, args.on_error, args.limit, fp)
  counts = result['counts']
  print(f'{args.dataset} -> {args.output}: {counts.get("written", 0)} written, '
        f'{counts.get("existing", 0)} already there, {counts.get("bad", 0)} skipped')
  for error in result['errors']:
    print(f'  skipped: {error}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
