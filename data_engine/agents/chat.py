"""Chat backends for the LLM agent, and robust parsing of their JSON answers.

A backend answers `complete(messages, schema) -> str`: `messages` in OpenAI chat format, images
as content parts `{'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}}`
(`image_part`), `schema` the JSON schema the answer must follow (or None). Backends are
registered under the kind 'chat', so an agent config names one by spec:

    {'name': 'openai', 'base_url': 'http://localhost:8000/v1', 'model': 'Qwen/Qwen2.5-VL-7B'}
    {'name': 'transformers', 'path': '/weights/qwen2.5-vl-7b'}

`openai` talks to any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp server, hosted
APIs) through the official client. Retries are ours, not the client's, so the policy is
explicit: timeouts, connection errors, 408/409, 429 and 5xx are retried up to `max_retries`
times, waiting `backoff * 2**k` before retry k (or what a 429's Retry-After asks, up to
`max_wait`); then the item is dropped with a stable reason: 'agent_timeout',
'agent_rate_limited' or 'agent_unavailable'. Other errors drop at once as 'agent_error', and an
answer that is not the JSON asked for as 'agent_garbage' (`parse_json`). The schema is always
described in the prompt and, with `json_schema`, also sent as `response_format`; a server that
rejects that with 400 is asked again without it, and once that works it is never sent again.

`transformers` runs a local vision-language model (AutoModelForImageTextToText) with greedy
decoding, so the same messages give the same answer.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import logging
import math
import os
import re
import threading
import time
from typing import Any, Protocol

import numpy as np
from PIL import Image

from data_engine.core import Drop, register
from data_engine.tools import hf, imaging

log = logging.getLogger(__name__)


class ChatBackend(Protocol):

  def complete(self, messages: list[dict], schema: dict | None) -> str: ...


# --- messages -----------------------------------------------------------------------------

def image_part(image: np.ndarray, max_side: int | None = None) -> dict:
  """An RGB or RGBA float image in [0, 1] as a PNG data-URL content part, its longest side
  shrunk to `max_side` (tokens cost; VLMs resize anyway)."""
  image = np.asarray(image, np.float32)
  if image.ndim != 3 or image.shape[2] not in (3, 4):
    raise ValueError(f'image_part: expected [H, W, 3 or 4], got shape {image.shape}')
  if max_side:
    image = imaging.resize(image, imaging.fit_size(image.shape, max_side))
  buf = io.BytesIO()
  Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buf, 'PNG')
  url = 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode('ascii')
  return {'type': 'image_url', 'image_url': {'url': url}}


def decode_image_url(url: str) -> Image.Image:
  """The RGB image in a base64 data URL; other URLs are refused (nothing is fetched)."""
  match = re.match(r'data:image/[\w.+-]+;base64,(.*)$', url, re.S)
  if not match:
    raise ValueError(f'only base64 data: image URLs are accepted, got {url[:40]!r}...')
  with Image.open(io.BytesIO(base64.b64decode(match.group(1)))) as im:
    return im.convert('RGB')


def with_schema(messages: list[dict], schema: dict | None) -> list[dict]:
  """`messages` with the answer format appended to the last one (a copy)."""
  if schema is None:
    return list(messages)
  note = ('Answer with one JSON object and nothing else. It must follow this JSON schema:\n'
          + json.dumps(schema))
  last = dict(messages[-1])
  content = last['content']
  last['content'] = (f'{content}\n\n{note}' if isinstance(content, str) else
                     [*content, {'type': 'text', 'text': note}])
  return [*messages[:-1], last]


# --- answers ------------------------------------------------------------------------------

_KEYWORDS = {'title', 'description', 'type', 'properties', 'required', 'enum', 'minimum',
             'maximum', 'items', 'minItems', 'maxItems', 'minLength'}
_FENCE = re.compile(r'```(?:json)?\s*(.*?)```', re.S | re.I)


def _type_ok(value: Any, kind: str) -> bool:
  if kind == 'object':
    return isinstance(value, dict)
  if kind == 'array':
    return isinstance(value, list)
  if kind == 'string':
    return isinstance(value, str)
  if kind == 'boolean':
    return isinstance(value, bool)
  if kind == 'integer':  # JSON has one number type: 3.0 is an integer, True is not
    return (isinstance(value, int) and not isinstance(value, bool) or
            isinstance(value, float) and value.is_integer())
  if kind == 'number':
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind == 'null':
    return value is None
  raise ValueError(f'validate: unsupported schema type {kind!r}')


def validate(value: Any, schema: dict, path: str = 'answer') -> list[str]:
  """What is wrong with `value` under `schema` (a JSON Schema subset: type, properties,
  required, enum, minimum, maximum, items, minItems, maxItems, minLength); [] if nothing.
  Extra object keys are allowed, as in JSON Schema by default."""
  unknown = set(schema) - _KEYWORDS
  if unknown:
    raise ValueError(f'validate: unsupported schema keywords {sorted(unknown)}')
  kind = schema.get('type')
  if kind is not None and not _type_ok(value, kind):
    return [f'{path} should be {kind}, got {type(value).__name__} {json.dumps(value)[:60]}']
  problems = []
  if 'enum' in schema and value not in schema['enum']:
    problems.append(f'{path} should be one of {schema["enum"]}, got {value!r}')
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    if not math.isfinite(value):
      problems.append(f'{path} is not finite')
    elif 'minimum' in schema and value < schema['minimum']:
      problems.append(f'{path} = {value} < minimum {schema["minimum"]}')
    elif 'maximum' in schema and value > schema['maximum']:
      problems.append(f'{path} = {value} > maximum {schema["maximum"]}')
  if isinstance(value, str) and len(value.strip()) < schema.get('minLength', 0):
    problems.append(f'{path} is shorter than {schema["minLength"]} characters')
  if isinstance(value, dict):
    problems += [f'{path} lacks {key!r}' for key in schema.get('required', ())
                 if key not in value]
    for key, sub in schema.get('properties', {}).items():
      if key in value:
        problems += validate(value[key], sub, f'{path}.{key}')
  if isinstance(value, list):
    if len(value) < schema.get('minItems', 0):
      problems.append(f'{path} has {len(value)} items, fewer than {schema["minItems"]}')
    if len(value) > schema.get('maxItems', math.inf):
      problems.append(f'{path} has {len(value)} items, more than {schema["maxItems"]}')
    for i, item in enumerate(value):
      problems += validate(item, schema.get('items', {}), f'{path}[{i}]')
  return problems


def _balanced_end(text: str, start: int) -> int | None:
  """The end of the {...} opening at `start`, skipping braces inside JSON strings."""
  depth, in_string, escaped = 0, False, False
  for i in range(start, len(text)):
    c = text[i]
    if in_string:
      if escaped:
        escaped = False
      elif c == '\\':
        escaped = True
      elif c == '"':
        in_string = False
    elif c == '"':
      in_string = True
    elif c == '{':
      depth += 1
    elif c == '}':
      depth -= 1
      if depth == 0:
        return i + 1
  return None


def _candidates(text: str):
  yield text.strip()
  for match in _FENCE.finditer(text):
    yield match.group(1).strip()
  for start in (i for i, c in enumerate(text) if c == '{'):
    end = _balanced_end(text, start)
    if end is not None:
      yield text[start:end]


def parse_json(text: str, schema: dict) -> dict:
  """The JSON object in a model's answer: bare, in a ```json fence, or the first balanced
  {...} in prose that follows `schema`. Anything else raises Drop('agent_garbage')."""
  first_problems = None
  for candidate in _candidates(text):
    try:
      value = json.loads(candidate)
    except json.JSONDecodeError:
      continue
    if not isinstance(value, dict):
      continue
    problems = validate(value, schema)
    if not problems:
      return value
    first_problems = first_problems or problems
  why = '; '.join(first_problems) if first_problems else 'no JSON object'
  raise Drop('agent_garbage', f'{why}; answer: {text[:300]!r}')


# --- OpenAI-compatible endpoints -----------------------------------------------------------

def retry_after(headers) -> float | None:
  """Seconds a 429 asks to wait: retry-after-ms, or Retry-After as seconds or an HTTP date."""
  for name, scale in (('retry-after-ms', 1e-3), ('retry-after', 1.0)):
    value = headers.get(name)
    if value is None:
      continue
    try:
      return max(0.0, float(value) * scale)
    except ValueError:
      pass
  value = headers.get('retry-after')
  try:
    when = email.utils.parsedate_to_datetime(value) if value else None
  except (TypeError, ValueError):
    return None
  return None if when is None else max(0.0, when.timestamp() - time.time())


@register('chat', 'openai')
class OpenAIChat:
  """`api_key_env` names the environment variable holding the key (local servers need none).
  `timeout` (s) bounds each request; `max_tokens` None leaves the server's default."""

  def __init__(self, base_url: str, model: str, api_key_env: str = 'OPENAI_API_KEY',
               timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0,
               max_wait: float = 60.0, temperature: float = 0.0, json_schema: bool = True,
               max_tokens: int | None = None):
    import openai  # only when this backend is configured
    if not base_url or not model:
      raise ValueError(f'chat openai: base_url and model are required, got {base_url!r}, '
                       f'{model!r}')
    if max_retries < 0 or backoff < 0 or timeout <= 0:
      raise ValueError(f'chat openai: need timeout > 0, max_retries >= 0, backoff >= 0; got '
                       f'{timeout}, {max_retries}, {backoff}')
    if not os.environ.get(api_key_env):
      log.warning('chat openai: $%s is not set; sending no API key to %s', api_key_env, base_url)
    self._errors = openai
    self.base_url, self.model = base_url, model
    self.max_retries, self.backoff, self.max_wait = max_retries, backoff, max_wait
    self.temperature, self.json_schema, self.max_tokens = temperature, json_schema, max_tokens
    # max_retries=0: retries are ours (`complete`), so the policy is explicit.
    self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or 'EMPTY',
                                timeout=timeout, max_retries=0)

  def complete(self, messages: list[dict], schema: dict | None = None) -> str:
    messages = with_schema(messages, schema)
    use_format = schema is not None and self.json_schema
    fell_back, failures = False, 0
    while True:
      try:
        response = self.client.chat.completions.create(**self._request(messages, schema,
                                                                       use_format))
        break
      except self._errors.BadRequestError as e:
        if not use_format:
          raise Drop('agent_error', self._detail(e)) from None
        use_format, fell_back = False, True  # perhaps response_format is what it rejects
      except self._errors.OpenAIError as e:
        reason, wait = self._policy(e, failures)
        if wait is None and reason == 'agent_rate_limited':
          raise Drop(reason, f'{self._detail(e)} (asks to wait more than max_wait '
                     f'{self.max_wait} s)') from None
        if wait is None or failures >= self.max_retries:
          raise Drop(reason, f'{self._detail(e)} (after {failures + 1} attempts)') from None
        log.warning('%s: %s; retry %d in %.2f s', self.model, e, failures + 1, wait)
        time.sleep(wait)
        failures += 1
    if fell_back:
      log.warning('%s at %s rejects response_format; describing the schema in the prompt only '
                  'from now on', self.model, self.base_url)
      self.json_schema = False
    return self._text(response)

  def _request(self, messages: list[dict], schema: dict | None, use_format: bool) -> dict:
    request = {'model': self.model, 'messages': messages, 'temperature': self.temperature}
    if self.max_tokens:
      request['max_tokens'] = self.max_tokens
    if use_format:
      request['response_format'] = {'type': 'json_schema', 'json_schema': {
          'name': schema.get('title', 'answer'), 'schema': schema}}
    return request

  def _policy(self, e: Exception, failures: int) -> tuple[str, float | None]:
    """The drop reason if this error is final, and the wait before retrying (None: never)."""
    delay = self.backoff * 2 ** failures
    errors = self._errors
    if isinstance(e, errors.APITimeoutError):
      return 'agent_timeout', delay
    if isinstance(e, errors.APIConnectionError):
      return 'agent_unavailable', delay
    if isinstance(e, errors.RateLimitError):
      asked = retry_after(e.response.headers)
      if asked is None:
        return 'agent_rate_limited', delay
      return 'agent_rate_limited', asked if asked <= self.max_wait else None
    if isinstance(e, errors.APIStatusError):
      if e.status_code == 408:
        return 'agent_timeout', delay
      if e.status_code == 409 or e.status_code >= 500:
        return 'agent_unavailable', delay
    return 'agent_error', None

  def _detail(self, e: Exception) -> str:
    return f'{self.model} at {self.base_url}: {type(e).__name__}: {e}'

  def _text(self, response) -> str:
    choice = response.choices[0] if response.choices else None
    text = choice.message.content if choice else None
    if not text:
      raise Drop('agent_garbage', f'{self.model}: no answer text (finish_reason '
                 f'{getattr(choice, "finish_reason", None)}, refusal '
                 f'{getattr(getattr(choice, "message", None), "refusal", None)!r})')
    return text


