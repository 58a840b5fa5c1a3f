"""Bad `moelm` input as a careless user gives it: refused with one line naming it, in this process (main())."""
import pytest

from test_cli import in_process

GEN = ("generate", "--model", "/no/such/dir", "--prompt", "hi")


@pytest.mark.parametrize("args,message", [
    (("chat", "--model", "/no/such/dir", "--prompt", "3"), "unrecognized arguments: --prompt 3"),  # no abbreviation
    (("info", "--model", "x", "--quant", "int4"), "unrecognized arguments: --quant int4"),
])
def test_abbreviated_options_are_refused(args, message, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        in_process(args, capsys, monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("args,message", [
    ((*GEN, "--seed", str(2**70)), f"--seed must be in 0..2**64-1, got {2**70}"),
    ((*GEN, "--seed", "-1"), "--seed must be in 0..2**64-1, got -1"),
    (("new", "ernie4_5-tiny", "{tmp}/out", "--seed", "-1"), "--seed must be in 0..2**64-1, got -1"),
    (("new", "ernie9", "{tmp}/f"), "unknown config name 'ernie9'"),
    ((*GEN, "--threads", "100000"), "--threads 100000 is more than the"),
    ((*GEN, "--system", ""), "--system is empty"),
    (("chat", "--model", "/no/such/dir", "--system", ""), "--system is empty"),
    (("prune", "/no/such/dir", "{tmp}/f", "--report", "r.json"), "{tmp}/f exists and is a file"),
    (("info", "--model", "ernie4_5-tiny", "--tp", "0"), "--tp must be at least 1, got 0"),
    (("bench", "--model", "ernie4_5-tiny", "--threads", "0"), "--threads must be at least 1, got 0"),
    (("bench", "--model", "ernie4_5-tiny", "--decode-context", "0"), "--decode-context must be at least 1, got 0"),
    (("bench", "--model", "ernie4_5-tiny", "--batches", "1", "0"), "--batches must be at least 1, got 0"),
    (("bench", "--model", "ernie4_5-tiny", "--device", "tpu"), "unknown --device 'tpu'"),
    (("bench", "--model", "ernie4_5-tiny", "--rounds", "3"), "--rounds is for --full-size runs"),
    (("info", "--model", "ernie4_5-tiny", "--ep", "-1"), "--ep must be at least 1, got -1"),
    (("info", "--model", "ernie4_5-tiny", "--tokens", "0"), "--tokens must be at least 1, got 0"),
    (("quantize", "/no/such/dir", "{tmp}/q", "--quantization", "int8", "--group-size", "128"),
     "--group-size is for --quantization int4"),
])
def test_bad_values_name_the_option(args, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "f").write_text("x")
    args, message = [a.replace("{tmp}", str(tmp_path)) for a in args], message.replace("{tmp}", str(tmp_path))
    code, _, err = in_process(args, capsys, monkeypatch)
    assert code == 1 and err.startswith(f"moelm: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_moelm_cache_that_is_no_directory(kind, tmp_path, capsys, monkeypatch):
    (tmp_path / "f").write_text("x")
    cache = tmp_path / "f" if kind == "file" else tmp_path / "f" / "sub"
    monkeypatch.setenv("MOELM_CACHE", str(cache))
    code, _, err = in_process(GEN, capsys, monkeypatch)
    assert code == 1 and err == f"moelm: error: MOELM_CACHE={cache} is not a writable directory\n", err


def test_ctrl_c_while_the_commands_are_imported(capsys, monkeypatch):
    import moelm.cli

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(moelm.cli, "build_parser", interrupted)  # where Ctrl-C lands in the first seconds
    try:
        code, _, err = in_process(GEN, capsys, monkeypatch)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")
    assert code == 130 and err == "\n"


def test_the_command_starts_before_torch_loads():
    """`import moelm.cli` (what the console script and `python -m moelm.cli` run before main()) loads no torch, so
    a Ctrl-C in the seconds torch takes to load lands in main(): exit 130, no traceback. The exports still work."""
    import subprocess
    import sys
    code = ("import sys, moelm.cli; assert 'torch' not in sys.modules, 'torch'; "
            "from moelm import AutoModelForCausalLM, pipeline; import moelm; moelm.inference.cache; "
            "assert sorted(moelm.__all__) == sorted(n for n in dir(moelm) if n[0].isupper() or n in "
            "('named_config', 'pipeline', 'get_capabilities')), dir(moelm)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args", [["--help"], [], ["generate", "--help"], ["chat", "--help"], ["info", "--help"],
                                  ["quantize", "--help"], ["generate", "--model", "m"]])
def test_help_and_usage_errors_do_not_wait_for_torch(args):
    """`moelm --help`, a command's own --help and a usage error answer without importing torch (seconds on a busy
    machine): only the named command's arguments are built, and these need no torch."""
    import subprocess
    import sys

    code = ("import sys\nfrom moelm.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: moelm" in r.stdout + r.stderr
