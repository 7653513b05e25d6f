"""
Fused non-causal attention in Triton, forward and backward (FlashAttention-2 style), for the ViT and the predictor.

    from triton_attn.attention import attention
    o = attention(q, k, v)             # q, k, v: (B, H, N, D) CUDA tensors, fp16 / bf16 / fp32, any strides
    o.sum().backward()                 # dq, dk, dv from the fused backward kernels
    # model.py calls this for --attn triton: model.attention(q, k, v, impl="triton")

    TRITON_INTERPRET=1 python -m pytest tests/test_attention.py   # the same kernels on the CPU (Triton interpreter)
    python triton_attn/attention.py                                    # quick check against the PyTorch reference

What it computes: O = softmax(scale * Q K^T) V with scale = D ** -0.5 by default, no mask, no dropout.
- forward: one program per (query block, batch*head). It streams key/value blocks through an online softmax
  (running max m and running sum l, fp32), so the N x N score matrix never exists in memory, and saves the
  log-sum-exp (LSE) of every query row for the backward.
- backward: delta = rowsum(dO * O) first (a tiny kernel); then one kernel computes dK, dV for a key block by
  iterating over all query blocks, and a separate kernel computes dQ for a query block by iterating over all key
  blocks. Each program owns the rows it writes, so there are no atomics and the result is bitwise deterministic,
  at the price of computing Q K^T twice in the backward (FlashAttention-2 computes it once but accumulates dQ
  with atomics, whose summation order changes from run to run).
- head dims up to 128; a head dim that is not a power of two (80 for ViT-H) is padded to the next one (BLOCK_D)
  with masked loads and stores. Any sequence length: the last, partial block is masked; all full blocks run
  the unmasked loop, so masking costs one extra iteration, not a select in every iteration.
- matmul inputs stay in fp16 / bf16 on the GPU (tensor cores) with fp32 accumulation; fp32 inputs use exact
  fp32 products unless torch.backends.cuda.matmul.allow_tf32 is set (as for PyTorch's own fp32 matmuls).
- output in the input dtype; it is laid out (B, N, H, D) in memory and returned as a (B, H, N, D) view, so the
  model's following `o.transpose(1, 2).reshape(B, N, H * D)` is free (FlashAttention does the same).

Under TRITON_INTERPRET=1 (read when this module is imported) the kernels run on the CPU with a single autotune
config. The interpreter does bf16 arithmetic wrongly (it stores bf16 as raw uint16 and multiplies those), so for
bf16 inputs the loaded tiles are upcast to fp32 right after tl.load there (UPCAST); fp16 and fp32 run the GPU's
exact code path. Set RADJEPA_ATTN_POISON=1 (or triton_attn.attention.POISON = True) to fill every output and scratch
buffer with NaN before the kernels run, so an element a kernel forgets to write shows up as NaN (the tests do).
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the model imports this module only for --attn triton
    raise ImportError("triton_attn.attention needs the triton package (pip install triton); "
                      "or run with --attn sdpa") from e

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
POISON = os.environ.get("RADJEPA_ATTN_POISON") == "1"
LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e)), and exp2 is one fast instruction


# ----------------------------------------------------------------------------------------------------------------
# autotune configs. Key: the padded head dim, the sequence length rounded up to a power of two (so the variable
# number of kept context patches does not re-tune on every new length) and, added by triton, the dtypes.

def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


if INTERPRET:
    # one config (nothing to time on a CPU); blocks smaller than the test lengths so that the full-block loop, the
    # masked tail and several programs per head are all exercised
    FWD_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_N=64)]
    DKDV_CONFIGS = [_cfg(4, 1, BLOCK_M1=32, BLOCK_N1=64)]
    DQ_CONFIGS = [_cfg(4, 1, BLOCK_M2=64, BLOCK_N2=32)]
else:
    # forward: wide query blocks amortise each K/V tile over many rows; 64-wide key blocks keep the fp32 score
    # tile in registers. Backward dK/dV: wide key blocks (the accumulators), narrow query blocks streamed; dQ the
    # mirror image. The Triton tutorial's best H100 configs plus a few neighbours: each one costs a compile and a
    # timing on the first call per key, so the lists stay short.
    FWD_CONFIGS = [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn) for bm, bn, w, s in
                   [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3),
                    (128, 128, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2)]]
    DKDV_CONFIGS = [_cfg(w, s, BLOCK_M1=bm, BLOCK_N1=bn) for bm, bn, w, s in
                    [(32, 128, 4, 5), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2),
                     (32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)]]
    DQ_CONFIGS = [_cfg(w, s, BLOCK_M2=bm, BLOCK_N2=bn) for bm, bn, w, s in
                  [(128, 32, 4, 5), (128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2),
                   (64, 32, 8, 2), (64, 16, 4, 2), (32, 32, 4, 2)]]


# rows per program of the tiny delta = rowsum(dO * O) kernel: 128 rows x head dim 128 held in 4 warps' registers
# spill on sm_90 (triton_attn/aot_report.py); 32 rows never do, and the kernel is memory-bound either way
PREPROCESS_BLOCK = 32


# Configs that spill registers (or exceed shared memory) on a GPU generation, measured ahead of time by
# triton_attn/aot_report.py (ptxas -v on the cubin for sm_80 / sm_90, fp16 and bf16; a config is listed when it spills
# in either dtype): {(kernel, arch): {(block_a, block_b, num_warps, num_stages, BLOCK_D): spill-store bytes}}.
# The autotuner never tries these; if every config of a kernel spills at some head dim, the one that spills
# least is kept (there has to be one).
SPILLS = {  # measured by triton_attn/aot_report.py --dtype bf16 --head_dim 64 128 (head dim 80 pads to BLOCK_D 128)
    ('_attn_bwd_dkdv', 80): {
        (16, 64, 4, 2, 128): 348,
        (32, 32, 4, 2, 128): 132,
        (32, 64, 4, 3, 64): 124,
        (32, 64, 4, 3, 128): 624,
        (32, 64, 8, 2, 128): 60,
        (32, 128, 4, 3, 64): 872,
        (32, 128, 4, 3, 128): 26354,
        (32, 128, 4, 5, 64): 872,
        (32, 128, 4, 5, 128): 26354,
        (64, 64, 4, 2, 64): 708,
        (64, 64, 4, 2, 128): 1604,
        (64, 128, 8, 3, 64): 440,
        (64, 128, 8, 3, 128): 23414,
    },
    ('_attn_bwd_dkdv', 90): {
        (16, 64, 4, 2, 128): 292,
        (32, 32, 4, 2, 128): 160,
        (32, 64, 4, 3, 128): 640,
        (32, 64, 8, 2, 128): 88,
        (32, 128, 4, 3, 64): 720,
        (32, 128, 4, 3, 128): 4400,
        (32, 128, 4, 5, 64): 720,
        (32, 128, 4, 5, 128): 4400,
        (64, 64, 4, 2, 64): 260,
        (64, 64, 4, 2, 128): 1732,
        (64, 128, 8, 3, 64): 12,
        (64, 128, 8, 3, 128): 1168,
    },
    ('_attn_bwd_dq', 80): {
        (32, 32, 4, 2, 128): 4,
        (64, 16, 4, 2, 128): 24,
        (64, 32, 4, 3, 128): 320,
        (64, 64, 4, 2, 64): 292,
        (64, 64, 4, 2, 128): 1064,
        (128, 32, 4, 3, 64): 316,
        (128, 32, 4, 3, 128): 2266,
        (128, 32, 4, 5, 64): 316,
        (128, 32, 4, 5, 128): 2266,
        (128, 64, 8, 3, 64): 128,
        (128, 64, 8, 3, 128): 904,
    },
    ('_attn_bwd_dq', 90): {
        (32, 32, 4, 2, 128): 16,
        (64, 16, 4, 2, 128): 28,
        (64, 32, 4, 3, 128): 344,
        (64, 64, 4, 2, 64): 152,
        (64, 64, 4, 2, 128): 952,
        (128, 32, 4, 3, 64): 172,
        (128, 32, 4, 3, 128): 1886,
        (128, 32, 4, 5, 64): 172,
        (128, 32, 4, 5, 128): 1886,
        (128, 64, 8, 3, 128): 624,
    },
    ('_attn_fwd', 80): {
        (64, 32, 4, 2, 128): 160,
        (64, 64, 4, 3, 64): 256,
        (64, 64, 4, 3, 128): 908,
        (64, 64, 8, 2, 128): 208,
        (128, 32, 4, 3, 64): 248,
        (128, 32, 4, 3, 128): 13766,
        (128, 64, 4, 3, 64): 740,
        (128, 64, 4, 3, 128): 23960,
        (128, 64, 4, 4, 64): 740,
        (128, 64, 4, 4, 128): 23960,
        (128, 64, 8, 2, 64): 4,
        (128, 64, 8, 2, 128): 860,
        (128, 64, 8, 3, 64): 4,
        (128, 64, 8, 3, 128): 860,
        (128, 128, 8, 2, 64): 556,
        (128, 128, 8, 2, 128): 23266,
    },
    ('_attn_fwd', 90): {
        (64, 32, 4, 2, 128): 28,
        (64, 64, 4, 3, 128): 816,
        (128, 32, 4, 3, 64): 12,
        (128, 32, 4, 3, 128): 756,
        (128, 64, 4, 3, 64): 324,
        (128, 64, 4, 3, 128): 2188,
        (128, 64, 4, 4, 64): 324,
        (128, 64, 4, 4, 128): 2188,
        (128, 64, 8, 2, 128): 200,
        (128, 64, 8, 3, 128): 200,
        (128, 128, 8, 2, 64): 60,
        (128, 128, 8, 2, 128): 1412,
    },
}


def _arch(t):
    """The SPILLS generation of the GPU holding tensor t: 90 for Hopper and newer, 80 for Ampere / Ada."""
    if INTERPRET or not t.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 90 if major * 10 + minor >= 90 else 80


def kept_configs(kernel, configs, n, block_d, arch, block_a, block_b):
    """The configs the autotuner may try for `kernel` at sequence length n (its power-of-two key) and padded head
    dim block_d on GPU generation `arch` (None: no spill data applies): blocks much longer than the sequence only
    burn masked work, and configs known to spill there are dropped."""
    keep = [c for c in configs if c.kwargs[block_a] <= max(64, n) and c.kwargs[block_b] <= max(64, n)]
    keep = keep or [min(configs, key=lambda c: c.kwargs[block_a] * c.kwargs[block_b])]
    spills = SPILLS.get((kernel, arch), {})
    cost = lambda c: spills.get((c.kwargs[block_a], c.kwargs[block_b], c.num_warps, c.num_stages, block_d), 0)
    clean = [c for c in keep if cost(c) == 0]
    return clean or [min(keep, key=cost)]


def _prune(kernel, block_a, block_b):
    """early_config_prune for the autotuner (see kept_configs)."""
    def prune(configs, named_args, **kwargs):
        n, d = named_args["N_KEY"], kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        return kept_configs(kernel, configs, n, d, _arch(named_args["Q"] if "Q" in named_args else named_args["O"]),
                            block_a, block_b)
    return prune


# ----------------------------------------------------------------------------------------------------------------
# shared helpers (inlined by triton)

@triton.jit
def _load_2d(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a tile, masking only what may be out of bounds: an unmasked load vectorises best, and which masks are
    needed is known at compile time (full blocks: none; the padded head dim 80 -> 128: columns)."""
    if MASK_ROWS and MASK_COLS:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif MASK_ROWS:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif MASK_COLS:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store_2d(ptrs, x, rows, n_rows, cols, n_cols, MASK_COLS: tl.constexpr):
    if MASK_COLS:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
    else:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)


