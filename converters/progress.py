"""The converters' progress bar: on stderr (stdout keeps the results), no markup read from names."""

from __future__ import annotations


def conversion_progress(enabled: bool = True, tensor_column: bool = False):
    """A rich Progress of bytes read: description, bar, bytes, speed, ETA (and the tensor at work)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = [TextColumn("{task.description:<40}", markup=False), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn()]
    if tensor_column:
        columns.append(TextColumn("{task.fields[tensor]}", markup=False))
    return Progress(*columns, console=Console(stderr=True, markup=False, highlight=False), disable=not enabled,
                    transient=False)
