"""
Ahead-of-time compile of the Triton attention kernels for NVIDIA GPUs, on any machine (no GPU needed): every kernel
and every autotune config, for sm_80 (A100) and sm_90 (H100), fp16 and bf16, head dims 64 / 80 / 128, with the
registers, spills and shared memory ptxas reports for each.

    python triton_attn/aot_report.py                    # the full sweep (204 compiles; ~10 s each on one CPU core)
    python triton_attn/aot_report.py --arch 90 --head_dim 128 --workers 8 --json out/aot.json

triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) lowers a kernel through Triton's MLIR passes to
PTX and runs ptxas (shipped with triton) to a cubin, exactly as a first launch on that GPU would, minus the
driver. ptxas -v then gives registers per thread, spill stores / loads and the stack frame; Triton's metadata
gives the shared memory. A config "spills" when ptxas reports spill stores, and "cannot fit" when its shared
memory exceeds the GPU's per-block limit. triton_attn/attention.py keeps such configs out of its autotune lists
(SPILLS, from this report): autotuning would time them and usually reject them anyway, but each one costs a
compile and a benchmark on the first call, and a spilling config can win a noisy timing.

Integer arguments are compiled unspecialised (no divisibility-by-16 hints), so the real launch may differ by a
few registers; the dtypes, block sizes, warps and stages are exactly the autotuner's.
"""
import argparse
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHS = (80, 90)
DTYPES = ("fp16", "bf16")
HEAD_DIMS = (64, 80, 128)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block (A100, H100)
KERNELS = ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")


