"""``--help`` that starts with what the command does: the description (one sentence and an example)
first, argparse's usage lines after it."""
from __future__ import annotations

import types


def description_first(parser):
    """Make ``parser.format_help()`` print the description before the usage block (argparse and
    jsonargparse parsers alike); returns the parser."""
    original = parser.format_help

    def format_help(self) -> str:
        text = original()
        if not text.startswith("usage:") or "\n\n" not in text:
            return text
        usage, rest = text.split("\n\n", 1)
        heads = [i for i in (rest.find("\npositional arguments:"), rest.find("\noptions:"),
                             rest.find("\nsubcommands:")) if i >= 0]
        if not heads:
            return text
        cut = min(heads)
        return f"{rest[:cut].rstrip()}\n\n{usage}\n{rest[cut:]}"

    parser.format_help = types.MethodType(format_help, parser)
    return parser
