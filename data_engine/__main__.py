"""The engine's command line.

    python -m data_engine decompose --input PHOTOS --output DIR [--runner local|beam]
    python -m data_engine synthesize --bank DIR --num N --output DIR [--start K]
    python -m data_engine build-tfds DIR [--data-dir DIR/tfds] [--overwrite]
    python -m data_engine embed-texts --samples DIR/samples --weights SD3_DIR --out FILE
    python -m data_engine generate-objects --bank DIR --set "gennval.minimum={'cat': 50}"
    python -m data_engine refine-prompt --task validate_object --items LABELLED.jsonl
    python -m data_engine compare --a OUT_A --b OUT_B --names new,old --output prefs.jsonl

Every command but embed-texts takes `--config FILE.py[:ARG]` (default: the offline engine)
and any number of `--set key.sub=value`. Outputs: `DIR/samples/<id>/` (the on-disk
LayeredSample form), `DIR/engine_manifest.jsonl` (one line per input: its samples or why it
was dropped, and every stage's decision) and `DIR/engine_summary.json` (per-stage pass
rates, drop reasons). A re-run continues where the last one stopped, and redoes the inputs
whose photo, bank or config changed; build-tfds rebuilds only when the samples or its options
changed. One run at a time per output folder. The config is checked before any work; an
error is one line on stderr (exit 2 for bad input), with the traceback under `--verbose`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_engine import config as engine_config
from data_engine import core, gennval, jobs, preferences, refine, runners, text_embeddings
from layerjax import cli
from layerjax.fileio import as_path


def _run(args, config, keys, make_work, fingerprint) -> dict:
  if args.runner == 'beam':
    return runners.run_beam(keys, make_work, args.output, config.runner.beam_options,
                            fingerprint=fingerprint)
  return runners.run_local(keys, make_work, args.output, config.runner.workers,
                           progress=not args.quiet, fingerprint=fingerprint)


def print_summary(summary: dict, file=sys.stdout) -> None:
  print(f'{summary["inputs"]} inputs -> {summary["samples"]} samples '
        f'({summary["dropped"]} dropped, {summary["retry_on_rerun"]} of them to redo on a '
        're-run)', file=file)
  for name, s in summary['stages'].items():
    print(f'  {name:<12} {s["passed"]:>6} passed {s["dropped"]:>6} dropped '
          f'({s["pass_rate"]:.0%})', file=file)
  for reason, n in summary['drop_reasons'].items():
    print(f'  dropped: {n:>5}  {reason}', file=file)


@cli.entry
def main(argv: list[str]) -> int:
  p = cli.ArgumentParser(prog='python -m data_engine', description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True)
  dec = sub.add_parser('decompose', help='photos -> layered samples')
  dec.add_argument('--input', required=True, type=Path, help='folder of photos (recursive)')
  syn = sub.add_parser('synthesize', help='a bank of backgrounds and objects -> new scenes')
  syn.add_argument('--bank', required=True, type=Path)
  syn.add_argument('--num', required=True, type=cli.int_at_least(1))
  syn.add_argument('--start', type=cli.int_at_least(0), default=0, help='first scene index')
  for q in (dec, syn):
    q.add_argument('--output', required=True, type=Path)
    q.add_argument('--runner', choices=('local', 'beam'), default='local')
    q.add_argument('--quiet', action='store_true', help='no progress bar')
  tf = sub.add_parser('build-tfds', help='the samples in DIR -> the TFDS `layered` dataset')
  tf.add_argument('output', type=Path, help='an engine output folder')
  tf.add_argument('--data-dir', type=as_path, help='TFDS data_dir (default DIR/tfds; or a URL, '
                  'gs://...)')
  tf.add_argument('--on-error', choices=('raise', 'skip'), default='raise')
  tf.add_argument('--overwrite', action='store_true',
                  help='replace a dataset at --data-dir built from other samples')
  gen = sub.add_parser('generate-objects',
                       help="Gen-n-Val: top up the bank's categories with generated objects")
  gen.add_argument('--bank', required=True, type=Path)
  ref = sub.add_parser('refine-prompt', help="self-refine an LLM agent task's system prompt "
                       'on labelled items (Gen-n-Val / TextGrad)')
  ref.add_argument('--task', required=True, choices=sorted(refine.ITEM_TASKS))
  ref.add_argument('--items', required=True, type=Path, help='JSON lines with "expected"')
  cmp = sub.add_parser('compare', help='pairwise preference records between two engine '
                       'outputs of the same photos')
  cmp.add_argument('--a', required=True, type=Path)
  cmp.add_argument('--b', required=True, type=Path)
  cmp.add_argument('--names', default='a,b', help='system names of A and B, comma-separated')
  cmp.add_argument('--output', required=True, type=Path, help='records (JSON lines)')
  text_embeddings.add_subcommand(sub)
  for q in (dec, syn, tf, gen, ref, cmp):
    q.add_argument('--config', help='FILE.py[:ARG] with get_config(arg)')
    q.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  args = p.parse_args(argv)
  if args.command == 'embed-texts':  # takes no --config / --set
    return text_embeddings.handle(args)
  config = engine_config.load(args.config, args.set)

  if args.command == 'build-tfds':
    result = jobs.build_tfds(args.output, args.data_dir or args.output / 'tfds',
                             dict(config.runner.splits), args.on_error, args.overwrite)
    print(json.dumps(result, indent=2))
    return 0
  if args.command == 'generate-objects':
    agent = core.create('agent', config.agent)
    print(json.dumps(gennval.generate_objects(args.bank, config, agent,
                                              timeout=config.tool_timeout), indent=2))
    return 0
  if args.command == 'refine-prompt':
    print(json.dumps(refine.refine_from_config(args.task, args.items, config), indent=2))
    return 0
  if args.command == 'compare':
    names = tuple(args.names.split(','))
    if len(names) != 2:
      raise cli.UsageError(f'--names: expected two names, got {args.names!r}')
    counts = preferences.compare_outputs(core.create('agent', config.agent), args.a, args.b,
                                         args.output, names)
    records = preferences.read_records(args.output)
    print(json.dumps({**counts, 'bradley_terry': preferences.bradley_terry(records)}, indent=2))
    return 0
  if args.command == 'decompose':
    keys = jobs.list_photos(args.input, exclude=args.output)
    make_work = jobs.make_decompose(config, args.input)
    fingerprint = jobs.decompose_fingerprint(config, args.input)
  else:
    keys = jobs.scene_keys(args.start, args.num)
    make_work = jobs.make_synthesize(config, args.bank)
    fingerprint = jobs.synthesize_fingerprint(config, args.bank)
  print_summary(_run(args, config, keys, make_work, fingerprint))
  return 0


if __name__ == '__main__':
  sys.exit(main())
