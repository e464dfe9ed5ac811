"""What an evaluation writes and prints: flat scores, a Markdown table, the per-sample CSV
and a per-layer error histogram (a PNG drawn with PIL: no plotting library is needed).

Scores are flat: `<system>/<evaluator>/<metric>` -> value (the systems being the model or
predictions and the baselines), counts of handled problems as
`<system>/<evaluator>/count/<name>`; the trainer writes the same keys to TensorBoard.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from layerjax.evaluate import evaluators
from layerjax.evaluate.evaluators import Result

COUNT = 'count'


def flatten(results: dict[str, dict[str, Result]]) -> dict[str, float]:
  """{system: {evaluator: Result}} -> the flat scores (see the module docstring)."""
  flat = {}
  for system, by_name in results.items():
    for name, r in by_name.items():
      flat.update({f'{system}/{name}/{k}': v for k, v in r.scalars.items()})
      flat.update({f'{system}/{name}/{COUNT}/{k}': v for k, v in r.counts.items()})
  return flat


def _split(flat: dict) -> tuple[list[str], dict[str, dict[str, float]]]:
  """(systems in first-seen order, {'<evaluator>/<metric>': {system: value}})."""
  systems, rows = [], {}
  for key, value in flat.items():
    parts = key.split('/', 2)
    if len(parts) < 3:
      continue
    system, metric = parts[0], '/'.join(parts[1:])
    if system not in systems:
      systems.append(system)
    rows.setdefault(metric, {})[system] = value
  return systems, rows


def _better(metric: str) -> str:
  name, rest = metric.split('/', 1)
  if rest.startswith(COUNT + '/') or name not in evaluators.REGISTRY:
    return ''
  return evaluators.REGISTRY[name].directions.get(rest.rsplit('/', 1)[-1], '')


def _cell(value) -> str:
  if value is None:
    return ''
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  return 'nan' if math.isnan(value) else f'{value:.4f}'


def markdown_table(header, rows, right: int = 0) -> str:
  """A Markdown table: `header` names, `rows` of cells (as `str` gives them, a `|` in one
  shown as `/`); the last `right` columns right-aligned (numbers)."""
  cell = lambda c: str(c).replace('|', '/')
  lines = ['| ' + ' | '.join(map(cell, header)) + ' |',
           '|' + '---|' * (len(header) - right) + '---:|' * right]
  lines += ['| ' + ' | '.join(map(cell, r)) + ' |' for r in rows]
  return '\n'.join(lines)


def markdown(flat: dict) -> str:
  """A Markdown table of flat scores: one row per `<evaluator>/<metric>` (scores first, then
  counts), one column per system, with whether lower or higher is better."""
  systems, rows = _split(flat)
  order = sorted(rows, key=lambda m: (f'/{COUNT}/' in m, m))
  return markdown_table(['metric', 'better', *systems],
                        [[m, _better(m), *(_cell(rows[m].get(s)) for s in systems)]
                         for m in order], right=len(systems))


def write_csv(path: Path, rows: list[dict]) -> None:
  """One line per row; the columns are every scalar (int, float, str) field of any row."""
  scalar = (int, float, str, np.integer, np.floating)
  columns = []
  for r in rows:
    columns += [k for k, v in r.items() if isinstance(v, scalar) and k not in columns]
  with open(path, 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, columns, extrasaction='ignore')
    w.writeheader()
    w.writerows(rows)


def histogram(values: dict[str, list[float]], title: str, bins: int = 20,
              range_: tuple[float, float] | None = None) -> np.ndarray:
  """uint8 RGB: one panel per entry of `values` (a system's per-layer errors), bars over
  shared bins on [lo, hi] (`range_`, else the finite values' range), each labelled with the
  count and mean of its finite values."""
  finite = {k: np.asarray([v for v in vs if np.isfinite(v)], np.float64)
            for k, vs in values.items()}
  every = np.concatenate([v for v in finite.values()] + [np.zeros(0)])
  lo, hi = range_ or ((float(every.min()), float(every.max())) if every.size else (0.0, 1.0))
  hi = hi if hi > lo else lo + 1.0
  pw, ph, margin = 480, 140, 30
  img = Image.new('RGB', (pw + 2 * margin, margin + len(values) * (ph + margin)), 'white')
  draw = ImageDraw.Draw(img)
  draw.text((margin, 8), title, fill='black')
  for i, (name, v) in enumerate(finite.items()):
    top = margin + i * (ph + margin) + 14
    counts, _ = np.histogram(v, bins, (lo, hi))
    peak = max(int(counts.max()), 1)
    bw = pw / bins
    for b, c in enumerate(counts):
      x0 = margin + b * bw
      draw.rectangle([x0, top + ph - ph * c / peak, x0 + bw - 1, top + ph], fill=(70, 110, 180))
    draw.line([margin, top + ph, margin + pw, top + ph], fill='black')
    mean = f'{v.mean():.4f}' if v.size else 'nan'
    draw.text((margin, top - 14), f'{name}: {v.size} layers, mean {mean}', fill='black')
    draw.text((margin, top + ph + 2), f'{lo:.3g}', fill='black')
    draw.text((margin + pw - 40, top + ph + 2), f'{hi:.3g}', fill='black')
  return np.asarray(img)


COLOURS = ((70, 110, 180), (200, 90, 40), (60, 150, 80), (150, 70, 160), (120, 120, 120))


def curves(series: dict[str, list[tuple[float, float]]], title: str,
           y_range: tuple[float, float] | None = None) -> np.ndarray:
  """uint8 RGB: one line (points joined) per entry of `series` (a system's (x, y) points,
  e.g. LayerD's RGB L1 over the edit count), on shared axes labelled at their ends, a legend
  under the title."""
  points = [p for ps in series.values() for p in ps if np.isfinite(p[1])]
  xs, ys = [p[0] for p in points] or [0.0], [p[1] for p in points] or [0.0]
  x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
  y_lo, y_hi = y_range or (min(ys), max(ys))
  y_hi = y_hi if y_hi > y_lo else y_lo + 1.0
  pw, ph, margin = 480, 240, 40
  top = margin + 14 * len(series)
  img = Image.new('RGB', (pw + 2 * margin, top + ph + margin), 'white')
  draw = ImageDraw.Draw(img)
  draw.text((margin, 8), title, fill='black')
  at = lambda x, y: (margin + pw * (x - x_lo) / (x_hi - x_lo),
                     top + ph - ph * (y - y_lo) / (y_hi - y_lo))
  draw.rectangle([margin, top, margin + pw, top + ph], outline='black')
  for i, (name, ps) in enumerate(series.items()):
    colour = COLOURS[i % len(COLOURS)]
    draw.text((margin, 22 + 14 * i), f'{name}', fill=colour)
    xy = [at(x, y) for x, y in ps if np.isfinite(y)]
    if len(xy) > 1:
      draw.line(xy, fill=colour, width=2)
    for x, y in xy:
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
  draw.text((margin, top + ph + 4), f'{x_lo:g}', fill='black')
  draw.text((margin + pw - 20, top + ph + 4), f'{x_hi:g}', fill='black')
  draw.text((4, top + ph - 10), f'{y_lo:.3g}', fill='black')
  draw.text((4, top), f'{y_hi:.3g}', fill='black')
  return np.asarray(img)


def save_png(path: Path, pixels: np.ndarray) -> None:
  Image.fromarray(pixels).save(path, format='PNG')
