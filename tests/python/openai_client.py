"""The official `openai` Python package as a client of troupe's
OpenAI-compatible endpoint (run by tests/server_compat.rs).

Usage: openai_client.py BASE_URL ADMIN_KEY SESSION_TOKEN TOKEN_SESSION RUN_ID

BASE_URL ends in /v1. The server keeps the history, so every call sends only
the new message; the echo model's reply says how many earlier messages it was
given and quotes the first, which shows the history was kept.
Prints "openai client: ok" when every check passed; any failure raises.
"""

import sys

import openai
from openai import OpenAI

base_url, admin_key, token, token_session, run_id = sys.argv[1:6]
sid = f"py-{run_id}"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


client = OpenAI(base_url=base_url, api_key=admin_key, max_retries=0, timeout=30)
headers = {"X-Session-Id": sid}

# Non-streaming: the first turn of a new session.
r1 = client.chat.completions.create(
    model="assistant",
    messages=[{"role": "user", "content": "My name is Ada"}],
    extra_headers=headers,
)
c1 = r1.choices[0].message.content
check(r1.object == "chat.completion", f"object {r1.object!r}")
check(r1.model == "assistant", f"model {r1.model!r}")
check(r1.choices[0].message.role == "assistant", "role")
check(r1.choices[0].finish_reason == "stop", f"finish_reason {r1.choices[0].finish_reason!r}")
check(r1.usage is not None and r1.usage.total_tokens > 0, f"usage {r1.usage!r}")
check(c1.startswith("echo: My name is Ada"), c1)
check("no earlier messages" in c1, c1)

# Second turn, only the new message: the server remembered the first.
raw = client.chat.completions.with_raw_response.create(
    model="assistant",
    messages=[{"role": "user", "content": "What is my name?"}],
    extra_headers=headers,
)
check(raw.headers.get("x-session-id") == sid, f"X-Session-Id {raw.headers.get('x-session-id')!r}")
c2 = raw.parse().choices[0].message.content
check('2 earlier messages in context, the first: "My name is Ada"' in c2, c2)

# Streaming, the session given through default_headers.
streaming = OpenAI(
    base_url=base_url, api_key=admin_key, max_retries=0, timeout=30, default_headers=headers
)
stream = streaming.chat.completions.create(
    model="assistant",
    messages=[{"role": "user", "content": "Third message, streamed"}],
    stream=True,
)
pieces = []
finish = None
for chunk in stream:
    check(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object!r}")
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
text = "".join(pieces)
check(len([p for p in pieces if p]) > 3, f"streamed in pieces: {pieces!r}")
check(text.startswith("echo: Third message, streamed"), text)
check('4 earlier messages in context, the first: "My name is Ada"' in text, text)
check(finish == "stop", f"finish_reason {finish!r}")

# The `user` field names the session when there is no header.
other = f"{sid}-user"
r = client.chat.completions.create(
    model="assistant", messages=[{"role": "user", "content": "hello"}], user=other
)
check("no earlier messages" in r.choices[0].message.content, "a new session for `user`")
r = client.chat.completions.create(
    model="assistant", messages=[{"role": "user", "content": "again"}], user=other
)
check("2 earlier messages" in r.choices[0].message.content, r.choices[0].message.content)

# A session token as the API key: its own session, nothing else.
as_token = OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=30)
raw = as_token.chat.completions.with_raw_response.create(
    model="assistant", messages=[{"role": "user", "content": "token turn"}]
)
check(raw.headers.get("x-session-id") == token_session, "the token's session")
try:
    as_token.chat.completions.create(
        model="assistant",
        messages=[{"role": "user", "content": "let me in"}],
        extra_headers=headers,
    )
    raise AssertionError("a token reached another session")
except openai.PermissionDeniedError:
    pass

# Errors come back as the client's exceptions.
try:
    client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    check("nobody" in str(e), str(e))
try:
    OpenAI(base_url=base_url, api_key="wrong", max_retries=0).chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": "hi"}]
    )
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass

models = [m.id for m in client.models.list()]
check("assistant" in models, f"models {models!r}")

print("openai client: ok")
