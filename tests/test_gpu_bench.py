"""benchmarks/gpu.py is ready for a GPU session: its CPU dry run goes through every measurement (mmcl's `fit`, the
`Trainer`, generation) and writes its BENCHMARKS.md section; the peak table and the MFU formula are checked by hand;
without CUDA (and without --dry-run) it stops with one clear line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu  # noqa: E402


def test_peak_table_picks_the_right_row():
    assert gpu.peak_flops("NVIDIA H200") == 989e12
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.peak_flops("Some Other GPU") is None


def test_mfu_by_hand():
    # 1e9 parameters at 10,000 tokens/s: 6 * 1e9 * 1e4 = 6e13 FLOP/s of 1e14 peak = 60 %
    assert gpu.mfu(1_000_000_000, 10_000, 1e14) == pytest.approx(0.6)
    assert gpu.mfu(2_000_000_000, 5_000, 989e12) == pytest.approx(6e13 / 989e12)


def test_splice_replaces_only_the_gpu_section():
    text = "# Benchmarks\n\n<!-- bench:eval -->\nkeep\n<!-- /bench:eval -->\n"
    once = gpu.splice(text, ["old"])
    assert once == text + "\n<!-- bench:gpu -->\nold\n<!-- /bench:gpu -->\n"
    twice = gpu.splice(once, ["new", "rows"])
    assert twice == text + "\n<!-- bench:gpu -->\nnew\nrows\n<!-- /bench:gpu -->\n"


@pytest.mark.integration
def test_the_dry_run_measures_everything_on_cpu_and_writes_its_section(tmp_path, capsys):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    assert gpu.main(["--dry-run", "--markdown", str(md), "--peak-tflops", "1", "--work-dir", str(tmp_path / "w")]) == 0
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\n<!-- bench:gpu -->\n") and text.endswith("<!-- /bench:gpu -->\n")
    assert "(dry run);" in text
    for row in ("| mmcl `fit` tokens/s | ", "| model FLOPs utilisation", "| mmcl ÷ Trainer | ",
                "| batched ÷ batch-1 speed | "):
        assert row in text, row
    assert "– (GPU not in the peak table)" not in text  # --peak-tflops gave an MFU


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_without_cuda_it_stops_with_one_line(capsys):
    assert gpu.main([]) == 2
    err = capsys.readouterr().err
    assert err == "benchmarks/gpu.py needs a CUDA GPU and found none; `--dry-run` checks the set-up on CPU\n"
