"""The converters' progress bar: on stderr (stdout keeps the results), no markup read from names."""

from __future__ import annotations

_FIGURES = 32  # "299.4/944.6 MB 55.5 MB/s 0:00:12": bytes, speed, time left
# the terminal's last two columns stay free for the `^C` it echoes on Ctrl-C: on a full line the
# echo wrapped to a new line, and the next redraw left a second bar behind
_SPARE = 2


def _widths(width: int, description: int, tensor_column: bool) -> tuple[int, int, int]:
    """(description, bar, tensor) widths that fit a line of `width`: the figures always show;
    the description keeps up to `description` characters, the bar 10 to 40, the tensor name
    what is left (0: no tensor column)."""
    free = width - _FIGURES - 2  # a space after the description and after the bar
    desc = max(6, min(description, free - 10))
    bar = max(10, min(40, free - desc - (24 if tensor_column else 0)))
    tensor = free - desc - bar - 1 if tensor_column else 0
    return desc, bar, tensor if tensor >= 12 else 0


def conversion_progress(enabled: bool = True, tensor_column: bool = False, console=None):
    """A rich Progress of bytes read: description, bar, bytes, speed, ETA (and the tensor at work),
    fitted to the terminal's width less two columns (long names end in an ellipsis; the bar never
    disappears); on a terminal only (as imatrix's)."""
    from rich.console import Console
    from rich.constrain import Constrain
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.table import Column

    console = console or Console(stderr=True, markup=False, highlight=False)
    desc, bar, tensor = _widths(console.width - _SPARE, 8 if tensor_column else 40, tensor_column)

    def fixed(w):
        return Column(width=w, no_wrap=True, overflow="ellipsis")

    columns = [TextColumn("{task.description}", markup=False, table_column=fixed(desc)), BarColumn(bar_width=bar),
               DownloadColumn(table_column=Column(no_wrap=True)), TransferSpeedColumn(table_column=Column(no_wrap=True)),
               TimeRemainingColumn(table_column=Column(no_wrap=True))]
    if tensor:
        columns.append(TextColumn("{task.fields[tensor]}", markup=False, table_column=fixed(tensor)))

    class Bars(Progress):
        def get_renderables(self):
            yield Constrain(self.make_tasks_table(self.tasks), console.width - _SPARE)

    # piped (a log file), no bar: rich would leave its last frame of box-drawing characters there
    return Bars(*columns, console=console, disable=not enabled or not console.is_terminal, transient=False)
