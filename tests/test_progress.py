"""What a run prints: bars that end at their real count and are cleared, one line per cell, one
line per epoch of training in a log, and plain summary rows when the output is not a terminal."""
import io

from rich.console import Console

from bench import cli, runner
from bench.progress import Reporter


def _log() -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    return Reporter(console=Console(file=out, force_terminal=False, width=80)), out


def test_training_notes_are_one_line_per_epoch_in_a_log():
    reporter, out = _log()
    label = "fine-tune avit gate_scale:10+gate_center:75+ponder_weight:0.0005"
    with reporter.bar(label, 30) as bar:
        for epoch in range(1, 4):
            for step in range(5):
                bar.advance()
                bar.note(f"epoch {epoch}: loss {1 / (step + 1):.3f}")
            bar.note(f"val top-1 9{epoch}.0%, mean depth 3.{epoch} of 6")  # A-ViT's end-of-epoch note
    lines = out.getvalue().splitlines()
    assert lines == [f"{label}: epoch 1: loss 0.200; val top-1 91.0%, mean depth 3.1 of 6",
                     "  epoch 2: loss 0.200; val top-1 92.0%, mean depth 3.2 of 6",
                     "  epoch 3: loss 0.200; val top-1 93.0%, mean depth 3.3 of 6"]


def test_log_has_no_bars_and_one_line_per_cell():
    reporter, out = _log()
    reporter.cell_started(3, 28)
    with reporter.bar("time ats 0.5 bs=8", 200) as bar:
        for _ in range(26):
            bar.advance()
    reporter.cell_done("ats 0.5 cpu fp32 bs=8: top-1 84.5%")
    assert out.getvalue() == "cell 3/28 ats 0.5 cpu fp32 bs=8: top-1 84.5%\n"


def test_terminal_bars_end_at_their_count_and_are_cleared():
    out = io.StringIO()
    reporter = Reporter(console=Console(file=out, force_terminal=True, width=120))
    reporter.cell_started(2, 5)
    with reporter.bar("time deit full bs=1", 200) as bar:
        for _ in range(26):  # a timing bar stops on time, long before its maximum
            bar.advance()
        progress, task = bar._progress, bar._task
        assert [t.description for t in progress.tasks] == ["cell 2 of 5", "time deit full bs=1"]
    assert progress.tasks[task].total == progress.tasks[task].completed == 26
    assert progress.live.transient  # rich erases the bars when they stop
    reporter.cell_done("deit full cpu fp32 bs=1: top-1 86.5%")
    assert out.getvalue().rstrip().endswith("cell 2/5 deit full cpu fp32 bs=1: top-1 86.5%")


def test_cell_line_names_the_cell_and_its_numbers():
    rec = {"method": "ats", "budget": "blocks:1-5+keep:0.25", "device": "cpu", "precision": "fp32", "batch_size": 8,
           "top1": 81.0, "gmacs": 0.01893, "gmacs_ratio": 0.35, "img_per_s": 41.43, "speedup": 0.52,
           "latency_ms_p90": 959.76, "peak_mem_mb": 9.2, "status": "ok"}
    assert runner.cell_line(rec) == ("ats blocks:1-5+keep:0.25 cpu fp32 bs=8: top-1 81.0%, 0.01893 GMACs (0.35 of dense), "
                                     "41.43 img/s, speedup 0.52x, p90 959.76 ms, peak 9 MiB [ok]")


def test_summary_in_a_log_is_one_plain_line_per_row(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, force_terminal=False, width=80))
    base = {"mode": "compact", "device": "cpu", "precision": "fp32", "top1": 81.0, "top1_ci_low": 75.0, "top1_ci_high": 85.8,
            "gmacs": 0.0189, "gmacs_ratio": 0.35, "img_per_s": 41.4, "speedup": 0.52, "latency_ms_p90": 9.6}
    records = [{**base, "method": "ats", "budget": b, "batch_size": bs}
               for b in ("blocks:1-5+keep:0.25", "blocks:1-5+keep:0.5", "blocks:-2/-1") for bs in (1, 8)]
    cli._summary(records, type("R", (), {"id": "r1"})())
    lines = out.getvalue().splitlines()
    assert lines[0] == "run r1 (cpu, fp32)" and lines[1].startswith("method | budget | top-1")
    assert [ln.split(" | ")[1] for ln in lines[2:]] == ["blocks:1-5+keep:0.25", "blocks:1-5+keep:0.5", "blocks:-2/-1"]
    assert all(len(ln) > 80 for ln in lines[2:])  # not wrapped at the log's 80 columns