def load_attention():
    """triton_attn/attention.py as the GPU sees it: imported under another name with TRITON_INTERPRET unset, so the
    kernels are real JIT functions and the autotune lists are the full GPU lists, even inside a test session that
    runs the interpreter."""
    with _gpu_mode():
        spec = importlib.util.spec_from_file_location("_attention_aot", os.path.join(HERE, "attention.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _gpu_mode():
    """Triton's language functions read TRITON_INTERPRET at call time: unset it while compiling for a GPU."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def configs(mod, kernel):
    """[(num_warps, num_stages, {block constexprs})] the autotuner would try for `kernel` (before pruning)."""
    if kernel == "_attn_bwd_preprocess":  # not autotuned: launched with PREPROCESS_BLOCK rows, Triton's defaults
        return [(4, 3, {"BLOCK_M": mod.PREPROCESS_BLOCK})]
    return [(c.num_warps, c.num_stages, dict(c.kwargs)) for c in getattr(mod, kernel).configs]


def signature(mod, kernel, dtype, head_dim, blocks):
    """Triton signature and constexprs for one compile, matching the launchers in attention.py."""
    from triton.runtime.autotuner import Autotuner
    fn = getattr(mod, kernel)
    fn = fn.fn if isinstance(fn, Autotuner) else fn  # the JIT function under the autotuner
    block_d = mod.padded_head_dim(head_dim)
    const = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, MASK_D=block_d != head_dim, UPCAST=False, PRECISION="tf32",
                 **blocks)
    fp32_ptrs, fp32_scalars = {"LSE", "DELTA"}, {"qk_scale", "sm_scale"}
    sig, cst = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            cst[p.name] = const[p.name]
        elif p.name in fp32_ptrs:
            sig[p.name] = "*fp32"
        elif p.name in fp32_scalars:
            sig[p.name] = "fp32"
        elif p.name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[p.name] = "*" + dtype
        else:  # strides, H, N, N_KEY
            sig[p.name] = "i32"
    return fn, sig, cst


def _ptxas_usage(ptx, arch):
    """Registers, spill bytes and stack frame from `ptxas -v`, run with the flags Triton uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               src, "-o", os.path.join(d, "k.cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = r.stdout + r.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0
    return dict(regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"))


def compile_kernel(mod, kernel, cfg, arch, dtype, head_dim):
    """triton.compile one kernel at one config (num_warps, num_stages, {blocks}) for sm_<arch>: a CompiledKernel
    whose .asm holds "ptx" and "cubin"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    warps, stages, blocks = cfg
    fn, sig, cst = signature(mod, kernel, dtype, head_dim, blocks)
    with _gpu_mode(), contextlib.redirect_stderr(open(os.devnull, "w")):  # and no deprecation chatter
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))


def compile_one(job, mod=None):
    """Compile one (kernel, config, arch, dtype, head_dim) to PTX + cubin; returns a result row (dict)."""
    kernel, (warps, stages, blocks), arch, dtype, head_dim = job
    mod = mod or load_attention()
    k = compile_kernel(mod, kernel, (warps, stages, blocks), arch, dtype, head_dim)
    row = dict(kernel=kernel, arch=arch, dtype=dtype, head_dim=head_dim, num_warps=warps, num_stages=stages,
               **{b.lower(): v for b, v in blocks.items()}, block_d=mod.padded_head_dim(head_dim))
    ptx, cubin = k.asm["ptx"], k.asm["cubin"]
    row.update(ptx_bytes=len(ptx), cubin_bytes=len(cubin), shared=int(k.metadata.shared),
               target=re.search(r"\.target (\S+)", ptx).group(1), entry=f".entry {kernel}(" in ptx,
               elf=cubin[:4] == b"\x7fELF", bf16_ops=".bf16" in ptx, **_ptxas_usage(ptx, arch))
    row["spills"] = row["spill_stores"] > 0
    row["fits"] = row["shared"] <= SHARED_LIMIT[arch] and row["regs"] * 32 * warps <= 65536
    return row


BLOCK_NAMES = {"_attn_fwd": ("BLOCK_M", "BLOCK_N"), "_attn_bwd_dkdv": ("BLOCK_M1", "BLOCK_N1"),
               "_attn_bwd_dq": ("BLOCK_M2", "BLOCK_N2")}


def first_kept(mod, kernel, arch, head_dim, n=256):
    """The first config the autotuner keeps for an n-token sequence on `arch` (what its first launch tries)."""
    if kernel not in BLOCK_NAMES:
        return configs(mod, kernel)[0]
    c = mod.kept_configs(kernel, getattr(mod, kernel).configs, n, mod.padded_head_dim(head_dim), arch,
                         *BLOCK_NAMES[kernel])[0]
    return c.num_warps, c.num_stages, dict(c.kwargs)


def jobs(mod, kernels=KERNELS, archs=ARCHS, dtypes=DTYPES, head_dims=HEAD_DIMS):
    return [(kern, cfg, arch, dt, hd) for kern in kernels for cfg in configs(mod, kern)
            for arch in archs for dt in dtypes for hd in head_dims]


def row_blocks(row):
    return [v for k, v in row.items() if k.startswith("block_") and k != "block_d"]


def config_key(row):
    """How attention.SPILLS names a config: (kernel, block sizes..., num_warps, num_stages, BLOCK_D)."""
    return (row["kernel"], *row_blocks(row), row["num_warps"], row["num_stages"], row["block_d"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--head_dim", type=int, nargs="+", default=list(HEAD_DIMS))
    p.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--combo", nargs="+", default=None, metavar="KERNEL:ARCH:DTYPE:HEAD_DIM",
                   help="instead of the sweep: only these combinations, each at the first config the autotuner keeps")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default=None, help="also write every row here")
    args = p.parse_args(argv)
    mod = load_attention()
    if args.combo:
        combos = [(kern, int(arch), dt, int(hd)) for kern, arch, dt, hd in (c.split(":") for c in args.combo)]
        todo = [(kern, first_kept(mod, kern, arch, hd), arch, dt, hd) for kern, arch, dt, hd in combos]
    else:
        todo = jobs(mod, args.kernel, args.arch, args.dtype, args.head_dim)
    print(f"{len(todo)} compiles on {args.workers} process(es)", file=sys.stderr, flush=True)
    cols = ["kernel", "arch", "dtype", "head_dim", "blocks", "num_warps", "num_stages", "regs", "spill_stores",
            "spill_loads", "stack", "shared", "fits"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|", flush=True)
    rows = []
    with concurrent.futures.ProcessPoolExecutor(args.workers) as ex:
        for r in ex.map(compile_one, todo):  # in order, each row printed as soon as it is there
            r["blocks"] = "x".join(map(str, row_blocks(r)))
            rows.append(r)
            print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |", flush=True)
    bad = sorted({config_key(r) for r in rows if r["spills"] or not r["fits"]})
    print(f"\n{len(rows)} compiled, {sum(r['spills'] for r in rows)} spill, {sum(not r['fits'] for r in rows)} "
          f"cannot fit. Configs to drop (any arch / dtype), for attention.SPILLS:")
    for key in bad:
        print(f"    {key},")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