# ----------------------------------------------------------------------------------------------------------------
# forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, skn, svn, lo, hi, N, offs_n, offs_d, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_2d(k_ptrs + start_n * skn, start_n + offs_n, N, offs_d, HEAD_DIM, MASK_N, MASK_D)
        v = _load_2d(v_ptrs + start_n * svn, start_n + offs_n, N, offs_d, HEAD_DIM, MASK_N, MASK_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), fp32, unscaled
        if MASK_N:  # keys past the end get -inf: exp2 makes them exactly 0 in p and in l
            qk = tl.where((start_n + offs_n)[None, :] < N, qk, float("-inf"))
        # online softmax: new running max, rescale what was accumulated under the old max by alpha
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)  # P in the input dtype: tensor cores
        m_i = m_ij
    return acc, l_i, m_i


@triton.autotune(configs=FWD_CONFIGS, key=["N_KEY", "BLOCK_D"],
                 prune_configs_by={"early_config_prune": _prune("_attn_fwd", "BLOCK_M", "BLOCK_N")})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
              H, N, N_KEY, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # one flat grid axis, query blocks of one head adjacent: programs running together read the same K/V (L2
    # reuse), and there is no 65535 limit on batch * heads as there would be on grid axis 1
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    bh = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    off_b = (bh // H).to(tl.int64)  # int64: batch * stride can pass 2**31 for big batches
    off_h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_2d(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                 offs_m, N, offs_d, HEAD_DIM, True, MASK_D)  # rows past N load as 0: finite, never stored
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + off_b * skb + off_h * skh + offs_n[:, None] * skn + offs_d[None, :]
    v_ptrs = V + off_b * svb + off_h * svh + offs_n[:, None] * svn + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, skn, svn, 0, n_full, N, offs_n, offs_d,
                               qk_scale, HEAD_DIM, BLOCK_N, False, MASK_D, UPCAST, PRECISION)
    # the partial last key block, if any (this range has 0 or 1 iterations). It holds >= 1 real key, so every
    # row's max stays finite and l > 0
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, skn, svn, n_full, N, N, offs_n, offs_d,
                               qk_scale, HEAD_DIM, BLOCK_N, True, MASK_D, UPCAST, PRECISION)

    acc = acc / l_i[:, None]
    _store_2d(O + off_b * sob + off_h * soh + offs_m[:, None] * son + offs_d[None, :],
              acc.to(O.dtype.element_ty), offs_m, N, offs_d, HEAD_DIM, MASK_D)
    # LSE in base-2 units of the scaled scores: the backward recomputes P = exp2(qk * qk_scale - lse)
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)


