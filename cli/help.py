"""`--help` without a type label: typer prints `<bool>` beside it, as if it took a value. Every
`spot-fast` group and command is built from these classes (`cls=` of `typer.Typer` / `.command`)."""
from __future__ import annotations

import typer
from typer.core import TyperCommand, TyperGroup


class PlainHelp:
    """Mixin for a typer command or group: its help option shows no type label."""

    def get_help_option(self, ctx: typer.Context):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class Command(PlainHelp, TyperCommand):
    pass


class Group(PlainHelp, TyperGroup):
    pass
