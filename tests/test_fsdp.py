"""report.py --fsdp on the CPU (gloo, 2 processes under torchrun): a tiny Hugging Face-format Llama fully fine-tuned
with the projector trains to the same losses as one unsharded process on the same global batches, each rank holds
half of the parameters, gradients and AdamW state (measured from the shards), and the sharded
torch.distributed.checkpoint training state resumes to exactly the uninterrupted run."""
import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SAMPLE

transformers = pytest.importorskip("transformers")

RUN = ["--model", "vit_tiny", "--img_size", "56", "--max_steps", "4", "--max_new_tokens", "4", "--n_boot", "10",
       "--num_workers", "0", "--device", "cpu", "--log_every", "1", "--lr", "1e-3",
       "--global_batch", "4"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "report.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
         "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "report.py")]
    r = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _losses(out):
    return [json.loads(l)["loss"] for l in open(out / "log.jsonl")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny HF Llama folder (config.json + safetensors + a tokenizer trained on the bundled reports), then: one
    process (batch 4), two FSDP ranks (batch 2 each), and two FSDP ranks stopped after step 2 and resumed."""
    import report
    root = tmp_path_factory.mktemp("fsdp")
    rows = list(csv.DictReader(open(SAMPLE / "reports" / "reports.csv")))
    tok = report.train_tokenizer([r["text"] for r in rows], str(root / "tok.model"), 400)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "lm")
    os.replace(tok.path, root / "lm" / "tokenizer.model")
    lm = ["--lm", str(root / "lm"), *RUN]
    out = {k: root / k for k in ("single", "fsdp", "resumed")}
    _report(lm + ["--batch_size", "4", "--out_dir", str(out["single"])])
    _report(lm + ["--batch_size", "2", "--fsdp", "--out_dir", str(out["fsdp"])], nproc=2)
    _report(lm + ["--batch_size", "2", "--fsdp", "--out_dir", str(out["resumed"]), "--stop_at", "2"], nproc=2)
    stopped = _losses(out["resumed"])
    _report(lm + ["--batch_size", "2", "--fsdp", "--out_dir", str(out["resumed"]), "--resume"], nproc=2)
    return out, stopped


def test_two_fsdp_ranks_train_like_one_process(runs):
    out, _ = runs
    one, two = _losses(out["single"]), _losses(out["fsdp"])
    assert len(one) == len(two) == 4 and one[-1] < one[0]  # it learns
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    res = json.loads((out["fsdp"] / "results.json").read_text())
    assert res["fsdp"] and res["world_size"] == 2 and res["train_mode"] == "full"  # full fine-tuning by default
    assert res["settings"]["global_batch"] == 4 and res["settings"]["grad_accum"] == 1
    # the weights after training agree too (rank 0 gathered the full state for checkpoint.pt)
    a = torch.load(out["single"] / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(out["fsdp"] / "checkpoint.pt", weights_only=True)["model"]
    assert set(a) == set(b) and any(k.startswith("lm.model.layers.1.") for k in a)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


def test_each_rank_holds_half_of_params_grads_and_optimizer_state(runs):
    out, _ = runs
    one = json.loads((out["single"] / "results.json").read_text())["memory_per_rank"][0]
    ranks = json.loads((out["fsdp"] / "results.json").read_text())["memory_per_rank"]
    assert len(ranks) == 2
    for r in ranks:
        for k in ("param", "grad", "optim"):
            # FSDP2 pads each dim-0 shard to equal size: within 1% of exactly half
            assert r[f"{k}_numel"] == pytest.approx(one[f"{k}_numel"] / 2, rel=0.01), (k, r, one)
        assert r["optim_numel"] == 2 * r["param_numel"]  # AdamW: exp_avg + exp_avg_sq per (sharded) element
        assert r["param_bytes"] == 4 * r["param_numel"]  # float32 master shards
    assert sum(r["param_numel"] for r in ranks) >= one["param_numel"]


def test_sharded_checkpoint_resumes_exactly(runs):
    out, stopped = runs
    assert len(stopped) == 2
    assert {"__0_0.distcp", "__1_0.distcp", "train_state.json"} <= set(os.listdir(out["resumed"] / "train_state"))
    assert _losses(out["resumed"]) == _losses(out["fsdp"])  # bit for bit: same batches, same optimizer state
    a = torch.load(out["fsdp"] / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(out["resumed"] / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
