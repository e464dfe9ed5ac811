"""The web app: decompose a photo in the browser, edit its layers, download the files.

  python -m layerjax.app --model MODEL [--port 7860] [--host 127.0.0.1]
  make app            # after `make demo`: the demo's packed model, out/demo/model

Upload a photo or pick an example; prompt by clicking points or two corners of a box on
it, painting a mask, typing a text, or any mix, or tick whole scene (every object the
proposal tools find, at most `max layers`); set seeds, steps and guidance; run. The layers
come back over a checkerboard with their names, with the recomposition, the timings, and
the PSD, ORA, PPTX and ZIP of PNGs to download. Edit an object (move, scale, recolour,
remove: its shadow follows) and the files are written again.

One request runs at a time (a queue, with a progress bar); a request that fails shows the
decompose or edit API's one-line message, and the app goes on serving. Each browser tab
has its own state and its own file folders under a temporary root, removed on exit. The
logic is `layerjax.app.session`; this module wires it to Gradio (the `[app]` extra).
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

try:
  import gradio as gr
except ImportError:  # gradio's event wiring reads the handlers' annotations: a module import
  sys.exit('python -m layerjax.app: error: the app needs Gradio: pip install -e ".[app]"')

from layerjax import cli, host
from layerjax.app.session import MODES, Edit, Session, gallery, recomposition, timings
from layerjax.infer.decomposer import MAX_PIXELS
from layerjax.infer.scene import MAX_LAYERS

EXAMPLES = ('astronaut', 'coffee', 'chelsea', 'rocket')  # scikit-image's photos
MAX_UPLOAD = '50mb'
SESSION_TTL = 6 * 3600  # seconds an idle tab's state and files are kept

log = logging.getLogger(__name__)


def write_examples(folder: Path) -> list[Path]:
  """The scikit-image photos as PNGs in `folder` (they ship with scikit-image)."""
  from PIL import Image
  from skimage import data
  out = []
  for name in EXAMPLES:
    path = folder / f'{name}.png'
    Image.fromarray(getattr(data, name)()).save(path)
    out.append(path)
  return out


def _mask(editor) -> np.ndarray | None:
  """The painted strokes of the mask editor's value as bool [H, W]; None when unpainted."""
  layers = [np.asarray(l) for l in (editor or {}).get('layers') or [] if l is not None]
  painted = [l[..., 3] > 0 for l in layers if l.ndim == 3 and l.shape[-1] == 4]
  if not painted or not np.any(painted):
    return None
  return np.any(painted, axis=0)


