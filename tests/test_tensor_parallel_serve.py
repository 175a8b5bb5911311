"""`loraplex serve --tensor-parallel-size 2` on the CPU (two processes, gloo) answers as the
single-process server does: the same greedy tokens and the same log-probabilities, through the
official `openai` client, for the base model and for two tenants' adapters (a q,k,v,o LoRA and an
all-linear DoRA) uploaded through the admin API, one at a time and batched together. The group
runs with asynchronous scheduling on, so the workers take the previous step's sampled tokens from
rank 0. A worker that dies ends the server with its exit code (server/engine/tp_group.py).

The model is a tiny random Llama (4 heads over 2 KV heads, so each rank holds 2 heads and one
KV head) with SmolLM2's tokenizer; its LM head is scaled up so that greedy choices are not near
ties a rounding difference could flip.
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loadtest.server_process import ServerProcess, free_port
from server.engine.tp_group import WORKER_EXIT_CODE
from tests.peft_helpers import randomize_adapter

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ADMIN_TOKEN = "tp-admin-token"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
TENANTS = {"acme": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
           "globex": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)}
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory, default_model_dir):
    """The tiny checkpoint (with SmolLM2's tokenizer) and each tenant's PEFT adapter files."""
    root = tmp_path_factory.mktemp("tp-serve")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(30)  # logits of std ~5: greedy margins far above fp32 rounding
    hf.save_pretrained(root / "model")
    for f in Path(default_model_dir).glob("tokenizer*"):
        shutil.copy(f, root / "model" / f.name)
    adapters = {}
    for i, (tenant, kwargs) in enumerate(TENANTS.items()):
        torch.manual_seed(10 + i)
        peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(**kwargs))
        randomize_adapter(peft_model, b_std=0.2)
        peft_model.save_pretrained(root / tenant)
        adapters[tenant] = ((root / tenant / "adapter_config.json").read_bytes(),
                            (root / tenant / "adapter_model.safetensors").read_bytes())
    return root / "model", adapters


def _start(tmp_path: Path, model_dir: Path, name: str, *extra: str) -> ServerProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), LORAPLEX_ADMIN_TOKEN=ADMIN_TOKEN)
    server = ServerProcess(["--device", "cpu", "--model", str(model_dir), "--home", str(tmp_path / name / "home"),
                            "--adapter-store", str(tmp_path / name / "adapters"), "--max-num-seqs", "4", *extra],
                           env, tmp_path / f"{name}.log", REPO, HOST, free_port())
    server.start()
    try:
        server.wait_ready(240)
    except BaseException:
        server.stop()
        raise
    return server


def _upload(server: ServerProcess, adapters: dict) -> None:
    for tenant, (config, weights) in adapters.items():
        response = httpx.put(f"{server.base_url}/admin/adapters/{tenant}", timeout=60,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                             files={"adapter_config": ("adapter_config.json", io.BytesIO(config), "application/json"),
                                    "adapter_model": ("adapter_model.safetensors", io.BytesIO(weights),
                                                      "application/octet-stream")})
        assert response.status_code in (200, 201), response.text


def _complete(server: ServerProcess, model: str, tenant: str | None, prompt: str) -> tuple[str, list[float]]:
    headers = {"X-Customer-Id": tenant} if tenant else {}
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", default_headers=headers,
                           max_retries=0, timeout=120)
    choice = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=1).choices[0]
    return choice.text, choice.logprobs.token_logprobs


def _answers(server: ServerProcess) -> dict:
    """(tenant, prompt) -> (text, token logprobs): each request alone, then all of them at once."""
    model = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    requests = [(tenant, prompt) for tenant in (None, *TENANTS) for prompt in PROMPTS]
    alone = {key: _complete(server, model, *key) for key in requests}
    with ThreadPoolExecutor(len(requests)) as pool:  # batched: adapters mixed in one step
        together = dict(zip(requests, pool.map(lambda key: _complete(server, model, *key), requests)))
    return {"alone": alone, "together": together}


@pytest.fixture(scope="module")
def single_answers(files, tmp_path_factory):
    model_dir, adapters = files
    server = _start(tmp_path_factory.mktemp("single"), model_dir, "single")
    try:
        _upload(server, adapters)
        return _answers(server)
    finally:
        server.stop()


def test_tp2_server_answers_as_the_single_process_one(files, single_answers, tmp_path):
    model_dir, adapters = files
    server = _start(tmp_path, model_dir, "tp2", "--tensor-parallel-size", "2", "--async-scheduling", "on")
    try:
        assert len(_worker_pids(server)) == 1, "rank 1 runs in a process of its own"
        _upload(server, adapters)
        answers = _answers(server)
        blocks = list(Path("/dev/shm").glob(f"loraplex_{server.proc.pid}_*"))
        assert blocks, "the worker's shards went through shared memory"
        assert 'tensor_parallel_size="2"' in httpx.get(f"{server.base_url}/metrics", timeout=30).text
    finally:
        assert server.stop() == 0, server.log_tail()
    assert not [b for b in blocks if b.exists()], "shared-memory shards left behind"
    log = server.log_path.read_text()
    assert "leaked" not in log and "Traceback" not in log, server.log_tail()  # no worker command failed
    for how, expected in single_answers.items():
        texts = {key: text for key, (text, _) in expected.items()}
        assert len({texts[(tenant, PROMPTS[0])] for tenant in (None, *TENANTS)}) == 3, "the adapters change nothing"
        for key, (text, logprobs) in expected.items():
            got_text, got_logprobs = answers[how][key]
            assert got_text == text, f"{how} {key}"
            assert got_logprobs == pytest.approx(logprobs, abs=LOGPROB_ATOL), f"{how} {key}"


def test_a_worker_that_dies_ends_the_server(files, tmp_path):
    model_dir, _ = files
    server = _start(tmp_path, model_dir, "tp2-kill", "--tensor-parallel-size", "2")
    try:
        (worker,) = _worker_pids(server)
        os.kill(worker, 9)
        deadline = time.monotonic() + 30
        while server.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.exit_code() == WORKER_EXIT_CODE, server.log_tail()
        assert "exited with code -9" in server.log_tail()
    finally:
        server.stop()


def _worker_pids(server: ServerProcess) -> list[int]:
    """The server's tensor-parallel workers: its child processes running the spawn bootstrap."""
    tasks = Path(f"/proc/{server.proc.pid}/task")  # children are listed under the thread that started them
    children = {int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()}
    return sorted(c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())
