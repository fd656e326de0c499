"""Chat templates: the default one, a checkpoint's Jinja one, and a template that refuses."""

from __future__ import annotations

import json

import pytest

from kvmem.server import APIError, ChatTemplate
from kvmem.server.protocol import ChatMessage

MSGS = [ChatMessage(role="system", content="S"), ChatMessage(role="user", content="U")]


def test_default_template():
    t = ChatTemplate.from_dir(None)
    assert t.render(MSGS) == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\n"
    assert t.render(MSGS, add_generation_prompt=False) == "<|system|>\nS\n<|user|>\nU\n"


def test_directory_without_template_uses_the_default(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert ChatTemplate.from_dir(tmp_path).render(MSGS) == ChatTemplate().render(MSGS)


def test_named_templates_and_special_tokens(tmp_path):
    cfg = {
        "chat_template": [
            {"name": "tool_use", "template": "T"},
            {
                "name": "default",
                "template": "{{ bos_token }}"
                "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
            },
        ],
        "bos_token": {"content": "<s>"},
        "eos_token": "</s>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert ChatTemplate.from_dir(tmp_path).render(MSGS) == "<s>S</s>U</s>"


def test_jinja_file_and_raise_exception_is_a_400(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ messages[0].content }}"
    )
    t = ChatTemplate.from_dir(tmp_path)
    assert t.render(MSGS[1:]) == "U"
    with pytest.raises(APIError) as e:
        t.render(MSGS)
    assert e.value.status == 400 and "no system role" in e.value.message
