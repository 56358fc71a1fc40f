"""The command line: info output, and bad input as one line on stderr with exit code 2."""

import json
import socket
import subprocess
import sys

from wasmchord.cli import build_parser
from wasmchord.cli.run import sampling_options
from wasmchord.sampling import OPTIONS, SamplingParams


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "wasmchord", *args], capture_output=True, text=True, **kw)


def test_info_on_alias_shows_architecture_and_types(smollm2_path):
    r = run("info", "smollm2-135m-instruct")
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "Q4_1 x210" in r.stdout and "layers         30" in r.stdout
    assert "134,515,008" in r.stdout


def test_info_tensors_lists_every_tensor(gemma_path):
    r = run("info", str(gemma_path), "--tensors")
    assert r.returncode == 0, r.stderr
    assert "token_embd.weight" in r.stdout and "blk.17.ffn_down.weight" in r.stdout
    assert r.stdout.count("blk.") == 18 * 13  # 13 tensors per gemma3 block
    j = run("info", str(gemma_path), "--tensors", "--metadata", "--json")
    d = json.loads(j.stdout)
    assert len(d["tensors"]) == d["tensor_count"] == 2 + 18 * 13  # and output_norm, token_embd
    assert {"token_embd.weight", "blk.17.ffn_down.weight"} <= {t["name"] for t in d["tensors"]}
    assert d["metadata"]["general.architecture"] == "gemma3"
    assert d["metadata"]["tokenizer.ggml.scores"]["items"] == d["vocab_size"]
    text = run("info", str(gemma_path), "--metadata").stdout
    assert "np.float32" not in text and "np.int32" not in text  # plain numbers, as JSON writes them


