from ts2cli.markup import shown


def test_markup_and_control_characters_are_shown_as_text():
    assert shown("clip [bold].mp4") == "clip \\[bold].mp4"
    assert shown("two\nlines\r.mp4") == "two\\nlines\\r.mp4"
    assert shown("\x1b[31mred\u2028.mp4") == "\\x1b[31mred\\u2028.mp4"  # "[31m" is no markup tag
    assert shown("café à la plage\t.mp4") == "café à la plage\\t.mp4"  # letters stay; a tab is a control character


def test_trimmed_stdout_drops_the_blanks_that_end_lines(capsys):
    from ts2cli.markup import TrimmedStdout

    stream = TrimmedStdout()
    for piece in ("a  ", " \nb ", "\n", "  c", "  "):  # a line's end may come in a later write
        stream.write(piece)
    stream.flush()
    assert capsys.readouterr().out == "a\nb\n  c  "  # spaces no newline follows are kept
