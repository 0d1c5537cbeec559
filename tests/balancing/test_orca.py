from __future__ import annotations

import pytest

from meshlib.balancing.orca import LoadReport, format_report, parse_report


def test_reads_the_text_form() -> None:
    report = parse_report(
        "TEXT cpu_utilization=0.31, application_utilization=0.5, rps_fractional=120.0, named_metrics.rif=4"
    )
    assert report == LoadReport(
        cpu_utilization=0.31, application_utilization=0.5, rps_fractional=120.0, named_metrics={"rif": 4.0}
    )
    assert report.utilization == 0.5


def test_utilization_is_the_cpus_when_the_app_set_none() -> None:
    report = parse_report("TEXT cpu_utilization=0.8, eps=2, mem_utilization=0.25")
    assert report is not None
    assert (report.utilization, report.eps, report.mem_utilization) == (0.8, 2.0, 0.25)


def test_round_trip() -> None:
    report = LoadReport(
        cpu_utilization=0.125,
        mem_utilization=0.5,
        application_utilization=0.75,
        rps_fractional=1234.5,
        eps=3.0,
        named_metrics={"queue": 7.0},
    )
    text = format_report(report)
    assert text.startswith("TEXT cpu_utilization=0.125, ")
    assert parse_report(text) == report
    assert parse_report(text.encode()) == report


def test_zero_figures_are_left_out_but_the_cpu() -> None:
    assert format_report(LoadReport()) == "TEXT cpu_utilization=0"
    assert parse_report("TEXT cpu_utilization=0") == LoadReport()


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "cpu_utilization=0.5",  # no form named
        "BIN CgQIARAB",  # a form meshlib does not read
        'JSON {"cpu_utilization": 0.5}',
        "TEXT",
        "TEXT nonsense",
        "TEXT cpu_utilization=high, eps=nan, rps_fractional=-1, mem_utilization=inf",
        "TEXT " + "x" * 5000,
        b"\xff\xfe",
    ],
)
def test_a_header_with_nothing_usable_is_none(value: str | bytes | None) -> None:
    assert parse_report(value) is None


def test_what_cannot_be_read_is_skipped_not_fatal() -> None:
    report = parse_report(
        "TEXT  cpu_utilization = 0.5 ,, utilization=9, eps=bad, named_metrics.=1, "
        "named_metrics.a b=2, named_metrics.ok=3, future_field=1, rps_fractional=10"
    )
    assert report == LoadReport(cpu_utilization=0.5, rps_fractional=10.0, named_metrics={"ok": 3.0})


def test_invalid_names_are_not_written() -> None:
    text = format_report(LoadReport(named_metrics={"a,b": 1.0, "": 2.0, "good": 3.0}))
    assert text == "TEXT cpu_utilization=0, named_metrics.good=3"