def test_bad_path_is_one_line_on_stderr_exit_2(tmp_path):
    r = run("info", str(tmp_path / "missing.gguf"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "missing.gguf" in r.stderr and "Traceback" not in r.stderr


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"hello world, not gguf")
    r = run("info", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "magic" in r.stderr and "Traceback" not in r.stderr


def test_every_sampling_option_is_a_flag_with_the_library_default():
    for command in ("generate", "chat"):
        a = build_parser().parse_args([command, "m", "--presence-penalty", "0.5", "--frequency-penalty", "0.25"])
        opts = sampling_options(a)
        assert SamplingParams.from_options({k: opts[k] for k in OPTIONS}) == \
            SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)


def test_unknown_alias_for_pull():
    r = run("pull", "no-such-model")
    assert r.returncode == 2 and "unknown model alias" in r.stderr


def test_activations_flag_reaches_the_cpu_backend_and_is_refused_for_the_gpu():
    from wasmchord.cli.run import backend_options
    from wasmchord.errors import BackendError
    import pytest
    for command in ("generate", "chat", "serve", "bench"):
        a = build_parser().parse_args([command, "m", "--backend", "cpu", "--activations", "int8"])
        assert backend_options(a) == {"activations": "int8"}
        assert backend_options(build_parser().parse_args([command, "m"])) == {}
    a = build_parser().parse_args(["generate", "m", "--backend", "gpu", "--activations", "f32"])
    with pytest.raises(BackendError, match="--activations"):
        backend_options(a)
    r = run("generate", "m", "--activations", "int4")
    assert r.returncode == 2 and "int4" in r.stderr and "Traceback" not in r.stderr


def test_the_first_compilation_of_a_cpu_kernel_is_announced_once(capsys):
    """A kernel's first compilation on a machine takes seconds: the CLI says so once on stderr, for the
    kernels of a prompt or a token (not load's small ones), and not on the GPU backend."""
    import argparse

    from numba import njit

    from wasmchord.cli import _compile_notice

    def kernel(name):  # a new function each time: numba compiles it at its first call
        def f(x):
            return x + 1
        f.__name__ = f.__qualname__ = name
        return njit(f)

    with _compile_notice(argparse.Namespace(backend="cpu")):
        kernel("transpose")(1)
        assert capsys.readouterr().err == ""
        kernel("matvec")(1)
        kernel("decode_attention")(1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compiling the CPU kernels" in err
    with _compile_notice(argparse.Namespace(backend="gpu")):
        kernel("matvec")(1)
    assert capsys.readouterr().err == ""


def test_generate_reads_the_prompt_from_stdin():
    args = ("generate", "smollm2-135m-instruct", "-n", "4", "--temperature", "0", "--backend", "cpu", "--raw")
    piped = run(*args[:2], "-", *args[2:], input="The capital of France is")
    given = run(*args[:2], "The capital of France is", *args[2:])
    assert piped.returncode == given.returncode == 0, piped.stderr + given.stderr
    assert piped.stdout == given.stdout and piped.stdout.strip()


def test_chat_at_a_terminal_survives_an_error_and_knows_its_commands():
    """At a terminal (stdin a pty): a turn that does not fit the context is an error line, not the end
    of the session; an unknown /command is not sent to the model; /exit ends it with status 0."""
    import os
    import time
    main, tty = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "wasmchord", "chat", "smollm2-135m-instruct", "--backend", "cpu",
                             "--context-length", "48", "-n", "4", "--temperature", "0"],
                            stdin=tty, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(tty)
    try:
        for line in ("word " * 60, "/frobnicate", "Hi", "/exit"):
            os.write(main, (line + "\n").encode())
            time.sleep(0.2)
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "the context holds 48" in err and "(/reset starts over)" in err
    assert "unknown command /frobnicate" in err
    assert out.strip()  # the turn after the error was answered
    assert "Traceback" not in err


def test_bench_checks_its_json_path_before_running(tmp_path):
    r = run("bench", "smollm2-135m-instruct", "--backend", "cpu", "--json", str(tmp_path / "no" / "x.json"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--json" in r.stderr and "x.json" in r.stderr
    r = run("bench", "smollm2-135m-instruct", "--backend", "cpu", "--json", "/proc/x.json")  # not writable
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'/proc/x.json'" in r.stderr, r.stderr
    assert ".partial" not in r.stderr  # our temporary is not the user's business


def test_bench_batch_sweep_runs_each_batch_size_against_one_by_one(tmp_path):
    out = tmp_path / "sweep.json"
    r = run("bench", "smollm2-135m-instruct", "--backend", "cpu", "--batch", "1,3", "--gen-tokens", "6",
            "--json", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 3]
    assert all(row["same_tokens"] and row["tokens"] > 0 and row["aggregate_tok_s"] > 0 for row in rows)
    assert "agg tok/s" in r.stdout and "same tokens" in r.stdout


def test_bench_batch_sweep_samples_at_a_temperature(tmp_path):
    out = tmp_path / "sweep.json"
    r = run("bench", "smollm2-135m-instruct", "--backend", "cpu", "--batch", "2", "--gen-tokens", "4",
            "--temperature", "0.8", "--json", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["temperature"] == 0.8 and [row["batch"] for row in res["rows"]] == [2]
    assert res["rows"][0]["tokens"] > 0 and res["rows"][0]["same_tokens"] is None  # draws are not compared
    assert "temperature 0.8" in r.stdout


def test_a_bad_sampling_flag_is_named_as_the_flag_before_loading():
    for flags, said in ((["-n", "0"], "-n/--max-tokens 0: expected an integer >= 1"),
                        (["--seed", "-1"], "--seed -1: expected an integer >= 0"),
                        (["--top-p", "2"], "--top-p 2.0: expected a value in (0, 1]"),
                        (["--stop", ""], "--stop '': expected a non-empty string")):
        for command in ("generate", "chat"):
            r = run(command, "/nonexistent.gguf", *(["hi"] if command == "generate" else []), "--backend", "cpu",
                    *flags, timeout=60, input="")
            assert r.returncode == 2 and r.stderr == f"wasmchord: error: {said}\n", (command, r.stderr)


def test_generate_with_only_a_model_asks_for_the_prompt(smollm2_path):
    for model in ("smollm2-135m-instruct", str(smollm2_path)):
        r = run("generate", model, "--backend", "cpu", timeout=60)
        assert r.returncode == 2 and "is a model: give the prompt too" in r.stderr and r.stdout == ""


def test_bench_refuses_a_context_length_it_would_not_use():
    r = run("bench", "smollm2-135m-instruct", "--backend", "cpu", "--context-length", "8", timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--prompt-lengths" in r.stderr


def test_serve_checks_its_numbers_before_loading():
    for flag, value in (("--slots", "0"), ("--max-queue", "-1"), ("--prefill-chunk", "0"), ("--port", "70000"),
                        ("--context-length", "1")):
        r = run("serve", "smollm2-135m-instruct", "--backend", "cpu", flag, value, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"{flag} {value}" in r.stderr, r.stderr


def test_serve_that_cannot_listen_or_load_says_why_in_a_line_and_exits_2(tmp_path, smollm2_path):
    """Not a traceback and a server answering 500 for ever (a load that fails), nor uvicorn's exit 3
    (an address in use, a host that does not resolve)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("serve", "smollm2-135m-instruct", "--backend", "cpu", "--port", str(port), timeout=60)
        assert r.returncode == 2 and r.stderr == f"wasmchord: error: cannot listen on 127.0.0.1:{port}: " \
                                                 "Address already in use\n", r.stderr
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_path.read_bytes()[:5_000_000])
    for model, needle in ((str(tmp_path / "none.gguf"), "none.gguf: no such file"),
                          (str(cut), "extends past the end of the file")):
        r = run("serve", model, "--backend", "cpu", "--port", "0", timeout=120)
        lines = r.stderr.splitlines()
        assert r.returncode == 2 and lines[-1].startswith("wasmchord: error: ") and needle in lines[-1], r.stderr
        assert all(line.startswith("wasmchord: ") for line in lines), r.stderr  # no traceback, no log records