def build(decomposer, root: Path, examples=()):
  """The app's `gr.Blocks` on `decomposer`, writing its files under `root`."""

  def friendly(fn):
    """The APIs' errors (ValueError: PromptError, ImageError, EditError; OSError) as the
    app's message; anything else logged and named, and the app goes on."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
      try:
        return fn(*args, **kwargs)
      except (ValueError, OSError) as e:
        raise gr.Error(str(e), print_exception=False) from None
      except gr.Error:
        raise
      except Exception as e:  # noqa: BLE001 - the message goes to the user, the trace to the log
        log.exception('request failed')
        raise gr.Error(f'internal error: {type(e).__name__}: {e}', print_exception=False) \
            from None
    return run

  def shown(state: Session, sample, note: str):
    objects = state.objects()
    return (state, gallery(sample), recomposition(sample), timings(sample),
            [str(f) for f in state.files],
            gr.Dropdown(choices=objects, value=objects[0] if objects else None), note)

  @friendly
  def on_photo(state: Session, path):
    new = Session.load(decomposer, path)  # first: a refused photo leaves the tab as it was
    Session.forget(state.files)
    state = new
    canvas = state.overlay()
    editor = None if canvas is None else {'background': canvas, 'layers': [],
                                          'composite': canvas}
    return state, canvas, editor, '', '', [], None, '', [], gr.Dropdown(choices=[], value=None)

  @friendly
  def on_click(state: Session, mode: str, points: str, box: str, evt: gr.SelectData):
    x, y = evt.index
    points, box = state.click(mode, x, y, points, box)
    return state, points, box, state.overlay(points, box)

  @friendly
  def on_prompt(state: Session, points: str, box: str):
    return state.overlay(points, box)

  def on_clear(state: Session):
    state.corner = None
    return state, '', '', state.overlay()

  @friendly
  def on_decompose(state: Session, points, box, editor, text, whole, max_layers, seeds, seed,
                   steps, guidance, progress=gr.Progress()):
    progress(0.05, desc='checking the prompt')
    state.require_photo()
    query = None if whole else Session.query(points, box, _mask(editor), text)
    progress(0.2, desc='decomposing')
    sample = state.decompose(decomposer, query, root, seeds=int(seeds), seed=int(seed),
                             steps=int(steps) or None, guidance=float(guidance),
                             max_layers=int(max_layers) or None if whole else None)
    progress(1.0, desc='done')
    n = sum(l.kind == 'object' for l in sample.layers)
    return shown(state, sample, f'{len(sample.layers)} layers, {n} object(s).')

  NEUTRAL = (0, 0, 1, 0, 1, 1, False)  # the edit sliders after an edit: relative, start over

  @friendly
  def on_edit(state: Session, layer, dx, dy, scale, hue, saturation, brightness, remove):
    if not layer:
      raise ValueError('edit: pick an object layer first')
    edit = Edit(str(layer), float(dx), float(dy), float(scale), float(hue),
                float(saturation), float(brightness), bool(remove))
    sample = state.edit(edit, root)
    return shown(state, sample, f'{len(state.edits)} edit(s).') + NEUTRAL

  @friendly
  def on_undo(state: Session):
    return shown(state, state.undo(root), f'{len(state.edits)} edit(s).')

  with gr.Blocks(title='layerjax: photo to layers', delete_cache=(3600, SESSION_TTL)) as app:
    state = gr.State(Session(), time_to_live=SESSION_TTL,
                     delete_callback=lambda s: Session.forget(s.files))
    kinds = ', '.join(sorted(decomposer.settings.kinds))
    gr.Markdown('# layerjax: a photo in, editable layers out\n'
                f'Model: `{decomposer.backend.source}` (step {decomposer.backend.step}); '
                f'prompt kinds it was trained with: {kinds}.')
    with gr.Row():
      with gr.Column():
        # A file, not gr.Image: Gradio would decode it first, before `load_image` refuses
        # what is too large or not an image with its own message.
        photo = gr.File(type='filepath', file_types=['image'], label='Photo', elem_id='photo',
                        height=120)
        if examples:
          gr.Examples([[str(p)] for p in examples], inputs=photo, label='Example photos')
        with gr.Tab('Click points or a box'):
          mode = gr.Radio(list(MODES), value='box', label='A click adds',
                          info='box: click two opposite corners')
          canvas = gr.Image(label='Click on the photo', interactive=False, elem_id='canvas',
                          format='png')
          with gr.Row():
            points = gr.Textbox(label='Points (x,y; x,y)', elem_id='points')
            box = gr.Textbox(label='Box (x0,y0,x1,y1)', elem_id='box')
          clear = gr.Button('Clear points and box', size='sm')
        with gr.Tab('Paint a mask'):
          editor = gr.ImageEditor(label='Paint over the object', sources=(), transforms=(),
                                  layers=False, brush=gr.Brush(colors=['#ff2828'],
                                                               color_mode='fixed'))
        text = gr.Textbox(label='Text (e.g. "the red mug")', elem_id='text')
        with gr.Row():
          whole = gr.Checkbox(label='Whole scene (ignores the prompt)', elem_id='whole')
          max_layers = gr.Slider(0, MAX_LAYERS, value=0, step=1,
                                 label='Max layers (0: automatic)')
        with gr.Accordion('Sampling', open=False):
          seeds = gr.Slider(1, 8, value=1, step=1, label='Seeds (the closest recomposition '
                                                           'is kept)')
          seed = gr.Number(0, precision=0, label='First seed')
          steps = gr.Slider(0, 50, value=0, step=1, label="Steps (0: the model's)")
          guidance = gr.Slider(1, 10, value=1, step=0.5, label='Guidance')
        run = gr.Button('Decompose', variant='primary', elem_id='run')
      with gr.Column():
        status = gr.Markdown(elem_id='status')
        layers = gr.Gallery(label='Layers', columns=4, elem_id='layers', height=300, format='png')
        recomposed = gr.Image(label='Recomposition', interactive=False, elem_id='recomposed',
                              format='png')
        timing = gr.Markdown()
        files = gr.File(label='Layer files', file_count='multiple', elem_id='files')
        with gr.Accordion('Edit an object (its shadow follows)', open=True):
          # Custom values reach `Document`, which names a layer that is gone and what is left.
          layer = gr.Dropdown(label='Object', choices=[], elem_id='layer',
                              allow_custom_value=True)
          with gr.Row():
            dx = gr.Slider(-512, 512, value=0, step=1, label='Move right', elem_id='dx')
            dy = gr.Slider(-512, 512, value=0, step=1, label='Move down', elem_id='dy')
          scale = gr.Slider(0.25, 4, value=1, step=0.05, label='Scale')
          with gr.Row():
            hue = gr.Slider(-180, 180, value=0, step=1, label='Hue (degrees)')
            saturation = gr.Slider(0, 3, value=1, step=0.05, label='Saturation')
            brightness = gr.Slider(0, 3, value=1, step=0.05, label='Brightness')
          remove = gr.Checkbox(label='Remove')
          with gr.Row():
            apply = gr.Button('Apply edit', elem_id='apply')
            undo = gr.Button('Undo last edit')

    results = [state, layers, recomposed, timing, files, layer, status]
    photo.change(on_photo, [state, photo],
                 [state, canvas, editor, points, box, layers, recomposed, timing, files, layer],
                 api_name='load_photo')
    canvas.select(on_click, [state, mode, points, box], [state, points, box, canvas],
                  api_name=False)
    for field in (points, box):
      field.submit(on_prompt, [state, points, box], canvas, api_name=False)
      field.blur(on_prompt, [state, points, box], canvas, api_name=False)
    clear.click(on_clear, state, [state, points, box, canvas], api_name=False)
    run.click(on_decompose, [state, points, box, editor, text, whole, max_layers, seeds, seed,
                             steps, guidance], results, api_name='decompose')
    apply.click(on_edit, [state, layer, dx, dy, scale, hue, saturation, brightness, remove],
                results + [dx, dy, scale, hue, saturation, brightness, remove],
                api_name='edit')
    undo.click(on_undo, state, results, api_name='undo')
  return app


def main(argv=None) -> int:
  p = cli.ArgumentParser(prog='python -m layerjax.app', description=__doc__.split('\n\n')[0])
  p.add_argument('--model', required=True, help='a packed model folder or a training workdir')
  p.add_argument('--port', type=cli.int_at_least(0), default=7860, help='0: a free port')
  p.add_argument('--host', default='127.0.0.1', help='0.0.0.0 to serve other machines')
  p.add_argument('--step', type=cli.int_at_least(0), help='a workdir: default its latest')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), help='default: as trained')
  p.add_argument('--embeddings', type=Path,
                 help='precomputed SD3 text embeddings, for text prompts to SD3-text models')
  p.add_argument('--max-pixels', type=cli.int_at_least(1), default=MAX_PIXELS,
                 help='larger photos are refused')
  p.add_argument('--no-examples', dest='examples', action='store_false',
                 help='no example photos (they need scikit-image)')
  a = p.parse_args(argv)
  from layerjax.infer.decomposer import Decomposer
  try:
    decomposer = Decomposer.load(a.model, step=a.step, dtype=a.dtype,
                                 embeddings=a.embeddings, max_pixels=a.max_pixels)
  except (ValueError, OSError) as e:
    p.exit(2, f'{p.prog}: error: --model {a.model}: {e}\n')
  root = Path(tempfile.mkdtemp(prefix='layerjax-app-'))
  atexit.register(shutil.rmtree, root, True)
  examples = write_examples(root) if a.examples else []
  app = build(decomposer, root, examples)
  app.queue(default_concurrency_limit=1, max_size=64)
  print(f'layerjax app: model {decomposer.backend.source} (step {decomposer.backend.step}); '
        'Ctrl-C stops it', file=sys.stderr)
  app.launch(server_name=a.host, server_port=a.port or None, max_file_size=MAX_UPLOAD,
             allowed_paths=[str(root)], footer_links=['api'], show_error=True,
             theme=gr.themes.Soft())
  return 0


if __name__ == '__main__':
  host.reexec()
  sys.exit(main())
