"""`make demo`: the main job end to end on a CPU, with nothing downloaded.

1. data: a procedural bank (smooth backgrounds, shaded shape cut-outs named by colour and
   shape), from which the data engine synthesises layered scenes with shadows and builds
   the TFDS `layered` dataset (train / validation / test by a hash of the scene id); a
   re-run reuses both (the engine resumes, the dataset is rebuilt only if its scenes
   changed);
2. training: `configs/liwi.py:demo` through `layerjax.train.trainer` (resumes if stopped);
3. evaluation on the held-out test scenes: the model's sampled layers and the same layers as
   `Decomposer` returns them (`exact`: solved against the photo) against trivial baselines
   (background = the input; foreground = the input cut by the prompt box; shadow = empty),
   and each against `TARGETS`;
4. the trained model packed for inference (`out/demo/model`), held-out photos (scaled up
   4x, to 128 px; one with its box as the prompt, one whole scene) and scikit-image's
   coffee photo (its cup's box, and whole) decomposed with it into sample folders with
   Photoshop, OpenRaster and contact-sheet files (`out/demo/decomposed/`), and the first
   one's object moved with its shadow (`out/demo/edited/`); a table says what was written
   where, and the commands to do the same by hand are printed.

The terminal shows progress and results; every log line (Orbax's, TFDS's, absl's) goes to
`out/demo/demo.log`.

    python -m layerjax.demo [--workdir out/demo] [--config configs/liwi.py:demo]
        [--config.total_steps=200 ...]
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from absl import flags
from PIL import Image

from layerjax import cli, host
from layerjax.fileio import Artifact, atomic_dir, atomic_file

_CONFIG = cli.define_config_file('configs/liwi.py:demo', 'demo config')
_WORKDIR = flags.DEFINE_string('workdir', 'out/demo', 'data, checkpoints and results')

COLOURS = {'red': (0.85, 0.15, 0.12), 'green': (0.2, 0.7, 0.25), 'blue': (0.15, 0.3, 0.85),
           'yellow': (0.95, 0.85, 0.15), 'purple': (0.55, 0.2, 0.7), 'orange': (0.95, 0.55, 0.1),
           'white': (0.95, 0.95, 0.95), 'black': (0.08, 0.08, 0.08)}
SHAPES = ('disc', 'square', 'triangle', 'ring', 'bar')
BANK = Artifact('image bank', lambda p: (p / 'backgrounds').is_dir())
SPLITS = {'train': 0.84, 'validation': 0.08, 'test': 0.08}


def _shape(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
  """An anti-aliased [n, n] alpha (4x supersampled) of a standing shape."""
  s = 4 * n
  yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s
  if name == 'disc':
    inside = np.hypot(xx - 0.5, yy - 0.5) < 0.45
  elif name == 'square':
    inside = (np.abs(xx - 0.5) < 0.4) & (np.abs(yy - 0.5) < 0.4)
  elif name == 'triangle':
    inside = (yy > 0.08) & (yy < 0.92) & (np.abs(xx - 0.5) < 0.45 * (yy - 0.08) / 0.84)
  elif name == 'ring':
    r = np.hypot(xx - 0.5, yy - 0.5)
    inside = (r < 0.45) & (r > 0.45 * rng.uniform(0.4, 0.6))
  else:  # a bar, taller than wide
    inside = (np.abs(xx - 0.5) < 0.18) & (np.abs(yy - 0.5) < 0.46)
  return inside.reshape(n, 4, n, 4).mean(axis=(1, 3)).astype(np.float32)


def make_bank(root: Path, seed: int = 0, backgrounds: int = 24, objects: int = 80) -> Path:
  """Writes `root/backgrounds/*.png` and `root/objects/<shape>_<i>.png` (the engine's
  captioner names the colour)."""
  rng = np.random.default_rng(seed)
  with atomic_dir(root, BANK) as tmp:
    (tmp / 'backgrounds').mkdir()
    (tmp / 'objects').mkdir()
    n = 128
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    for i in range(backgrounds):
      top, bottom = rng.uniform(0.25, 0.95, 3), rng.uniform(0.15, 0.8, 3)
      ramp = yy[..., None] * bottom + (1 - yy[..., None]) * top
      waves = 0.05 * np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform())
                            )[..., None] * rng.uniform(-1, 1, 3)
      img = np.clip(ramp + waves, 0, 1)
      Image.fromarray((img * 255).round().astype(np.uint8)).save(tmp / 'backgrounds' / f'{i}.png')
    names = list(COLOURS)
    for i in range(objects):
      colour, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
      alpha = _shape(shape, 48, rng)
      shade = 1 - 0.25 * xx[:48, :48] * 128 / 48  # lit from the left
      rgb = np.clip(np.asarray(COLOURS[colour])[None, None] * (0.85 + 0.15 * shade[..., None])
                    + rng.normal(0, 0.02, 3), 0, 1)
      rgba = np.concatenate([rgb, alpha[..., None]], -1)
      Image.fromarray((rgba * 255).round().astype(np.uint8), 'RGBA').save(
          tmp / 'objects' / f'{shape}_{i}.png')
  return root


def make_data(workdir: Path, demo, data_dir: Path) -> tuple[dict, dict]:
  """Bank -> synthesised scenes -> TFDS; a re-run redoes only what changed. Returns the
  engine's summary and `build_tfds`'s."""
  from data_engine import config as engine_config
  from data_engine import jobs, runners
  bank = workdir / 'bank'
  if not bank.is_dir():
    make_bank(bank)
  scenes = workdir / 'data'
  size = demo.size
  config = engine_config.load(None, [
      f'synthesize.size=({size}, {size})', 'synthesize.num_objects=(1, 2)',
      'synthesize.object_height=(0.45, 0.8)', 'synthesize.shadow_blur=(0.5, 2.0)',
      f'runner.splits={SPLITS}'])
  summary = runners.run_local(jobs.scene_keys(0, demo.scenes),
                              jobs.make_synthesize(config, bank), scenes, demo.workers,
                              progress=False,
                              fingerprint=jobs.synthesize_fingerprint(config, bank))
  # The demo owns a data_dir inside its workdir; any other one is replaced only if it holds
  # a dataset of these scenes.
  owned = data_dir.resolve().is_relative_to(workdir.resolve())
  return summary, jobs.build_tfds(scenes, data_dir, dict(config.runner.splits), 'raise', owned)


def main(argv) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  from layerjax.train import evaluate, trainer
  config = _CONFIG.value
  if 'demo' not in config:
    raise cli.UsageError('--config: no `demo` section (scenes, size, workers), as '
                         'configs/liwi.py:demo has')
  trainer.check_config(config)  # before minutes of making data
  workdir = Path(_WORKDIR.value)
  log = cli.log_file(workdir / 'demo.log')
  print(f'demo: making the data, training {config.total_steps} steps on the CPU, evaluating, '
        f'then decomposing photos into layer files (about 8 minutes; every log line: {log})')
  with open(log, 'a', encoding='utf-8') as f, contextlib.redirect_stdout(f), \
      contextlib.redirect_stderr(f):  # TFDS's own prints and progress bars
    summary, built = make_data(workdir, config.demo, Path(config.data.data_dir))
  print(f'demo data: {summary["samples"]} scenes in {workdir / "data"}, dataset '
        f'{config.data.data_dir} ({"up to date" if built["up_to_date"] else "built"}: '
        f'{built["splits"]})')
  if 'preempted_at' in trainer.train(config, workdir / 'train'):
    print('stopped by SIGTERM after saving; run the same command again to continue')
    return
  setup, state, step = trainer.restore_for_eval(config, workdir / 'train')
  result = evaluate.Evaluation(setup, config).run(state, 'test', workdir / 'train', step)
  print(f'\nHeld-out synthetic scenes (test split, {result["examples"]} examples, '
        f'box prompts, {config.eval.sample_steps} sampler steps), step {step}:')
  print(evaluate.table(result))
  print('\n'.join(against_targets(result)))
  with atomic_file(workdir / 'demo_result.json') as tmp:
    tmp.write_text(json.dumps(result, indent=2) + '\n')
  print(f'grid: {workdir}/train/samples/test_{step}.png')
  print_files(decompose_photos(workdir, config))
  print(f'log: {log}')


# What the demo model must reach on the test split (issue 21): its score over the trivial
# baseline's, at least (Alpha IoU) or at most (RGB L1) this much.
TARGETS = {'foreground/alpha_iou': 1.10, 'background/rgb_l1': 0.75}


def against_targets(result: dict) -> list[str]:
  """Per `TARGETS` entry and per system (the sampler's raw layers, and the layers
  `Decomposer` returns: `exact`), a line: its score over the trivial baseline's in the flat
  `result` (`Evaluation.run`), and whether it meets the target."""
  from layerjax.evaluate.baselines import TRIVIAL
  from layerjax.train.evaluate import EXACT, MODEL
  lines = []
  for system, what in ((MODEL, 'sampled'), (EXACT, 'decomposer')):
    for key, target in TARGETS.items():
      model, base = result[f'{system}/layers/{key}'], result[f'{TRIVIAL}/layers/{key}']
      higher = key.endswith('alpha_iou')  # IoU: higher is better; L1: lower
      ratio = model / base
      met = ratio >= target if higher else ratio <= target
      layer, metric = key.split('/')
      lines.append(f'{what:>10} {layer} {metric}: {model:.3f}, baseline {base:.3f}, ratio '
                   f'{ratio:.3f} (target {">=" if higher else "<="} {target:.2f}: '
                   f'{"met" if met else "NOT met"})')
  return lines


FILES = ('psd', 'ora', 'preview')  # what the demo writes beside each sample folder
COFFEE_CUP = (170, 15, 410, 305)  # the cup (with its handle) in scikit-image's coffee photo


def decompose_photos(workdir: Path, config, count: int = 2) -> list[tuple[str, Path, int]]:
  """Packs the trained model (`config`: what it was trained with, for a workdir from before
  layerjax recorded it), then decomposes held-out scenes (scaled up 4x; the first with its
  object's box, the second as a whole scene) and scikit-image's coffee photo (its cup's box,
  and the whole scene), writes each as a sample folder with its Photoshop, OpenRaster and
  contact-sheet files, moves the first scene's object with its shadow (`layerjax.edit`), and
  runs the model in PyTorch (`in_pytorch`). Returns (what, sample folder, layers) for the
  table."""
  from skimage import data as skimage_data
  from data_engine import jobs
  from layerjax.data.schema import encode_png, read_folder
  from layerjax.edit import Document
  from layerjax.infer import model as infer_model
  from layerjax.infer import postprocess
  from layerjax.infer.decomposer import Decomposer
  from layerjax.infer.prompts import Query
  model = infer_model.pack(workdir / 'train', workdir / 'model', overwrite=True, config=config)
  decomposer = Decomposer.load(model)
  scenes = sorted(p for p in (workdir / 'data' / 'samples').iterdir()
                  if jobs.split_of(p.name, SPLITS) == 'test')[:count]
  photos = workdir / 'photos'
  photos.mkdir(exist_ok=True)
  jobs_ = []  # (what, photo, query, sample id, command-line prompt)
  for i, folder in enumerate(scenes):
    scene = read_folder(folder)
    h, w = scene.size
    path = photos / f'{scene.id}.png'
    with atomic_file(path) as tmp:
      tmp.write_bytes(encode_png(np.clip(postprocess.resize(scene.image, (4 * h, 4 * w)), 0, 1)))
    if i == 0:
      target = [l for l in scene.layers if l.kind == 'object'][-1]
      box = tuple(4 * v for v in target.bbox)
      jobs_.append((f'held-out scene, its {target.label or "object"}\'s box', path,
                    Query(box=box), scene.id, f'--box {",".join(map(str, box))} --seeds 4'))
    else:
      jobs_.append(('held-out scene, whole', path, None, scene.id, '--layers auto'))
  coffee = photos / 'coffee.png'
  with atomic_file(coffee) as tmp:
    tmp.write_bytes(encode_png(skimage_data.coffee() / 255))
  jobs_ += [('scikit-image coffee, the cup\'s box', coffee, Query(box=COFFEE_CUP), 'coffee-cup',
             f'--box {",".join(map(str, COFFEE_CUP))} --seeds 4'),
            ('scikit-image coffee, whole', coffee, None, 'coffee', '--layers auto')]
  print(f'\nDecomposing photos with the packed model {model} (the demo model knows only '
        f'its synthetic shapes: on the coffee photo it shows the files, not the quality):')
  out = workdir / 'decomposed'
  rows = []
  for what, path, query, sid, how in jobs_:
    sample = decomposer.decompose(path, query, seeds=4 if query else 1, sample_id=sid)
    folder = _write(sample, out / sid)
    rows.append((what, folder, len(sample.layers)))
    p = sample.provenance
    raw = (f', raw recomposition L1 {p["raw_recompose_l1"]:.3f}' if 'raw_recompose_l1' in p
           else '')
    print(f'  {path} -> {folder}: {", ".join(l.name for l in sample.layers)}{raw}; '
          f'{p["timings"]["total"]:.2f} s')
    print(f'    python -m layerjax.decompose --model {model} --image {path} {how} '
          f'--format {",".join(FILES[:-1])} --preview --out {folder} --overwrite')
    if len(rows) == 1:
      first = sample
  name = [l for l in first.layers if l.kind == 'object'][-1].name
  dx = first.size[1] // 4
  edited = Document(first).move(name, dx, 0).render(f'{first.id}-moved')
  folder = _write(edited, workdir / 'edited' / edited.id)
  with atomic_file(folder.with_name(folder.name + '.png')) as tmp:
    tmp.write_bytes(encode_png(edited.image))
  rows.append((f'{name} moved {dx} px right, its shadow following', folder,
               len(edited.layers)))
  print(f'  {out / first.id}: {name} moved {dx} px right with its shadow -> {folder}')
  print(f'    python -m layerjax.edit {out / first.id} --move {name}:+{dx},0 --id {edited.id} '
        f'--format {",".join(FILES[:-1])} --out {folder.parent} --overwrite')
  rows.append(in_pytorch(model, decomposer, coffee, workdir))
  return rows


def in_pytorch(model: Path, decomposer, photo: Path, workdir: Path) -> tuple[str, Path, int]:
  """Exports `model` for PyTorch (`to-pytorch`) and decomposes the coffee cup with
  `LayerDecomposerPipeline`, beside JAX on the same noise; the row for the table."""
  from layerjax.convert import pytorch
  from layerjax.infer.prompts import Query
  from layerjax.torch import LayerDecomposerPipeline
  exported = pytorch.to_pytorch(model, workdir / 'pytorch', overwrite=True)
  pipe = LayerDecomposerPipeline.from_pretrained(exported)
  in_torch = pipe(photo, box=COFFEE_CUP, sample_id='coffee-cup-pytorch')
  in_jax = decomposer.decompose(photo, Query(box=COFFEE_CUP), noise=pipe.backend.noise)
  differ = max(np.abs(a.rgba - b.rgba).max() for a, b in zip(in_jax.layers, in_torch.layers))
  folder = _write(in_torch, workdir / 'decomposed' / in_torch.id)
  print(f'  {exported}: the model for PyTorch users (no JAX needed); on the cup\'s box its '
        f'layers differ from JAX\'s by {differ:.1e} at most (the same noise) -> {folder}')
  print(f'    python -m layerjax.convert to-pytorch {model} {exported} --overwrite')
  return 'scikit-image coffee, the cup\'s box, in PyTorch', folder, len(in_torch.layers)


def _write(sample, folder: Path) -> Path:
  """The sample folder and its `FILES` beside it (`folder.psd`, ...), replacing the demo's
  own earlier ones."""
  from layerjax import export
  from layerjax.data.schema import write_folder
  write_folder(sample, folder, overwrite=True)
  for fmt, path in export.destinations(folder, FILES, overwrite=True):
    export.write(sample, fmt, path, overwrite=True)
  return folder


def print_files(rows) -> None:
  print('\nWhat the demo wrote (each sample folder holds the photo, one PNG per layer and '
        'manifest.json; beside it its .psd for Photoshop, .ora for GIMP and Krita, and a '
        '.preview.png contact sheet):')
  width = max(len(what) for what, _, _ in rows)
  for what, folder, layers in rows:
    print(f'  {what:<{width}}  {layers} layers  {folder}')


if __name__ == '__main__':
  host.reexec()
  cli.run_absl(main)
