"""Layer names in the layered files (PSD, OpenRaster), and the layers' kinds and shadow owners
told back from those names and their order when an editor dropped our metadata.

Writing (`layer_names`): a layer's name in the file is its label, else its schema name; a
shadow's is its owner's name in the file plus ' shadow' ('mug shadow'). Names are cleaned
(control and format characters dropped, trimmed, at most 255 characters: Photoshop's limit)
and made unique bottom first, shadows after the other layers ('mug', 'mug 2', 'mug 2 shadow').

Reading (`identify`), the rule for a layer the file's metadata does not describe (GIMP drops
a PSD's XMP, Krita an OpenRaster's `urn:layerjax` attributes; the names and order survive):
  - the bottom layer is the background;
  - a layer named 'X shadow' (or 'X shadow N') is a shadow when an object layer named X is in
    the file; its owner is the nearest such object in the stack (above it on a tie);
  - every other layer is an object;
  - its schema name is its cleaned file name (made unique among all names), its label the
    file name (a shadow's label is empty).
A described layer keeps its recorded name, kind, owner and texts, except that only the bottom
layer is the background and a shadow whose owner is not an object becomes an object.
"""

from __future__ import annotations

import re
import unicodedata

MAX_NAME = 255  # characters in a Photoshop layer name
ABOVE = ('object', 'shadow')  # the recorded kinds a layer above the bottom one keeps
SHADOW = re.compile(r'(.+) shadow(?: \d+)?')


def clean(name: str) -> str:
  """`name` without control or format characters, trimmed, cut to `MAX_NAME` characters."""
  kept = ''.join(c for c in name if unicodedata.category(c)[0] != 'C')
  return kept.strip()[:MAX_NAME].strip()


def unique(name: str, taken: set[str]) -> str:
  """`name`, or `name 2`, `name 3` ... (cut to fit `MAX_NAME`), whichever is not in `taken`;
  added to `taken`."""
  out, n = name, 1
  while out in taken:
    n += 1
    suffix = f' {n}'
    out = name[:MAX_NAME - len(suffix)] + suffix
  taken.add(out)
  return out


def layer_names(sample, path, error: type[Exception]) -> list[str]:
  """The names the layers of `sample` take in the layered file `path`, bottom first; a label
  empty once cleaned raises `error` naming the file and the layer."""
  taken, names = set(), [''] * len(sample.layers)
  own = {layer.name: i for i, layer in enumerate(sample.layers)}
  order = sorted(range(len(sample.layers)), key=lambda i: sample.layers[i].kind == 'shadow')
  for i in order:
    layer = sample.layers[i]
    if layer.kind == 'shadow':
      name = f'{names[own[layer.owner]]} shadow'
    else:
      name = clean(layer.label or layer.name)
    if not name:
      raise error(f'{path}: layer {layer.name!r} has no usable layer name (its '
                  f'{"label" if layer.label else "name"} {layer.label or layer.name!r} is '
                  f'empty once control characters and spaces are dropped)')
    names[i] = unique(clean(name), taken)
  return names


def identify(names: list[str], recorded: list[dict | None]) -> list[dict]:
  """`Layer` fields but the pixels (name, kind, owner, label, caption, referring) of each
  layer of a file, bottom first, from its file name and its recorded entry (None where the
  file's metadata does not describe it), by the rule in the module docstring."""
  names = [clean(n) for n in names]
  taken = {e['name'] for e in recorded if e}
  out = []
  for i, (name, e) in enumerate(zip(names, recorded)):
    if e:
      kind = e.get('kind') if e.get('kind') in ABOVE else 'object'
      out.append({'name': e['name'], 'kind': kind, 'owner': e.get('owner'),
                  'label': e.get('label', ''), 'caption': e.get('caption', ''),
                  'referring': tuple(e.get('referring', ()))})
    else:
      shadow = i and SHADOW.fullmatch(name)  # the bottom layer is the background, whatever
      out.append({'name': unique(name or 'layer', taken), 'kind': 'object', 'owner': None,
                  'label': '' if shadow else name, 'caption': '', 'referring': (),
                  'of': shadow and shadow.group(1)})
  # Objects first: a shadow's owner is one of them whatever the order of the stack.
  objects = [i for i, f in enumerate(out) if i and f['kind'] == 'object' and not f.get('of')]
  for i, f in enumerate(out):
    of = f.pop('of', None)
    if of:
      near = [j for j in objects if names[j] == of]
      if near:
        f['kind'] = 'shadow'
        f['owner'] = out[min(near, key=lambda j: (abs(j - i), j < i))]['name']
      else:
        f['label'] = names[i]
  if out:
    out[0].update(kind='background', owner=None)
  owners = {f['name'] for i, f in enumerate(out) if i and f['kind'] == 'object'}
  for f in out:
    if f['kind'] != 'shadow' or f['owner'] not in owners:
      f['owner'] = None
      if f['kind'] == 'shadow':
        f['kind'] = 'object'
  return out
