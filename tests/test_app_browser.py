"""The web app in a real headless browser (slow): Debian's chromium driven by selenium
through its chromedriver (apt-get install chromium chromium-driver; nothing is downloaded at
run time). A user uploads a photo, clicks a box's two corners on it, runs, sees the layer
gallery and the recomposition, downloads the PSD, moves the object, and downloads the edited
PSD; both are opened with psd-tools.

The driver helpers (`chrome`, `decompose_in_browser`, `move_in_browser`, `download`,
`screenshot`) also drive
the app for the README's screenshot."""

from __future__ import annotations

import os

os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'  # read at gradio's import: no calls out

import io
import math
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_decompose import scene
from train_utils import free_port

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
FLAGS = ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-dev-shm-usage')
UP = 2  # the test photo's upscaling: a disc easy to click
DX = 6  # the edit: the object moved this many pixels to the right



def chrome(profile: Path, downloads: Path, size: tuple[int, int] = (1400, 1100)):
  """A headless chromium (a fresh profile in `profile`) that saves downloads to
  `downloads` without asking; skips the test when chromium or its driver is missing."""
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
  if missing:
    pytest.skip(f'{" and ".join(missing)} not found: apt-get install chromium chromium-driver')
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in FLAGS + (f'--user-data-dir={profile}', f'--window-size={size[0]},{size[1]}'):
    options.add_argument(flag)
  # Chrome blocks a site's second download unless 'automatic downloads' are allowed.
  options.add_experimental_option('prefs', {
      'download.default_directory': str(downloads), 'download.prompt_for_download': False,
      'profile.default_content_setting_values.automatic_downloads': 1})
  # The driver's path given: selenium-manager would otherwise try to download one.
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  driver.execute_cdp_cmd('Page.setDownloadBehavior',
                         {'behavior': 'allow', 'downloadPath': str(downloads)})
  return driver


def _wait(driver, timeout: float, what: str, condition):
  from selenium.webdriver.support.ui import WebDriverWait
  return WebDriverWait(driver, timeout, poll_frequency=0.2).until(
      condition, message=f'waited {timeout:g} s for {what}')


def _text(driver, elem_id: str) -> str:
  from selenium.webdriver.common.by import By
  return driver.find_element(By.CSS_SELECTOR, f'#{elem_id} textarea, #{elem_id} input') \
      .get_attribute('value')


def _image(driver, elem_id: str):
  """The loaded <img> of image component `elem_id`, or None."""
  from selenium.webdriver.common.by import By
  imgs = driver.find_elements(By.CSS_SELECTOR, f'#{elem_id} img')
  loaded = [i for i in imgs if driver.execute_script(
      'return arguments[0].complete && arguments[0].naturalWidth > 0', i)]
  return loaded[0] if loaded else None


def click_pixel(driver, img, x: int, y: int) -> None:
  """A click on pixel (x, y) of the picture `img` shows. Gradio maps a click at viewport
  point c back to the pixel round((c - left - pad) / r): the picture scaled by
  r = min(width / naturalWidth, height / naturalHeight, 1) and centred in the element (pad
  on each side). Its left edge is fractional, the pointer moves by whole pixels: the click
  goes to the first whole viewport pixel that maps to x (and y)."""
  from selenium.webdriver.common.action_chains import ActionChains
  driver.execute_script('arguments[0].scrollIntoView({block: "center"})', img)
  left, top, w, h, nw, nh = driver.execute_script(
      'const i = arguments[0], r = i.getBoundingClientRect();'
      'return [r.left, r.top, r.width, r.height, i.naturalWidth, i.naturalHeight]', img)
  r = min(w / nw, h / nh, 1)
  at = [math.ceil(edge + (size - n * r) / 2 + (v - 0.5) * r)
        for edge, size, n, v in ((left, w, nw, x), (top, h, nh, y))]
  actions = ActionChains(driver)
  actions.w3c_actions.pointer_action.move_to_location(*at).click()
  actions.perform()


