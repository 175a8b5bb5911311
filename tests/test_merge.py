"""`loraplex merge`: the merged checkpoint, served by our runtime with no adapter, against peft's
`merge_and_unload()` model (fp32 logits), for LoRA and DoRA adapters on a tiny random model."""

import copy
import json

import pytest
import torch

from server.cli import main
from server.lora.merge import PROVENANCE_FILE, MergeError, merge_adapter_dir
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from server.model.prepare import check_checkpoint_dir
from server.model.runner import ModelRunner, SequenceChunk
from tests.peft_helpers import make_peft_model, save_adapter
from tests.tiny_models import build_tiny

ATOL = 5e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = build_tiny("qwen2-bias", seed=3)  # q/k/v biases: a DoRA merge must leave them out of the factor
    path = tmp_path_factory.mktemp("base")
    hf.save_pretrained(path)
    return hf, path


def _our_logits(model_dir, ids):
    model = load_model(model_dir, torch.float32, "cpu")
    c = model.config
    kv = KVCache(c.num_layers, 8, 4, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    return ModelRunner(model, kv, "cpu").run([SequenceChunk(ids, 0, [0, 1, 2, 3])], all_logits=True)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", ["patterns", "r16-all-linear-rslora", "dora-r8-qv", "dora-r4-all-linear-patterns"])
def test_merged_checkpoint_equals_peft_merge_and_unload(base, name, tmp_path):
    hf, path = base
    peft_model = make_peft_model(copy.deepcopy(hf), name, seed=7)
    adapter_dir = save_adapter(peft_model, tmp_path / "adapter")
    ids = torch.randint(0, 128, (13,)).tolist()
    with_adapter = _hf_logits(peft_model, ids)
    expected = _hf_logits(peft_model.merge_and_unload(), ids)
    torch.testing.assert_close(expected, with_adapter, atol=ATOL, rtol=0)  # peft agrees with itself

    out = merge_adapter_dir(adapter_dir, path, tmp_path / "merged")
    assert check_checkpoint_dir(out) == out  # what `loraplex serve --model OUT` checks first
    ours = _our_logits(out, ids)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert (expected - _hf_logits(hf, ids)).abs().max() > 100 * ATOL  # the adapter matters
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["use_dora"] == name.startswith("dora")
    assert (out / "config.json").read_text() == (path / "config.json").read_text()


def test_cli_merges_and_refuses_an_existing_output(base, tmp_path, capsys):
    hf, path = base
    peft_model = make_peft_model(copy.deepcopy(hf), "dora-r8-qv", seed=8)
    adapter_dir = save_adapter(peft_model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter_dir), "--out", str(out), "--model", str(path),
                 "--home", str(tmp_path / "home")]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ids = [5, 9, 17, 3]
    torch.testing.assert_close(_our_logits(out, ids), _hf_logits(peft_model.merge_and_unload(), ids),
                               atol=ATOL, rtol=0)

    before = sorted(p.name for p in out.iterdir())
    assert main(["merge", "--adapter", str(adapter_dir), "--out", str(out), "--model", str(path),
                 "--home", str(tmp_path / "home")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_an_adapter_for_another_model_is_refused_and_nothing_is_written(base, tmp_path):
    _, path = base
    peft_model = make_peft_model(build_tiny("llama-gqa"), "patterns", seed=9)
    with torch.no_grad():  # an adapter whose down_proj A is too wide for this base model
        layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
        layer.lora_A["default"].weight = torch.nn.Parameter(torch.randn(12, 97))
    adapter_dir = save_adapter(peft_model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="down_proj"):
        merge_adapter_dir(adapter_dir, path, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with pytest.raises(MergeError):
        merge_adapter_dir(adapter_dir, path, tmp_path / "adapter")
