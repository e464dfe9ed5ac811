"""Command line: decompose photos with a trained model, and pack a model for it.

  python -m layerjax.decompose pack --workdir W [--step N] --out MODEL [--overwrite]
  python -m layerjax.decompose --model MODEL --image photo.jpg
      [--box x0,y0,x1,y1] [--point x,y ...] [--mask m.png] [--text "the red mug"]
      [--layers auto|N] [--seeds K] [--steps N] [--guidance G]
      [--format psd,ora,pptx,zip] [--preview] --out OUT

`pack` writes the EMA weights and the config of a training workdir's checkpoint (latest, or
`--step`) as an inference model, without optimizer state. `--model` takes such a folder or
a training workdir itself.

With a prompt (points, a box, a mask, a text, or several), the referred object is
decomposed: OUT is a sample folder (the schema's on-disk form: `manifest.json`, the photo and
one PNG per layer: background, the object's shadow, the object). Without one, the whole
scene: every object the proposal tools find (`--detector`, `--depth`, `--threshold`), at
most `--layers N` (`auto`: until no proposal is left, at most 8), peeled front to back.

`--format` writes layer files as well (`layerjax.export`: Photoshop, OpenRaster,
PowerPoint, a ZIP of the PNGs), next to the sample folder as OUT.psd, OUT.ora, ...;
`--preview` a contact sheet, OUT.preview.png.

`--image DIR` decomposes every photo under DIR (one sample folder per photo in
OUT/samples/, its files in OUT/files/, a manifest and OUT/engine_summary.json, with a
progress bar), resumable as the data engine's runs are: a re-run skips the photos done with
the same model and settings.
Errors are one line on stderr (exit 2 for bad input), checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from layerjax import cli, host
from layerjax.data.schema import SAMPLE_FOLDER, read_folder, sample_folders, write_folder
from layerjax.export import destinations, formats, write
from layerjax.fileio import Artifact, check_destination, fingerprint
from layerjax.infer import prompts

RUN_FOLDER = Artifact('decompose run', lambda p: (p / 'engine_manifest.jsonl').is_file())


def _numbers(text: str, n: int, form: str) -> tuple[float, ...]:
  try:
    return prompts.parse_numbers(text, n, form)
  except prompts.PromptError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _box(text: str):
  return _numbers(text, 4, prompts.BOX)


def _point(text: str):
  return _numbers(text, 2, prompts.POINT)


def _layers(text: str) -> int | None:
  if text == 'auto':
    return None
  return cli.int_at_least(1)(text)


def _pack(argv: list[str]) -> int:
  p = cli.ArgumentParser(prog='python -m layerjax.decompose pack',
                         description='Pack a training checkpoint as an inference model.')
  p.add_argument('--workdir', required=True, help='a training workdir')
  p.add_argument('--step', type=cli.int_at_least(0), help='default: the latest checkpoint')
  p.add_argument('--out', required=True, type=Path, help='the model folder to write')
  p.add_argument('--overwrite', action='store_true', help='replace a packed model at --out')
  a = p.parse_args(argv)
  from layerjax.infer import model
  out = model.pack(a.workdir, a.out, step=a.step, overwrite=a.overwrite)
  print(f'packed {a.workdir} -> {out}')
  return 0


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog='python -m layerjax.decompose',
                         description='Decompose photos into RGBA layers with a trained model '
                                     '(`pack` packs one: python -m layerjax.decompose pack -h).')
  p.add_argument('--model', required=True, help='a packed model folder or a training workdir')
  p.add_argument('--image', required=True, type=Path, help='a photo, or a folder of photos')
  p.add_argument('--out', required=True, type=Path,
                 help='a sample folder (one photo) or a run folder (a folder of photos)')
  p.add_argument('--box', type=_box, help='x0,y0,x1,y1 in pixels, end-exclusive')
  p.add_argument('--point', type=_point, action='append', default=[],
                 help='x,y in pixels (repeat for several)')
  p.add_argument('--mask', type=Path, help='a PNG the size of the photo: pixels >= 128 are in')
  p.add_argument('--text', default='', help='a referring text, e.g. "the red mug"')
  p.add_argument('--layers', type=_layers, default=None,
                 help='whole scene (no prompt): auto, or at most N objects')
  p.add_argument('--seeds', type=cli.int_at_least(1), default=1,
                 help='samples per object; the one closest to the photo is kept')
  p.add_argument('--seed', type=int, default=0, help='the first seed')
  p.add_argument('--steps', type=cli.int_at_least(1), help="default: the model's eval steps")
  p.add_argument('--guidance', type=float, default=1.0,
                 help='classifier-free guidance scale (models trained with cond_dropout)')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), help='default: as trained')
  p.add_argument('--step', type=cli.int_at_least(0),
                 help='with a training workdir: the checkpoint (default: latest)')
  p.add_argument('--embeddings', type=Path,
                 help='precomputed SD3 text embeddings, for text prompts to SD3-text models')
  p.add_argument('--detector', type=cli.spec, default='saliency_boxes',
                 help='whole scene: the engine detector (name or JSON spec)')
  p.add_argument('--depth', type=cli.spec, default='vertical_prior',
                 help='whole scene: the engine depth tool (name or JSON spec)')
  p.add_argument('--threshold', type=float, default=None,
                 help='whole scene: the lowest detection score kept (default 0.05)')
  p.add_argument('--format', type=formats, default=(),
                 help='layer files to write as well: psd, ora, pptx, zip (comma-separated)')
  p.add_argument('--preview', action='store_true',
                 help='a contact sheet: the photo, each layer, the recomposition')
  p.add_argument('--overwrite', action='store_true',
                 help='one photo: replace a sample folder (and its files) at --out')
  p.add_argument('--no-progress', dest='progress', action='store_false',
                 help='a folder of photos: no progress bar')
  return p


def _query(a):
  from layerjax.infer.prompts import Query
  if not (a.point or a.box or a.mask or a.text):
    return None
  if a.layers is not None:
    raise cli.UsageError('--layers is for the whole scene; a prompt refers to one object')
  return Query(points=tuple(a.point), box=a.box, mask=a.mask, text=a.text)


@cli.entry
def main(argv: list[str]) -> int:
  if argv and argv[0] == 'pack':
    return _pack(argv[1:])
  a = _parser().parse_args(argv)
  if not a.image.exists():
    raise FileNotFoundError(f'{a.image}: no such file or folder')
  folder = a.image.is_dir()
  a.files = a.format + (('preview',) if a.preview else ())
  if folder:
    check_destination(a.out, RUN_FOLDER, overwrite=True)  # a run there is resumed
  else:
    check_destination(a.out, SAMPLE_FOLDER, a.overwrite)
    files = destinations(a.out, a.files, a.overwrite)
  query = _query(a)
  from layerjax.infer import decomposer as dec
  from layerjax.infer.scene import Proposals
  proposals = None
  if query is None:
    proposals = Proposals(a.detector, a.depth,
                          **({} if a.threshold is None else {'threshold': a.threshold}))
  model = dec.Decomposer.load(a.model, step=a.step, dtype=a.dtype, embeddings=a.embeddings)
  settings = dict(seeds=a.seeds, seed=a.seed, steps=a.steps, guidance=a.guidance,
                  max_layers=a.layers, proposals=proposals)
  if not folder:
    t = time.perf_counter()
    sample = model.decompose(a.image, query, sample_id=a.image.stem, **settings)
    write_folder(sample, a.out, overwrite=a.overwrite)
    for fmt, path in files:
      write(sample, fmt, path, overwrite=a.overwrite)
    _report(sample, a.out, time.perf_counter() - t)
    for _, path in files:
      print(f'  {path}')
    return 0
  return _run_folder(model, a, query, settings)


def _report(sample, out: Path, seconds: float) -> None:
  p = sample.provenance
  names = ', '.join(f'{l.name} ({l.label or l.kind})' for l in sample.layers)
  print(f'{out}: {len(sample.layers)} layers: {names}')
  raw = p.get('raw_recompose_l1')
  if raw is not None:
    print(f'  raw recomposition L1 {raw:.4f} at the model\'s resolution, '
          f'{p["upsampled_recompose_l1"]:.4f} upsampled; exact after the solve '
          f'({p["repaired_pixels"]} pixels kept from the photo)')
  print(f'  {seconds:.1f} s (sampling {p["timings"]["sampling"]:.1f} s, decoding '
        f'{p["timings"]["decoding"]:.1f} s, post-processing '
        f'{p["timings"]["postprocess"]:.1f} s)')


def _run_folder(model, a, query, settings) -> int:
  from data_engine import jobs, runners, stages
  root = a.image
  keys = jobs.list_photos(root, exclude=a.out)
  if not keys:
    raise FileNotFoundError(f'{root}: no photos ({", ".join(jobs.PHOTO_SUFFIXES)})')
  backend = model.backend
  # What the samples depend on: the model, every option but where and how output is
  # shown, and the mask file's contents (by size and time, as the photos).
  options = {k: str(v) for k, v in vars(a).items()
             if k not in ('out', 'progress', 'overwrite', 'verbose', 'format', 'preview',
                          'files')}  # files are made from the samples, after the run
  mask = a.mask.stat() if a.mask else None
  base = fingerprint(backend.source, backend.step, options,
                     mask and (mask.st_size, mask.st_mtime_ns))

  def make_work():
    def work(key: str):
      path = Path(key)
      t = time.perf_counter()
      sample = model.decompose(path, query, sample_id=stages.sample_id(path, root), **settings)
      sample.provenance['source'] = path.relative_to(root).as_posix()
      record = [{'stage': 'decompose', 'passed': True, 'reason': '',
                 'details': {'layers': len(sample.layers)},
                 'seconds': time.perf_counter() - t}]
      return runners.Result(key, [sample], record)
    return work

  summary = runners.run_local(keys, make_work, a.out, 0, a.progress,
                              jobs.photo_fingerprint(base, root), desc='decompose')
  print(f'{a.out}: {summary["samples"]} of {summary["inputs"]} photos decomposed'
        + (f', {summary["dropped"]} failed: {summary["drop_reasons"]}'
           if summary['dropped'] else ''))
  if a.files:
    print(f'{a.out / "files"}: {_write_files(a.out, a.files)} files written')
  return 0 if not summary['dropped'] else cli.FAILED


def _write_files(run: Path, fmts) -> int:
  """The layer files of every sample of a run, in run/files/: those missing or older than
  their sample (the run folder is this command's own, so a sample done again replaces its
  files), also for samples an earlier run made without `--format`."""
  written = 0
  for folder in sample_folders(run / 'samples'):
    made = (folder / 'manifest.json').stat().st_mtime_ns
    todo = [(fmt, path) for fmt, path in destinations(run / 'files' / folder.name, fmts, True)
            if not path.exists() or path.stat().st_mtime_ns < made]
    sample = read_folder(folder) if todo else None
    for fmt, path in todo:
      write(sample, fmt, path, overwrite=True)
    written += len(todo)
  return written


if __name__ == '__main__':
  host.reexec()
  sys.exit(main())