def decompose_in_browser(driver, url: str, photo: Path, box, timeout: float = 60) -> dict:
  """As a user: open `url`, upload `photo`, click the corners of `box` (x0, y0, x1, y1,
  end-exclusive pixels) on the canvas in the default 'box' mode, run, and wait for the
  layers and the files. Returns the box text, the gallery captions, the file names and the
  recomposition's URL."""
  from selenium.webdriver.common.by import By
  driver.get(url)
  _wait(driver, timeout, 'the page', lambda d: d.find_elements(
      By.CSS_SELECTOR, '#photo input[type=file]'))
  driver.find_element(By.CSS_SELECTOR, '#photo input[type=file]').send_keys(str(photo))
  width, height = Image.open(photo).size
  img = _wait(driver, timeout, 'the photo on the canvas', lambda d: _image(d, 'canvas'))
  assert driver.execute_script('return [arguments[0].naturalWidth, arguments[0].naturalHeight]',
                               img) == [width, height]
  first = img.get_attribute('src')
  x0, y0, x1, y1 = box
  click_pixel(driver, img, x0, y0)
  # The first corner is drawn on a new canvas picture: click the second corner on that one.
  img = _wait(driver, timeout, 'the first corner drawn', lambda d: (
      (i := _image(d, 'canvas')) is not None and i.get_attribute('src') != first and i))
  click_pixel(driver, img, x1 - 1, y1 - 1)
  shown = _wait(driver, timeout, 'the box text', lambda d: _text(d, 'box'))
  driver.find_element(By.ID, 'run').click()
  captions = _wait(driver, timeout, 'the layer gallery', lambda d: [
      c.text for c in d.find_elements(By.CSS_SELECTOR, '#layers .caption-label')])
  _wait(driver, timeout, "the gallery's pictures", lambda d: all(d.execute_script(
      'return arguments[0].complete && arguments[0].naturalWidth > 0', i)
      for i in d.find_elements(By.CSS_SELECTOR, '#layers img')))
  files = _wait(driver, timeout, 'the files', lambda d: [
      a.get_attribute('download') for a in d.find_elements(By.CSS_SELECTOR, '#files a')])
  recomposed = _wait(driver, timeout, 'the recomposition', lambda d: _image(d, 'recomposed'))
  return {'box': shown, 'captions': captions, 'files': files,
          'recomposed': recomposed.get_attribute('src')}


def download(driver, suffix: str, folder: Path, timeout: float = 60) -> Path:
  """Clicks the file link ending in `suffix` and waits for the browser to save it (a file
  not in `folder` before: a second download of the same name is saved as 'name (1).psd')."""
  from selenium.webdriver.common.by import By
  before = set(folder.iterdir())
  driver.find_element(By.CSS_SELECTOR, f'#files a[download$="{suffix}"]').click()
  return _wait(driver, timeout, f'the {suffix} download in {folder}', lambda d: next(
      (p for p in folder.glob(f'*{suffix}') if p not in before and p.stat().st_size > 0),
      None))


def move_in_browser(driver, layer: str, dx: int, timeout: float = 60) -> None:
  """As a user: pick `layer` in the edit panel (the first object is already picked), type
  `dx` into the 'Move right' slider's box, apply, and wait for the new files."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  assert _text(driver, 'layer') == layer
  old = [a.get_attribute('href') for a in driver.find_elements(By.CSS_SELECTOR, '#files a')]
  box = driver.find_element(By.CSS_SELECTOR, '#dx input[type=number]')
  box.send_keys(Keys.CONTROL, 'a')
  box.send_keys(str(dx), Keys.TAB)
  driver.find_element(By.ID, 'apply').click()
  _wait(driver, timeout, 'the edit', lambda d: d.find_element(By.ID, 'status').text ==
        '1 edit(s).')
  _wait(driver, timeout, "the edit's files", lambda d: (
      (new := [a.get_attribute('href') for a in d.find_elements(By.CSS_SELECTOR, '#files a')])
      and not set(new) & set(old)))


def on_canvas(psd) -> dict[str, np.ndarray]:
  """{layer name: alpha on the canvas} of a PSD read with psd-tools (layers are stored
  cropped, at an offset)."""
  out = {}
  for layer in psd:
    alpha = np.zeros((psd.height, psd.width))
    a = layer.numpy('shape')
    if a is not None:
      alpha[layer.top:layer.top + a.shape[0], layer.left:layer.left + a.shape[1]] = a[..., 0]
    out[layer.name] = alpha
  return out


def screenshot(driver, path: Path, down_to: tuple[str, ...] = ('run', 'files')) -> Image.Image:
  """The page from its top to the lowest bottom of the elements `down_to` (ids), at the
  window's width, saved to `path` as PNG."""
  import base64
  bottom = driver.execute_script(
      'return Math.max(...arguments[0].map(i => document.getElementById(i)'
      '.getBoundingClientRect().bottom)) + window.scrollY', list(down_to))
  width = driver.execute_script('return document.documentElement.clientWidth')
  shot = driver.execute_cdp_cmd('Page.captureScreenshot', {
      'format': 'png', 'captureBeyondViewport': True,
      'clip': {'x': 0, 'y': 0, 'width': width, 'height': math.ceil(bottom) + 12, 'scale': 1}})
  image = Image.open(io.BytesIO(base64.b64decode(shot['data'])))
  image.save(path)
  return image


