"""Reading a Triton kernel compiled for an NVIDIA GPU, on a machine without one: registers,
stack frame and spills from ptxas's own log, registers again from the binary (``cuobjdump
-res-usage``), shared memory and warps from Triton's metadata, resident blocks and occupancy,
SASS instructions (from the binary's section sizes), 64-bit integer divisions in the PTX; and
the tables of every specialization that ``make aot`` writes (``bench/results/aot-sm*.md``).

``tests/gpu_compile.py`` compiles the kernels; ``bench/costmodel.py`` reads them too.
"""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import tempfile
import traceback
from typing import Dict, List

import triton
from triton.runtime.jit import JITFunction

# The architectures compiled for, with what bounds a kernel there (CUDA occupancy data:
# 64K registers, 64 warps and 32 blocks per SM on both; shared memory per SM and the most one
# block may take; 1 KiB of each block's shared memory is reserved by the system).
ARCHS = {
    90: dict(name="sm_90", gpus="H100/H200", smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
    80: dict(name="sm_80", gpus="A100", smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
}
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED_PER_BLOCK = 1024
GRID_LIMITS = (2**31 - 1, 65535, 65535)

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


# --------------------------------------------------------------------------------------------
# Reading a compiled kernel
# --------------------------------------------------------------------------------------------

def tool(name, cubin: bytes, *flags) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(TOOLS, name), *flags, f.name], check=True,
                              capture_output=True, text=True).stdout


def sass_instructions(cubin: bytes) -> int:
    """The kernel's SASS instructions, counted from the cubin's ELF section headers: every
    instruction since sm_70 is 16 bytes, so a ``.text.<kernel>`` section holds size / 16 of
    them (the count ``cuobjdump -sass`` lists, trailing NOPs and all, without its 0.7 s of
    disassembly a kernel)."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise ValueError("not a little-endian ELF64 cubin")
    section_headers, = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, section_headers + i * entry_size)
               for i in range(count)]
    names_offset = headers[names_index][4]

    def name(header):
        start = names_offset + header[0]
        return cubin[start:cubin.index(b"\0", start)]

    sizes = [header[5] for header in headers if name(header).startswith(b".text.")]
    if len(sizes) != 1 or sizes[0] % 16:
        raise ValueError(f"expected one .text section of whole instructions, got sizes {sizes}")
    return sizes[0] // 16


def resident_blocks(regs: int, warps: int, smem: int, arch: int) -> int:
    """Blocks of this kernel that fit on one SM at once (registers, warps, shared memory)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_warps = MAX_WARPS_PER_SM // warps
    by_smem = (ARCHS[arch]["smem_per_sm"] // (smem + SMEM_RESERVED_PER_BLOCK) if smem
               else MAX_BLOCKS_PER_SM)
    return min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM)


def describe_specialization(src) -> str:
    """What distinguishes one specialization: pointer dtypes, 64-bit ints, arguments
    specialized to 1, and the constexpr values."""
    signature = src.signature
    names = list(signature)
    constants = {names[path[0]]: value for path, value in src.constants.items()}
    pointers = sorted({t for t in signature.values() if t.startswith("*") and t != "*i64"})
    wide = [n for n, t in signature.items() if t in ("i64", "u64")]
    divisible = [names[path[0]] for path, attrs in src.attrs.items()
                 if ["tt.divisibility", 16] in [list(a) for a in attrs]
                 and not signature[names[path[0]]].startswith("*")]
    ones = [n for n, t in signature.items() if t == "constexpr" and constants.get(n) == 1
            and not n.isupper()]
    flags = [f"{n}={_short(v)}" for n, v in constants.items() if n.isupper() and n != "BLOCK"]
    parts = ["/".join(p[1:] for p in pointers) or "-"]
    if wide:
        parts.append("i64: " + ",".join(wide))
    if ones:
        parts.append("=1: " + ",".join(ones))
    if divisible:
        parts.append("div16: " + ",".join(divisible))
    return " ".join(parts + flags)


def _short(value) -> str:
    text = str(value)
    return {"True": "1", "False": "0"}.get(text, text.replace("triton.language.", "")
                                           .replace("float", "f"))


