"""``kvmem serve --instances 2``: one OpenAI endpoint over two engine processes."""

from __future__ import annotations

import argparse

import openai
import pytest

from kvmem.engine import Engine, SamplingParams
from kvmem.server import ServerThread
from kvmem.server.cli import add_arguments, build_app

pytestmark = pytest.mark.timeout(180)


def test_two_instances_answer_like_one_engine():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        ["--instances", "2", "--num-kv-tokens", "2048", "--attention-impl", "reference"]
    )
    app = build_app(args)
    prompts = ["hello there", "the cluster answers"]
    with Engine(num_kv_tokens=2048, attention_impl="reference", seed=0) as eng:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        ref = [c.text for c in eng.generate(prompts, params)]
    srv = ServerThread(app).start()
    try:
        assert app.state.kvmem.runner.engine.cluster.n == 2
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as c:
            name = c.models.list().data[0].id
            got = [
                c.completions.create(
                    model=name,
                    prompt=pr,
                    max_tokens=8,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                .choices[0]
                .text
                for pr in prompts
            ]
        assert got == ref
    finally:
        srv.stop()


def test_zero_instances_is_refused():
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(Exception, match="--instances"):
        build_app(p.parse_args(["--instances", "0"]))
