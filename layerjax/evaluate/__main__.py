"""`python -m layerjax.evaluate`: one command scores any system's layers against ground truth,
beside the baselines (`baselines`: trivial and classical peeling) on the same samples.

  python -m layerjax.evaluate --benchmark folder --ground-truth GT --predictions PRED --out OUT
  python -m layerjax.evaluate --benchmark folder --ground-truth GT --predictions classical ...
  python -m layerjax.evaluate --benchmark folder --ground-truth GT --model MODEL \\
      --predictions PRED --out OUT [--view box]

GT and PRED are folders of sample folders, ours or LayerD's format (`folder`), matched by
name. `--predictions classical` scores the classical baseline itself; `--model` first
decomposes every ground-truth photo with `layerjax.infer.decomposer.Decomposer` (a packed
model or a training workdir) into PRED: the whole scene, or with `--view box` each
ground-truth object with its box as the prompt. Writes into OUT: `results.json` (scores,
counts, the missing / unexpected / unreadable samples with reasons, the settings),
`results.md` (the Markdown table, also printed), `per_sample.csv` and per-layer error
histograms (`layer_rgb_l1.png`, `layer_alpha_iou.png`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from layerjax import cli, host
from layerjax.evaluate import baselines, evaluators, folder, outputs
from layerjax.fileio import atomic_file

# Benchmark -> the evaluators it runs (by name, `evaluators.REGISTRY`).
BENCHMARKS = {'folder': ('layers',), 'crello': ('layerd',), 'reflade': ('reflade', 'layers'),
              'cocoa': ()}  # its own path (`cocoa`): instances, not sample folders
DEFAULT_VIEW = {'reflade': 'box'}  # RefLade refers to one object at a time


class UsageError(cli.UsageError):
  """A command-line argument that cannot work; the message names it."""


def _ks(text: str) -> tuple[int, ...]:
  try:
    ks = tuple(sorted({int(k) for k in text.split(',')}))
  except ValueError:
    ks = ()
  if not ks or ks[0] < 1:
    raise argparse.ArgumentTypeError(f'expected k values >= 1 such as 1,4, got {text!r}')
  return ks


def parse(argv) -> argparse.Namespace:
  p = cli.ArgumentParser(prog='python -m layerjax.evaluate', description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--benchmark', required=True, choices=sorted(BENCHMARKS))
  p.add_argument('--ground-truth', required=True, type=Path,
                 help='folder of sample folders; cocoa: the annotation JSON')
  p.add_argument('--images', type=Path, help="cocoa: the folder of the annotations' photos")
  p.add_argument('--predictions', required=True,
                 help="folder of sample folders (written first with --model), or 'classical'")
  p.add_argument('--out', required=True, type=Path, help='folder for the results')
  p.add_argument('--model', type=Path, help='decompose the ground truth with this model first')
  p.add_argument('--view', choices=folder.VIEWS,
                 help="'scene': whole samples; 'box': each object, prompted by its box "
                      '(default: box for reflade, else scene)')
  p.add_argument('--lpips', help="reflade: the lpips package's weights (.pth / .safetensors)")
  p.add_argument('--lpips-net', default='alex', choices=('alex', 'vgg'))
  p.add_argument('--inception', help="reflade: pytorch-fid's Inception weights")
  p.add_argument('--clip', help='reflade: a local transformers CLIP folder')
  p.add_argument('--random-weights', action='store_true',
                 help='reflade: random networks, to try the code (the scores are not the '
                      'metric and say so)')
  p.add_argument('--name', help="the predictions' column (default: 'model' with --model, "
                 'else the predictions folder\'s name)')
  p.add_argument('--baselines', default=','.join(baselines.NAMES),
                 help=f'comma-separated, of {baselines.NAMES}, or empty')
  p.add_argument('--pass-rate', type=_ks, default=(),
                 help='with --model: Pass-rate@k for these k (e.g. 1,4), judged by --judge')
  p.add_argument('--judge', type=cli.spec, default='rule_based',
                 help="the data engine's agent that judges (a name or a JSON spec)")
  p.add_argument('--min-judge-score', type=float, default=0.5,
                 help="a judged decomposition passes at this score or above (the engine's "
                      'post-filter default)')
  p.add_argument('--no-progress', action='store_true')
  return p.parse_args(argv)


def check(args) -> None:
  """Every argument, before any work."""
  if args.benchmark == 'cocoa':
    if not args.ground_truth.is_file():
      raise UsageError(f'--ground-truth {args.ground_truth}: no such file (COCOA: the '
                       'annotation JSON)')
    if args.images is None or not args.images.is_dir():
      raise UsageError(f'--images {args.images}: cocoa needs the folder of the photos')
    if args.predictions == baselines.CLASSICAL:
      raise UsageError("--predictions classical: not for cocoa (its baseline is the visible "
                       "mask, always scored)")
  elif not args.ground_truth.is_dir():
    raise UsageError(f'--ground-truth {args.ground_truth}: no such directory')
  from layerjax.data import schema
  if args.benchmark != 'cocoa' and not schema.sample_folders(args.ground_truth):
    raise UsageError(f'--ground-truth {args.ground_truth}: no sample folders in it')
  chosen = [b for b in args.baselines.split(',') if b]
  unknown = sorted(set(chosen) - set(baselines.NAMES))
  if unknown:
    raise UsageError(f'--baselines: unknown {unknown}; known: {list(baselines.NAMES)}')
  if args.model is not None:
    if args.predictions == baselines.CLASSICAL:
      raise UsageError("--model writes its predictions into --predictions: give a folder, "
                       "not 'classical'")
    if not args.model.exists():
      raise UsageError(f'--model {args.model}: no such model folder or workdir')
  elif args.predictions != baselines.CLASSICAL and not Path(args.predictions).is_dir():
    raise UsageError(f'--predictions {args.predictions}: no such directory (or give --model '
                     'to write it, or classical)')
  if args.benchmark == 'reflade' and not args.random_weights:
    for flag in ('lpips', 'inception', 'clip'):
      value = getattr(args, flag)
      if value is None:
        raise UsageError(f'--{flag}: reflade needs local weights for LPIPS, Inception and CLIP '
                         '(--lpips, --inception, --clip), or --random-weights to try the code '
                         '(not the metric)')
      if not Path(value).exists():
        raise UsageError(f'--{flag} {value}: no such file or folder')
  if args.pass_rate and args.model is None:
    raise UsageError('--pass-rate: needs --model (it samples the model K times per input)')
  if args.out.exists() and not args.out.is_dir():
    raise UsageError(f'--out {args.out}: exists and is not a directory')


def _prompt(gt, view: str):
  from layerjax.infer.prompts import Query
  return Query(box=gt.prompts[0].box) if view == 'box' else None


def predict(decomposer, gt_root: Path, pred_root: Path, view: str, progress: bool) -> None:
  """Decomposes every ground-truth photo (`view`) with the model into `pred_root`."""
  from tqdm import tqdm
  from layerjax.data import schema
  bad: dict[str, str] = {}  # unreadable ground truth: `folder.score` reports it
  for gt in tqdm(list(folder.ground_truth(gt_root, view, bad)), desc='decomposing',
                 unit='sample', disable=not progress):
    sample = decomposer.decompose(gt.image, _prompt(gt, view), sample_id=gt.id)
    schema.write_folder(sample, pred_root / gt.id, overwrite=True)


def pass_rates(decomposer, args, progress: bool) -> dict:
  """Pass-rate@k (`reflade.pass_rate`) for each k in `--pass-rate`: max(k) decompositions of
  every ground-truth photo (seeds 0, 1, ...), each judged by the engine's agent `--judge`
  (accepted at a score >= `--min-judge-score`, as the engine's post-filter accepts)."""
  from tqdm import tqdm
  from data_engine import core
  from layerjax.evaluate import reflade
  agent = core.create('agent', args.judge)
  inputs = []
  for gt in tqdm(list(folder.ground_truth(args.ground_truth, args.view, {})), unit='sample',
                 desc='pass-rate', disable=not progress):
    inputs.append((gt.id, gt.image, [
        decomposer.decompose(gt.image, _prompt(gt, args.view), seed=i, sample_id=gt.id)
        for i in range(max(args.pass_rate))]))
  out = reflade.pass_rate(inputs, agent, args.pass_rate, args.min_judge_score)
  return {**out, 'judge': args.judge}


def classical_source(view: str):
  tool = baselines.Classical()
  if view == 'box':
    return lambda gt: tool(gt.image, gt.id, boxes=[gt.prompts[0].box])
  return lambda gt: tool(gt.image, gt.id)


def systems(args) -> dict[str, folder.Source]:
  """The predictions first, then the baselines asked for, by column name."""
  out: dict[str, folder.Source] = {}
  if args.predictions == baselines.CLASSICAL:
    out[baselines.CLASSICAL] = classical_source(args.view)
  else:
    name = args.name or ('model' if args.model is not None else Path(args.predictions).name)
    out[name] = Path(args.predictions)
  for b in (b for b in args.baselines.split(',') if b and b not in out):
    out[b] = baselines.trivial if b == baselines.TRIVIAL else classical_source(args.view)
  return out


def save(out: Path, result: dict, rows: list[dict]) -> None:
  """`result` as results.json and its scores as results.md (the Markdown table), `rows` as
  per_sample.csv, in `out`."""
  out.mkdir(parents=True, exist_ok=True)
  with atomic_file(out / 'results.json') as tmp:
    tmp.write_text(json.dumps(result, indent=2, default=str) + '\n')
  with atomic_file(out / 'results.md') as tmp:
    tmp.write_text(f'# {result["benchmark"]}: {result["ground_truth"]}\n\n'
                   + outputs.markdown(result['scores']) + '\n')
  with atomic_file(out / 'per_sample.csv') as tmp:
    outputs.write_csv(tmp, rows)


def write(out: Path, report: folder.Report, settings: dict, passes: dict | None) -> dict:
  """results.json, results.md, per_sample.csv (`save`) and the plots in `out`; the JSON."""
  flat = outputs.flatten(report.results)
  notes = {f'{s}/{n}': r.notes for s, by in report.results.items() for n, r in by.items()
           if r.notes}
  result = {**settings, 'scores': flat, 'counts': report.counts(), 'notes': notes,
            'missing': report.missing, 'unexpected': report.unexpected,
            'invalid': report.invalid, 'invalid_ground_truth': report.invalid_ground_truth,
            'pass_rate': passes}
  save(out, result, [{'system': s, 'evaluator': n, **r} for s, by in report.rows.items()
                     for n, rs in by.items() for r in rs])
  for metric, range_ in (('rgb_l1', None), ('alpha_iou', (0.0, 1.0))):
    lines = {sys_: [(l['edits'], l[metric]) for l in by['layerd'].notes['curve']]
             for sys_, by in report.results.items() if 'layerd' in by}
    if lines:
      with atomic_file(out / f'edit_curve_{metric}.png') as tmp:
        outputs.save_png(tmp, outputs.curves(lines, f"LayerD's {metric} over merge edits",
                                             range_))
    values = {s: [v for r in by.get('layers', []) for k, v in r.items()
                  if k.endswith('/' + metric)] for s, by in report.rows.items()}
    if any(values.values()):
      with atomic_file(out / f'layer_{metric}.png') as tmp:
        outputs.save_png(tmp, outputs.histogram(values, f'per-layer {metric}', range_=range_))
  return result


@cli.entry
def main(argv: list[str]) -> int:
  args = parse(argv)
  args.view = args.view or DEFAULT_VIEW.get(args.benchmark, 'scene')
  check(args)
  progress = not args.no_progress
  if args.benchmark == 'cocoa':
    return cocoa(args, progress)
  decomposer = None
  if args.model is not None:
    from layerjax.infer.decomposer import Decomposer
    decomposer = Decomposer.load(args.model)
    predict(decomposer, args.ground_truth, Path(args.predictions), args.view, progress)
  names = BENCHMARKS[args.benchmark]
  options = {'reflade': {'lpips': args.lpips, 'inception': args.inception, 'clip': args.clip,
                         'lpips_net': args.lpips_net, 'random_weights': args.random_weights}}
  evs = {n: evaluators.create(n, **options.get(n, {})) for n in names}
  sources = systems(args)
  report = folder.score(args.ground_truth, sources, evs, args.view, progress)
  settings = {'benchmark': args.benchmark, 'ground_truth': str(args.ground_truth),
              'view': args.view, 'model': None if args.model is None else str(args.model),
              'systems': {s: str(src) if isinstance(src, Path) else s for s, src in
                          sources.items()},
              'evaluators': list(names)}
  passes = pass_rates(decomposer, args, progress) if args.pass_rate else None
  result = write(args.out, report, settings, passes)
  print(outputs.markdown(result['scores']))
  for key, note in result['notes'].items():
    for line in note.get('summary', ()):
      print(f'{key.split("/")[0]}: {line}')
  if passes:
    print(', '.join(f'pass@{k} {passes[f"pass@{k}"]:.3f}' for k in args.pass_rate) +
          f' ({passes["inputs"]} inputs, judge {passes["judge"]}, accepted at a score >= '
          f'{passes["min_score"]})')
  problems = ', '.join(f'{k} {v}' for k, v in result['counts'].items() if v)
  print(f'{report.samples} samples ({problems}); listed in {args.out / "results.json"}')
  return 0


def cocoa(args, progress: bool) -> int:
  """COCOA amodal mIoU: each instance decomposed (with `--model`: prompted by its visible
  box) or read from PRED/<instance>, its front object layer's alpha as the amodal mask,
  beside the `visible` baseline (the visible mask as the amodal one, the floor every
  amodal method must beat). Instances without a visible part (nothing to prompt with) and
  predictions that are missing or unreadable are listed and counted."""
  from tqdm import tqdm
  from layerjax.data import schema
  from layerjax.data.importers import cocoa as coco
  from layerjax.evaluate import amodal
  from layerjax.fileio import safe_name
  pred_root = Path(args.predictions)
  instances, skipped = [], {}
  for record in coco.regions(args.ground_truth):
    try:
      instances.append(coco.to_instance(record, args.images))
    except schema.SampleError as e:
      skipped[record['id']] = str(e)
  if args.model is not None:
    from layerjax.infer.decomposer import Decomposer
    decomposer = Decomposer.load(args.model)
    for inst in tqdm(instances, desc='decomposing', unit='instance', disable=not progress):
      sample = decomposer.decompose(inst.image_path, inst.query(('box',)),
                                    sample_id=safe_name(inst.id))
      schema.write_folder(sample, pred_root / safe_name(inst.id), overwrite=True)
  name = args.name or ('model' if args.model is not None else pred_root.name)
  items, missing, invalid = [], [], {}
  for inst in instances:
    folder_ = pred_root / safe_name(inst.id)
    if not (folder_ / 'manifest.json').is_file():
      missing.append(inst.id)
      continue
    try:
      objects = [l for l in schema.read_folder(folder_).layers if l.kind == 'object']
      if not objects:
        raise schema.SampleError(f'{folder_}: no object layer')
      items.append((inst.id, objects[-1].rgba[..., 3], inst.amodal, inst.visible))
    except (schema.SampleError, OSError) as e:
      invalid[inst.id] = str(e)
  if not items:
    raise UsageError(f'--predictions {pred_root}: no prediction of any of the '
                     f'{len(instances)} instances')
  scored = {i[0] for i in items}
  results = {name: amodal.evaluate(items),
             'visible': amodal.evaluate((i.id, i.visible.astype(np.float32), i.amodal,
                                         i.visible) for i in instances if i.id in scored)}
  flat = {f'{s}/amodal/{k}': v for s, r in results.items() for k, v in r.items()
          if k.startswith('mIoU') and v is not None}
  flat.update({f'{s}/amodal/count/{k}': r[k] for s, r in results.items()
               for k in ('instances', 'occluded_instances')})
  result = {'benchmark': 'cocoa', 'ground_truth': str(args.ground_truth),
            'images': str(args.images), 'predictions': str(pred_root), 'scores': flat,
            'skipped_instances': skipped, 'missing': missing, 'invalid': invalid,
            'counts': {'instances': len(instances), 'skipped_instances': len(skipped),
                       'missing': len(missing), 'invalid': len(invalid)}}
  save(args.out, result, [{'system': s, **row} for s, r in results.items()
                          for row in r['rows']])
  print(outputs.markdown(flat))
  for s, r in results.items():
    print(f'{s}: {amodal.summary(r)}')
  problems = ', '.join(f'{k} {v}' for k, v in result['counts'].items() if v)
  print(f'{problems}; listed in {args.out / "results.json"}')
  return 0


if __name__ == '__main__':
  host.reexec()
  sys.exit(main())
