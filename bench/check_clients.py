#!/usr/bin/env python3
"""Checks `t5rt serve` with the client libraries people already use, unchanged:
huggingface_hub's InferenceClient (TGI protocol), the `text-generation` client (TGI's `/`
route and streams) and OpenAI's client (completions, streamed too).

    .venv-bench/bin/pip install huggingface_hub openai text-generation
    target/release/t5rt serve --port 18082 &        # the bundled model
    .venv-bench/bin/python bench/check_clients.py

Every line it prints is asserted; it exits non-zero on the first difference.
"""
import sys

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:18082"

from huggingface_hub import InferenceClient

client = InferenceClient(URL)
assert client.text_generation("spell: 1984", max_new_tokens=20) == "one thousand nine hundred eighty-four"
out = client.text_generation("spell: 1984", max_new_tokens=20, details=True)
assert out.details.finish_reason == "eos_token" and out.details.generated_tokens == len(out.details.tokens)
assert "".join(client.text_generation("spell: 1984", max_new_tokens=20, stream=True)) == "one thousand nine hundred eighty-four"
last = list(client.text_generation("spell: 77", max_new_tokens=20, stream=True, details=True))[-1]
assert last.generated_text == "seventy-seven" and last.details.finish_reason == "eos_token"
print("huggingface_hub InferenceClient: ok")

from openai import OpenAI

openai = OpenAI(base_url=URL + "/v1", api_key="unused")
c = openai.completions.create(model="t5rt", prompt="spell: 12", max_tokens=20)
assert c.choices[0].text == "twelve" and c.choices[0].finish_reason == "stop"
assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
chunks = openai.completions.create(model="t5rt", prompt="spell: 12", max_tokens=20, stream=True)
assert "".join(ch.choices[0].text for ch in chunks) == "twelve"
print("openai completions: ok")

from text_generation import Client

tg = Client(URL)
assert tg.generate("spell: 5", max_new_tokens=20).generated_text == "five"
assert "".join(r.token.text for r in tg.generate_stream("spell: 55", max_new_tokens=20)) == "fifty-five"
print("text-generation Client: ok")