# ----------------------------------------------------------------------------------------------------------------
# backward

@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, H, N,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the softmax backward's row term, computed once here instead
    # of once per key block in the dK/dV kernel
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    bh = pid // num_m
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b * sob + off_h * soh + offs_m[:, None] * son + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * sdb + off_h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, sqn, sdon, lo, hi, N, offs_m, offs_d,
                qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK_M: tl.constexpr,
                MASK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_2d(q_ptrs + start_m * sqn, rows, N, offs_d, HEAD_DIM, MASK_M, MASK_D)
        do = _load_2d(do_ptrs + start_m * sdon, rows, N, offs_d, HEAD_DIM, MASK_M, MASK_D)
        if MASK_M:
            # queries past the end: LSE = +inf makes their P exactly 0 (their dO and delta, loaded as 0, already
            # cancel them from dV and dK; the zero P keeps that from resting on one argument)
            lse = tl.load(lse_ptrs + start_m, mask=rows < N, other=float("inf"))
            delta = tl.load(delta_ptrs + start_m, mask=rows < N, other=0.0)
        else:
            lse = tl.load(lse_ptrs + start_m)
            delta = tl.load(delta_ptrs + start_m)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # work with the transposed tiles (keys along rows) so the accumulators dK, dV stay (BLOCK_N, D)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        pT = tl.exp2(qkT * qk_scale - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=["N_KEY", "BLOCK_D"],
                 prune_configs_by={"early_config_prune": _prune("_attn_bwd_dkdv", "BLOCK_M1", "BLOCK_N1")})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                   H, N, N_KEY, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N1)
    bh = pid // num_n
    start_n = (pid % num_n) * BLOCK_N1
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    offs_m = tl.arange(0, BLOCK_M1)
    offs_d = tl.arange(0, BLOCK_D)

    # this program's key / value block stays in registers for the whole sweep over the queries
    k = _load_2d(K + off_b * skb + off_h * skh + offs_n[:, None] * skn + offs_d[None, :],
                 offs_n, N, offs_d, HEAD_DIM, True, MASK_D)
    v = _load_2d(V + off_b * svb + off_h * svh + offs_n[:, None] * svn + offs_d[None, :],
                 offs_n, N, offs_d, HEAD_DIM, True, MASK_D)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_ptrs = Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqn + offs_d[None, :]
    do_ptrs = DO + off_b * sdob + off_h * sdoh + offs_m[:, None] * sdon + offs_d[None, :]
    lse_ptrs = LSE + bh.to(tl.int64) * N + offs_m
    delta_ptrs = DELTA + bh.to(tl.int64) * N + offs_m

    dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
    m_full = (N // BLOCK_M1) * BLOCK_M1
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, sqn, sdon, 0, m_full, N,
                         offs_m, offs_d, qk_scale, HEAD_DIM, BLOCK_M1, False, MASK_D, UPCAST, PRECISION)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, sqn, sdon, m_full, N, N,
                         offs_m, offs_d, qk_scale, HEAD_DIM, BLOCK_M1, True, MASK_D, UPCAST, PRECISION)

    # S = scale * Q K^T, so dK = scale * dS^T Q (the exp2 / log2(e) factors cancel between P and its use)
    dk = dk * sm_scale
    _store_2d(DK + off_b * sdkb + off_h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
              dk.to(DK.dtype.element_ty), offs_n, N, offs_d, HEAD_DIM, MASK_D)
    _store_2d(DV + off_b * sdvb + off_h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :],
              dv.to(DV.dtype.element_ty), offs_n, N, offs_d, HEAD_DIM, MASK_D)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, skn, svn, lo, hi, N, offs_n, offs_d, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_2d(k_ptrs + start_n * skn, start_n + offs_n, N, offs_d, HEAD_DIM, MASK_N, MASK_D)
        v = _load_2d(v_ptrs + start_n * svn, start_n + offs_n, N, offs_d, HEAD_DIM, MASK_N, MASK_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if MASK_N:  # a missing key loads as 0, so its score is 0, not -inf: zero its probability (its zero k row
            # would cancel it from dQ anyway; this keeps P the true softmax, one select in the tail block only)
            p = tl.where((start_n + offs_n)[None, :] < N, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=["N_KEY", "BLOCK_D"],
                 prune_configs_by={"early_config_prune": _prune("_attn_bwd_dq", "BLOCK_M2", "BLOCK_N2")})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
                 H, N, N_KEY, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M2)
    bh = pid // num_m
    start_m = (pid % num_m) * BLOCK_M2
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M2)
    offs_n = tl.arange(0, BLOCK_N2)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_2d(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                 offs_m, N, offs_d, HEAD_DIM, True, MASK_D)
    do = _load_2d(DO + off_b * sdob + off_h * sdoh + offs_m[:, None] * sdon + offs_d[None, :],
                  offs_m, N, offs_d, HEAD_DIM, True, MASK_D)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # rows past the end: any finite LSE keeps their (never stored) dQ rows finite
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    k_ptrs = K + off_b * skb + off_h * skh + offs_n[:, None] * skn + offs_d[None, :]
    v_ptrs = V + off_b * svb + off_h * svh + offs_n[:, None] * svn + offs_d[None, :]

    dq = tl.zeros([BLOCK_M2, BLOCK_D], tl.float32)
    n_full = (N // BLOCK_N2) * BLOCK_N2
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, skn, svn, 0, n_full, N, offs_n, offs_d, qk_scale,
                   HEAD_DIM, BLOCK_N2, False, MASK_D, UPCAST, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, skn, svn, n_full, N, N, offs_n, offs_d, qk_scale,
                   HEAD_DIM, BLOCK_N2, True, MASK_D, UPCAST, PRECISION)
    dq = dq * sm_scale
    _store_2d(DQ + off_b * sdqb + off_h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :],
              dq.to(DQ.dtype.element_ty), offs_m, N, offs_d, HEAD_DIM, MASK_D)