# --- local vision-language models ---------------------------------------------------------

@register('chat', 'transformers')
class TransformersVLM:
  """A local image-text-to-text model folder (config.json, processor files, safetensors).
  `dtype` 'auto': bfloat16 on CUDA, float32 on CPU; `timeout`: seconds of decoding before the
  answer counts as not given (Drop 'agent_timeout'); None waits for ever. Callers on several
  threads (ReasonX judges photos concurrently) take turns: one model, one generate at a time."""

  def __init__(self, path: str, device: str = 'auto', max_new_tokens: int = 512,
               dtype: str = 'auto', timeout: float | None = 300.0):
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as vlm_types)
    tool = 'chat transformers'
    folder = hf.weights_folder(tool, path, tuple(vlm_types))
    target = hf.pick_device(tool, device)
    torch_type = hf.torch_dtype(tool, dtype, target)
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    device = str(target)
    self._torch, self.device, self.max_new_tokens = torch, device, max_new_tokens
    self.timeout = timeout
    self._lock = threading.Lock()
    try:
      self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
      self.model = AutoModelForImageTextToText.from_pretrained(
          folder, local_files_only=True, use_safetensors=True,
          dtype=torch_type).to(device).eval()
    except (OSError, ValueError) as e:  # e.g. processor files missing, weights not matching
      raise ValueError(f'chat transformers: cannot load {folder}: {e}') from e

  def complete(self, messages: list[dict], schema: dict | None = None) -> str:
    inputs = self.processor.apply_chat_template(
        _processor_messages(with_schema(messages, schema)), add_generation_prompt=True,
        tokenize=True, return_dict=True, return_tensors='pt')
    inputs = inputs.to(self.device, dtype=self.model.dtype)  # casts only the float inputs
    with self._lock:
      return self._generate(inputs)

  def _generate(self, inputs) -> str:
    start = time.monotonic()
    try:
      with self._torch.inference_mode():
        # `max_time` stops decoding at the deadline; an answer cut short is no answer.
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                  max_time=self.timeout)
    except (RuntimeError, ValueError) as e:  # e.g. out of memory, prompt past the context
      raise Drop('agent_error', f'chat transformers: generate raised {type(e).__name__}: {e}')
    new_tokens = out[0, inputs['input_ids'].shape[1]:]
    if (self.timeout is not None and time.monotonic() - start >= self.timeout
        and len(new_tokens) < self.max_new_tokens):
      raise Drop('agent_timeout', f'chat transformers: no answer within {self.timeout} s '
                 f'({len(new_tokens)} tokens)')
    return self.processor.decode(new_tokens, skip_special_tokens=True)


def _processor_messages(messages: list[dict]) -> list[dict]:
  """OpenAI-format messages as processor chat templates take them: lists of text and image
  parts, images decoded from their data URLs."""
  out = []
  for message in messages:
    content = message['content']
    parts = [{'type': 'text', 'text': content}] if isinstance(content, str) else [
        {'type': 'image', 'image': decode_image_url(p['image_url']['url'])}
        if p['type'] == 'image_url' else p for p in content]
    out.append({'role': message['role'], 'content': parts})
  return out