def psd_names(captions: list[str]) -> list[str]:
  """The PSD's layer names for the gallery's captions ('name' or 'name (label)'), as
  `layerjax.export.names` states them: the label, else the name; the decomposer's shadow
  'shadow_K' belongs to 'object_K' and is named after it, plus ' shadow'."""
  parsed = [re.fullmatch(r'(\S+)(?: \((.+)\))?', c).groups() for c in captions]
  named = {name: label or name for name, label in parsed}
  return [f'{named["object_" + name[len("shadow_"):]]} shadow' if name.startswith('shadow_')
          else named[name] for name, _ in parsed]


@pytest.mark.slow
def test_a_user_boxes_an_object_runs_moves_it_and_downloads_the_psd(packed, tmp_path,
                                                                   tmp_path_factory):
  from psd_tools import PSDImage

  from layerjax.app.__main__ import build
  from layerjax.infer.decomposer import Decomposer
  start = time.monotonic()
  photo, boxes = scene(1)
  pixels = np.repeat(np.repeat((photo * 255).round().astype(np.uint8), UP, 0), UP, 1)
  box = tuple(UP * v for v in boxes[0])
  Image.fromarray(pixels).save(tmp_path / 'discs.png')
  downloads = tmp_path / 'downloads'
  downloads.mkdir()
  driver = chrome(tmp_path / 'profile', downloads)  # first: a skip leaves no app running
  root = tmp_path / 'app'
  root.mkdir()
  app = build(Decomposer.load(packed), root, examples=[])
  app.queue(default_concurrency_limit=1)
  port = free_port()
  try:
    app.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True,
               quiet=True, allowed_paths=[str(root)])
    shown = decompose_in_browser(driver, f'http://127.0.0.1:{port}/', tmp_path / 'discs.png',
                                 box)
    psd = PSDImage.open(download(driver, '.psd', downloads))
    move_in_browser(driver, 'object_1', DX)
    moved = PSDImage.open(download(driver, '.psd', downloads))
    with urllib.request.urlopen(shown['recomposed']) as r:
      recomposed = np.asarray(Image.open(io.BytesIO(r.read())).convert('RGB'))
    # Outside tmp_path, which pytest.ini removes when the test passes: kept with --basetemp.
    shot = tmp_path_factory.mktemp('screenshot') / 'app.png'
    screenshot(driver, shot)
    print('screenshot:', shot)
  finally:
    driver.quit()
    app.close()
  assert shown['box'] == ','.join(str(v) for v in box)  # the disc's box, clicked exactly
  captions = shown['captions']
  assert captions[0] == 'background' and captions[-1].startswith('object_'), captions
  assert sorted(shown['files']) == sorted(f'discs.{e}' for e in ('psd', 'ora', 'pptx', 'zip'))
  assert [layer.name for layer in psd] == psd_names(captions)
  # The layers recompose the photo to within 1e-4 (`Decomposer`), far below half an 8-bit
  # level: the recomposition shown is the photo's pixels.
  np.testing.assert_array_equal(recomposed, pixels)
  # psd-tools composites the PSD's 8-bit layers itself. Each stored colour and alpha is
  # within half a level of ours; over a base e levels off, a layer of alpha a is off by at
  # most a/2 + (1 - a) e + 1/2 (the alpha's error times a colour difference of at most 255
  # levels) <= max(e, 1/2) + 1/2. From the opaque background's 1/2, each layer above it adds
  # 1/2, and psd-tools rounds its result: 1 + (layers - 1) / 2 levels.
  ours = np.asarray(psd.composite(force=True).convert('RGB'), np.int16)
  off = np.abs(ours - pixels).max()
  print(f'PSD composite: {off} levels off the photo')
  assert off <= 1 + (len(captions) - 1) / 2, off
  # The edit: the object and its shadow DX pixels to the right, the background where it was.
  before, after = on_canvas(psd), on_canvas(moved)
  assert list(after) == list(before)
  for name in ('object', 'object shadow'):
    np.testing.assert_allclose(after[name][:, DX:], before[name][:, :-DX], atol=1 / 255)
    assert after[name][:, :DX].max() == 0
  np.testing.assert_array_equal(moved[0].numpy(), psd[0].numpy())
  print(f'browser test: {time.monotonic() - start:.1f} s')
