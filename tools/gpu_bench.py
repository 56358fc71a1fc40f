"""Run the whole GPU benchmark on a machine with a real GPU.

Checks for the Vulkan loader and a driver and says what is missing, optionally installs wasmchord
from local wheels, then benchmarks the given models (aliases or .gguf paths) on the GPU with the
decode-step profile (`bench --profile`), and llama.cpp in the same run when llama-cpp-python is
importable; writes JSON and markdown.

    python tools/gpu_bench.py [--models A B ...] [--wheels DIR] [--out DIR] [--timestamp-period NS]
"""

import argparse
import ctypes.util
import glob
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


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
    ap.add_argument("--prompt-lengths", default="64,512")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--shader-checks", default=None, help="naga runtime checks: all, bounds or none")
    ap.add_argument("--batch", default="1,2,4,8,16", help="batch engine sweep sizes ('' to skip)")
    ap.add_argument("--sweep-only", action="store_true", help="only the batch sweep (no prefill/decode/profile)")
    ap.add_argument("--temperature", default="0", help="batch sweeps at these temperatures (e.g. 0,0.8)")
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
    lengths = tuple(int(x) for x in a.prompt_lengths.split(","))
    for model in a.models:
        opts = {"shader_checks": a.shader_checks} if a.shader_checks else {}
        res = {}
        if not a.sweep_only:
            res = bench.run(resolve_model(model), device="gpu", prompt_lengths=lengths, n_gen=a.gen_tokens,
                            profile=True, timestamp_period_ns=a.timestamp_period, **opts)
            md.append(f"## {model}\n\n```\n{bench.format_result(res)}\n```\n")
            print(bench.format_result(res), flush=True)
        results["models"][f"{model} {opts}"] = res
        for temp in (float(x) for x in a.temperature.split(",")) if a.batch else ():
            sweep = bench.batch_sweep(resolve_model(model), device="gpu",
                                      batches=tuple(int(x) for x in a.batch.split(",")), temperature=temp, **opts)
            res["batch_sweep" if not temp else f"batch_sweep_t{temp:g}"] = sweep
            md.append(f"```\n{bench.format_sweep(sweep)}\n```\n")
            print(bench.format_sweep(sweep), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text("\n".join(md))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
