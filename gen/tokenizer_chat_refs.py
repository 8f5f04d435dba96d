#!/usr/bin/env python3
"""Renders reference chats with the real Jinja chat templates, for test/test_tokenizer.c.

    python3 gen/tokenizer_chat_refs.py .cache/vocabs > test/fixtures/tokenizer/chat_refs.json

Qwen3 and Gemma 3 templates come from the vocabularies' tokenizer_config.json (test/fetch_vocabs.sh
fetches them); gpt-oss ships none there, so its template (as published with the model, the parts
for plain messages without tools) is written out below. Rendered the way transformers does
(trim_blocks, lstrip_blocks, loop controls), with strftime_now pinned to 2025-01-01."""
import json, os, sys
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

HARMONY = r'''{#- gpt-oss chat template, plain messages only (no tools, no thinking field) -#}
{{- "<|start|>system<|message|>" }}
{{- "You are ChatGPT, a large language model trained by OpenAI.\n" }}
{{- "Knowledge cutoff: 2024-06\n" }}
{{- "Current date: " + strftime_now("%Y-%m-%d") + "\n\n" }}
{{- "Reasoning: medium\n\n" }}
{{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
{{- "<|end|>" }}
{%- if messages[0].role == "developer" or messages[0].role == "system" %}
    {%- set developer_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if developer_message %}
    {{- "<|start|>developer<|message|>" }}
    {{- "# Instructions\n\n" }}
    {{- developer_message }}
    {{- "<|end|>" }}
{%- endif %}
{%- for message in loop_messages -%}
    {%- if message.role == 'assistant' -%}
        {%- if loop.last and not add_generation_prompt %}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" }}
        {%- else %}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}
        {%- endif %}
    {%- elif message.role == 'user' -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|start|>assistant
{%- endif -%}'''

CONVERSATIONS = [
    [("user", "Hello!")],
    [("system", "You are a helpful assistant."), ("user", "What is 2+2?")],
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
    [("user", "  spaced  \n"), ("assistant", "\n answer with spaces \n\n"), ("user", "中文 ✓ émoji 👍")],
    [("user", "q1"), ("assistant", "<think>\nlet me think\n</think>\n\nThe answer."), ("user", "q2"),
     ("assistant", "<think>\nsecond thought\n</think>\n\nSecond answer.")],
    [("user", "solve"), ("assistant", "<think>step 1\nstep 2</think>final")],
    [("system", ""), ("user", "empty system")],
    [("user", "multi\nline\n\nmessage\twith\ttabs")],
]


def render(template, conv, gen, bos):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: "2025-01-01"
    env.filters["tojson"] = lambda x, **k: json.dumps(x, ensure_ascii=False)
    msgs = [{"role": r, "content": c} for r, c in conv]
    return env.from_string(template).render(messages=msgs, add_generation_prompt=gen, bos_token=bos, eos_token="")


def main():
    vdir = sys.argv[1]
    out = []
    for name in ["qwen3", "gemma3", "gptoss"]:
        cfg = json.load(open(os.path.join(vdir, name, "tokenizer_config.json"), encoding="utf-8"))
        tmpl = cfg.get("chat_template") or HARMONY
        bos = cfg.get("bos_token") or ""
        if isinstance(bos, dict):
            bos = bos["content"]
        for conv in CONVERSATIONS:
            for gen in (False, True):
                try:
                    text = render(tmpl, conv, gen, bos)
                except jinja2.exceptions.TemplateError:
                    text = None  # the template refuses it (e.g. Gemma's alternation rule)
                out.append({"vocab": name, "messages": [{"role": r, "content": c} for r, c in conv],
                            "add_generation_prompt": gen, "expected": text})
    json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


main()
