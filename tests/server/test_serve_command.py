"""``kvmem serve`` options: presets, a local checkpoint with its chat template, bad options."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import HTTP
from safetensors.torch import save_file

from kvmem.engine import preset, random_model
from kvmem.server import ServerThread
from kvmem.server.cli import build_app, main

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


def _parse(argv: list[str]):
    import argparse

    from kvmem.server.cli import add_parser

    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="cmd"))
    return ap.parse_args(["serve", *argv])


def _checkpoint(root: Path) -> Path:
    """A llama checkpoint directory (random tiny weights) with a chat template."""
    c = preset("tiny")
    root.mkdir()
    (root / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_layers,
                "num_attention_heads": c.num_heads,
                "num_key_value_heads": c.num_kv_heads,
                "head_dim": c.head_dim,
                "max_position_embeddings": 512,
                "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0,
                "bos_token_id": 256,
                "eos_token_id": 257,
                "torch_dtype": "float32",
            }
        )
    )
    sd = {
        k: v.contiguous()
        for k, v in random_model("tiny", seed=3).state_dict().items()
        if "rotary" not in k
    }
    save_file(sd, str(root / "model.safetensors"))
    (root / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"})
    )
    return root


def test_checkpoint_dir_is_served_with_its_name_and_chat_template(tmp_path):
    ckpt = _checkpoint(tmp_path / "my-llama")
    args = _parse(
        [
            "--model",
            str(ckpt),
            "--num-kv-tokens",
            "1024",
            "--kv-format",
            "fp8_e4m3",
            "--policy",
            "fair",
            "--backend-option",
            "page_size=8",
            "--max-n",
            "4",
        ]
    )
    app = build_app(args)
    state = app.state.kvmem
    assert state.model_name == "my-llama" and state.max_n == 4
    eng = state.runner.engine
    assert eng.max_model_len == 512 and eng.config.kv_format == "fp8_e4m3"
    assert eng.allocator.stats().page_size == 8
    with ServerThread(app) as srv:
        models = HTTP.get(f"{srv.url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["my-llama"] and models[0]["max_model_len"] == 512
        msgs = [{"role": "user", "content": "Hi"}]
        r = HTTP.post(
            f"{srv.url}/v1/chat/completions",
            json={
                "model": "my-llama",
                "messages": msgs,
                "max_tokens": 3,
                "user": "tenant-a",
                "priority": 2,
            },
        )
        assert r.status_code == 200, r.text
        rendered = "<s>[USER] Hi\n[ASSISTANT] "
        assert r.json()["usage"]["prompt_tokens"] == len(rendered.encode())
        big = HTTP.post(
            f"{srv.url}/v1/completions",
            json={"model": "my-llama", "prompt": "x", "max_tokens": 600},
        )
        assert big.status_code == 400 and "512" in big.json()["error"]["message"]


def test_bad_options_exit_2_with_a_message(capsys, tmp_path):
    assert main(["--backend", "no-such-backend", "--port", "1"]) == 2
    assert "no-such-backend" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--port", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--backend-option", "oops", "--port", "1"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["--max-n", "0", "--port", "1"]) == 2
    assert "--max-n" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_python_dash_m_serves_until_interrupted():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvmem.server",
            "--preset",
            "tiny",
            "--port",
            str(port),
            "--threads",
            "1",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if HTTP.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        r = HTTP.post(
            f"{url}/v1/completions",
            json={"model": "kvmem-tiny", "prompt": "Hi", "max_tokens": 5, "ignore_eos": True},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0
    assert "Traceback" not in (proc.stdout.read() if proc.stdout else "")


def test_without_the_server_extra_serve_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    assert main(["--port", "1"]) == 2
    assert "kvmem[server]" in capsys.readouterr().err
