"""The CLI's bad arguments: exit status 2 and a message naming the argument, before any work."""
import pytest

from conftest import HAS_CUDA

CLI_CASES = [
    # (argv, words that stderr must contain); every case exits with status 2, before any work
    ([], ["required", "command"]),
    (["frobnicate"], ["invalid choice", "frobnicate"]),
    (["info", "--verbose"], ["unrecognized arguments", "--verbose"]),
    (["demo", "--steps", "ten"], ["--steps", "invalid int value", "ten"]),
    (["demo", "--steps", "1", "--no-plot", "--no-progress"], ["--steps must be >= 2, got 1"]),
    (["demo", "--codebook-size", "1", "--no-plot", "--no-progress"], ["--codebook-size must be >= 2, got 1"]),
    (["demo", "--quick", "--codebook-size", "100000", "--no-plot", "--no-progress"], ["--codebook-size 100000", "too large"]),
    (["demo", "--device", "tpu"], ["--device", "invalid choice", "tpu"]),
    (["demo", "--stages", "3", "--no-plot", "--no-progress"], ["--stages needs --residual"]),
    (["demo", "--residual", "--stages", "0", "--no-plot", "--no-progress"], ["--stages must be >= 1, got 0"]),
    (["demo", "--residual", "--codebook-size", "512", "--no-plot", "--no-progress"], ["--codebook-size 512", "--residual"]),
    (["diagnose"], ["required", "checkpoint"]),
    (["diagnose", "no_such_file.pt"], ["checkpoint 'no_such_file.pt' does not exist"]),
    (["diagnose", "x.pt", "--metric", "dot"], ["--metric", "invalid choice", "dot"]),
    (["diagnose", "x.pt", "--dead-threshold", "low"], ["--dead-threshold", "invalid float value", "low"]),
    (["diagnose", "x.pt", "--dead-threshold", "-1"], ["--dead-threshold must be >= 0, got -1.0"]),
    (["diagnose", "x.pt", "--groups", "0"], ["--groups must be >= 1, got 0"]),
    (["diagnose", "x.pt", "--plot", "x.png"], ["--plot needs --embeddings"]),
    (["bench", "--ops", "matmul"], ["--ops", "unknown op 'matmul'"]),
    (["bench", "--ops", ","], ["--ops", "empty"]),
    (["bench", "--quick", "--smoke"], ["--smoke", "not allowed with argument --quick"]),
    (["bench", "--memory", "lots"], ["--memory", "invalid choice", "lots"]),
    (["bench", "--repeats", "many"], ["--repeats", "invalid int value", "many"]),
]
if not HAS_CUDA:
    CLI_CASES += [
        (["demo", "--device", "cuda", "--no-plot"], ["--device cuda", "no CUDA device"]),
        (["bench", "--device", "cuda", "--smoke"], ["--device cuda", "no CUDA device"]),
    ]


@pytest.mark.parametrize("argv,words", CLI_CASES, ids=[" ".join(a) or "(none)" for a, _ in CLI_CASES])
def test_cli_bad_arguments_exit_2_naming_the_argument(argv, words, capsys):
    from vqkernels import cli

    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    for word in words:
        assert word in err, f"{word!r} missing from: {err}"


def test_cli_info_reports_a_bad_backend_variable_instead_of_crashing(monkeypatch, capsys):
    from vqkernels import cli

    monkeypatch.setenv("VQKERNELS_BACKEND", "fastest")
    code = cli.main(["info"])
    captured = capsys.readouterr()
    assert code == 2
    assert "backends" in captured.out, "the rest of the report is still printed"
    assert "VQKERNELS_BACKEND='fastest'" in captured.out + captured.err and "expected one of" in captured.out + captured.err