def ptxas_account(log: str) -> dict:
    """Registers, stack frame and spills as ptxas reported them when it assembled the kernel."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    if not frame or not regs:
        raise RuntimeError(f"no ptxas account of the kernel in: {log!r}")
    return {"ptxas_registers": int(regs.group(1)), "stack_frame_bytes": int(frame.group(1)),
            "spill_store_bytes": int(frame.group(2)), "spill_load_bytes": int(frame.group(3))}


def inspect_kernel(compiled, arch: int, ptxas_log: str) -> dict:
    """Resource usage of one compiled kernel."""
    cubin = compiled.asm["cubin"]
    usage = tool("cuobjdump", cubin, "-res-usage")
    regs = int(re.search(r"\bREG:(\d+)", usage).group(1))
    ptx = compiled.asm["ptx"]
    warps = compiled.metadata.num_warps
    smem = compiled.metadata.shared
    blocks = resident_blocks(regs, warps, smem, arch)
    return {
        **ptxas_account(ptxas_log),
        "registers": regs,
        "shared_bytes": smem,
        "num_warps": warps,
        "resident_blocks": blocks,
        "occupancy": blocks * warps / MAX_WARPS_PER_SM,
        "sass_instructions": sass_instructions(cubin),
        "div64": len(re.findall(r"\b(?:div|rem)(?:\.[a-z]+)*\.[su]64\b", ptx)),
    }


def listed_sass_instructions(cubin: bytes) -> int:
    """The instructions ``cuobjdump -sass`` lists (``sass_instructions``'s check)."""
    return len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+[A-Z@!][^;]*;", tool("cuobjdump", cubin, "-sass")))


def specializations(launches: list, ptxas_logs: Dict[str, str]) -> List[dict]:
    """One row per distinct (kernel, architecture, compiled binary), with the cases using it;
    the first row of each architecture also has the SASS instructions as ``cuobjdump -sass``
    lists them (``sass_listed``)."""
    rows: Dict[tuple, dict] = {}
    for launch in launches:
        for arch, compiled in launch.compiled.items():
            if isinstance(compiled, Exception):
                key = (launch.kernel, arch, "error:" + repr(compiled))
                row = rows.setdefault(key, {
                    "kernel": launch.kernel, "arch": ARCHS[arch]["name"], "hash": None,
                    "specialization": "?", "error": "".join(
                        traceback.format_exception_only(type(compiled), compiled))[-2000:],
                    "cases": [], "max_grid": [0, 0, 0]})
            else:
                key = (launch.kernel, arch, compiled.hash)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = {
                        "kernel": launch.kernel, "arch": ARCHS[arch]["name"],
                        "hash": compiled.hash[:12],
                        "specialization": describe_specialization(compiled.src),
                        "error": None, "cases": [], "max_grid": [0, 0, 0],
                        **inspect_kernel(compiled, arch, ptxas_logs.get(compiled.hash, ""))}
                    same_arch = [r for r in rows.values() if r["arch"] == row["arch"]]
                    if not any("sass_listed" in r for r in same_arch):
                        row["sass_listed"] = listed_sass_instructions(compiled.asm["cubin"])
            if launch.case not in row["cases"]:
                row["cases"].append(launch.case)
            grid = list(launch.grid) + [1] * (3 - len(launch.grid))
            row["max_grid"] = [max(a, b) for a, b in zip(row["max_grid"], grid)]
    return sorted(rows.values(), key=lambda r: (r["arch"], r["kernel"], r["specialization"]))


def kernels_defined() -> List[str]:
    """Every launchable kernel of ``distill_fused.kernels`` (a ``JITFunction`` named
    ``*_kernel``)."""
    import importlib
    import pkgutil

    import distill_fused.kernels as package
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"distill_fused.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                names.add(value.fn.__name__)
    return sorted(names)


# --------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("kernel", "specialization", "registers", "spilled B", "stack B", "shared B",
                 "warps", "blocks/SM", "occupancy", "SASS instr.", "64-bit div", "largest grid")


def table(report: dict, arch_name: str) -> str:
    """The markdown table of one architecture's specializations."""
    arch = next(a for a in ARCHS.values() if a["name"] == arch_name)
    lines = [
        f"# Triton kernels compiled ahead of time for {arch_name} ({arch['gpus']})",
        "",
        f"Written by `make aot` (`tests/gpu_compile.py`) with triton {report['triton']} and "
        f"torch {report['torch']}, on a",
        "machine without a GPU; `tests/test_gpu_compile.py` compiles the same specializations "
        "in CI and",
        "checks this file against them. One row per distinct compiled kernel over every case "
        "of a training",
        "step (user and long shapes, every input dtype, both FFT groupings, target gradient, "
        "kl_weight 0,",
        "the modular path, the `create_stft_loss` module, a `torch.compile`d step).",
        "",
        "*specialization*: pointer dtypes, 64-bit ints (`i64`), arguments specialized to 1 "
        "(`=1`) and to",
        "multiples of 16 (`div16`), constexpr flags. *spilled B*: spill stores + loads and "
        "*stack B*: stack",
        "frame per thread, as ptxas reports them. *blocks/SM*: resident programs by registers, "
        "warps and",
        "shared memory. *64-bit div*: 64-bit integer divisions and remainders in the PTX (each "
        "a call to a",
        "division routine in SASS). *largest grid*: over the cases.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(TABLE_COLUMNS) - 2)) + "|",
    ]
    for row in report["specializations"]:
        if row["arch"] != arch_name or row["error"]:
            continue
        spills = row["spill_store_bytes"] + row["spill_load_bytes"]
        grid = " x ".join(str(g) for g in row["max_grid"] if g) or "1"
        lines.append("| " + " | ".join(str(v) for v in (
            f"`{row['kernel']}`", row["specialization"], row["registers"], spills,
            row["stack_frame_bytes"], row["shared_bytes"], row["num_warps"], row["resident_blocks"],
            f"{row['occupancy']:.0%}", row["sass_instructions"], row["div64"], grid)) + " |")
    return "\n".join(lines) + "\n"


def table_path(directory: str, arch_name: str) -> str:
    return os.path.join(directory, f"aot-{arch_name.replace('_', '')}.md")