# ----------------------------------------------------------------------------------------------------------------
# launchers and the autograd Function

def _new(shape, dtype, device):
    """Output / scratch buffer: uninitialised (the kernels write every element), or NaN when POISON is set."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _new_bnhd(B, H, N, D, dtype, device):
    """A (B, H, N, D) tensor stored as (B, N, H, D): heads merge back into the width with a free reshape."""
    return _new((B, N, H, D), dtype, device).transpose(1, 2)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def padded_head_dim(d):
    """BLOCK_D, the head dim the kernels run at: the next power of two, at least 16 (tl.dot's reduction minimum)."""
    return max(16, triton.next_power_of_2(d))


def _meta(q):
    D = q.shape[-1]
    block_d = padded_head_dim(D)
    # fp32 inputs: exact products unless the user allowed TF32 for matmuls. fp16 / bf16: "tf32" is triton's
    # default and means nothing for 16-bit operands (tensor cores, fp32 accumulation either way)
    exact = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    precision = "ieee" if exact else "tf32"
    return dict(HEAD_DIM=D, BLOCK_D=block_d, MASK_D=block_d != D,
                UPCAST=INTERPRET and q.dtype == torch.bfloat16, PRECISION=precision)


def _forward(q, k, v, scale):
    B, H, N, D = q.shape
    o = _new_bnhd(B, H, N, D, q.dtype, q.device)
    lse = _new((B, H, N), torch.float32, q.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * B * H,)
    _attn_fwd[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                    H, N, triton.next_power_of_2(N), scale * LOG2E, **_meta(q))
    return o, lse


def _backward(q, k, v, o, lse, do, scale):
    B, H, N, D = q.shape
    meta = _meta(q)
    delta = _new((B, H, N), torch.float32, q.device)
    block = PREPROCESS_BLOCK
    _attn_bwd_preprocess[(triton.cdiv(N, block) * B * H,)](
        o, do, delta, *_strides(o), *_strides(do), H, N, HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=block)
    dq, dk, dv = (_new_bnhd(B, H, N, D, q.dtype, q.device) for _ in range(3))
    common = (H, N, triton.next_power_of_2(N), scale * LOG2E, scale)
    grid = lambda m: (triton.cdiv(N, m["BLOCK_N1"]) * B * H,)
    _attn_bwd_dkdv[grid](q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v),
                         *_strides(do), *_strides(dk), *_strides(dv), *common, **meta)
    grid = lambda m: (triton.cdiv(N, m["BLOCK_M2"]) * B * H,)
    _attn_bwd_dq[grid](q, k, v, do, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v),
                       *_strides(do), *_strides(dq), *common, **meta)
    return dq, dk, dv


