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
    """A `spot-fast` command: while it runs, messages know its name (`spot_fast.errors.current_command`)."""

    def invoke(self, ctx: typer.Context):
        from spot_fast.errors import speaking_cli
        with speaking_cli(ctx.command_path):
            return super().invoke(ctx)


class Group(PlainHelp, TyperGroup):
    pass
