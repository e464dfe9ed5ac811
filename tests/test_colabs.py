"""The Colab notebooks (`colabs/*.ipynb`) kept in sync with the code: each is checked for
its shape (stripped outputs, the Colab install cell, a `parameters` cell that assigns every
test parameter) and executed from start to end with nbclient on the tiny values in its
metadata (`metadata.layerjax.test_parameters`; `metadata.layerjax.slow` marks it slow)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'colabs').glob('*.ipynb'))
REPOSITORY = 'https://github.com/layerjax/layerjax'
CELL_TIMEOUT = 900  # seconds, one cell (the slow notebooks train a model)
_ANSI = re.compile(r'\x1b\[[0-9;]*m')


def _read(path: Path) -> nbformat.NotebookNode:
  return nbformat.read(path, as_version=4)


def _params(path: Path):
  """`path` as a parameter, marked slow when its metadata says so."""
  marks = pytest.mark.slow if _read(path).metadata.get('layerjax', {}).get('slow') else ()
  return pytest.param(path, id=path.stem, marks=marks)


def _extras() -> set[str]:
  """The keys of setup.py's `extras_require`, read without running it."""
  for node in ast.walk(ast.parse((ROOT / 'setup.py').read_text())):
    if isinstance(node, ast.keyword) and node.arg == 'extras_require':
      return {k.value for k in node.value.keys}
  raise AssertionError('setup.py: no extras_require')


def _assigned(source: str) -> set[str]:
  """The names a cell's top-level statements assign."""
  names = set()
  for node in ast.parse(source).body:
    targets = node.targets if isinstance(node, ast.Assign) else (
        [node.target] if isinstance(node, ast.AnnAssign) else [])
    for t in targets:
      names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
  return names


def execute(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
  """Runs `nb` in a fresh `python3` kernel whose cwd is the repository root and whose
  imports find this checkout's `layerjax` first (an installed copy may be another one); a
  failing cell fails the test with its source and its error."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name='python3',
                                   resources={'metadata': {'path': str(ROOT)}})
  try:
    client.execute(env=env)
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'{name}: a cell failed\n{_ANSI.sub("", str(e))}', pytrace=False)
  return nb


def with_parameters(nb: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
  """`nb` with a cell assigning `values` right after its `parameters` cell (papermill's
  `injected-parameters`)."""
  at = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', ()))
  cell = nbformat.v4.new_code_cell('\n'.join(f'{k} = {v!r}' for k, v in values.items()))
  cell.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(at + 1, cell)
  return nb


def test_there_are_notebooks():
  assert {p.stem for p in NOTEBOOKS} >= {'decompose', 'edit'}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_shape(path):
  nb = _read(path)
  nbformat.validate(nb)
  name = path.name
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, \
          f'{name}: cell {i} has outputs (commit notebooks stripped)'
  install = nb.cells[0]
  assert install.cell_type == 'code', f'{name}: the first cell is not the Colab install cell'
  lines = [l.strip() for l in install.source.splitlines()]
  assert "if 'google.colab' in sys.modules:" in install.source, \
      f"{name}: the install cell is not guarded by 'google.colab' in sys.modules"
  assert f'!git clone -q --depth 1 {REPOSITORY}' in lines and '%cd layerjax' in lines, \
      f'{name}: the install cell does not clone {REPOSITORY} and enter it'
  pip = [l for l in lines if l.startswith('%pip install')]
  extras = re.fullmatch(r'%pip install -q -e "\.\[([a-z,]+|\{EXTRAS\})\]"(\s+#.*)?',
                        pip[0] if pip else '')
  assert extras, f'{name}: the install cell has no `%pip install -q -e ".[extras]"` line'
  named = set(extras.group(1).split(','))
  if extras.group(1) == '{EXTRAS}':  # chosen on Colab (the runtime's accelerator): every
    # extra it may name is a quoted lower-case word on the lines that make EXTRAS
    named = {w for l in lines if re.match(r'(EXTRAS|ACCELERATOR) = ', l)
             for w in re.findall(r"'([a-z]+)'", l)}
  unknown = named - _extras()
  assert not unknown, f'{name}: extras {sorted(unknown)} are not in setup.py'
  params = nb.cells[1]
  assert 'parameters' in params.metadata.get('tags', ()), \
      f'{name}: the second cell is not tagged `parameters`'
  meta = nb.metadata.get('layerjax', {})
  assert isinstance(meta.get('slow'), bool), f'{name}: metadata.layerjax.slow is not a bool'
  missing = ({'OUT'} | set(meta.get('test_parameters', {}))) - _assigned(params.source)
  assert not missing, f'{name}: the parameters cell does not assign {sorted(missing)}'


@pytest.mark.parametrize('path', [_params(p) for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
  nb = _read(path)
  values = {**nb.metadata.get('layerjax', {}).get('test_parameters', {}),
            'OUT': str(tmp_path / 'out')}
  execute(with_parameters(nb, values), path.name)


def test_the_kernel_runs_this_checkout_and_a_failing_cell_fails(tmp_path):
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell('import os, layerjax\nHERE = os.getcwd()'),
      nbformat.v4.new_code_cell('OUT = None', metadata={'tags': ['parameters']}),
      nbformat.v4.new_code_cell("print(HERE, layerjax.__file__, OUT)\nraise KeyError('boom')")])
  with pytest.raises(pytest.fail.Exception) as e:
    execute(with_parameters(nb, {'OUT': 'there'}), 'probe.ipynb')
  message = str(e.value)
  assert "raise KeyError('boom')" in message and "KeyError: 'boom'" in message
  printed = nb.cells[3].outputs[0].text.split()
  assert printed == [str(ROOT), str(ROOT / 'layerjax' / '__init__.py'), 'there']
