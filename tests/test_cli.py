"""The `inferlab` command as a user runs it, and the benchmark's reference workloads."""
from __future__ import annotations

import io
import json
import os
import re
import runpy
import socket
import subprocess
import sys

import pytest
from test_hf_models import build_checkpoint, train_tokenizer

from inferlab.bench import SHAPES, make_workload
from inferlab.cli import build_parser, main
from inferlab.cli_args import with_option_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A verbatim copy of the reference workload generator that every engine is measured with, so the
# check below runs wherever the tests do; where the shared original sits beside the repository,
# the copy is checked against it.
REFERENCE_WORKLOAD = os.path.join(ROOT, "tests", "reference", "workload.py")
SHARED_WORKLOAD = os.path.join(os.path.dirname(ROOT), "shared", "bench", "workload.py")


def inferlab(*args: str, stdin: str | None = None, timeout: int = 180,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferlab.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli(*args, stdin=None) -> (exit status, stdout, stderr) of `inferlab ARGS` run in this process:
    for refusals that come before any model loads, where a fresh interpreter would spend most of
    the test importing torch."""
    def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def test_generate_answers_with_the_embedded_model():
    r = inferlab("generate", "What is the capital of France?", "--num-kv-blocks", "64")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris."
    assert "KV cache: 64 blocks x 16 tokens" in r.stderr  # the pool size is logged at start


def test_generate_with_the_native_kernels_off():
    r = inferlab("generate", "What is the capital of France?", "--num-kv-blocks", "64", env={"INFERLAB_NATIVE": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris."
    assert "kernels: PyTorch; decode steps: op by op" in r.stderr  # the whole generation on the PyTorch path


def test_chat_is_multi_turn_and_streams():
    turns = "What is the capital of France?\nAnd what is 2 + 2?\n/exit\n"
    r = inferlab("chat", "--temperature", "0", "--max-tokens", "30", "--num-kv-blocks", "128", stdin=turns)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert ">>>" not in r.stdout  # piped in: stdout holds the answers alone, as `echo ... | ollama run`


def test_a_chat_line_that_is_not_utf8_is_refused_alone():
    """(It ended the session: the next line was never answered.)"""
    r = subprocess.run([sys.executable, "-m", "inferlab.cli", "chat", "--temperature", "0", "--max-tokens", "8",
                        "--num-kv-blocks", "64"], input=b"caf\xe9\nWhat is the capital of France?\n",
                       capture_output=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert b"error: this line is not UTF-8 text (the conversation is kept)" in r.stderr
    assert b"Paris" in r.stdout


def test_utf8_from_a_terminal_is_text_under_an_ascii_locale(tmp_path):
    """Under LC_ALL=C with UTF-8 mode off, Python reads a terminal's UTF-8 bytes as lone surrogates:
    "café" in a text option, a chat line or a prompt on stdin was refused as no text. A path keeps
    the bytes the OS gave, which is how it opens."""
    from inferlab.model.loader import embedded_model_path
    ascii_locale = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0"}
    r = subprocess.run([sys.executable, "-m", "inferlab.cli", "chat", "--temperature", "0", "--max-tokens", "4",
                        "--num-kv-blocks", "64", "--system", "Tu es très utile."], input="Un café ?\n".encode(),
                       capture_output=True, timeout=180, cwd=ROOT, env=ascii_locale)
    assert r.returncode == 0 and b"error" not in r.stderr, r.stderr
    assert r.stdout.strip()
    model = tmp_path / "modèle.gguf"
    model.symlink_to(embedded_model_path())
    r = subprocess.run([sys.executable, "-m", "inferlab.cli", "generate", "--model", str(model), "--max-tokens", "4",
                        "--num-kv-blocks", "64", "--stop", "é", "-"], input="Un café ?".encode(),
                       capture_output=True, timeout=180, cwd=ROOT, env=ascii_locale)
    assert r.returncode == 0 and b"error" not in r.stderr, r.stderr


def test_an_answer_stdout_cannot_encode_is_escaped_not_an_error():
    r = inferlab("generate", "--raw", "中国的首都是", "--max-tokens", "4", "--num-kv-blocks", "64",
                 env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and "\\u" in r.stdout, r.stderr  # it was "'ascii' codec can't encode", exit 2


def test_a_system_message_that_leaves_no_room_is_refused_at_start(smol):
    """(Every message was refused as too long instead, and a piped chat still exited 0.)"""
    from inferlab.chat import chat_prompt, check_system
    tok, system = smol[1], "rule " * 300
    check_system(tok, "Be brief.", 256)
    with pytest.raises(ValueError, match=r"^--system leaves no room for a message: with one it takes \d+ tokens of "
                                         r"the context of 256; shorten it or raise --max-model-len$"):
        check_system(tok, system, 256)
    fits = chat_prompt(tok, [{"role": "system", "content": system}, {"role": "user", "content": "?"}], 1, 512, 0)[0]
    check_system(tok, system, len(fits["prompt_token_ids"]) + 1)  # the least context that answers


def test_chat_that_outgrows_the_context_forgets_its_oldest_turns():
    turns = "Why is the sky blue?\nAnd why are sunsets red?\n" + "word " * 100 + "\n/exit\n"
    r = inferlab("chat", "--max-model-len", "80", "--max-tokens", "16", "--num-kv-blocks", "64", stdin=turns)
    assert r.returncode == 0, r.stderr
    assert "exchange forgotten; /reset starts over" in r.stderr  # the second question made room
    assert "this message does not fit the context of 80 tokens" in r.stderr


def test_chat_with_a_max_tokens_past_the_context_keeps_the_conversation():
    """The room kept for an answer is at most a quarter of the context: --max-tokens 100000 made every
    turn forget every exchange before it."""
    turns = "My name is Bob.\nWhat is my name?\n"
    r = inferlab("chat", "--max-tokens", "100000", "--max-model-len", "256", "--num-kv-blocks", "32", stdin=turns)
    assert r.returncode == 0, r.stderr
    assert "forgotten" not in r.stderr and len(r.stdout.strip().splitlines()) >= 2


def test_chat_at_a_terminal_prompts_and_takes_two_ctrl_cs_to_quit():
    """One Ctrl-C at the prompt is a slip (it said nothing and ended the chat); /help lists the commands."""
    import pty
    import select
    import signal
    import time
    master, slave = pty.openpty()
    # stderr too: input() without readline writes its prompt there
    proc = subprocess.Popen([sys.executable, "-m", "inferlab.cli", "chat", "--num-kv-blocks", "32"], stdin=slave,
                            stdout=slave, stderr=slave, cwd=ROOT)
    os.close(slave)
    seen = b""

    def wait_for_prompt(count: int) -> None:
        nonlocal seen
        deadline = time.monotonic() + 120
        while seen.count(b">>> ") < count:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
    try:
        wait_for_prompt(1)
        os.write(master, b"/help\n")
        wait_for_prompt(2)
        # a signal between the prompt's write and the read after it is seen only once a line comes:
        # a person's Ctrl-C comes later than that
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        wait_for_prompt(3)  # the chat goes on
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        os.close(master)
    text = seen.decode().replace("\r\n", "\n")
    assert proc.returncode == 0, text
    assert "/reset   forget the conversation" in text and "(Ctrl-C again, Ctrl-D or /exit quits)" in text


def test_generate_reads_the_prompt_from_stdin():
    for dash in (["-"], []):  # no prompt at all: a pipe is read too, as Ollama's `run` reads it
        r = inferlab("generate", *dash, "--num-kv-blocks", "64", stdin="What is the capital of France?\r\n")
        assert r.returncode == 0 and r.stdout.strip() == "The capital of France is Paris.", r.stderr
    # a long document whose answer the context cuts before --max-tokens: said, as the exit status is 0
    r = inferlab("generate", "--raw", "--max-model-len", "320", "--max-tokens", "50", "-", stdin="word " * 300)
    assert r.returncode == 0 and re.search(r"WARNING inferlab: the answer stopped at the end of the context "
                                           r"\(320 tokens: prompt \d+, answer \d+\), before --max-tokens 50", r.stderr)



def test_an_empty_prompt_and_system_with_raw_are_refused(cli):
    for stdin in ("", " \n"):  # an empty pipe: refused, not wrapped in the chat template and answered
        code, _, err = cli("generate", "-", stdin=stdin)
        assert code == 2 and err.strip().splitlines()[-1] == "error: the prompt is empty", err
    code, _, err = cli("generate", "--raw", "--system", "Be a pirate.", "hi")
    assert code == 2 and err.strip().splitlines()[-1] == \
        "error: --system goes into the chat template, which --raw leaves out: use one or the other"


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`inferlab generate ... | head -1`: two BrokenPipeError tracebacks and status 1 before."""
    proc = subprocess.Popen([sys.executable, "-m", "inferlab.cli", "generate", "--num-kv-blocks", "32",
                             "--max-tokens", "200", "--raw", "Write a long poem about the sea:"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_chat_answers_the_readme_question_by_default():
    r = inferlab("chat", "--num-kv-blocks", "64", "--max-tokens", "24", stdin="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert "The capital of France is Paris." in r.stdout


def test_threads_help_says_what_the_default_does():
    r = inferlab("generate", "--help")
    assert "CPU threads for the model (default: the cores other processes leave free" in " ".join(r.stdout.split())


def test_serve_and_bench_take_their_kv_memory_at_start_and_the_other_commands_on_first_use():
    from inferlab.cli import build_parser
    from inferlab.cli_args import engine_config
    parser = build_parser()
    for argv, want in ((["serve"], True), (["serve", "--no-kv-cache-prefault"], False), (["generate", "hi"], False),
                       (["generate", "hi", "--kv-cache-prefault"], True), (["bench"], True),
                       (["bench", "--latency", "--no-kv-cache-prefault"], False)):
        assert engine_config(parser.parse_args(argv)).kv_cache_prefault is want, argv
    for command in (["serve"], ["generate", "hi"], ["bench"], ["chat"]):  # not simulate's alone
        assert engine_config(parser.parse_args([*command, "--sjf-aging-rate", "5"])).sjf_aging_rate == 5.0


@pytest.mark.parametrize("args", [("generate", "hi", "--quantization", "bogus"), ("bogus",),
                                  ("serve", "--port", "abc")])
def test_a_bad_option_is_one_line_naming_the_help(cli, args):
    """argparse printed the whole usage (~33 lines for generate) before its error."""
    code, _, err = cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "error: " in err and "--help)" in err


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads the free memory from Linux's /proc")
def test_a_kv_pool_larger_than_the_free_memory_is_refused_at_start_in_one_line():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    r = inferlab("generate", "hi", "--kv-cache-prefault", "--kv-cache-memory", str(2 * available))
    assert r.returncode == 2
    # past the free memory (prefaulted), or past all of it on a machine with little else running
    assert re.match(r"error: (the KV pool of .* cannot be taken at start|a KV pool of .* is more than the .* GiB of "
                    r"memory this process may use)", r.stderr.strip().splitlines()[-1]), r.stderr


@pytest.mark.parametrize("text, size", [("4294967296", 2**32), ("4e9", 4 * 10**9), ("4GiB", 2**32),
                                        ("512 MiB", 2**29), ("4GB", 4 * 10**9), ("0.5gib", 2**29)])
def test_kv_cache_memory_takes_sizes_as_people_write_them(text, size):
    assert build_parser().parse_args(["generate", "hi", "--kv-cache-memory", text]).kv_cache_memory == size


@pytest.mark.parametrize("text", ["x", "-1", "4 parsecs", "nan"])
def test_a_size_that_is_none_is_refused_by_the_parser(capsys, text):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--kv-cache-memory", text])
    assert f"expected a size in bytes (4e9, 4GiB, 512MiB), got '{text}'" in capsys.readouterr().err


def test_hf_batch_below_one_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--compare", "hf", "--hf-batch", "-1"])
    assert "--hf-batch: expected an integer >= 1, got '-1'" in capsys.readouterr().err


@pytest.mark.parametrize("script, args, message", [
    ("linear_speed.py", ["--rows", "1,-4"], "--rows: expected integers >= 1 separated by commas, got '1,-4'"),
    ("attention_speed.py", ["--layers", "0"], "--layers: expected an integer >= 1, got '0'"),
    ("profile_step.py", ["--seqs", "0"], "--seqs: expected an integer >= 1, got '0'"),
    ("sampling_speed.py", ["--rows", "x"], "--rows: expected an integer >= 1, got 'x'"),
    ("linear_ab.py", ["--before", "x.so", "--shape", "5"], "--shape must be K,N, got 1 numbers"),
    ("kl_divergence.py", ["--mode", "auto:fp32"], "--mode 'auto:fp32': expected quantization[:dtype][+int8]"),
    ("kl_divergence.py", ["--text", "/no/such/text"], "no such file: /no/such/text"),
    ("kl_divergence.py", ["--tokens", "1"], "--tokens must be at least 2"),  # a ZeroDivisionError
    ("linear_speed.py", ["--isa", "nope"], "--isa: unknown ISA 'nope'"),  # tracebacks, these three
    ("attention_speed.py", ["--isa", "nope"], "--isa: unknown ISA 'nope'"),
    ("linear_ab.py", ["--before", "x.so", "--types", "nope"], "--types: 'nope' is not a block type"),
    ("linear_ab.py", ["--before", "x.so", "--types", "q6_K", "--shape", "576,960"],  # a double free
     "--shape: K = 576 does not split into q6_K's blocks of 256"),
    ("attention_speed.py", ["--prefill", "--isa", "generic"], "--prefill: generic has no prefill kernel"),
])
def test_a_benchmarks_bad_option_is_its_usage_line(script, args, message, capsys, monkeypatch):
    path = os.path.join(ROOT, "benchmarks", script)
    monkeypatch.setattr(sys, "argv", [path, *args])
    with pytest.raises(SystemExit) as exit_:  # run in this process (not a traceback)
        runpy.run_path(path, run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err.strip().splitlines()[-1], err


def test_bad_option_is_one_clear_line():
    r = inferlab("generate", "hi", "--temperature", "-1", "--num-kv-blocks", "8")  # (a whole process: logging too)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: --temperature must be in [0, 100], got -1.0"


def test_format_and_grammar_hold_the_answer(tmp_path, cli):
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"enum": ["Paris", "Rome"]}},
                                  "required": ["answer"]}))
    r = inferlab("generate", "--format", str(schema), "--num-kv-blocks", "64", "What is the capital of France?")
    assert r.returncode == 0 and json.loads(r.stdout) == {"answer": "Paris"}, r.stderr
    code, _, err = cli("generate", "--format", "{bad", "hi")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --format: the JSON schema is not valid JSON")
    code, _, err = cli("generate", "--grammar", "start: nothing_defined", "hi")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --grammar: the grammar cannot be compiled")
    code, _, err = cli("generate", "--format", "json", "--grammar", 'root ::= "a"', "hi")
    assert code == 2 and err.strip().splitlines()[-1] == \
        "error: --format and --grammar both constrain the answer: give one"


