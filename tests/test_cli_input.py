"""Every generate flag's out-of-range value ends in a one-line message, never a traceback
(tried as a new user would: `clipmesh generate "a cat" --workers 0` used to end in
ZeroDivisionError). The checks run before any process starts, so the walk takes seconds."""

from __future__ import annotations

import pytest

from clipmesh import cli

BAD = [("--workers", "0"), ("--workers", "-2"), ("--frames", "18"), ("--frames", "-1"), ("--frames", "100000"),
       ("--height", "0"), ("--height", "65"), ("--width", "100000"), ("--steps", "0"), ("--steps", "100000"),
       ("--guidance", "-1"), ("--guidance", "nan"), ("--guidance-2", "2"), ("--seed", "-1"), ("--fps", "0"),
       ("--fps", "inf"), ("--strategy", "nope"), ("--model", "no-such-model"), ("--local-halo", "0"),
       ("--global-frames", "-1"), ("--global-phase", "2"), ("--global-rope", "sideways"), ("--phase-bias", "-1"),
       ("--block-frames", "0"), ("--slice-chunks", "-5"), ("--step-cache", "bogus"), ("--checkpoint-every", "-1"),
       ("--max-attempts", "0"), ("--frames", "abc"), ("--steps", "1.5")]


@pytest.mark.parametrize("flag,value", BAD)
def test_a_bad_generate_flag_is_one_line(flag, value, tmp_path, capsys):
    argv = ["generate", "a cat", "--output", str(tmp_path / "v.mp4"), flag, value]
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse: its usage line and one error line
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err and "Traceback" not in "\n".join(err)
    message = err[-1]
    assert message.startswith(("clipmesh: ", "clipmesh generate: error: ")), message
    assert flag.lstrip("-").replace("-", "_").split("_")[0] in message.replace("-", "_") or "model" in message, message
    assert not (tmp_path / "v.mp4").exists()
