"""What habanero-pack prints for a push (``packer.output``)."""

from __future__ import annotations

from packer.deploy import PushResult
from packer.output import describe_push, printable, push_json


def _result(**report: object) -> PushResult:
    base = {"version": 3, "changed": ["shop.views"], "added": [], "removed": [], "data_changed": [],
            "modules": [], "timings_ms": {"verify": 0.4, "apply": 1.2}, "workers": []}
    return PushResult(3, "ab" * 32, "http://127.0.0.1:8000", {"report": {**base, **report}},
                      timings_ms={"total": 40, "build": 10, "transfer": 20, "server": 2.0})


def test_a_change_that_did_not_take_effect_live_is_printed_with_its_fix():
    text = describe_push(_result(not_live=[
        {"source": "django", "what": "settings.DEBUG changed", "fix": "restart the app to apply it"}]))

    assert "  NOT LIVE (django): settings.DEBUG changed; restart the app to apply it" in text.splitlines()


def test_a_push_that_took_effect_whole_prints_no_not_live_line():
    assert "NOT LIVE" not in describe_push(_result(not_live=[]))
    assert "NOT LIVE" not in describe_push(_result())  # an app of an older habanero: no such field


def test_the_json_output_carries_what_did_not_take_effect_live():
    notices = [{"source": "aiohttp", "what": "route GET /new", "fix": "restart"}]

    assert push_json(_result(not_live=notices))["report"]["not_live"] == notices


def test_escape_sequences_from_the_app_are_shown_escaped_not_run_by_the_terminal():
    text = printable(describe_push(_result(not_live=[
        {"source": "evil\x1b]0;pwned\x07", "what": "route \x1b[2J/x", "fix": "restart\u202e"}])))

    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "NOT LIVE (evil\\x1b]0;pwned\\x07): route \\x1b[2J/x; restart\\u202e" in text


def test_printable_keeps_newlines_tabs_and_ordinary_text_as_they_are():
    text = "pushed version 3\n  changed:\tshop.views — café ✓"

    assert printable(text) is text


def test_every_result_the_cli_prints_goes_through_printable(capsys):
    import argparse

    from packer.commands import _emit

    _emit(argparse.Namespace(quiet=0), "key id: \x1b[8mhidden\x1b[0m")

    assert capsys.readouterr().out == "key id: \\x1b[8mhidden\\x1b[0m\n"