def test_an_option_is_named_as_typed(cli):
    code, _, err = cli("generate", "hi", "--threads", "0")  # the option typed, not the field it sets (num_threads)
    assert code == 2 and err.strip().splitlines()[-1] == "error: --threads must be >= 1, got 0"


def test_chat_refuses_bad_sampling_options_before_it_loads_the_model(cli):
    """They were read at the first message: with no input, chat exited 0 after its banner."""
    code, _, err = cli("chat", "--max-tokens", "-1", stdin="")
    assert code == 2
    assert err.strip().splitlines() == ["error: --max-tokens must be an integer >= 1, got -1"]


def test_calibrate_refuses_a_folder_for_its_output_before_it_times_anything(cli, tmp_path):
    """It was an IsADirectoryError traceback, after the minutes of timing."""
    code, _, err = cli("calibrate", "--out", str(tmp_path), "--scale", "0.01")
    assert code == 2 and err.strip().splitlines() == [
        f"error: --out {tmp_path} is a folder; give the file to write, e.g. {tmp_path / 'cost_model.json'}"]


def test_the_kernel_builder_command_refuses_an_unknown_option():
    r = subprocess.run([sys.executable, "-m", "inferlab.kernels", "--bogus"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr  # it was ignored, exit 0


def test_fields_named_inside_an_error_become_the_options_the_command_has():
    generate = build_parser().parse_args(["generate", "hi"]).command_parser
    simulate = build_parser().parse_args(["simulate"]).command_parser
    assert with_option_names("the prompt has 9 tokens but max_model_len is 2", generate) == \
        "the prompt has 9 tokens but --max-model-len is 2"
    assert with_option_names("no room: lower kv_cache_memory / num_kv_blocks", generate) == \
        "no room: lower --kv-cache-memory / --num-kv-blocks"
    assert with_option_names("scheduling_policy 'x' is unknown", simulate) == "--policy 'x' is unknown"
    assert with_option_names("scheduling_policy 'x' is unknown", generate) == "--scheduling-policy 'x' is unknown"
    # a path, a file's name, or a field of a trace file (no engine setting) stays as it is
    assert with_option_names("/tmp/max_model_len.gguf: no such file, nor my_field", generate) == \
        "/tmp/max_model_len.gguf: no such file, nor my_field"
    assert with_option_names("cannot read trace num_requests.jsonl: line 1: prefix_len must be between 0 and "
                             "prompt_len (10)", simulate) == \
        "cannot read trace num_requests.jsonl: line 1: prefix_len must be between 0 and prompt_len (10)"
    assert with_option_names("max_model_len.gguf is cut short", generate) == "max_model_len.gguf is cut short"
    assert with_option_names("lower num_kv_blocks.", generate) == "lower --num-kv-blocks."


def test_an_unknown_option_is_named_by_its_command_and_v_follows_it_too(cli):
    r = inferlab("generate", "hi", "--bogus")  # (one whole process: the program's name as a user sees it)
    assert r.returncode == 2 and r.stderr.strip() == \
        "inferlab generate: error: unrecognized arguments: --bogus (see inferlab generate --help)"
    assert build_parser().parse_args(["generate", "hi", "-v"]).verbose
    code, _, err = cli("bench", "--num-prompts", "4")  # vLLM's option: its value is not taken for bench's mode
    assert code == 2 and err.strip() == "inferlab bench: error: '4' is not a mode of this command " \
        "(serve is); if it is an option's value, that option is unknown (see inferlab bench --help)"
    assert build_parser().parse_args(["-v", "generate", "hi"]).verbose
    code, _, err = cli("--threads", "2", "generate", "hi")  # before the command: not the command's missing prompt
    assert code == 2 and err.strip() == "inferlab: error: unrecognized arguments: --threads " \
        "(options of a command go after it) (see inferlab --help)"
    with pytest.raises(SystemExit) as version_exit:  # argparse's abbreviations stand: --verb is --verbose
        main(["--verb", "--version"])
    assert version_exit.value.code == 0
    with pytest.raises(SystemExit) as help_exit:  # -vh is -v -h: help, not an unknown option
        main(["-vh"])
    assert help_exit.value.code == 0
    r = inferlab("--version")
    assert r.returncode == 0 and re.fullmatch(r"inferlab \S+\n", r.stdout), r.stdout + r.stderr
    assert not build_parser().parse_args(["generate", "hi"]).verbose


@pytest.mark.parametrize("command, extra", [
    ("serve", ["--model", "{tmp}/none.gguf"]), ("router", ["--backend", "http://127.0.0.1:1"]),
    ("scope", ["--replay", "{tmp}/none.jsonl"]),
])
def test_a_port_another_server_holds_is_one_line_before_the_model_loads(tmp_path, capsys, command, extra):
    """(A model that does not exist: the port's error, not the model's, shows the port is tried first.)"""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main([command, "--port", str(port), *(x.format(tmp=tmp_path) for x in extra)]) == 2
    assert capsys.readouterr().err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize("port", ["99999", "-5", "http"])
def test_a_port_out_of_range_is_refused_by_the_parser(capsys, port):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", port])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"argument --port: expected a port number in [0, 65535], got '{port}'" in err[0]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_builtin_workloads_equal_the_reference(name):
    out = subprocess.run([sys.executable, REFERENCE_WORKLOAD, name], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == make_workload(name)


def test_reference_copy_is_the_shared_original():
    if not os.path.exists(SHARED_WORKLOAD):
        pytest.skip(f"no shared original at {SHARED_WORKLOAD} to compare the copy with")
    with open(SHARED_WORKLOAD, "rb") as shared, open(REFERENCE_WORKLOAD, "rb") as copy:
        assert copy.read() == shared.read()


def test_bench_prints_json_last_line(tmp_path):
    wl = {"name": "tiny", "requests": [{"prompt_token_ids": list(range(100, 140)), "max_tokens": 6},
                                       {"prompt_token_ids": list(range(200, 230)), "max_tokens": 4}]}
    path = tmp_path / "wl.json"
    path.write_text(json.dumps(wl))
    r = inferlab("bench", "--workload", str(path), "--no-progress", "--num-kv-blocks", "64",
                 "--scheduling-policy", "sjf")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["requests"] == 2 and result["prompt_tokens"] == 70 and result["output_tokens"] == 10
    assert result["scheduling_policy"] == "sjf"
    assert result["output_tok_s"] > 0 and result["seconds"] > 0


@pytest.mark.parametrize("command", [["generate", "hi"], ["bench", "--workload", "{wl}", "--no-progress"],
                                     ["bench", "--latency", "--input-len", "4", "--output-len", "2"]])
def test_a_request_the_engine_fails_is_one_line_and_status_1(command, tmp_path, monkeypatch, capsys):
    """The engine outlives a request it fails (an error output); the command whose answer or figure
    that makes wrong says so and exits 1 (it printed nothing, or a benchmark's figures, and exited 0)."""
    import inferlab.runner as runner_mod

    def sample(logits, reqs, eos):
        raise RuntimeError("boom")

    (tmp_path / "wl.json").write_text(json.dumps({"requests": [{"prompt_token_ids": [5, 6, 7], "max_tokens": 3}]}))
    monkeypatch.setattr(runner_mod, "sample", sample)
    assert main([arg.format(wl=tmp_path / "wl.json") for arg in command] + ["--num-kv-blocks", "16"]) == 1
    out, err = capsys.readouterr()
    assert re.search(r"^error: 1 of 1 requests failed \(the first, .*: RuntimeError: boom\)$", err, re.M), err
    assert "output_tok_s" not in out and "tpot_ms" not in out


@pytest.mark.parametrize("content, message", [
    ({"requests": [{"prompt_token_ids": [1, 2, 3]}]},
     "{path}: request 0: max_tokens must be an integer >= 1, got None"),
    ({"requests": [{"prompt_token_ids": [1], "max_tokens": 2}, {"max_tokens": 3}]},
     "{path}: request 1: prompt_token_ids must be a non-empty list of token ids"),
    ({"requests": [{"prompt_token_ids": [1, "a"], "max_tokens": 3}]}, "{path}: request 0: prompt_token_ids must be"),
    ({"requests": [{"prompt_token_ids": [1], "max_tokens": 3, "ignore_eos": "no"}]},
     "{path}: request 0: ignore_eos must be true or false, got 'no'"),
    ({"requests": [5]}, "{path}: request 0: expected an object, got int"),
    ({"requests": []}, "{path}: expected .*, at least one"),  # an all-zero result, exit 0, before
    ("not json", "cannot read workload {path}: Expecting value"),
    (None, "cannot read workload {path}: .*Is a directory"),
])
def test_a_bad_workload_file_is_one_line_naming_it_before_the_model_loads(tmp_path, capsys, content, message):
    path = tmp_path / "wl.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    # a model that does not exist: the workload's error, not the model's, shows it is read first
    assert main(["bench", "--workload", str(path), "--model", str(tmp_path / "none.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match("error: " + message.format(path=re.escape(str(path))), err), err


def test_bench_latency_times_every_prefill_step_of_a_long_prompt(tiny, monkeypatch):
    """A prompt longer than a step's token budget is prefilled in several steps, and its first token
    comes with the last: the time to first token covers them all (it once timed the first step only)."""
    from types import SimpleNamespace

    from inferlab import LLM, bench
    llm = LLM(loaded=tiny, max_num_batched_tokens=32, long_prefill_token_threshold=32, num_kv_blocks=64, block_size=4)
    clock, step = [0.0], llm.engine.step

    def one_second_step():
        clock[0] += 1.0
        return step()
    monkeypatch.setattr(llm.engine, "step", one_second_step)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    out = bench.run_latency(llm, input_len=100, output_len=3, repeats=1)
    assert out["ttft_ms"] == 4000  # 32 + 32 + 32 + 4 prompt tokens
    assert out["tpot_ms"] == 1000  # then one token a step


@pytest.mark.parametrize("args, message", [
    (["--output-len", "1"], "--latency needs --input-len >= 1 and --output-len >= 2"),  # it printed 170,532 tok/s
    (["--input-len", "0"], "--latency needs --input-len >= 1"),
    (["--workload", "nano"], "--workload is for a workload run, not --latency"),  # silently ignored before
    (["--compare", "hf"], "--compare is for a workload run, not --latency"),
])
def test_latency_refuses_what_it_would_ignore_or_cannot_time(tmp_path, capsys, args, message):
    assert main(["bench", "--latency", *args, "--model", str(tmp_path / "none.gguf")]) == 2  # before the model
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_an_output_file_that_cannot_be_written_or_is_an_input_is_refused_before_the_model(tmp_path, capsys):
    """(bench --workload w.json --record w.json replaced the workload with a trace; a missing folder was
    found after the model loaded, or after calibrate's minutes of timing.)"""
    wl = tmp_path / "w.json"
    wl.write_text(json.dumps({"requests": [{"prompt_token_ids": [1, 2, 3], "max_tokens": 2}]}))
    none = str(tmp_path / "none.gguf")
    for args, message in [(["bench", "--workload", str(wl), "--record", str(wl)], "is the run's input file too"),
                          (["bench", "--record", str(tmp_path / "no" / "t.jsonl")], "cannot write it"),
                          (["generate", "hi", "--record", str(tmp_path)], "is not a file to write"),
                          (["calibrate", "--out", str(tmp_path / "no" / "cm.json")], "cannot write it")]:
        assert main([*args, "--model", none]) == 2
        assert message in capsys.readouterr().err, args
    assert json.loads(wl.read_text())["requests"]


@pytest.mark.parametrize("args, message", [
    (["--input-len", "64"], "--input-len is for --latency: a workload gives each request's lengths"),
    (["--output-len", "8"], "--output-len is for --latency"),
    (["--hf-batch", "4"], "--hf-batch is for --compare hf"),
    (["--hf-mode", "sequential"], "--hf-mode is for --compare hf"),
])
def test_a_workload_run_refuses_the_options_it_would_ignore(tmp_path, capsys, args, message):
    assert main(["bench", *args, "--model", str(tmp_path / "none.gguf")]) == 2  # before the model
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_latency_longer_than_a_request_may_be_is_refused(capsys):
    """(It was capped, and the figure printed the output_len asked for.)"""
    assert main(["bench", "--latency", "--input-len", "8", "--output-len", "100", "--max-model-len", "32",
                 "--num-kv-blocks", "64", "--threads", "1"]) == 2
    assert "--input-len 8 + --output-len 100 is more than the 32 tokens" in capsys.readouterr().err


def test_bench_latency_and_compare_hf(tmp_path):
    r = inferlab("bench", "--latency", "--input-len", "16", "--output-len", "4", "--num-kv-blocks", "64",
                 "--record", str(tmp_path / "lat.jsonl"))
    assert r.returncode == 0, r.stderr
    lat = json.loads(r.stdout.strip().splitlines()[-1])
    assert lat["input_len"] == 16 and lat["output_len"] == 4 and lat["ttft_ms"] > 0 and lat["tpot_ms"] > 0
    from inferlab.scope.recorder import read_trace
    assert len(read_trace(str(tmp_path / "lat.jsonl"))[1]) >= 4  # --record was ignored with --latency before
    # the comparison itself on a tiny checkpoint: loading the embedded GGUF into transformers alone
    # takes a minute here, and the hf_parity tests already compare that model with transformers
    model = build_checkpoint("llama", str(tmp_path / "tiny"), train_tokenizer()).path
    path = tmp_path / "wl.json"
    path.write_text(json.dumps({"requests": [{"prompt_token_ids": list(range(100, 120)), "max_tokens": 3}]}))
    r = inferlab("bench", "--model", model, "--workload", str(path), "--no-progress", "--num-kv-blocks", "64",
                 "--compare", "hf", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    both = json.loads(r.stdout.strip().splitlines()[-1])
    assert both["hf"]["output_tokens"] == both["inferlab"]["output_tokens"] == 3
    assert both["hf"]["dtype"] == both["inferlab"]["dtype"] == "float32"
    assert both["speedup"] == round(both["inferlab"]["output_tok_s"] / both["hf"]["output_tok_s"], 2)


def test_generate_says_when_a_model_has_no_chat_template(tmp_path):
    """A folder without one sends the prompt as raw text: said, and with it a --system left out."""
    model = build_checkpoint("llama", str(tmp_path / "plain"), train_tokenizer()).path
    os.remove(os.path.join(model, "tokenizer_config.json"))
    r = inferlab("generate", "hello", "--model", model, "--system", "Be brief.", "--max-tokens", "2",
                 "--num-kv-blocks", "16")
    assert r.returncode == 0, r.stderr
    assert "no chat template: the prompt goes in as raw text, without the --system message" in r.stderr
    r = inferlab("generate", "hello", "--model", model, "--raw", "--max-tokens", "2", "--num-kv-blocks", "16")
    assert r.returncode == 0 and "chat template" not in r.stderr


def test_an_answer_streaming_where_the_log_goes_is_not_cut_by_info_lines(monkeypatch, capsys):
    """The thread governor's INFO line used to land inside a streamed answer on a terminal (or with
    `2>&1`): it now comes after the answer's line; warnings still show at once, and where the log
    goes elsewhere nothing is held."""
    import logging
    from types import SimpleNamespace

    from inferlab import chat
    from inferlab.logger import setup_logging

    log = setup_logging()
    monkeypatch.setattr(log, "level", logging.INFO)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)

    class Engine:
        def add_request(self, *args):
            pass

        def has_unfinished_requests(self):
            return not hasattr(self, "done")

        def step(self):
            log.info("other processes keep 1.0 cores busy")
            log.warning("a real problem")
            delta = next(words, None)
            if delta is None:
                self.done = True
                return []
            seen.append(delta)
            return [SimpleNamespace(error=None, finished=False, outputs=[SimpleNamespace(new_text=delta)])]

    try:
        for shared in (True, False):
            words = iter(["The capital", " is Paris."])
            seen.clear()
            monkeypatch.setattr(chat, "_one_screen", lambda shared=shared: shared)
            assert chat.stream(Engine(), "r", "p", None) == "The capital is Paris."
            assert capsys.readouterr().out == "The capital is Paris.\n"
            info = "other processes keep 1.0 cores busy"
            assert seen.count(info) == 3 and seen.count("a real problem") == 3
            if shared:  # the answer's words first, the held lines after; warnings where they came
                assert seen == ["a real problem", "The capital", "a real problem", " is Paris.", "a real problem"] + \
                    [info] * 3
            else:
                assert seen[:3] == [info, "a real problem", "The capital"]
    finally:
        log.removeHandler(handler)