def _last_dim_contiguous(t):
    # the kernels address rows and heads through strides but assume the head dim is contiguous (vector loads);
    # this also catches stride-0 gradients such as the one from o.sum().backward()
    return t if t.stride(-1) == 1 else t.contiguous()


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, _last_dim_contiguous(do), ctx.scale)
        return dq, dk, dv, None


def attention(q, k, v, scale=None):
    """softmax(scale * q k^T) v for q, k, v of shape (B, H, N, D) (same shape and dtype: fp16, bf16 or fp32),
    non-causal, no mask; differentiable. scale defaults to D ** -0.5. Returns (B, H, N, D) in the input dtype."""
    if not (q.dim() == 4 and q.shape == k.shape == v.shape):
        raise ValueError(f"triton attention needs q, k, v of one shape (B, H, N, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        raise ValueError(f"triton attention needs q, k, v in one of fp16 / bf16 / fp32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 128:
        raise ValueError(f"triton attention supports head dims up to 128; got {q.shape[-1]} (use --attn sdpa)")
    if not (q.device == k.device == v.device and (q.is_cuda or INTERPRET)):
        raise RuntimeError("triton attention needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                           "use --attn sdpa on this machine")
    if q.numel() == 0:  # empty batch or sequence: nothing to launch; an empty result that autograd can follow
        return (q + k + v) * 0
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"attention scale must be positive; got {scale}")  # the online max assumes it
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _Attention.apply(q, k, v, scale)


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference and a quick check (the full checks are in tests/test_attention.py and bench_attention.py)

def reference(q, k, v, scale=None):
    """The same attention in float64 PyTorch (materialises the N x N matrix): the ground truth for the tests."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not INTERPRET:
        print("no CUDA: rerun as TRITON_INTERPRET=1 python triton_attn/attention.py to check on the CPU interpreter")
        raise SystemExit(0)
    torch.manual_seed(0)
    for dtype, tol in [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)]:
        for (B, H, N, D) in [(1, 2, 150, 64), (1, 1, 7, 80)]:
            q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            do = torch.randn(B, H, N, D, device=device, dtype=dtype)
            o = attention(q, k, v)
            grads = torch.autograd.grad(o, (q, k, v), do)
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            o64 = reference(q64, k64, v64)
            ref = (o64,) + torch.autograd.grad(o64, (q64, k64, v64), do.double())
            errs = [(a.double() - b).abs().max().item() for a, b in zip((o,) + grads, ref)]
            ok = all(e < tol * 5 for e in errs)
            print(f"{str(dtype):15s} {(B, H, N, D)}: max abs err o/dq/dk/dv = "
                  + " ".join(f"{e:.1e}" for e in errs) + ("  ok" if ok else "  FAIL"))
