"""A real HTTP server speaking the chat-completions protocol, for the agent tests.

`ChatServer` listens on 127.0.0.1 (a free port) in a thread and answers POST
/v1/chat/completions (and /chat/completions) from a script: a queue of `Reply`s, one per
request (an answer, a malformed answer, a slow answer past the client's timeout, an error
status with headers such as Retry-After). With `reject_response_format` it answers 400 to any
request carrying `response_format`, as servers without structured outputs do, without using
up the script. Every request is recorded (path, headers, JSON body, arrival time) so tests can
check what the client sent. An exhausted script answers 418, which no client retries, or
hands the request to `respond` (a function of the request's body: an oracle answering from
ground truth, `tests/oracle_judge.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclasses.dataclass
class Reply:
  status: int = 200
  text: str | None = ''                  # the answer (status 200) or the error message
  headers: dict[str, str] = dataclasses.field(default_factory=dict)
  delay: float = 0.0                     # seconds to wait before replying


def answer(text: str | dict | None) -> Reply:
  return Reply(text=json.dumps(text) if isinstance(text, dict) else text)


def slow(seconds: float, text: str | dict) -> Reply:
  return dataclasses.replace(answer(text), delay=seconds)


def error(status: int, message: str = 'scripted error', **headers: str) -> Reply:
  """`headers` with '_' for '-': error(429, retry_after='1')."""
  return Reply(status, message, {k.replace('_', '-'): v for k, v in headers.items()})


@dataclasses.dataclass
class Request:
  path: str
  headers: dict[str, str]                # lower-case names
  body: dict
  time: float                            # time.monotonic() at arrival


class _Handler(BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'

  def log_message(self, *args):  # keep test output clean
    pass

  def do_POST(self):
    chat: ChatServer = self.server.chat
    arrived = time.monotonic()
    body = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))) or b'{}')
    chat.requests.append(Request(self.path, {k.lower(): v for k, v in self.headers.items()},
                                 body, arrived))
    if self.path not in ('/v1/chat/completions', '/chat/completions'):
      reply = error(404, f'no route {self.path}')
    elif chat.reject_response_format and 'response_format' in body:
      reply = error(400, "response_format: unsupported parameter 'json_schema'")
    else:
      with chat.lock:
        reply = chat.script.popleft() if chat.script else None
      if reply is None:
        reply = chat.respond(body) if chat.respond else error(418, 'script exhausted')
    time.sleep(reply.delay)
    if reply.status == 200:
      payload = {'id': f'chatcmpl-{len(chat.requests)}', 'object': 'chat.completion',
                 'created': int(time.time()), 'model': body.get('model', ''),
                 'choices': [{'index': 0, 'finish_reason': 'stop',
                              'message': {'role': 'assistant', 'content': reply.text}}],
                 'usage': {'prompt_tokens': 1, 'completion_tokens': 1, 'total_tokens': 2}}
    else:
      payload = {'error': {'message': reply.text, 'type': 'scripted', 'code': reply.status}}
    data = json.dumps(payload).encode()
    try:
      self.send_response(reply.status)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(data)))
      for name, value in reply.headers.items():
        self.send_header(name, value)
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the client timed out and left


class ChatServer:
  """`with ChatServer() as server:` ... `server.url` is the base URL ('.../v1')."""

  def __init__(self, reject_response_format: bool = False,
               respond: Callable[[dict], Reply] | None = None, port: int = 0):
    self.reject_response_format = reject_response_format
    self.respond = respond  # answers a request's JSON body when the script is empty
    self.script: collections.deque[Reply] = collections.deque()
    self.requests: list[Request] = []
    self.lock = threading.Lock()
    self._http = ThreadingHTTPServer(('127.0.0.1', port), _Handler)
    self._http.daemon_threads = True  # a handler still sleeping must not block shutdown
    self._http.chat = self
    self.url = f'http://127.0.0.1:{self._http.server_address[1]}/v1'
    self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)

  def push(self, *replies: Reply) -> None:
    with self.lock:
      self.script.extend(replies)

  def __enter__(self) -> 'ChatServer':
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._http.shutdown()
    self._http.server_close()
    self._thread.join()
