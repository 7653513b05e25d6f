"""model.init_weights: Meta's I-JEPA initialisation (every Linear trunc_normal std 0.02 after construction, as
helper.init_model does) is the default; the per-layer rescaled variant is kept behind scheme="rescaled".

Optional: with IJEPA_DIR pointing at a checkout of facebookresearch/ijepa, the statistics are also compared with
Meta's own init_model, parameter by parameter (skipped without it)."""
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

import model
import pretrain


def _build(init="meta", depth=6):
    torch.manual_seed(0)
    enc = model.build_vit("vit_small", img_size=112, patch_size=14, init=init)
    pred = model.Predictor(enc.grid, enc.embed_dim, 192, depth, enc.num_heads, init=init)
    return enc, pred


def _tol(n):
    # the sample std of n normal draws has standard error ~ sigma / sqrt(2n); 6 of them is a safe but real bound
    return 0.02 * 6 / math.sqrt(2 * n)


def test_meta_init_every_linear_std_002_bias_0_layernorm_1_0():
    enc, pred = _build("meta")
    n_linear = 0
    for mod in (enc, pred):
        for name, m in mod.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight.detach().double()
                assert abs(w.std().item() - 0.02) < _tol(w.numel()), (name, w.std().item())
                assert abs(w.mean().item()) < 6 * 0.02 / math.sqrt(w.numel()), name
                # no 100-sigma outliers (trunc_normal_'s inverse-CDF method makes about one -2.0 per few million)
                assert w.abs().max().item() < 10 * 0.02, name
                assert m.bias is None or torch.count_nonzero(m.bias) == 0, name
                n_linear += isinstance(m, nn.Linear)
            elif isinstance(m, nn.LayerNorm):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    assert n_linear == 12 * 4 + 6 * 4 + 2  # qkv, proj, fc1, fc2 per block; predictor_embed, predictor_proj
    # the deepest residual output layers are NOT shrunk (the old default divided them by sqrt(2 * 12) ~ 4.9)
    for w in (enc.blocks[-1].attn.proj.weight, enc.blocks[-1].mlp.fc2.weight, pred.predictor_blocks[-1].mlp.fc2.weight):
        assert abs(w.std().item() - 0.02) < _tol(w.numel())
    # tokens and fixed position embeddings are left as before
    assert abs(pred.mask_token.std().item() - 0.02) < 0.02 * 0.5
    torch.testing.assert_close(enc.pos_embed.data[0], model.sincos_pos_embed(384, 8, 8))


def test_rescaled_init_divides_residual_outputs_by_sqrt_2_layer():
    enc, pred = _build("rescaled")
    for blocks in (enc.blocks, pred.predictor_blocks):
        for i, blk in enumerate(blocks):
            want = 0.02 / math.sqrt(2.0 * (i + 1))
            for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
                assert abs(w.std().item() / want - 1) < 6 / math.sqrt(2 * w.numel()), (i, w.std().item(), want)
            assert abs(blk.attn.qkv.weight.std().item() - 0.02) < _tol(blk.attn.qkv.weight.numel())
    # re-initialising a whole JEPA (encoder + predictor in one module) rescales each stack by its own depth
    jepa = pretrain.JEPA(*_build("meta"))
    model.init_weights(jepa, scheme="rescaled")
    w = jepa.predictor.predictor_blocks[5].mlp.fc2.weight
    assert abs(w.std().item() / (0.02 / math.sqrt(12)) - 1) < 6 / math.sqrt(2 * w.numel())
    with pytest.raises(ValueError, match="init scheme"):
        model.init_weights(enc, scheme="xavier")


def test_pretrain_init_flag_reaches_the_models():
    args = pretrain.get_args(["--init", "rescaled", "--model", "vit_tiny", "--img_size", "112"])
    assert args.init == "rescaled" and pretrain.get_args([]).init == "meta"
    args.attn = "sdpa"
    jepa, target = pretrain.build(args, torch.device("cpu"))
    w = jepa.encoder.blocks[-1].mlp.fc2.weight
    assert w.std().item() < 0.02 / 3  # divided by sqrt(24)
    assert torch.equal(target.blocks[-1].mlp.fc2.weight, w)  # the EMA target starts as a copy


@pytest.mark.skipif(not os.environ.get("IJEPA_DIR"), reason="set IJEPA_DIR to a facebookresearch/ijepa checkout")
def test_statistics_match_metas_init_model():
    sys.path.insert(0, os.environ["IJEPA_DIR"])
    from src.helper import init_model
    torch.manual_seed(0)
    m_enc, m_pred = init_model("cpu", patch_size=14, model_name="vit_small", crop_size=112, pred_depth=6,
                               pred_emb_dim=192)
    enc, pred = _build("meta")
    for theirs, ours in ((m_enc, enc), (m_pred, pred)):
        mine = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            q = mine[name]
            assert q.shape == p.shape or name == "patch_embed.proj.weight", name  # our stem may be 1 channel
            if p.ndim >= 2 and p.requires_grad and "token" not in name:
                # Meta's trunc_normal_ leaves the odd weight at exactly +-2.0 (erfinv(-1) clamped): leave those out
                p = p[p.abs() < 1]
                assert abs(q.std().item() - p.std().item()) < 2 * _tol(p.numel()), name
            elif p.ndim == 1:
                assert torch.equal(q, p), name  # biases 0, LayerNorm 1 / 0
