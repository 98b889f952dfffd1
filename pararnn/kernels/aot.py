"""Ahead-of-time compilation of the Triton scans for real GPU targets, with no GPU present.

``triton.compile`` lowers a kernel for a ``GPUTarget`` (sm_80, sm_90, ...) down to PTX on any
machine; the ptxas that ships in the triton wheel assembles it and reports registers, spills and
stack (``-v``). This catches what the interpreter cannot see: compile errors, register spills and
shared memory beyond a device's limit.

    python -m pararnn.kernels.aot            # every autotune config, sm_80 and sm_90 (minutes)
    python -m pararnn.kernels.aot --quick    # one config per kernel and dtype
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

# Shared memory per block a kernel may use (bytes): sm_80 (A100) 163 KB, sm_86/89 about 99 KB,
# sm_90 (H100) 227 KB. Configurations must fit the smallest of the targets they are meant for.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


@dataclass
class Stats:
    kernel: str
    dtype: str
    arch: int
    BLOCK_T: int
    BLOCK_L: int
    num_warps: int
    registers: int | None
    spill_bytes: int | None
    stack_bytes: int | None
    shared_bytes: int
    ok: bool
    error: str = ""


def _ptxas() -> str:
    import triton

    bins = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # the newest assembler shipped (the plain one can be older than the PTX triton emits)
    cands = sorted(glob.glob(os.path.join(bins, "ptxas*")), key=lambda p: ("blackwell" not in p, p))
    if not cands:
        raise RuntimeError("no ptxas in the triton wheel")
    return cands[0]


def kernels():
    """``{name: (jit function, lane constexpr name, dtypes)}`` of every dispatched scan kernel."""
    from . import triton_blocks, triton_scan

    out = {"diag_real": (triton_scan._diag_real_kernel, "BLOCK_D", ("fp32", "fp16", "bf16")),
           "diag_complex": (triton_scan._diag_complex_kernel, "BLOCK_D", ("fp32",))}
    for k, fn in triton_blocks.KERNELS.items():
        out[f"block{k}"] = (fn, "BLOCK_M", ("fp32", "fp16", "bf16"))
    return out


def compile_kernel(name: str, dtype: str, arch: int, BLOCK_T: int, BLOCK_L: int, num_warps: int,
                   flags: dict | None = None):
    """``triton.compile`` of one specialisation for ``sm_<arch>`` (no GPU needed): the compiled
    kernel, whose ``asm`` holds its TTIR, TTGIR and PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, lane, _ = kernels()[name]
    flags = flags or {"HAS_H0": True, "REVERSE": False, "ADJOINT": False}
    sig = {"A": f"*{dtype}", "Bv": f"*{dtype}", "H0": f"*{dtype}", "OUT": f"*{dtype}", "T": "i32",
           ("D" if lane == "BLOCK_D" else "M"): "i32"}
    consts = {**flags, "BLOCK_T": BLOCK_T, lane: BLOCK_L}
    sig.update({k: "constexpr" for k in consts})
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def scan_lowering(name: str, dtype: str = "fp32", arch: int = 90, BLOCK_T: int = 32, BLOCK_L: int = 8,
                  num_warps: int = 4) -> dict:
    """What ``tl.associative_scan`` became on a real target (the tests run the interpreter, whose
    scan is replaced, so this is the only view of the GPU lowering without a GPU): the TTGIR
    ``tt.scan`` ops with their operand counts, axes and directions, and the warp shuffles in the
    PTX that implement the scan across threads."""
    k = compile_kernel(name, dtype, arch, BLOCK_T, BLOCK_L, num_warps)
    scans = re.findall(r'"tt\.scan"\(([^)]*)\) <\{axis = (\d+) : i32, reverse = (\w+)\}>', k.asm["ttgir"])
    return {"scans": [{"operands": args.count("%"), "axis": int(axis), "reverse": rev == "true"}
                      for args, axis, rev in scans],
            "ptx_warp_shuffles": len(re.findall(r"shfl\.sync", k.asm["ptx"]))}


def compile_stats(name: str, dtype: str, arch: int, BLOCK_T: int, BLOCK_L: int, num_warps: int,
                  flags: dict | None = None) -> Stats:
    """Compile one specialisation for ``sm_<arch>`` and read ptxas' resource report."""
    base = dict(kernel=name, dtype=dtype, arch=arch, BLOCK_T=BLOCK_T, BLOCK_L=BLOCK_L, num_warps=num_warps)
    try:
        k = compile_kernel(name, dtype, arch, BLOCK_T, BLOCK_L, num_warps, flags)
    except Exception as e:  # a compile error is a finding, not a crash of the check
        return Stats(**base, registers=None, spill_bytes=None, stack_bytes=None, shared_bytes=0, ok=False,
                     error=f"{type(e).__name__}: {str(e)[:300]}")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([_ptxas(), f"-arch={target}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    txt = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", txt)
    spill = re.search(r"(\d+) bytes spill stores", txt)
    stack = re.search(r"(\d+) bytes stack frame", txt)
    shared = int(k.metadata.shared)
    st = Stats(**base, registers=int(regs.group(1)) if regs else None,
               spill_bytes=int(spill.group(1)) if spill else None,
               stack_bytes=int(stack.group(1)) if stack else None, shared_bytes=shared, ok=False)
    if res.returncode != 0:
        st.error = txt[-300:]
    elif st.spill_bytes or st.stack_bytes:
        st.error = f"spills {st.spill_bytes} B, stack {st.stack_bytes} B"
    elif shared > SHARED_LIMIT[arch]:
        st.error = f"shared memory {shared} B > {SHARED_LIMIT[arch]} B"
    else:
        st.ok = True
    return st


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first GPU config per kernel and dtype only")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from .triton_scan import gpu_configs

    rows = []
    for name, (_, _, dtypes) in kernels().items():
        for dtype in dtypes:
            cfgs = gpu_configs(name)[:1] if args.quick else gpu_configs(name)
            for arch in ARCHS:
                for bt, bl, w in cfgs:
                    st = compile_stats(name, dtype, arch, bt, bl, w)
                    rows.append(st)
                    print(f"{name:12s} {dtype:5s} sm_{arch} T{bt:<3d} L{bl:<3d} w{w} regs={st.registers} "
                          f"spill={st.spill_bytes} shared={st.shared_bytes} {'ok' if st.ok else 'FAIL ' + st.error}",
                          flush=True)
    if args.out:
        from ..utils.io import write_json_atomic

        write_json_atomic(args.out, [asdict(r) for r in rows])
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)} ok, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
